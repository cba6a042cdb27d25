//! Hostile input at the binary level: every listening port of a running federation (hub
//! ROUTER and PUB, the hub's legacy zmq-ami-broker PULL and PUB, the hub's and an agent's
//! HTTP, the simulator's AMI) gets garbage bytes, oversize frames and lines, a bounded
//! connection flood, peers that connect and never speak, and peers that never read. After the
//! abuse the daemons are still running, a phone change still propagates, resident memory grew
//! by less than [`RSS_GROWTH_CAP_KIB`], and the hub (ZeroMQ and HTTP), the agent (HTTP) and
//! the simulator logged warnings naming the peer address.
//!
//! The socket-level unit cases (malformed, unsigned, forged, duplicate, oversize messages
//! counted per reason) live in `crates/server/tests/hub.rs` and
//! `crates/transport/tests/hub_recovery.rs`; these tests cover what only the real processes
//! show: TCP-level garbage, floods, silent and non-reading peers, memory, and logs.
//!
//! Needs the binaries: `cargo build -p hintfed-sim -p hintfed-server -p hintfed-agent`.

use std::time::{Duration, Instant};

use hintfed_e2e::fed::{Federation, Via, http_get};
use hintfed_e2e::{free_port, wait_until};
use hintfed_testkit::{process, zmtp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALL: [&str; 2] = ["pbx-a", "pbx-b"];
const WITHIN: Duration = Duration::from_secs(10);
/// Connections opened by a flood (held open together).
const FLOOD: usize = 300;
/// Most a daemon's resident set may grow through the abuse.
const RSS_GROWTH_CAP_KIB: u64 = 64 * 1024;

/// Resident set of `pid` in KiB (0 when unreadable).
fn rss_kib(pid: u32) -> u64 {
    process::rss_kib(pid).unwrap_or(0)
}

/// A log line without its ANSI colour escapes.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A federation of two Asterisks, one hub (with the legacy ports) and two agents. Returns it
/// with the hub's legacy (PULL, PUB) ports.
async fn federation() -> (Federation, u16, u16) {
    let mut f = Federation::start(&ALL, Via::Ami).await;
    f.add_hub().await;
    // Add the legacy compatibility sockets to the hub's config and restart it.
    let (pull, publ) = (free_port(), free_port());
    let cfg = std::fs::read_to_string(&f.hubs[0].config).expect("hub config");
    let cfg = cfg.replace(
        "\n[http]",
        &format!(
            "legacy_pull = tcp://127.0.0.1:{pull}\nlegacy_pub = tcp://127.0.0.1:{publ}\n\n[http]"
        ),
    );
    std::fs::write(&f.hubs[0].config, cfg).expect("write hub config");
    f.kill_hub(0);
    f.start_hub(0).await;
    for n in ALL {
        f.add_agent(n).await;
    }
    (f, pull, publ)
}

/// Propagation pbx-a -> pbx-b of a fresh state.
async fn propagates(f: &Federation, state: &str) {
    f.ami("pbx-a").set_device("PJSIP/100", state).await;
    assert!(
        f.wait_custom("PJSIP/100", state, &["pbx-b"], WITHIN).await,
        "Custom:PJSIP/100 {state} did not reach pbx-b after the abuse"
    );
}

/// Writes `bytes` to a fresh connection to `port` (errors ignored: the peer may close).
async fn send_raw(port: u16, bytes: &[u8]) {
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
        let _ = tokio::time::timeout(Duration::from_secs(3), s.write_all(bytes)).await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
    }
}

/// Garbage, oversize input, a flood and silent peers against `port`; returns the silent
/// connections (still open) so the caller decides how long they live.
async fn abuse(port: u16, oversize: &[u8]) -> Vec<TcpStream> {
    // Garbage: random-looking bytes, then a binary blob with NULs and a huge line.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    send_raw(port, &garbage).await;
    send_raw(port, b"\x00\x00\x00\xff\xff\xff\xff\r\n\r\n\x7f\x01").await;
    send_raw(port, oversize).await;
    // Flood: FLOOD connections held open together, never speaking.
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        match tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    held
}

