//! Unit-level tests of the [`Node`] and [`Hub`] state machines, driven by hand.

use hintfed_core::envelope::Envelope;
use hintfed_core::{
    Action, ApplyCmd, Body, DeviceState, Epoch, HlcTimestamp, Hub, HubAction, HubConfig, Ingest,
    KeyRing, Limits, LocalEvent, Millis, NO_TAG, Node, NodeConfig, Policy, PolicyConfig, Presence,
    PresenceStatus, Role, Update, Value, open,
};

fn publishes(actions: &[Action]) -> Vec<&Envelope> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn updates(actions: &[Action]) -> Vec<&Update> {
    publishes(actions)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::Update(u) => Some(u),
            _ => None,
        })
        .collect()
}

fn applies(actions: &[Action]) -> Vec<&ApplyCmd> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn cfg(name: &str) -> NodeConfig {
    let mut c = NodeConfig::new(name);
    c.snapshots = false;
    c
}

/// A node that synced an empty local state.
fn synced(name: &str) -> Node {
    let mut n = Node::new(cfg(name), Epoch(1), Millis(0));
    n.on_local_full_sync(Millis(0), Vec::new());
    n.take_actions();
    n
}

fn up(origin: &str, epoch: u64, seq: u64, key: &str, v: DeviceState) -> Envelope {
    update(origin, epoch, seq, key, Value::Device(v), seq)
}

/// An update of `origin` whose timestamp is `wall` ms.
fn update(origin: &str, epoch: u64, seq: u64, key: &str, value: Value, wall: u64) -> Envelope {
    Envelope::new(
        origin,
        Epoch(epoch),
        seq,
        Body::Update(Update {
            key: key.into(),
            value,
            ts: HlcTimestamp { wall, counter: 0 },
        }),
    )
}

#[test]
fn local_changes_are_published_once_and_filtered_by_policy() {
    let mut n = synced("pbx-a");
    for _ in 0..2 {
        // Real Asterisk emits every change twice.
        n.on_local_event(
            Millis(1),
            LocalEvent::device("PJSIP/100", DeviceState::Inuse),
        );
    }
    n.on_local_event(
        Millis(1),
        LocalEvent::device("Custom:foo", DeviceState::Inuse),
    );
    let a = n.take_actions();
    let u = updates(&a);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].key, "PJSIP/100");
    assert_eq!(n.stats().suppressed, 1);
    assert_eq!(n.stats().filtered, 1);
    let e = publishes(&a)[0];
    assert_eq!(
        (e.origin.as_str(), e.epoch, e.seq),
        ("pbx-a", Epoch(1), 3),
        "after begin+end"
    );

    // never_send.
    let mut c = cfg("pbx-a");
    c.policy = Policy::new(PolicyConfig {
        never_send: vec![DeviceState::Unknown],
        ..PolicyConfig::default()
    })
    .unwrap();
    let mut n = Node::new(c, Epoch(1), Millis(0));
    n.on_local_full_sync(
        Millis(0),
        vec![LocalEvent::device("PJSIP/1", DeviceState::Unknown)],
    );
    assert!(updates(&n.take_actions()).is_empty());
}

#[test]
fn remote_states_are_aggregated_mapped_and_applied_never_own() {
    let mut n = synced("pbx-a");
    n.on_remote(
        Millis(1),
        &up("pbx-b", 1, 1, "PJSIP/1", DeviceState::Ringing),
    );
    n.on_remote(
        Millis(1),
        &up("pbx-c", 1, 1, "PJSIP/1", DeviceState::Onhold),
    );
    n.on_remote(
        Millis(1),
        &up("pbx-b", 1, 2, "PJSIP/2", DeviceState::Unknown),
    );
    n.on_remote(Millis(1), &up("pbx-a", 1, 9, "PJSIP/3", DeviceState::Busy));
    let a = n.take_actions();
    let ap = applies(&a);
    // PJSIP/1 was first applied as RINGING, then (pipelined, conflated while in flight)
    // RINGINUSE waits for the first write.
    let mut variable = "left from an earlier write".to_owned();
    ap[0].variable_into(&mut variable);
    assert_eq!(variable, "DEVICE_STATE(Custom:PJSIP/1)");
    assert_eq!(ap[0].setvar_value(), "RINGING");
    assert!(
        ap.iter()
            .any(|c| c.target == "Custom:PJSIP/2" && c.setvar_value() == "NOT_INUSE")
    );
    assert!(
        !ap.iter().any(|c| c.target.contains("PJSIP/3")),
        "own origin never applied"
    );
    n.on_apply_result(Millis(2), ap[0].id, true);
    let a = n.take_actions();
    assert_eq!(applies(&a)[0].setvar_value(), "RINGINUSE");
    assert_eq!(n.remote_value("PJSIP/1"), Some(DeviceState::Ringinuse));
    // Echo of our own write is swallowed (here with Custom: included by policy it would
    // otherwise be published).
    let mut c = cfg("pbx-x");
    c.policy = Policy::new(PolicyConfig {
        exclude: vec![],
        ..PolicyConfig::default()
    })
    .unwrap();
    let mut x = Node::new(c, Epoch(1), Millis(0));
    x.on_local_full_sync(Millis(0), vec![]);
    x.take_actions();
    x.on_remote(Millis(1), &up("pbx-b", 1, 1, "PJSIP/1", DeviceState::Busy));
    let w = applies(&x.take_actions())
        .iter()
        .map(|c| c.id)
        .collect::<Vec<_>>();
    assert_eq!(w.len(), 1);
    x.on_apply_result(Millis(2), w[0], true);
    x.on_local_event(
        Millis(3),
        LocalEvent::device("Custom:PJSIP/1", DeviceState::Busy),
    );
    x.on_local_event(
        Millis(3),
        LocalEvent::device("Custom:PJSIP/1", DeviceState::Busy),
    );
    assert!(updates(&x.take_actions()).is_empty());
    assert_eq!(x.stats().echoes, 2);
}

