//! Interoperability with libzmq peers (pyzmq), which is what res_zmq_manager and
//! zmq-ami-broker use. Each test starts `tests/py/peer.py` and kills it when done.
//! Tests are skipped (with a printed reason) only when python3 or pyzmq is missing.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::net::{free_port, free_port_pair};
use hintfed_testkit::process::pyzmq_available;
use hintfed_transport::{
    Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Limits, PubBind, Publication,
    PullBind, ReqClient, ReqClientConfig, RequestError, SubClient, SubClientConfig,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::{Instant, timeout};

/// The product requirement: every link recovers within 2 s of the peer coming back.
const RECOVERY: Duration = Duration::from_secs(2);
/// Generous bound for start-up of a Python process (not a product requirement).
const SETUP: Duration = Duration::from_secs(15);

/// A running `peer.py`; killed and reaped on drop.
struct PyPeer {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl PyPeer {
    async fn start(args: &[String]) -> PyPeer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/peer.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn python3");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut peer = PyPeer { child, stdout };
        let line = peer.line(SETUP).await;
        assert_eq!(
            line.as_deref(),
            Some("ready"),
            "peer.py {args:?} did not start"
        );
        peer
    }

    async fn line(&mut self, within: Duration) -> Option<String> {
        timeout(within, self.stdout.next_line()).await.ok()?.ok()?
    }

    /// Kills the process and waits until it is gone (its ports are then free).
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

fn json_frames(frames: &[Bytes]) -> serde_json::Value {
    assert_eq!(frames.len(), 1, "one JSON frame");
    serde_json::from_slice(&frames[0]).expect("valid JSON")
}

#[tokio::test]
async fn req_client_talks_to_libzmq_rep_and_recovers_from_a_silent_peer() {
    if !pyzmq_available() {
        return;
    }
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    // Answers one request, then stays bound but silent (like a module whose Asterisk died).
    let first = PyPeer::start(&[
        "rep".into(),
        port.to_string(),
        "--answer".into(),
        "1".into(),
    ])
    .await;
    let mut config = ReqClientConfig::new(endpoint);
    config.request_timeout = Duration::from_millis(300);
    let client = ReqClient::connect(config).expect("client");

    let reply = client
        .request(vec![b(r#"{"Action": "Ping"}"#)])
        .await
        .expect("first request answered");
    let reply = json_frames(&reply);
    assert_eq!(reply[0]["Response"], "Success");
    assert_eq!(reply[0]["Ping"], "Pong");

    let err = client
        .request(vec![b(r#"{"Action": "Ping"}"#)])
        .await
        .expect_err("silent peer");
    assert_eq!(err, RequestError::Timeout(Duration::from_millis(300)));
    assert_eq!(client.stats().request_timeouts, 1);

    // A new process takes the port; requests succeed again within 2 s.
    first.stop().await;
    let _second = PyPeer::start(&["rep".into(), port.to_string()]).await;
    let back = Instant::now();
    let reply = loop {
        assert!(back.elapsed() < RECOVERY, "no reply within {RECOVERY:?}");
        if let Ok(reply) = client.request(vec![b("not json")]).await {
            break reply;
        }
    };
    // The module's answer to a non-JSON request: two objects, no ActionID.
    let reply = json_frames(&reply);
    assert_eq!(reply[0]["Response"], "Error");
    assert_eq!(reply[1]["Message"], "Internal error.");
}

#[tokio::test]
async fn req_client_reports_not_connected_when_nobody_listens() {
    let port = free_port();
    let mut config = ReqClientConfig::new(format!("tcp://127.0.0.1:{port}"));
    config.request_timeout = Duration::from_millis(200);
    let client = ReqClient::connect(config).expect("client");
    let err = client.request(vec![b("{}")]).await.expect_err("no peer");
    assert_eq!(err, RequestError::NotConnected(Duration::from_millis(200)));
}

#[tokio::test]
async fn sub_client_follows_a_libzmq_publisher_across_restarts() {
    if !pyzmq_available() {
        return;
    }
    let port = free_port();
    let first = PyPeer::start(&["pub".into(), port.to_string()]).await;
    let (client, mut events) =
        SubClient::connect(SubClientConfig::new(format!("tcp://127.0.0.1:{port}"))).expect("sub");

    let check = |frames: Vec<Bytes>| {
        let v = json_frames(&frames);
        assert_eq!(v["Event"], "DeviceStateChange");
        assert_eq!(v["Device"], "PJSIP/100");
    };
    let ev = timeout(SETUP, events.recv())
        .await
        .expect("first event")
        .expect("open");
    check(ev);

    first.stop().await;
    let mut status = client.status();
    timeout(
        SETUP,
        status.wait_for(|s| *s != hintfed_transport::LinkStatus::Connected),
    )
    .await
    .expect("notices the publisher is gone")
    .expect("status open");
    // Drain what arrived before the publisher died.
    while events.try_recv().is_ok() {}

    let _second = PyPeer::start(&["pub".into(), port.to_string()]).await;
    let back = Instant::now();
    let ev = timeout(RECOVERY, events.recv())
        .await
        .expect("events flow again within 2 s")
        .expect("open");
    check(ev);
    assert!(back.elapsed() < RECOVERY);
    assert!(client.stats().reconnects >= 1);
    // Only "{" frames got through the subscription.
    for _ in 0..5 {
        let ev = timeout(SETUP, events.recv())
            .await
            .expect("event")
            .expect("open");
        check(ev);
    }
}

#[tokio::test]
async fn hub_bind_serves_libzmq_dealer_and_sub() {
    if !pyzmq_available() {
        return;
    }
    let (hub, mut rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let port: u16 = hub
        .router_endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let mut agent = PyPeer::start(&["dealer_sub".into(), port.to_string()]).await;
    let deadline = Instant::now() + SETUP;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let status = loop {
        assert!(Instant::now() < deadline, "python agent did not finish");
        tokio::select! {
            msg = rx.recv() => {
                let msg = msg.expect("hub open");
                assert_eq!(msg.frames, vec![b("dev.in"), b("hello")]);
                let mut reply = vec![b("ack")];
                reply.extend(msg.frames.clone());
                hub.reply(msg.identity, reply).await.expect("reply");
                hub.publish(vec![b("dev.out"), b("fanned")]).await.expect("publish");
                hub.publish(vec![b("other.topic"), b("filtered")]).await.expect("publish");
            }
            status = agent.child.wait() => break status.expect("wait"),
            _ = tick.tick() => {
                // Keep publishing: the SUB may join after the first publication. A message
                // of an origin: a SUB that announced none (libzmq's) gets it.
                let fanned = Publication::of("pbx-a", vec![b("dev.out"), b("fanned")]);
                hub.publish_batch(&[fanned]).await.expect("publish");
            }
        }
    };
    let out = agent.line(SETUP).await.expect("agent output");
    assert!(status.success(), "agent failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["reply"], serde_json::json!(["ack", "dev.in", "hello"]));
    assert_eq!(v["fanout"], serde_json::json!(["dev.out", "fanned"]));
}

#[tokio::test]
async fn hub_link_talks_to_libzmq_router_and_pub_and_recovers() {
    if !pyzmq_available() {
        return;
    }
    let port = free_port_pair();
    let hub = PyPeer::start(&["router_pub".into(), port.to_string()]).await;
    // The link announces an origin (READY property X-Hintfed-Origin): libzmq takes the
    // property and publishes everything to it, the link's own messages echoed included.
    let mut config = HubLinkConfig::new(format!("tcp://127.0.0.1:{port}"));
    config.origin = Some("pbx-a".into());
    let (link, mut rx) = HubLink::connect(config).expect("link");
    assert!(link.wait_connected(SETUP).await);

    async fn exchange(
        link: &HubLink,
        rx: &mut tokio::sync::mpsc::Receiver<hintfed_transport::Incoming>,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        let (mut reply, mut fan) = (false, false);
        while !(reply && fan) {
            assert!(Instant::now() < deadline, "reply {reply} fan-out {fan}");
            let _ = link.try_send(vec![b("dev.x"), b("hi")]);
            if let Ok(Some(m)) = timeout(Duration::from_millis(50), rx.recv()).await {
                match m.channel {
                    Channel::Reply => {
                        assert_eq!(m.frames, vec![b("echo"), b("dev.x"), b("hi")]);
                        reply = true;
                    }
                    Channel::Fanout => {
                        assert_eq!(m.frames, vec![b("dev.fan"), b("hi")]);
                        fan = true;
                    }
                }
            }
        }
    }
    exchange(&link, &mut rx, SETUP).await;

    // libzmq hub restarted on the same ports: the link recovers within 2 s.
    hub.stop().await;
    let mut status = link.status();
    timeout(
        SETUP,
        status.wait_for(|s| *s != hintfed_transport::LinkStatus::Connected),
    )
    .await
    .expect("notices the hub is gone")
    .expect("status open");
    let _hub = PyPeer::start(&["router_pub".into(), port.to_string()]).await;
    exchange(&link, &mut rx, RECOVERY).await;
}

#[tokio::test]
async fn hub_link_writes_what_was_queued_at_once_to_a_libzmq_router_in_order() {
    if !pyzmq_available() {
        return;
    }
    let port = free_port_pair();
    let _hub = PyPeer::start(&["router_pub".into(), port.to_string()]).await;
    let (link, mut rx) =
        HubLink::connect(HubLinkConfig::new(format!("tcp://127.0.0.1:{port}"))).expect("link");
    assert!(link.wait_connected(SETUP).await);
    // Queued while the link's task cannot run (one-thread runtime, no await in between),
    // so it writes them in a few batches: the ROUTER takes each message whole, in order, and
    // its echoes come back in order.
    const N: u32 = 600;
    for i in 0..N {
        let body = Bytes::from(vec![(i % 251) as u8; (i as usize * 37) % 700]);
        link.try_send(vec![b("dev.x"), Bytes::from(i.to_string()), body])
            .expect("queued");
    }
    let mut next = 0;
    while next < N {
        let m = timeout(SETUP, rx.recv())
            .await
            .expect("echo in time")
            .expect("open");
        if m.channel != Channel::Reply {
            continue;
        }
        assert_eq!(m.frames.len(), 4, "reply {next}");
        assert_eq!(
            m.frames[..3],
            [b("echo"), b("dev.x"), Bytes::from(next.to_string())]
        );
        assert_eq!(
            m.frames[3].len(),
            (next as usize * 37) % 700,
            "reply {next}"
        );
        next += 1;
    }
    let stats = link.stats();
    assert_eq!(stats.messages_out, u64::from(N), "{stats:?}");
    assert_eq!(
        (stats.dropped_outbound, stats.reconnects),
        (0, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn legacy_sockets_talk_to_a_libzmq_zmq_ami_broker_agent() {
    if !pyzmq_available() {
        return;
    }
    let (pull, mut rx) = PullBind::bind("tcp://127.0.0.1:0", Limits::default(), 64)
        .await
        .expect("bind pull");
    let publisher = PubBind::bind("tcp://127.0.0.1:0", 64)
        .await
        .expect("bind pub");
    let port_of = |ep: &str| ep.rsplit(':').next().expect("port").to_owned();
    let mut agent = PyPeer::start(&[
        "legacy_agent".into(),
        port_of(pull.endpoint()),
        port_of(publisher.endpoint()),
        "Moscow".into(),
    ])
    .await;
    let deadline = Instant::now() + SETUP;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut received = None;
    let status = loop {
        assert!(Instant::now() < deadline, "legacy agent did not finish");
        tokio::select! {
            msg = rx.recv() => {
                let frames = msg.expect("pull open");
                assert_eq!(frames.len(), 2);
                assert_eq!(frames[0], b("[*]"));
                let v: serde_json::Value = serde_json::from_slice(&frames[1]).expect("json");
                assert_eq!(v["x_data"]["Device"], "SIP/100");
                received = Some(frames);
            }
            status = agent.child.wait() => break status.expect("wait"),
            _ = tick.tick() => {
                // Someone else's message first (must be filtered), then one for this agent.
                publisher.publish(vec![b("[Paris]"), b("{}")]).await.expect("publish");
                if let Some(frames) = &received {
                    let mut to_agent = frames.clone();
                    to_agent[0] = b("[Moscow]");
                    publisher.publish(to_agent).await.expect("publish");
                }
            }
        }
    };
    let out = agent.line(SETUP).await.expect("agent output");
    assert!(status.success(), "agent failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["target"], "[Moscow]");
    assert_eq!(v["body"]["msg_type"], "AsteriskEvent");
    assert_eq!(v["body"]["x_data"]["State"], "INUSE");
    pull.shutdown().await;
    publisher.shutdown().await;
}

#[tokio::test]
async fn hub_link_subscribes_to_a_libzmq_xpub_and_answers_its_zmtp_heartbeats() {
    if !pyzmq_available() {
        return;
    }
    let port = free_port_pair();
    // The XPUB pings every 100 ms and drops a subscriber silent for 300 ms: only the link's
    // PONGs keep its fan-out connection (the link sends nothing else on it).
    let _hub = PyPeer::start(&[
        "router_pub".into(),
        port.to_string(),
        "--xpub".into(),
        "--zmtp-heartbeat".into(),
        "100".into(),
    ])
    .await;
    let mut config = HubLinkConfig::new(format!("tcp://127.0.0.1:{port}"));
    config.origin = Some("pbx-a".into());
    let (link, mut rx) = HubLink::connect(config).expect("link");
    assert!(link.wait_connected(SETUP).await);
    // Fan-out keeps flowing over 1.5 s (five heartbeat timeouts) on the same connection.
    let start = Instant::now();
    let mut fanned = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let _ = link.try_send(vec![b("dev.x"), b("hi")]);
        if let Ok(Some(m)) = timeout(Duration::from_millis(50), rx.recv()).await
            && m.channel == Channel::Fanout
        {
            assert_eq!(m.frames, vec![b("dev.fan"), b("hi")]);
            fanned += 1;
        }
    }
    assert!(fanned > 0, "fan-out from the XPUB");
    let stats = link.stats();
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert!(link.is_connected());
}
