//! Snapshot answers streamed to many peers at once: every peer gets a complete answer while
//! live updates keep flowing.

mod common;

use std::time::Duration;

use common::{FakeAgent, TestHub, device_of};
use hintfed_core::{DeviceState, KeyRing, LocalEvent};
use hintfed_daemon::config::Secret;

fn keys() -> KeyRing {
    KeyRing::from_secrets(["test-secret"])
}

const KEYS: usize = 600;
const PEERS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_peers_asking_at_once_all_get_the_whole_table() {
    let mut cfg = TestHub::config("hub-s");
    cfg.federation.shared_keys = vec![Secret::new("test-secret")];
    // Many small chunks: far more chunks than the daemon keeps in flight.
    cfg.server.snapshot_chunk = 10;
    let hub = TestHub::start(cfg).await;
    let eps = vec![hub.endpoint()];
    let mut a = FakeAgent::connect("pbx-a", &eps, keys()).await;
    a.full_sync(
        (0..KEYS)
            .map(|i| LocalEvent::device(format!("PJSIP/{i}"), DeviceState::Inuse))
            .collect(),
    );
    let h = &hub.handle;
    hub.wait_stats("all keys in", |_| h.state_view().devices.len() == KEYS)
        .await;
    let mut peers = Vec::new();
    for i in 0..PEERS {
        let eps = eps.clone();
        peers.push(tokio::spawn(async move {
            let mut p = FakeAgent::connect(&format!("peer-{i}"), &eps, keys()).await;
            let done = p
                .pump_until(Duration::from_secs(60), |p| {
                    p.node.snapshot_done()
                        && p.node.table().keys(hintfed_core::Kind::Device) == KEYS
                })
                .await;
            (p, done)
        }));
    }
    // Live updates while the answers stream.
    for n in 0..20 {
        a.event(LocalEvent::device(
            format!("PJSIP/{}", n * 29),
            DeviceState::Ringing,
        ));
        a.pump(Duration::from_millis(20)).await;
    }
    let mut done = Vec::new();
    for p in peers {
        done.push(p.await.expect("peer task"));
    }
    let incomplete: Vec<String> = done
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(p, _)| p.node.origin().to_owned())
        .collect();
    assert!(incomplete.is_empty(), "no whole snapshot: {incomplete:?}");
    for (p, _) in &mut done {
        p.wait("the live updates", |p| {
            (0..20).all(|n| {
                device_of(p, &format!("PJSIP/{}", n * 29), "pbx-a") == Some(DeviceState::Ringing)
            })
        })
        .await;
    }
    assert!(hub.handle.stats().snapshots_served >= PEERS as u64);
}
