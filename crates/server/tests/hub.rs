//! The hub in process, driven by fake agents (core `Node` + transport `MultiHub`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{FakeAgent, TestHub, device_of, raw_link};
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{
    Body, DeviceState, Envelope, Epoch, HlcTimestamp, KeyRing, LocalEvent, Presence,
    PresenceStatus, Update, Value,
};
use hintfed_daemon::config::Secret;
use hintfed_transport::Channel;

fn keys() -> KeyRing {
    KeyRing::from_secrets(["test-secret"])
}

fn with_key(mut cfg: hintfed_server::ServerConfig) -> hintfed_server::ServerConfig {
    cfg.federation.shared_keys = vec![Secret::new("test-secret")];
    cfg
}

fn dev(key: &str, s: DeviceState) -> LocalEvent {
    LocalEvent::device(key, s)
}

/// Two hubs side by side; an agent whose links announce its origin is sent none of its own
/// messages back by either, and still gets everyone else's; an agent that announces nothing
/// still gets everything, its own included.
#[tokio::test]
async fn an_agent_that_announces_its_origin_is_not_sent_its_own_messages() {
    let h0 = TestHub::start(with_key(TestHub::config("hub-o0"))).await;
    let h1 = TestHub::start(with_key(TestHub::config("hub-o1"))).await;
    let eps = vec![h0.endpoint(), h1.endpoint()];
    let mut a = FakeAgent::connect_with("pbx-a", &eps, keys(), true).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys()).await;
    let from = |agent: &FakeAgent, hub: usize, origin: &str| {
        agent
            .fanout_origins
            .iter()
            .any(|(h, o)| *h == hub && o == origin)
    };
    // Each waits for the other's messages from both hubs before publishing its own: each hub
    // had queued a's messages (to every subscriber, in order) before b's reached it.
    a.full_sync(vec![dev("PJSIP/100", DeviceState::Inuse)]);
    b.wait("a's messages from both hubs", |b| {
        from(b, 0, "pbx-a") && from(b, 1, "pbx-a")
    })
    .await;
    b.full_sync(vec![dev("PJSIP/200", DeviceState::Busy)]);
    a.wait("b's messages from both hubs", |a| {
        from(a, 0, "pbx-b") && from(a, 1, "pbx-b")
    })
    .await;
    b.wait("its own messages back from both hubs", |b| {
        from(b, 0, "pbx-b") && from(b, 1, "pbx-b")
    })
    .await;
    assert_eq!(device_of(&a, "PJSIP/200", "pbx-b"), Some(DeviceState::Busy));
    assert_eq!(
        device_of(&b, "PJSIP/100", "pbx-a"),
        Some(DeviceState::Inuse)
    );
    let own: Vec<_> = a
        .fanout_origins
        .iter()
        .filter(|(_, o)| o == "pbx-a")
        .collect();
    assert!(own.is_empty(), "pbx-a was sent its own messages: {own:?}");
    // The hubs' own messages still reach it.
    a.wait("the hubs' own messages", |a| {
        from(a, 0, "hub-o0") && from(a, 1, "hub-o1")
    })
    .await;
    h0.stop().await;
    h1.stop().await;
}

