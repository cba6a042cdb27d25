//! The relay against in-process simulated Asterisks (hintfed-sim over real AMI TCP) and an
//! in-memory [`FederationTransport`] bus (the kind the broker plugs in): propagation of
//! device and presence states, no loop, forged messages rejected, down state on loss and
//! recovery, reload of the device filter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hintfed_agent::relay::{DeviceFilter, Relay, RelayConfig, RelayHandle, RelayHooks, now_millis};
use hintfed_ami::{ClientConfig, DeviceStateChange};
use hintfed_asterisk::{ActionsVia, EventsVia, Pbx, PbxConfig, PbxEvent};
use hintfed_core::envelope::Envelope;
use hintfed_core::{
    Body, Epoch, HlcTimestamp, Hub, HubAction, HubConfig, KeyRing, Limits, Millis, Node,
    NodeConfig, Update, Value, Verifier,
};
use hintfed_daemon::http::{StateView, StatusEvent, StatusEvents};
use hintfed_sim::{DeviceState as SimState, SimConfig, SimHandle, SimServer};
use hintfed_testkit::wait::{eventually, eventually_within};
use hintfed_transport::{Channel, FederationTransport, Incoming, TransportError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Every port sees everything published by every port (itself included), like a hub's PUB.
#[derive(Clone, Default)]
struct Bus {
    ports: Arc<Mutex<Vec<mpsc::Sender<Incoming>>>>,
    /// When set, members ask for snapshots and their requests arrive here (hub 0 took them).
    snapshot_requests: Option<mpsc::UnboundedSender<Bytes>>,
}

struct Port {
    bus: Bus,
    rx: Mutex<Option<mpsc::Receiver<Incoming>>>,
    connected: watch::Receiver<usize>,
    _connected_tx: watch::Sender<usize>,
}

impl Bus {
    fn port(&self) -> (Port, mpsc::Sender<Incoming>) {
        let (tx, rx) = mpsc::channel(4096);
        self.ports.lock().expect("lock").push(tx.clone());
        let (ctx, crx) = watch::channel(1);
        (
            Port {
                bus: self.clone(),
                rx: Mutex::new(Some(rx)),
                connected: crx,
                _connected_tx: ctx,
            },
            tx,
        )
    }
}

impl FederationTransport for Port {
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<usize, TransportError> {
        let ports = self.bus.ports.lock().expect("lock").clone();
        let frames = vec![Bytes::copy_from_slice(topic.as_bytes()), payload];
        let mut n = 0;
        for p in ports {
            if p.try_send(Incoming {
                hub: 0,
                channel: Channel::Fanout,
                frames: frames.clone(),
            })
            .is_ok()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        self.rx.lock().expect("lock").take()
    }

    async fn request_snapshot(
        &self,
        payload: Bytes,
        _exclude: &[usize],
    ) -> Result<usize, TransportError> {
        match &self.bus.snapshot_requests {
            Some(tx) if tx.send(payload).is_ok() => Ok(0),
            _ => Err(TransportError::NotConnected),
        }
    }

    fn connected(&self) -> watch::Receiver<usize> {
        self.connected.clone()
    }
}

const EXTENSIONS: &str = "\
[phones]
exten => 100,hint,PJSIP/100
exten => 200,hint,PJSIP/200
exten => 300,hint,PJSIP/300
exten => 1100,hint,Custom:PJSIP/100
exten => 1200,hint,Custom:PJSIP/200
";

async fn sim(name: &str) -> SimHandle {
    sim_with(name, false).await
}

/// A simulated Asterisk; `coalesce_writes`: one that answers much faster than a real one.
async fn sim_with(name: &str, coalesce_writes: bool) -> SimHandle {
    let dialplan = hintfed_sim::extensions::parse(EXTENSIONS).expect("dialplan");
    SimServer::spawn(SimConfig {
        name: Some(name.to_owned()),
        dialplan,
        coalesce_writes,
        ..SimConfig::default()
    })
    .await
    .expect("sim")
}

struct Member {
    sim: SimHandle,
    handle: RelayHandle,
    /// What the relay pushes for `/events`.
    events: StatusEvents,
    inject: mpsc::Sender<Incoming>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The agent's default device filter: every device but the `Custom:` mirrors.
fn excluding_custom() -> DeviceFilter {
    DeviceFilter::new(None, Some("^Custom:")).expect("filter")
}

async fn member(bus: &Bus, name: &str, keys: &str, origin_timeout_ms: u64) -> Member {
    member_with(bus, name, keys, origin_timeout_ms, excluding_custom(), 8).await
}

/// A member with its own device filter and apply window.
async fn member_with(
    bus: &Bus,
    name: &str,
    keys: &str,
    origin_timeout_ms: u64,
    filter: DeviceFilter,
    window: usize,
) -> Member {
    member_on(
        sim(name).await,
        bus,
        name,
        keys,
        origin_timeout_ms,
        filter,
        window,
    )
    .await
}

/// A member on a given simulated Asterisk.
async fn member_on(
    sim: SimHandle,
    bus: &Bus,
    name: &str,
    keys: &str,
    origin_timeout_ms: u64,
    filter: DeviceFilter,
    window: usize,
) -> Member {
    let pbx = pbx_of(&sim);
    member_of(sim, pbx, bus, name, keys, origin_timeout_ms, filter, window)
}

/// The `Pbx` of a simulated Asterisk and its event stream (quick reconnections and timeouts).
fn pbx_of(sim: &SimHandle) -> (Pbx, mpsc::Receiver<PbxEvent>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut ami = ClientConfig::new(sim.local_addr().to_string(), "admin", "adminsecret");
    ami.backoff_initial = Duration::from_millis(50);
    ami.backoff_max = Duration::from_millis(200);
    ami.action_timeout = Duration::from_millis(500);
    Pbx::start(PbxConfig::new(
        EventsVia::Ami(Box::new(ami.clone())),
        ActionsVia::Ami(Box::new(ami)),
    ))
    .expect("pbx")
}

/// A member whose relay reads `events` (the Asterisk's own, or a stream a test writes) and
/// acts through `pbx`.
#[allow(clippy::too_many_arguments)]
fn member_of(
    sim: SimHandle,
    (pbx, events): (Pbx, mpsc::Receiver<PbxEvent>),
    bus: &Bus,
    name: &str,
    keys: &str,
    origin_timeout_ms: u64,
    filter: DeviceFilter,
    window: usize,
) -> Member {
    let mut nc = NodeConfig::new(name);
    nc.snapshots = bus.snapshot_requests.is_some();
    nc.snapshot_retry_ms = 60_000;
    nc.origin_timeout_ms = origin_timeout_ms;
    nc.heartbeat_interval_ms = 100;
    nc.apply.in_flight = window;
    let now = now_millis();
    let node = Node::new(nc, Epoch(now.0), now);
    let (port, inject) = bus.port();
    let mut rc = RelayConfig::new(name);
    rc.keys = KeyRing::from_secrets([keys]);
    rc.filter = filter;
    rc.tick = Duration::from_millis(20);
    rc.snapshot_timeout = Duration::from_secs(1);
    let status_events = StatusEvents::default();
    let hooks = RelayHooks {
        events: Some(status_events.clone()),
        ..RelayHooks::default()
    };
    let relay = Relay::new(node, (pbx, events), port, rc, hooks).expect("relay");
    let handle = relay.handle();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        relay.run(s).await.expect("relay run");
    });
    Member {
        sim,
        handle,
        events: status_events,
        inject,
        stop,
        task,
    }
}

/// Stops the members' relays and waits for them.
async fn stop(members: impl IntoIterator<Item = Member>) {
    for m in members {
        m.stop.cancel();
        m.task.await.expect("relay task");
    }
}

async fn synced(m: &Member) {
    let h = m.handle.clone();
    eventually("full sync", || h.status().counters().full_syncs >= 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_presence_propagate_without_loop() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 3_000).await;
    let b = member(&bus, "pbx-b", "k", 3_000).await;
    synced(&a).await;
    synced(&b).await;

    a.sim
        .set_device_state("PJSIP/100", SimState::Inuse)
        .expect("set");
    eventually("Custom:PJSIP/100 INUSE on b", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "INUSE"
    })
    .await;
    // The mirror on a is never written (a never applies its own origin).
    assert_ne!(a.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)"), "INUSE");

    // Set it the way a dialplan would, with a comma in the message (e form).
    b.sim
        .setvar(
            "PRESENCE_STATE(CustomPresence:alice)",
            &hintfed_core::Presence::new(
                hintfed_core::PresenceStatus::Dnd,
                "lunch",
                "back at 2, maybe",
            )
            .to_setvar_value(),
        )
        .expect("presence");
    eventually("presence on a", || {
        a.sim.getvar("PRESENCE_STATE(CustomPresence:alice,value)") == "dnd"
    })
    .await;
    eventually("presence message intact on a", || {
        a.sim.getvar("PRESENCE_STATE(CustomPresence:alice,message)") == "back at 2, maybe"
            && a.sim.getvar("PRESENCE_STATE(CustomPresence:alice,subtype)") == "lunch"
    })
    .await;

    // No loop: after settling, Setvar counts stay put.
    let settle = |s: &SimHandle| s.stats().setvar_total;
    let mut last = (settle(&a.sim), settle(&b.sim));
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = (settle(&a.sim), settle(&b.sim));
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last.0 <= 10 && last.1 <= 10,
        "bounded Setvars: {last:?} a={:?} b={:?} ca={:?} cb={:?}",
        a.sim.stats(),
        b.sim.stats(),
        a.handle.status().counters(),
        b.handle.status().counters()
    );

    // One more change costs exactly one Setvar on b and none on a.
    a.sim
        .set_device_state("PJSIP/100", SimState::NotInuse)
        .expect("set");
    eventually("NOT_INUSE on b", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "NOT_INUSE"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (settle(&a.sim), settle(&b.sim)),
        (last.0, last.1 + 1),
        "one change, one write"
    );

    stop([a, b]).await;
}

