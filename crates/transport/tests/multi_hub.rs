//! MultiHub: fan-out to every hub, merged inbound stream, request fallback, and the
//! FederationTransport interface, with one hub going away and coming back.

use std::time::Duration;

use bytes::Bytes;
use hintfed_transport::{
    Channel, FederationTransport, HubBind, HubBindConfig, MultiHub, MultiHubConfig, RouterMessage,
    SNAPSHOT_TOPIC,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const RECOVERY: Duration = Duration::from_secs(2);
const SETUP: Duration = Duration::from_secs(10);

async fn hub() -> (HubBind, mpsc::Receiver<RouterMessage>) {
    HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind")
}

async fn wait_count(multi: &MultiHub, n: usize, within: Duration) {
    let mut rx = multi.connected();
    timeout(within, rx.wait_for(|c| *c == n))
        .await
        .unwrap_or_else(|_| panic!("never {n} connected hubs"))
        .expect("open");
}

/// Publishes until `rx` sees the payload.
async fn publish_until_received(
    multi: &MultiHub,
    rx: &mut mpsc::Receiver<RouterMessage>,
    payload: &'static [u8],
    within: Duration,
) -> RouterMessage {
    let deadline = Instant::now() + within;
    loop {
        assert!(Instant::now() < deadline, "hub never received {payload:?}");
        let _ = multi.publish("dev.", Bytes::from_static(payload)).await;
        if let Ok(Some(m)) = timeout(Duration::from_millis(50), rx.recv()).await
            && m.frames[1] == payload
        {
            return m;
        }
    }
}

#[tokio::test]
async fn multi_hub_publishes_everywhere_and_falls_back() {
    let (hub0, mut rx0) = hub().await;
    let (hub1, mut rx1) = hub().await;
    let ep1 = hub1.router_endpoint().to_owned();
    let multi = MultiHub::connect(MultiHubConfig::new([
        hub0.router_endpoint().to_owned(),
        ep1.clone(),
    ]))
    .expect("multi");
    let mut incoming = multi.take_incoming().expect("first take");
    assert!(multi.take_incoming().is_none());
    wait_count(&multi, 2, SETUP).await;
    assert!(*multi.link_ups().borrow() >= 2);

    // publish reaches both hubs as [topic, payload].
    let m0 = publish_until_received(&multi, &mut rx0, b"u1", SETUP).await;
    assert_eq!(
        m0.frames,
        vec![Bytes::from_static(b"dev."), Bytes::from_static(b"u1")]
    );
    publish_until_received(&multi, &mut rx1, b"u1", SETUP).await;

    // Merged inbound stream, tagged by hub index.
    let deadline = Instant::now() + SETUP;
    let mut seen = [false, false];
    while seen != [true, true] {
        assert!(
            Instant::now() < deadline,
            "fan-out from both hubs: {seen:?}"
        );
        hub0.publish(vec![Bytes::from_static(b"dev.a"), Bytes::from_static(b"x")])
            .await
            .expect("pub");
        hub1.publish(vec![Bytes::from_static(b"dev.b"), Bytes::from_static(b"y")])
            .await
            .expect("pub");
        if let Ok(Some(m)) = timeout(Duration::from_millis(50), incoming.recv()).await {
            assert_eq!(m.channel, Channel::Fanout);
            let expected = if m.hub == 0 {
                &b"dev.a"[..]
            } else {
                &b"dev.b"[..]
            };
            assert_eq!(m.frames[0], expected);
            seen[m.hub] = true;
        }
    }

    // Snapshot request goes to one hub; with hub 0 excluded it goes to hub 1.
    let chosen = multi
        .request_snapshot(Bytes::from_static(b"since-0"), &[0])
        .await
        .expect("request");
    assert_eq!(chosen, 1);
    let req = loop {
        let m = timeout(SETUP, rx1.recv())
            .await
            .expect("request arrives")
            .expect("open");
        if m.frames[0] == SNAPSHOT_TOPIC.as_bytes() {
            break m;
        }
    };
    assert_eq!(req.frames[1], Bytes::from_static(b"since-0"));
    hub1.reply(req.identity, vec![Bytes::from_static(b"chunk")])
        .await
        .expect("reply");
    let reply = loop {
        let m = timeout(SETUP, incoming.recv())
            .await
            .expect("reply")
            .expect("open");
        if m.channel == Channel::Reply {
            break m;
        }
    };
    assert_eq!(
        (reply.hub, reply.frames),
        (1, vec![Bytes::from_static(b"chunk")])
    );

    // Hub 1 goes away: requests fall back to hub 0, publishing still reaches hub 0.
    hub1.shutdown().await;
    wait_count(&multi, 1, SETUP).await;
    assert_eq!(
        multi
            .request_snapshot(Bytes::from_static(b"s"), &[])
            .await
            .expect("fallback"),
        0
    );
    assert!(
        multi
            .request_snapshot(Bytes::from_static(b"s"), &[0])
            .await
            .is_err()
    );
    publish_until_received(&multi, &mut rx0, b"u2", SETUP).await;

    // Hub 1 comes back on the same ports: both connected again within 2 s.
    let (_hub1, mut rx1) = HubBind::bind(HubBindConfig::new(ep1))
        .await
        .expect("rebind");
    wait_count(&multi, 2, RECOVERY).await;
    publish_until_received(&multi, &mut rx1, b"u3", RECOVERY).await;
    // Two first connections plus hub 1's reconnection.
    assert!(*multi.link_ups().borrow() >= 3);
    assert_eq!(multi.links()[1].stats().reconnects, 1);
}

#[tokio::test]
async fn multi_hub_rejects_empty_config_and_reports_not_connected() {
    assert!(MultiHub::connect(MultiHubConfig::new(Vec::<String>::new())).is_err());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let multi =
        MultiHub::connect(MultiHubConfig::new([format!("tcp://127.0.0.1:{port}")])).expect("multi");
    assert_eq!(multi.connected_count(), 0);
    assert!(
        multi
            .publish("dev.", Bytes::from_static(b"x"))
            .await
            .is_err()
    );
    assert!(multi.links()[0].stats().dropped_outbound >= 1);
}
