//! The hub's PUB (ZMTP spoken directly): every subscriber that reads gets a large burst
//! complete and in order even beside a subscriber that never reads; a subscriber announcing an
//! oversize frame is disconnected and counted.

use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::wait::eventually;
use hintfed_testkit::zmtp;
use hintfed_transport::{HubBind, HubBindConfig};
use tokio::io::AsyncWriteExt as _;
use tokio::time::{Instant, timeout};
use zeromq::{Socket, SocketRecv, SubSocket};

const BURST: u32 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_subscriber_gets_a_large_burst_beside_a_deaf_one() {
    let mut cfg = HubBindConfig::new("tcp://127.0.0.1:0");
    cfg.heartbeat_interval = None;
    let (bind, _rx) = HubBind::bind(cfg).await.expect("bind");
    let _deaf = zmtp::deaf_subscriber(bind.pub_endpoint().trim_start_matches("tcp://"))
        .await
        .expect("raw SUB handshake");
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = SubSocket::new();
        s.subscribe("state.").await.expect("subscribe");
        s.connect(bind.pub_endpoint()).await.expect("connect");
        subs.push(s);
    }
    // Wait until every subscription is in place: probes until each subscriber gets one.
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &mut subs {
        loop {
            assert!(Instant::now() < deadline, "subscriber never got a probe");
            bind.publish(vec![Bytes::from_static(b"state.probe")])
                .await
                .expect("publish");
            if let Ok(Ok(m)) = timeout(Duration::from_millis(50), s.recv()).await {
                assert_eq!(m.get(0).map(|f| f.as_ref()), Some(&b"state.probe"[..]));
                break;
            }
        }
    }
    // Messages on a topic nobody subscribed to are filtered out.
    bind.publish(vec![Bytes::from_static(b"other.x")])
        .await
        .expect("publish");
    let burst: Vec<_> = (0..BURST)
        .map(|i| {
            vec![
                Bytes::from_static(b"state.dev"),
                Bytes::from(i.to_be_bytes().to_vec()),
            ]
        })
        .collect();
    bind.publish_batch(&burst).await.expect("publish");
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut next = 0u32;
                while next < BURST {
                    let m = timeout(Duration::from_secs(10), s.recv())
                        .await
                        .unwrap_or_else(|_| panic!("message {next} never arrived"))
                        .expect("recv");
                    if m.get(1).is_none() {
                        continue; // a late probe
                    }
                    assert_eq!(m.get(0).map(|f| f.as_ref()), Some(&b"state.dev"[..]));
                    assert_eq!(m.get(1).map(|f| f.as_ref()), Some(&next.to_be_bytes()[..]));
                    next += 1;
                }
            })
        })
        .collect();
    for r in readers {
        r.await.expect("reader");
    }
    bind.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_announcing_an_oversize_frame_is_disconnected_and_counted() {
    let (bind, _rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let mut s = zmtp::deaf_subscriber(bind.pub_endpoint().trim_start_matches("tcp://"))
        .await
        .expect("raw SUB handshake");
    s.write_all(&zmtp::long_frame_header(1 << 40))
        .await
        .expect("write");
    eventually("oversize frame counted", || {
        bind.stats().dropped_oversize > 0
    })
    .await;
    bind.shutdown().await;
}
