//! The broker against three simulated Asterisks (hintfed-sim, in process, over real AMI TCP)
//! and, for res_zmq_manager reachability, the pyzmq stand-in of `tests/py/`: device and
//! presence propagation, no loop, aggregation, a dead server not delaying the others,
//! restart re-apply, down state on loss. The binary's own behaviour (original config file,
//! exit 64, positional FILE, count_messages, SIGTERM) is in `tests/binary.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hintfed_core::{Presence, PresenceStatus};
use hintfed_sim::DeviceState as S;
use hintfed_testkit::process::pyzmq_available;

/// The `Setvar`s each simulator received so far.
fn setvar_totals(sims: &[hintfed_sim::SimHandle]) -> Vec<u64> {
    sims.iter().map(|s| s.stats().setvar_total).collect()
}

/// The `Setvar`s each simulator received since `before` ([`setvar_totals`]).
fn setvar_delta(sims: &[hintfed_sim::SimHandle], before: &[u64]) -> Vec<u64> {
    setvar_totals(sims)
        .iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect()
}

/// Sets the marker phone `PJSIP/200` to `st` on the first simulator and waits until every
/// other one mirrors it: anything an earlier change could cause has landed too.
async fn marker(sims: &[hintfed_sim::SimHandle], st: S) {
    sims[0].set_device_state("PJSIP/200", st).expect("set");
    eventually("marker on the others", || {
        sims[1..]
            .iter()
            .all(|s| custom(s, "PJSIP/200") == st.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_presence_propagate_without_loop_and_aggregate() {
    let sims = [sim("pbx-a").await, sim("pbx-b").await, sim("pbx-c").await];
    let sections: Vec<String> = sims
        .iter()
        .enumerate()
        .map(|(i, s)| ami_section(&format!("s{i}"), &format!("Console {}", i + 1), s))
        .collect();
    let b = Broker::start(&config("presence = yes\n", &sections)).await;
    b.synced().await;
    quiescent(&sims).await;

    let before = setvar_totals(&sims);
    sims[0]
        .set_device_state("PJSIP/100", S::Inuse)
        .expect("set");
    eventually("Custom:PJSIP/100 INUSE on the two others", || {
        custom(&sims[1], "PJSIP/100") == "INUSE" && custom(&sims[2], "PJSIP/100") == "INUSE"
    })
    .await;
    // A marker after it: once it landed, anything the first change could cause has too.
    marker(&sims, S::Ringing).await;
    assert_eq!(
        setvar_delta(&sims, &before),
        vec![0, 2, 2],
        "one Setvar per change per other server, none back"
    );
    assert_ne!(
        custom(&sims[0], "PJSIP/100"),
        "INUSE",
        "never mirrored to its origin"
    );

    // Presence with a comma in the message, set on the third server.
    let before = setvar_totals(&sims);
    let p = Presence::new(PresenceStatus::Dnd, "lunch", "back at 2, maybe");
    sims[2]
        .setvar("PRESENCE_STATE(CustomPresence:alice)", &p.to_setvar_value())
        .expect("presence");
    for s in &sims[..2] {
        eventually("presence with its message on the others", || {
            s.getvar("PRESENCE_STATE(CustomPresence:alice,value)") == "dnd"
                && s.getvar("PRESENCE_STATE(CustomPresence:alice,subtype)") == "lunch"
                && s.getvar("PRESENCE_STATE(CustomPresence:alice,message)") == "back at 2, maybe"
        })
        .await;
    }
    marker(&sims, S::NotInuse).await;
    let delta = setvar_delta(&sims, &before);
    // First: the presence; second: the presence and the marker; third (where the dialplan
    // wrote it, not counted as an AMI action): the marker only — the mirrors' echoes are
    // suppressed by value, so nothing comes back to it.
    assert_eq!(
        delta,
        vec![1, 2, 1],
        "presence: one write per other server, no echo"
    );

    // A change made within 3 s of the mirrored one is not lost (the original's window).
    let p2 = Presence::new(PresenceStatus::Available, "", "");
    sims[1]
        .setvar(
            "PRESENCE_STATE(CustomPresence:alice)",
            &p2.to_setvar_value(),
        )
        .expect("presence");
    for s in [&sims[0], &sims[2]] {
        eventually("quick second presence change", || {
            s.getvar("PRESENCE_STATE(CustomPresence:alice,value)") == "available"
        })
        .await;
    }

    // The same device on two servers: aggregated by Asterisk's rules on the third.
    sims[0]
        .set_device_state("PJSIP/300", S::Inuse)
        .expect("set");
    sims[1]
        .set_device_state("PJSIP/300", S::Ringing)
        .expect("set");
    eventually("RINGING + INUSE = RINGINUSE on the third", || {
        custom(&sims[2], "PJSIP/300") == "RINGINUSE"
    })
    .await;
    eventually("each of the two sees the other's", || {
        custom(&sims[0], "PJSIP/300") == "RINGING" && custom(&sims[1], "PJSIP/300") == "INUSE"
    })
    .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_does_not_delay_the_others() {
    let sims = [sim("pbx-a").await, sim("pbx-b").await, sim("pbx-c").await];
    let sections = sections(&sims);
    let b = Broker::start(&config("", &sections)).await;
    b.synced().await;
    quiescent(&sims).await;

    let states = [
        S::Inuse,
        S::NotInuse,
        S::Busy,
        S::NotInuse,
        S::Ringing,
        S::NotInuse,
    ];
    let mut baseline = Duration::ZERO;
    for st in states {
        baseline = baseline.max(propagate(&sims[0], &sims[1], st).await);
    }
    // The third hangs: it reads every action and answers none.
    sims[2].blackhole(None);
    let hung_before = sims[2].stats().blackholed_actions;
    let mut during = Duration::ZERO;
    for st in states {
        during = during.max(propagate(&sims[0], &sims[1], st).await);
    }
    // The hung server's relay writes beside the live pair's, not before them: its actions
    // are counted when the simulator reads them, whenever that is after the propagations.
    eventually("the broker writes to the hung server meanwhile", || {
        sims[2].stats().blackholed_actions > hung_before
    })
    .await;
    // The original broker waited out each request to a dead server in turn (the AMI action
    // timeout is at least 5 s); a relay per server must not: stay well under a fraction of
    // it, and within a generous multiple of the baseline.
    let bound = (baseline * 20).max(Duration::from_millis(1250));
    assert!(
        during < bound,
        "propagation between the live servers took {during:?} (baseline {baseline:?}, bound {bound:?})"
    );
    sims[2].unblackhole();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reapplies_and_a_lost_server_goes_down_state() {
    let sims = [sim("pbx-a").await, sim("pbx-b").await, sim("pbx-c").await];
    let sections = sections(&sims);
    let b = Broker::start(&config("down_state = UNAVAILABLE\n", &sections)).await;
    b.synced().await;

    sims[0].set_device_state("PJSIP/100", S::Busy).expect("set");
    // A phone only the third server has (the hinted ones are reported idle by every server,
    // and idle outranks UNAVAILABLE in Asterisk's aggregate).
    sims[2].set_device_state("PJSIP/c1", S::Inuse).expect("set");
    eventually("states applied", || {
        custom(&sims[1], "PJSIP/100") == "BUSY"
            && custom(&sims[1], "PJSIP/c1") == "INUSE"
            && custom(&sims[0], "PJSIP/c1") == "INUSE"
    })
    .await;

    // The second restarts: its Custom: devices with '/' do not survive; the broker re-applies.
    let syncs = b.full_syncs(1);
    sims[1].restart(Duration::ZERO);
    eventually("restart seen", || b.full_syncs(1) > syncs).await;
    eventually("every remote state back on the restarted server", || {
        custom(&sims[1], "PJSIP/100") == "BUSY" && custom(&sims[1], "PJSIP/c1") == "INUSE"
    })
    .await;

    // The third is lost (its Asterisk goes away): its devices show down_state elsewhere.
    sims[2].restart(Duration::from_secs(60));
    eventually(
        "the lost server's device is UNAVAILABLE on the others",
        || {
            custom(&sims[0], "PJSIP/c1") == "UNAVAILABLE"
                && custom(&sims[1], "PJSIP/c1") == "UNAVAILABLE"
        },
    )
    .await;
    // The others keep working meanwhile.
    sims[0]
        .set_device_state("PJSIP/100", S::NotInuse)
        .expect("set");
    eventually("live pair unaffected", || {
        custom(&sims[1], "PJSIP/100") == "NOT_INUSE"
    })
    .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn res_zmq_manager_servers_through_the_standin() {
    if !pyzmq_available() {
        return;
    }
    let sims = [sim("pbx-a").await, sim("pbx-b").await, sim("pbx-c").await];
    // a: events and actions over res_zmq_manager; b: AMI; c: mixed (events from
    // res_zmq_manager, actions over AMI).
    let mut za = Standin::start(&sims[0]).await;
    let mut zc = Standin::start(&sims[2]).await;
    let sections = vec![
        format!(
            "[za]\nname = Console 1\naddr = 127.0.0.1\ncmd_port = {}\nevt_port = {}\nami_trace = no\n",
            za.cmd, za.evt
        ),
        ami_section("b", "Console 2", &sims[1]),
        format!(
            "[zc]\nname = Console 3\naddr = 127.0.0.1\ncmd_port = {}\nevt_port = {}\nami_port = {}\nusername = admin\nsecret = adminsecret\n",
            zc.cmd,
            zc.evt,
            sims[2].local_addr().port()
        ),
    ];
    // A short request timeout: a hung res_zmq_manager is declared lost sooner.
    let text = config("presence = yes\n", &sections)
        .replace("request_timeout = 1000", "request_timeout = 400");
    let b = Broker::start(&text).await;
    b.synced().await;

    sims[0]
        .set_device_state("PJSIP/100", S::Inuse)
        .expect("set");
    eventually("zmq events → AMI and mixed", || {
        custom(&sims[1], "PJSIP/100") == "INUSE" && custom(&sims[2], "PJSIP/100") == "INUSE"
    })
    .await;
    sims[0]
        .set_device_state("PJSIP/za1", S::Inuse)
        .expect("set");
    eventually("a phone only the zmq server has", || {
        custom(&sims[1], "PJSIP/za1") == "INUSE" && custom(&sims[2], "PJSIP/za1") == "INUSE"
    })
    .await;
    sims[1].set_device_state("PJSIP/200", S::Busy).expect("set");
    eventually("AMI events → Setvar over res_zmq_manager", || {
        custom(&sims[0], "PJSIP/200") == "BUSY" && custom(&sims[2], "PJSIP/200") == "BUSY"
    })
    .await;
    sims[2]
        .set_device_state("PJSIP/300", S::Ringing)
        .expect("set");
    eventually("mixed server's events", || {
        custom(&sims[0], "PJSIP/300") == "RINGING" && custom(&sims[1], "PJSIP/300") == "RINGING"
    })
    .await;
    let p = Presence::new(PresenceStatus::Away, "meeting", "room 4, floor 2");
    sims[1]
        .setvar("PRESENCE_STATE(CustomPresence:bob)", &p.to_setvar_value())
        .expect("presence");
    eventually("presence through res_zmq_manager keeps its message", || {
        sims[0].getvar("PRESENCE_STATE(CustomPresence:bob,message)") == "room 4, floor 2"
            && sims[2].getvar("PRESENCE_STATE(CustomPresence:bob,value)") == "away"
    })
    .await;

    // The res_zmq_manager server hangs (SIGUSR1: requests read, never answered, no events):
    // the two others keep propagating promptly.
    let mut baseline = Duration::ZERO;
    let states = [S::Inuse, S::NotInuse, S::Busy, S::NotInuse];
    for st in states {
        baseline = baseline.max(propagate(&sims[1], &sims[2], st).await);
    }
    za.blackhole();
    let mut during = Duration::ZERO;
    for st in states {
        during = during.max(propagate(&sims[1], &sims[2], st).await);
    }
    let bound = (baseline * 20).max(Duration::from_millis(500));
    assert!(
        during < bound,
        "propagation between the live servers took {during:?} (baseline {baseline:?}, bound {bound:?})"
    );
    // The hung server is lost (its pings go unanswered): its phone shows down_state.
    eventually("the hung server's phone UNAVAILABLE on the others", || {
        custom(&sims[1], "PJSIP/za1") == "UNAVAILABLE"
            && custom(&sims[2], "PJSIP/za1") == "UNAVAILABLE"
    })
    .await;
    // Nobody sent Getvar through res_zmq_manager (the stand-in exits 139 if anyone does).
    za.assert_alive();
    zc.assert_alive();
    b.stop().await;
}

/// Sets `PJSIP/timed` (a phone no other server reports) to `st` on `from` and returns how
/// long until `to` shows it.
async fn propagate(from: &hintfed_sim::SimHandle, to: &hintfed_sim::SimHandle, st: S) -> Duration {
    let t0 = Instant::now();
    from.set_device_state("PJSIP/timed", st).expect("set");
    eventually("propagation", || custom(to, "PJSIP/timed") == st.as_str()).await;
    t0.elapsed()
}

/// A burst published while one relay does not read at all (not started yet) overflows its
/// bus queue: the bus drops for that relay only, and once it reads again the sender is asked
/// to republish, so every state still lands (the full-queue policy of `hintfed_broker::bus`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_for_a_stalled_relay_are_repaired_by_a_republish() {
    use hintfed_agent::agent::pbx_config;
    use hintfed_agent::relay::{Relay, RelayHooks, now_millis};
    use hintfed_asterisk::Pbx;
    use hintfed_broker::broker::{node_config, relay_config};
    use hintfed_broker::bus::{BusConfig, InProcessBus};
    use hintfed_broker::config::{BrokerConfig, ENV_SECTIONS};
    use hintfed_core::{Epoch, Node};
    use hintfed_daemon::config::ConfigFile;
    use tokio_util::sync::CancellationToken;

    let sims = [sim("pbx-a").await, sim("pbx-b").await];
    let sections = sections(&sims);
    let text = config("", &sections);
    let file = ConfigFile::parse("b.ini", &text, Vec::<(String, String)>::new(), ENV_SECTIONS)
        .expect("parse");
    let cfg = BrokerConfig::from_file(&file).expect("valid");
    let bus = InProcessBus::new(BusConfig { capacity: 16 });
    let ports: Vec<_> = cfg
        .servers
        .iter()
        .map(|s| bus.port(s.name.clone()))
        .collect();
    let stop = CancellationToken::new();
    tokio::spawn(
        bus.clone()
            .run_repair(Duration::from_millis(50), stop.clone()),
    );
    let mut ports = ports.into_iter();
    let spawn_relay = |i: usize, port| {
        let server = &cfg.servers[i];
        let pbx = Pbx::start(pbx_config(&server.asterisk)).expect("pbx");
        let now = now_millis();
        let node = Node::new(node_config(&cfg, server), Epoch(now.0), now);
        let relay = Relay::new(
            node,
            pbx,
            port,
            relay_config(&cfg, server),
            RelayHooks::default(),
        )
        .expect("relay");
        let status = relay.handle().status();
        tokio::spawn(relay.run(stop.clone()));
        status
    };
    let port_a = ports.next().expect("port a");
    let a_stats = port_a.stats();
    let a = spawn_relay(0, port_a);
    let port_b = ports.next().expect("port b");
    let b_stats = port_b.stats();
    eventually("a synced", || a.counters().full_syncs >= 1).await;
    let n = 100;
    for i in 0..n {
        sims[0]
            .set_device_state(&format!("PJSIP/burst{i}"), S::Busy)
            .expect("set");
    }
    eventually("b's queue overflowed", || b_stats.snapshot().2 > 0).await;
    let a_published = a.counters().published;
    eventually("a published the burst", || {
        a.counters().published >= a_published.max(n)
    })
    .await;
    // Now the stalled relay starts reading.
    let b = spawn_relay(1, port_b);
    eventually("b synced", || b.counters().full_syncs >= 1).await;
    eventually(
        "every device of the burst on the stalled relay's server",
        || (0..n).all(|i| custom(&sims[1], &format!("PJSIP/burst{i}")) == "BUSY"),
    )
    .await;
    // The bus counts the request under its lock, which the sender's republish also takes:
    // once a republished state landed, the request is counted.
    assert!(
        a_stats.snapshot().3 > 0,
        "the repair asked the sender to republish"
    );
    // The relay's counters are a copy its status refreshes on its tick (`RelayStatus::
    // counters`), not when the message arrives: the burst can land on the other server
    // before the sender's next refresh shows the request it accepted, so wait for it.
    eventually(
        "the sender's status counts the resync request it got",
        || a.counters().accepted > 0,
    )
    .await;
    stop.cancel();
}

/// A burst larger than a relay's bus queue: whatever the bus drops for the lagging relay is
/// repaired by the sender's republish (the full-queue policy of `hintfed_broker::bus`), so
/// every state still lands. On one thread the receiving relay cannot keep up with the burst.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_beyond_the_bus_queue_still_lands_everywhere() {
    let sims = [sim("pbx-a").await, sim("pbx-b").await];
    let sections = sections(&sims);
    let b = Broker::start(&config("bus_capacity = 16\n", &sections)).await;
    b.synced().await;
    let n = 150;
    for i in 0..n {
        sims[0]
            .set_device_state(&format!("PJSIP/burst{i}"), S::Busy)
            .expect("set");
    }
    let relays = &b.running.as_ref().expect("running").relays;
    let landed = || {
        (0..n)
            .filter(|i| custom(&sims[1], &format!("PJSIP/burst{i}")) == "BUSY")
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while landed() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} landed; bus {:?} / {:?}; relay {:?}",
            landed(),
            relays[1].bus.snapshot(),
            relays[0].bus.snapshot(),
            relays[1].status.counters()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, _, dropped, _) = relays[1].bus.snapshot();
    eprintln!("dropped for the lagging relay: {dropped}");
    if dropped > 0 {
        // Not asserted at once: a drop the burst did not need repaired (a heartbeat) may
        // still wait for the next repair round, which comes once the queue has room.
        eventually("drops are repaired by a republish", || {
            relays[0].bus.snapshot().3 > 0
        })
        .await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_applies_exclude_to_every_relay() {
    let sims = [sim("pbx-a").await, sim("pbx-b").await];
    let sections = sections(&sims);
    let before = config("", &sections);
    let b = Broker::start(&before).await;
    b.synced().await;
    sims[0]
        .set_device_state("PJSIP/200", S::Inuse)
        .expect("set");
    eventually("PJSIP/200 federated before the reload", || {
        custom(&sims[1], "PJSIP/200") == "INUSE"
    })
    .await;

    // The new file excludes PJSIP/200 and changes a restart-only key.
    let after = config(
        "exclude = ^Custom:|^PJSIP/200$\nbus_capacity = 64\n",
        &sections,
    );
    let syncs: Vec<u64> = (0..2).map(|i| b.full_syncs(i)).collect();
    let report = hintfed_broker::broker::reload(
        &Broker::config(&before),
        &Broker::config(&after),
        b.relays(),
    )
    .await;
    assert_eq!(
        report.applied,
        vec!["exclude Some(\"^Custom:\") -> Some(\"^Custom:|^PJSIP/200$\")".to_owned()]
    );
    assert_eq!(
        report.need_restart,
        vec!["[general] bus_capacity".to_owned()]
    );
    eventually("every relay resynced after the reload", || {
        (0..2).all(|i| b.full_syncs(i) > syncs[i])
    })
    .await;

    // An excluded device no longer propagates; the others still do (marker after it).
    sims[0].set_device_state("PJSIP/200", S::Busy).expect("set");
    sims[0]
        .set_device_state("PJSIP/100", S::Ringing)
        .expect("set");
    eventually("marker propagates", || {
        custom(&sims[1], "PJSIP/100") == "RINGING"
    })
    .await;
    assert_ne!(
        custom(&sims[1], "PJSIP/200"),
        "BUSY",
        "an excluded device was federated after the reload"
    );
    // Same file again: nothing to apply.
    let same = hintfed_broker::broker::reload(
        &Broker::config(&after),
        &Broker::config(&after),
        b.relays(),
    )
    .await;
    assert_eq!(same, Default::default());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_gauges_count_every_server_not_the_last_relay_view() {
    use std::sync::Arc;
    let sims = [sim("pbx-a").await, sim("pbx-b").await, sim("pbx-c").await];
    let sections = sections(&sims);
    let metrics = Arc::new(hintfed_daemon::metrics::Metrics::new("hintfed-broker", "0"));
    let b = Broker::start_with(
        &config("", &sections),
        hintfed_broker::broker::BrokerHooks {
            metrics: Some(metrics.clone()),
            ..Default::default()
        },
    )
    .await;
    b.synced().await;
    // Each relay sees the two others up (its own view, private to it) ...
    eventually("every relay sees two other origins up", || {
        b.relays()
            .iter()
            .all(|r| r.metrics.as_ref().is_some_and(|m| m.origins_up.get() == 2))
    })
    .await;
    // ... while the exported gauges count the broker's three servers, whatever the relays
    // wrote last.
    hintfed_broker::broker::update_origin_gauges(b.relays(), &metrics);
    assert_eq!(
        (metrics.origins_up.get(), metrics.origins_down.get()),
        (3, 0)
    );
    assert!(metrics.encode().contains("hintfed_origins_up 3"));

    // The third Asterisk goes away: 2 up, 1 down.
    sims[2].restart(Duration::from_secs(60));
    eventually("third server counted down", || {
        hintfed_broker::broker::update_origin_gauges(b.relays(), &metrics);
        (metrics.origins_up.get(), metrics.origins_down.get()) == (2, 1)
    })
    .await;
    assert!(metrics.encode().contains("hintfed_origins_down 1"));
    b.stop().await;
}
