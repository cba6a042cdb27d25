//! `AmiClient` against small fake AMI servers on 127.0.0.1:0, built on the codec.

use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hintfed_ami::actions;
use hintfed_ami::{
    AmiClient, AmiCodec, Auth, ClientConfig, ClientError, ClientEvent, ConnectionState,
    DeviceStateChange, Frame, ListComplete, Message,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::timeout;
use tokio_util::codec::Framed;

const BANNER: &str = "Asterisk Call Manager/13.0.0";
const USER: &str = "admin";
const SECRET: &str = "adminsecret";
/// Upper bound for anything a test waits for; reaching it is a failure, not a timing check.
const PATIENCE: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/asterisk")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

struct FakeServer {
    listener: TcpListener,
    addr: String,
}

impl FakeServer {
    async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        Self { listener, addr }
    }

    /// Accepts the next connection and sends the banner.
    async fn accept(&self) -> Peer {
        let (stream, _) = timeout(PATIENCE, self.listener.accept())
            .await
            .expect("client connects in time")
            .expect("accept");
        let mut peer = Peer {
            io: Framed::new(stream, AmiCodec::server()),
        };
        peer.io
            .get_mut()
            .write_all(format!("{BANNER}\r\n").as_bytes())
            .await
            .expect("banner");
        peer
    }

    /// Accepts a connection and performs the MD5 login the client starts.
    async fn accept_logged_in(&self) -> Peer {
        let mut peer = self.accept().await;
        peer.login_md5("8675309").await;
        peer
    }

    /// A client of the default configuration, logged in and connected, and its peer.
    async fn connected_client(&self) -> (AmiClient, Peer) {
        let client = AmiClient::start(self.config());
        let peer = self.accept_logged_in().await;
        assert!(client.wait_connected(PATIENCE).await);
        (client, peer)
    }

    fn config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.addr.clone(), USER, SECRET);
        cfg.action_timeout = Duration::from_secs(30);
        cfg.ping_interval = Duration::from_secs(3600);
        cfg.backoff_initial = Duration::from_millis(10);
        cfg.backoff_max = Duration::from_millis(50);
        // Most fake peers do not answer Logoff: do not make every test wait for it.
        cfg.logoff_timeout = Duration::from_millis(100);
        cfg
    }
}

struct Peer {
    io: Framed<TcpStream, AmiCodec>,
}

