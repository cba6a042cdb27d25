//! The broker proper: one [`Relay`] per configured Asterisk, all on one [`InProcessBus`].
//!
//! For each server section: [`Pbx::start`] with the agent's [`pbx_config`] → a tap task
//! (counts for `count_messages`, log lines for `verbose_messages`/`ami_trace`) → a
//! [`Relay`] driving a [`Node`] (origin = the section's `name`, snapshots off) whose
//! transport is that server's [`BusPort`](crate::bus::BusPort). What one relay publishes reaches every other
//! relay, which applies it to its own Asterisk (`Setvar DEVICE_STATE(Custom:<device>)`,
//! `Setvar PRESENCE_STATE(CustomPresence:<name>)`). Everything the agent does — echo
//! suppression by value, aggregation, apply queue, resync on (re)connect and restart,
//! origin-down with `down_state` — is therefore the agent's own code.
//!
//! Independence: each relay is its own task, each `Setvar` its own task, and the bus never
//! blocks a publisher (see [`crate::bus`]), so a slow or dead Asterisk delays nobody else.
//!
//! Operability: every relay reports to the daemon's shared metrics with the server's name as
//! label (`hintfed_events_in_total{source="Console 1"}`, applies, echoes, reconnects) plus
//! `hintfed_queue_depth{queue="bus <name>"}` and `{queue="apply <name>"}`. Each relay gets its
//! own `origins_up`/`origins_down` gauges ([`Metrics::with_own_origin_gauges`]): the exported
//! ones are the broker's (one origin per configured server, up while the broker is connected
//! to its Asterisk, as on `/api/origins`), set by [`update_origin_gauges`]. Readiness has one
//! `<name> asterisk` and one `<name> federation` condition per server, so `/readyz` answers
//! 503 naming the server while any Asterisk is unreachable; [`BrokerStatus`] feeds
//! `/api/state`, `/api/origins` and the status page.
//!
//! SIGHUP ([`reload`]): `log_level` (through the daemon crate) and the `include`/`exclude`
//! rules (every relay swaps its device filter and runs a full sync, which withdraws devices
//! no longer federated); everything else (servers, policy, intervals) is logged as taking
//! effect after a restart. The broker has no HMAC keys to reload: its relays talk over the
//! in-process bus, which never leaves the process and is not signed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hintfed_agent::agent::pbx_config;
use hintfed_agent::relay::{Relay, RelayConfig, RelayHandle, RelayHooks, RelayStatus, now_millis};
use hintfed_asterisk::{Pbx, PbxEvent};
use hintfed_core::{Body, Epoch, KeyRing, Limits, Node, NodeConfig};
use hintfed_daemon::http::{
    BoxFuture, OriginView, Readiness, StateView, StatusEvents, StatusSource,
};
use hintfed_daemon::metrics::Metrics;
use hintfed_daemon::run::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{BusConfig, BusPortStats, InProcessBus};
use crate::config::{BrokerConfig, ServerConfig};

/// Counters of the events read from one Asterisk (the tap in front of its relay).
#[derive(Debug, Default)]
pub struct EventCounts {
    /// `DeviceStateChange` events (and none of the list items).
    pub device: AtomicU64,
    /// `PresenceStateChange` events.
    pub presence: AtomicU64,
    /// Connections (`Up`) and losses (`Down`) of the link.
    pub links: AtomicU64,
}

/// One running relay, for status and tests.
#[derive(Debug, Clone)]
pub struct RelayInfo {
    /// Origin name (the section's `name`).
    pub name: String,
    /// The relay's status (counters, state table).
    pub status: RelayStatus,
    /// Its bus port's counters.
    pub bus: Arc<BusPortStats>,
    /// Events read from its Asterisk.
    pub events: Arc<EventCounts>,
    /// Control of the relay (SIGHUP reload).
    pub handle: RelayHandle,
    /// The metrics handles the relay writes (its `origins_up`/`origins_down` are its own
    /// view, not exported), when the broker has metrics.
    pub metrics: Option<Arc<Metrics>>,
}