#[test]
fn apply_window_bounds_outstanding_writes() {
    let mut c = cfg("pbx-a");
    c.apply.in_flight = 3;
    let mut n = Node::new(c, Epoch(1), Millis(0));
    n.on_local_full_sync(Millis(0), vec![]);
    for i in 0..10u64 {
        n.on_remote(
            Millis(1),
            &up("pbx-b", 1, i + 1, &format!("PJSIP/{i}"), DeviceState::Inuse),
        );
    }
    let first = n.take_actions();
    assert_eq!(applies(&first).len(), 3);
    n.on_apply_result(Millis(2), applies(&first)[0].id, true);
    assert_eq!(applies(&n.take_actions()).len(), 1);
    // A batch of answers refills the window once: as many new writes as answers, the failed
    // one counted (and not written again until its value changes).
    let done = &applies(&first)[1..];
    let errors = n.stats().apply_errors;
    n.on_apply_results(Millis(3), [(done[0].id, true), (done[1].id, false)]);
    let next = n.take_actions();
    assert_eq!(applies(&next).len(), 2);
    assert!(
        applies(&next)
            .iter()
            .all(|c| done.iter().all(|d| d.target != c.target))
    );
    assert_eq!(n.stats().apply_errors, errors + 1);
}

/// The answer of a write made to an Asterisk since lost (a `Setvar` that failed or timed out
/// afterwards) completes nothing: not the write of the same target to the new connection.
#[test]
fn an_answer_of_a_write_from_before_a_loss_is_ignored() {
    let mut b = synced("pbx-b");
    b.on_remote(Millis(1), &up("pbx-a", 1, 1, "PJSIP/1", DeviceState::Inuse));
    let old = b.take_actions();
    let old = applies(&old)[0].id;
    b.on_local_lost(Millis(2));
    b.on_local_restored(Millis(3));
    b.on_local_full_sync(Millis(3), Vec::new());
    let new = b.take_actions();
    let new = applies(&new);
    assert_eq!(new.len(), 1, "written again to the new connection");
    assert_eq!(new[0].target, "Custom:PJSIP/1");
    let errors = b.stats().apply_errors;
    b.on_apply_result(Millis(4), old, false);
    assert_eq!(b.stats().apply_errors, errors, "not counted");
    assert_eq!(
        b.apply_queue().in_flight_len(),
        1,
        "the new write still flies"
    );
    b.on_apply_result(Millis(5), new[0].id, true);
    assert_eq!(
        b.apply_queue().held("Custom:PJSIP/1"),
        Some(&Value::Device(DeviceState::Inuse))
    );
}

/// The writes `n` asks for, as `(target, value)`, each reported done.
fn write_all(n: &mut Node, now: Millis) -> Vec<(String, String)> {
    let actions = n.take_actions();
    let writes = applies(&actions);
    for w in &writes {
        n.on_apply_result(now, w.id, true);
    }
    writes
        .iter()
        .map(|w| (w.target.to_string(), w.setvar_value().into_owned()))
        .collect()
}

/// A node keeps the apply queue's id of a key's target in the key's table entry (its tag):
/// ids handed out before the queue was cleared name other targets after it, and a key
/// dropped from the table and reported again has none; every write still goes to its
/// key's target.
#[test]
fn target_ids_kept_in_the_table_survive_a_clear_and_a_key_dropped() {
    let mut b = synced("pbx-b");
    let w = |t: &str, v: &str| (format!("Custom:PJSIP/{t}"), v.to_owned());
    b.on_remote(Millis(1), &up("pbx-a", 1, 1, "PJSIP/2", DeviceState::Inuse));
    b.on_remote(Millis(1), &up("pbx-a", 1, 2, "PJSIP/1", DeviceState::Inuse));
    assert_eq!(
        write_all(&mut b, Millis(1)),
        [w("2", "INUSE"), w("1", "INUSE")]
    );
    let tag = |b: &Node, k: &str| b.table().device_tag(k).expect("in the table");
    let (t1, t2) = (tag(&b, "PJSIP/1"), tag(&b, "PJSIP/2"));
    assert!(t1 != NO_TAG && t2 != NO_TAG && t1 != t2, "{t1} {t2}");
    // Cleared; the pass writes in key order, so PJSIP/1 now has the id PJSIP/2 had.
    b.on_local_lost(Millis(2));
    b.take_actions();
    b.on_local_restored(Millis(3));
    b.on_local_full_sync(Millis(3), Vec::new());
    assert_eq!(
        write_all(&mut b, Millis(3)),
        [w("1", "INUSE"), w("2", "INUSE")]
    );
    assert_eq!((tag(&b, "PJSIP/1"), tag(&b, "PJSIP/2")), (t2, t1));
    b.on_remote(Millis(4), &up("pbx-a", 1, 3, "PJSIP/2", DeviceState::Busy));
    b.on_remote(
        Millis(4),
        &up("pbx-a", 1, 4, "PJSIP/1", DeviceState::Ringing),
    );
    assert_eq!(
        write_all(&mut b, Millis(4)),
        [w("2", "BUSY"), w("1", "RINGING")]
    );
    // PJSIP/1 dropped by a full sync of pbx-a (withdrawn), then reported again.
    b.on_remote(
        Millis(5),
        &Envelope::new("pbx-a", Epoch(1), 5, Body::FullSyncBegin),
    );
    b.on_remote(Millis(5), &up("pbx-a", 1, 6, "PJSIP/2", DeviceState::Busy));
    let end = Body::FullSyncEnd { begin_seq: 5 };
    b.on_remote(Millis(5), &Envelope::new("pbx-a", Epoch(1), 7, end));
    assert_eq!(b.table().device_tag("PJSIP/1"), None);
    assert_eq!(write_all(&mut b, Millis(5)), [w("1", "INVALID")]);
    b.on_remote(Millis(6), &up("pbx-a", 1, 8, "PJSIP/1", DeviceState::Inuse));
    assert_eq!(write_all(&mut b, Millis(6)), [w("1", "INUSE")]);
    assert_eq!(
        tag(&b, "PJSIP/1"),
        t2,
        "its target's id, found by name again"
    );
    b.on_remote(Millis(7), &up("pbx-a", 1, 9, "PJSIP/1", DeviceState::Busy));
    assert_eq!(write_all(&mut b, Millis(7)), [w("1", "BUSY")]);
}

