//! Fuzzes the federation envelope decoder (`hintfed_core::open` and the `Verifier`): arbitrary
//! bytes, with and without a key ring, under the default and under small limits.
//!
//! Invariants: no panic; a message over the size limit is always `TooLarge`; whatever decodes
//! unsigned is what serde's derived decoding reads from the same bytes (`open` reads the
//! canonical device update without serde: this checks that shortcut against serde); whatever
//! decodes unsigned re-seals and decodes back to the same envelope (also signed, with a key);
//! a verifier never accepts the same stream message twice.
#![no_main]

use hintfed_core::{Envelope, Key, KeyRing, Limits, Reject, Verifier, open};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let none = KeyRing::default();
    let keys = KeyRing::new(vec![Key::new(Some("k1".into()), "fuzz-secret")]);
    let small = Limits {
        max_message_bytes: 512,
        max_origin_len: 16,
        max_key_len: 32,
        max_text_len: 32,
    };
    let default = Limits::default();

    for limits in [&default, &small] {
        let unsigned = open(data, &none, limits);
        let _ = open(data, &keys, limits);
        if data.len() > limits.max_message_bytes {
            assert!(matches!(unsigned, Err(Reject::TooLarge { .. })));
        }
        if let Ok(env) = unsigned {
            // The fast path for device updates reads exactly what serde reads.
            assert_eq!(serde_json::from_slice::<Envelope>(data).ok().as_ref(), Some(&env));
            // Round trip through the wire form, unsigned and signed.
            if let Ok(bytes) = none.seal(&env, limits) {
                assert_eq!(open(&bytes, &none, limits).as_ref(), Ok(&env));
            }
            if let Ok(bytes) = keys.seal(&env, limits) {
                assert_eq!(open(&bytes, &keys, limits).as_ref(), Ok(&env));
                assert!(matches!(open(&bytes, &none, limits), Ok(_)));
            }
        }
    }

    // The same bytes twice through one verifier: a stream message is accepted at most once.
    let mut v = Verifier::new(KeyRing::default(), default.clone());
    let first = v.verify(data);
    let second = v.verify(data);
    if let Ok(env) = first
        && env.is_stream()
    {
        assert!(matches!(second, Err(Reject::Duplicate)));
    }
});