/// Where the broker reports (all optional).
#[derive(Debug, Clone, Default)]
pub struct BrokerHooks {
    /// Prometheus metrics (shared by every relay; labels carry the server name).
    pub metrics: Option<Arc<Metrics>>,
    /// Live status events.
    pub events: Option<StatusEvents>,
    /// Readiness (`<name> asterisk`, `<name> federation` per server).
    pub readiness: Option<Readiness>,
}

/// A started broker: its relays run until the shutdown token is cancelled.
#[derive(Debug)]
pub struct RunningBroker {
    /// The relays, in `[servers] sections` order.
    pub relays: Vec<RelayInfo>,
    /// The bus.
    pub bus: InProcessBus,
    tasks: JoinSet<(String, Result<(), hintfed_agent::relay::RelayError>)>,
    stop: CancellationToken,
}

impl RunningBroker {
    /// A [`StatusSource`] over every relay, for `/api/state`, `/api/origins` and the page.
    pub fn status_source(&self) -> BrokerStatus {
        BrokerStatus {
            relays: self
                .relays
                .iter()
                .map(|r| (r.name.clone(), r.status.clone()))
                .collect(),
        }
    }

    /// Waits until every relay stopped (after the shutdown token is cancelled), or until the
    /// first one fails; then stops the rest.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_err = None;
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => {
                    if first_err.is_none() {
                        first_err = Some(anyhow::anyhow!("relay of {name:?} stopped: {e}"));
                    }
                    self.stop.cancel();
                }
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(anyhow::anyhow!("relay task failed: {e}"));
                    }
                    self.stop.cancel();
                }
            }
        }
        self.stop.cancel();
        first_err.map_or(Ok(()), Err)
    }
}

