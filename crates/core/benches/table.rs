//! CPU per device update merged into a [`Table`] ([`Table::apply_settling`], as an agent's
//! node calls it for each fan-out message) with a working set larger than the caches: as in
//! `hintfed-bench run` (10 agents of 10 origins x 1,000 phones each), 10 tables of 10,000
//! device keys, updated in a pseudo-random order interleaved over the tables, so most lookups
//! miss the caches as the agents' do on the real run.
//!
//! - `table/apply_settling/10x10000`: one update of a known key (the steady state);
//! - `table/device/10x10000`: one read-only lookup ([`Table::device`]) of a known key.
//!
//! Run: `cargo bench -p hintfed-core --bench table` (add `-- --quick` for a short run). With
//! `TABLE_FIXED=1` the bench only fills the tables and applies every drawn update once
//! (`TABLE_FIXED=0`: only fills them), so `perf stat -e task-clock,cycles:u` of the two runs
//! gives the CPU per update, a figure the other processes' load moves less than time. With
//! `TABLE_ORDER=seq` the updates come in the load tool's order instead (each origin's phones
//! in turn, every update applied to every table), where consecutive updates of an origin hit
//! neighbouring keys. With `TABLE_POLLUTE=KB` the fixed run also writes that many KiB of a
//! 64 MiB buffer after each update (in both runs), as the other processes of the real run
//! (10 agents, a hub, the simulator on 2 cores) evict the caches between two deliveries.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hintfed_core::table::Settle;
use hintfed_core::{DeviceState, Epoch, HlcTimestamp, Millis, Origins, Table, Value};

const TABLES: usize = 10;
const ORIGINS: usize = 10;
const DEVICES: usize = 1_000;
/// Updates pre-drawn (each a table, an origin and a phone).
const DRAWN: usize = 1 << 20;

const STATES: [Value; 4] = [
    Value::Device(DeviceState::Inuse),
    Value::Device(DeviceState::NotInuse),
    Value::Device(DeviceState::Ringing),
    Value::Device(DeviceState::Busy),
];

/// One update of a known key (the steady state): the drawn `(table, origin, phone)` at `seq`.
fn update(
    tables: &mut [(Table, Origins)],
    names: &[String],
    keys: &[Vec<String>],
    (t, o, j): (u16, u16, u16),
    seq: u64,
) {
    let (table, origins) = &mut tables[t as usize];
    let settle = Settle {
        origins,
        down_state: DeviceState::Unavailable,
        exclude: Some(&names[0]),
    };
    let ts = HlcTimestamp {
        wall: seq,
        counter: 0,
    };
    let applied = table.apply_settling(
        &names[o as usize],
        Epoch(1),
        seq,
        black_box(&keys[o as usize][j as usize]),
        &STATES[seq as usize % STATES.len()],
        ts,
        Millis(seq),
        Some(settle),
    );
    black_box(applied);
}

/// The tables filled (every origin's phones, in order), each with its origins heard from.
fn filled(names: &[String], keys: &[Vec<String>]) -> Vec<(Table, Origins)> {
    (0..TABLES)
        .map(|_| {
            let mut t = Table::new();
            let mut origins = Origins::new(60_000);
            for (o, name) in names.iter().enumerate() {
                origins.observe(name, Epoch(1), 1, false, Millis(0));
                for (j, key) in keys[o].iter().enumerate() {
                    let ts = HlcTimestamp {
                        wall: 1,
                        counter: 0,
                    };
                    t.apply(name, Epoch(1), j as u64 + 1, key, &STATES[1], ts, Millis(0));
                }
            }
            t.compact();
            (t, origins)
        })
        .collect()
}

/// `DRAWN` pseudo-random `(table, origin, phone)` (or in the load tool's order, see the
/// module), the origin never the first one (each table's own, left out of the aggregate as
/// a node does).
fn draws() -> Vec<(u16, u16, u16)> {
    if std::env::var("TABLE_ORDER").is_ok_and(|o| o == "seq") {
        return (0..DRAWN)
            .map(|k| {
                let t = k % TABLES;
                let o = 1 + (k / TABLES) % (ORIGINS - 1);
                let j = (k / TABLES / (ORIGINS - 1)) % DEVICES;
                (t as u16, o as u16, j as u16)
            })
            .collect();
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..DRAWN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = (x % TABLES as u64) as u16;
            let o = 1 + ((x >> 16) % (ORIGINS as u64 - 1)) as u16;
            let j = ((x >> 32) % DEVICES as u64) as u16;
            (t, o, j)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..ORIGINS).map(|o| format!("pbx-{o}")).collect();
    let keys: Vec<Vec<String>> = (0..ORIGINS)
        .map(|o| (0..DEVICES).map(|j| format!("PJSIP/b{o}n{j}")).collect())
        .collect();
    let draws = draws();
    let mut tables = filled(&names, &keys);
    let mut seq = 1_000_000u64;
    if let Ok(feed) = std::env::var("TABLE_FIXED") {
        let kb: usize = std::env::var("TABLE_POLLUTE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut junk = vec![0u8; 64 << 20];
        let mut off = 0usize;
        for d in &draws {
            if feed == "1" {
                seq += 1;
                update(&mut tables, &names, &keys, *d, seq);
            }
            for _ in 0..kb * 16 {
                junk[off] = junk[off].wrapping_add(1);
                off = (off + 64) % junk.len();
            }
        }
        black_box(&junk);
        black_box(&tables);
        return;
    }
    let mut next = 0usize;
    let mut group = c.benchmark_group("table");
    group.throughput(Throughput::Elements(1));
    group.bench_function("apply_settling/10x10000", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                seq += 1;
                update(&mut tables, &names, &keys, draws[next], seq);
                next = (next + 1) % DRAWN;
            }
            t0.elapsed()
        })
    });
    group.bench_function("device/10x10000", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                let (t, o, j) = draws[next];
                next = (next + 1) % DRAWN;
                let (table, _) = &tables[t as usize];
                let got = table.device(black_box(&keys[o as usize][j as usize]));
                black_box(got.map(|e| e.len()));
            }
            t0.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
