//! Recovery of the agent/server link when either side restarts (pure Rust on both ends).

use std::time::Duration;

use bytes::Bytes;
use hintfed_testkit::zmtp;
use hintfed_transport::{
    Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, LinkStatus, RouterMessage,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// The product requirement: every link recovers within 2 s of the peer coming back.
const RECOVERY: Duration = Duration::from_secs(2);
/// Generous bound for first-time set-up (not a product requirement).
const SETUP: Duration = Duration::from_secs(10);

fn frames(parts: &[&'static [u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::from_static(p)).collect()
}

/// Sends `msg` from the link until the hub receives it, or the deadline passes.
async fn link_to_hub(
    link: &HubLink,
    hub_rx: &mut mpsc::Receiver<RouterMessage>,
    msg: &[&'static [u8]],
    within: Duration,
) -> Option<RouterMessage> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let _ = link.try_send(frames(msg));
        if let Ok(Some(m)) = timeout(Duration::from_millis(50), hub_rx.recv()).await
            && m.frames == frames(msg)
        {
            return Some(m);
        }
    }
    None
}

/// Publishes `msg` from the hub until the link delivers it, or the deadline passes.
async fn hub_to_link(
    hub: &HubBind,
    link_rx: &mut mpsc::Receiver<Incoming>,
    msg: &[&'static [u8]],
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        hub.publish(frames(msg)).await.expect("hub alive");
        if let Ok(Some(m)) = timeout(Duration::from_millis(50), link_rx.recv()).await
            && m.channel == Channel::Fanout
            && m.frames == frames(msg)
        {
            return true;
        }
    }
    false
}

async fn both_ways(
    hub: &HubBind,
    hub_rx: &mut mpsc::Receiver<RouterMessage>,
    link: &HubLink,
    link_rx: &mut mpsc::Receiver<Incoming>,
    within: Duration,
) {
    let start = Instant::now();
    let got = link_to_hub(link, hub_rx, &[b"dev.", b"update"], within)
        .await
        .expect("hub receives the link's update");
    // Reply through the ROUTER to the identity that sent it.
    hub.reply(got.identity.clone(), frames(&[b"ack"]))
        .await
        .expect("hub alive");
    let reply = timeout(within, async {
        loop {
            match link_rx.recv().await {
                Some(m) if m.channel == Channel::Reply => return m,
                Some(_) => continue,
                None => panic!("link inbound closed"),
            }
        }
    })
    .await
    .expect("reply arrives");
    assert_eq!(reply.frames, frames(&[b"ack"]));
    let left = within.saturating_sub(start.elapsed());
    assert!(
        hub_to_link(hub, link_rx, &[b"dev.x", b"fanout"], left).await,
        "fan-out reaches the link"
    );
}

#[tokio::test]
async fn link_recovers_after_hub_is_rebound_on_same_port() {
    let (hub, mut hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let endpoint = hub.router_endpoint().to_owned();
    let (link, mut link_rx) = HubLink::connect(HubLinkConfig::new(endpoint.clone())).expect("link");
    assert!(link.wait_connected(SETUP).await);
    both_ways(&hub, &mut hub_rx, &link, &mut link_rx, SETUP).await;

    // The hub goes away: the link notices and reports it.
    hub.shutdown().await;
    let mut status = link.status();
    timeout(SETUP, status.wait_for(|s| *s == LinkStatus::Connecting))
        .await
        .expect("link notices the hub is gone")
        .expect("status channel open");

    // The hub comes back on the same ports; everything flows again within 2 s.
    let (hub, mut hub_rx) = HubBind::bind(HubBindConfig::new(endpoint))
        .await
        .expect("rebind on the same ports");
    both_ways(&hub, &mut hub_rx, &link, &mut link_rx, RECOVERY).await;
    assert!(link.stats().reconnects >= 1);
}

#[tokio::test]
async fn hub_serves_a_recreated_link() {
    let (hub, mut hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let endpoint = hub.router_endpoint().to_owned();
    let (link, mut link_rx) = HubLink::connect(HubLinkConfig::new(endpoint.clone())).expect("link");
    assert!(link.wait_connected(SETUP).await);
    both_ways(&hub, &mut hub_rx, &link, &mut link_rx, SETUP).await;

    drop(link);
    drop(link_rx);
    let (link, mut link_rx) = HubLink::connect(HubLinkConfig::new(endpoint)).expect("link");
    both_ways(&hub, &mut hub_rx, &link, &mut link_rx, RECOVERY).await;
}

#[tokio::test]
async fn link_recreates_sockets_when_hub_goes_silent() {
    // A hub without heartbeats: the link's silence timeout fires and it reconnects.
    let mut config = HubBindConfig::new("tcp://127.0.0.1:0");
    config.heartbeat_interval = None;
    let (hub, _hub_rx) = HubBind::bind(config).await.expect("bind");
    let mut lc = HubLinkConfig::new(hub.router_endpoint());
    lc.ping_interval = Duration::from_millis(50);
    lc.silence_timeout = Duration::from_millis(300);
    let (link, _link_rx) = HubLink::connect(lc).expect("link");
    assert!(link.wait_connected(SETUP).await);
    let deadline = Instant::now() + SETUP;
    while link.stats().silence_timeouts == 0 {
        assert!(Instant::now() < deadline, "silence timeout never fired");
        tokio::task::yield_now().await;
        let mut st = link.status();
        let _ = timeout(Duration::from_millis(50), st.changed()).await;
    }
    assert!(link.wait_connected(SETUP).await, "reconnects after silence");
}

#[tokio::test]
async fn bind_reports_address_in_use() {
    let (hub, _rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let err = HubBind::bind(HubBindConfig::new(hub.router_endpoint()))
        .await
        .expect_err("second bind must fail");
    let text = err.to_string();
    assert!(text.contains(hub.router_endpoint()), "{text}");
    assert!(text.to_lowercase().contains("in use"), "{text}");
}

#[tokio::test]
async fn oversize_messages_are_dropped_and_counted() {
    let mut config = HubBindConfig::new("tcp://127.0.0.1:0");
    config.limits.max_message_bytes = 16;
    let (hub, mut hub_rx) = HubBind::bind(config).await.expect("bind");
    let mut lc = HubLinkConfig::new(hub.router_endpoint());
    lc.limits.max_message_bytes = 16;
    let (link, mut link_rx) = HubLink::connect(lc).expect("link");
    assert!(link.wait_connected(SETUP).await);
    // Fan-out: an oversize publication is dropped by the link; a small one passes.
    let big = Bytes::from(vec![b'x'; 64]);
    let deadline = Instant::now() + SETUP;
    loop {
        assert!(Instant::now() < deadline, "no fan-out received");
        hub.publish(vec![Bytes::from_static(b"t"), big.clone()])
            .await
            .expect("publish");
        hub.publish(frames(&[b"t", b"small"]))
            .await
            .expect("publish");
        if let Ok(Some(m)) = timeout(Duration::from_millis(50), link_rx.recv()).await {
            assert_eq!(m.frames, frames(&[b"t", b"small"]));
            break;
        }
    }
    assert!(link.stats().dropped_oversize >= 1);
    // Outbound: the link refuses to send an oversize message.
    assert_eq!(
        link.try_send(vec![big]),
        Err(hintfed_transport::SendError::Oversize)
    );
    assert!(
        link_to_hub(&link, &mut hub_rx, &[b"ok"], SETUP)
            .await
            .is_some()
    );
}

#[tokio::test]
async fn hub_survives_a_peer_announcing_a_huge_frame() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (hub, mut hub_rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let addr = hub
        .router_endpoint()
        .trim_start_matches("tcp://")
        .to_owned();
    // A ZMTP greeting, then a frame header announcing 1 TiB (unguarded, the zeromq crate
    // tries to reserve that much and aborts the process).
    let mut raw = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    raw.write_all(&zmtp::greeting()).await.expect("greeting");
    raw.write_all(&zmtp::long_frame_header(1 << 40))
        .await
        .expect("header");
    // The hub closes the connection and counts it.
    let mut sink = Vec::new();
    timeout(SETUP, raw.read_to_end(&mut sink))
        .await
        .expect("connection closed by the hub")
        .ok();
    let deadline = Instant::now() + SETUP;
    while hub.stats().dropped_oversize == 0 {
        assert!(Instant::now() < deadline, "oversize not counted");
        tokio::task::yield_now().await;
    }
    // And still serves well-behaved agents.
    let (link, _link_rx) =
        HubLink::connect(HubLinkConfig::new(hub.router_endpoint())).expect("link");
    assert!(link.wait_connected(SETUP).await);
    assert!(
        link_to_hub(&link, &mut hub_rx, &[b"ok"], SETUP)
            .await
            .is_some()
    );
}

#[tokio::test]
async fn hub_refuses_connections_beyond_its_cap() {
    use tokio::io::AsyncReadExt;
    let mut config = HubBindConfig::new("tcp://127.0.0.1:0");
    config.max_connections = 1;
    let (hub, _rx) = HubBind::bind(config).await.expect("bind");
    let addr = hub
        .router_endpoint()
        .trim_start_matches("tcp://")
        .to_owned();
    let _first = tokio::net::TcpStream::connect(&addr).await.expect("first");
    let mut second = tokio::net::TcpStream::connect(&addr).await.expect("second");
    // The second connection is closed without a greeting.
    let mut buf = [0u8; 64];
    let n = timeout(SETUP, second.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(hub.stats().refused_connections, 1);
}

#[tokio::test]
async fn link_recovers_within_2s_after_a_long_hub_outage() {
    let (hub, _rx) = HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind");
    let endpoint = hub.router_endpoint().to_owned();
    let (link, mut link_rx) = HubLink::connect(HubLinkConfig::new(endpoint.clone())).expect("link");
    assert!(link.wait_connected(SETUP).await);
    hub.shutdown().await;
    // Stay down until the backoff has reached its cap (several failed attempts).
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let deadline = Instant::now() + SETUP;
    while link.stats().connect_failures < 5 {
        assert!(Instant::now() < deadline, "link stopped retrying");
        poll.tick().await;
    }
    let (hub, mut hub_rx) = HubBind::bind(HubBindConfig::new(endpoint))
        .await
        .expect("rebind");
    both_ways(&hub, &mut hub_rx, &link, &mut link_rx, RECOVERY).await;
}

#[tokio::test]
async fn what_the_hub_publishes_once_a_link_is_connected_reaches_it() {
    // A snapshot asked as soon as the link is connected must miss nothing published after
    // it: the link is connected only once its subscriptions are in force at the hub. Without
    // periodic heartbeats, only the hub's welcome can connect it.
    let mut config = HubBindConfig::new("tcp://127.0.0.1:0");
    config.heartbeat_interval = None;
    let (hub, _hub_rx) = HubBind::bind(config).await.expect("bind");
    for i in 0..100u8 {
        let (link, mut link_rx) =
            HubLink::connect(HubLinkConfig::new(hub.router_endpoint())).expect("link");
        assert!(link.wait_connected(SETUP).await);
        // Published once, at once: no retry.
        let msg = vec![Bytes::from_static(b"dev.x"), Bytes::from(vec![i])];
        hub.publish(msg.clone()).await.expect("publish");
        let got = timeout(SETUP, link_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("link {i}: the publication after connecting was lost"))
            .expect("inbound open");
        assert_eq!(got.frames, msg);
    }
}
