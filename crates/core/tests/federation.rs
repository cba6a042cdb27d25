//! Deterministic multi-node federation tests: simulated Asterisk servers, agents and hubs on
//! a simulated clock and a faulty network (see `sim/mod.rs`).

mod sim;

use hintfed_core::{DeviceState, Presence, PresenceStatus};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use sim::{Faults, ORIGIN_TIMEOUT, World};

const SETTLE_MS: u64 = 30_000;

fn phone(i: usize) -> String {
    format!("PJSIP/{i}")
}

#[test]
fn a_phone_in_use_on_one_server_shows_everywhere() {
    let mut w = World::new(3, 2, 1);
    w.run(2_000);
    w.agents[0].ast.phone("PJSIP/100", DeviceState::Inuse);
    w.run(500);
    for s in [1, 2] {
        assert_eq!(
            w.agents[s].ast.devices.get("Custom:PJSIP/100"),
            Some(&DeviceState::Inuse)
        );
    }
    assert_eq!(
        w.agents[0].ast.devices.get("Custom:PJSIP/100"),
        None,
        "never applied to its origin"
    );
    // Same device on two servers: aggregated.
    w.agents[1].ast.phone("PJSIP/100", DeviceState::Ringing);
    w.run(500);
    assert_eq!(
        w.agents[2].ast.devices.get("Custom:PJSIP/100"),
        Some(&DeviceState::Ringinuse)
    );
    assert_eq!(
        w.agents[0].ast.devices.get("Custom:PJSIP/100"),
        Some(&DeviceState::Ringing)
    );
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:PJSIP/100"),
        Some(&DeviceState::Inuse)
    );
    // UNKNOWN cannot be written: the substitute shows.
    w.agents[0].ast.phone("PJSIP/200", DeviceState::Unknown);
    w.run(500);
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:PJSIP/200"),
        Some(&DeviceState::NotInuse)
    );
    assert_eq!(w.apply_refused, 0);
    // Each real change was published once, although Asterisk emitted every event twice and
    // every write echoed back.
    assert_eq!(w.updates_published[0], 2);
    assert_eq!(w.updates_published[1], 1);
    assert_eq!(w.updates_published[2], 0);
    let quiet = w.total_updates();
    let applies = w.applies;
    w.run(5_000);
    assert_eq!(w.total_updates(), quiet, "no loop");
    assert_eq!(w.applies, applies, "no loop");
}

#[test]
fn presence_with_commas_and_non_ascii_reaches_everyone() {
    let mut w = World::new(3, 1, 2);
    w.run(2_000);
    let p = Presence::new(PresenceStatus::Dnd, "meeting, room 4", "zurück um 2, sorry");
    w.agents[2]
        .ast
        .set_presence("CustomPresence:alice", p.clone());
    w.run(500);
    for s in 0..3 {
        assert_eq!(
            w.agents[s].ast.presence.get("CustomPresence:alice"),
            Some(&p)
        );
    }
    // A later write elsewhere wins everywhere.
    w.run(100);
    let q = Presence::new(PresenceStatus::Available, "", "");
    w.agents[0]
        .ast
        .set_presence("CustomPresence:alice", q.clone());
    w.run(500);
    for s in 0..3 {
        assert_eq!(
            w.agents[s].ast.presence.get("CustomPresence:alice"),
            Some(&q)
        );
    }
    assert_eq!(
        w.total_updates(),
        2,
        "echoes of the presence writes were swallowed"
    );
}

#[test]
fn a_dead_agent_turns_its_phones_unavailable_and_recovers() {
    let mut w = World::new(3, 2, 3);
    w.run(1_000);
    w.agents[0].ast.phone("PJSIP/100", DeviceState::Inuse);
    w.run(1_000);
    w.kill_agent(0);
    w.run(ORIGIN_TIMEOUT / 2);
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:PJSIP/100"),
        Some(&DeviceState::Inuse)
    );
    w.run(ORIGIN_TIMEOUT + 1_000);
    for s in [1, 2] {
        assert_eq!(
            w.agents[s].ast.devices.get("Custom:PJSIP/100"),
            Some(&DeviceState::Unavailable),
            "down_state after origin_timeout"
        );
    }
    w.agents[0].ast.phone("PJSIP/100", DeviceState::NotInuse);
    w.start_agent(0);
    assert!(w.settle(SETTLE_MS), "{:?}", w.device_mismatches());
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:PJSIP/100"),
        Some(&DeviceState::NotInuse)
    );
}

