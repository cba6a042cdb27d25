//! `hintfed-bench hub`: the hub alone. One real `hintfed-server` process; in this process a
//! publisher made of the core's `Node` and the transport's `MultiHub` (exactly what
//! hintfed-agent uses) signs and sends device updates as fast as the link takes them, and
//! `--subscribers` plain ZeroMQ SUB sockets on the hub's PUB count what is fanned out. Reports
//! updates/s ingested (received by the first subscriber) and delivered per subscriber, next
//! to the raw ZeroMQ PUB/SUB ceiling measured in the same run, and the hub's CPU and peak RSS.
//!
//! Everything shares the machine: the publisher and the subscribers run in this process, so
//! on 2 cores the figure is a lower bound of what the hub alone could do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{
    Action, DeviceState, Epoch, KeyRing, LocalEvent, Millis, Node, NodeConfig, Role,
};
use hintfed_transport::{MultiHub, MultiHubConfig};
use serde_json::json;
use zeromq::{Socket as _, SocketRecv as _, SubSocket};

use crate::procs::{self, Daemon};

/// Options of `hub`.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Subscribers on the hub's PUB (the agents of the target: 10).
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Updates to publish.
    #[arg(long, default_value_t = 200_000)]
    pub updates: u64,
    /// Distinct device keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Messages for the ZeroMQ ceiling (0: skip).
    #[arg(long, default_value_t = 500_000)]
    pub zmq_count: u64,
    /// Payload bytes of the ZeroMQ ceiling messages.
    #[arg(long, default_value_t = 200)]
    pub zmq_size: usize,
}

fn now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
    )
}

const KEY: &str = "bench-shared-key";

