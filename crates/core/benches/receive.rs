//! CPU per received fan-out message on an agent: [`Verifier::verify`] then
//! [`Node::on_remote`] (the hot chain of the agent's `Relay::on_incoming`), on a node that
//! already holds the whole table.
//!
//! Topology as in `hintfed-bench run`: 10 origins (`pbx-0` .. `pbx-9`) x 1,000 phones
//! (`PJSIP/b<s>n<j>`), states cycling INUSE, NOT_INUSE, RINGING, BUSY, sealed exactly as
//! agents seal them (one shared key without id, HMAC on). The node is `pbx-0`: it listed its
//! own phones and received every other origin's full sync before the measured updates, which
//! come round-robin over the 9 other origins. Each measured message is verified, handed to
//! `on_remote`, the writes it asks for are taken and reported done (as the AMI write path
//! does), and then the echo of each write (the `DeviceStateChange` Asterisk emits for it) is
//! fed back with `on_local_event`: the whole cycle of one delivery on an agent, with the
//! apply queue in its steady state.
//!
//! - `receive/verify+on_remote`: the whole chain per message;
//! - `receive/verify`: the verifier alone on the same messages.
//!
//! Messages are read into one envelope kept between them ([`Verifier::verify_into`]), as
//! the relay does.
//!
//! Run: `cargo bench -p hintfed-core --bench receive` (add `-- --quick` for a short run).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hintfed_core::{
    Action, ApplyCmd, Body, DeviceState, Envelope, Epoch, HlcTimestamp, KeyRing, Limits,
    LocalEvent, Millis, Node, NodeConfig, Update, Value, Verifier,
};

const ORIGINS: usize = 10;
const DEVICES: usize = 1_000;
/// Measured update rounds pre-sealed (each round changes every remote phone once): 72,000
/// messages, about 15 MB.
const ROUNDS: usize = 8;
const SECRET: &str = "bench-shared-key";
const START: u64 = 1_763_950_000_000;

const CYCLE: [DeviceState; 4] = [
    DeviceState::Inuse,
    DeviceState::NotInuse,
    DeviceState::Ringing,
    DeviceState::Busy,
];

fn name(o: usize) -> String {
    format!("pbx-{o}")
}

fn device(o: usize, j: usize) -> String {
    format!("PJSIP/b{o}n{j}")
}

fn epoch(o: usize) -> Epoch {
    Epoch(START + o as u64)
}

/// The sealed messages: the warm-up (every remote origin's full sync) and the measured
/// updates.
struct Messages {
    warmup: Vec<Vec<u8>>,
    updates: Vec<Vec<u8>>,
}

fn messages() -> Messages {
    let ring = KeyRing::from_secrets([SECRET]);
    let limits = Limits::default();
    let seal = |env: Envelope| ring.seal(&env, &limits).expect("sealable");
    let mut seq = [0u64; ORIGINS];
    let mut next = |o: usize| {
        seq[o] += 1;
        seq[o]
    };
    let update = |o: usize, s: u64, j: usize, state: DeviceState, wall: u64| {
        Envelope::new(
            name(o),
            epoch(o),
            s,
            Body::Update(Update {
                key: device(o, j),
                value: Value::Device(state),
                ts: HlcTimestamp { wall, counter: 0 },
            }),
        )
    };
    let mut warmup = Vec::new();
    for o in 1..ORIGINS {
        let begin = next(o);
        warmup.push(seal(Envelope::new(
            name(o),
            epoch(o),
            begin,
            Body::FullSyncBegin,
        )));
        for j in 0..DEVICES {
            let s = next(o);
            warmup.push(seal(update(o, s, j, DeviceState::NotInuse, START)));
        }
        let s = next(o);
        warmup.push(seal(Envelope::new(
            name(o),
            epoch(o),
            s,
            Body::FullSyncEnd { begin_seq: begin },
        )));
    }
    let mut updates = Vec::new();
    let mut wall = START + 1_000;
    for r in 0..ROUNDS {
        for j in 0..DEVICES {
            for o in 1..ORIGINS {
                let s = next(o);
                wall += 1;
                updates.push(seal(update(o, s, j, CYCLE[r % CYCLE.len()], wall)));
            }
        }
    }
    Messages { warmup, updates }
}

/// Takes the node's actions, reporting every write as done and then feeding its echo, until
/// the node asks for nothing more.
fn drain(node: &mut Node, now: Millis, writes: &mut Vec<ApplyCmd>) {
    loop {
        writes.clear();
        while let Some(a) = node.poll_action() {
            if let Action::Apply(cmd) = a {
                writes.push(cmd);
            }
        }
        if writes.is_empty() {
            return;
        }
        node.on_apply_results(now, writes.iter().map(|c| (c.id, true)));
        for c in writes.drain(..) {
            // As read from Asterisk: the event's own name.
            let key = c.target.to_string();
            node.on_local_event(
                now,
                LocalEvent {
                    key,
                    value: c.value,
                },
            );
        }
    }
}

