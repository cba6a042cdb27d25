//! `hintfed-bench memory`: the hub's memory with many keys and many agents.
//!
//! 1. One `hintfed-server`; `--origins` in-process origins publish `--keys` keys (as in
//!    `snapshot`), checked full by a probe snapshot.
//! 2. `--agents` agent-equivalent peers ([`crate::fill::SnapshotClient`]): each is a real
//!    ZeroMQ DEALER + SUB pair on the hub, says hello as an agent and asks for a snapshot, all
//!    at once, as agents do when a hub restarts: on the hub this is exactly the per-agent work
//!    (connection, subscription, snapshot answer, fan-out), without 50 agent processes on the
//!    machine.
//! 3. The origins then drive `--rate` updates/s for `--duration` s, fanned out to every peer.
//! 4. The hub's RSS after the fill and its peak RSS (VmHWM) at the end, its CPU, the snapshot
//!    times and the fan-out each peer received.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fill::{self, Fleet, SnapshotClient};
use crate::procs;

/// Options of `memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// The keys the hub is filled with.
    #[command(flatten)]
    pub fill: fill::FillArgs,
    /// Agent-equivalent peers that fetch a snapshot at once and then receive the fan-out.
    #[arg(long, default_value_t = 50)]
    pub agents: usize,
    /// Updates/s (over all origins) once the peers are in.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of updates.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Write the JSON report here as well.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Runs the memory benchmark; returns the JSON report (also printed as a table).
