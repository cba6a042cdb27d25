//! `hintfed-bench snapshot`: how fast a new agent holds a hub's whole table.
//!
//! 1. One `hintfed-server`; `--origins` in-process origins ([`crate::fill::Fleet`]) publish
//!    `--keys` device keys in total and keep heartbeating.
//! 2. A probe ([`crate::fill::SnapshotClient`]) asks the hub for snapshots until one holds
//!    every key: the table is full. Its last fetch time is the same snapshot read by an
//!    already running process (no process start, no apply).
//! 3. Ceilings, same run: decoding and verifying the same chunk payloads in this process; raw
//!    ZeroMQ PUB/SUB between two processes moving the same number of messages of the same
//!    size (time = chunks / msg/s); pipelined Setvar/s of a spare server of the agent's
//!    simulator (the floor of writing every key to an Asterisk) over three sessions: events
//!    off, events on (each write then also sends an event), and events on with the agent's
//!    filters (each write's event made, then dropped: the agent's own session).
//! 4. One real `hintfed-agent` (with a simulated Asterisk of its own) is started; from its
//!    process start the tool polls every 10 ms: `/healthz` (up), `/metrics`
//!    `hintfed_snapshot_entries_sum` ≥ keys (entries received into its table), its log line
//!    `snapshot complete` (the node completed the snapshot), and the simulator's
//!    `SetvarTotal` ≥ keys (every key written to its Asterisk as `Custom:`).
//! 5. The agent's peak RSS after the snapshot and at the end. Its apply rate is the first of
//!    `--apply-rounds` rounds, each of them the events-off ceiling, the ceiling of a session
//!    like the agent's, then a new agent writing every key to a fresh simulated Asterisk; the
//!    apply ratios are of the rounds' medians. Every Setvar rate (ceilings and agents) is read
//!    from the simulator's trace, first to last Setvar of the run on the simulator's clock, so
//!    that no polling interval or client round trip enters one side and not the other.
//! 6. The agent restarts beside its Asterisk, which now holds every key: the time until its
//!    full sync (which lists every `Custom:` state) and the snapshot are both done, the writes
//!    it makes until the Setvar count stands still for 1 s (ideally none: every value is
//!    already held), and its peak RSS.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::ami::Conn;
use crate::ceiling::Session;
use crate::fill::{self, Fleet, SnapshotClient};
use crate::hubproc::unix_ns;
use crate::procs::{self, Daemon};

/// Options of `snapshot`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotArgs {
    /// The keys the hub is filled with.
    #[command(flatten)]
    pub fill: fill::FillArgs,
    /// How long to wait for the agent to write every key to its Asterisk (seconds).
    #[arg(long, default_value_t = 60.0)]
    pub apply_timeout: f64,
    /// Keep configs and logs in this folder (default: a temporary folder).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
    /// Write the JSON report here as well.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// The new agent's simulated Asterisk writes what is ready together
    /// (`hintfed-sim --coalesce-writes`): a much faster Asterisk than a real one, to see the
    /// agent's memory and write rate against it. Default: one write per message, as Asterisk.
    #[arg(long)]
    pub sim_coalesce: bool,
    /// Rounds of the apply measurement: each runs the Setvar ceilings, then a new agent that
    /// writes every key to a fresh simulated Asterisk (the first round's agent is the one
    /// timed above); the ratios are of the rounds' medians. One second's Setvar rate of the
    /// same simulator swings by half or more between seconds on a shared machine, and a
    /// round is about a second of each.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub apply_rounds: u32,
}

