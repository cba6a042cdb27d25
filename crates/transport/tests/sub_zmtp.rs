//! The hub link's own ZMTP SUB client against scripted publishers: garbage, a wrong socket
//! type, a peer that never greets, oversize frames, a batch of multipart messages. The link's
//! DEALER talks to a real [`HubBind`]; its fan-out endpoint is overridden to point at the
//! scripted peer.

mod common;

use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::zmtp::{self, message};
use hintfed_transport::hub::HEARTBEAT_TOPIC;
use hintfed_transport::{
    HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, LinkStatus, Publication,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use common::{SETUP, next_fanout};

/// What the scripted publisher does with one accepted connection.
#[derive(Debug, Clone)]
enum Peer {
    /// Writes something that is not ZMTP, then reads until closed.
    Garbage,
    /// A ZMTP greeting and a READY of this socket type.
    SocketType(&'static str),
    /// Never writes anything (keeps the connection open).
    Mute,
    /// A good publisher: checks the link's handshake, sends the heartbeat, then these bytes.
    Good(Vec<u8>),
}

/// Reads exactly `n` bytes (or fails the test).
async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    timeout(SETUP, s.read_exact(&mut b))
        .await
        .expect("peer bytes in time")
        .expect("read");
    b
}

async fn serve(mut s: TcpStream, peer: Peer) {
    match peer {
        Peer::Garbage => {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
        Peer::SocketType(t) => {
            let mut hello = zmtp::greeting();
            hello.extend(zmtp::ready(t));
            let _ = s.write_all(&hello).await;
        }
        Peer::Mute => {}
        Peer::Good(then) => {
            let mut hello = zmtp::greeting();
            hello.extend(zmtp::ready("PUB"));
            s.write_all(&hello).await.expect("write greeting");
            // The link's greeting: ZMTP 3.0, NULL, as client; then READY (SUB).
            let g = read_n(&mut s, 64).await;
            assert_eq!((g[0], g[9], g[10], g[11], g[32]), (0xff, 0x7f, 3, 0, 0));
            assert_eq!(&g[12..16], b"NULL");
            let ready = zmtp::ready("SUB");
            assert_eq!(read_n(&mut s, ready.len()).await, ready);
            // Its subscriptions as ZMTP 3.0 messages: everything, then the heartbeat.
            assert_eq!(read_n(&mut s, 3).await, zmtp::SUBSCRIBE_ALL);
            let mut hb_sub = b"\x01".to_vec();
            hb_sub.extend(HEARTBEAT_TOPIC.as_bytes());
            assert_eq!(read_n(&mut s, 2 + hb_sub.len()).await, message(&[&hb_sub]));
            let mut out = message(&[HEARTBEAT_TOPIC.as_bytes()]);
            out.extend(then);
            s.write_all(&out).await.expect("write messages");
        }
    }
    // Hold the connection until the link closes it.
    let mut sink = [0u8; 1024];
    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Accepts connections, handling the i-th with `script[i]` (the last entry repeats).
async fn scripted_publisher(script: Vec<Peer>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("tcp://{}", listener.local_addr().expect("local address"));
    let task = tokio::spawn(async move {
        let mut i = 0;
        while let Ok((s, _)) = listener.accept().await {
            let peer = script[i.min(script.len() - 1)].clone();
            i += 1;
            tokio::spawn(serve(s, peer));
        }
    });
    (endpoint, task)
}

/// A link whose DEALER talks to `hub` and whose fan-out comes from `fanout`.
fn link_to(hub: &HubBind, fanout: &str) -> (HubLink, mpsc::Receiver<Incoming>) {
    let mut config = HubLinkConfig::new(hub.router_endpoint());
    config.sub_endpoint = Some(fanout.to_owned());
    config.connect_attempt_timeout = Duration::from_millis(100);
    config.limits.max_message_bytes = 1024;
    config.limits.max_frames = 4;
    HubLink::connect(config).expect("link")
}

async fn hub() -> HubBind {
    HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind")
        .0
}

fn frames(parts: &[&[u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

/// Runs `script` (bad peers first, then a good one sending `m1`): the link counts each bad
/// attempt as a connect failure, stays up, and connects to the good peer.
async fn bad_peers_then_good(script: Vec<Peer>) {
    let bad = script.len();
    let mut script = script;
    script.push(Peer::Good(message(&[b"dev.1", b"m1"])));
    let hub = hub().await;
    let (fanout, _task) = scripted_publisher(script).await;
    let (link, mut rx) = link_to(&hub, &fanout);
    assert!(
        link.wait_connected(SETUP).await,
        "connects to the good peer"
    );
    assert_eq!(next_fanout(&mut rx).await, frames(&[b"dev.1", b"m1"]));
    let stats = link.stats();
    assert!(
        stats.connect_failures >= bad as u64,
        "each bad peer is a failed attempt: {stats:?}"
    );
    assert_eq!(stats.messages_in, 1, "the heartbeat is swallowed");
}

#[tokio::test]
async fn a_peer_sending_garbage_is_a_failed_attempt() {
    bad_peers_then_good(vec![Peer::Garbage, Peer::Garbage]).await;
}

#[tokio::test]
async fn a_peer_of_the_wrong_socket_type_is_a_failed_attempt() {
    bad_peers_then_good(vec![Peer::SocketType("ROUTER"), Peer::SocketType("SUB")]).await;
}

#[tokio::test]
async fn a_peer_that_never_greets_is_a_failed_attempt() {
    bad_peers_then_good(vec![Peer::Mute]).await;
}

#[tokio::test]
async fn a_publisher_that_is_not_sending_keeps_the_link_connecting() {
    // Greets, names itself a PUB, takes the subscriptions, but never sends a message: not
    // connected (the subscriptions may not be in force), and the link is still alive.
    let hub = hub().await;
    let (fanout, _task) = scripted_publisher(vec![Peer::SocketType("PUB")]).await;
    let (link, _rx) = link_to(&hub, &fanout);
    assert!(!link.wait_connected(Duration::from_millis(300)).await);
    assert_eq!(*link.status().borrow(), LinkStatus::Connecting);
}

#[tokio::test]
async fn oversize_fanout_is_skipped_and_counted_and_the_link_stays_up() {
    let big = vec![b'x'; 2000];
    let mut wire = message(&[b"dev.big", &big]);
    // Too many frames (limit 4).
    wire.extend(message(&[b"dev.f", b"1", b"2", b"3", b"4"]));
    // A 1 TiB frame announced: only its header and a few bytes follow.
    let mut huge = vec![0x02];
    huge.extend((1u64 << 40).to_be_bytes());
    let hub = hub().await;
    let mut after = wire.clone();
    after.extend(message(&[b"dev.ok", b"small"]));
    after.extend(&huge);
    after.extend([0u8; 100]);
    let (fanout, _task) = scripted_publisher(vec![Peer::Good(after)]).await;
    let (link, mut rx) = link_to(&hub, &fanout);
    assert!(link.wait_connected(SETUP).await);
    assert_eq!(next_fanout(&mut rx).await, frames(&[b"dev.ok", b"small"]));
    let stats = link.stats();
    assert_eq!(stats.dropped_oversize, 2, "{stats:?}");
    assert_eq!(stats.messages_in, 1, "{stats:?}");
    assert_eq!(stats.reconnects, 0);
    assert!(link.is_connected());
}

#[tokio::test]
async fn many_multipart_messages_arrive_whole_and_in_order() {
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for i in 0..2000u32 {
        let body = vec![(i % 251) as u8; (i % 300) as usize];
        let topic = format!("dev.{i}");
        wire.extend(message(&[topic.as_bytes(), b"", &body]));
        want.push(frames(&[topic.as_bytes(), b"", &body]));
    }
    let hub = hub().await;
    let (fanout, _task) = scripted_publisher(vec![Peer::Good(wire)]).await;
    let (link, mut rx) = link_to(&hub, &fanout);
    assert!(link.wait_connected(SETUP).await);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&next_fanout(&mut rx).await, w, "message {i}");
    }
    assert_eq!(link.stats().dropped_inbound_full, 0);
}

#[tokio::test]
async fn a_batch_published_by_the_hub_reaches_the_link_in_order() {
    let (hub, _hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let mut config = HubLinkConfig::new(hub.router_endpoint());
    config.subscriptions = vec!["dev.".to_owned()];
    let (link, mut rx) = HubLink::connect(config).expect("link");
    assert!(link.wait_connected(SETUP).await);
    let batch: Vec<_> = (0..1000u32)
        .map(|i| {
            let topic = if i % 10 == 0 { "other." } else { "dev." };
            vec![
                Bytes::from(format!("{topic}{i}")),
                Bytes::from(i.to_be_bytes().to_vec()),
            ]
        })
        .collect();
    let publications: Vec<_> = batch.iter().cloned().map(Publication::new).collect();
    hub.publish_batch(&publications).await.expect("publish");
    let deadline = Instant::now() + SETUP;
    for want in batch.iter().filter(|m| m[0].starts_with(b"dev.")) {
        assert!(Instant::now() < deadline);
        assert_eq!(&next_fanout(&mut rx).await, want);
    }
    assert!(
        timeout(Duration::from_millis(100), rx.recv())
            .await
            .is_err(),
        "only subscribed topics"
    );
}