pub async fn run(a: MemoryArgs) -> anyhow::Result<serde_json::Value> {
    let fill::FillArgs {
        keys,
        origins,
        fill_rate,
    } = a.fill;
    anyhow::ensure!(
        keys >= 1 && origins >= 1 && a.agents >= 1,
        "--keys, --origins and --agents must be >= 1"
    );
    let machine_before = procs::machine();
    let tmp = tempfile::tempdir()?;
    let tck = procs::clk_tck();
    let mut hub = procs::start_hub(tmp.path(), "hub-0", "300s", "warn").await?;
    let empty = procs::usage(hub.daemon.pid(), tck).unwrap_or_default();
    eprintln!(
        "filling the hub with {} keys from {} origins ...",
        keys, origins
    );
    let fleet = Fleet::start(&hub.endpoint, origins, keys, fill_rate);
    let mut probe = SnapshotClient::connect(&hub.endpoint, "probe").await?;
    let (snap, fill_secs) = crate::snapshot::fill_hub(&fleet, &mut probe, keys, origins).await?;
    drop(probe);
    let filled = procs::usage(hub.daemon.pid(), tck).unwrap_or_default();

    eprintln!("{} peers ask for a snapshot at once ...", a.agents);
    let mut joins = Vec::new();
    for i in 0..a.agents {
        let ep = hub.endpoint.clone();
        joins.push(tokio::spawn(async move {
            let mut c = SnapshotClient::connect(&ep, &format!("peer-{i}")).await?;
            let s = c.fetch(false, Duration::from_secs(120)).await?;
            anyhow::Ok((c, s))
        }));
    }
    let mut clients = Vec::new();
    let mut times = Vec::new();
    let mut short = 0u64;
    let mut retries = 0u64;
    for j in joins {
        let (c, s) = j.await??;
        if s.entries < keys as u64 {
            short += 1;
        }
        retries += s.retries;
        times.push(s.secs);
        clients.push(c);
    }
    times.sort_by(f64::total_cmp);
    let after_snapshots = procs::usage(hub.daemon.pid(), tck).unwrap_or_default();

    eprintln!("driving {} updates/s for {} s ...", a.rate, a.duration);
    let counters: Vec<_> = clients
        .into_iter()
        .map(SnapshotClient::count_fanout_in_background)
        .collect();
    let base: Vec<u64> = counters
        .iter()
        .map(|(c, _, _)| c.load(Ordering::Relaxed))
        .collect();
    let driven0 = fleet.stats.driven.load(Ordering::Relaxed);
    let published0 = fleet.stats.published.load(Ordering::Relaxed);
    let u0 = procs::usage(hub.daemon.pid(), tck).unwrap_or_default();
    let t0 = Instant::now();
    fleet.set_rate_per_origin(a.rate / origins as f64);
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    fleet.set_rate_per_origin(0.0);
    let load_secs = t0.elapsed().as_secs_f64();
    let driven = fleet.stats.driven.load(Ordering::Relaxed) - driven0;
    let published = fleet.stats.published.load(Ordering::Relaxed) - published0;
    // Let the fan-out drain.
    let mut last = 0u64;
    let mut stable = Instant::now();
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while stable.elapsed() < Duration::from_secs(1) && Instant::now() < drain_deadline {
        let total: u64 = counters
            .iter()
            .map(|(c, _, _)| c.load(Ordering::Relaxed))
            .sum();
        if total != last {
            last = total;
            stable = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let u1 = procs::usage(hub.daemon.pid(), tck).unwrap_or_default();
    let got: Vec<u64> = counters
        .iter()
        .zip(&base)
        .map(|((c, _, _), b)| c.load(Ordering::Relaxed) - b)
        .collect();
    let min_got = got.iter().copied().min().unwrap_or(0);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    let med_got = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max_got = sorted.last().copied().unwrap_or(0);
    let mib = |k: u64| k as f64 / 1024.0;
    let report = json!({
        "mode": "memory",
        "keys": keys, "origins": origins, "agents": a.agents,
        "machine_before": machine_before,
        "fill_secs": fill_secs,
        "snapshot_bytes": snap.bytes, "snapshot_chunks": snap.chunks,
        "hub_rss_mib": {"empty": mib(empty.rss_kib), "filled": mib(filled.rss_kib),
                        "after_snapshots": mib(after_snapshots.rss_kib), "end": mib(u1.rss_kib)},
        "hub_peak_rss_mib": mib(u1.peak_rss_kib),
        "snapshots": {"p50_secs": times.get(times.len() / 2), "max_secs": times.last(),
                      "short_of_keys": short, "retries": retries},
        "fanout": {"driven": driven, "published": published, "updates_per_sec": driven as f64 / load_secs,
                   "received_min_per_peer": min_got, "received_median_per_peer": med_got,
                   "received_max_per_peer": max_got,
                   "hub_cpu_percent": 100.0 * (u1.cpu_secs - u0.cpu_secs) / load_secs},
        "target": {"hub_peak_le_64_mib": u1.peak_rss_kib <= 64 * 1024},
        "machine_after": procs::machine(),
    });
    println!(
        "hub RSS: empty {:.1} MiB, {} keys {:.1} MiB, after {} snapshots {:.1} MiB, end {:.1} MiB; PEAK {:.1} MiB",
        mib(empty.rss_kib),
        keys,
        mib(filled.rss_kib),
        a.agents,
        mib(after_snapshots.rss_kib),
        mib(u1.rss_kib),
        mib(u1.peak_rss_kib)
    );
    println!(
        "snapshots: {} peers at once, p50 {:.2} s, max {:.2} s, {} short of {} keys, {} asked again; fan-out: {} updates at {:.0}/s, peers got min {} / median {} / max {}, hub CPU {:.0}%",
        a.agents,
        times.get(times.len() / 2).copied().unwrap_or(0.0),
        times.last().copied().unwrap_or(0.0),
        short,
        keys,
        retries,
        driven,
        driven as f64 / load_secs,
        min_got,
        med_got,
        max_got,
        100.0 * (u1.cpu_secs - u0.cpu_secs) / load_secs
    );
    let links: Vec<_> = counters
        .iter()
        .filter_map(|(_, m, _)| m.links().first().map(|l| l.stats()))
        .collect();
    let sum = |f: fn(&hintfed_transport::StatsSnapshot) -> u64| links.iter().map(f).sum::<u64>();
    eprintln!(
        "peer links (sum over peers): reconnects {}, silence timeouts {}, messages in {}, dropped inbound full {}",
        sum(|s| s.reconnects),
        sum(|s| s.silence_timeouts),
        sum(|s| s.messages_in),
        sum(|s| s.dropped_inbound_full)
    );
    for (_, _, h) in counters {
        h.abort();
    }
    fleet.stop().await?;
    hub.daemon.stop(Duration::from_secs(2));
    drop(tmp);
    Ok(report)
}
