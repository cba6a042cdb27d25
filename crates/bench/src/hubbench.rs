//! `hintfed-bench hub`: the hub alone, with the load in other processes. One real
//! `hintfed-server`; a `hub-pub` process (core `Node`, every update signed before the clock
//! starts, written over one raw DEALER connection) publishes `--updates` device updates; a
//! `hub-sub` process holds `--subscribers` raw SUB connections on the hub's PUB and counts the
//! updates each one receives (see [`crate::hubproc`]).
//!
//! The ceiling is measured in the same run with the same receivers: the `zeromq` crate's PUB
//! (the library the agents and the transport use) in its own process sends messages of the
//! same size (topic + signed envelope of an update) to the same `hub-sub` process with the
//! same fan-out. Both rates are counted the same way: messages the slowest subscriber got,
//! divided by the time from the publisher's first write to the last message at any
//! subscriber. The ratio is hub updates/s ÷ ceiling messages/s per subscriber; the hub
//! verifies (MAC, replay guard), merges into its table and fans out every update, the ceiling
//! only copies bytes. CPU of the hub, the publisher and the subscribers are reported so that
//! who held the cores is visible.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::hubproc::{SubResult, unix_ns};
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
    /// Messages for the ZeroMQ fan-out ceiling (0: skip; default: as many as `--updates`).
    #[arg(long)]
    pub zmq_count: Option<u64>,
    /// The hub binary to measure (default: `hintfed-server` beside this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Run `perf record -g --call-graph dwarf` on the hub during the load, into this file.
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Write the JSON report here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The shared key of the hub bench.
pub const KEY: &str = "bench-shared-key";

/// A helper process of this binary with its stdout read line by line.
struct Helper {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Helper {
    fn spawn(args: &[String], stdin: bool) -> anyhow::Result<Self> {
        Self::spawn_program(&std::env::current_exe()?, args, stdin)
    }

    fn spawn_program(
        program: &std::path::Path,
        args: &[String],
        stdin: bool,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn helper")?;
        let out = child.stdout.take().context("helper stdout")?;
        Ok(Helper {
            child,
            lines: BufReader::new(out).lines(),
        })
    }

