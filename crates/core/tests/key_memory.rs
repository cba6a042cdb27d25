//! Heap per device key of an agent's two per-key structures, the [`Table`] and the
//! [`ApplyQueue`], counted by a global allocator (live bytes requested and live blocks): 100,000
//! device keys from 10 origins (`PJSIP/b3n1234`, in snapshot order), and their 100,000 apply
//! targets (`Custom:PJSIP/b3n1234`) each written once and confirmed, as after a snapshot.
//! `cargo test -p hintfed-core --test key_memory -- --nocapture` prints the figures.
//!
//! Measured (debug build, Rust 1.95; bytes requested per key, blocks per key):
//! - keys as `Box<str>` / `Arc<str>` (before): table 135.3 B, 1.167 blocks; apply queue
//!   pending 114.7 B, 1.0 blocks; apply queue written 93.7 B, 1.0 blocks.
//!
//! Every block costs glibc malloc 8 to 24 bytes beyond the bytes requested (a 13-byte key takes a
//! 32-byte chunk), so the block counts matter as much as the bytes.

use std::alloc::System;

use hintfed_core::{
    ApplyConfig, ApplyQueue, DeviceState, Epoch, HlcTimestamp, Millis, Table, Value,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const ORIGINS: usize = 10;
const PER_ORIGIN: usize = 10_000;
const KEYS: usize = ORIGINS * PER_ORIGIN;

/// Live heap: bytes requested and blocks.
#[derive(Clone, Copy)]
struct Live {
    bytes: isize,
    blocks: isize,
}

impl Live {
    fn now() -> Live {
        let s = GLOBAL.stats();
        // `bytes_allocated` and `bytes_deallocated` include the growth and shrinking of
        // reallocations (`bytes_reallocated` is their net sum, already counted).
        let bytes = s.bytes_allocated as isize - s.bytes_deallocated as isize;
        let blocks = s.allocations as isize - s.deallocations as isize;
        Live { bytes, blocks }
    }

    /// Bytes and blocks per key from `self` to `later`.
    fn per_key(self, later: Live) -> (f64, f64) {
        (
            (later.bytes - self.bytes) as f64 / KEYS as f64,
            (later.blocks - self.blocks) as f64 / KEYS as f64,
        )
    }
}

#[test]
fn device_keys_and_apply_targets_cost_no_block_of_their_own() {
    let keys: Vec<(String, u64, String)> = (0..ORIGINS)
        .flat_map(|o| {
            (0..PER_ORIGIN).map(move |i| {
                (
                    format!("pbx-{o}"),
                    i as u64 + 1,
                    format!("PJSIP/b{o}n{i:04}"),
                )
            })
        })
        .collect();
    let targets: Vec<String> = keys.iter().map(|(_, _, k)| format!("Custom:{k}")).collect();
    let v = Value::Device(DeviceState::NotInuse);

    let start = Live::now();
    let mut table = Table::new();
    for (origin, seq, key) in &keys {
        let ts = HlcTimestamp {
            wall: *seq,
            counter: 0,
        };
        assert!(table.apply(origin, Epoch(1), *seq, key, &v, ts, Millis(0)));
    }
    let filled = Live::now();

    let mut queue = ApplyQueue::new(ApplyConfig::default());
    for t in &targets {
        queue.push_ref(t, &v);
    }
    assert_eq!(queue.pending_len(), KEYS);
    let pushed = Live::now();
    let mut written = 0;
    while let Some((t, _)) = queue.next_write() {
        assert!(queue.complete(&t, true));
        written += 1;
    }
    assert_eq!(written, KEYS);
    let drained = Live::now();

    let (table_bytes, table_blocks) = start.per_key(filled);
    let (pending_bytes, pending_blocks) = filled.per_key(pushed);
    let (written_bytes, written_blocks) = filled.per_key(drained);
    println!("table:               {table_bytes:6.1} B/key, {table_blocks:.3} blocks/key");
    println!("apply queue pending: {pending_bytes:6.1} B/key, {pending_blocks:.3} blocks/key");
    println!("apply queue written: {written_bytes:6.1} B/key, {written_blocks:.3} blocks/key");
    assert_eq!(table.keys(hintfed_core::Kind::Device), KEYS);
    assert_eq!(queue.targets_len(), KEYS);
}
