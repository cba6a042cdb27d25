//! The hub link's own ZMTP DEALER against a scripted ROUTER: what was queued arrives whole and
//! in order, a peer that never reads ends the connection after the send timeout, oversize
//! replies are skipped, ZMTP and transport pings are answered, a closed connection is noticed,
//! and a peer of the wrong socket type is a failed attempt. The link's fan-out comes from a
//! real [`HubBind`] (its welcome heartbeat connects the link); its request side points at the
//! scripted peer.

mod common;

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hintfed_testkit::wait::eventually;
use hintfed_testkit::zmtp::{self, command, message};
use hintfed_transport::hub::{PING, PONG};
use hintfed_transport::{
    Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, LinkStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use common::{SETUP, next_on};

/// What the scripted ROUTER reads from the link.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Command(Vec<u8>),
    Message(Vec<Vec<u8>>),
}

/// One accepted link connection, seen as a raw ZMTP 3.0 ROUTER.
struct RawRouter {
    s: TcpStream,
    buf: BytesMut,
}

impl RawRouter {
    /// Accepts the link's request connection and completes the handshake as `socket_type`;
    /// checks that the link greets as a ZMTP 3.0 NULL client and names itself a DEALER.
    async fn accept(listener: &TcpListener, socket_type: &str) -> RawRouter {
        let (mut s, _) = timeout(SETUP, listener.accept())
            .await
            .expect("the link connects in time")
            .expect("accept");
        let mut hello = zmtp::greeting();
        hello.extend(zmtp::ready(socket_type));
        s.write_all(&hello).await.expect("write greeting");
        let mut router = RawRouter {
            s,
            buf: BytesMut::new(),
        };
        let g = router.bytes(64).await;
        assert_eq!((g[0], g[9], g[10], g[11], g[32]), (0xff, 0x7f, 3, 0, 0));
        assert_eq!(&g[12..16], b"NULL");
        if socket_type == "ROUTER" {
            let ready = zmtp::ready("DEALER");
            assert_eq!(router.bytes(ready.len()).await, ready);
        }
        router
    }

    /// Exactly `n` more bytes from the link.
    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let read = timeout(SETUP, self.s.read_buf(&mut self.buf))
                .await
                .expect("link bytes in time")
                .expect("read");
            assert!(read > 0, "the link closed the connection");
        }
        self.buf.split_to(n).to_vec()
    }

    /// The next command or whole message from the link.
    async fn next(&mut self) -> Got {
        let mut frames = Vec::new();
        loop {
            let flags = self.bytes(1).await[0];
            let len = if flags & 0x02 != 0 {
                let mut b = &self.bytes(8).await[..];
                b.get_u64() as usize
            } else {
                usize::from(self.bytes(1).await[0])
            };
            let body = self.bytes(len).await;
            if flags & 0x04 != 0 {
                assert!(frames.is_empty(), "a command inside a message");
                return Got::Command(body);
            }
            frames.push(body);
            if flags & 0x01 == 0 {
                return Got::Message(frames);
            }
        }
    }

    /// The next message from the link that is not its transport PING.
    async fn next_message(&mut self) -> Vec<Vec<u8>> {
        loop {
            match self.next().await {
                Got::Message(m) if m == [PING.to_vec()] => continue,
                Got::Message(m) => return m,
                Got::Command(c) => panic!("unexpected command {c:?}"),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write to the link");
    }
}

struct Setup {
    _hub: HubBind,
    listener: TcpListener,
    config: HubLinkConfig,
}

/// A listener for the link's request side and a hub for its fan-out; the link pings rarely
/// (once at connect) and calls the hub silent only after a minute unless `config` says else.
async fn setup() -> Setup {
    let (hub, _hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut config = HubLinkConfig::new(format!(
        "tcp://{}",
        listener.local_addr().expect("local address")
    ));
    config.sub_endpoint = Some(hub.pub_endpoint().to_owned());
    config.ping_interval = Duration::from_secs(30);
    config.silence_timeout = Duration::from_secs(60);
    Setup {
        _hub: hub,
        listener,
        config,
    }
}

/// Connects a link with `config` and accepts its request connection as a ROUTER.
async fn connect(
    setup: &Setup,
    config: HubLinkConfig,
) -> (HubLink, mpsc::Receiver<Incoming>, RawRouter) {
    let (link, rx) = HubLink::connect(config).expect("link");
    let router = RawRouter::accept(&setup.listener, "ROUTER").await;
    assert!(link.wait_connected(SETUP).await, "link connected");
    (link, rx, router)
}

async fn next_reply(rx: &mut mpsc::Receiver<Incoming>) -> Vec<Bytes> {
    next_on(rx, Channel::Reply).await
}

#[tokio::test]
async fn messages_queued_before_the_writer_runs_arrive_whole_and_in_order() {
    let setup = setup().await;
    let (link, _rx, mut router) = connect(&setup, setup.config.clone()).await;
    // More messages (and bytes) than one write takes, all queued while the link's task
    // cannot run (one-thread runtime, no await in between): every one arrives, in order.
    let want: Vec<Vec<Vec<u8>>> = (0..600u32)
        .map(|i| {
            let body = vec![(i % 251) as u8; (i as usize * 37) % 700];
            vec![format!("dev.{i}").into_bytes(), Vec::new(), body]
        })
        .collect();
    for m in &want {
        let frames = m.iter().map(|f| Bytes::copy_from_slice(f)).collect();
        link.try_send(frames).expect("queued");
    }
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&router.next_message().await, w, "message {i}");
    }
    eventually("every message counted as sent", || {
        link.stats().messages_out == want.len() as u64
    })
    .await;
    let stats = link.stats();
    assert_eq!(stats.dropped_outbound, 0, "{stats:?}");
    assert_eq!(stats.send_timeouts, 0, "{stats:?}");
}

