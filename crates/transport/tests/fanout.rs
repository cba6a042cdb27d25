//! The hub's PUB (ZMTP spoken directly): every subscriber that reads gets a large burst
//! complete and in order even beside a subscriber that never reads; a subscriber announcing an
//! oversize frame is disconnected and counted.

use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::wait::eventually;
use hintfed_testkit::zmtp;
use hintfed_transport::hub::HEARTBEAT_TOPIC;
use hintfed_transport::{HubBind, HubBindConfig, Publication};
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
            Publication::new(vec![
                Bytes::from_static(b"state.dev"),
                Bytes::from(i.to_be_bytes().to_vec()),
            ])
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

/// A subscriber kept busy (written once a linger, what came meanwhile together) gets every
/// message in order, whether it comes while the subscriber lingers after a write or after its
/// linger ended with nothing queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_subscriber_gets_every_message_through_its_lingers() {
    let mut cfg = HubBindConfig::new("tcp://127.0.0.1:0");
    // The heartbeat marks time for the test: one comes only well after a linger has ended.
    cfg.heartbeat_interval = Some(Duration::from_millis(20));
    cfg.fanout_linger = Duration::from_millis(2);
    let (bind, _rx) = HubBind::bind(cfg).await.expect("bind");
    let mut s = SubSocket::new();
    s.subscribe("state.").await.expect("subscribe");
    s.subscribe(HEARTBEAT_TOPIC).await.expect("subscribe");
    s.connect(bind.pub_endpoint()).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "subscriber never got a probe");
        bind.publish(vec![Bytes::from_static(b"state.probe")])
            .await
            .expect("publish");
        if let Ok(Ok(m)) = timeout(Duration::from_millis(50), s.recv()).await
            && m.get(0).map(|f| f.as_ref()) == Some(&b"state.probe"[..])
        {
            break;
        }
    }
    let message = |i: u32| {
        vec![
            Bytes::from_static(b"state.dev"),
            Bytes::from(i.to_be_bytes().to_vec()),
        ]
    };
    // The next message: data (its number) or a heartbeat (`None`); late probes skipped.
    async fn next(s: &mut SubSocket) -> Option<Vec<u8>> {
        loop {
            let m = timeout(Duration::from_secs(10), s.recv())
                .await
                .expect("a message within 10 s")
                .expect("recv");
            match m.get(0).map(|f| f.as_ref()) {
                Some(b"state.probe") => continue,
                Some(b"state.dev") => return m.get(1).map(|f| f.to_vec()),
                _ => return None,
            }
        }
    }
    let mut expected = 0u32;
    // Reads through message `last`; returns the heartbeats read meanwhile.
    let mut expect_through = async |s: &mut SubSocket, last: u32| {
        let mut heartbeats = 0;
        while expected <= last {
            match next(s).await {
                Some(n) => {
                    assert_eq!(n, expected.to_be_bytes());
                    expected += 1;
                }
                None => heartbeats += 1,
            }
        }
        heartbeats
    };
    // Batches of 20, each published once the previous one arrived, for three heartbeats
    // (over 40 ms): busy after its first pace window (20 ms), from then on each batch comes
    // while the subscriber lingers after a write.
    let mut heartbeats = 0;
    let mut sent = 0u32;
    while heartbeats < 3 {
        let batch: Vec<_> = (sent..sent + 20)
            .map(|i| Publication::new(message(i)))
            .collect();
        bind.publish_batch(&batch).await.expect("publish");
        sent += 20;
        heartbeats += expect_through(&mut s, sent - 1).await;
    }
    // Two heartbeats later the linger after the last write has ended with nothing queued;
    // what comes next is still written.
    let mut heartbeats = 0;
    while heartbeats < 2 {
        if next(&mut s).await.is_none() {
            heartbeats += 1;
        }
    }
    for i in sent..sent + 10 {
        bind.publish(message(i)).await.expect("publish");
        expect_through(&mut s, i).await;
    }
    bind.shutdown().await;
}
