//! The hub's ROUTER (ZMTP spoken directly) against raw ZMTP peers: routing identities chosen
//! by a peer are kept unless another live connection holds them (a peer cannot take over
//! another's replies), ZMTP PING commands are answered, peers of an incompatible socket type
//! are refused, and limits on frames per message hold.

use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::zmtp::{self, message};
use hintfed_transport::{HubBind, HubBindConfig, RouterMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

const SETUP: Duration = Duration::from_secs(5);

/// A READY command announcing `socket_type`, with an `Identity` property when given.
fn ready(socket_type: &str, identity: Option<&[u8]>) -> Vec<u8> {
    match identity {
        Some(id) => zmtp::ready_with(socket_type, &[(b"Identity", id)]),
        None => zmtp::ready_with(socket_type, &[]),
    }
}

/// A raw ZMTP peer: greeting and READY sent, the hub's greeting read.
async fn peer(addr: &str, socket_type: &str, identity: Option<&[u8]>) -> TcpStream {
    timeout(
        SETUP,
        zmtp::connect(addr, &ready(socket_type, identity), &[]),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

/// Reads one frame: (flags, body).
async fn frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    timeout(SETUP, zmtp::read_frame(s))
        .await
        .expect("frame in time")
        .expect("frame")
}

/// Reads up to the next message, skipping commands (the hub's READY); returns its frames.
async fn next_message(s: &mut TcpStream) -> Vec<Vec<u8>> {
    timeout(SETUP, zmtp::read_message(s))
        .await
        .expect("message in time")
        .expect("message")
}

/// A hub bound on a free port, its inbound channel and its ROUTER's host:port.
async fn bind(cfg: HubBindConfig) -> (HubBind, mpsc::Receiver<RouterMessage>, String) {
    let (hub, rx) = HubBind::bind(cfg).await.expect("bind");
    let addr = hub
        .router_endpoint()
        .trim_start_matches("tcp://")
        .to_owned();
    (hub, rx, addr)
}

async fn recv(rx: &mut mpsc::Receiver<RouterMessage>) -> RouterMessage {
    timeout(SETUP, rx.recv())
        .await
        .expect("message in time")
        .expect("hub open")
}

#[tokio::test]
async fn identities_are_kept_unless_taken_and_replies_reach_their_peer() {
    let (hub, mut rx, addr) = bind(HubBindConfig::new("tcp://127.0.0.1:0")).await;

    let mut a = peer(&addr, "DEALER", Some(b"agent-a")).await;
    a.write_all(&message(&[b"t", b"from a"])).await.expect("a");
    let m = recv(&mut rx).await;
    assert_eq!(&m.identity[..], b"agent-a");
    assert_eq!(
        m.frames,
        vec![Bytes::from_static(b"t"), Bytes::from_static(b"from a")]
    );

    // Same identity while the first is connected: the newcomer gets its own.
    let mut b = peer(&addr, "DEALER", Some(b"agent-a")).await;
    b.write_all(&message(&[b"t", b"from b"])).await.expect("b");
    let mb = recv(&mut rx).await;
    assert_ne!(&mb.identity[..], b"agent-a");
    assert_eq!(mb.identity.len(), 16);

    // No identity: a generated one, distinct.
    let mut c = peer(&addr, "REQ", None).await;
    c.write_all(&message(&[b"t", b"from c"])).await.expect("c");
    let mc = recv(&mut rx).await;
    assert_ne!(mc.identity, mb.identity);

    // Each reply reaches only its peer.
    for (m, s, text) in [
        (&m, &mut a, &b"to a"[..]),
        (&mb, &mut b, &b"to b"[..]),
        (&mc, &mut c, &b"to c"[..]),
    ] {
        hub.reply(
            m.identity.clone(),
            vec![Bytes::from_static(b"r"), Bytes::copy_from_slice(text)],
        )
        .await
        .expect("reply");
        assert_eq!(next_message(s).await, vec![b"r".to_vec(), text.to_vec()]);
    }

    // The transport's ping is answered and not delivered.
    a.write_all(&message(&[hintfed_transport::hub::PING]))
        .await
        .expect("ping");
    assert_eq!(
        next_message(&mut a).await,
        vec![hintfed_transport::hub::PONG.to_vec()]
    );
    // A reply to a peer that is gone is dropped and counted.
    drop(c);
    let dropped = hub.stats().dropped_outbound;
    let deadline = tokio::time::Instant::now() + SETUP;
    while hub.stats().dropped_outbound == dropped {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reply to a gone peer not counted"
        );
        hub.reply(mc.identity.clone(), vec![Bytes::from_static(b"late")])
            .await
            .expect("reply");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn zmtp_ping_commands_are_answered_with_pong() {
    let (hub, _rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let addr = hub
        .router_endpoint()
        .trim_start_matches("tcp://")
        .to_owned();
    let mut a = peer(&addr, "DEALER", None).await;
    // PING: TTL 0x0010, context "ctx".
    a.write_all(b"\x04\x0a\x04PING\x00\x10ctx")
        .await
        .expect("ping");
    loop {
        let (flags, body) = frame(&mut a).await;
        assert!(flags & 0x04 != 0, "a command");
        if body.starts_with(b"\x05READY") {
            continue;
        }
        assert_eq!(body, b"\x04PONGctx");
        break;
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn incompatible_peers_and_too_many_frames_are_refused() {
    let mut cfg = HubBindConfig::new("tcp://127.0.0.1:0");
    cfg.limits.max_frames = 2;
    let (hub, mut rx, addr) = bind(cfg).await;

    // A PUB is not a ROUTER's peer: the hub closes the connection.
    let mut p = peer(&addr, "PUB", None).await;
    let mut sink = Vec::new();
    timeout(SETUP, p.read_to_end(&mut sink))
        .await
        .expect("closed by the hub")
        .ok();

    // One frame more than allowed (a REQ delimiter's room): dropped and counted, connection kept.
    let mut a = peer(&addr, "DEALER", None).await;
    a.write_all(&message(&[b"", b"t", b"x"]))
        .await
        .expect("write");
    a.write_all(&message(&[b"t", b"ok"])).await.expect("write");
    let m = recv(&mut rx).await;
    assert_eq!(
        m.frames,
        vec![Bytes::from_static(b"t"), Bytes::from_static(b"ok")]
    );
    assert_eq!(hub.stats().dropped_oversize, 1);

    // Two more: the peer is disconnected and counted.
    a.write_all(&message(&[b"a", b"b", b"c", b"d"]))
        .await
        .expect("write");
    timeout(SETUP, a.read_to_end(&mut sink))
        .await
        .expect("closed by the hub")
        .ok();
    let deadline = tokio::time::Instant::now() + SETUP;
    while hub.stats().dropped_oversize < 2 {
        assert!(tokio::time::Instant::now() < deadline, "not counted");
        tokio::task::yield_now().await;
    }
    hub.shutdown().await;
}

/// Counts its drops: stands for a snapshot chunk holding an in-flight slot.
struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>, Vec<u8>);

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.1
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_peer_that_never_reads_is_closed_and_releases_its_queued_replies() {
    let mut cfg = HubBindConfig::new("tcp://127.0.0.1:0");
    cfg.send_timeout = Duration::from_millis(200);
    cfg.heartbeat_interval = None;
    let (hub, mut rx, addr) = bind(cfg).await;
    let mut deaf = peer(&addr, "DEALER", None).await;
    deaf.write_all(&message(&[b"t", b"hello"]))
        .await
        .expect("write");
    let m = recv(&mut rx).await;
    // Far more than the socket buffers hold; the peer never reads.
    const REPLIES: usize = 64;
    let released = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..REPLIES {
        let chunk = Bytes::from_owner(Slot(released.clone(), vec![b'x'; 256 * 1024]));
        hub.reply(
            m.identity.clone(),
            vec![Bytes::from_static(b"chunk"), chunk],
        )
        .await
        .expect("reply");
    }
    hintfed_testkit::wait::eventually("every queued reply released", || {
        released.load(std::sync::atomic::Ordering::SeqCst) == REPLIES
    })
    .await;
    assert!(hub.stats().send_timeouts >= 1);
    // Others are still served.
    let mut ok = peer(&addr, "DEALER", None).await;
    ok.write_all(&message(&[b"t", b"still"]))
        .await
        .expect("write");
    let m2 = recv(&mut rx).await;
    hub.reply(m2.identity, vec![Bytes::from_static(b"r")])
        .await
        .expect("reply");
    assert_eq!(next_message(&mut ok).await, vec![b"r".to_vec()]);
    drop(deaf);
    hub.shutdown().await;
}