impl Peer {
    async fn recv(&mut self) -> Message {
        match timeout(PATIENCE, self.io.next())
            .await
            .expect("client sends in time")
        {
            Some(Ok(Frame::Message(m))) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Next action, skipping the client's keepalive pings (answered).
    async fn recv_action(&mut self) -> Message {
        loop {
            let m = self.recv().await;
            if m.action_name() == Some("Ping") {
                self.send(reply(&m, "Success").with("Ping", "Pong")).await;
                continue;
            }
            return m;
        }
    }

    async fn send(&mut self, m: Message) {
        self.io.send(&m).await.expect("server send");
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("raw send");
    }

    async fn login_md5(&mut self, challenge: &str) {
        let ch = self.recv().await;
        assert_eq!(ch.action_name(), Some("Challenge"));
        assert_eq!(ch.get("AuthType"), Some("MD5"));
        self.send(reply(&ch, "Success").with("Challenge", challenge))
            .await;
        let login = self.recv().await;
        assert_eq!(login.action_name(), Some("Login"));
        assert_eq!(login.get("Username"), Some(USER));
        assert_eq!(
            login.get("Key"),
            Some(actions::md5_key(challenge, SECRET).as_str())
        );
        assert!(login.get("Secret").is_none(), "MD5 login sends no secret");
        self.send(reply(&login, "Success").with("Message", "Authentication accepted"))
            .await;
        self.send(fully_booted()).await;
    }
}

fn reply(to: &Message, kind: &str) -> Message {
    Message::new()
        .with("Response", kind)
        .with("ActionID", to.action_id().expect("action id"))
}

fn fully_booted() -> Message {
    Message::new()
        .with("Event", "FullyBooted")
        .with("Privilege", "system,all")
        .with("Uptime", "21")
        .with("LastReload", "21")
        .with("Status", "Fully Booted")
}

fn device_event(device: &str, state: &str) -> Message {
    Message::new()
        .with("Event", "DeviceStateChange")
        .with("Privilege", "call,all")
        .with("Device", device)
        .with("State", state)
}

async fn next_event(sub: &mut hintfed_ami::Subscription) -> ClientEvent {
    timeout(PATIENCE, sub.recv())
        .await
        .expect("event in time")
        .expect("subscription open")
}

/// Polls the client's state until `f` holds, failing after `PATIENCE`.
async fn wait_state(client: &AmiClient, f: impl Fn(&ConnectionState) -> bool) -> ConnectionState {
    let mut watch = client.state_watch();
    let state = timeout(PATIENCE, watch.wait_for(|s| f(s)))
        .await
        .expect("state reached in time")
        .expect("watch open");
    state.clone()
}

#[tokio::test]
async fn md5_login_then_events_reach_subscribers() {
    let server = FakeServer::bind().await;
    let client = AmiClient::start(server.config());
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;

    assert_eq!(
        next_event(&mut sub).await,
        ClientEvent::Connected {
            banner: BANNER.into(),
            generation: 1
        }
    );
    let ClientEvent::Event(fb) = next_event(&mut sub).await else {
        panic!("expected FullyBooted");
    };
    assert!(fb.is_event("FullyBooted"));
    assert!(matches!(
        client.status(),
        ConnectionState::Connected { generation: 1, .. }
    ));

    peer.send(device_event("Custom:dnd300", "INUSE")).await;
    let ClientEvent::Event(ev) = next_event(&mut sub).await else {
        panic!("expected an event");
    };
    assert_eq!(
        DeviceStateChange::from_message(&ev).expect("dsc").device,
        "Custom:dnd300"
    );
    client.shutdown().await;
}

#[tokio::test]
async fn plain_login_sends_secret_and_events_mask() {
    let server = FakeServer::bind().await;
    let mut cfg = server.config();
    cfg.auth = Auth::Plain;
    cfg.events = "system,call".into();
    let client = AmiClient::start(cfg);
    let mut peer = server.accept().await;
    let login = peer.recv().await;
    assert_eq!(login.action_name(), Some("Login"));
    assert_eq!(login.get("Username"), Some(USER));
    assert_eq!(login.get("Secret"), Some(SECRET));
    assert_eq!(login.get("Events"), Some("system,call"));
    assert!(login.action_id().is_some());
    peer.send(reply(&login, "Success").with("Message", "Authentication accepted"))
        .await;
    assert!(client.wait_connected(PATIENCE).await);

    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.send(actions::ping()).await }
    });
    let got = peer.recv().await;
    assert_eq!(got.action_name(), Some("Ping"));
    peer.send(reply(&got, "Success").with("Ping", "Pong")).await;
    let answer = ping.await.expect("join").expect("ping answered");
    assert_eq!(answer.get("Ping"), Some("Pong"));
    assert_eq!(answer.action_id(), got.action_id());
    client.shutdown().await;
}

#[tokio::test]
async fn event_filters_are_added_after_login_and_a_refusal_is_not_fatal() {
    let server = FakeServer::bind().await;
    let mut cfg = server.config();
    cfg.event_filters = vec!["!Event: ExtensionStatus".into(), "!Device: Custom:".into()];
    let client = AmiClient::start(cfg);
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;
    // In order, before the connection serves anything; the first is refused (as Asterisk
    // does for a user without write = system), the second taken.
    let first = peer.recv().await;
    assert_eq!(first.action_name(), Some("Filter"));
    assert_eq!(first.get("Operation"), Some("Add"));
    assert_eq!(first.get("Filter"), Some("!Event: ExtensionStatus"));
    assert!(!client.is_connected());
    peer.send(reply(&first, "Error").with("Message", "Permission denied"))
        .await;
    let second = peer.recv().await;
    assert_eq!(second.get("Filter"), Some("!Device: Custom:"));
    peer.send(reply(&second, "Success").with("Message", "Success"))
        .await;
    assert!(client.wait_connected(PATIENCE).await);
    assert!(matches!(
        next_event(&mut sub).await,
        ClientEvent::Connected { generation: 1, .. }
    ));
    // FullyBooted came during the login: still delivered.
    let ClientEvent::Event(fb) = next_event(&mut sub).await else {
        panic!("expected FullyBooted");
    };
    assert!(fb.is_event("FullyBooted"));
    peer.send(device_event("PJSIP/100", "BUSY")).await;
    let ClientEvent::Event(ev) = next_event(&mut sub).await else {
        panic!("expected an event");
    };
    assert_eq!(ev.get("Device"), Some("PJSIP/100"));
    client.shutdown().await;

    // A connection without events asks for no filter: its first action is the caller's.
    let mut cfg = server.config();
    cfg.events = "off".into();
    cfg.event_filters = vec!["!Device: Custom:".into()];
    let client = AmiClient::start(cfg);
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);
    ping_answered(&client, &mut peer).await;
    client.shutdown().await;
}