/// A ZMTP 3.0 greeting followed by a frame header announcing `len` bytes (and 1 KiB of them).
fn zmtp_oversize(len: u64) -> Vec<u8> {
    let mut g = zmtp::greeting();
    g.extend(zmtp::long_frame_header(len));
    g.extend([b'x'; 1024]);
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_ports_survive_garbage_oversize_floods_and_silent_or_non_reading_peers() {
    let (f, pull, publ) = federation().await;
    let hub_pid = f.hubs[0].proc.as_ref().expect("hub").pid();
    let port = f.hubs[0].port;
    propagates(&f, "INUSE").await;
    let rss0 = rss_kib(hub_pid);

    let started = Instant::now();
    let mut held = Vec::new();
    // ROUTER (P), PUB (P+1), legacy PULL and PUB.
    for p in [port, port + 1, pull, publ] {
        held.extend(abuse(p, &zmtp_oversize(1 << 40)).await);
        // Free the flood before the next port (they are bounded per port, not in total).
        held.clear();
    }
    // Silent peers on every port, and subscribers that never read on both PUB sockets,
    // kept open while the federation works.
    let mut silent = Vec::new();
    for p in [port, port + 1, pull, publ] {
        for _ in 0..20 {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", p)).await {
                silent.push(s);
            }
        }
    }
    let mut deaf = Vec::new();
    for p in [port + 1, publ] {
        for _ in 0..5 {
            deaf.extend(zmtp::deaf_subscriber(("127.0.0.1", p)).await.ok());
        }
    }
    // Traffic for the deaf subscribers to choke on.
    for i in 0..200 {
        let st = ["BUSY", "RINGING", "ONHOLD", "NOT_INUSE"][i % 4];
        f.ami("pbx-a").set_device("PJSIP/100", st).await;
    }
    propagates(&f, "INUSE").await;
    eprintln!("abuse took {:?}", started.elapsed());

    // Still up and healthy, memory bounded.
    assert!(
        http_get(&f.hubs[0].http, "/healthz").await.contains("ok"),
        "hub /healthz after the abuse"
    );
    let rss1 = rss_kib(hub_pid);
    assert!(
        rss1.saturating_sub(rss0) <= RSS_GROWTH_CAP_KIB,
        "hub RSS grew from {rss0} KiB to {rss1} KiB"
    );
    // A warning naming the peer that announced an oversize message.
    let lines: Vec<String> = f.hubs[0]
        .proc
        .as_ref()
        .expect("hub")
        .lines()
        .iter()
        .map(|l| plain(l))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("oversize") && l.contains("peer=127.0.0.1:")),
        "no oversize warning with the peer address in the hub log"
    );
    assert!(
        !lines.iter().any(|l| l.contains("panicked")),
        "the hub panicked"
    );
    drop((silent, deaf));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ports_survive_garbage_oversize_floods_and_silent_peers() {
    let (f, _, _) = federation().await;
    let hub_http = f.hubs[0].http.clone();
    let agent_http = f.agents["pbx-a"].http.clone();
    let hub_pid = f.hubs[0].proc.as_ref().expect("hub").pid();
    let agent_pid = f.agents["pbx-a"].proc.as_ref().expect("agent").pid();
    let (h0, a0) = (rss_kib(hub_pid), rss_kib(agent_pid));
    let mut oversize = b"GET /".to_vec();
    oversize.extend(vec![b'a'; 1 << 20]);
    oversize.extend(b" HTTP/1.1\r\nHost: x\r\n");
    for i in 0..2000 {
        oversize.extend(format!("X-Header-{i}: {}\r\n", "v".repeat(100)).as_bytes());
    }
    oversize.extend(b"\r\n");
    for addr in [&hub_http, &agent_http] {
        let port: u16 = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port");
        let held = abuse(port, &oversize).await;
        // While the flood of silent connections is held open, the daemon still answers.
        let ok = wait_until(WITHIN, || async {
            http_get(addr, "/healthz").await.contains("ok")
        })
        .await;
        assert!(
            ok,
            "{addr} /healthz unanswered while {} silent connections are open",
            held.len()
        );
        drop(held);
    }
    // Each daemon logged the malformed and oversize requests as warnings naming the peer.
    for (who, proc) in [
        ("hub", f.hubs[0].proc.as_ref().expect("hub")),
        ("agent", f.agents["pbx-a"].proc.as_ref().expect("agent")),
    ] {
        for problem in ["malformed request", "request head too large"] {
            let logged = wait_until(WITHIN, || async {
                proc.lines().iter().map(|l| plain(l)).any(|l| {
                    l.contains("WARN") && l.contains(problem) && l.contains("peer=127.0.0.1:")
                })
            })
            .await;
            assert!(
                logged,
                "no {problem:?} warning with the peer address in the {who} log"
            );
        }
    }
    propagates(&f, "RINGING").await;
    let (h1, a1) = (rss_kib(hub_pid), rss_kib(agent_pid));
    assert!(
        h1.saturating_sub(h0) <= RSS_GROWTH_CAP_KIB,
        "hub RSS {h0} -> {h1} KiB"
    );
    assert!(
        a1.saturating_sub(a0) <= RSS_GROWTH_CAP_KIB,
        "agent RSS {a0} -> {a1} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_ami_survives_garbage_oversize_floods_and_silent_or_non_reading_peers() {
    let (f, _, _) = federation().await;
    let addr = f.addrs["pbx-a"].clone();
    let port: u16 = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port");
    let sim_pid = f.sim.pid();
    let r0 = rss_kib(sim_pid);
    // An oversize line: 1 MiB without a line end.
    let mut oversize = b"Action: Login\r\nUsername: ".to_vec();
    oversize.extend(vec![b'u'; 1 << 20]);
    let held = abuse(port, &oversize).await;
    // Logged-in clients that ask for every event and never read.
    let mut deaf = Vec::new();
    for _ in 0..5 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s
                .write_all(b"Action: Login\r\nUsername: admin\r\nSecret: adminsecret\r\nEvents: on\r\n\r\n")
                .await;
            deaf.push(s);
        }
    }
    for i in 0..300 {
        let st = ["BUSY", "RINGING", "ONHOLD", "NOT_INUSE"][i % 4];
        f.ami("pbx-a").set_device("PJSIP/100", st).await;
    }
    propagates(&f, "INUSE").await;
    drop(held);
    let r1 = rss_kib(sim_pid);
    assert!(
        r1.saturating_sub(r0) <= RSS_GROWTH_CAP_KIB,
        "sim RSS {r0} -> {r1} KiB"
    );
    assert!(
        !f.sim.lines().iter().any(|l| l.contains("panicked")),
        "the simulator panicked"
    );
    let logged =
        wait_until(WITHIN, || async {
            f.sim.lines().iter().map(|l| plain(l)).any(|l| {
                l.contains("WARN") && l.contains("bad input") && l.contains("peer=127.0.0.1:")
            })
        })
        .await;
    assert!(
        logged,
        "no bad-input warning with the peer address in the simulator log"
    );
    drop(deaf);
}
