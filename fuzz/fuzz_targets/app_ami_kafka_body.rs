//! Fuzzes the app_ami_kafka record reader: arbitrary bodies (and a `format` header chosen by
//! the first input byte) through `parse_record`, with a small size limit so it is hit.
//!
//! Invariants: no panic; an accepted record names an event; the identity read from a record
//! is non-empty when present; sniffing the format agrees with an explicit header whenever the
//! body parses either way.
#![no_main]

use hintfed_asterisk::kafka::{BodyFormat, MAX_BODY_BYTES, parse_body, parse_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let format: &[u8] = match sel % 4 {
        0 => b"json",
        1 => b"ami",
        2 => b"bogus",
        _ => b"",
    };
    let mut headers: Vec<(&str, &[u8])> = vec![("entity_id", b"00:11:22:33:44:55")];
    if !format.is_empty() {
        headers.push(("format", format));
    }
    let limit = if sel & 0x80 != 0 { 64 } else { MAX_BODY_BYTES };
    if let Ok(ev) = parse_record(&headers, body, limit) {
        assert!(ev.message.event().is_some_and(|e| !e.is_empty()));
        assert!(ev.entity_id.as_deref().is_some_and(|s| !s.is_empty()));
        assert!(ev.system_name.as_deref().is_none_or(|s| !s.is_empty()));
        if let Ok((m, f)) = parse_body(body, None, limit)
            && Some(f) == BodyFormat::from_header(format)
        {
            assert_eq!(m, ev.message);
        }
    }
});