/// Fills the hub and waits until a probe snapshot holds `keys` distinct keys; returns the
/// last probe snapshot and how long filling took.
pub async fn fill_hub(
    fleet: &Fleet,
    probe: &mut SnapshotClient,
    keys: usize,
    origins: usize,
) -> anyhow::Result<(fill::Snapshot, f64)> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(180);
    while fleet
        .stats
        .synced
        .load(std::sync::atomic::Ordering::Relaxed)
        < origins as u64
    {
        anyhow::ensure!(!fleet.failed(), "an origin failed while publishing");
        anyhow::ensure!(
            Instant::now() < deadline,
            "origins did not publish in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut held = 0;
    loop {
        // A fetch can miss its end while the fill's fan-out still floods the probe's inbound
        // queue (newest dropped when full): ask again.
        match probe.fetch(true, Duration::from_secs(10)).await {
            Ok(s) if s.distinct_keys >= keys as u64 => {
                return Ok((s, t0.elapsed().as_secs_f64()));
            }
            Ok(s) => held = s.distinct_keys,
            Err(e) => eprintln!("probe snapshot: {e}; asking again"),
        }
        anyhow::ensure!(!fleet.failed(), "an origin failed while publishing");
        anyhow::ensure!(
            Instant::now() < deadline,
            "the hub held only {held} of {keys} keys after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the snapshot benchmark; returns the JSON report (also printed as a table).
pub async fn run(a: SnapshotArgs) -> anyhow::Result<serde_json::Value> {
    let fill::FillArgs {
        keys,
        origins,
        fill_rate,
    } = a.fill;
    anyhow::ensure!(
        keys >= 1 && origins >= 1,
        "--keys and --origins must be >= 1"
    );
    let machine_before = procs::machine();
    let (tmp, dir) = procs::work_dir(a.keep.as_deref())?;
    let tck = procs::clk_tck();
    let mut hub = procs::start_hub(&dir, "hub-0", "300s", "warn").await?;
    eprintln!(
        "filling the hub with {} keys from {} origins ...",
        keys, origins
    );
    let fleet = Fleet::start(&hub.endpoint, origins, keys, fill_rate);
    let mut probe = SnapshotClient::connect(&hub.endpoint, "probe").await?;
    let (snap, fill_secs) = fill_hub(&fleet, &mut probe, keys, origins).await?;
    // A second fetch now that the table is still: the in-process figure.
    let snap2 = probe.fetch(false, Duration::from_secs(60)).await?;
    let hub_usage = procs::usage(hub.daemon.pid(), tck).unwrap_or_default();

    // Ceilings.
    eprintln!("measuring ceilings ...");
    let decode = fill::decode_secs(&snap.payloads);
    let chunk_size = (snap.bytes / snap.chunks.max(1)) as usize;
    let zcount = (snap.chunks * 20).max(2000);
    let z = crate::ceiling::zmq_pubsub(zcount, chunk_size).await?;
    let zmq_secs = snap.chunks as f64 / z.msgs_per_sec;

    // The new agents' Asterisks (one per apply round, the first for the agent timed here) and
    // the spare server the Setvar ceilings are measured on, in one simulator process.
    let rounds = a.apply_rounds as usize;
    let names: Vec<String> = std::iter::once("pbx-new".to_owned())
        .chain((1..rounds).map(|i| format!("pbx-apply-{i}")))
        .collect();
    let mut addrs = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        addrs.push(format!("127.0.0.1:{}", procs::free_port()?));
    }
    let spare_addr = format!("127.0.0.1:{}", procs::free_port()?);
    let trace = dir.join("trace.log");
    let mut sim_args: Vec<String> = Vec::new();
    for (addr, name) in addrs
        .iter()
        .zip(&names)
        .chain([(&spare_addr, &"ceiling".to_owned())])
    {
        sim_args.extend([
            "--listen".into(),
            addr.clone(),
            "--name".into(),
            name.clone(),
        ]);
    }
    sim_args.extend(["--log", "warn", "--trace"].map(String::from));
    sim_args.push(trace.display().to_string());
    if a.sim_coalesce {
        sim_args.push("--coalesce-writes".into());
    }
    let sim = Daemon::spawn("sim", &procs::sibling("hintfed-sim")?, &sim_args, &[], &dir)?;
    for addr in addrs.iter().chain([&spare_addr]) {
        let up = procs::wait_until(Duration::from_secs(15), || async {
            Conn::login(addr, "admin", "adminsecret").await.is_ok()
        })
        .await;
        anyhow::ensure!(up, "simulator did not come up (see {})", sim.log.display());
    }
    // The Setvar ceilings of the same simulator (the spare server): the floor of writing every
    // key to an Asterisk. Events off (the strictest) and events on with the agent's filters
    // (the session an agent writes over: each write's event made, then dropped) before each
    // round's agent; events on without a filter (every write also sent back as an event)
    // once. Every rate, the agents' too, is read from the simulator's trace afterwards.
    let mut ceilings = Ceilings {
        spare: spare_addr,
        keys: keys as u64,
        runs: 0,
    };
    let events_on = ceilings.run(Session::EventsOn).await?;
    let agent_cfg = |i: usize| -> anyhow::Result<(std::path::PathBuf, String)> {
        let (host, port) = addrs[i].rsplit_once(':').context("host:port")?;
        let http = format!("127.0.0.1:{}", procs::free_port()?);
        let cfg = dir.join(format!("agent-{}.ini", names[i]));
        std::fs::write(
            &cfg,
            format!(
                "[general]\nname = {name}\nlog_level = info\n\n[asterisk]\nsource = ami\napply = ami\nhost = {host}\nport = {port}\nusername = admin\n\n[federation]\nservers = {ep}\nshared_key = {key}\norigin_timeout = 300s\n\n[http]\nlisten = {http}\n",
                name = names[i],
                ep = hub.endpoint,
                key = fill::KEY,
            ),
        )?;
        Ok((cfg, http))
    };
    let agent_bin = procs::sibling("hintfed-agent")?;
    let spawn_agent = |name: &str, cfg: &std::path::Path| {
        Daemon::spawn(
            name,
            &agent_bin,
            &["--config".into(), cfg.display().to_string()],
            &[("HINTFED_ASTERISK_SECRET", "adminsecret")],
            &dir,
        )
    };
    let mut spans: Vec<RoundSpans> = Vec::with_capacity(rounds);
    let first_ceilings = (
        ceilings.run(Session::EventsOff).await?,
        ceilings.run(Session::AgentFilters).await?,
    );
    let mut stats_conn = Conn::login(&addrs[0], "admin", "adminsecret").await?;
    let (cfg, http) = agent_cfg(0)?;
    eprintln!("starting the new agent ...");
    let agent_from = u128::from(unix_ns());
    let t0 = Instant::now();
    let mut agent = spawn_agent("agent-new", &cfg)?;
    let (mut t_http, mut t_entries, mut t_complete, mut t_applied) = (None, None, None, None);
    let mut rss_at_complete = None;
    let mut applied = 0u64;
    let mut last_stats = Instant::now() - Duration::from_secs(1);
    let deadline = t0 + Duration::from_secs_f64(a.apply_timeout);
    while Instant::now() < deadline && t_applied.is_none() {
        if t_http.is_none() && procs::http_get(&http, "/healthz").await.contains("ok") {
            t_http = Some(t0.elapsed().as_secs_f64());
            // The answer could come from another process on a port picked free, bound later.
            agent.ensure_running()?;
        }
        if t_http.is_some() && t_entries.is_none() {
            let m = procs::http_get(&http, "/metrics").await;
            if procs::metric_value(&m, "hintfed_snapshot_entries_sum")
                .is_some_and(|v| v >= keys as f64)
            {
                t_entries = Some(t0.elapsed().as_secs_f64());
            }
        }
        if t_complete.is_none()
            && std::fs::read_to_string(&agent.log)
                .unwrap_or_default()
                .contains("snapshot complete")
        {
            t_complete = Some(t0.elapsed().as_secs_f64());
            rss_at_complete = procs::usage(agent.pid(), tck).map(|u| u.peak_rss_kib);
        }
        if last_stats.elapsed() >= Duration::from_millis(100) {
            last_stats = Instant::now();
            applied = stats_conn.setvar_total().await?;
            if applied >= keys as u64 {
                t_applied = Some(t0.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let agent_end = procs::usage(agent.pid(), tck).unwrap_or_default();

    // The agent restarts beside an Asterisk that now holds every key: its full sync lists them
    // all (DeviceStateList) and the snapshot comes again; ideally nothing is written.
    agent.stop(Duration::from_secs(5));
    // Counted once the first agent is gone and its last writes were read (it may still have
    // written after the count that saw every key written: a write answered late, a repair).
    let before_restart = setvars_settled(
        &mut stats_conn,
        Duration::from_millis(300),
        Instant::now() + Duration::from_secs_f64(a.apply_timeout),
    )
    .await?;
    spans.push(RoundSpans {
        events_off: first_ceilings.0,
        agent_session: first_ceilings.1,
        agent: agent_from..u128::from(unix_ns()),
    });
    eprintln!("restarting the agent ...");
    let t1 = Instant::now();
    let mut agent = spawn_agent("agent-restart", &cfg)?;
    let mut restart_ready = None;
    let deadline = t1 + Duration::from_secs_f64(a.apply_timeout);
    while Instant::now() < deadline && restart_ready.is_none() {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        if log.contains("snapshot complete") && log.contains("full sync listed") {
            restart_ready = Some(t1.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.ensure_running()?;
    let last = setvars_settled(&mut stats_conn, Duration::from_secs(1), deadline).await?;
    let restart_writes = last.saturating_sub(before_restart);
    let restart_end = procs::usage(agent.pid(), tck).unwrap_or_default();
    agent.stop(Duration::from_secs(2));

    // The further apply rounds: ceilings, then a new agent on a fresh Asterisk.
    for i in 1..rounds {
        eprintln!("apply round {} of {rounds} ...", i + 1);
        let events_off = ceilings.run(Session::EventsOff).await?;
        let agent_session = ceilings.run(Session::AgentFilters).await?;
        let (cfg, _) = agent_cfg(i)?;
        let mut conn = Conn::login(&addrs[i], "admin", "adminsecret").await?;
        let from = u128::from(unix_ns());
        let mut agent = spawn_agent(&format!("agent-{}", names[i]), &cfg)?;
        let deadline = Instant::now() + Duration::from_secs_f64(a.apply_timeout);
        while conn.setvar_total().await? < keys as u64 && Instant::now() < deadline {
            agent.ensure_running()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        agent.stop(Duration::from_secs(2));
        spans.push(RoundSpans {
            events_off,
            agent_session,
            agent: from..u128::from(unix_ns()),
        });
    }
    // The simulator writes its trace out every 50 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut asked: Vec<(&str, std::ops::Range<u128>)> = vec![("ceiling", events_on)];
    for (r, name) in spans.iter().zip(&names) {
        asked.push(("ceiling", r.events_off.clone()));
        asked.push(("ceiling", r.agent_session.clone()));
        asked.push((name, r.agent.clone()));
    }
    let runs = crate::analyze::set_runs(&trace, &asked)?;
    let rate = |run: &crate::analyze::SetRun| {
        run.per_sec()
            .with_context(|| format!("the trace ({}) lacks a ceiling's Setvars", trace.display()))
    };
    let on = rate(&runs[0])?;
    // Per round, as asked: events off, the agent's session, the agent (one that wrote
    // nothing has no rate: 0).
    let round_rates = runs[1..]
        .chunks(3)
        .map(|r| Ok([rate(&r[0])?, rate(&r[1])?, r[2].per_sec().unwrap_or(0.0)]))
        .collect::<anyhow::Result<Vec<[f64; 3]>>>()?;
    let median_of = |k: usize| median(round_rates.iter().map(|r| r[k]).collect());
    let (setvar, filtered, apply_rate) = (median_of(0), median_of(1), median_of(2));
    let report = json!({
        "mode": "snapshot",
        "keys": keys, "origins": origins,
        "machine_before": machine_before,
        "hub": {"fill_secs": fill_secs, "peak_rss_mib": hub_usage.peak_rss_kib as f64 / 1024.0,
                "rss_mib": hub_usage.rss_kib as f64 / 1024.0},
        "snapshot": {"entries": snap.entries, "distinct_keys": snap.distinct_keys,
                     "chunks": snap.chunks, "bytes": snap.bytes,
                     "in_process_fetch_secs": snap2.secs},
        "ceilings": {"decode_verify_secs": decode,
                     "zmq_pubsub_msgs_per_sec": z.msgs_per_sec, "zmq_msg_bytes": chunk_size,
                     "zmq_secs_for_same_messages": zmq_secs,
                     "zmq_received_of_sent": format!("{}/{}", z.received, z.sent),
                     "setvar_target": if a.sim_coalesce { "simulator, coalesced writes" } else { "simulator" },
                     "setvar_timing": "simulator trace, first to last Setvar of each run; median of the apply rounds",
                     "setvar_per_sec": setvar,
                     "setvar_agent_filters_per_sec": filtered,
                     "setvar_events_on_per_sec": on,
                     "setvar_secs_for_all_keys": keys as f64 / setvar},
        "agent": {
            "healthz_secs": t_http,
            "entries_received_secs": t_entries,
            "snapshot_complete_secs": t_complete,
            "all_applied_secs": t_applied,
            "applied_at_end": applied,
            "apply_rate_per_sec": round_rates[0][2],
            "cpu_secs": agent_end.cpu_secs,
            "peak_rss_mib_at_snapshot": rss_at_complete.map(|k| k as f64 / 1024.0),
            "peak_rss_mib": agent_end.peak_rss_kib as f64 / 1024.0,
        },
        "restart": {
            "ready_secs": restart_ready,
            "writes": restart_writes,
            "peak_rss_mib": restart_end.peak_rss_kib as f64 / 1024.0,
        },
        "apply_rounds": round_rates.iter().map(|[off, session, agent]| json!({
            "setvar_events_off_per_sec": off,
            "setvar_agent_filters_per_sec": session,
            "agent_apply_per_sec": agent,
            "agent_to_events_off": agent / off,
        })).collect::<Vec<_>>(),
        "apply_median_per_sec": apply_rate,
        "ratios": {
            "snapshot_complete_to_in_process_fetch": t_complete.map(|t| t / snap2.secs.max(1e-9)),
            "snapshot_complete_to_zmq_same_messages": t_complete.map(|t| t / zmq_secs.max(1e-9)),
            "apply_rate_to_setvar_ceiling": apply_rate / setvar,
            "apply_rate_to_setvar_agent_filters_ceiling": apply_rate / filtered,
            "apply_rate_to_setvar_events_on_ceiling": apply_rate / on,
        },
        "target": {"snapshot_within_1s": t_complete.is_some_and(|t| t <= 1.0)},
        "machine_after": procs::machine(),
        "logs": dir.display().to_string(),
    });
    let opt = |v: Option<f64>| v.map_or("not reached".to_owned(), |t| format!("{t:.3} s"));
    println!(
        "hub: {} keys from {} origins in {:.1} s; snapshot {} entries in {} chunks, {:.1} MiB; hub peak RSS {:.1} MiB",
        keys,
        origins,
        fill_secs,
        snap.entries,
        snap.chunks,
        snap.bytes as f64 / 1048576.0,
        hub_usage.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "ceilings: in-process snapshot fetch {:.3} s; decode+verify {:.3} s; raw ZeroMQ PUB/SUB for {} msgs of {} B {:.3} s ({:.0} msg/s); pipelined Setvar (simulator's clock, median of {} rounds) {:.0}/s ({:.2} s for every key), {:.0}/s over a session like the agent's, {:.0}/s with events on{}",
        snap2.secs,
        decode,
        snap.chunks,
        chunk_size,
        zmq_secs,
        z.msgs_per_sec,
        rounds,
        setvar,
        keys as f64 / setvar,
        filtered,
        on,
        if a.sim_coalesce {
            " (simulator with coalesced writes)"
        } else {
            ""
        }
    );
    println!(
        "new agent (from process start): /healthz {}, {} entries received {}, snapshot complete {}, all {} written to its Asterisk {} ({} written at the end)",
        opt(t_http),
        keys,
        opt(t_entries),
        opt(t_complete),
        keys,
        opt(t_applied),
        applied
    );
    for (i, [off, session, agent]) in round_rates.iter().enumerate() {
        println!(
            "apply round {}: agent {agent:.0} Setvar/s; ceilings: events off {off:.0}/s, agent's session {session:.0}/s",
            i + 1
        );
    }
    println!(
        "apply (medians of {rounds} rounds, simulator's clock, first to last Setvar): agent {apply_rate:.0}/s, {:.2} of the events-off ceiling, {:.2} of a session like its own",
        apply_rate / setvar,
        apply_rate / filtered
    );
    println!(
        "new agent: peak RSS {} MiB after the snapshot, {:.1} MiB at the end; CPU {:.2} s",
        rss_at_complete.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        agent_end.peak_rss_kib as f64 / 1024.0,
        agent_end.cpu_secs
    );
    println!(
        "agent restarted beside its Asterisk (every key held there): full sync and snapshot {}, \
         {} writes, peak RSS {:.1} MiB",
        opt(restart_ready),
        restart_writes,
        restart_end.peak_rss_kib as f64 / 1024.0
    );
    drop(sim);
    drop(probe);
    fleet.stop().await?;
    hub.daemon.stop(Duration::from_secs(2));
    drop(tmp);
    Ok(report)
}

/// The Setvar ceilings, run one after the other on the simulator's spare server.
struct Ceilings {
    spare: String,
    keys: u64,
    /// Runs so far: each run's values are one state on from the previous run's, so that every
    /// run changes every key.
    runs: usize,
}

impl Ceilings {
    /// Writes every key once over a `session`; the span (unix ns) it took, to find its
    /// Setvars in the simulator's trace.
    async fn run(&mut self, session: Session) -> anyhow::Result<std::ops::Range<u128>> {
        let from = u128::from(unix_ns());
        crate::ceiling::setvar(
            &self.spare,
            "admin",
            "adminsecret",
            self.keys,
            512,
            self.keys,
            session,
            self.runs,
        )
        .await?;
        self.runs += 1;
        Ok(from..u128::from(unix_ns()))
    }
}

/// When one apply round's ceilings and agent ran (unix ns).
struct RoundSpans {
    events_off: std::ops::Range<u128>,
    agent_session: std::ops::Range<u128>,
    agent: std::ops::Range<u128>,
}

/// The median of `v` (the mean of the middle two when even); 0 when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The simulator's Setvar count once it stood still for `quiet` (or at `deadline`).
async fn setvars_settled(
    conn: &mut Conn,
    quiet: Duration,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let mut last = conn.setvar_total().await?;
    let mut still = Instant::now();
    while still.elapsed() < quiet && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = conn.setvar_total().await?;
        if now != last {
            (last, still) = (now, Instant::now());
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0]), 3.0);
        assert_eq!(median(vec![5.0, 1.0, 4.0]), 4.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 10.0]), 3.0);
    }
}