#[tokio::test]
async fn bad_login_is_reported_and_retried() {
    let server = FakeServer::bind().await;
    let mut cfg = server.config();
    cfg.auth = Auth::Plain;
    cfg.secret = "wrong".into();
    let client = AmiClient::start(cfg);

    // Answer with the bytes of the real refusal, ActionID rewritten.
    let capture = String::from_utf8(fixture("bad-login.recv.raw")).expect("utf8");
    let refusal = capture
        .strip_prefix(&format!("{BANNER}\r\n"))
        .expect("banner first");
    for _ in 0..2 {
        let mut peer = server.accept().await;
        let login = peer.recv().await;
        assert_eq!(login.get("Secret"), Some("wrong"));
        let id = login.action_id().expect("id");
        peer.send_raw(refusal.replace("bad1", id).as_bytes()).await;
        let state = wait_state(&client, |s| {
            matches!(s, ConnectionState::Disconnected { .. })
        })
        .await;
        let ConnectionState::Disconnected { reason } = state else {
            unreachable!()
        };
        assert!(reason.contains("Authentication failed"), "{reason}");
        assert!(matches!(
            client.send(actions::ping()).await,
            Err(ClientError::NotConnected)
        ));
    }
    // The client tried again after the first refusal (the loop accepted twice).
    client.shutdown().await;
    assert_eq!(client.status(), ConnectionState::Stopped);
}

#[tokio::test]
async fn interleaved_responses_and_events_are_correlated() {
    let server = FakeServer::bind().await;
    let client = AmiClient::start(server.config());
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);

    let mut calls = Vec::new();
    for var in ["A", "B", "C"] {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .send(actions::getvar(&format!("DEVICE_STATE(Custom:{var})")))
                .await
        }));
    }
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(peer.recv_action().await);
    }
    let ids: std::collections::HashSet<_> = received
        .iter()
        .map(|m| m.action_id().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "distinct ActionIDs");
    // Answer in reverse order, events in between, one of them an OriginateResponse that carries
    // an ActionID and a Response header: still an event.
    for (i, action) in received.iter().rev().enumerate() {
        peer.send(device_event(&format!("Custom:ev{i}"), "INUSE"))
            .await;
        let var = action.get("Variable").expect("variable");
        peer.send(
            reply(action, "Success")
                .with("Variable", var)
                .with("Value", format!("value of {var}")),
        )
        .await;
    }
    peer.send(
        Message::new()
            .with("Event", "OriginateResponse")
            .with("ActionID", received[0].action_id().expect("id"))
            .with("Response", "Success"),
    )
    .await;
    for (call, var) in calls.into_iter().zip(["A", "B", "C"]) {
        let answer = call.await.expect("join").expect("answered");
        assert_eq!(
            answer.get("Value").expect("value"),
            format!("value of DEVICE_STATE(Custom:{var})")
        );
    }
    let mut events = Vec::new();
    while events.len() < 5 {
        match next_event(&mut sub).await {
            ClientEvent::Event(m) => events.push(m),
            ClientEvent::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(events[0].is_event("FullyBooted"));
    let devices: Vec<_> = events[1..4]
        .iter()
        .map(|m| m.get("Device").expect("device"))
        .collect();
    assert_eq!(devices, ["Custom:ev0", "Custom:ev1", "Custom:ev2"]);
    assert!(events[4].is_event("OriginateResponse"));
    client.shutdown().await;
}

/// The `DeviceStateList` part of the 500-device capture, as bytes, with `dl1` replaced.
fn device_state_list_bytes(action_id: &str) -> Vec<u8> {
    let bytes = fixture("devicestatelist-500.recv.raw");
    let mut codec = AmiCodec::client();
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut out = bytes::BytesMut::new();
    use tokio_util::codec::{Decoder, Encoder};
    while let Some(frame) = codec.decode(&mut buf).expect("decode") {
        if let Frame::Message(mut m) = frame
            && m.action_id() == Some("dl1")
        {
            m.set("ActionID", action_id);
            codec.encode(&m, &mut out).expect("encode");
        }
    }
    out.to_vec()
}

/// Where the first `n` messages of `bytes` end.
fn after_messages(bytes: &[u8], n: usize) -> usize {
    bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"\r\n\r\n")
        .nth(n - 1)
        .map(|(i, _)| i + 4)
        .expect("boundary")
}