#[test]
fn lost_asterisk_is_announced_at_once_and_a_restart_reapplies_everything() {
    let mut w = World::new(3, 1, 4);
    w.run(1_000);
    w.agents[0]
        .ast
        .phone("Local/100@phones", DeviceState::Ringing);
    w.agents[1].ast.phone("PJSIP/7", DeviceState::Busy);
    w.run(1_000);
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:Local/100@phones"),
        Some(&DeviceState::Ringing)
    );
    w.asterisk_lost(0);
    w.run(300); // far less than origin_timeout: the agent announced it
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:Local/100@phones"),
        Some(&DeviceState::Unavailable)
    );
    w.asterisk_back(0, true);
    assert!(w.settle(SETTLE_MS), "{:?}", w.device_mismatches());
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:Local/100@phones"),
        Some(&DeviceState::Ringing)
    );
    // pbx-1's Asterisk restarts: its Custom:Local/... device is renamed by Asterisk, hintfed
    // applies it again.
    w.asterisk_lost(1);
    w.asterisk_back(1, true);
    assert!(w.settle(SETTLE_MS), "{:?}", w.device_mismatches());
    assert_eq!(
        w.agents[1].ast.devices.get("Custom:Local/100@phones"),
        Some(&DeviceState::Ringing)
    );
}

#[test]
fn a_restarted_hub_rebuilds_its_table_and_a_late_agent_gets_everything() {
    let mut w = World::new(3, 2, 5);
    w.kill_agent(2);
    w.run(1_000);
    w.agents[0].ast.phone("PJSIP/1", DeviceState::Inuse);
    w.agents[1].ast.phone("PJSIP/2", DeviceState::Onhold);
    w.agents[1].ast.set_presence(
        "CustomPresence:bob",
        Presence::new(PresenceStatus::Away, "x", "y"),
    );
    w.run(1_000);
    w.kill_hub(0);
    w.run(500);
    w.start_hub(0);
    w.run(3_000);
    let h0 = w.hubs[0].hub.as_ref().unwrap();
    assert_eq!(
        h0.table().keys(hintfed_core::Kind::Device),
        2,
        "rebuilt by resync"
    );
    assert_eq!(h0.table().keys(hintfed_core::Kind::Presence), 1);
    // Only hub-0 left; the agent started last gets the full state from its snapshot.
    w.kill_hub(1);
    w.start_agent(2);
    assert!(
        w.settle(SETTLE_MS),
        "{:?} {:?}",
        w.device_mismatches(),
        w.presence_mismatches()
    );
    assert_eq!(
        w.agents[2].ast.devices.get("Custom:PJSIP/1"),
        Some(&DeviceState::Inuse)
    );
    assert!(w.agents[2].ast.presence.contains_key("CustomPresence:bob"));
}

#[test]
fn partitioned_agent_catches_up_after_heal() {
    let mut w = World::new(3, 2, 6);
    w.run(1_000);
    w.agents[2].partitioned = true;
    w.agents[0].ast.phone("PJSIP/1", DeviceState::Inuse);
    w.agents[2].ast.phone("PJSIP/3", DeviceState::Busy);
    w.run(ORIGIN_TIMEOUT + 1_000);
    assert_eq!(
        w.agents[0].ast.devices.get("Custom:PJSIP/3"),
        None,
        "never reached"
    );
    w.agents[2].partitioned = false;
    assert!(w.settle(SETTLE_MS), "{:?}", w.device_mismatches());
}

#[derive(Clone, Debug)]
enum Op {
    Phone(usize, usize, usize),
    Presence(usize, usize, usize),
    Wait(u64),
    KillAgent(usize),
    StartAgent(usize),
    AsteriskLost(usize),
    AsteriskBack(usize, bool),
    KillHub(usize),
    StartHub(usize),
    Partition(usize, bool),
}

const STATES: [DeviceState; 7] = [
    DeviceState::NotInuse,
    DeviceState::Inuse,
    DeviceState::Busy,
    DeviceState::Ringing,
    DeviceState::Onhold,
    DeviceState::Unavailable,
    DeviceState::Unknown,
];

