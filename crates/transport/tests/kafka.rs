//! KafkaTransport against librdkafka's in-process mock cluster: catch-up from the topic before
//! `connected`, snapshots answered locally (newest value per key), live fan-out in order over
//! several partitions, heartbeats, forged records, a missing topic, brokers going down and
//! coming back, a lost record making the origin republish. (The mock answers no CreateTopics:
//! topic creation is covered by the end-to-end test against tansu.)
#![cfg(feature = "kafka")]

use std::time::Duration;

use bytes::Bytes;
use hintfed_core::{
    Body, DeviceState, Envelope, Epoch, HlcTimestamp, KeyRing, Limits, Update, Value, open,
};
use hintfed_transport::kafka::{KafkaConfig, KafkaTransport};
use hintfed_transport::{Channel, FederationTransport, Incoming};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::sync::mpsc;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(20);

fn keys() -> KeyRing {
    KeyRing::from_secrets(["test-secret"])
}

fn cfg(brokers: &str, origin: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(brokers, origin);
    c.keys = keys();
    c.topic = "t.state".into();
    c.heartbeat_topic = "t.hb".into();
    c.request_timeout = Duration::from_secs(5);
    c
}

/// A mock cluster with both topics (the mock answers no CreateTopics: creation is covered by
/// the end-to-end test against a real broker).
fn cluster() -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("t.state", 1, 1).expect("state topic");
    mock.create_topic("t.hb", 1, 1).expect("heartbeat topic");
    let brokers = mock.bootstrap_servers();
    (mock, brokers)
}

fn seal(env: &Envelope) -> Bytes {
    Bytes::from(keys().seal(env, &Limits::default()).expect("seal"))
}

fn device(origin: &str, seq: u64, key: &str, s: DeviceState) -> Envelope {
    Envelope::new(
        origin.to_owned(),
        Epoch(7),
        seq,
        Body::Update(Update {
            key: key.to_owned(),
            value: Value::Device(s),
            ts: HlcTimestamp::default(),
        }),
    )
}

async fn publish(t: &KafkaTransport, env: &Envelope) {
    t.publish(env.topic(), seal(env)).await.expect("published");
}

async fn wait_connected(t: &KafkaTransport) {
    let mut c = t.connected();
    timeout(DEADLINE, c.wait_for(|n| *n == 1))
        .await
        .expect("connected in time")
        .expect("transport alive");
}

/// Receives until `pred` holds for an opened envelope; returns it.
async fn recv_until(
    rx: &mut mpsc::Receiver<Incoming>,
    mut pred: impl FnMut(&Incoming, &Envelope) -> bool,
) -> Envelope {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let msg = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("message in time")
            .expect("stream open");
        let env = open(
            msg.frames.last().expect("frame"),
            &keys(),
            &Limits::default(),
        )
        .expect("valid envelope");
        if pred(&msg, &env) {
            return env;
        }
    }
}