#[tokio::test]
async fn a_router_that_never_reads_ends_the_connection_after_the_send_timeout() {
    let setup = setup().await;
    let mut config = setup.config.clone();
    config.send_timeout = Duration::from_millis(200);
    let (link, _rx, first) = connect(&setup, config).await;
    // The peer never reads: the socket buffers fill, then a write makes no progress.
    let big = Bytes::from(vec![b'x'; 256 * 1024]);
    let mut queued = 0u64;
    while link
        .try_send(vec![Bytes::from_static(b"dev.x"), big.clone()])
        .is_ok()
    {
        queued += 1;
    }
    let mut status = link.status();
    timeout(SETUP, status.wait_for(|s| *s != LinkStatus::Connected))
        .await
        .expect("the stalled connection is ended")
        .expect("status open");
    let stats = link.stats();
    assert_eq!(stats.send_timeouts, 1, "{stats:?}");
    assert!(stats.dropped_outbound >= 1, "{stats:?}");
    assert!(stats.messages_out < queued, "{stats:?}");
    // And the link comes back on a new connection.
    let _second = RawRouter::accept(&setup.listener, "ROUTER").await;
    assert!(link.wait_connected(SETUP).await, "reconnected");
    assert_eq!(link.stats().reconnects, 1);
    drop(first);
}

#[tokio::test]
async fn oversize_replies_are_skipped_and_counted_and_the_link_stays_up() {
    let setup = setup().await;
    let mut config = setup.config.clone();
    config.limits.max_message_bytes = 1024;
    config.limits.max_frames = 4;
    let (link, mut rx, mut router) = connect(&setup, config).await;
    let mut wire = message(&[b"r", &[b'x'; 2000]]);
    wire.extend(message(&[b"r", b"1", b"2", b"3", b"4"]));
    wire.extend(message(&[b"ok", b"small"]));
    router.send(&wire).await;
    assert_eq!(
        next_reply(&mut rx).await,
        vec![Bytes::from_static(b"ok"), Bytes::from_static(b"small")]
    );
    let stats = link.stats();
    assert_eq!(stats.dropped_oversize, 2, "{stats:?}");
    assert_eq!(stats.messages_in, 1, "{stats:?}");
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert!(link.is_connected());
}

#[tokio::test]
async fn zmtp_pings_and_transport_pings_are_answered() {
    let setup = setup().await;
    let (link, mut rx, mut router) = connect(&setup, setup.config.clone()).await;
    // The link pings at once on a new connection (a one-frame message, for the hub).
    assert_eq!(router.next().await, Got::Message(vec![PING.to_vec()]));
    // A ZMTP PING command (TTL, context) is answered with a PONG command echoing the context.
    router.send(&command(b"PING", b"\x00\x10ctx")).await;
    assert_eq!(router.next().await, Got::Command(b"\x04PONGctx".to_vec()));
    // The hub's PONG message is swallowed: the first reply delivered is what follows it.
    let mut wire = message(&[PONG]);
    wire.extend(message(&[b"after"]));
    router.send(&wire).await;
    assert_eq!(
        next_reply(&mut rx).await,
        vec![Bytes::from_static(b"after")]
    );
    assert_eq!(link.stats().messages_in, 1);
    assert!(link.is_connected());
}

#[tokio::test]
async fn a_router_closing_the_connection_is_noticed_and_the_link_reconnects() {
    let setup = setup().await;
    let (link, mut rx, router) = connect(&setup, setup.config.clone()).await;
    drop(router);
    let mut status = link.status();
    timeout(SETUP, status.wait_for(|s| *s != LinkStatus::Connected))
        .await
        .expect("the closed connection is noticed")
        .expect("status open");
    let mut router = RawRouter::accept(&setup.listener, "ROUTER").await;
    assert!(link.wait_connected(SETUP).await, "reconnected");
    assert_eq!(link.stats().reconnects, 1);
    // Both ways on the new connection.
    link.try_send(vec![Bytes::from_static(b"hello")])
        .expect("queued");
    assert_eq!(router.next_message().await, vec![b"hello".to_vec()]);
    router.send(&message(&[b"ack"])).await;
    assert_eq!(next_reply(&mut rx).await, vec![Bytes::from_static(b"ack")]);
}

#[tokio::test]
async fn a_peer_of_the_wrong_socket_type_is_a_failed_attempt() {
    let setup = setup().await;
    let (link, _rx) = HubLink::connect(setup.config.clone()).expect("link");
    for bad in ["PUB", "REP"] {
        let _peer = RawRouter::accept(&setup.listener, bad).await;
        let failures = u64::from(bad == "REP") + 1;
        eventually("the attempt counted as failed", || {
            link.stats().connect_failures >= failures
        })
        .await;
    }
    assert_eq!(*link.status().borrow(), LinkStatus::Connecting);
    // A ROUTER next: connected.
    let _router = RawRouter::accept(&setup.listener, "ROUTER").await;
    assert!(link.wait_connected(SETUP).await);
}