#[test]
fn lost_asterisk_announces_down_and_restore_starts_a_new_epoch() {
    let mut a = synced("pbx-a");
    let mut b = synced("pbx-b");
    a.on_local_event(Millis(1), LocalEvent::device("PJSIP/1", DeviceState::Inuse));
    for e in publishes(&a.take_actions()) {
        b.on_remote(Millis(1), e);
    }
    let w = b.take_actions();
    assert_eq!(applies(&w)[0].setvar_value(), "INUSE");
    b.on_apply_result(Millis(1), applies(&w)[0].id, true);
    a.on_local_lost(Millis(5));
    let lost = a.take_actions();
    assert!(matches!(publishes(&lost)[0].body, Body::OriginDown { .. }));
    for e in publishes(&lost) {
        b.on_remote(Millis(5), e);
    }
    let w = b.take_actions();
    assert_eq!(applies(&w)[0].setvar_value(), "UNAVAILABLE");
    b.on_apply_result(Millis(5), applies(&w)[0].id, true);
    // Events while lost are ignored.
    a.on_local_event(Millis(6), LocalEvent::device("PJSIP/1", DeviceState::Busy));
    assert!(a.take_actions().is_empty());
    a.on_local_restored(Millis(100));
    assert_eq!(a.epoch(), Epoch(100));
    a.on_local_full_sync(
        Millis(100),
        vec![LocalEvent::device("PJSIP/1", DeviceState::NotInuse)],
    );
    let sync = a.take_actions();
    assert!(publishes(&sync).iter().all(|e| e.epoch == Epoch(100)));
    for (i, e) in publishes(&sync).iter().enumerate() {
        b.on_remote(Millis(100), e);
        if i + 1 < publishes(&sync).len() {
            // Before the end of the full sync the origin stays down: no flicker.
            assert!(applies(&b.take_actions()).is_empty());
        }
    }
    assert_eq!(applies(&b.take_actions())[0].setvar_value(), "NOT_INUSE");
}

#[test]
fn silent_origin_goes_down_after_the_timeout_and_returns() {
    let mut b = synced("pbx-b");
    b.on_remote(Millis(0), &up("pbx-a", 1, 1, "PJSIP/1", DeviceState::Inuse));
    let w = b.take_actions();
    b.on_apply_result(Millis(0), applies(&w)[0].id, true);
    b.tick(Millis(15_000));
    assert!(applies(&b.take_actions()).is_empty());
    b.tick(Millis(15_001));
    let w = b.take_actions();
    assert_eq!(applies(&w)[0].setvar_value(), "UNAVAILABLE");
    b.on_apply_result(Millis(15_001), applies(&w)[0].id, true);
    b.on_remote(
        Millis(16_000),
        &Envelope::new("pbx-a", Epoch(1), 2, Body::Heartbeat { local_down: false }),
    );
    assert_eq!(applies(&b.take_actions())[0].setvar_value(), "INUSE");
}

#[test]
fn gap_requests_snapshot_and_snapshot_merges_from_every_hub() {
    let mut c = NodeConfig::new("pbx-a");
    c.gap_grace_ms = 100;
    c.snapshot_retry_ms = 1_000;
    let mut n = Node::new(c, Epoch(1), Millis(0));
    let start = n.take_actions();
    let Some(Action::Request(req)) = start.first() else {
        panic!("snapshot requested at start: {start:?}")
    };
    let Body::SnapshotRequest { request_id } = req.body else {
        panic!()
    };
    n.on_local_full_sync(Millis(0), vec![]);
    n.take_actions();
    // A hub answers with one chunk and the end.
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(1), Millis(0));
    assert_eq!(
        hub.on_envelope(Millis(0), &up("pbx-b", 1, 1, "PJSIP/9", DeviceState::Busy)),
        Ingest::Forward
    );
    hub.take_actions();
    hub.on_envelope(Millis(0), req);
    for a in hub.take_actions() {
        let HubAction::SendTo { to, envelope } = a else {
            panic!()
        };
        assert_eq!(to, "pbx-a");
        n.on_remote(Millis(1), &envelope);
    }
    assert!(n.snapshot_done());
    assert_eq!(applies(&n.take_actions())[0].target, "Custom:PJSIP/9");
    assert_ne!(request_id, 0);
    // pbx-b's seq 2 is lost, 3 arrives: a gap, a new snapshot after the grace period.
    n.on_remote(
        Millis(2_000),
        &up("pbx-b", 1, 3, "PJSIP/9", DeviceState::Inuse),
    );
    n.take_actions();
    n.tick(Millis(2_050));
    assert!(
        !n.take_actions()
            .iter()
            .any(|a| matches!(a, Action::Request(_)))
    );
    n.tick(Millis(2_200));
    assert!(
        n.take_actions()
            .iter()
            .any(|a| matches!(a, Action::Request(_)))
    );
    assert_eq!(n.stats().gaps, 1);
}

