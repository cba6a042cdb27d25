//! Ingress under overload: a flood larger than the inbound channel (of a HubBind, or replies
//! to a HubLink) is held back by ZeroMQ/TCP while the application is busy, and every message
//! arrives, in order, once the application reads again (nothing dropped for overload).

use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::wait::eventually;
use hintfed_transport::{Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig};
use tokio::time::timeout;
use zeromq::{DealerSocket, Socket, SocketSend, ZmqMessage};

const CAPACITY: usize = 8;
const FLOOD: u32 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_larger_than_the_inbound_queue_loses_nothing() {
    let mut cfg = HubBindConfig::new("tcp://127.0.0.1:0");
    cfg.inbound_capacity = CAPACITY;
    let (bind, mut rx) = HubBind::bind(cfg).await.expect("bind");
    let mut dealer = DealerSocket::new();
    dealer
        .connect(bind.router_endpoint())
        .await
        .expect("connect");
    let sender = tokio::spawn(async move {
        for i in 0..FLOOD {
            let mut m = ZmqMessage::from(Bytes::from_static(b"dev."));
            m.push_back(Bytes::from(i.to_be_bytes().to_vec()));
            dealer.send(m).await.expect("send");
        }
        dealer
    });
    // The application is busy: the channel fills up and stays full.
    eventually("the inbound channel filled", || rx.len() >= CAPACITY).await;
    // Reading again: every message arrives, in order.
    for i in 0..FLOOD {
        let m = timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("message {i} never arrived"))
            .expect("open");
        assert_eq!(m.frames.len(), 2);
        assert_eq!(m.frames[1].as_ref(), i.to_be_bytes(), "message {i}");
    }
    let stats = bind.stats();
    assert_eq!(stats.dropped_inbound_full, 0);
    assert_eq!(stats.messages_in, u64::from(FLOOD));
    let _dealer = sender.await.expect("sender");
    bind.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_flood_larger_than_a_links_inbound_queue_loses_nothing() {
    let (bind, mut hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let mut cfg = HubLinkConfig::new(bind.router_endpoint());
    cfg.inbound_capacity = CAPACITY;
    let (link, mut rx) = HubLink::connect(cfg).expect("link");
    assert!(
        link.wait_connected(Duration::from_secs(10)).await,
        "link up"
    );
    link.try_send(vec![Bytes::from_static(b"hello")])
        .expect("send");
    let hello = timeout(Duration::from_secs(10), hub_rx.recv())
        .await
        .expect("the hub hears the link")
        .expect("open");
    // The application is busy while the hub answers with far more than the channel holds.
    for i in 0..FLOOD {
        let frames = vec![
            Bytes::from_static(b"r"),
            Bytes::from(i.to_be_bytes().to_vec()),
        ];
        bind.reply(hello.identity.clone(), frames)
            .await
            .expect("reply queued");
    }
    eventually("replies wait in the inbound channel", || !rx.is_empty()).await;
    for i in 0..FLOOD {
        let m = timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("reply {i} never arrived"))
            .expect("open");
        assert_eq!(m.channel, Channel::Reply);
        assert!(
            rx.len() <= CAPACITY / 2,
            "at most half the channel holds replies"
        );
        assert_eq!(m.frames[1].as_ref(), i.to_be_bytes(), "reply {i}");
    }
    let stats = link.stats();
    assert_eq!(stats.dropped_inbound_full, 0);
    bind.shutdown().await;
}

#[tokio::test]
async fn a_link_holding_replies_back_under_steady_fanout_does_not_call_the_hub_silent() {
    // The application reads nothing: the channel holds more than the reply backlog, so the
    // link leaves replies (pongs too) in the socket and counts the hub alive meanwhile, even
    // while fan-out arrives more often than the link looks at its channel again.
    let (hub, _hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let mut cfg = HubLinkConfig::new(hub.router_endpoint());
    cfg.inbound_capacity = 128;
    cfg.ping_interval = Duration::from_millis(50);
    cfg.silence_timeout = Duration::from_millis(300);
    let (link, _rx) = HubLink::connect(cfg).expect("link");
    assert!(link.wait_connected(Duration::from_secs(10)).await);
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        hub.publish(vec![Bytes::from_static(b"dev.x"), Bytes::from_static(b"1")])
            .await
            .expect("publish");
        tokio::task::yield_now().await;
    }
    let stats = link.stats();
    assert!(
        stats.dropped_inbound_full > 0,
        "the channel was full: {stats:?}"
    );
    assert_eq!(stats.silence_timeouts, 0, "{stats:?}");
    assert_eq!(stats.reconnects, 0, "{stats:?}");
}