#[tokio::test]
async fn updates_fan_out_with_topics_and_the_hub_heartbeats() {
    let hub = TestHub::start(with_key(TestHub::config("hub-t1"))).await;
    let eps = vec![hub.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys()).await;
    // b's subscription must be in place before a publishes (Clone pattern: the snapshot
    // covers what happened before); wait for b's first hub heartbeat on the PUB.
    b.wait("hub heartbeat", |b| {
        b.received.iter().any(|(_, ch, topic, env)| {
            *ch == Channel::Fanout
                && topic == "control"
                && env.origin == "hub-t1"
                && matches!(env.body, Body::Heartbeat { .. })
        })
    })
    .await;
    let mut events = hub.hooks.events.subscribe();
    a.full_sync(vec![dev("PJSIP/100", DeviceState::NotInuse)]);
    a.event(dev("PJSIP/100", DeviceState::Inuse));
    a.event(LocalEvent::presence(
        "CustomPresence:alice",
        Presence::new(PresenceStatus::Dnd, "lunch", "back at 2"),
    ));
    b.wait("a's device and presence", |b| {
        device_of(b, "PJSIP/100", "pbx-a") == Some(DeviceState::Inuse)
            && b.node
                .table()
                .presence("CustomPresence:alice")
                .is_some_and(|p| p.value.message == "back at 2")
    })
    .await;
    let topic_of = |pred: &dyn Fn(&Envelope) -> bool| {
        b.received
            .iter()
            .filter(|(_, ch, _, env)| *ch == Channel::Fanout && pred(env))
            .map(|(_, _, t, _)| t.clone())
            .collect::<Vec<_>>()
    };
    let device_topics = topic_of(&|e| {
        e.origin == "pbx-a" && matches!(&e.body, Body::Update(u) if u.key == "PJSIP/100")
    });
    assert!(!device_topics.is_empty() && device_topics.iter().all(|t| t == "state.device"));
    let presence_topics = topic_of(&|e| {
        e.origin == "pbx-a"
            && matches!(&e.body, Body::Update(u) if u.kind() == hintfed_core::Kind::Presence)
    });
    assert_eq!(presence_topics, vec!["state.presence".to_owned()]);
    let sync_topics =
        topic_of(&|e| matches!(e.body, Body::FullSyncBegin | Body::FullSyncEnd { .. }));
    assert!(
        sync_topics.iter().all(|t| t == "control"),
        "{sync_topics:?}"
    );
    // The hub's view and its metrics follow.
    let view = hub.handle.state_view();
    let row = view
        .devices
        .iter()
        .find(|d| d.key == "PJSIP/100")
        .expect("row");
    assert_eq!(row.aggregate, "INUSE");
    assert_eq!(row.origins.get("pbx-a").map(String::as_str), Some("INUSE"));
    assert_eq!(view.presence[0].status, "dnd");
    let origins = hub.handle.origins_view();
    assert!(origins.iter().any(|o| o.name == "pbx-a" && o.up));
    let metrics = hub.hooks.metrics.encode();
    assert!(
        metrics.contains("hintfed_updates_received_total{kind=\"device\"}"),
        "{metrics}"
    );
    // Live events for the status page: the origin, the device row, the presence row.
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    use hintfed_daemon::http::StatusEvent;
    assert!(
        seen.iter()
            .any(|e| matches!(e, StatusEvent::Origin(o) if o.name == "pbx-a" && o.up)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(
            |e| matches!(e, StatusEvent::Device(d) if d.key == "PJSIP/100" && d.aggregate == "INUSE")
        ),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(
            |e| matches!(e, StatusEvent::Presence(p) if p.status == "dnd" && p.subtype == "lunch")
        ),
        "{seen:?}"
    );
    let stats = hub.handle.stats();
    assert!(stats.forwarded >= 4, "{stats:?}");
    assert_eq!(stats.rejects.values().sum::<u64>(), 0, "{stats:?}");
}

#[tokio::test]
async fn a_late_joiner_gets_every_origins_state_in_chunks() {
    let mut cfg = with_key(TestHub::config("hub-t2"));
    cfg.server.snapshot_chunk = 2;
    let hub = TestHub::start(cfg).await;
    let eps = vec![hub.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys()).await;
    a.full_sync(vec![
        dev("PJSIP/100", DeviceState::Inuse),
        dev("PJSIP/101", DeviceState::Ringing),
        dev("PJSIP/102", DeviceState::NotInuse),
    ]);
    b.full_sync(vec![dev("PJSIP/200", DeviceState::Busy)]);
    b.event(LocalEvent::presence(
        "CustomPresence:bob",
        Presence::new(PresenceStatus::Away, "", "gone fishing"),
    ));
    let h = &hub.handle;
    hub.wait_stats("all updates in", |_| {
        let v = h.state_view();
        v.devices.len() == 4 && v.presence.len() == 1
    })
    .await;
    let served_before = hub.handle.stats().snapshots_served;
    // No more updates from a and b: c can only learn their state from the snapshot.
    let mut c = FakeAgent::connect("pbx-c", &eps, keys()).await;
    c.wait("snapshot with every origin", |c| {
        c.node.snapshot_done()
            && device_of(c, "PJSIP/100", "pbx-a") == Some(DeviceState::Inuse)
            && device_of(c, "PJSIP/101", "pbx-a") == Some(DeviceState::Ringing)
            && device_of(c, "PJSIP/102", "pbx-a") == Some(DeviceState::NotInuse)
            && device_of(c, "PJSIP/200", "pbx-b") == Some(DeviceState::Busy)
            && c.node
                .table()
                .presence("CustomPresence:bob")
                .is_some_and(|p| p.value.message == "gone fishing")
    })
    .await;
    let chunks: Vec<usize> = c
        .received
        .iter()
        .filter(|(_, ch, _, _)| *ch == Channel::Reply)
        .filter_map(|(_, _, t, e)| match &e.body {
            Body::SnapshotChunk {
                entries, origins, ..
            } => {
                assert_eq!(t, "control");
                Some(entries.len() + origins.len())
            }
            _ => None,
        })
        .collect();
    assert!(
        chunks.len() >= 4,
        "5 entries + 2 origins in chunks of 2: {chunks:?}"
    );
    assert!(chunks.iter().all(|n| *n <= 2), "{chunks:?}");
    assert!(hub.handle.stats().snapshots_served > served_before);
    // Updates keep flowing to the late joiner after its snapshot.
    a.event(dev("PJSIP/100", DeviceState::NotInuse));
    c.wait("update after the snapshot", |c| {
        device_of(c, "PJSIP/100", "pbx-a") == Some(DeviceState::NotInuse)
    })
    .await;
    drop(b);
}

#[tokio::test]
async fn a_silent_origin_is_announced_down_and_comes_back() {
    let mut cfg = with_key(TestHub::config("hub-t3"));
    cfg.federation.origin_timeout = Duration::from_millis(1500);
    cfg.server.heartbeat_interval = Duration::from_millis(200);
    let hub = TestHub::start(cfg).await;
    let eps = vec![hub.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys()).await;
    a.full_sync(vec![dev("PJSIP/100", DeviceState::Inuse)]);
    b.full_sync(vec![]);
    b.wait("a's state", |b| {
        device_of(b, "PJSIP/100", "pbx-a") == Some(DeviceState::Inuse)
    })
    .await;
    // a stops speaking (no pumping: no heartbeats); b keeps going.
    b.wait("origin-down notice about pbx-a", |b| {
        b.received.iter().any(|(_, ch, topic, env)| {
            *ch == Channel::Fanout
                && topic == "control"
                && env.origin == "hub-t3"
                && matches!(&env.body, Body::OriginDown { origin, .. } if origin == "pbx-a")
        }) && b.node.origins().is_down("pbx-a")
    })
    .await;
    assert!(hub.handle.stats().origin_down_notices >= 1);
    let view = hub.handle.origins_view();
    let a_view = view.iter().find(|o| o.name == "pbx-a").expect("pbx-a");
    assert!(!a_view.up && a_view.detail.is_some(), "{a_view:?}");
    assert!(view.iter().any(|o| o.name == "pbx-b" && o.up), "{view:?}");
    let row = hub.handle.state_view();
    assert_eq!(row.devices[0].aggregate, "UNAVAILABLE");
    // a speaks again (same epoch): up again everywhere.
    a.pump(Duration::from_millis(10)).await;
    b.wait("pbx-a up again", |b| !b.node.origins().is_down("pbx-a"))
        .await;
    assert!(hub.handle.origins_view().iter().all(|o| o.up));
}

fn update(origin: &str, seq: u64, key: &str) -> Envelope {
    Envelope::new(
        origin,
        Epoch(1),
        seq,
        Body::Update(Update {
            key: key.into(),
            value: Value::Device(DeviceState::Busy),
            ts: HlcTimestamp::ZERO,
        }),
    )
}

#[tokio::test]
async fn hostile_input_is_rejected_counted_and_the_hub_keeps_federating() {
    let hub = TestHub::start(with_key(TestHub::config("hub-t4"))).await;
    let eps = vec![hub.endpoint()];
    let raw = raw_link(&hub.endpoint()).await;
    let l = CoreLimits::default();
    let topic = || Bytes::from_static(b"state.device");
    let valid = Bytes::from(
        keys()
            .seal(&update("mallory", 1, "PJSIP/666"), &l)
            .expect("seal"),
    );
    let unsigned = KeyRing::default()
        .seal(&update("mallory", 2, "PJSIP/666"), &l)
        .expect("seal");
    let forged = KeyRing::from_secrets(["wrong"])
        .seal(&update("mallory", 3, "PJSIP/666"), &l)
        .expect("seal");
    let sends: Vec<Vec<Bytes>> = vec![
        vec![Bytes::from_static(b"\x00\xff garbage")],
        vec![topic(), Bytes::from_static(b"{not json")],
        vec![topic(), Bytes::from_static(br#"{"env":{"v":1}}"#)],
        vec![topic(), Bytes::from(unsigned)],
        vec![topic(), Bytes::from(forged)],
        vec![topic(), topic(), topic(), valid.clone()],
        vec![topic(), valid.clone()],
        vec![topic(), valid.clone()],
    ];
    for frames in sends {
        raw.try_send(frames).expect("queued");
    }
    hub.wait_stats("every hostile message counted", |s| {
        s.rejected("unsigned") >= 2
            && s.rejected("bad_mac") >= 1
            && s.rejected("malformed") >= 3
            && s.rejected("duplicate") >= 1
    })
    .await;
    // An oversize frame: the socket layer drops it (and that connection); counted.
    raw.try_send(vec![topic(), Bytes::from(vec![b'x'; 2 * 1024 * 1024])])
        .expect("queued");
    hub.wait_stats("oversize counted", |s| s.rejected("too_large") >= 1)
        .await;
    let raw = raw_link(&hub.endpoint()).await;
    // A flood of garbage does not stop the hub.
    for i in 0..2000u32 {
        let _ = raw.try_send(vec![topic(), Bytes::from(format!("garbage {i}"))]);
    }
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys()).await;
    b.wait("first heartbeat", |b| {
        b.received
            .iter()
            .any(|(_, ch, _, e)| *ch == Channel::Fanout && e.origin == "hub-t4")
    })
    .await;
    a.full_sync(vec![dev("PJSIP/100", DeviceState::Ringing)]);
    b.wait("federation still works", |b| {
        device_of(b, "PJSIP/100", "pbx-a") == Some(DeviceState::Ringing)
    })
    .await;
    // Nothing forged got in: mallory's stream stops at the one signed message.
    let origins = hub.handle.origins_view();
    let m = origins
        .iter()
        .find(|o| o.name == "mallory")
        .expect("mallory");
    assert_eq!(m.last_seq, 1, "{m:?}");
    let metrics = hub.hooks.metrics.encode();
    for reason in ["unsigned", "bad_mac", "malformed", "too_large", "duplicate"] {
        assert!(
            metrics.contains(&format!("hintfed_rejects_total{{reason=\"{reason}\"}}")),
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test]
async fn a_restarted_hub_rebuilds_its_table_from_the_agents() {
    let first = TestHub::start(with_key(TestHub::config("hub-t5"))).await;
    let endpoint = first.endpoint();
    let eps = vec![endpoint.clone()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    a.full_sync(vec![
        dev("PJSIP/100", DeviceState::Inuse),
        dev("PJSIP/101", DeviceState::Busy),
    ]);
    let h = first.handle.clone();
    first
        .wait_stats("a's state", |_| h.state_view().devices.len() == 2)
        .await;
    first.stop().await;
    // Same endpoint, empty table.
    let mut cfg = with_key(TestHub::config("hub-t5"));
    cfg.server.listen = endpoint;
    let second = TestHub::start(cfg).await;
    assert!(second.handle.state_view().devices.is_empty());
    let h = second.handle.clone();
    let rebuilt = a
        .pump_until(common::WITHIN, |_| {
            let v = h.state_view();
            v.devices.len() == 2
                && v.devices
                    .iter()
                    .any(|d| d.key == "PJSIP/101" && d.aggregate == "BUSY")
        })
        .await;
    assert!(rebuilt, "table not rebuilt: {:?}", second.handle.stats());
    assert!(second.handle.stats().resync_requests >= 1);
}

#[tokio::test]
async fn two_hubs_run_side_by_side_and_losing_one_loses_nothing() {
    let h1 = TestHub::start(with_key(TestHub::config("hub-a"))).await;
    let h2 = TestHub::start(with_key(TestHub::config("hub-b"))).await;
    let eps = vec![h1.endpoint(), h2.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    let mut b = FakeAgent::connect("pbx-b", &eps, keys()).await;
    b.wait("heartbeats of both hubs", |b| {
        ["hub-a", "hub-b"].iter().all(|h| {
            b.received
                .iter()
                .any(|(_, ch, _, e)| *ch == Channel::Fanout && e.origin == *h)
        })
    })
    .await;
    a.full_sync(vec![dev("PJSIP/100", DeviceState::Inuse)]);
    b.wait("a's state", |b| {
        device_of(b, "PJSIP/100", "pbx-a") == Some(DeviceState::Inuse)
    })
    .await;
    // Both hubs forwarded it (b's verifier dropped the second copy).
    h1.wait_stats("hub-a forwarded", |s| s.forwarded >= 2).await;
    h2.wait_stats("hub-b forwarded", |s| s.forwarded >= 2).await;
    h1.stop().await;
    a.event(dev("PJSIP/100", DeviceState::Busy));
    b.wait("update through the surviving hub", |b| {
        device_of(b, "PJSIP/100", "pbx-a") == Some(DeviceState::Busy)
    })
    .await;
    assert!(h2.handle.stats().forwarded >= 2);
}

#[tokio::test]
async fn shared_keys_can_be_replaced_at_run_time() {
    let hub = TestHub::start(with_key(TestHub::config("hub-t6"))).await;
    let raw = raw_link(&hub.endpoint()).await;
    let l = CoreLimits::default();
    let new = KeyRing::from_secrets(["rotated"]);
    let send = |seq: u64| {
        let bytes = new
            .seal(&update("pbx-r", seq, "PJSIP/1"), &l)
            .expect("seal");
        raw.try_send(vec![
            Bytes::from_static(b"state.device"),
            Bytes::from(bytes),
        ])
        .expect("queued");
    };
    send(1);
    hub.wait_stats("unknown key refused", |s| s.rejected("bad_mac") == 1)
        .await;
    // As SIGHUP does: the new key first (it signs), the old one still accepted.
    assert!(
        hub.handle
            .set_keys(KeyRing::from_secrets(["rotated", "test-secret"]))
            .await
    );
    send(2);
    hub.wait_stats("new key accepted", |s| s.accepted == 1)
        .await;
    // Agents still on the old key keep working during the rotation.
    let eps = vec![hub.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    a.full_sync(vec![dev("PJSIP/100", DeviceState::Busy)]);
    let h = hub.handle.clone();
    hub.wait_stats("old-key agent accepted", |_| {
        h.state_view().devices.iter().any(|d| d.key == "PJSIP/100")
    })
    .await;
    assert_eq!(hub.handle.stats().rejected("bad_mac"), 1);
}

#[tokio::test]
async fn a_peer_using_the_hub_name_is_refused() {
    let hub = TestHub::start(with_key(TestHub::config("hub-t7"))).await;
    let raw = raw_link(&hub.endpoint()).await;
    let bytes = keys()
        .seal(&update("hub-t7", 1, "PJSIP/1"), &CoreLimits::default())
        .expect("seal");
    raw.try_send(vec![
        Bytes::from_static(b"state.device"),
        Bytes::from(bytes),
    ])
    .expect("queued");
    hub.wait_stats("counted", |s| s.rejected("origin_is_hub_name") == 1)
        .await;
    assert!(hub.handle.state_view().devices.is_empty());
}
