//! The HTTP endpoints through a real server on 127.0.0.1:0, spoken to with raw HTTP/1.1 over
//! `TcpStream` (no client library needed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hintfed_daemon::http::{
    BoxFuture, DeviceView, HttpContext, HttpLimits, HttpServer, InfoView, OriginView, PresenceView,
    Readiness, StateView, StatusEvent, StatusEvents, StatusSlot, StatusSource,
};
use hintfed_daemon::metrics::{Kind, Metrics};
use hintfed_testkit::wait::eventually_within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(5);

struct Fake;

fn device() -> DeviceView {
    DeviceView {
        key: "PJSIP/100".into(),
        aggregate: "INUSE".into(),
        changed_ms: 1_700_000_000_000,
        origins: BTreeMap::from([
            ("pbx-a".into(), "INUSE".into()),
            ("pbx-b".into(), "NOT_INUSE".into()),
        ]),
    }
}

impl Fake {
    fn view() -> StateView {
        StateView {
            devices: vec![device()],
            presence: vec![PresenceView {
                key: "CustomPresence:alice".into(),
                status: "dnd".into(),
                subtype: "lunch".into(),
                message: "back at 2, promise".into(),
                origin: "pbx-c".into(),
                changed_ms: 1_700_000_000_001,
            }],
        }
    }
}

impl StatusSource for Fake {
    fn state(&self) -> BoxFuture<'_, StateView> {
        Box::pin(std::future::ready(Fake::view()))
    }
    fn origins(&self) -> Vec<OriginView> {
        vec![OriginView {
            name: "pbx-a".into(),
            up: true,
            epoch: 7,
            last_seq: 42,
            last_seen_ms_ago: Some(120),
            lag_ms: Some(3),
            detail: None,
        }]
    }
}

struct Server {
    addr: SocketAddr,
    ctx: HttpContext,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(limits: HttpLimits) -> Server {
    let status = StatusSlot::default();
    status.set(Arc::new(Fake));
    let metrics = Metrics::new("hintfed-test", "9.9.9");
    metrics.event_in("pbx-a", Kind::Device);
    let ctx = HttpContext {
        info: InfoView {
            daemon: "hintfed-test".into(),
            version: "9.9.9".into(),
            started_ms: 1,
        },
        metrics: Arc::new(metrics),
        status,
        readiness: Readiness::new(),
        events: StatusEvents::default(),
        limits,
        shutdown: CancellationToken::new(),
    };
    let server = HttpServer::bind("127.0.0.1:0".parse().expect("addr"), ctx.clone())
        .await
        .expect("bind");
    let addr = server.local_addr().expect("addr");
    let task = tokio::spawn(server.run());
    Server { addr, ctx, task }
}

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    raw_from(addr, request).await.1
}