/// An origin announces itself down at its first start (its Asterisk not answering yet),
/// then syncs. A node whose snapshot was answered between the two and which missed the full
/// sync's end used to hold the origin down (its phones UNAVAILABLE) until its next snapshot,
/// at most one per `snapshot_retry_ms` (5 s): its first heartbeat saying it is up lifts it.
#[test]
fn a_missed_first_full_sync_end_does_not_hold_the_origin_down() {
    let mut n = Node::new(NodeConfig::new("pbx-a"), Epoch(1), Millis(0));
    let start = n.take_actions();
    let Some(Action::Request(req)) = start.first() else {
        panic!("snapshot requested at start: {start:?}")
    };
    let req = req.clone();
    n.on_local_full_sync(Millis(0), vec![]);
    n.take_actions();
    let beat = |seq, local_down| {
        Envelope::new(
            "pbx-b".to_owned(),
            Epoch(1),
            seq,
            Body::Heartbeat { local_down },
        )
    };
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(1), Millis(0));
    hub.on_envelope(Millis(0), &beat(1, true));
    hub.on_envelope(Millis(0), &req);
    for a in hub.take_actions() {
        if let HubAction::SendTo { envelope, .. } = a {
            n.on_remote(Millis(1), &envelope);
        }
    }
    assert!(n.snapshot_done());
    assert!(n.origins().is_down("pbx-b"), "announced down");
    // pbx-b's full sync (seq 2..4) is lost here; its heartbeat at 5 says it is up.
    n.on_remote(Millis(1_000), &beat(5, false));
    assert!(!n.origins().is_down("pbx-b"));
    // The gap it left still brings a snapshot (its values), once the retry period allows.
    n.tick(Millis(5_000));
    assert!(
        n.take_actions()
            .iter()
            .any(|a| matches!(a, Action::Request(_)))
    );
}

#[test]
fn snapshot_with_a_lost_chunk_is_asked_again_and_stale_answers_are_rejected() {
    let mut c = NodeConfig::new("pbx-a");
    c.snapshot_retry_ms = 1_000;
    let mut n = Node::new(c, Epoch(1), Millis(0));
    let Some(Action::Request(req)) = n.take_actions().into_iter().next() else {
        panic!()
    };
    let mut cfg = HubConfig::new("hub-1");
    cfg.chunk_max_entries = 2;
    let mut hub = Hub::new(cfg, Epoch(1), Millis(0));
    for i in 1..=5 {
        hub.on_envelope(
            Millis(0),
            &up("pbx-b", 1, i, &format!("PJSIP/{i}"), DeviceState::Busy),
        );
    }
    hub.take_actions();
    hub.on_envelope(Millis(0), &req);
    let answer: Vec<Envelope> = hub
        .take_actions()
        .into_iter()
        .map(|a| match a {
            HubAction::SendTo { envelope, .. } => envelope,
            HubAction::Publish(_) => panic!(),
        })
        .collect();
    assert!(answer.len() >= 4, "several chunks and an end");
    for (i, e) in answer.iter().enumerate() {
        if i != 1 {
            n.on_remote(Millis(1), e);
        }
    }
    assert!(!n.snapshot_done());
    n.tick(Millis(1_001));
    let retry = n.take_actions();
    assert!(retry.iter().any(|a| matches!(a, Action::Request(_))));
    // The old answer is now stale.
    n.on_remote(Millis(1_002), &answer[1]);
    assert_eq!(n.stats().snapshot_rejected, 1);
}

#[test]
fn presence_last_writer_wins_and_listing_does_not_override_newer_remote_writes() {
    let mut a = synced("pbx-a");
    let p = |s| Presence::new(s, "x,y", "ü");
    let remote = Envelope::new(
        "pbx-b",
        Epoch(1),
        1,
        Body::Update(Update {
            key: "CustomPresence:alice".into(),
            value: Value::Presence(p(PresenceStatus::Dnd)),
            ts: HlcTimestamp {
                wall: 50,
                counter: 0,
            },
        }),
    );
    a.on_remote(Millis(10), &remote);
    let ap = a.take_actions();
    let mut variable = String::new();
    applies(&ap)[0].variable_into(&mut variable);
    assert_eq!(variable, "PRESENCE_STATE(CustomPresence:alice)");
    assert!(applies(&ap)[0].setvar_value().ends_with(",e"));
    a.on_apply_result(Millis(10), applies(&ap)[0].id, true);
    // Echo swallowed.
    a.on_local_event(
        Millis(11),
        LocalEvent::presence("CustomPresence:alice", p(PresenceStatus::Dnd)),
    );
    assert!(updates(&a.take_actions()).is_empty());
    // A reconnect lists an older value: the remote winner is re-applied, nothing published.
    a.on_local_lost(Millis(20));
    a.on_local_restored(Millis(30));
    a.on_local_full_sync(
        Millis(30),
        vec![LocalEvent::presence(
            "CustomPresence:alice",
            p(PresenceStatus::Away),
        )],
    );
    let acts = a.take_actions();
    assert!(updates(&acts).is_empty());
    assert_eq!(
        applies(&acts)[0].value,
        Value::Presence(p(PresenceStatus::Dnd))
    );
    // A real local change afterwards wins (HLC after the observed remote write).
    a.on_apply_result(Millis(31), applies(&acts)[0].id, true);
    a.on_local_event(
        Millis(40),
        LocalEvent::presence("CustomPresence:alice", p(PresenceStatus::Chat)),
    );
    let u = a.take_actions();
    let u = updates(&u);
    assert_eq!(u.len(), 1);
    assert!(
        u[0].ts
            > HlcTimestamp {
                wall: 50,
                counter: 0
            }
    );
}

