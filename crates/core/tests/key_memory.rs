//! Heap per device key of an agent's two per-key structures, the [`Table`] and the
//! [`ApplyQueue`], counted by a global allocator (live bytes requested and live blocks): 100,000
//! device keys from 10 origins (`PJSIP/b3n1234`, in snapshot order), and their 100,000 apply
//! targets (`Custom:PJSIP/b3n1234`) each written once and confirmed, as after a snapshot; and
//! the table again once packed ([`Table::compact`]).
//! `cargo test -p hintfed-core --test key_memory -- --nocapture` prints the figures.
//!
//! Measured (debug build, Rust 1.95, glibc), per key: bytes requested / blocks / growth of the
//! resident set:
//! - before, keys as `Box<str>` (table) and `Arc<str>` (apply queue): table 135.3 B / 1.17 /
//!   158 B; apply queue pending 114.7 B / 1.0 / 118 B; written 93.7 B / 1.0.
//! - after, keys as `CompactString` (inline up to 24 bytes): table 137.0 B / 0.17 / 139 B;
//!   apply queue pending 95.7 B / 0 / 88 B; written 64.2 B / 0.
//! - the table packing its B-tree each time its keys double ([`Table::compact`]): 95.8 B / 0.12
//!   / 99 B as the keys arrive in order; 74.2 B once packed at the end (as a node does when a
//!   snapshot answer is complete); without packing, 137.0 B. Packing each time the keys grew
//!   by a quarter instead: 78.5 B / 0.10 as they arrive (at most a fifth of them unpacked).
//! - apply slots packed in 8 bytes, each name kept once in a dense list found through a hash
//!   table of ids, the order holding ids: apply queue pending 95.7 -> 53.7 B / 0, written
//!   64.2 -> 48.5 B / 0 (the list grown by doubling: requested, not all touched), and 38.5 B
//!   with the room reserved first as a node's pass over its table does (32 B of list, 6.5 of
//!   hash table).
//! - the list in blocks of 1,024 entries (32 KiB) instead of one vector: pending 43.9 B,
//!   written 38.7 B / 0.001 with or without the room reserved; the blocks fit in the holes the
//!   table's packing left, so the resident set does not grow while the queue fills (+0 B/key
//!   here, +32 B/key with one vector).
//!
//! Every block costs glibc malloc 8 to 24 bytes beyond the bytes requested (a 13-byte key takes a
//! 32-byte chunk), so the block counts matter as much as the bytes: the table's requested bytes
//! hardly change (a key in a B-tree node takes 24 bytes instead of 16) while its resident set
//! shrinks by 19 bytes per key. The resident set does not shrink when memory is freed, so only
//! its growth while filling is shown (the written queue's would be the pending one's).

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

/// Live heap: bytes requested and blocks; the resident set (Linux only).
#[derive(Clone, Copy)]
struct Live {
    bytes: isize,
    blocks: isize,
    rss: Option<isize>,
}

/// `VmRSS` of this process in bytes.
fn rss() -> Option<isize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: isize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Live {
    fn now() -> Live {
        let s = GLOBAL.stats();
        // `bytes_allocated` and `bytes_deallocated` include the growth and shrinking of
        // reallocations (`bytes_reallocated` is their net sum, already counted).
        let bytes = s.bytes_allocated as isize - s.bytes_deallocated as isize;
        let blocks = s.allocations as isize - s.deallocations as isize;
        Live {
            bytes,
            blocks,
            rss: rss(),
        }
    }

    /// Bytes, blocks and resident bytes per key from `self` to `later`.
    fn per_key(self, later: Live) -> (f64, f64, f64) {
        let rss = match (self.rss, later.rss) {
            (Some(a), Some(b)) => (b - a) as f64 / KEYS as f64,
            _ => f64::NAN,
        };
        (
            (later.bytes - self.bytes) as f64 / KEYS as f64,
            (later.blocks - self.blocks) as f64 / KEYS as f64,
            rss,
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
    let fill = std::time::Instant::now();
    let mut table = Table::new();
    for (origin, seq, key) in &keys {
        let ts = HlcTimestamp {
            wall: *seq,
            counter: 0,
        };
        assert!(table.apply(origin, Epoch(1), *seq, key, &v, ts, Millis(0)));
    }
    let sorted = Live::now();
    // Printed, not asserted: what packing as the keys arrive costs in time.
    println!("table filled in {:?}", fill.elapsed());
    let entries: Vec<_> = table.device_keys().map(str::to_owned).collect();
    table.compact();
    assert_eq!(
        table.device_keys().map(str::to_owned).collect::<Vec<_>>(),
        entries,
        "compaction keeps every key, in order"
    );
    drop(entries);
    let filled = Live::now();

    let mut queue = ApplyQueue::new(ApplyConfig::default());
    for t in &targets {
        queue.push_ref(t, &v);
    }
    assert_eq!(queue.pending_len(), KEYS);
    let pushed = Live::now();
    let mut written = 0;
    while let Some(w) = queue.next_write() {
        let id = w.id;
        assert!(queue.complete(id, true));
        written += 1;
    }
    assert_eq!(written, KEYS);
    let drained = Live::now();
    // As a node's pass over its table does: room for every device target reserved first.
    let mut reserved = ApplyQueue::new(ApplyConfig::default());
    reserved.reserve_devices(KEYS);
    for t in &targets {
        reserved.push_ref(t, &v);
        while let Some(w) = reserved.next_write() {
            let id = w.id;
            assert!(reserved.complete(id, true));
        }
    }
    assert_eq!(reserved.stats().confirmed, KEYS as u64);
    let reserved_written = Live::now();

    // Bounds on the bytes requested: the figures above with some room for the standard
    // library's B-tree and hash map internals to change.
    let (as_inserted, _, _) = start.per_key(sorted);
    let (packed, _, _) = start.per_key(filled);
    println!("table as inserted    {as_inserted:6.1} B/key, packed {packed:6.1} B/key");
    assert!(
        packed < as_inserted,
        "compaction packs the B-tree: {as_inserted:.1} -> {packed:.1} B/key"
    );
    for (what, from, to, max_bytes, max_blocks) in [
        ("table as inserted", start, sorted, 86.0, 0.25),
        ("table packed", start, filled, 90.0, 0.25),
        ("apply queue pending", filled, pushed, 48.0, 0.01),
        ("apply queue written", filled, drained, 52.0, 0.01),
        (
            "apply reserved, written",
            drained,
            reserved_written,
            42.0,
            0.01,
        ),
    ] {
        let (bytes, blocks, rss) = from.per_key(to);
        println!("{what:20} {bytes:6.1} B/key, {blocks:.3} blocks/key, RSS +{rss:6.1} B/key");
        assert!(bytes <= max_bytes, "{what}: {bytes:.1} B/key");
        assert!(
            blocks <= max_blocks,
            "{what}: {blocks:.3} blocks/key: a key of up to 24 bytes takes no block"
        );
    }
    assert_eq!(table.keys(hintfed_core::Kind::Device), KEYS);
    assert_eq!(queue.targets_len(), KEYS);
    assert_eq!(reserved.targets_len(), KEYS);
}