/// The node settings of one server.
pub fn node_config(cfg: &BrokerConfig, server: &ServerConfig) -> NodeConfig {
    let g = &cfg.general;
    let mut n = NodeConfig::new(server.name.clone());
    n.policy = g.node_policy();
    n.origin_timeout_ms = u64::try_from(g.origin_timeout.as_millis()).unwrap_or(u64::MAX);
    n.heartbeat_interval_ms = u64::try_from(g.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
    n.snapshots = false;
    n
}

/// The relay settings of one server.
pub fn relay_config(cfg: &BrokerConfig, server: &ServerConfig) -> RelayConfig {
    let mut r = RelayConfig::new(server.name.clone());
    r.filter = cfg.general.device_filter();
    r.keys = KeyRing::default();
    r
}

/// Starts every relay (and the bus repair task); they stop when `shutdown` is cancelled.
pub fn start(
    cfg: &BrokerConfig,
    hooks: BrokerHooks,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningBroker> {
    let bus = InProcessBus::new(BusConfig {
        capacity: cfg.general.bus_capacity,
    });
    let stop = shutdown.child_token();
    // Every port exists before any relay runs, so nobody misses the others' first messages.
    let ports: Vec<_> = cfg
        .servers
        .iter()
        .map(|s| bus.port(s.name.clone()))
        .collect();
    let mut relays = Vec::new();
    let mut tasks = JoinSet::new();
    for (server, port) in cfg.servers.iter().zip(ports) {
        let (pbx, raw) = Pbx::start(pbx_config(&server.asterisk))
            .with_context(|| format!("cannot start the connection to {:?}", server.name))?;
        let events = Arc::new(EventCounts::default());
        let verbose = cfg.general.verbose_messages || server.ami_trace;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(tap(server.name.clone(), raw, tx, events.clone(), verbose));
        let now = now_millis();
        let node = Node::new(node_config(cfg, server), Epoch(now.0), now);
        let bus_stats = port.stats();
        let relay_metrics = hooks
            .metrics
            .as_ref()
            .map(|m| Arc::new(m.with_own_origin_gauges()));
        let relay = Relay::new(
            node,
            (pbx, rx),
            port,
            relay_config(cfg, server),
            RelayHooks {
                metrics: relay_metrics.clone(),
                events: hooks.events.clone(),
                readiness: hooks.readiness.clone(),
                readiness_prefix: format!("{} ", server.name),
            },
        )?;
        let handle = relay.handle();
        let status = handle.status();
        let name = server.name.clone();
        let token = stop.clone();
        tasks.spawn(async move {
            let r = relay.run(token).await;
            (name, r)
        });
        info!(
            server = %server.name,
            section = %server.section,
            events = ?server.asterisk.source,
            actions = ?server.asterisk.apply,
            host = %server.asterisk.host,
            "relay started"
        );
        relays.push(RelayInfo {
            name: server.name.clone(),
            status,
            bus: bus_stats,
            events,
            handle,
            metrics: relay_metrics,
        });
    }
    tokio::spawn(
        bus.clone()
            .run_repair(Duration::from_millis(200), stop.clone()),
    );
    if cfg.general.verbose_messages {
        tokio::spawn(trace_bus(bus.clone(), cfg.servers.len(), stop.clone()));
    }
    Ok(RunningBroker {
        relays,
        bus,
        tasks,
        stop,
    })
}

/// Forwards one Asterisk's events to its relay, counting them and logging them when asked.
async fn tap(
    name: String,
    mut raw: mpsc::Receiver<PbxEvent>,
    tx: mpsc::Sender<PbxEvent>,
    counts: Arc<EventCounts>,
    verbose: bool,
) {
    // Ends when the relay is gone (its receiver dropped) or the Pbx stopped; not on the
    // shutdown token, so the relay sees its shutdown rather than a closed event stream.
    loop {
        let ev = tokio::select! {
            () = tx.closed() => return,
            ev = raw.recv() => match ev {
                Some(ev) => ev,
                None => return,
            },
        };
        match &ev {
            PbxEvent::Device(d) => {
                counts.device.fetch_add(1, Ordering::Relaxed);
                if verbose {
                    info!(server = %name, device = %d.device, state = %d.state, "event DeviceStateChange");
                }
            }
            PbxEvent::Presence(p) => {
                counts.presence.fetch_add(1, Ordering::Relaxed);
                if verbose {
                    info!(server = %name, presentity = %p.presentity, status = %p.status, subtype = %p.subtype, message = %p.message, "event PresenceStateChange");
                }
            }
            PbxEvent::Up { .. } | PbxEvent::Down { .. } => {
                counts.links.fetch_add(1, Ordering::Relaxed);
            }
            PbxEvent::Resync { .. } => {}
        }
        if verbose && !matches!(ev, PbxEvent::Device(_) | PbxEvent::Presence(_)) {
            debug!(server = %name, event = ?ev, "link event");
        }
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// With `verbose_messages`: a listening port on the bus that logs every update crossing it.
async fn trace_bus(bus: InProcessBus, _servers: usize, stop: CancellationToken) {
    use hintfed_transport::FederationTransport as _;
    let port = bus.observer_port("verbose_messages");
    let Some(mut rx) = port.take_incoming() else {
        return;
    };
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        let Some(payload) = msg.frames.last() else {
            continue;
        };
        match hintfed_core::open(payload, &KeyRing::default(), &Limits::default()) {
            Ok(env) => match &env.body {
                Body::Update(u) => info!(
                    from = %env.origin,
                    key = %u.key,
                    value = ?u.value,
                    seq = env.seq,
                    "update"
                ),
                Body::Heartbeat { .. } => {}
                b => debug!(from = %env.origin, body = b.type_name(), "control"),
            },
            Err(e) => warn!(error = %e, "unreadable message on the bus"),
        }
    }
}

/// Every `interval`: sets the bus queue gauges (`hintfed_queue_depth{queue="bus <name>"}`)
/// and, with `log` (`count_messages = yes`), logs the message counts of every relay.
pub async fn count_loop(
    relays: Vec<RelayInfo>,
    bus: InProcessBus,
    metrics: Option<Arc<Metrics>>,
    interval: Duration,
    log: bool,
    stop: CancellationToken,
) {
    let mut t = tokio::time::interval(interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = t.tick() => {}
        }
        let queues = bus.queues();
        for r in &relays {
            let c = r.status.counters();
            let (published, received, dropped, resyncs) = r.bus.snapshot();
            let queued = queues.iter().find(|q| q.0 == r.name).map_or(0, |q| q.1);
            if log {
                info!(
                    server = %r.name,
                    up = c.pbx_up,
                    device_events = r.events.device.load(Ordering::Relaxed),
                    presence_events = r.events.presence.load(Ordering::Relaxed),
                    updates_sent = published,
                    updates_received = received,
                    bus_dropped = dropped,
                    bus_queued = queued,
                    resyncs_requested = resyncs,
                    setvar_ok = c.applies_ok,
                    setvar_failed = c.applies_failed,
                    full_syncs = c.full_syncs,
                    "message counts"
                );
            }
            if let Some(m) = &metrics {
                m.set_queue_depth(
                    &format!("bus {}", r.name),
                    i64::try_from(queued).unwrap_or(i64::MAX),
                );
            }
        }
    }
}

/// The broker's origin counts: one origin per server, up while its relay is connected to
/// its Asterisk (the same rule as `/api/origins`). Returns `(up, down)`.
pub fn origin_counts(relays: &[RelayInfo]) -> (i64, i64) {
    let up = relays.iter().filter(|r| r.status.counters().pbx_up).count();
    let up = i64::try_from(up).unwrap_or(i64::MAX);
    let all = i64::try_from(relays.len()).unwrap_or(i64::MAX);
    (up, all - up)
}

/// Sets the exported `hintfed_origins_up`/`hintfed_origins_down` from [`origin_counts`].
pub fn update_origin_gauges(relays: &[RelayInfo], metrics: &Metrics) {
    let (up, down) = origin_counts(relays);
    metrics.origins_up.set(up);
    metrics.origins_down.set(down);
}

/// How often the origin gauges are refreshed.
pub const ORIGIN_GAUGE_INTERVAL: Duration = Duration::from_secs(1);

async fn origin_gauge_loop(relays: Vec<RelayInfo>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut t = tokio::time::interval(ORIGIN_GAUGE_INTERVAL);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = t.tick() => update_origin_gauges(&relays, &metrics),
        }
    }
}