/// A fresh verifier and node `pbx-0` holding its own phones and the other origins' full
/// syncs.
fn warm(m: &Messages) -> (Verifier, Node) {
    let mut v = Verifier::new(KeyRing::from_secrets([SECRET]), Limits::default());
    let now = Millis(START);
    let mut node = Node::new(NodeConfig::new(name(0)), epoch(0), now);
    let own = (0..DEVICES)
        .map(|j| LocalEvent::device(device(0, j), DeviceState::NotInuse))
        .collect();
    node.on_local_full_sync(now, own);
    let mut targets = Vec::new();
    drain(&mut node, now, &mut targets);
    for bytes in &m.warmup {
        let env = v.verify(bytes).expect("warm-up message verifies");
        node.on_remote(now, &env);
        drain(&mut node, now, &mut targets);
    }
    assert_eq!(
        node.apply_queue().in_flight_len(),
        0,
        "every write reported"
    );
    (v, node)
}

/// Feeds every measured message once to a warmed node, untimed: with `RECEIVE_FIXED=1` the
/// bench does only this (`RECEIVE_FIXED=0`: only the setup), so `perf stat -e instructions:u`
/// of the two runs gives instructions per message, a figure load on the machine does not move.
fn fixed(m: &Messages, feed: bool) {
    let (mut v, mut node) = warm(m);
    let mut targets = Vec::new();
    if feed {
        let (written, echoes) = (node.apply_queue().stats().dispatched, node.stats().echoes);
        let mut env = inbound();
        for (i, bytes) in m.updates.iter().enumerate() {
            let now = Millis(START + 1_000 + i as u64 / 20);
            v.verify_into(black_box(bytes), &mut env).expect("verifies");
            node.on_remote(now, &env);
            drain(&mut node, now, &mut targets);
        }
        let written = node.apply_queue().stats().dispatched - written;
        assert_eq!(written, m.updates.len() as u64, "a write per message");
        assert_eq!(
            node.stats().echoes - echoes,
            written,
            "each write's echo recognised"
        );
    }
    black_box(&node);
}

/// The envelope the agent's relay reads messages into, kept between them
/// ([`Verifier::verify_into`]).
fn inbound() -> Envelope {
    Envelope::new(String::new(), Epoch(0), 0, Body::FullSyncBegin)
}

fn bench(c: &mut Criterion) {
    let m = messages();
    if let Ok(feed) = std::env::var("RECEIVE_FIXED") {
        fixed(&m, feed == "1");
        return;
    }
    let mut group = c.benchmark_group("receive");
    group.throughput(Throughput::Elements(1));
    // The warmed verifier and node carry over between calls, with the next message to
    // feed; warmed again (untimed) once every measured message was fed.
    let mut state: Option<(Verifier, Node, usize)> = None;
    group.bench_function("verify+on_remote", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            let mut targets = Vec::new();
            while left > 0 {
                let (v, node, next) = state.get_or_insert_with(|| {
                    let (v, node) = warm(&m);
                    (v, node, 0)
                });
                let (start, n) = (*next, left.min(m.updates.len() - *next));
                let mut env = inbound();
                let t0 = Instant::now();
                for (i, bytes) in m.updates[start..start + n].iter().enumerate() {
                    // 20 messages per ms: 20,000 updates/s.
                    let now = Millis(START + 1_000 + (start + i) as u64 / 20);
                    v.verify_into(black_box(bytes), &mut env).expect("verifies");
                    node.on_remote(now, &env);
                    drain(node, now, &mut targets);
                }
                total += t0.elapsed();
                *next += n;
                left -= n;
                if *next == m.updates.len() {
                    state = None;
                }
            }
            total
        })
    });
    let mut state: Option<(Verifier, usize)> = None;
    group.bench_function("verify", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let (v, next) = state.get_or_insert_with(|| {
                    let v = Verifier::new(KeyRing::from_secrets([SECRET]), Limits::default());
                    (v, 0)
                });
                let (start, n) = (*next, left.min(m.updates.len() - *next));
                let mut env = inbound();
                let t0 = Instant::now();
                for bytes in &m.updates[start..start + n] {
                    v.verify_into(black_box(bytes), &mut env).expect("verifies");
                    black_box(&env);
                }
                total += t0.elapsed();
                *next += n;
                left -= n;
                if *next == m.updates.len() {
                    state = None;
                }
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