#[test]
fn restarted_agent_queries_devices_it_published_before() {
    let mut c = NodeConfig::new("pbx-a");
    c.snapshot_retry_ms = 1_000;
    let mut n = Node::new(c, Epoch(500), Millis(500));
    let Some(Action::Request(req)) = n.take_actions().into_iter().next() else {
        panic!()
    };
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(1), Millis(0));
    // The previous incarnation published two devices.
    hub.on_envelope(Millis(0), &up("pbx-a", 1, 1, "PJSIP/1", DeviceState::Inuse));
    hub.on_envelope(Millis(0), &up("pbx-a", 1, 2, "PJSIP/2", DeviceState::Busy));
    hub.take_actions();
    n.on_local_full_sync(
        Millis(500),
        vec![LocalEvent::device("PJSIP/1", DeviceState::NotInuse)],
    );
    n.take_actions();
    hub.on_envelope(Millis(500), &req);
    for a in hub.take_actions() {
        if let HubAction::SendTo { envelope, .. } = a {
            n.on_remote(Millis(501), &envelope);
        }
    }
    let acts = n.take_actions();
    assert!(
        acts.contains(&Action::QueryLocal(vec!["PJSIP/2".to_owned()])),
        "{acts:?}"
    );
}

#[test]
fn hub_dedupes_forwards_and_resyncs() {
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(7), Millis(0));
    let e = up("pbx-a", 1, 1, "PJSIP/1", DeviceState::Inuse);
    assert_eq!(hub.on_envelope(Millis(0), &e), Ingest::Forward);
    assert_eq!(hub.on_envelope(Millis(0), &e), Ingest::Duplicate);
    assert_eq!(
        hub.on_envelope(Millis(0), &up("pbx-a", 0, 5, "x", DeviceState::Inuse)),
        Ingest::Stale
    );
    assert_eq!(
        hub.on_envelope(
            Millis(0),
            &Envelope::new("hub-1", Epoch(1), 1, Body::Heartbeat { local_down: false })
        ),
        Ingest::Ignored
    );
    // An agent the hub never heard of, already at seq 40 (the hub restarted): resync.
    let hello = Envelope::new(
        "pbx-b",
        Epoch(3),
        40,
        Body::Hello {
            role: Role::Agent,
            software: "t".into(),
        },
    );
    assert_eq!(hub.on_envelope(Millis(1), &hello), Ingest::Handled);
    let acts = hub.take_actions();
    assert!(acts.iter().any(|a| matches!(a, HubAction::SendTo { to, envelope } if to == "pbx-b" && matches!(envelope.body, Body::ResyncRequest { .. }))));
    // A gap in pbx-a's stream: resync after the grace period.
    hub.on_envelope(Millis(10), &up("pbx-a", 1, 3, "PJSIP/1", DeviceState::Busy));
    hub.tick(Millis(1_000));
    let acts = hub.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, HubAction::SendTo { to, .. } if to == "pbx-a"))
    );
    assert!(
        acts.iter().any(
            |a| matches!(a, HubAction::Publish(e) if matches!(e.body, Body::Heartbeat { .. }))
        )
    );
    // The republished full sync closes the gap: no more requests.
    hub.on_envelope(
        Millis(1_001),
        &Envelope::new("pbx-a", Epoch(1), 4, Body::FullSyncBegin),
    );
    hub.on_envelope(
        Millis(1_001),
        &up("pbx-a", 1, 5, "PJSIP/1", DeviceState::Busy),
    );
    hub.on_envelope(
        Millis(1_001),
        &Envelope::new("pbx-a", Epoch(1), 6, Body::FullSyncEnd { begin_seq: 4 }),
    );
    hub.tick(Millis(10_000));
    assert!(
        !hub.take_actions()
            .iter()
            .any(|a| matches!(a, HubAction::SendTo { .. }))
    );
}