/// Sends `request` (the server may close before taking all of it) and reads until the
/// server closes; returns this client's address (as the server sees it) and the answer.
async fn raw_from(addr: SocketAddr, request: &[u8]) -> (SocketAddr, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let me = s.local_addr().expect("local addr");
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .map_err(|_| {
        panic!(
            "no close within the deadline; got {:?}",
            String::from_utf8_lossy(&buf)
        )
    });
    (me, String::from_utf8_lossy(&buf).into_owned())
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Resp {
    let text = raw(
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let (head, body) = text.split_once("\r\n\r\n").expect("head/body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    Resp {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path).await
}

#[tokio::test]
async fn health_ready_metrics_api_and_page() {
    let s = start(HttpLimits::default()).await;

    let r = get(s.addr, "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    let r = get(s.addr, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "starting\n"));
    s.ctx
        .readiness
        .set("asterisk", Err("AMI connection refused".into()));
    s.ctx
        .readiness
        .set("transport", Err("no hub reachable".into()));
    let r = get(s.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        "asterisk: AMI connection refused\ntransport: no hub reachable\n"
    );
    s.ctx.readiness.set("asterisk", Ok(()));
    s.ctx.readiness.set("transport", Ok(()));
    let r = get(s.addr, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

    let r = get(s.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{}",
        r.headers
    );
    assert!(
        r.body
            .contains("hintfed_events_in_total{source=\"pbx-a\",kind=\"device\"} 1")
    );
    assert!(
        r.body
            .contains("hintfed_build_info{daemon=\"hintfed-test\",version=\"9.9.9\"} 1")
    );

    let r = get(s.addr, "/api/state").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("content-type: application/json"));
    let state: StateView = serde_json::from_str(&r.body).expect("state json");
    assert_eq!(state, Fake::view());
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(v["devices"][0]["origins"]["pbx-b"], "NOT_INUSE");
    assert_eq!(v["presence"][0]["message"], "back at 2, promise");

    let r = get(s.addr, "/api/origins").await;
    let origins: Vec<OriginView> = serde_json::from_str(&r.body).expect("origins json");
    assert_eq!(origins, Fake.origins());

    let r = get(s.addr, "/api/info").await;
    let info: InfoView = serde_json::from_str(&r.body).expect("info json");
    assert_eq!(info.daemon, "hintfed-test");

    let r = get(s.addr, "/").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("content-type: text/html; charset=utf-8"));
    assert!(
        r.headers
            .contains("content-security-policy: default-src 'self'")
    );
    assert!(r.body.contains("<script src=\"status.js\""));
    assert!(r.body.contains("name=\"viewport\""));
    let r = get(s.addr, "/status.js").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("new EventSource(\"events\")"));
    let r = get(s.addr, "/status.css").await;
    assert!(r.headers.contains("content-type: text/css"));

    assert_eq!(get(s.addr, "/nope").await.status, 404);
    assert_eq!(request(s.addr, "POST", "/healthz").await.status, 405);
    assert_eq!(request(s.addr, "DELETE", "/api/state").await.status, 405);

    s.ctx.shutdown.cancel();
    tokio::time::timeout(DEADLINE, s.task)
        .await
        .expect("server stops")
        .expect("join")
        .expect("serve ok");
}

/// Read from an SSE response until `needle` appears.
async fn read_until(stream: &mut TcpStream, acc: &mut String, needle: &str) {
    tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        while !acc.contains(needle) {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream closed before {needle:?}; got {acc}");
            acc.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} within deadline; got {acc}"));
}

#[tokio::test]
async fn events_stream_pushes_changes_caps_clients_and_ends_on_shutdown() {
    let s = start(HttpLimits {
        max_connections: 16,
        max_event_clients: 1,
        ..HttpLimits::default()
    })
    .await;
    let mut es = TcpStream::connect(s.addr).await.expect("connect");
    es.write_all(b"GET /events HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("write");
    let mut acc = String::new();
    read_until(&mut es, &mut acc, "\r\n\r\n").await;
    assert!(acc.starts_with("HTTP/1.1 200"), "{acc}");
    assert!(
        acc.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{acc}"
    );
    let events = s.ctx.events.clone();
    eventually_within("one event client", DEADLINE, || {
        events.receiver_count() == 1
    })
    .await;

    s.ctx.events.publish(StatusEvent::Device(device()));
    read_until(
        &mut es,
        &mut acc,
        "\"origins\":{\"pbx-a\":\"INUSE\",\"pbx-b\":\"NOT_INUSE\"}}",
    )
    .await;
    assert!(
        acc.contains("data: {\"type\":\"device\",\"key\":\"PJSIP/100\""),
        "{acc}"
    );

    // A second stream is refused while the only slot is taken; plain requests still work.
    let r = get(s.addr, "/events").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "too many event clients\n")
    );
    assert_eq!(get(s.addr, "/healthz").await.status, 200);

    // The first client leaves: its slot is freed.
    drop(es);
    eventually_within("no event client", DEADLINE, || events.receiver_count() == 0).await;
    let mut es2 = TcpStream::connect(s.addr).await.expect("connect");
    es2.write_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut acc2 = String::new();
    read_until(&mut es2, &mut acc2, "\r\n\r\n").await;
    assert!(acc2.starts_with("HTTP/1.1 200"), "{acc2}");
    eventually_within("one event client", DEADLINE, || {
        events.receiver_count() == 1
    })
    .await;
    s.ctx.events.publish(StatusEvent::Resync);
    read_until(&mut es2, &mut acc2, "data: {\"type\":\"resync\"}").await;

    // Shutdown ends the open stream and the server.
    s.ctx.shutdown.cancel();
    tokio::time::timeout(DEADLINE, s.task)
        .await
        .expect("server stops despite an open event stream")
        .expect("join")
        .expect("serve ok");
}

/// Log lines captured from the server (the tests run on a current-thread runtime, so every
/// task the server spawns logs through the thread's default subscriber).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(sub)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    /// The warning lines naming `peer`.
    fn warnings_about(&self, peer: SocketAddr) -> Vec<String> {
        let needle = format!("peer={peer}");
        self.text()
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains(&needle))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn hostile_requests_do_not_hurt_and_are_logged_with_the_peer() {
    let logs = Captured::default();
    let _guard = logs.install();
    let s = start(HttpLimits::default()).await;
    let (peer, garbage) = raw_from(s.addr, b"\x00\xffBLAH BLAH\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage:?}"
    );
    let w = logs.warnings_about(peer);
    assert!(
        w.iter().any(|l| l.contains("malformed request")),
        "no warning naming {peer}: {}",
        logs.text()
    );

    let huge_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let (peer, r) = raw_from(s.addr, huge_header.as_bytes()).await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 431"),
        "{}",
        &r[..r.len().min(80)]
    );
    assert!(
        logs.warnings_about(peer)
            .iter()
            .any(|l| l.contains("request head too large")),
        "no oversize-head warning naming {peer}: {}",
        logs.text()
    );

    let big_body = format!(
        "POST /api/state HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n{}",
        "x".repeat(1024)
    );
    let (peer, r) = raw_from(s.addr, big_body.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{}", &r[..r.len().min(80)]);
    assert!(
        logs.warnings_about(peer)
            .iter()
            .any(|l| l.contains("request body too large")),
        "no oversize-body warning naming {peer}: {}",
        logs.text()
    );
    let traversal = get(s.addr, "/../../etc/passwd").await;
    assert_eq!(traversal.status, 404);
    // Still serving.
    let r = get(s.addr, "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    s.ctx.shutdown.cancel();
    let _ = tokio::time::timeout(DEADLINE, s.task).await.expect("stops");
}

#[tokio::test]
async fn a_slowloris_is_cut_at_the_head_timeout_while_others_are_served() {
    let logs = Captured::default();
    let _guard = logs.install();
    let s = start(HttpLimits {
        head_timeout: Duration::from_millis(500),
        ..HttpLimits::default()
    })
    .await;
    let slow = TcpStream::connect(s.addr).await.expect("connect");
    let peer = slow.local_addr().expect("addr");
    let (mut rd, mut wr) = slow.into_split();
    // One header byte every 100 ms, forever: the head never completes.
    let trickle = tokio::spawn(async move {
        let head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ";
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut sent = 0usize;
        loop {
            tick.tick().await;
            let b = head.get(sent).copied().unwrap_or(b'a');
            if wr.write_all(&[b]).await.is_err() {
                return sent;
            }
            sent += 1;
        }
    });
    // Others are served meanwhile.
    assert_eq!(get(s.addr, "/healthz").await.status, 200);
    // The server closes the trickling connection (each byte arrived within the first-byte
    // and any per-read timeout; only a whole-head deadline can cut it).
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // hyper may answer 408 first
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "slowloris still connected after {DEADLINE:?}"
    );
    let sent = tokio::time::timeout(DEADLINE, trickle)
        .await
        .expect("writer notices the close")
        .expect("join");
    assert!(sent > 3, "the client did trickle bytes ({sent})");
    assert!(
        logs.warnings_about(peer)
            .iter()
            .any(|l| l.contains("slow client")),
        "no slow-client warning naming {peer}: {}",
        logs.text()
    );
    assert_eq!(get(s.addr, "/healthz").await.status, 200);

    // An idle keep-alive connection (a browser's) is closed at the head timeout too, but
    // quietly: it is not a bad client.
    let mut idle = TcpStream::connect(s.addr).await.expect("connect");
    let idle_peer = idle.local_addr().expect("addr");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut acc = String::new();
    read_until(&mut idle, &mut acc, "ok\n").await;
    let closed = tokio::time::timeout(DEADLINE, idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "idle keep-alive connection not closed: {closed:?}"
    );
    assert!(logs.warnings_about(idle_peer).is_empty(), "{}", logs.text());
    s.ctx.shutdown.cancel();
    let _ = tokio::time::timeout(DEADLINE, s.task).await.expect("stops");
}

#[tokio::test]
async fn a_flood_of_idle_connections_does_not_lock_out_a_real_request() {
    let logs = Captured::default();
    let _guard = logs.install();
    // Timeouts far beyond the test deadline: only shedding at the cap can make room.
    let s = start(HttpLimits {
        max_connections: 8,
        first_byte_timeout: Duration::from_secs(600),
        head_timeout: Duration::from_secs(600),
        ..HttpLimits::default()
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(TcpStream::connect(s.addr).await.expect("connect"));
    }
    let r = get(s.addr, "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains(" WARN ")
            && l.contains("too many connections")
            && l.contains("peer=127.0.0.1:")),
        "no connection-cap warning with a peer: {text}"
    );
    // The oldest idle connections were closed to make room.
    let mut buf = [0u8; 1];
    let first = tokio::time::timeout(DEADLINE, flood[0].read(&mut buf))
        .await
        .expect("oldest idle connection closed");
    assert!(matches!(first, Ok(0) | Err(_)), "{first:?}");
    // The log stays bounded however many were shed.
    let cap_lines = text
        .lines()
        .filter(|l| l.contains("too many connections"))
        .count();
    assert!(
        cap_lines <= 11,
        "{cap_lines} cap warnings: not rate-limited"
    );
    s.ctx.shutdown.cancel();
    let _ = tokio::time::timeout(DEADLINE, s.task).await.expect("stops");
}

#[tokio::test]
async fn connection_cap_queues_rather_than_refuses() {
    let s = start(HttpLimits {
        max_connections: 1,
        max_event_clients: 4,
        ..HttpLimits::default()
    })
    .await;
    // Hold the only connection slot with an idle keep-alive connection.
    let mut hold = TcpStream::connect(s.addr).await.expect("connect");
    hold.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut acc = String::new();
    read_until(&mut hold, &mut acc, "ok\n").await;
    // A second client waits in the accept queue while the slot is taken (a bounded wait
    // that can only end early if the cap is broken), and is served once the first leaves.
    let mut second = tokio::spawn(get(s.addr, "/healthz"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut second)
            .await
            .is_err(),
        "second connection served while the only slot was taken"
    );
    drop(hold);
    let r = tokio::time::timeout(DEADLINE, second)
        .await
        .expect("served after the slot frees")
        .expect("join");
    assert_eq!(r.status, 200);
    s.ctx.shutdown.cancel();
    let _ = tokio::time::timeout(DEADLINE, s.task).await.expect("stops");
}

#[tokio::test]
async fn silent_connections_lose_their_slot_after_the_first_byte_timeout() {
    let s = start(HttpLimits {
        max_connections: 2,
        first_byte_timeout: Duration::from_millis(300),
        ..HttpLimits::default()
    })
    .await;
    // Peers that connect and never speak take every slot ...
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(s.addr).await.expect("connect"));
    }
    // ... and are closed by the server once the first-byte timeout passes, so a real request
    // is served (within DEADLINE; without the timeout it would wait forever).
    let r = get(s.addr, "/healthz").await;
    assert_eq!(r.status, 200);
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(DEADLINE, silent[0].read(&mut buf))
        .await
        .expect("silent connection closed within the deadline");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    s.ctx.shutdown.cancel();
}
