//! The zmq-ami-broker compatibility bridge against a libzmq (pyzmq) legacy agent.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{FakeAgent, TestHub, device_of};
use hintfed_core::{DeviceState, KeyRing, LocalEvent};
use hintfed_testkit::process::pyzmq_available;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts the pyzmq legacy agent `name` waiting for PJSIP/100 (optionally in a state) and
/// waits until its sockets exist.
async fn spawn_legacy(
    hub: &TestHub,
    name: &str,
    want_state: &[&str],
) -> (tokio::process::Child, Lines) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/legacy_agent.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([
            hub.handle.legacy_pull_endpoint().expect("pull"),
            hub.handle.legacy_pub_endpoint().expect("pub"),
            name,
            "PJSIP/100",
        ])
        .args(want_state)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("python start")
        .expect("read");
    assert_eq!(ready.as_deref(), Some("ready"));
    (child, lines)
}

#[tokio::test]
async fn legacy_agents_and_the_federation_see_each_other() {
    if !pyzmq_available() {
        return;
    }
    let mut cfg = TestHub::config("hub-legacy");
    cfg.federation.origin_timeout = Duration::from_secs(3);
    cfg.server.heartbeat_interval = Duration::from_millis(200);
    cfg.federation.shared_keys = vec![hintfed_daemon::config::Secret::new("k")];
    cfg.server.legacy = Some(hintfed_server::config::LegacyConfig {
        pull: "tcp://127.0.0.1:0".into(),
        publish: "tcp://127.0.0.1:0".into(),
        timeout: None,
    });
    let hub = TestHub::start(cfg).await;
    let keys = KeyRing::from_secrets(["k"]);
    let eps = vec![hub.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys.clone()).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys).await;
    a.full_sync(vec![]);
    b.full_sync(vec![]);

    let (mut child, mut lines) = spawn_legacy(&hub, "Moscow", &[]).await;

    // Federation → legacy: pbx-a's phone changes until the legacy agent saw one.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut state = DeviceState::Inuse;
    let status = loop {
        assert!(Instant::now() < deadline, "legacy agent saw nothing");
        a.event(LocalEvent::device("PJSIP/100", state));
        state = if state == DeviceState::Inuse {
            DeviceState::Busy
        } else {
            DeviceState::Inuse
        };
        tokio::select! {
            s = child.wait() => break s.expect("wait"),
            () = async {
                a.pump(Duration::from_millis(30)).await;
                b.pump(Duration::from_millis(30)).await;
            } => {}
        }
    };
    let out = lines.next_line().await.expect("read").unwrap_or_default();
    assert!(status.success(), "legacy agent failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["target"], "[*]");
    assert_eq!(v["body"]["msg_type"], "AsteriskEvent");
    assert_eq!(v["body"]["origin"], "pbx-a");
    assert_eq!(v["body"]["x_data"]["Event"], "DeviceStateChange");
    assert!(["INUSE", "BUSY"].contains(&v["body"]["x_data"]["State"].as_str().unwrap_or("")));
    // The legacy agent's own messages were republished to legacy agents, as the original did.
    assert!(v["own_seen"].as_u64().unwrap_or(0) >= 1, "{v}");

    // Legacy → federation: SIP/200 from the synthetic origin "Moscow"; never the Custom:
    // device or the UNKNOWN state.
    b.wait("Moscow's device", |b| {
        device_of(b, "SIP/200", "Moscow") == Some(DeviceState::Inuse)
    })
    .await;
    assert!(b.node.table().device("Custom:SIP/201").is_none());
    assert!(b.node.table().device("SIP/202").is_none());
    let stats = hub.handle.stats();
    assert!(stats.rejected("legacy_malformed") >= 3, "{stats:?}");
    hub.wait_stats("oversize legacy message counted", |s| {
        s.rejected("legacy_too_large") >= 1
    })
    .await;
    assert!(stats.legacy_skipped >= 2, "{stats:?}");
    assert_eq!(
        stats.legacy_federated, 1,
        "repeats are not re-federated: {stats:?}"
    );
    assert!(stats.legacy_out >= 1, "{stats:?}");
    // The hub heartbeats for the legacy agent: Moscow stays up.
    b.wait("Moscow heartbeats", |b| {
        b.received
            .iter()
            .any(|(_, _, topic, e)| e.origin == "Moscow" && topic == "control" && e.seq > 1)
    })
    .await;
    assert!(
        hub.handle
            .origins_view()
            .iter()
            .any(|o| o.name == "Moscow" && o.up)
    );
    assert!(
        hub.hooks
            .metrics
            .encode()
            .contains("hintfed_rejects_total{reason=\"legacy_malformed\"}")
    );

    // pbx-a falls silent: legacy agents are told its devices are down_state.
    let (mut child, mut lines) = spawn_legacy(&hub, "Kiev", &["UNAVAILABLE"]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        assert!(
            Instant::now() < deadline,
            "no down_state reached the legacy agent"
        );
        tokio::select! {
            s = child.wait() => break s.expect("wait"),
            () = b.pump(Duration::from_millis(50)) => {}
        }
    };
    let out = lines.next_line().await.expect("read").unwrap_or_default();
    assert!(status.success(), "legacy agent failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["body"]["origin"], "pbx-a");
    assert_eq!(v["body"]["x_data"]["State"], "UNAVAILABLE");
    drop(a);
}

async fn push_once(hub: &TestHub, name: &str, device: &str, state: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/legacy_push.py");
    let status = Command::new("python3")
        .arg(script)
        .args([
            hub.handle.legacy_pull_endpoint().expect("pull"),
            name,
            device,
            state,
        ])
        .kill_on_drop(true)
        .status()
        .await
        .expect("python3");
    assert!(status.success());
}

#[tokio::test]
async fn a_silent_legacy_agent_goes_down_after_legacy_timeout_and_comes_back() {
    if !pyzmq_available() {
        return;
    }
    let mut cfg = TestHub::config("hub-legacy-2");
    cfg.federation.origin_timeout = Duration::from_millis(2000);
    cfg.server.heartbeat_interval = Duration::from_millis(100);
    cfg.server.legacy = Some(hintfed_server::config::LegacyConfig {
        pull: "tcp://127.0.0.1:0".into(),
        publish: "tcp://127.0.0.1:0".into(),
        timeout: Some(Duration::from_millis(300)),
    });
    let hub = TestHub::start(cfg).await;
    let mut b = FakeAgent::connect("pbx-b", &[hub.endpoint()], KeyRing::default()).await;
    b.full_sync(vec![]);
    push_once(&hub, "Paris", "SIP/300", "INUSE").await;
    b.wait("Paris's device", |b| {
        device_of(b, "SIP/300", "Paris") == Some(DeviceState::Inuse)
    })
    .await;
    // Paris says nothing more: no more heartbeats from the hub for it, then origin down.
    b.wait("Paris down", |b| b.node.origins().is_down("Paris"))
        .await;
    assert!(
        hub.handle
            .origins_view()
            .iter()
            .any(|o| o.name == "Paris" && !o.up)
    );
    assert_eq!(hub.handle.state_view().devices[0].aggregate, "UNAVAILABLE");
    // It speaks again: up again, with its new state.
    push_once(&hub, "Paris", "SIP/300", "BUSY").await;
    b.wait("Paris up again", |b| {
        !b.node.origins().is_down("Paris")
            && device_of(b, "SIP/300", "Paris") == Some(DeviceState::Busy)
    })
    .await;
}