#[tokio::test]
async fn device_state_list_of_502_items_is_collected() {
    let server = FakeServer::bind().await;
    let client = AmiClient::start(server.config());
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);

    let list = tokio::spawn({
        let client = client.clone();
        async move { client.list(actions::device_state_list()).await }
    });
    let action = peer.recv_action().await;
    assert_eq!(action.action_name(), Some("DeviceStateList"));
    let bytes = device_state_list_bytes(action.action_id().expect("id"));
    // Split the replay in the middle of a message, with an unrelated event between the halves
    // of the list (on a message boundary).
    let boundary = after_messages(&bytes, 251);
    peer.send_raw(&bytes[..boundary - 7]).await;
    peer.send_raw(&bytes[boundary - 7..boundary]).await;
    peer.send(device_event("PJSIP/100", "RINGING")).await;
    peer.send_raw(&bytes[boundary..]).await;

    let result = list.await.expect("join").expect("list answered");
    assert!(result.is_success());
    assert_eq!(result.response.get("EventList"), Some("start"));
    assert_eq!(result.items.len(), 502);
    assert!(result.items.iter().all(|m| m.is_event("DeviceStateChange")));
    let complete = ListComplete::from_message(result.complete.as_ref().expect("complete"))
        .expect("complete view");
    assert_eq!(complete.event, "DeviceStateListComplete");
    assert_eq!(complete.list_items, Some(502));
    // The unrelated event went to subscribers, not into the list.
    assert!(matches!(
        next_event(&mut sub).await,
        ClientEvent::Connected { .. }
    ));
    let ClientEvent::Event(fb) = next_event(&mut sub).await else {
        panic!("expected FullyBooted");
    };
    assert!(fb.is_event("FullyBooted"));
    let ClientEvent::Event(ev) = next_event(&mut sub).await else {
        panic!("expected the phone event");
    };
    assert_eq!(ev.get("Device"), Some("PJSIP/100"));
    assert!(sub.try_recv().is_err(), "list items are not broadcast");

    // A list action answered with an error returns at once, without a list.
    let list = tokio::spawn({
        let client = client.clone();
        async move { client.list(actions::presence_state_list()).await }
    });
    let action = peer.recv_action().await;
    peer.send(reply(&action, "Error").with("Message", "Permission denied"))
        .await;
    let result = list.await.expect("join").expect("answered");
    assert!(!result.is_success());
    assert!(result.items.is_empty() && result.complete.is_none());
    client.shutdown().await;
}

/// `list_each` hands each item over as it arrives: half the list is seen before the rest (and
/// its `...Complete`) is even sent, and nothing is kept in the result.
#[tokio::test]
async fn list_each_hands_items_over_before_the_list_completes() {
    let server = FakeServer::bind().await;
    let (client, mut peer) = server.connected_client().await;

    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let list = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .list_each(actions::device_state_list(), move |m| {
                    let _ = tx.send(m.get("Device").unwrap_or("-").to_owned());
                })
                .await
        }
    });
    let action = peer.recv_action().await;
    let bytes = device_state_list_bytes(action.action_id().expect("id"));
    let boundary = after_messages(&bytes, 251);
    // The response and the first 250 items.
    peer.send_raw(&bytes[..boundary]).await;
    let mut devices = Vec::new();
    while devices.len() < 250 {
        let d = timeout(PATIENCE, seen.recv())
            .await
            .expect("items handed over before the list completes")
            .expect("open");
        devices.push(d);
    }
    assert!(!list.is_finished(), "the list is not complete yet");
    peer.send_raw(&bytes[boundary..]).await;
    let result = list.await.expect("join").expect("list answered");
    assert!(result.is_success());
    assert!(result.items.is_empty(), "items were handed over, not kept");
    let complete = ListComplete::from_message(result.complete.as_ref().expect("complete"))
        .expect("complete view");
    assert_eq!(complete.list_items, Some(502));
    while let Ok(d) = seen.try_recv() {
        devices.push(d);
    }
    // Every item once, in the order of the capture.
    let mut codec = AmiCodec::client();
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut want = Vec::new();
    while let Some(frame) =
        tokio_util::codec::Decoder::decode(&mut codec, &mut buf).expect("decode")
    {
        if let Frame::Message(m) = frame
            && m.is_event("DeviceStateChange")
        {
            want.push(m.get("Device").unwrap_or("-").to_owned());
        }
    }
    assert_eq!(devices, want);
    client.shutdown().await;
}

#[tokio::test]
async fn server_vanishing_mid_action_fails_it_and_client_reconnects() {
    let server = FakeServer::bind().await;
    let client = AmiClient::start(server.config());
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);

    let pending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send(actions::setvar("DEVICE_STATE(Custom:x)", "INUSE"))
                .await
        }
    });
    let action = peer.recv_action().await;
    assert_eq!(action.action_name(), Some("Setvar"));
    drop(peer); // The server vanishes without answering.

    // action_timeout is 30 s: an answer here is the disconnect, not the timeout.
    let err = timeout(PATIENCE, pending)
        .await
        .expect("fails promptly")
        .expect("join")
        .expect_err("no answer");
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err:?}");

    let mut peer = server.accept_logged_in().await;
    let mut seen = Vec::new();
    loop {
        let ev = next_event(&mut sub).await;
        let done = matches!(ev, ClientEvent::Connected { generation: 2, .. });
        seen.push(ev);
        if done {
            break;
        }
    }
    assert!(matches!(
        seen[0],
        ClientEvent::Connected { generation: 1, .. }
    ));
    assert!(
        seen.iter()
            .any(|e| matches!(e, ClientEvent::Disconnected { generation: 1, .. })),
        "{seen:?}"
    );
    assert!(client.wait_connected(PATIENCE).await);

    let again = tokio::spawn({
        let client = client.clone();
        async move { client.send(actions::getvar("X")).await }
    });
    let action = peer.recv_action().await;
    peer.send(reply(&action, "Success").with("Value", "1"))
        .await;
    assert_eq!(
        again.await.expect("join").expect("answered").get("Value"),
        Some("1")
    );
    client.shutdown().await;
}