/// Many pipelined writes, with every echo reaching the node (no `Custom:` filter): each
/// device and presentity is written exactly once, none is lost, and no echo is taken for a
/// local change (a presence echo taken for one would be published and written back on the
/// origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_written_once_per_target_and_its_echoes_swallowed() {
    const N: usize = 400;
    const P: usize = 50;
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 3_000).await;
    let b = member_with(&bus, "pbx-b", "k", 3_000, DeviceFilter::default(), 64).await;
    synced(&a).await;
    synced(&b).await;
    let before = (a.sim.stats().setvar_total, b.sim.stats().setvar_total);
    for i in 0..N {
        a.sim
            .set_device_state(&format!("PJSIP/burst{i}"), SimState::Ringing)
            .expect("set");
    }
    for i in 0..P {
        let p =
            hintfed_core::Presence::new(hintfed_core::PresenceStatus::Away, "", format!("m{i}"));
        a.sim
            .setvar(
                &format!("PRESENCE_STATE(CustomPresence:burst{i})"),
                &p.to_setvar_value(),
            )
            .expect("presence");
    }
    eventually("every device and presentity written on b", || {
        (0..N).all(|i| {
            b.sim
                .getvar(&format!("DEVICE_STATE(Custom:PJSIP/burst{i})"))
                == "RINGING"
        }) && (0..P).all(|i| {
            b.sim
                .getvar(&format!("PRESENCE_STATE(CustomPresence:burst{i},message)"))
                == format!("m{i}")
        })
    })
    .await;
    let h = b.handle.clone();
    eventually("b's writes all answered", || {
        h.status().counters().applies_ok >= (N + P) as u64
    })
    .await;
    // Settle: the counts stop moving.
    let count = || (a.sim.stats().setvar_total, b.sim.stats().setvar_total);
    let mut last = count();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count();
        if now == last {
            break;
        }
        last = now;
    }
    assert_eq!(
        (last.0 - before.0, last.1 - before.1),
        (0, (N + P) as u64),
        "one write per target on b, none on a (an echo taken for a change would loop back): {:?}",
        b.handle.status().counters()
    );
    assert_eq!(b.handle.status().counters().applies_failed, 0);
    stop([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unsigned_messages_are_rejected() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "right-key", 3_000).await;
    synced(&a).await;
    // An impostor on the same bus, signing with the wrong key.
    let evil = member(&bus, "pbx-evil", "wrong-key", 3_000).await;
    synced(&evil).await;
    evil.sim
        .set_device_state("PJSIP/200", SimState::Busy)
        .expect("set");
    // Raw garbage and an unsigned envelope straight into a's inbound stream.
    let unsigned = br#"{"env":{"v":1,"origin":"x","epoch":1,"seq":1,"body":{"type":"heartbeat"}}}"#;
    for payload in [&b"not json"[..], &unsigned[..]] {
        a.inject
            .send(Incoming {
                hub: 0,
                channel: Channel::Fanout,
                frames: vec![
                    Bytes::from_static(b"control"),
                    Bytes::copy_from_slice(payload),
                ],
            })
            .await
            .expect("inject");
    }
    let h = a.handle.clone();
    eventually("rejects counted", || {
        let c = h.status().counters();
        c.rejects.get("bad_mac").copied().unwrap_or(0) >= 1
            && c.rejects.get("malformed").copied().unwrap_or(0) >= 1
            && c.rejects.get("unsigned").copied().unwrap_or(0) >= 1
    })
    .await;
    // Give the forged BUSY every chance to land, then check it did not.
    let e = evil.handle.clone();
    eventually("evil published", || e.status().counters().published >= 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_ne!(a.sim.getvar("DEVICE_STATE(Custom:PJSIP/200)"), "BUSY");
    stop([a, evil]).await;
}

/// What the bus sends back of a member's own messages is dropped before its check: counted
/// apart, neither accepted nor rejected, and a message naming the member but signed with
/// another key goes the same way; another origin's message still has its check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_messages_sent_back_are_dropped_unchecked() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 3_000).await;
    synced(&a).await;
    let h = a.handle.clone();
    eventually("own messages back", || {
        h.status().counters().own_dropped >= 1
    })
    .await;
    let forged = |origin: &str| {
        let env = Envelope::new(
            origin,
            Epoch(1),
            1,
            Body::Update(Update {
                key: "PJSIP/300".into(),
                value: Value::Device(hintfed_core::DeviceState::Busy),
                ts: HlcTimestamp {
                    wall: 1,
                    counter: 0,
                },
            }),
        );
        let bytes = KeyRing::from_secrets(["wrong"])
            .seal(&env, &Limits::default())
            .expect("seal");
        Incoming {
            hub: 0,
            channel: Channel::Fanout,
            frames: vec![Bytes::from_static(b"device"), Bytes::from(bytes)],
        }
    };
    let own = h.status().counters().own_dropped;
    a.inject.send(forged("pbx-a")).await.expect("inject");
    a.inject.send(forged("pbx-x")).await.expect("inject");
    eventually("the forgery naming another origin rejected", || {
        h.status().counters().rejects.get("bad_mac").copied() == Some(1)
    })
    .await;
    let c = h.status().counters();
    assert!(c.own_dropped > own, "{c:?}");
    assert_eq!(c.accepted, 0, "a member alone hears only itself: {c:?}");
    assert_eq!(c.rejects.len(), 1, "{c:?}");
    stop([a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_origin_goes_down_state_and_comes_back() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 600).await;
    let b = member(&bus, "pbx-b", "k", 600).await;
    synced(&a).await;
    synced(&b).await;
    a.sim
        .set_device_state("PJSIP/100", SimState::Inuse)
        .expect("set");
    eventually("INUSE on b", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "INUSE"
    })
    .await;
    // a's relay dies (like a killed agent): b times it out.
    a.stop.cancel();
    a.task.await.expect("join");
    eventually("UNAVAILABLE on b", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "UNAVAILABLE"
    })
    .await;
    // A new relay for the same Asterisk: its full sync revives the origin.
    let sim_a = a.sim;
    let a2 = {
        let ami = ClientConfig::new(sim_a.local_addr().to_string(), "admin", "adminsecret");
        let (pbx, events) = Pbx::start(PbxConfig::new(
            EventsVia::Ami(Box::new(ami.clone())),
            ActionsVia::Ami(Box::new(ami)),
        ))
        .expect("pbx");
        let mut nc = NodeConfig::new("pbx-a");
        nc.snapshots = false;
        nc.origin_timeout_ms = 600;
        nc.heartbeat_interval_ms = 100;
        let now = now_millis();
        let node = Node::new(nc, Epoch(now.0), now);
        let (port, _inject) = bus.port();
        let mut rc = RelayConfig::new("pbx-a");
        rc.keys = KeyRing::from_secrets(["k"]);
        rc.filter = excluding_custom();
        let relay =
            Relay::new(node, (pbx, events), port, rc, RelayHooks::default()).expect("relay");
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { relay.run(s).await.expect("run") });
        (stop, task)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") != "INUSE" {
        if tokio::time::Instant::now() > deadline {
            use hintfed_daemon::http::StatusSource;
            panic!(
                "INUSE again on b: b={:?} origins={:?} state={:?} simA={:?}",
                b.handle.status().counters(),
                b.handle.status().origins(),
                b.handle.status().state().await,
                sim_a.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The Asterisk behind b restarts: every remote state is applied again.
    b.sim.restart(Duration::ZERO);
    assert_ne!(b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)"), "INUSE");
    eventually("re-applied after restart", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "INUSE"
    })
    .await;

    a2.0.cancel();
    a2.1.await.expect("join");
    b.stop.cancel();
    b.task.await.expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_device_filter() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 3_000).await;
    let b = member(&bus, "pbx-b", "k", 3_000).await;
    synced(&a).await;
    synced(&b).await;
    assert!(
        a.handle
            .reload(
                DeviceFilter::new(Some("^PJSIP/3"), Some("^Custom:")).expect("filter"),
                KeyRing::from_secrets(["k"]),
            )
            .await
    );
    let h = a.handle.clone();
    eventually("resync after reload", || {
        h.status().counters().full_syncs >= 2
    })
    .await;
    a.sim
        .set_device_state("PJSIP/100", SimState::Inuse)
        .expect("set");
    a.sim
        .set_device_state("PJSIP/300", SimState::Ringing)
        .expect("set");
    eventually("included device propagates", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/300)") == "RINGING"
    })
    .await;
    assert_ne!(
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)"),
        "INUSE",
        "excluded by the reloaded filter"
    );
    stop([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_time_out_are_retried() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 3_000).await;
    let b = member(&bus, "pbx-b", "k", 3_000).await;
    synced(&a).await;
    synced(&b).await;
    // b's Asterisk stops answering (the connection stays open): the write times out.
    b.sim.blackhole(Some(Duration::from_millis(1500)));
    a.sim
        .set_device_state("PJSIP/100", SimState::Inuse)
        .expect("set");
    let h = b.handle.clone();
    eventually("the write failed", || {
        h.status().counters().applies_failed >= 1
    })
    .await;
    // Once it answers again, the failed write is made again.
    eventually("INUSE on b after the blackhole", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "INUSE"
    })
    .await;
    stop([a, b]).await;
}

