//! Ingress under overload: a flood larger than the hub's inbound queue is held back by
//! ZeroMQ/TCP instead of dropped; every update is accepted and forwarded, nothing is counted as
//! `overload`, and the flooding origin never looks down.

mod common;

use bytes::Bytes;
use common::TestHub;
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{Body, DeviceState, Envelope, Epoch, HlcTimestamp, KeyRing, Update, Value};
use hintfed_daemon::config::Secret;
use zeromq::{DealerSocket, Socket, SocketSend, ZmqMessage};

/// More than the hub's inbound queue (8192 messages).
const FLOOD: u64 = 12_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_larger_than_the_inbound_queue_loses_nothing_and_no_origin_goes_down() {
    let mut cfg = TestHub::config("hub-flood");
    cfg.federation.shared_keys = vec![Secret::new("test-secret")];
    let hub = TestHub::start(cfg).await;
    let keys = KeyRing::from_secrets(["test-secret"]);
    let limits = CoreLimits::default();
    // Seal first so the flood arrives faster than the hub verifies it.
    let messages: Vec<ZmqMessage> = (1..=FLOOD)
        .map(|seq| {
            let env = Envelope::new(
                "pbx-flood",
                Epoch(1),
                seq,
                Body::Update(Update {
                    key: format!("PJSIP/{}", seq % 500),
                    value: Value::Device(DeviceState::Busy),
                    ts: HlcTimestamp {
                        wall: seq,
                        counter: 0,
                    },
                }),
            );
            let mut m = ZmqMessage::from(Bytes::from_static(b"state.device"));
            m.push_back(Bytes::from(keys.seal(&env, &limits).expect("seal")));
            m
        })
        .collect();
    let mut dealer = DealerSocket::new();
    dealer.connect(&hub.endpoint()).await.expect("connect");
    for m in messages {
        dealer.send(m).await.expect("send");
    }
    hub.wait_stats("every flooded update accepted", |s| s.accepted >= FLOOD)
        .await;
    let s = hub.handle.stats();
    assert_eq!(s.accepted, FLOOD, "{s:#?}");
    assert_eq!(s.forwarded, FLOOD, "{s:#?}");
    assert_eq!(s.rejected("overload"), 0, "{s:#?}");
    assert_eq!(s.origin_down_notices, 0, "{s:#?}");
    let origins = hub.handle.origins_view();
    let o = origins
        .iter()
        .find(|o| o.name == "pbx-flood")
        .expect("origin known");
    assert!(o.up, "{o:?}");
    assert_eq!(o.last_seq, FLOOD, "{o:?}");
}
