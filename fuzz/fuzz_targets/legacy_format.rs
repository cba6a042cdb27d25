//! Fuzzes the zmq-ami-broker legacy wire format the hub's compatibility sockets read
//! (`hintfed_server::legacy`): the input is split into frames at 0x00 bytes (at most 4) and
//! goes through `parse`, then `device_change`.
//!
//! Invariants: no panic; a message over `MAX_LEGACY_BYTES` is always `TooLarge`; an accepted
//! message has a non-empty target without control characters and a non-empty origin; a
//! device state extracted from it, rebuilt with `device_event`, parses back to the same
//! device and state.
#![no_main]

use bytes::Bytes;
use hintfed_server::legacy::{DeviceChange, LegacyError, MAX_LEGACY_BYTES, device_event, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<Bytes> = data
        .splitn(4, |b| *b == 0)
        .map(Bytes::copy_from_slice)
        .collect();
    let size: usize = frames.iter().map(Bytes::len).sum();
    let parsed = parse(&frames);
    if size > MAX_LEGACY_BYTES {
        assert!(matches!(parsed, Err(LegacyError::TooLarge(_))));
    }
    let Ok(msg) = parsed else { return };
    assert!(!msg.target.is_empty() && !msg.target.chars().any(char::is_control));
    assert!(!msg.origin.is_empty());
    if let DeviceChange::State { device, state } = msg.device_change() {
        let again = parse(&device_event(&msg.origin, &device, state));
        if let Ok(again) = again {
            assert_eq!(again.device_change(), DeviceChange::State { device, state });
        } else {
            // Only a rebuilt message over the size limit may be refused.
            assert!(matches!(again, Err(LegacyError::TooLarge(_))));
        }
    }
});