#[test]
fn hub_announces_silent_origins_down() {
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(7), Millis(0));
    hub.on_envelope(Millis(0), &up("pbx-a", 1, 1, "PJSIP/1", DeviceState::Inuse));
    hub.tick(Millis(15_001));
    let acts = hub.take_actions();
    let down: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            HubAction::Publish(e) => match &e.body {
                Body::OriginDown {
                    origin, last_seq, ..
                } => Some((origin.clone(), *last_seq, e.origin.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(down, vec![("pbx-a".to_owned(), 1, "hub-1".to_owned())]);
    assert!(hub.origins().is_down("pbx-a"));
}

#[test]
fn snapshot_chunks_are_bounded_and_fit_the_wire_limit() {
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(7), Millis(0));
    let big = "x".repeat(500);
    for i in 1..=400u64 {
        let env = Envelope::new(
            "pbx-a",
            Epoch(1),
            i,
            Body::Update(Update {
                key: format!("PJSIP/{i}{}", &big[..200]),
                value: Value::Presence(Presence::new(
                    PresenceStatus::Dnd,
                    big.clone(),
                    big.clone(),
                )),
                ts: HlcTimestamp::ZERO,
            }),
        );
        hub.on_envelope(Millis(0), &env);
    }
    hub.take_actions();
    hub.on_envelope(
        Millis(0),
        &Envelope::new(
            "pbx-b",
            Epoch(1),
            0,
            Body::SnapshotRequest { request_id: 9 },
        ),
    );
    let keys = KeyRing::from_secrets(["s"]);
    let limits = Limits::default();
    let mut chunks = 0;
    for a in hub.take_actions() {
        let HubAction::SendTo { envelope, .. } = a else {
            panic!()
        };
        let bytes = keys
            .seal(&envelope, &limits)
            .expect("every chunk fits the limit");
        assert!(bytes.len() <= limits.max_message_bytes);
        assert_eq!(open(&bytes, &keys, &limits).unwrap(), envelope);
        if let Body::SnapshotChunk { entries, .. } = &envelope.body {
            chunks += 1;
            assert!(!entries.is_empty() || chunks > 1);
        }
        if let Body::SnapshotEnd { chunks: n, .. } = envelope.body {
            assert_eq!(n, chunks);
        }
    }
    assert!(chunks > 1);
}

#[test]
fn broker_style_relays_share_state_in_process() {
    // One Node per Asterisk, snapshots off, each one's publishes delivered to the others.
    let mut relays: Vec<Node> = ["console-1", "console-2", "console-3"]
        .iter()
        .map(|n| Node::new(cfg(n), Epoch(1), Millis(0)))
        .collect();
    let mut pending: Vec<(usize, Envelope)> = Vec::new();
    for (i, r) in relays.iter_mut().enumerate() {
        r.on_local_full_sync(Millis(0), vec![]);
        pending.extend(
            publishes(&r.take_actions())
                .into_iter()
                .map(|e| (i, e.clone())),
        );
    }
    relays[0].on_local_event(
        Millis(1),
        LocalEvent::device("SIP/100", DeviceState::Ringing),
    );
    pending.extend(
        publishes(&relays[0].take_actions())
            .into_iter()
            .map(|e| (0, e.clone())),
    );
    let mut written = Vec::new();
    while let Some((from, e)) = pending.pop() {
        for (j, r) in relays.iter_mut().enumerate() {
            if j != from {
                r.on_remote(Millis(2), &e);
                for c in applies(&r.take_actions()) {
                    written.push((j, c.target.to_string(), c.setvar_value().into_owned()));
                }
            }
        }
    }
    written.sort();
    assert_eq!(
        written,
        vec![
            (1, "Custom:SIP/100".to_owned(), "RINGING".to_owned()),
            (2, "Custom:SIP/100".to_owned(), "RINGING".to_owned())
        ]
    );
}

/// Events and action responses travel apart: the echo of an earlier write read after a later
/// write was confirmed must not make the node believe Asterisk holds the earlier value (it
/// would then skip writing that value when it is due again).
#[test]
fn a_late_echo_of_an_earlier_write_does_not_hide_the_later_one() {
    let mut n = synced("pbx-a");
    let target = "Custom:PJSIP/1";
    let write = |n: &mut Node, seq: u64, v: DeviceState| {
        n.on_remote(Millis(seq), &up("pbx-b", 1, seq, "PJSIP/1", v));
        let a = n.take_actions();
        let w = applies(&a);
        assert_eq!(w.len(), 1, "one write of {v:?}");
        assert_eq!(w[0].value, Value::Device(v));
        n.on_apply_result(Millis(seq), w[0].id, true);
    };
    write(&mut n, 1, DeviceState::Inuse);
    write(&mut n, 2, DeviceState::Ringing);
    // The first write's echoes arrive only now (twice, as Asterisk emits them); the
    // second's are still on their way.
    for _ in 0..2 {
        n.on_local_event(Millis(3), LocalEvent::device(target, DeviceState::Inuse));
    }
    assert_eq!(
        n.apply_queue().held(target),
        Some(&Value::Device(DeviceState::Ringing))
    );
    // INUSE is due again: it is written, since Asterisk holds RINGING.
    write(&mut n, 4, DeviceState::Inuse);
}

/// A new node gets a large snapshot: it holds every key once the answer completes, its apply
/// queue never holds the whole table at once, and every key is still written exactly once
/// as the writes complete.
#[test]
fn large_snapshot_completes_first_then_every_key_is_written_in_batches() {
    const KEYS: u64 = 10_000;
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(7), Millis(0));
    for i in 1..=KEYS {
        hub.on_envelope(
            Millis(0),
            &up("pbx-a", 1, i, &format!("PJSIP/{i}"), DeviceState::Inuse),
        );
    }
    hub.take_actions();
    let mut c = NodeConfig::new("pbx-b");
    c.apply.in_flight = 64;
    let mut node = Node::new(c, Epoch(1), Millis(0));
    node.on_local_full_sync(Millis(0), Vec::new());
    let request = node
        .take_actions()
        .into_iter()
        .find_map(|a| match a {
            Action::Request(e) => Some(e),
            _ => None,
        })
        .expect("a snapshot request at start");
    hub.on_envelope(Millis(0), &request);
    let mut in_flight = Vec::new();
    let mut written = std::collections::BTreeMap::<String, usize>::new();
    let mut most_pending = 0;
    for a in hub.take_actions() {
        let HubAction::SendTo { envelope, .. } = a else {
            panic!("only the answer is queued")
        };
        node.on_remote(Millis(1), &envelope);
        most_pending = most_pending.max(node.apply_queue().pending_len());
        for a in node.take_actions() {
            if let Action::Apply(cmd) = a {
                in_flight.push(cmd);
            }
        }
    }
    assert!(node.snapshot_done());
    assert_eq!(node.table().len(), KEYS as usize);
    while !in_flight.is_empty() {
        for c in std::mem::take(&mut in_flight) {
            *written.entry(c.target.to_string()).or_default() += 1;
            node.on_apply_result(Millis(2), c.id, true);
            most_pending = most_pending.max(node.apply_queue().pending_len());
        }
        for a in node.take_actions() {
            if let Action::Apply(cmd) = a {
                in_flight.push(cmd);
            }
        }
    }
    assert_eq!(written.len(), KEYS as usize, "every key written");
    assert!(written.values().all(|n| *n == 1), "each key written once");
    assert!(written.contains_key("Custom:PJSIP/1") && written.contains_key("Custom:PJSIP/10000"));
    assert!(
        most_pending < KEYS as usize / 2,
        "the queue never held the whole table: {most_pending} pending at most"
    );
}