/// The status row of `key` on `m` (as `/api/state` shows it): (aggregate, per-origin states).
async fn status_row(m: &Member, key: &str) -> Option<(String, Vec<(String, String)>)> {
    use hintfed_daemon::http::StatusSource;
    m.handle
        .status()
        .state()
        .await
        .devices
        .into_iter()
        .find(|d| d.key == key)
        .map(|d| (d.aggregate, d.origins.into_iter().collect()))
}

/// Waits until the row of `key` on `m` satisfies `ok`.
async fn row_until(
    m: &Member,
    key: &str,
    what: &str,
    ok: impl Fn(&(String, Vec<(String, String)>)) -> bool,
) {
    let deadline = tokio::time::Instant::now() + hintfed_testkit::wait::DEADLINE;
    loop {
        let row = status_row(m, key).await;
        if row.as_ref().is_some_and(&ok) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {what} ({key}: {row:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_view_follows_every_change_and_origin_loss() {
    // Rows are built from the table on request, and the rows of the keys changed since the
    // last refresh are pushed on `/events`: both must end on the latest state of every key.
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 600).await;
    let b = member(&bus, "pbx-b", "k", 600).await;
    synced(&a).await;
    synced(&b).await;
    let mut pushed = b.events.subscribe();
    let states = [
        SimState::Inuse,
        SimState::Ringing,
        SimState::Busy,
        SimState::NotInuse,
    ];
    for round in 0..4 {
        for i in 0..50 {
            a.sim
                .set_device_state(&format!("PJSIP/7{i:02}"), states[(round + i) % 4])
                .expect("set");
        }
    }
    // Last round: device i holds states[(3 + i) % 4].
    let want = |i: usize| ["NOT_INUSE", "INUSE", "RINGING", "BUSY"][i % 4];
    for i in [0usize, 1, 2, 3, 49] {
        let key = format!("PJSIP/7{i:02}");
        row_until(
            &b,
            &key,
            "b's status shows the latest state",
            |(agg, per)| agg == want(i) && per == &[("pbx-a".to_owned(), want(i).to_owned())],
        )
        .await;
    }
    // The pushes end on the same rows: the last one of each key is its latest state.
    let mut last = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + hintfed_testkit::wait::DEADLINE;
    while (0..50).any(|i| {
        last.get(&format!("PJSIP/7{i:02}"))
            .is_none_or(|s: &String| s.as_str() != want(i))
    }) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, pushed.recv()).await {
            Ok(Ok(StatusEvent::Device(d))) if d.origins.get("pbx-a") == Some(&d.aggregate) => {
                last.insert(d.key, d.aggregate);
            }
            Ok(Ok(StatusEvent::Device(d))) => panic!("row pushed with another aggregate: {d:?}"),
            Ok(Ok(StatusEvent::Resync)) => {
                // Told to fetch the state again (e.g. on a busy machine an origin looked late for a
                // moment): a listener reads every row, then follows the pushes again.
                for i in 0..50 {
                    let key = format!("PJSIP/7{i:02}");
                    if let Some((agg, _)) = status_row(&b, &key).await {
                        last.insert(key, agg);
                    }
                }
            }
            Ok(Ok(_)) => {}
            other => panic!("pushes did not reach the latest states: {other:?}, {last:?}"),
        }
    }
    let key = "PJSIP/700";
    row_until(&a, key, "a's own row", |(agg, _)| agg == "NOT_INUSE").await;
    // a dies: every row of a on b reads as down, although none of its entries changed;
    // listeners are told to fetch the state again.
    a.stop.cancel();
    a.task.await.expect("join");
    row_until(
        &b,
        key,
        "rows of a lost origin read UNAVAILABLE",
        |(agg, per)| {
            agg == "UNAVAILABLE" && per == &[("pbx-a".to_owned(), "UNAVAILABLE".to_owned())]
        },
    )
    .await;
    let resync = tokio::time::timeout(hintfed_testkit::wait::DEADLINE, async {
        loop {
            match pushed.recv().await {
                Ok(StatusEvent::Resync) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(resync, Ok(true), "no resync pushed when pbx-a went down");
    b.stop.cancel();
    let status = b.handle.status();
    b.task.await.expect("join");
    // A stopped relay shows nothing rather than hanging the page.
    use hintfed_daemon::http::StatusSource;
    assert_eq!(status.state().await, StateView::default());
}

/// A hub that answers slowly but steadily is not asked again: the relay's snapshot timeout
/// counts from the hub's last chunk, not from the request (a large table on a slow link would
/// otherwise be restarted from the start every timeout and never complete).
/// A hub holding `n` keys `<prefix><i>` of origin `pbx-x` (all INUSE), answering the snapshot
/// request a member sent (waited for on `requests`); and the keys to seal its answer with.
/// A bus whose members ask for snapshots, and where their requests arrive.
fn snapshot_bus() -> (Bus, mpsc::UnboundedReceiver<Bytes>) {
    let (tx, requests) = mpsc::unbounded_channel();
    let bus = Bus {
        snapshot_requests: Some(tx),
        ..Bus::default()
    };
    (bus, requests)
}

/// Hands `m` every chunk of the snapshot `hub` is answering, at once.
async fn answer_snapshot(m: &Member, hub: &mut Hub, keys: &KeyRing) {
    while let Some(HubAction::SendTo { envelope, .. }) = hub.next_snapshot_chunk() {
        reply(m, keys, &envelope).await;
    }
}

async fn hub_asked(
    requests: &mut mpsc::UnboundedReceiver<Bytes>,
    cfg: HubConfig,
    prefix: &str,
    n: u64,
) -> (Hub, KeyRing) {
    let keys = KeyRing::from_secrets(["k"]);
    let mut verifier = Verifier::new(keys.clone(), Limits::default());
    let req = tokio::time::timeout(Duration::from_secs(10), requests.recv())
        .await
        .expect("the relay asks for a snapshot")
        .expect("open");
    let req = verifier.verify(&req).expect("a signed request");
    let mut hub = Hub::new(cfg, Epoch(5), Millis(0));
    for i in 0..n {
        let update = Update {
            key: format!("{prefix}{i}").as_str().into(),
            value: Value::Device(hintfed_core::DeviceState::Inuse),
            ts: HlcTimestamp {
                wall: 1_000 + i,
                counter: 0,
            },
        };
        hub.on_envelope(
            Millis(1),
            &Envelope::new("pbx-x", Epoch(1), i + 1, Body::Update(update)),
        );
    }
    hub.on_envelope(Millis(2), &req);
    (hub, keys)
}

/// Hands `envelope` to member `m` as a reply from hub 0.
async fn reply(m: &Member, keys: &KeyRing, envelope: &Envelope) {
    let payload = keys.seal(envelope, &Limits::default()).expect("seal");
    m.inject
        .send(Incoming {
            hub: 0,
            channel: Channel::Reply,
            frames: vec![Bytes::from(payload)],
        })
        .await
        .expect("inject");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_snapshot_answer_is_not_asked_again() {
    let (bus, mut requests) = snapshot_bus();
    let filter = excluding_custom();
    let m = member_with(&bus, "pbx-new", "k", 3_000, filter, 8).await;
    let mut cfg = HubConfig::new("hub-1");
    cfg.chunk_max_entries = 2;
    let (mut hub, keys) = hub_asked(&mut requests, cfg, "PJSIP/", 50).await;
    let mut sent = 0;
    while let Some(HubAction::SendTo { envelope, .. }) = hub.next_snapshot_chunk() {
        // The slow link: a chunk every 100 ms, the whole answer well over the 1 s timeout.
        tokio::time::sleep(Duration::from_millis(100)).await;
        reply(&m, &keys, &envelope).await;
        sent += 1;
    }
    assert!(
        sent > 20,
        "{sent} messages: the answer must outlast the timeout"
    );
    let h = m.handle.clone();
    eventually("snapshot complete", || h.status().counters().snapshot_done).await;
    assert_eq!(m.handle.status().counters().snapshot_requests, 1);
    assert!(
        requests.try_recv().is_err(),
        "asked again while the hub was answering"
    );
    stop([m]).await;
}

/// A new member gets a large snapshot and writes it to a fast Asterisk (one that answers a
/// whole window of writes at once), each write coming back as an event. The relay must take
/// those events as fast as it writes: taken one a turn, they fell behind, the AMI event queue
/// overflowed and every key was listed again (a full resync; ~35 MB at 100,000 keys). One
/// thread, as the agent runs by default (`worker_threads = 1`).
#[tokio::test(flavor = "current_thread")]
async fn echoes_of_a_fast_asterisk_keep_up_with_a_full_window() {
    const N: u64 = 20_000;
    let (bus, mut requests) = snapshot_bus();
    let filter = excluding_custom();
    let fast = sim_with("pbx-new", true).await;
    let m = member_on(fast, &bus, "pbx-new", "k", 10_000, filter, 512).await;
    synced(&m).await;
    let (mut hub, keys) = hub_asked(&mut requests, HubConfig::new("hub-1"), "PJSIP/flood", N).await;
    let syncs = m.handle.status().counters().full_syncs;
    answer_snapshot(&m, &mut hub, &keys).await;
    let h = m.handle.clone();
    eventually_within("every key written", Duration::from_secs(60), || {
        h.status().counters().applies_ok >= N
    })
    .await;
    assert_eq!(
        m.handle.status().counters().full_syncs,
        syncs,
        "no resync while {N} keys are written: {:?}",
        m.handle.status().counters()
    );
    assert_eq!(m.sim.stats().setvar_total, N, "each key written once");
    stop([m]).await;
}

/// A member whose relay reads `first` in one batch, then the events this test writes (the
/// simulator's own are dropped), so a test can order events against the relay's listings.
async fn member_fed(
    sim: SimHandle,
    bus: &Bus,
    name: &str,
    first: Vec<PbxEvent>,
) -> (Member, mpsc::Sender<PbxEvent>) {
    let (pbx, mut real) = pbx_of(&sim);
    // Wait until the Asterisk serves actions, then keep its stream drained.
    while !matches!(real.recv().await, Some(PbxEvent::Up { .. })) {}
    tokio::spawn(async move { while real.recv().await.is_some() {} });
    let (tx, rx) = mpsc::channel(64);
    for ev in first {
        tx.send(ev).await.expect("queued");
    }
    let filter = excluding_custom();
    let m = member_of(sim, (pbx, rx), bus, name, "k", 10_000, filter, 8);
    (m, tx)
}

fn device(device: &str, state: &str) -> PbxEvent {
    PbxEvent::Device(DeviceStateChange {
        device: device.into(),
        state: state.into(),
    })
}

/// Events held while a listing runs are older than any listing asked after them. When events
/// are missed again during a listing (a slow relay falls behind twice), the new listing must
/// win: replaying the events held before it would bring back states Asterisk no longer holds
/// (the events that changed them were the ones missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_held_before_a_new_listing_do_not_overwrite_it() {
    let sim = sim("pbx-a").await;
    sim.set_device_state("PJSIP/100", SimState::NotInuse)
        .expect("set");
    // One batch for the relay: the listing starts, an event is held, events are missed (the
    // one putting PJSIP/100 back to NOT_INUSE among them), the listing starts again.
    let first = vec![
        PbxEvent::Up { generation: 1 },
        device("PJSIP/100", "BUSY"),
        PbxEvent::Resync {
            reason: "12 AMI events missed".into(),
        },
    ];
    let (m, _events) = member_fed(sim, &Bus::default(), "pbx-a", first).await;
    synced(&m).await;
    let row = status_row(&m, "PJSIP/100").await;
    assert_eq!(
        row.map(|(aggregate, _)| aggregate).as_deref(),
        Some("NOT_INUSE"),
        "the newer listing wins over the event held before it"
    );
    stop([m]).await;
}

/// A member (re)starting beside an Asterisk that already holds a federated state: its full
/// sync lists the `Custom:` device (excluded from federation, `^Custom:`), and the state that
/// arrives for it is not written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_asterisk_already_holds_is_not_written_again() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 10_000).await;
    let sim_b = sim("pbx-b").await;
    sim_b
        .setvar("DEVICE_STATE(Custom:PJSIP/held)", "INUSE")
        .expect("setvar");
    let filter = excluding_custom();
    let b = member_on(sim_b, &bus, "pbx-b", "k", 10_000, filter, 8).await;
    synced(&a).await;
    synced(&b).await;
    let before = b.sim.stats().setvar_total;
    a.sim
        .set_device_state("PJSIP/held", SimState::Inuse)
        .expect("set");
    // A marker behind it, which b must write.
    a.sim
        .set_device_state("PJSIP/marker", SimState::Ringing)
        .expect("set");
    eventually("the marker written on b", || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/marker)") == "RINGING"
    })
    .await;
    let h = b.handle.clone();
    eventually("the marker's write answered", || {
        h.status().counters().applies_ok >= 1
    })
    .await;
    assert_eq!(
        b.sim.stats().setvar_total - before,
        1,
        "only the marker written: Custom:PJSIP/held already held INUSE"
    );
    assert_eq!(b.sim.getvar("DEVICE_STATE(Custom:PJSIP/held)"), "INUSE");
    stop([a, b]).await;
}

/// Shutdown while a window of writes is in flight: the relay waits for their answers
/// (`drain_timeout`), so every `Setvar` Asterisk took is reported, once, as applied or failed.
#[tokio::test(flavor = "current_thread")]
async fn shutdown_waits_for_the_writes_in_flight_and_counts_each_once() {
    const N: u64 = 20_000;
    let (bus, mut requests) = snapshot_bus();
    let filter = excluding_custom();
    let m = member_on(
        sim("pbx-new").await,
        &bus,
        "pbx-new",
        "k",
        10_000,
        filter,
        512,
    )
    .await;
    synced(&m).await;
    let (mut hub, keys) = hub_asked(&mut requests, HubConfig::new("hub-1"), "PJSIP/d", N).await;
    answer_snapshot(&m, &mut hub, &keys).await;
    let h = m.handle.clone();
    eventually("writing", || h.status().counters().applies_ok >= 1).await;
    m.stop.cancel();
    let Member {
        sim, handle, task, ..
    } = m;
    task.await.expect("relay task");
    let c = handle.status().counters();
    let taken = sim.stats().setvar_total;
    assert!((1..N).contains(&taken), "stopped while writing: {taken}");
    assert_eq!(
        c.applies_ok + c.applies_failed,
        taken,
        "each write Asterisk took reported once: {c:?}"
    );
    assert_eq!(c.applies_failed, 0, "{c:?}");
}

/// An Asterisk that stalls with its link open (answers nothing, sends nothing) loses the
/// events it would have sent meanwhile. Its agent notices a write left unanswered and lists
/// it again once it answers, so a phone that changed during the stall is federated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_changed_while_asterisk_stalled_is_listed_afterwards() {
    let bus = Bus::default();
    let a = member(&bus, "pbx-a", "k", 10_000).await;
    let b = member(&bus, "pbx-b", "k", 10_000).await;
    synced(&a).await;
    synced(&b).await;
    let connections = b.sim.stats().connections_total;
    b.sim.blackhole(None);
    // A write for b, left unanswered (these members' actions time out after 500 ms)...
    a.sim
        .set_device_state("PJSIP/100", SimState::Inuse)
        .expect("set");
    // ...and b's phone changes meanwhile: its event is never sent.
    b.sim
        .set_device_state("PJSIP/200", SimState::Ringing)
        .expect("set");
    let h = b.handle.clone();
    eventually("b's write timed out", || {
        h.status().counters().applies_failed >= 1
    })
    .await;
    b.sim.unblackhole();
    eventually("b's phone reaches a", || {
        a.sim.getvar("DEVICE_STATE(Custom:PJSIP/200)") == "RINGING"
    })
    .await;
    assert_eq!(
        b.sim.stats().connections_total,
        connections,
        "b's link never dropped: the listing came from the stall"
    );
    stop([a, b]).await;
}