/// Runs the hub benchmark; returns the JSON report (also printed as a table).
pub async fn run(a: HubArgs) -> anyhow::Result<serde_json::Value> {
    let machine_before = procs::machine();
    let dir = tempfile::tempdir()?;
    let tck = procs::clk_tck();
    let zmq = if a.zmq_count > 0 {
        Some(crate::ceiling::zmq_pubsub(a.zmq_count, a.zmq_size).await?)
    } else {
        None
    };
    let port = procs::free_port_pair()?;
    let http = format!("127.0.0.1:{}", procs::free_port()?);
    let cfg = dir.path().join("hub.ini");
    std::fs::write(
        &cfg,
        format!(
            "[general]\nname = hub-bench\nlog_level = warn\n\n[federation]\nshared_key = {KEY}\n\n[server]\nlisten = tcp://127.0.0.1:{port}\n\n[http]\nlisten = {http}\n"
        ),
    )?;
    let mut hub = Daemon::spawn(
        "hub",
        &procs::sibling("hintfed-server")?,
        &["--config".into(), cfg.display().to_string()],
        &[],
        dir.path(),
    )?;
    let up = procs::wait_until(Duration::from_secs(15), || async {
        procs::http_get(&http, "/healthz").await.contains("ok")
    })
    .await;
    anyhow::ensure!(up, "hub did not come up (see {})", hub.log.display());

    // Subscribers: count update messages (topic frame starting with "state.").
    let counts: Vec<Arc<AtomicU64>> = (0..a.subscribers)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let mut subs = Vec::new();
    for c in &counts {
        let mut s = SubSocket::new();
        s.subscribe("").await?;
        s.connect(&format!("tcp://127.0.0.1:{}", port + 1)).await?;
        let c = c.clone();
        subs.push(tokio::spawn(async move {
            while let Ok(m) = s.recv().await {
                if m.get(0).is_some_and(|t| t.starts_with(b"state.")) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Publisher.
    let multi = MultiHub::connect(MultiHubConfig::new([format!("tcp://127.0.0.1:{port}")]))?;
    let _incoming = multi.take_incoming();
    let mut connected = multi.connected();
    let deadline = Instant::now() + Duration::from_secs(10);
    while *connected.borrow() < 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "publisher not connected to the hub"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), connected.changed()).await;
    }
    let keys = KeyRing::from_secrets([KEY]);
    let limits = CoreLimits::default();
    let t = now();
    let mut node = Node::new(NodeConfig::new("bench-origin"), Epoch(t.0), t);
    let send = |multi: &MultiHub, env: &hintfed_core::Envelope| -> anyhow::Result<bool> {
        let bytes = keys.seal(env, &limits)?;
        let frames = vec![
            Bytes::copy_from_slice(env.topic().as_bytes()),
            Bytes::from(bytes),
        ];
        Ok(multi.send_all(&frames) > 0)
    };
    let hello = node.hello(Role::Agent, "hintfed-bench");
    send(&multi, &hello)?;
    node.on_local_full_sync(now(), Vec::new());
    for act in node.take_actions() {
        if let Action::Publish(env) = act {
            send(&multi, &env)?;
        }
    }
    // Let the subscriptions settle: wait until a probe update reaches every subscriber.
    let states = [
        DeviceState::Inuse,
        DeviceState::NotInuse,
        DeviceState::Ringing,
        DeviceState::Busy,
    ];
    let mut probe = 0u64;
    let settled = procs::wait_until(Duration::from_secs(10), || {
        probe += 1;
        node.on_local_event(
            now(),
            LocalEvent::device("probe", states[(probe % 4) as usize]),
        );
        for act in node.take_actions() {
            if let Action::Publish(env) = act {
                let _ = send(&multi, &env);
            }
        }
        let ok = counts.iter().all(|c| c.load(Ordering::Relaxed) > 0);
        async move { ok }
    })
    .await;
    anyhow::ensure!(settled, "subscribers never received an update");
    let base: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let u0 = procs::usage(hub.pid(), tck).unwrap_or_default();
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut blocked = 0u64;
    let mut i = 0u64;
    while sent < a.updates {
        let key = format!("PJSIP/h{}", i % a.keys as u64);
        let st = states[((i / a.keys as u64) % 4) as usize];
        i += 1;
        node.on_local_event(now(), LocalEvent::device(key, st));
        for act in node.take_actions() {
            if let Action::Publish(env) = act {
                // The link queue is bounded: when full, yield until it takes the message.
                while !send(&multi, &env)? {
                    blocked += 1;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                sent += 1;
            }
        }
        if sent.is_multiple_of(256) {
            tokio::task::yield_now().await;
        }
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // Wait until the subscribers stop receiving.
    let mut last = 0u64;
    let mut stable = Instant::now();
    let mut t_last = t0.elapsed();
    while stable.elapsed() < Duration::from_millis(1000) {
        let total: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        if total != last {
            last = total;
            stable = Instant::now();
            t_last = t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let u1 = procs::usage(hub.pid(), tck).unwrap_or_default();
    let secs = t_last.as_secs_f64().max(1e-9);
    let got: Vec<u64> = counts
        .iter()
        .zip(&base)
        .map(|(c, b)| c.load(Ordering::Relaxed) - b)
        .collect();
    let min = got.iter().copied().min().unwrap_or(0);
    let total: u64 = got.iter().sum();
    let ingest_rate = min as f64 / secs;
    let fanout_rate = total as f64 / secs;
    let report = json!({
        "machine_before": machine_before,
        "machine_after": procs::machine(),
        "subscribers": a.subscribers,
        "updates_sent": sent,
        "send_secs": send_secs,
        "publisher_blocked_waits": blocked,
        "received_per_subscriber_min": min,
        "received_per_subscriber": got,
        "updates_per_sec_through_hub": ingest_rate,
        "messages_per_sec_fanned_out": fanout_rate,
        "zmq_pubsub_msgs_per_sec": zmq.map(|z| z.msgs_per_sec),
        "ratio_updates_per_sec_to_zmq_ceiling": zmq.map(|z| ingest_rate / z.msgs_per_sec),
        "hub_cpu_percent": 100.0 * (u1.cpu_secs - u0.cpu_secs) / secs,
        "hub_peak_rss_mib": u1.peak_rss_kib as f64 / 1024.0,
    });
    println!(
        "hub: {} updates -> {} subscribers: {:.0} updates/s through the hub (slowest subscriber got {}/{}), {:.0} msg/s fanned out; ZeroMQ PUB/SUB ceiling {} msg/s; ratio {}; hub CPU {:.0}%, peak RSS {:.1} MiB",
        sent,
        a.subscribers,
        ingest_rate,
        min,
        sent,
        fanout_rate,
        zmq.map(|z| format!("{:.0}", z.msgs_per_sec))
            .unwrap_or_else(|| "n/a".into()),
        zmq.map(|z| format!("{:.3}", ingest_rate / z.msgs_per_sec))
            .unwrap_or_else(|| "n/a".into()),
        100.0 * (u1.cpu_secs - u0.cpu_secs) / secs,
        u1.peak_rss_kib as f64 / 1024.0
    );
    for s in subs {
        s.abort();
    }
    hub.stop(Duration::from_secs(2));
    Ok(report)
}