/// Asking again before the first request was taken replaces it: one request goes out, the
/// one whose answer the node waits for (an agent whose hub link is up at once asks at start
/// and on the link coming up).
#[test]
fn a_request_not_yet_taken_is_replaced_by_the_next() {
    let mut n = Node::new(NodeConfig::new("pbx-new"), Epoch(1), Millis(0));
    n.request_snapshot(Millis(1));
    n.request_snapshot(Millis(2));
    let ids: Vec<u64> = n
        .take_actions()
        .iter()
        .filter_map(|a| match a {
            Action::Request(e) => match e.body {
                Body::SnapshotRequest { request_id } => Some(request_id),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1, "one request out, got {ids:?}");
    // The node takes chunks of that request only: an answer to it completes the snapshot.
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(5), Millis(0));
    let req = Envelope::new(
        "pbx-new",
        Epoch(1),
        1,
        Body::SnapshotRequest { request_id: ids[0] },
    );
    hub.on_envelope(Millis(3), &req);
    while let Some(HubAction::SendTo { envelope, .. }) = hub.next_snapshot_chunk() {
        n.on_remote(Millis(4), &envelope);
    }
    assert!(n.snapshot_done());
}

/// After a reconnection, the re-apply of every remote state waits for the listing asked of
/// the local Asterisk (up to 5 s), and what it lists as held (`Custom:` devices the agent
/// does not federate) is not written again; what differs, or is missing, is.
#[test]
fn a_reconnection_writes_only_what_the_listing_says_differs() {
    let mut b = synced("pbx-b");
    let keys: Vec<String> = (0..3000).map(|i| format!("PJSIP/{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        b.on_remote(
            Millis(1),
            &up("pbx-a", 1, i as u64 + 1, k, DeviceState::Inuse),
        );
    }
    for c in applies(&b.take_actions()) {
        b.on_apply_result(Millis(1), c.id, true);
    }
    while let Some(Action::Apply(c)) = b.poll_action() {
        b.on_apply_result(Millis(1), c.id, true);
    }
    b.on_local_lost(Millis(10));
    b.take_actions();
    b.local_listing_requested(Millis(20));
    b.on_local_restored(Millis(20));
    // pbx-a starts a new epoch meanwhile: every device of it is recomputed.
    b.on_remote(
        Millis(30),
        &Envelope::new("pbx-a", Epoch(2), 1, Body::Heartbeat { local_down: false }),
    );
    b.tick(Millis(4_000));
    assert!(
        applies(&b.take_actions()).is_empty(),
        "nothing is rewritten while the listing is awaited"
    );
    // The listing: every key held as wanted, except the first (another state) and the
    // second (missing: Asterisk lost it).
    let listed: Vec<(String, DeviceState)> = keys
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, k)| {
            let s = if i == 2 {
                DeviceState::Busy
            } else {
                DeviceState::Inuse
            };
            (format!("Custom:{k}"), s)
        })
        .collect();
    b.on_local_full_sync_with_targets(
        Millis(4_100),
        Vec::new(),
        listed.iter().map(|(k, s)| (k.as_str(), *s)),
    );
    let mut written: Vec<String> = Vec::new();
    loop {
        let w = applies(&b.take_actions())
            .into_iter()
            .map(|c| (c.target.to_string(), c.id))
            .collect::<Vec<_>>();
        if w.is_empty() {
            break;
        }
        for (t, id) in w {
            b.on_apply_result(Millis(4_100), id, true);
            written.push(t);
        }
    }
    written.sort();
    assert_eq!(written, vec!["Custom:PJSIP/0", "Custom:PJSIP/2"]);
}

/// A listing that never comes (each one asked fails) does not hold the re-apply back for
/// ever.
#[test]
fn the_reapply_waits_for_a_listing_only_so_long() {
    let mut b = synced("pbx-b");
    b.on_remote(Millis(1), &up("pbx-a", 1, 1, "PJSIP/1", DeviceState::Inuse));
    let first = applies(&b.take_actions())[0].id;
    b.on_apply_result(Millis(1), first, true);
    b.on_local_lost(Millis(10));
    b.take_actions();
    b.local_listing_requested(Millis(20));
    b.on_local_restored(Millis(20));
    b.tick(Millis(4_000));
    assert!(applies(&b.take_actions()).is_empty());
    // The listing failed and is asked again: the wait still ends 5 s after the first ask.
    b.local_listing_requested(Millis(4_500));
    b.tick(Millis(5_020));
    assert_eq!(
        applies(&b.take_actions())
            .iter()
            .map(|c| c.target.as_str())
            .collect::<Vec<_>>(),
        vec!["Custom:PJSIP/1"]
    );
}