/// Requests a snapshot as `origin` and collects its entries (key, value, from origin).
async fn snapshot(
    t: &KafkaTransport,
    rx: &mut mpsc::Receiver<Incoming>,
    origin: &str,
    id: u64,
) -> (
    Vec<(String, String, String)>,
    Vec<hintfed_core::OriginSummary>,
) {
    let req = Envelope::new(
        origin.to_owned(),
        Epoch(1),
        0,
        Body::SnapshotRequest { request_id: id },
    );
    assert_eq!(t.request_snapshot(seal(&req), &[]).await.expect("sent"), 0);
    let mut entries = Vec::new();
    let mut origins = Vec::new();
    loop {
        let env = recv_until(rx, |m, _| m.channel == Channel::Reply).await;
        match env.body {
            Body::SnapshotChunk {
                request_id,
                entries: e,
                origins: o,
                ..
            } if request_id == id => {
                entries.extend(
                    e.into_iter()
                        .map(|e| (e.origin, e.key, format!("{:?}", e.value))),
                );
                origins.extend(o);
            }
            Body::SnapshotEnd { request_id, .. } if request_id == id => {
                return (entries, origins);
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_gets_the_topic_as_snapshot_then_live_updates() {
    let (_mock, brokers) = cluster();

    let a = KafkaTransport::start(cfg(&brokers, "pbx-a"))
        .await
        .expect("a starts");
    wait_connected(&a).await;
    let _a_in = a.take_incoming().expect("a inbound");
    publish(
        &a,
        &Envelope::new("pbx-a", Epoch(7), 1, Body::FullSyncBegin),
    )
    .await;
    publish(&a, &device("pbx-a", 2, "PJSIP/100", DeviceState::Inuse)).await;
    publish(&a, &device("pbx-a", 3, "PJSIP/101", DeviceState::Ringing)).await;
    // A newer value of the same key: the snapshot must hold only the newest.
    publish(&a, &device("pbx-a", 4, "PJSIP/100", DeviceState::NotInuse)).await;
    publish(
        &a,
        &Envelope::new("pbx-a", Epoch(7), 5, Body::FullSyncEnd { begin_seq: 1 }),
    )
    .await;
    a.flush(DEADLINE).await.expect("delivered");
    assert_eq!(a.stats().delivery_failed, 0);

    let b = KafkaTransport::start(cfg(&brokers, "pbx-b"))
        .await
        .expect("b starts");
    let mut b_in = b.take_incoming().expect("b inbound");
    assert!(b.take_incoming().is_none(), "inbound is taken once");
    wait_connected(&b).await;
    let (mut entries, origins) = snapshot(&b, &mut b_in, "pbx-b", 1).await;
    entries.sort();
    assert_eq!(
        entries,
        vec![
            (
                "pbx-a".into(),
                "PJSIP/100".into(),
                "Device(NotInuse)".into()
            ),
            ("pbx-a".into(), "PJSIP/101".into(), "Device(Ringing)".into()),
        ]
    );
    let a_sum = origins
        .iter()
        .find(|o| o.origin == "pbx-a")
        .expect("pbx-a summarised");
    assert_eq!(a_sum.last_seq, 5);
    assert_eq!(a_sum.down, None, "records just written: pbx-a is alive");

    // Live: a new update reaches b as fan-out, under the envelope's topic.
    publish(&a, &device("pbx-a", 6, "PJSIP/102", DeviceState::Busy)).await;
    let env = recv_until(&mut b_in, |m, _| m.channel == Channel::Fanout).await;
    assert_eq!(env.seq, 6);
    // Heartbeats travel too (on their own topic).
    publish(
        &a,
        &Envelope::new("pbx-a", Epoch(7), 7, Body::Heartbeat { local_down: false }),
    )
    .await;
    let env = recv_until(&mut b_in, |m, e| {
        m.channel == Channel::Fanout && matches!(e.body, Body::Heartbeat { .. })
    })
    .await;
    assert_eq!(env.seq, 7);
    // A later snapshot (a gap) is answered from the current state.
    let (entries, _) = snapshot(&b, &mut b_in, "pbx-b", 2).await;
    assert_eq!(entries.len(), 3);
    assert!(b.stats().snapshots_served >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_dropped_and_counted() {
    let (_mock, brokers) = cluster();
    let a = KafkaTransport::start(cfg(&brokers, "pbx-a"))
        .await
        .expect("a");
    wait_connected(&a).await;
    let mut a_in = a.take_incoming().expect("inbound");

    // A writer with another key (and so does an unsigned one).
    let mut evil_cfg = cfg(&brokers, "evil");
    evil_cfg.keys = KeyRing::from_secrets(["wrong"]);
    let evil = KafkaTransport::start(evil_cfg).await.expect("evil");
    let forged = device("pbx-x", 1, "PJSIP/666", DeviceState::Inuse);
    let bytes = KeyRing::from_secrets(["wrong"])
        .seal(&forged, &Limits::default())
        .expect("seal");
    evil.publish("device", Bytes::from(bytes))
        .await
        .expect("sent");
    evil.flush(DEADLINE).await.expect("flushed");
    // Then a good one: once it arrives, the forged one was read before it (same partition).
    let good = device("pbx-x", 2, "PJSIP/1", DeviceState::Inuse);
    publish(&a, &good).await;
    let env = recv_until(&mut a_in, |m, _| m.channel == Channel::Fanout).await;
    assert_eq!(env.seq, 2);
    assert_eq!(a.stats().rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_without_creation_is_an_error() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let mut c = cfg(&mock.bootstrap_servers(), "pbx-a");
    c.create_topics = false;
    let err = KafkaTransport::start(c).await.expect_err("missing topic");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_topics_are_used_and_an_empty_topic_is_an_empty_snapshot() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("t.state", 3, 1).expect("state topic");
    mock.create_topic("t.hb", 2, 1).expect("hb topic");
    let a = KafkaTransport::start(cfg(&mock.bootstrap_servers(), "pbx-a"))
        .await
        .expect("a");
    let mut a_in = a.take_incoming().expect("inbound");
    wait_connected(&a).await;
    let (entries, origins) = snapshot(&a, &mut a_in, "pbx-a", 9).await;
    assert!(entries.is_empty());
    assert!(origins.is_empty());
    // With three partitions, one origin's stream still arrives in order.
    let b = KafkaTransport::start(cfg(&mock.bootstrap_servers(), "pbx-b"))
        .await
        .expect("b");
    wait_connected(&b).await;
    for seq in 1..=20 {
        publish(
            &b,
            &device("pbx-b", seq, &format!("PJSIP/{seq}"), DeviceState::Inuse),
        )
        .await;
    }
    for want in 1..=20 {
        let env = recv_until(&mut a_in, |m, _| m.channel == Channel::Fanout).await;
        assert_eq!(env.seq, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_follows_the_brokers() {
    let (mock, brokers) = cluster();
    let mut c = cfg(&brokers, "pbx-a");
    c.properties = vec![
        ("reconnect.backoff.ms".into(), "50".into()),
        ("reconnect.backoff.max.ms".into(), "200".into()),
    ];
    let a = KafkaTransport::start(c).await.expect("a");
    wait_connected(&a).await;
    let mut conn = a.connected();
    mock.broker_down(1).expect("down");
    timeout(DEADLINE, conn.wait_for(|n| *n == 0))
        .await
        .expect("noticed down")
        .expect("alive");
    mock.broker_up(1).expect("up");
    timeout(DEADLINE, conn.wait_for(|n| *n == 1))
        .await
        .expect("noticed up")
        .expect("alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_record_makes_the_origin_republish() {
    let (mock, brokers) = cluster();
    let mut c = cfg(&brokers, "pbx-a");
    c.resync_debounce = Duration::from_millis(100);
    let a = KafkaTransport::start(c).await.expect("a");
    let mut a_in = a.take_incoming().expect("inbound");
    wait_connected(&a).await;
    // The broker refuses the next produce requests for good (not retriable).
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 8],
    );
    publish(&a, &device("pbx-a", 1, "PJSIP/100", DeviceState::Inuse)).await;
    let env = recv_until(&mut a_in, |m, e| {
        m.channel == Channel::Reply && matches!(e.body, Body::ResyncRequest { .. })
    })
    .await;
    assert!(matches!(env.body, Body::ResyncRequest { ref origin } if origin == "pbx-a"));
    assert!(a.stats().delivery_failed >= 1);
    assert!(a.stats().self_resyncs >= 1);
}