/// What a [`reload`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changes applied now (e.g. `exclude None -> Some("^PJSIP/9")`).
    pub applied: Vec<String>,
    /// Changes read but only effective after a restart (e.g. `[servers]`).
    pub need_restart: Vec<String>,
}

/// Applies the reloadable part of `new` to the running relays (SIGHUP): the `include`/
/// `exclude` rules (each relay swaps its filter and resyncs). Changes that need a restart
/// are reported, not applied. `log_level` is applied by [`Context::reload_config`]. Logs
/// what it did.
pub async fn reload(
    current: &BrokerConfig,
    new: &BrokerConfig,
    relays: &[RelayInfo],
) -> ReloadReport {
    let (g, n) = (&current.general, &new.general);
    let mut report = ReloadReport::default();
    if g.include != n.include {
        report
            .applied
            .push(format!("include {:?} -> {:?}", g.include, n.include));
    }
    if g.exclude != n.exclude {
        report
            .applied
            .push(format!("exclude {:?} -> {:?}", g.exclude, n.exclude));
    }
    let servers = |c: &BrokerConfig| {
        c.servers
            .iter()
            .map(|s| {
                (
                    s.section.clone(),
                    s.name.clone(),
                    s.asterisk.clone(),
                    s.ami_trace,
                )
            })
            .collect::<Vec<_>>()
    };
    if servers(current) != servers(new) {
        report
            .need_restart
            .push("[servers] and server sections".into());
    }
    let restart_keys: [(&str, bool); 11] = [
        ("device_state", g.device_state != n.device_state),
        ("presence", g.presence != n.presence),
        ("request_timeout", g.request_timeout != n.request_timeout),
        ("count_messages", g.count_messages != n.count_messages),
        ("verbose_messages", g.verbose_messages != n.verbose_messages),
        ("count_interval", g.count_interval != n.count_interval),
        ("down_state", g.down_state != n.down_state),
        ("origin_timeout", g.origin_timeout != n.origin_timeout),
        (
            "heartbeat_interval",
            g.heartbeat_interval != n.heartbeat_interval,
        ),
        (
            "device_template, unknown_as, never_send",
            g.device_template != n.device_template
                || g.unknown_as != n.unknown_as
                || g.never_send != n.never_send,
        ),
        ("bus_capacity", g.bus_capacity != n.bus_capacity),
    ];
    for (key, changed) in restart_keys {
        if changed {
            report.need_restart.push(format!("[general] {key}"));
        }
    }
    if !report.need_restart.is_empty() {
        warn!(
            keys = %report.need_restart.join(", "),
            "reload: these changes take effect after a restart"
        );
    }
    if report.applied.is_empty() {
        info!("reload: include and exclude unchanged");
        return report;
    }
    let filter = n.device_filter();
    info!(changes = %report.applied.join("; "), relays = relays.len(), "reload: applying to every relay (full sync each)");
    for r in relays {
        if !r.handle.reload(filter.clone(), KeyRing::default()).await {
            warn!(server = %r.name, "reload: relay gone; not applied");
        }
    }
    report
}