#[tokio::test]
async fn unanswered_ping_drops_the_connection() {
    let server = FakeServer::bind().await;
    let mut cfg = server.config();
    cfg.ping_interval = Duration::from_millis(20);
    cfg.ping_timeout = Duration::from_millis(100);
    let client = AmiClient::start(cfg);
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;

    // The first ping is answered, the second is not.
    let ping = peer.recv().await;
    assert_eq!(ping.action_name(), Some("Ping"));
    peer.send(reply(&ping, "Success").with("Ping", "Pong"))
        .await;
    let ping2 = peer.recv().await;
    assert_eq!(ping2.action_name(), Some("Ping"));
    assert_ne!(ping.action_id(), ping2.action_id());

    let _peer2 = server.accept_logged_in().await;
    let reason = loop {
        if let ClientEvent::Disconnected { generation, reason } = next_event(&mut sub).await {
            assert_eq!(generation, 1);
            break reason;
        }
    };
    assert!(reason.contains("Ping"), "{reason}");
    wait_state(&client, |s| {
        matches!(s, ConnectionState::Connected { generation: 2, .. })
    })
    .await;
    drop(peer);
    client.shutdown().await;
}

/// A `Ping` through `client`, answered by `peer` (after whatever `peer` sent before).
async fn ping_answered(client: &AmiClient, peer: &mut Peer) {
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.send(actions::ping()).await }
    });
    let action = peer.recv().await;
    peer.send(reply(&action, "Success").with("Ping", "Pong"))
        .await;
    call.await.expect("join").expect("answered");
}

/// A client with a 16-event subscription that reads nothing while its Asterisk sends 100
/// device events `Custom:d0`..`d99` (INUSE), then answers a ping: the subscription holds
/// Connected, FullyBooted and the first 14 events, the other 86 were lost.
async fn overflowed_subscriber() -> (FakeServer, AmiClient, hintfed_ami::Subscription, Peer) {
    let server = FakeServer::bind().await;
    let mut cfg = server.config();
    cfg.event_buffer = 16;
    let client = AmiClient::start(cfg);
    let sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);
    for i in 0..100 {
        peer.send(device_event(&format!("Custom:d{i}"), "INUSE"))
            .await;
    }
    ping_answered(&client, &mut peer).await;
    (server, client, sub, peer)
}

#[tokio::test]
async fn slow_subscriber_is_told_what_it_missed_while_actions_go_on() {
    // The client keeps serving actions although `slow` reads nothing.
    let (_server, client, mut slow, mut peer) = overflowed_subscriber().await;

    // Sent so far: Connected, FullyBooted, 100 events = 102. The first 16 were queued, the
    // other 86 found the queue full: the subscriber reads the 16, then how many it lost.
    let mut kept = Vec::new();
    let lagged = loop {
        match timeout(PATIENCE, slow.recv()).await.expect("in time") {
            Ok(ev) => kept.push(ev),
            Err(RecvError::Lagged(n)) => break n,
            Err(e) => panic!("expected Lagged, got {e:?}"),
        }
    };
    assert_eq!(kept.len(), 16);
    assert!(matches!(kept[0], ClientEvent::Connected { .. }));
    let devices: Vec<_> = kept[2..]
        .iter()
        .map(|e| match e {
            ClientEvent::Event(m) => m.get("Device").map(str::to_owned),
            other => panic!("expected an event, got {other:?}"),
        })
        .collect();
    let want: Vec<_> = (0..14).map(|i| Some(format!("Custom:d{i}"))).collect();
    assert_eq!(devices, want, "the oldest events, in order");
    assert_eq!(lagged, 102 - 16);
    // Room again: later events arrive, after the gap.
    peer.send(device_event("Custom:later", "BUSY")).await;
    let ClientEvent::Event(later) = next_event(&mut slow).await else {
        panic!("expected an event");
    };
    assert_eq!(later.get("Device"), Some("Custom:later"));
    // A second gap is reported again.
    for i in 0..40 {
        peer.send(device_event(&format!("Custom:e{i}"), "INUSE"))
            .await;
    }
    // An action answered after them: the client has handled all 40 once it returns.
    ping_answered(&client, &mut peer).await;
    let mut got = 0;
    let lagged = loop {
        match timeout(PATIENCE, slow.recv()).await.expect("in time") {
            Ok(_) => got += 1,
            Err(RecvError::Lagged(n)) => break n,
            Err(e) => panic!("expected Lagged, got {e:?}"),
        }
    };
    assert_eq!((got, lagged), (16, 40 - 16));
    client.shutdown().await;
}