fn op(servers: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..servers, 0..4usize, 0..STATES.len()).prop_map(|(s, d, st)| Op::Phone(s, d, st)),
        3 => (0..servers, 0..2usize, 0..7usize).prop_map(|(s, k, st)| Op::Presence(s, k, st)),
        4 => (10u64..1500).prop_map(Op::Wait),
        1 => (0..servers).prop_map(Op::KillAgent),
        1 => (0..servers).prop_map(Op::StartAgent),
        1 => (0..servers).prop_map(Op::AsteriskLost),
        1 => (0..servers, any::<bool>()).prop_map(|(s, r)| Op::AsteriskBack(s, r)),
        1 => (0..2usize).prop_map(Op::KillHub),
        1 => (0..2usize).prop_map(Op::StartHub),
        1 => (0..servers, any::<bool>()).prop_map(|(s, p)| Op::Partition(s, p)),
    ]
}

fn apply_op(w: &mut World, o: &Op) {
    match *o {
        Op::Phone(s, d, st) => {
            w.agents[s].ast.phone(&phone(d), STATES[st]);
        }
        Op::Presence(s, k, st) => {
            let p = Presence::new(
                PresenceStatus::ALL[st],
                format!("sub,{st}"),
                format!("msg {s}"),
            );
            w.agents[s]
                .ast
                .set_presence(&format!("CustomPresence:p{k}"), p);
        }
        Op::Wait(ms) => w.run(ms),
        Op::KillAgent(s) => w.kill_agent(s),
        Op::StartAgent(s) => {
            if w.agents[s].node.is_none() {
                w.start_agent(s)
            }
        }
        Op::AsteriskLost(s) => {
            if w.agents[s].ast.up {
                w.asterisk_lost(s)
            }
        }
        Op::AsteriskBack(s, restarted) => {
            if !w.agents[s].ast.up {
                w.asterisk_back(s, restarted)
            }
        }
        Op::KillHub(h) => {
            // Keep at least one hub alive during the run so state can flow.
            if w.hubs.iter().filter(|h| h.hub.is_some()).count() > 1 {
                w.kill_hub(h)
            }
        }
        Op::StartHub(h) => {
            if w.hubs[h].hub.is_none() {
                w.start_hub(h)
            }
        }
        Op::Partition(s, p) => w.agents[s].partitioned = p,
    }
    w.step();
}

fn heal(w: &mut World) {
    w.faults = Faults {
        max_delay_ms: 30,
        drop_percent: 0,
        dup_percent: 5,
    };
    for h in 0..w.hubs.len() {
        if w.hubs[h].hub.is_none() {
            w.start_hub(h);
        }
    }
    for s in 0..w.agents.len() {
        w.agents[s].partitioned = false;
        if !w.agents[s].ast.up {
            w.asterisk_back(s, false);
        }
        if w.agents[s].node.is_none() {
            w.start_agent(s);
        }
    }
}

/// The body of [`federation_converges_under_faults`], callable for one case.
fn converges_under_faults(seed: u64, ops: &[Op], victim: usize) -> Result<(), TestCaseError> {
    let mut w = World::new(3, 2, seed);
    w.faults = Faults {
        max_delay_ms: 300,
        drop_percent: 10,
        dup_percent: 10,
    };
    w.trace = std::env::var("FED_TRACE_ALL").is_ok();
    w.run(500);
    for o in ops {
        apply_op(&mut w, o);
    }
    heal(&mut w);
    prop_assert!(
        w.settle(SETTLE_MS),
        "devices {:?} presence {:?} {} {}",
        w.device_mismatches(),
        w.presence_mismatches(),
        w.dump_presence(),
        (0..4).map(|d| w.dump_device(&phone(d))).collect::<String>()
    );

    // No loop: once converged and the repairs still under way are done (a hub that asked
    // for a resync whose request was lost asks again after its 5 s retry), nothing but
    // heartbeats flows.
    w.run(8_000);
    let (updates, applies) = (w.total_updates(), w.applies);
    w.trace = std::env::var("FED_TRACE").is_ok();
    w.run(5_000);
    w.trace = false;
    prop_assert_eq!(w.total_updates(), updates);
    prop_assert_eq!(w.applies, applies);
    prop_assert!(w.device_mismatches().is_empty());

    // A dead origin's devices reach UNAVAILABLE everywhere, then recover.
    w.kill_agent(victim);
    w.run(ORIGIN_TIMEOUT + 2_000);
    prop_assert!(
        w.device_mismatches().is_empty(),
        "down: {:?}",
        w.device_mismatches()
    );
    w.start_agent(victim);
    prop_assert!(w.settle(SETTLE_MS), "recovery: {:?}", w.device_mismatches());
    prop_assert!(w.presence_mismatches().is_empty());
    Ok(())
}