    /// The next line starting with `prefix` (other lines are skipped), within `timeout`.
    async fn line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        tokio::time::timeout(timeout, async {
            loop {
                let l = self
                    .lines
                    .next_line()
                    .await?
                    .context("helper ended early")?;
                if l.starts_with(prefix) {
                    return Ok::<_, anyhow::Error>(l);
                }
            }
        })
        .await
        .with_context(|| format!("no `{prefix}` line from a helper within {timeout:?}"))?
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// Figures of one fan-out measurement.
#[derive(Debug, Clone, Default)]
struct Fanned {
    /// Messages per second the slowest subscriber received.
    per_sub: f64,
    /// Messages per second summed over the subscribers.
    total: f64,
    min: u64,
    max: u64,
    secs: f64,
}

fn fanned(start_ns: u64, results: &[SubResult]) -> Fanned {
    let last = results.iter().map(|r| r.last_ns).max().unwrap_or(0);
    let secs = (last.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let min = results.iter().map(|r| r.count).min().unwrap_or(0);
    let max = results.iter().map(|r| r.count).max().unwrap_or(0);
    let sum: u64 = results.iter().map(|r| r.count).sum();
    Fanned {
        per_sub: min as f64 / secs,
        total: sum as f64 / secs,
        min,
        max,
        secs,
    }
}

fn sub_args(endpoint: &str, subs: usize, prefix: &str, expect: u64) -> Vec<String> {
    vec![
        "hub-sub".into(),
        "--endpoint".into(),
        endpoint.into(),
        "--subs".into(),
        subs.to_string(),
        "--prefix".into(),
        prefix.into(),
        "--expect".into(),
        expect.to_string(),
    ]
}

async fn results(sub: &mut Helper, timeout: Duration) -> anyhow::Result<Vec<SubResult>> {
    let l = sub.line("[", timeout).await?;
    Ok(serde_json::from_str(&l)?)
}

/// libzmq's PUB (through pyzmq): binds `argv[1]`, sends `w` until a line on stdin, then
/// `argv[2]` messages of `argv[3]` bytes starting with `d`, then `e` frames. No high-water mark,
/// so nothing is dropped.
const PYZMQ_PUB: &str = r#"
import select, sys, time, zmq
ep, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = zmq.Context().socket(zmq.PUB)
s.setsockopt(zmq.SNDHWM, 0)
s.bind(ep)
while True:
    s.send(b"w")
    if select.select([sys.stdin], [], [], 0.01)[0]:
        sys.stdin.readline()
        break
msg = b"d" + b"x" * (size - 1)
for _ in range(count):
    s.send(msg)
for _ in range(100):
    s.send(b"e")
    time.sleep(0.01)
"#;

/// Which PUB a ceiling uses.
#[derive(Clone, Copy)]
enum CeilingPub {
    /// The `zeromq` crate (`zmq-pub` helper of this binary).
    Crate,
    /// libzmq through pyzmq (`python3`).
    Libzmq,
}

/// A raw ZeroMQ fan-out ceiling: a PUB in its own process to the `hub-sub` helper with
/// `subs` connections, `count` messages of `size` bytes.
async fn zmq_fanout(
    which: CeilingPub,
    subs: usize,
    count: u64,
    size: usize,
    tck: f64,
) -> anyhow::Result<(Fanned, serde_json::Value)> {
    let port = procs::free_port()?;
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let mut publ = match which {
        CeilingPub::Crate => Helper::spawn(
            &[
                "zmq-pub".into(),
                "--endpoint".into(),
                endpoint.clone(),
                "--count".into(),
                count.to_string(),
                "--size".into(),
                size.to_string(),
            ],
            true,
        )?,
        CeilingPub::Libzmq => Helper::spawn_program(
            std::path::Path::new("python3"),
            &[
                "-c".into(),
                PYZMQ_PUB.into(),
                endpoint.clone(),
                count.to_string(),
                size.to_string(),
            ],
            true,
        )?,
    };
    // Wait for the bind.
    let addr = format!("127.0.0.1:{port}");
    let bound = procs::wait_until(Duration::from_secs(10), || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(addr).await.is_ok() }
    })
    .await;
    anyhow::ensure!(bound, "zmq-pub helper did not bind");
    let mut sub = Helper::spawn(&sub_args(&endpoint, subs, "d", count), false)?;
    sub.line("ready", Duration::from_secs(20)).await?;
    let (p0, s0) = (
        procs::usage(publ.pid(), tck).unwrap_or_default(),
        procs::usage(sub.pid(), tck).unwrap_or_default(),
    );
    let start = unix_ns();
    let mut stdin = publ.child.stdin.take().context("zmq-pub stdin")?;
    stdin.write_all(b"go\n").await?;
    stdin.flush().await?;
    let res = results(&mut sub, Duration::from_secs(300)).await?;
    let (p1, s1) = (
        procs::usage(publ.pid(), tck).unwrap_or_default(),
        procs::usage(sub.pid(), tck).unwrap_or_default(),
    );
    let f = fanned(start, &res);
    let cpu = json!({
        "publisher_cpu_percent": 100.0 * (p1.cpu_secs - p0.cpu_secs) / f.secs,
        "subscribers_cpu_percent": 100.0 * (s1.cpu_secs - s0.cpu_secs) / f.secs,
    });
    Ok((f, cpu))
}

/// Runs the hub benchmark; returns the JSON report (also printed as a table).
pub async fn run(a: HubArgs) -> anyhow::Result<serde_json::Value> {
    let machine_before = procs::machine();
    let dir = tempfile::tempdir()?;
    let tck = procs::clk_tck();
    let (_, size) = crate::hubproc::presigned(1, 1, KEY)?;
    let zmq_count = a.zmq_count.unwrap_or(a.updates);
    let ceiling = if zmq_count > 0 {
        eprintln!(
            "ceiling: zeromq crate PUB -> {} subscribers, {zmq_count} x {size} B ...",
            a.subscribers
        );
        Some(zmq_fanout(CeilingPub::Crate, a.subscribers, zmq_count, size, tck).await?)
    } else {
        None
    };
    let libzmq_ok = zmq_count > 0
        && std::process::Command::new("python3")
            .args(["-c", "import zmq"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let libzmq = if libzmq_ok {
        eprintln!(
            "ceiling: libzmq PUB (pyzmq) -> {} subscribers, {zmq_count} x {size} B ...",
            a.subscribers
        );
        match zmq_fanout(CeilingPub::Libzmq, a.subscribers, zmq_count, size, tck).await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("libzmq ceiling failed: {e:#}");
                None
            }
        }
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
    let server_bin = match &a.server_bin {
        Some(p) => p.clone(),
        None => procs::sibling("hintfed-server")?,
    };
    let mut hub = Daemon::spawn(
        "hub",
        &server_bin,
        &["--config".into(), cfg.display().to_string()],
        &[],
        dir.path(),
    )?;
    let up = procs::wait_until(Duration::from_secs(15), || async {
        procs::http_get(&http, "/healthz").await.contains("ok")
    })
    .await;
    anyhow::ensure!(up, "hub did not come up (see {})", hub.log.display());
    // Its /healthz port could be another process's (picked free, bound later): still running?
    hub.ensure_running()?;

    eprintln!(
        "hub: {} updates -> {} subscribers ...",
        a.updates, a.subscribers
    );
    let pub_ep = format!("tcp://127.0.0.1:{}", port + 1);
    let mut sub = Helper::spawn(
        &sub_args(&pub_ep, a.subscribers, "state.", a.updates),
        false,
    )?;
    // Ready once every connection got a message: the hub's transport heartbeat (1 s).
    sub.line("ready", Duration::from_secs(20)).await?;
    let mut publ = Helper::spawn(
        &[
            "hub-pub".into(),
            "--endpoint".into(),
            format!("tcp://127.0.0.1:{port}"),
            "--updates".into(),
            a.updates.to_string(),
            "--keys".into(),
            a.keys.to_string(),
        ],
        true,
    )?;
    let start_line = publ.line("start ", Duration::from_secs(120)).await?;
    let u0 = procs::usage(hub.pid(), tck).unwrap_or_default();
    let p0 = procs::usage(publ.pid(), tck).unwrap_or_default();
    let s0 = procs::usage(sub.pid(), tck).unwrap_or_default();
    let mut perf = match &a.perf {
        Some(out) => Some(
            std::process::Command::new("perf")
                .args(["record", "-F", "499", "-g", "--call-graph", "dwarf,16384"])
                .arg("-o")
                .arg(out)
                .args(["-p", &hub.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn perf")?,
        ),
        None => None,
    };
    let start: u64 = start_line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("start line")?;
    let res = results(&mut sub, Duration::from_secs(600)).await?;
    let u1 = procs::usage(hub.pid(), tck).unwrap_or_default();
    let p1 = procs::usage(publ.pid(), tck).unwrap_or_default();
    let s1 = procs::usage(sub.pid(), tck).unwrap_or_default();
    if let Some(p) = perf.as_mut() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    let metrics = procs::http_get(&http, "/metrics").await;
    drop(publ);
    let f = fanned(start, &res);
    let hub_cpu = 100.0 * (u1.cpu_secs - u0.cpu_secs) / f.secs;
    let hub_us_per_update = 1e6 * (u1.cpu_secs - u0.cpu_secs) / (f.min.max(1) as f64);
    let ratio = ceiling.as_ref().map(|(c, _)| f.per_sub / c.per_sub);
    let ratio_libzmq = libzmq.as_ref().map(|(c, _)| f.per_sub / c.per_sub);
    let ceiling_json = |(c, cpu): &(Fanned, serde_json::Value)| {
        json!({
            "messages": zmq_count,
            "received_per_subscriber_min": c.min,
            "received_per_subscriber_max": c.max,
            "secs": c.secs,
            "msgs_per_sec_per_subscriber": c.per_sub,
            "msgs_per_sec_total": c.total,
            "cpu": cpu,
        })
    };
    let report = json!({
        "machine_before": machine_before,
        "machine_after": procs::machine(),
        "subscribers": a.subscribers,
        "message_bytes": size,
        "hub": {
            "server_bin": server_bin.display().to_string(),
            "updates_sent": a.updates,
            "received_per_subscriber": res.iter().map(|r| r.count).collect::<Vec<_>>(),
            "received_per_subscriber_min": f.min,
            "secs": f.secs,
            "updates_per_sec_through_hub": f.per_sub,
            "messages_per_sec_fanned_out": f.total,
            "hub_cpu_percent": hub_cpu,
            "hub_cpu_us_per_update": hub_us_per_update,
            "hub_peak_rss_mib": u1.peak_rss_kib as f64 / 1024.0,
            "publisher_cpu_percent": 100.0 * (p1.cpu_secs - p0.cpu_secs) / f.secs,
            "subscribers_cpu_percent": 100.0 * (s1.cpu_secs - s0.cpu_secs) / f.secs,
            "rejects_total": metrics
                .lines()
                .filter(|l| l.starts_with("hintfed_rejects_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
        },
        "ceiling_zmq_fanout": ceiling.as_ref().map(ceiling_json),
        "ceiling_libzmq_fanout": libzmq.as_ref().map(ceiling_json),
        "ratio_updates_per_sec_to_zmq_fanout_ceiling": ratio,
        "ratio_updates_per_sec_to_libzmq_fanout_ceiling": ratio_libzmq,
    });
    let fmt = |v: Option<f64>, p: usize| v.map_or("n/a".to_owned(), |v| format!("{v:.p$}"));
    println!(
        "| hub bench ({} subscribers, {} B messages) | per subscriber msg/s | total msg/s | slowest got | secs |",
        a.subscribers, size
    );
    println!("|---|---|---|---|---|");
    println!(
        "| hintfed-server: {} updates | {:.0} | {:.0} | {}/{} | {:.2} |",
        a.updates, f.per_sub, f.total, f.min, a.updates, f.secs
    );
    if let Some((c, _)) = &ceiling {
        println!(
            "| ceiling: zeromq PUB/SUB, {} msgs | {:.0} | {:.0} | {}/{} | {:.2} |",
            zmq_count, c.per_sub, c.total, c.min, zmq_count, c.secs
        );
    }
    if let Some((c, _)) = &libzmq {
        println!(
            "| ceiling: libzmq PUB/SUB (pyzmq), {} msgs | {:.0} | {:.0} | {}/{} | {:.2} |",
            zmq_count, c.per_sub, c.total, c.min, zmq_count, c.secs
        );
    }
    println!("ratio hub/libzmq ceiling: {}", fmt(ratio_libzmq, 3));
    println!(
        "ratio hub/zeromq-crate ceiling: {} ; hub CPU {:.0}% ({:.2} us/update), publisher {:.0}%, subscribers {:.0}%, hub peak RSS {:.1} MiB",
        fmt(ratio, 3),
        hub_cpu,
        hub_us_per_update,
        100.0 * (p1.cpu_secs - p0.cpu_secs) / f.secs,
        100.0 * (s1.cpu_secs - s0.cpu_secs) / f.secs,
        u1.peak_rss_kib as f64 / 1024.0
    );
    hub.stop(Duration::from_secs(2));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(report)
}