/// The device of an event, or what else it is.
fn device_of(ev: &ClientEvent) -> String {
    match ev {
        ClientEvent::Event(m) => m.get("Device").unwrap_or("?").to_owned(),
        ClientEvent::Connected { generation, .. } => format!("connected {generation}"),
        ClientEvent::Disconnected { generation, .. } => format!("disconnected {generation}"),
    }
}

#[tokio::test]
async fn batches_keep_lifecycle_in_order_and_end_at_a_loss() {
    let (_server, client, mut sub, mut peer) = overflowed_subscriber().await;

    // Connected, FullyBooted and 14 events were queued, then the other 86 lost: the batch
    // ends before the loss.
    let mut batch = Vec::new();
    let n = timeout(PATIENCE, sub.recv_many(&mut batch, 64))
        .await
        .expect("in time")
        .expect("events");
    assert_eq!(n, 16);
    let mut want = vec!["connected 1".to_owned(), "?".to_owned()];
    want.extend((0..14).map(|i| format!("Custom:d{i}")));
    assert_eq!(batch.iter().map(device_of).collect::<Vec<_>>(), want);
    // Until the loss is reported, events are lost at it (its marker is off the queue).
    peer.send(device_event("Custom:unseen", "BUSY")).await;
    ping_answered(&client, &mut peer).await;
    let next = timeout(PATIENCE, sub.recv_many(&mut batch, 64))
        .await
        .expect("in time");
    assert!(matches!(next, Err(RecvError::Lagged(87))), "{next:?}");
    assert_eq!(batch.len(), 16, "nothing appended with a loss");

    // After the loss: the next events and the end of the session, in order, in batches of
    // at most two.
    for i in 0..3 {
        peer.send(device_event(&format!("Custom:f{i}"), "NOT_INUSE"))
            .await;
    }
    drop(peer);
    let mut got = Vec::new();
    while !got
        .iter()
        .any(|e| matches!(e, ClientEvent::Disconnected { .. }))
    {
        let n = timeout(PATIENCE, sub.recv_many(&mut got, 2))
            .await
            .expect("in time")
            .expect("events");
        assert!((1..=2).contains(&n), "{n}");
    }
    assert_eq!(
        got.iter().map(device_of).collect::<Vec<_>>(),
        ["Custom:f0", "Custom:f1", "Custom:f2", "disconnected 1"]
    );
    client.shutdown().await;
}

#[tokio::test]
async fn send_while_disconnected_fails_fast() {
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let mut cfg = ClientConfig::new(addr, USER, SECRET);
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(20);
    cfg.action_timeout = Duration::from_secs(30);
    let client = AmiClient::start(cfg);
    let state = wait_state(&client, |s| {
        matches!(s, ConnectionState::Disconnected { .. })
    })
    .await;
    assert!(matches!(state, ConnectionState::Disconnected { .. }));
    let err = timeout(PATIENCE, client.send(actions::ping()))
        .await
        .expect("fails fast")
        .expect_err("not connected");
    assert!(matches!(err, ClientError::NotConnected), "{err:?}");
    client.shutdown().await;
    assert!(matches!(
        client.send(actions::ping()).await,
        Err(ClientError::Shutdown)
    ));
}

#[tokio::test]
async fn action_timeout_and_invalid_action() {
    let server = FakeServer::bind().await;
    let mut cfg = server.config();
    cfg.action_timeout = Duration::from_millis(200);
    let client = AmiClient::start(cfg);
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);

    // Header injection is refused before anything is written.
    let err = client
        .send(actions::setvar("X", "1\r\nAction: Originate"))
        .await
        .expect_err("refused");
    assert!(matches!(err, ClientError::InvalidAction(_)), "{err:?}");

    // Never answered: Timeout, and the connection stays up.
    let err = client
        .send(actions::getvar("SLOW"))
        .await
        .expect_err("timeout");
    assert!(
        matches!(err, ClientError::Timeout { ref action, .. } if action == "Getvar"),
        "{err:?}"
    );
    let slow = peer.recv_action().await;
    assert_eq!(slow.get("Variable"), Some("SLOW"));
    // A late answer to the timed-out action is dropped; the next action works.
    peer.send(reply(&slow, "Success")).await;
    let next = tokio::spawn({
        let client = client.clone();
        async move { client.send(actions::getvar("FAST")).await }
    });
    let fast = peer.recv_action().await;
    assert_eq!(fast.get("Variable"), Some("FAST"));
    peer.send(reply(&fast, "Success").with("Value", "ok")).await;
    assert_eq!(
        next.await.expect("join").expect("answered").get("Value"),
        Some("ok")
    );
    assert!(matches!(
        client.status(),
        ConnectionState::Connected { generation: 1, .. }
    ));
    client.shutdown().await;
}

