//! Typed views over every message of the real captures.

use std::path::PathBuf;

use bytes::BytesMut;
use hintfed_ami::{
    AmiCodec, AnyEvent, DeviceStateChange, ExtensionStatus, Frame, Message, PresenceStateChange,
    Response, ResponseKind,
};
use tokio_util::codec::Decoder;

fn messages(name: &str) -> Vec<Message> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/asterisk")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut codec = AmiCodec::client();
    let mut buf = BytesMut::from(&bytes[..]);
    let mut out = Vec::new();
    while let Some(f) = codec.decode(&mut buf).expect("decode") {
        if let Frame::Message(m) = f {
            out.push(m);
        }
    }
    out
}

#[test]
fn session_events_have_typed_views() {
    let msgs = messages("session.recv.raw");
    let (mut dsc, mut psc, mut ext, mut pst, mut fb, mut lc, mut other) = (0, 0, 0, 0, 0, 0, 0);
    for m in msgs.iter().filter(|m| m.event().is_some()) {
        match AnyEvent::classify(m) {
            AnyEvent::DeviceStateChange(_) => dsc += 1,
            AnyEvent::PresenceStateChange(_) => psc += 1,
            AnyEvent::ExtensionStatus(_) => ext += 1,
            AnyEvent::PresenceStatus(_) => pst += 1,
            AnyEvent::FullyBooted(v) => {
                assert_eq!(v.uptime, Some(21));
                assert_eq!(v.status, "Fully Booted");
                fb += 1;
            }
            AnyEvent::ListComplete(v) => {
                assert!(v.event.ends_with("ListComplete"));
                assert!(v.list_items.is_some());
                lc += 1;
            }
            AnyEvent::Other(o) => {
                // Untouched: the very message.
                assert_eq!(&o, m);
                other += 1;
            }
        }
    }
    assert_eq!((dsc, psc, ext, pst, fb, lc), (8, 3, 10, 2, 1, 3));
    assert_eq!(other, 45 - 27);

    let alice = msgs
        .iter()
        .filter_map(PresenceStateChange::from_message)
        .find(|p| p.status == "dnd")
        .expect("dnd");
    assert_eq!(alice.presentity, "CustomPresence:alice");
    assert_eq!(alice.subtype, "meeting, room 4");
    assert_eq!(alice.message, "in a meeting, sorry");

    let ringing = msgs
        .iter()
        .filter(|m| m.is_event("ExtensionStatus"))
        .filter_map(ExtensionStatus::from_message)
        .find(|e| e.exten == "100")
        .expect("100");
    assert_eq!(ringing.hint, "Local/100@phones&Custom:Local/100@phones");
    assert_eq!(
        (ringing.status, ringing.status_text.as_str()),
        (8, "Ringing")
    );

    // The ExtensionState action's answer reads as an ExtensionStatus too.
    let es1 = msgs
        .iter()
        .find(|m| m.action_id() == Some("es1"))
        .expect("es1");
    assert_eq!(ExtensionStatus::from_message(es1).expect("view").status, 8);

    // Responses: 19 successes, 3 errors, 1 goodbye; OriginateResponse is not one.
    let kinds: Vec<ResponseKind> = msgs
        .iter()
        .filter_map(Response::from_message)
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds.len(), 23);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ResponseKind::Success)
            .count(),
        19
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == ResponseKind::Error).count(),
        3
    );
    assert_eq!(kinds.last(), Some(&ResponseKind::Goodbye));
    let refused = msgs
        .iter()
        .filter_map(Response::from_message)
        .find(|r| r.action_id.as_deref() == Some("sv3"))
        .expect("sv3");
    assert_eq!(refused.message.as_deref(), Some("Variable not set"));
}

#[test]
fn device_state_list_items_are_device_state_changes() {
    let msgs = messages("devicestatelist-500.recv.raw");
    let items: Vec<DeviceStateChange> = msgs
        .iter()
        .filter(|m| m.action_id() == Some("dl1"))
        .filter_map(DeviceStateChange::from_message)
        .collect();
    assert_eq!(items.len(), 502);
    assert!(
        items
            .iter()
            .all(|d| !d.device.is_empty() && !d.state.is_empty())
    );
    let restart = messages("after-restart.recv.raw");
    let renamed: Vec<_> = restart
        .iter()
        .filter_map(DeviceStateChange::from_message)
        .map(|d| d.device)
        .collect();
    assert_eq!(renamed, ["Custom:dnd300", "Custom:100@phones"]);
}
