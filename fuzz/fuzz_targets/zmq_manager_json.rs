//! Fuzzes the res_zmq_manager JSON readers (`hintfed_asterisk::zmq`): arbitrary frames through
//! `event_from_json` (the PUB socket's events) and `reply_from_json` (the REP socket's
//! replies).
//!
//! Invariants: no panic; an accepted event re-encoded as a request object
//! (`action_to_json`) reads back as the same headers without `ActionID`; an accepted reply has
//! at most as many messages as the array has items, and every message survives the same round
//! trip.
#![no_main]

use hintfed_ami::Message;
use hintfed_asterisk::zmq::{action_to_json, event_from_json, reply_from_json};
use libfuzzer_sys::fuzz_target;

fn round_trip(m: &Message) {
    let back = event_from_json(&action_to_json(m)).expect("our own JSON object reads back");
    let want: Vec<_> = m
        .headers()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("ActionID"))
        .collect();
    assert_eq!(back.headers().collect::<Vec<_>>(), want);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = event_from_json(data) {
        round_trip(&m);
    }
    if let Ok(msgs) = reply_from_json(data) {
        let items = serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .expect("an accepted reply is a JSON array");
        assert!(msgs.len() <= items);
        for m in &msgs {
            round_trip(m);
        }
    }
});