#[tokio::test]
async fn shutdown_logs_off() {
    let server = FakeServer::bind().await;
    let (client, mut peer) = server.connected_client().await;
    let server_side = tokio::spawn(async move {
        let logoff = peer.recv_action().await;
        assert_eq!(logoff.action_name(), Some("Logoff"));
        peer.send(reply(&logoff, "Goodbye").with("Message", "Thanks for all the fish."))
            .await;
        // Then the client closes.
        timeout(PATIENCE, peer.io.next())
            .await
            .expect("closed")
            .is_none()
    });
    client.shutdown().await;
    assert_eq!(client.status(), ConnectionState::Stopped);
    assert!(server_side.await.expect("join"), "client closed the socket");
}

#[tokio::test]
async fn a_burst_of_pipelined_actions_is_written_whole_and_each_answered() {
    // More actions than one flush batch, queued at once: every one reaches the server once,
    // whole, and each caller gets its own answer whatever the order of the answers.
    let server = FakeServer::bind().await;
    let (client, mut peer) = server.connected_client().await;
    let n = 200;
    let var = |i: usize| format!("DEVICE_STATE(Custom:{i})");
    let calls = tokio::spawn({
        let client = client.clone();
        async move {
            futures::future::join_all(
                (0..n).map(|i| client.send(actions::setvar(&var(i), "INUSE"))),
            )
            .await
        }
    });
    let mut received = Vec::new();
    for _ in 0..n {
        received.push(peer.recv_action().await);
    }
    let mut got: Vec<String> = received
        .iter()
        .map(|m| m.get("Variable").expect("variable").to_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..n).map(var).collect();
    want.sort();
    assert_eq!(got, want, "every action once");
    for m in received.iter().rev() {
        let v = m.get("Variable").expect("variable").to_owned();
        peer.send(reply(m, "Success").with("Message", v)).await;
    }
    let answers = timeout(PATIENCE, calls)
        .await
        .expect("answers in time")
        .expect("join");
    for (i, a) in answers.into_iter().enumerate() {
        let a = a.expect("answered");
        assert_eq!(
            a.get("Message"),
            Some(var(i).as_str()),
            "routed by ActionID"
        );
    }
    client.shutdown().await;
}

/// Takes completions from `w` until `n` arrived (failing after `PATIENCE`).
async fn take_n(w: &hintfed_ami::SetvarWriter, n: usize) -> Vec<hintfed_ami::WriteDone> {
    let mut got = Vec::new();
    timeout(PATIENCE, async {
        while got.len() < n {
            w.completed().await;
            w.take(&mut got);
        }
    })
    .await
    .expect("completions in time");
    got
}

