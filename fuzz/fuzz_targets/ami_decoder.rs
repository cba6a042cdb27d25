//! Fuzzes the AMI decoder: arbitrary bytes, fed whole and in chunks, through the client codec
//! (banner first) and the server codec, with small limits so they are hit.
//!
//! Invariants: no panic; the buffer never holds more than one over-long line plus one chunk;
//! chunked and whole decoding agree (frames of the one that stopped on an error are a prefix of
//! the other's); every decoded message that can be encoded decodes back to itself.
#![no_main]

use bytes::BytesMut;
use hintfed_ami::{AmiCodec, Frame, Limits, Message};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

const LIMITS: Limits = Limits {
    max_line: 256,
    max_headers: 32,
    max_message: 2048,
};

/// Decodes `data` in chunks of `chunk` bytes; returns the frames and whether it stopped on an
/// error.
fn run(banner: bool, data: &[u8], chunk: usize) -> (Vec<Frame>, bool) {
    let mut codec = AmiCodec::with_limits(banner, LIMITS);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
        assert!(
            buf.len() <= LIMITS.max_line + 1 + chunk.max(1),
            "decoder buffered {} bytes",
            buf.len()
        );
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, false),
            Err(_) => return (frames, true),
        }
    }
}

/// A decoded message that the encoder accepts and that is plain (no raw command output)
/// decodes back to itself.
fn check_round_trip(m: &Message) {
    let follows = m
        .headers()
        .any(|(k, v)| k.eq_ignore_ascii_case("Response") && v.eq_ignore_ascii_case("Follows"));
    if follows {
        return;
    }
    let mut wire = BytesMut::new();
    if AmiCodec::server().encode(m, &mut wire).is_err() {
        return;
    }
    let mut codec = AmiCodec::server();
    match codec.decode(&mut wire) {
        Ok(Some(Frame::Message(back))) => assert_eq!(&back, m),
        other => panic!("re-decoding {m:?} gave {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let banner = first & 0x80 != 0;
    let chunk = usize::from(first & 0x3f) + 1;
    let (whole, whole_err) = run(banner, data, data.len().max(1));
    let (chunked, chunked_err) = run(banner, data, chunk);
    match (whole_err, chunked_err) {
        (false, false) => assert_eq!(whole, chunked),
        (true, false) => assert!(chunked.starts_with(&whole)),
        (false, true) => assert!(whole.starts_with(&chunked)),
        (true, true) => {
            let n = whole.len().min(chunked.len());
            assert_eq!(whole[..n], chunked[..n]);
        }
    }
    for f in &whole {
        if let Frame::Message(m) = f {
            check_round_trip(m);
        }
    }
});