/// Found by the property test: a restarted hub asked an origin to resync, the republish
/// reached it reordered, and the hole left above the closed one was asked for again at once
/// (ignored by the origin as too soon), so the hub's retry republished long after the
/// federation had converged.
#[test]
fn a_restarted_hub_is_repaired_by_one_republish() {
    use Op::*;
    let ops = [
        KillHub(0),
        Wait(1079),
        AsteriskLost(1),
        Wait(928),
        AsteriskBack(0, false),
        KillAgent(2),
        Phone(0, 3, 2),
        Phone(1, 0, 5),
        Wait(946),
    ];
    converges_under_faults(15291509127031539495, &ops, 1).unwrap();
}

/// Found by the property test: a snapshot request duplicated on the way was answered twice
/// by a hub, and the node mixed the two answers (the later one's summary with the earlier
/// one's entries), so an update the summary claimed covered was dropped when it arrived.
#[test]
fn a_duplicated_snapshot_request_does_not_lose_an_update() {
    use Op::*;
    let ops = [
        AsteriskLost(2),
        Phone(1, 3, 3),
        AsteriskBack(0, false),
        Phone(2, 1, 5),
        Wait(621),
        Presence(2, 1, 1),
        Wait(838),
        Partition(0, true),
        KillHub(0),
        KillAgent(0),
        KillHub(1),
        Phone(0, 0, 0),
        Presence(1, 0, 2),
        Phone(2, 0, 2),
        Wait(1470),
        Phone(2, 0, 4),
        StartHub(1),
        Partition(2, false),
        KillAgent(2),
        Phone(2, 1, 0),
        Phone(1, 1, 0),
        Presence(1, 1, 3),
        Wait(85),
        Wait(610),
        KillHub(1),
        Wait(776),
        Phone(1, 2, 4),
        AsteriskLost(1),
        Wait(579),
        AsteriskLost(2),
        Presence(2, 0, 1),
        Phone(2, 2, 0),
        Phone(2, 1, 4),
        Wait(255),
        Phone(0, 3, 0),
    ];
    converges_under_faults(4529993564103197076, &ops, 1).unwrap();
}

proptest! {
    // FED_CASES=n runs more cases (default kept small so the suite stays fast). The default
    // run is deterministic (a fixed seed: the suite never fails by chance); FED_SEED=<n>
    // explores other cases, FED_SEED=random a new set each run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("FED_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12),
        rng_seed: match std::env::var("FED_SEED").ok().as_deref() {
            Some("random") => RngSeed::Random,
            Some(n) => RngSeed::Fixed(n.parse().expect("FED_SEED is a number or 'random'")),
            None => RngSeed::Fixed(0x0068_696e_7466_6564),
        },
        max_shrink_iters: 50,
        ..ProptestConfig::default()
    })]

    /// Random events, restarts and network faults; after healing, every live server shows the
    /// aggregate of the others' last states, presence is identical everywhere, the
    /// federation falls silent (no loop), and a dead origin's devices go to UNAVAILABLE and
    /// come back.
    #[test]
    fn federation_converges_under_faults(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(3), 1..40),
        victim in 0..3usize,
    ) {
        converges_under_faults(seed, &ops, victim)?;
    }

    /// Without faults, the number of published updates is bounded by the real changes plus
    /// what full syncs list on purpose: nothing is forwarded twice, nothing loops.
    #[test]
    fn message_count_is_bounded_by_real_changes(
        seed in any::<u64>(),
        events in proptest::collection::vec((0..3usize, 0..4usize, 0..STATES.len(), 0..300u64), 1..40),
    ) {
        let mut w = World::new(3, 2, seed);
        w.faults = Faults { max_delay_ms: 100, drop_percent: 0, dup_percent: 20 };
        w.run(1_000);
        let base_updates = w.total_updates();
        let mut real = 0u64;
        for (s, d, st, wait) in events {
            if w.agents[s].ast.phone(&phone(d), STATES[st]) {
                real += 1;
            }
            w.run(wait + sim::STEP);
        }
        prop_assert!(w.settle(SETTLE_MS), "{:?}", w.device_mismatches());
        prop_assert!(w.total_updates() - base_updates <= real, "{} updates for {} changes", w.total_updates() - base_updates, real);
        // Each change is applied at most once per other server, plus nothing else.
        prop_assert!(w.applies <= real * 2 + 3 * 4, "{} applies for {} changes", w.applies, real);
    }
}