#[tokio::test]
async fn setvar_writer_matches_answers_out_of_order_and_reports_refusals() {
    use hintfed_ami::WriteError;
    let server = FakeServer::bind().await;
    let (client, mut peer) = server.connected_client().await;
    let w = client.setvar_writer();
    for t in 0..10u64 {
        w.setvar(
            100 + t,
            &format!("DEVICE_STATE(Custom:{t})"),
            "INUSE",
            tokio::time::Instant::now(),
        );
    }
    let mut sent = Vec::new();
    for _ in 0..10 {
        let m = peer.recv_action().await;
        assert_eq!(m.action_name(), Some("Setvar"));
        assert_eq!(m.get("Value"), Some("INUSE"));
        sent.push(m);
    }
    let ids: std::collections::HashSet<&str> =
        sent.iter().map(|m| m.action_id().expect("id")).collect();
    assert_eq!(ids.len(), 10, "an ActionID per write");
    // An answer to nobody, then the answers in reverse order; the 4th write is refused.
    peer.send(
        Message::new()
            .with("Response", "Success")
            .with("ActionID", "nobody"),
    )
    .await;
    for m in sent.iter().rev() {
        let refused = m.get("Variable") == Some("DEVICE_STATE(Custom:3)");
        let answer = if refused {
            reply(m, "Error").with("Message", "Invalid variable")
        } else {
            reply(m, "Success").with("Message", "Variable Set")
        };
        peer.send(answer).await;
    }
    let got = take_n(&w, 10).await;
    let tokens: Vec<u64> = got.iter().map(|d| d.token).collect();
    assert_eq!(
        tokens,
        (100..110).rev().collect::<Vec<_>>(),
        "in answer order"
    );
    for d in &got {
        match (&d.result, d.token) {
            (Err(WriteError::Refused(msg)), 103) => assert_eq!(msg, "Invalid variable"),
            (Ok(()), t) if t != 103 => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(w.in_flight(), 0);
    // Nothing else comes.
    let mut more = Vec::new();
    assert_eq!(w.take(&mut more), 0);
    client.shutdown().await;
}

#[tokio::test]
async fn setvar_writer_fails_writes_in_flight_when_the_connection_drops() {
    let server = FakeServer::bind().await;
    let (client, mut peer) = server.connected_client().await;
    let w = client.setvar_writer();
    for t in 0..5u64 {
        w.setvar(
            t,
            "DEVICE_STATE(Custom:x)",
            "BUSY",
            tokio::time::Instant::now(),
        );
    }
    let first = peer.recv_action().await;
    for _ in 1..5 {
        peer.recv_action().await;
    }
    peer.send(reply(&first, "Success")).await;
    drop(peer); // The server vanishes with four writes unanswered.
    let mut got = take_n(&w, 5).await;
    got.sort_by_key(|d| d.token);
    assert!(got[0].result.is_ok(), "{:?}", got[0]);
    for d in &got[1..] {
        assert!(
            matches!(
                d.result,
                Err(hintfed_ami::WriteError::Client(
                    ClientError::Disconnected { .. }
                ))
            ),
            "{d:?}"
        );
    }
    // Not logged in (the server has not accepted again): a write fails at once.
    wait_state(&client, |s| !matches!(s, ConnectionState::Connected { .. })).await;
    w.setvar(
        50,
        "DEVICE_STATE(Custom:x)",
        "BUSY",
        tokio::time::Instant::now(),
    );
    let got = take_n(&w, 1).await;
    assert!(
        matches!(
            got[0].result,
            Err(hintfed_ami::WriteError::Client(ClientError::NotConnected))
        ),
        "{got:?}"
    );
    // Back: writes go through again.
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);
    w.setvar(
        60,
        "DEVICE_STATE(Custom:x)",
        "BUSY",
        tokio::time::Instant::now(),
    );
    let m = peer.recv_action().await;
    peer.send(reply(&m, "Success")).await;
    let got = take_n(&w, 1).await;
    assert_eq!(got[0].token, 60);
    assert!(got[0].result.is_ok());
    client.shutdown().await;
}

#[tokio::test]
async fn setvar_writer_reports_every_write_of_a_pipelined_burst_once() {
    // Thousands of writes queued at once, each answered (with its event, as Asterisk sends)
    // while more arrive: every completion arrives, once, with its own token.
    const N: u64 = 5000;
    let server = FakeServer::bind().await;
    let client = AmiClient::start(server.config());
    let mut sub = client.subscribe();
    let mut peer = server.accept_logged_in().await;
    assert!(client.wait_connected(PATIENCE).await);
    let w = client.setvar_writer();
    let answering = tokio::spawn(async move {
        let mut vars = Vec::new();
        for _ in 0..N {
            let m = peer.recv_action().await;
            let var = m.get("Variable").expect("variable").to_owned();
            peer.send(reply(&m, "Success").with("Message", "Variable Set"))
                .await;
            peer.send(device_event(&var, "INUSE")).await;
            vars.push(var);
        }
        (peer, vars)
    });
    let drain_events = tokio::spawn(async move {
        let mut n = 0u64;
        while n < N {
            match sub.recv().await {
                Ok(ClientEvent::Event(_)) => n += 1,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    });
    for t in 0..N {
        w.setvar(
            t,
            &format!("DEVICE_STATE(Custom:{t})"),
            "INUSE",
            tokio::time::Instant::now(),
        );
    }
    let got = take_n(&w, N as usize).await;
    let mut tokens: Vec<u64> = got.iter().map(|d| d.token).collect();
    assert!(got.iter().all(|d| d.result.is_ok()));
    tokens.sort_unstable();
    assert_eq!(
        tokens,
        (0..N).collect::<Vec<_>>(),
        "each write reported once"
    );
    let (_peer, mut vars) = answering.await.expect("server");
    vars.sort();
    vars.dedup();
    assert_eq!(vars.len() as u64, N, "each write sent once");
    let events = timeout(PATIENCE, drain_events)
        .await
        .expect("events in time")
        .expect("join");
    assert_eq!(events.expect("no events lost"), N);
    assert_eq!(w.in_flight(), 0);
    client.shutdown().await;
}
