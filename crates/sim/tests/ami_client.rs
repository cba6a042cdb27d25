//! The project's own AMI client (`hintfed_ami::AmiClient`) against the simulator: MD5 login,
//! a 502-item list, events, and reconnecting across a simulated restart.

mod common;

use std::time::Duration;

use common::*;
use hintfed_ami::{AmiClient, ClientConfig, ClientEvent, Message};
use hintfed_sim::SimConfig;

async fn next_event(
    sub: &mut hintfed_ami::Subscription,
    pred: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    loop {
        let ev = tokio::time::timeout(DEADLINE, sub.recv())
            .await
            .expect("event in time")
            .expect("subscription open");
        if pred(&ev) {
            return ev;
        }
    }
}

#[tokio::test]
async fn ami_client_logs_in_lists_and_reconnects_after_restart() {
    let sim = spawn(SimConfig {
        preload_custom: 500,
        ..capture_config("pbx-a")
    })
    .await;
    let mut cfg = ClientConfig::new(sim.local_addr().to_string(), "admin", "adminsecret");
    cfg.backoff_initial = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    let client = AmiClient::start(cfg);
    let mut sub = client.subscribe();
    assert!(client.wait_connected(DEADLINE).await);

    for (var, value) in [
        ("DEVICE_STATE(Custom:dnd300)", "INUSE"),
        ("DEVICE_STATE(Custom:Local/100@phones)", "RINGING"),
    ] {
        let r = client
            .send(
                Message::action("Setvar")
                    .with("Variable", var)
                    .with("Value", value),
            )
            .await
            .expect("setvar");
        assert_eq!(r.get("Message"), Some("Variable Set"));
    }
    let ev = next_event(&mut sub, |e| {
        matches!(e, ClientEvent::Event(m) if m.get("Device") == Some("Custom:Local/100@phones"))
    })
    .await;
    let ClientEvent::Event(m) = ev else {
        unreachable!()
    };
    assert_eq!(m.get("SystemName"), Some("pbx-a"));

    let list = client
        .list(Message::action("DeviceStateList"))
        .await
        .expect("list");
    assert!(list.is_success());
    assert_eq!(list.items.len(), 502);
    let complete = list.complete.expect("complete");
    assert_eq!(complete.get("ListItems"), Some("502"));

    sim.restart(Duration::ZERO);
    next_event(&mut sub, |e| {
        matches!(e, ClientEvent::Connected { generation: 2, .. })
    })
    .await;
    let list = client
        .list(Message::action("DeviceStateList"))
        .await
        .expect("list after restart");
    let devices: Vec<&str> = list.items.iter().filter_map(|m| m.get("Device")).collect();
    assert!(devices.contains(&"Custom:100@phones"), "{devices:?}");
    assert!(!devices.contains(&"Custom:Local/100@phones"));
    client.shutdown().await;
}