/// A receiver that lost part of an origin's full sync does not withdraw the devices the full
/// sync seemed not to name (the lost one among them): the snapshot that closes the gap brings
/// the lost one and, through its summary's floor, withdraws the one really gone.
#[test]
fn a_full_sync_partly_lost_withdraws_nothing_until_a_snapshot_closes_it() {
    let mut hub = Hub::new(HubConfig::new("hub-1"), Epoch(1), Millis(0));
    let mut c = NodeConfig::new("pbx-r");
    c.gap_grace_ms = 100;
    c.snapshot_retry_ms = 1_000;
    let mut r = Node::new(c, Epoch(1), Millis(0));
    let ask = |r: &mut Node, hub: &mut Hub, now: Millis| {
        let actions = r.take_actions();
        let req = actions
            .iter()
            .find_map(|a| match a {
                Action::Request(e) => Some(e.clone()),
                _ => None,
            })
            .expect("a snapshot request");
        hub.on_envelope(now, &req);
        for a in hub.take_actions() {
            if let HubAction::SendTo { envelope, .. } = a {
                r.on_remote(now, &envelope);
            }
        }
        assert!(r.snapshot_done());
    };
    ask(&mut r, &mut hub, Millis(0));
    r.on_local_full_sync(Millis(0), Vec::new());
    r.take_actions();
    let mut a = synced("pbx-a");
    for k in ["PJSIP/1", "PJSIP/2", "PJSIP/3"] {
        a.on_local_event(Millis(1), LocalEvent::device(k, DeviceState::Inuse));
    }
    for e in publishes(&a.take_actions()) {
        hub.on_envelope(Millis(1), e);
        r.on_remote(Millis(1), e);
    }
    hub.take_actions();
    for c in applies(&r.take_actions()) {
        r.on_apply_result(Millis(1), c.id, true);
    }
    // pbx-a lists again: PJSIP/1 changed, PJSIP/3 is gone. The hub gets it all; the
    // receiver loses the update of PJSIP/1.
    a.on_local_full_sync(
        Millis(2),
        vec![
            LocalEvent::device("PJSIP/1", DeviceState::Busy),
            LocalEvent::device("PJSIP/2", DeviceState::Inuse),
        ],
    );
    for e in publishes(&a.take_actions()) {
        hub.on_envelope(Millis(2), e);
        let lost = matches!(&e.body, Body::Update(u) if u.key == "PJSIP/1");
        if !lost {
            r.on_remote(Millis(2), e);
        }
    }
    hub.take_actions();
    assert!(
        applies(&r.take_actions()).is_empty(),
        "nothing withdrawn while part of the full sync is missing"
    );
    assert_eq!(r.remote_value("PJSIP/1"), Some(DeviceState::Inuse));
    assert_eq!(r.remote_value("PJSIP/3"), Some(DeviceState::Inuse));
    // The gap asks for a snapshot; its answer settles both.
    r.tick(Millis(1_200));
    ask(&mut r, &mut hub, Millis(1_200));
    assert_eq!(r.remote_value("PJSIP/1"), Some(DeviceState::Busy));
    assert_eq!(r.remote_value("PJSIP/3"), None, "withdrawn by the floor");
    let mut written: Vec<(String, String)> = applies(&r.take_actions())
        .iter()
        .map(|c| (c.target.to_string(), c.setvar_value().into_owned()))
        .collect();
    written.sort();
    assert_eq!(
        written,
        vec![
            ("Custom:PJSIP/1".to_owned(), "BUSY".to_owned()),
            ("Custom:PJSIP/3".to_owned(), "INVALID".to_owned()),
        ]
    );
}

/// A presence write whose origin restarted since (a newer epoch of it is known here) is
/// republished, with its original timestamp, when a hub asks this node to republish: the
/// origin's new incarnation no longer knows it, and a hub that missed it would keep an older
/// winner. A write of an origin still in its epoch is left to that origin.
#[test]
fn orphaned_presence_writes_are_republished_for_the_hubs() {
    let mut b = synced("pbx-b");
    let presence = |origin: &str, epoch: u64, seq: u64, key: &str, wall: u64| {
        let away = Value::Presence(Presence::new(PresenceStatus::Away, "", ""));
        update(origin, epoch, seq, key, away, wall)
    };
    b.on_remote(Millis(1), &presence("pbx-a", 1, 1, "CustomPresence:a", 50));
    b.on_remote(Millis(1), &presence("pbx-c", 1, 1, "CustomPresence:c", 60));
    // pbx-a restarts (epoch 2); pbx-c does not.
    b.on_remote(
        Millis(2),
        &Envelope::new("pbx-a", Epoch(2), 1, Body::Heartbeat { local_down: false }),
    );
    b.take_actions();
    b.on_remote(
        Millis(3),
        &Envelope::new(
            "hub-1",
            Epoch(1),
            1,
            Body::ResyncRequest {
                origin: "pbx-b".into(),
            },
        ),
    );
    let republished: Vec<(String, u64)> = updates(&b.take_actions())
        .iter()
        .filter(|u| matches!(u.value, Value::Presence(_)))
        .map(|u| (u.key.clone(), u.ts.wall))
        .collect();
    assert_eq!(republished, vec![("CustomPresence:a".to_owned(), 50)]);
}
