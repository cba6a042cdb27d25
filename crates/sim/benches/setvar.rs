//! The simulator's state work per `Setvar DEVICE_STATE(Custom:...)` (what each write of an
//! agent costs the simulated Asterisk, without the AMI I/O): ten simulated servers each
//! holding 9,000 `Custom:` devices (the federation benchmark's `--servers 10 --devices 1000`:
//! every server holds the other nine servers' devices), written in turn, each write changing
//! the state (so each one emits its `DeviceStateChange`).
//!
//! Run: `cargo bench -p hintfed-sim --bench setvar` (add `-- --quick` for a short run).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hintfed_sim::state::{Pbx, PbxOptions};

const SERVERS: usize = 10;
const DEVICES: usize = 9_000;
const STATES: [&str; 4] = ["INUSE", "NOT_INUSE", "RINGING", "BUSY"];

fn bench(c: &mut Criterion) {
    let mut pbxs: Vec<Pbx> = (0..SERVERS)
        .map(|i| {
            Pbx::new(
                Vec::new(),
                Vec::new(),
                PbxOptions {
                    system_name: Some(format!("pbx-{i}")),
                    phone_duplicates: true,
                },
            )
        })
        .collect();
    let vars: Vec<String> = (0..DEVICES)
        .map(|k| format!("DEVICE_STATE(Custom:pbx-{}-{k})", k % (SERVERS - 1)))
        .collect();
    // Every device known before timing (the steady state of a running federation).
    for pbx in &mut pbxs {
        for var in &vars {
            pbx.setvar(var, "NOT_INUSE").expect("valid Setvar");
        }
    }
    let mut group = c.benchmark_group("setvar");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("device_state_custom", |b| {
        b.iter(|| {
            i += 1;
            let pbx = &mut pbxs[i % SERVERS];
            let var = &vars[(i / SERVERS) % DEVICES];
            let round = i / (SERVERS * DEVICES);
            black_box(pbx.setvar(var, STATES[round % STATES.len()]))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
