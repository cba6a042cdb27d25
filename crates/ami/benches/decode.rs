//! Decode throughput of [`AmiCodec`] over the real Asterisk captures in
//! `../shared/fixtures/asterisk/`: MB/s (`Throughput::Bytes`) and messages/s
//! (`Throughput::Elements`), the capture fed whole and in 1460-byte reads (one TCP segment).
//!
//! Also two synthetic streams of the shapes a relay's 20,000/s run is made of: what an agent
//! reads per applied update (the `Response: Success` answer to a pipelined `Setvar`, then the
//! `DeviceStateChange` Asterisk emits for it) and what the simulator reads (the `Setvar`s).
//!
//! Run: `cargo bench -p hintfed-ami --bench decode` (add `-- --quick` for a short run).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hintfed_ami::{AmiCodec, Frame};
use tokio_util::codec::Decoder;

const CAPTURES: [&str; 3] = [
    "session.recv.raw",
    "devicestatelist-500.recv.raw",
    "after-restart.recv.raw",
];

/// Update pairs (or actions) in each synthetic stream.
const UPDATES: u64 = 256;

/// What an agent reads for `UPDATES` applied updates: each `Setvar`'s answer, then its event.
fn agent_stream() -> Vec<u8> {
    let mut s = String::from("Asterisk Call Manager/13.0.0\r\n");
    for seq in 0..UPDATES {
        s.push_str(&format!(
            "Response: Success\r\nActionID: hf1a2b3c4d-w{seq}\r\nMessage: Variable Set\r\n\r\n\
             Event: DeviceStateChange\r\nPrivilege: call,all\r\nSystemName: pbx-3\r\n\
             Device: Custom:hf-pbx-7-dev{}\r\nState: INUSE\r\n\r\n",
            seq * 7 % 1000
        ));
    }
    s.into_bytes()
}

/// What the simulator reads for `UPDATES` writes of a [`hintfed_ami::SetvarWriter`].
fn sim_stream() -> Vec<u8> {
    let mut s = String::from("Asterisk Call Manager/13.0.0\r\n");
    for seq in 0..UPDATES {
        s.push_str(&format!(
            "Action: Setvar\r\nActionID: hf1a2b3c4d-w{seq}\r\n\
             Variable: DEVICE_STATE(Custom:hf-pbx-7-dev{})\r\nValue: INUSE\r\n\r\n",
            seq * 7 % 1000
        ));
    }
    s.into_bytes()
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/asterisk")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Decodes `bytes` fed in `chunk`-byte reads; returns the number of messages.
fn decode(bytes: &[u8], chunk: usize) -> usize {
    let mut codec = AmiCodec::client();
    let mut buf = BytesMut::with_capacity(chunk.min(bytes.len()) * 2);
    let mut n = 0;
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = codec.decode(&mut buf).expect("captures decode") {
            if let Frame::Message(m) = frame {
                black_box(&m);
                n += 1;
            }
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let inputs = CAPTURES.iter().map(|&name| (name, fixture(name))).chain([
        ("agent-stream", agent_stream()),
        ("sim-stream", sim_stream()),
    ]);
    for (name, bytes) in inputs {
        let messages = decode(&bytes, bytes.len());
        for (unit, throughput) in [
            ("bytes", Throughput::Bytes(bytes.len() as u64)),
            ("messages", Throughput::Elements(messages as u64)),
        ] {
            let mut group = c.benchmark_group(format!("decode/{unit}"));
            group.throughput(throughput);
            group.bench_function(format!("{name}/whole"), |b| {
                b.iter(|| decode(black_box(&bytes), bytes.len()))
            });
            group.bench_function(format!("{name}/1460"), |b| {
                b.iter(|| decode(black_box(&bytes), 1460))
            });
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