/// [`StatusSource`] of the whole broker: the state table of a relay whose Asterisk is up
/// (every relay's table holds every server's reports), and one origin row per server.
#[derive(Debug, Clone)]
pub struct BrokerStatus {
    relays: Vec<(String, RelayStatus)>,
}

impl StatusSource for BrokerStatus {
    fn state(&self) -> BoxFuture<'_, StateView> {
        let relay = self
            .relays
            .iter()
            .find(|(_, s)| s.counters().pbx_up)
            .or(self.relays.first());
        Box::pin(async move {
            match relay {
                Some((_, s)) => s.state().await,
                None => StateView::default(),
            }
        })
    }

    fn origins(&self) -> Vec<OriginView> {
        self.relays
            .iter()
            .filter_map(|(name, s)| {
                let up = s.counters().pbx_up;
                s.origins()
                    .into_iter()
                    .find(|o| &o.name == name)
                    .map(|mut o| {
                        o.up = up;
                        o.detail = Some(if up {
                            "connected to this broker".to_owned()
                        } else {
                            "Asterisk not reachable from this broker".to_owned()
                        });
                        o
                    })
            })
            .collect()
    }
}

/// Runs the broker until `ctx.shutdown` (the daemon future given to `hintfed_daemon::run`).
pub async fn run(cfg: BrokerConfig, ctx: Context) -> anyhow::Result<()> {
    let broker = start(
        &cfg,
        BrokerHooks {
            metrics: Some(ctx.metrics.clone()),
            events: Some(ctx.events.clone()),
            readiness: Some(ctx.readiness.clone()),
        },
        ctx.shutdown.clone(),
    )?;
    ctx.status.set(Arc::new(broker.status_source()));
    info!(
        servers = cfg.servers.len(),
        device_state = cfg.general.device_state,
        presence = cfg.general.presence,
        "broker running"
    );
    let interval = if cfg.general.count_messages {
        cfg.general.count_interval
    } else {
        cfg.general.count_interval.min(Duration::from_secs(5))
    };
    tokio::spawn(count_loop(
        broker.relays.clone(),
        broker.bus.clone(),
        Some(ctx.metrics.clone()),
        interval,
        cfg.general.count_messages,
        ctx.shutdown.clone(),
    ));
    tokio::spawn(origin_gauge_loop(
        broker.relays.clone(),
        ctx.metrics.clone(),
        ctx.shutdown.clone(),
    ));
    let relays = broker.relays.clone();
    let mut current = cfg;
    let mut ctx = ctx;
    let mut wait = tokio::spawn(broker.wait());
    loop {
        tokio::select! {
            r = &mut wait => return r.map_err(|e| anyhow::anyhow!("broker task failed: {e}"))?,
            n = ctx.reload.recv() => {
                if n.is_none() {
                    return (&mut wait).await.map_err(|e| anyhow::anyhow!("broker task failed: {e}"))?;
                }
                let new = ctx
                    .reload_config()
                    .and_then(|file| BrokerConfig::from_file(&file));
                match new {
                    Ok(new) => {
                        reload(&current, &new, &relays).await;
                        current = new;
                    }
                    Err(e) => warn!(error = %e, "reload: configuration invalid; nothing changed"),
                }
            }
        }
    }
}
