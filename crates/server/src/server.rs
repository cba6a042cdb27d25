//! The hub runtime: binds the sockets, then one task owns the loop that verifies ROUTER
//! input, feeds the core [`Hub`], fans out on the PUB, answers snapshot requests, heartbeats,
//! bridges the legacy sockets and keeps the HTTP views, metrics and events current.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{
    Body, DeviceState, Envelope, Epoch, Hlc, Hub, HubAction, HubConfig, Ingest, KeyRing, Kind,
    Millis, RejectReason, Update, Value, Verifier,
};
use hintfed_daemon::http::{
    BoxFuture, OriginView, Readiness, StateView, StatusEvent, StatusEvents, StatusSlot,
    StatusSource,
};
use hintfed_daemon::metrics::{Kind as MetricKind, KindLabels, Metrics};
use hintfed_daemon::views;
use hintfed_transport::{
    Frames, HubBind, HubBindConfig, Limits, PubBind, Publication, PullBind, RouterMessage,
    StatsSnapshot, TransportError,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::legacy::{self, DeviceChange};

/// Most synthetic legacy origins tracked (one per legacy agent name); more are refused.
pub const MAX_LEGACY_ORIGINS: usize = 1024;
/// Most peers (routing identities) remembered; the least recently heard is forgotten first.
pub const MAX_PEERS: usize = 65_536;
/// Most ROUTER messages handled before their output is sent.
const BATCH: usize = 255;
/// Snapshot chunks sealed and not yet handed to a peer's connection, at most (over every
/// answer being streamed): memory for snapshots stays a few chunks, however many ask.
const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 8;
/// Rate limit of warnings about rejected input: at most this many per [`WARN_WINDOW`].
const WARN_BURST: u32 = 10;
const WARN_WINDOW: Duration = Duration::from_secs(10);

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be bound (the message names the endpoint).
    #[error(transparent)]
    Bind(#[from] TransportError),
    /// The hub sockets closed under the server.
    #[error("hub sockets closed unexpectedly")]
    Closed,
}

/// The daemon plumbing the server reports to: metrics, readiness, live events and the
/// status slot of the HTTP server. [`Hooks::standalone`] makes private ones (tests, tools);
/// the binary passes those of its `hintfed_daemon::run::Context`.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// Metrics to increment.
    pub metrics: Arc<Metrics>,
    /// Readiness (`sockets` becomes OK once bound).
    pub readiness: Readiness,
    /// Live events for `/events`.
    pub events: StatusEvents,
    /// Where the server installs its [`StatusSource`].
    pub status: StatusSlot,
}

impl Hooks {
    /// Fresh private hooks.
    pub fn standalone() -> Self {
        Hooks {
            metrics: Arc::new(Metrics::new("hintfed-server", env!("CARGO_PKG_VERSION"))),
            readiness: Readiness::new(),
            events: StatusEvents::default(),
            status: StatusSlot::default(),
        }
    }
}

/// Counters of a running server (see [`ServerHandle::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Verified envelopes received on the ROUTER.
    pub accepted: u64,
    /// Stream envelopes forwarded on the PUB (agents' and synthetic legacy origins').
    pub forwarded: u64,
    /// Envelopes the core dropped as duplicates or stale.
    pub duplicates: u64,
    /// Rejected input by reason (`unsigned`, `bad_mac`, `malformed`, `too_large`, `replay`,
    /// `duplicate`, `wrong_version`, `overload`, `legacy_malformed`, `legacy_too_large`,
    /// `legacy_origin_conflict`, `legacy_too_many_origins`, `origin_is_hub_name`).
    pub rejects: BTreeMap<String, u64>,
    /// Snapshots served.
    pub snapshots_served: u64,
    /// Snapshot chunks sent.
    pub chunks_sent: u64,
    /// Resync requests sent.
    pub resync_requests: u64,
    /// The hub's own envelopes published (heartbeats, origin-down notices).
    pub own_published: u64,
    /// Origin-down notices published.
    pub origin_down_notices: u64,
    /// Well-formed legacy messages received.
    pub legacy_in: u64,
    /// Legacy device changes that entered the federation.
    pub legacy_federated: u64,
    /// Legacy device changes skipped (`Custom:`, `UNKNOWN`, unchanged).
    pub legacy_skipped: u64,
    /// AsteriskEvents sent to legacy agents (translated federation updates).
    pub legacy_out: u64,
    /// Distinct peers heard within `origin_timeout`.
    pub peers: usize,
}

impl ServerStats {
    /// Rejections counted for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejects.get(reason).copied().unwrap_or(0)
    }
}

struct HubState {
    hub: Hub,
    down_state: DeviceState,
    stats: ServerStats,
}

type SharedState = Arc<Mutex<HubState>>;

fn lock(s: &SharedState) -> std::sync::MutexGuard<'_, HubState> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

struct HubStatus(SharedState);

impl HubStatus {
    fn view(&self) -> StateView {
        let s = lock(&self.0);
        views::state_view(s.hub.table(), s.hub.origins(), s.down_state, None)
    }
}

impl StatusSource for HubStatus {
    fn state(&self) -> BoxFuture<'_, StateView> {
        Box::pin(std::future::ready(self.view()))
    }

    fn origins(&self) -> Vec<OriginView> {
        let s = lock(&self.0);
        views::origins_view(s.hub.origins(), now_ms())
    }
}

enum Control {
    Keys(KeyRing),
}

/// A cheap handle on a running (or bound) server: endpoints, counters, key reload.
#[derive(Clone)]
pub struct ServerHandle {
    state: SharedState,
    control: mpsc::Sender<Control>,
    router: Arc<str>,
    publisher: Arc<str>,
    legacy_pull: Option<Arc<str>>,
    legacy_pub: Option<Arc<str>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("router", &self.router)
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The ROUTER's bound endpoint (`tcp://host:P`, port resolved): what agents list in
    /// `[federation] servers`.
    pub fn router_endpoint(&self) -> &str {
        &self.router
    }

    /// The PUB's bound endpoint (P+1).
    pub fn pub_endpoint(&self) -> &str {
        &self.publisher
    }

    /// The legacy PULL's bound endpoint, when the bridge is on.
    pub fn legacy_pull_endpoint(&self) -> Option<&str> {
        self.legacy_pull.as_deref()
    }

    /// The legacy PUB's bound endpoint, when the bridge is on.
    pub fn legacy_pub_endpoint(&self) -> Option<&str> {
        self.legacy_pub.as_deref()
    }

    /// The counters so far.
    pub fn stats(&self) -> ServerStats {
        lock(&self.state).stats.clone()
    }

    /// The HTTP views of the hub's table, as `/api/state` shows them.
    pub fn state_view(&self) -> StateView {
        HubStatus(self.state.clone()).view()
    }

    /// The origins, as `/api/origins` shows them.
    pub fn origins_view(&self) -> Vec<OriginView> {
        HubStatus(self.state.clone()).origins()
    }

    /// Replaces the shared keys (SIGHUP). Returns false when the server has stopped.
    pub async fn set_keys(&self, keys: KeyRing) -> bool {
        self.control.send(Control::Keys(keys)).await.is_ok()
    }
}

struct LegacyIo {
    pull: PullBind,
    rx: mpsc::Receiver<Frames>,
    publish: PubBind,
    timeout: Option<Duration>,
}

/// A bound server, ready to [`Server::run`].
pub struct Server {
    cfg: ServerConfig,
    hooks: Hooks,
    bind: HubBind,
    router_rx: mpsc::Receiver<RouterMessage>,
    legacy: Option<LegacyIo>,
    state: SharedState,
    control_rx: mpsc::Receiver<Control>,
    handle: ServerHandle,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    )
}

fn core_limits(cfg: &ServerConfig) -> CoreLimits {
    CoreLimits {
        max_message_bytes: cfg.server.max_message_bytes,
        ..CoreLimits::default()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Server {
    /// Binds the hub sockets (and the legacy ones when configured), installs the status
    /// source and marks the `sockets` readiness condition OK. Errors name the endpoint.
    pub async fn bind(cfg: ServerConfig, hooks: Hooks) -> Result<Server, ServerError> {
        let mut bind_cfg = HubBindConfig::new(cfg.server.listen.clone());
        bind_cfg.limits = Limits {
            // Room for the topic frame beside a maximal payload.
            max_message_bytes: cfg.server.max_message_bytes + 256,
            max_frames: 4,
        };
        bind_cfg.fanout_linger = cfg.server.fanout_linger;
        let (bind, router_rx) = HubBind::bind(bind_cfg).await?;
        let legacy = match &cfg.server.legacy {
            None => None,
            Some(l) => {
                let limits = Limits {
                    max_message_bytes: legacy::MAX_LEGACY_BYTES,
                    max_frames: 4,
                };
                let (pull, rx) = PullBind::bind(&l.pull, limits, 4096).await?;
                let publish = PubBind::bind(&l.publish, 4096).await?;
                tracing::info!(
                    pull = pull.endpoint(),
                    publish = publish.endpoint(),
                    "legacy zmq-ami-broker sockets bound"
                );
                Some(LegacyIo {
                    pull,
                    rx,
                    publish,
                    timeout: l.timeout,
                })
            }
        };
        let now = now_ms();
        let mut hub_cfg = HubConfig::new(cfg.general.name.clone());
        hub_cfg.origin_timeout_ms = duration_ms(cfg.federation.origin_timeout);
        hub_cfg.heartbeat_interval_ms = duration_ms(cfg.server.heartbeat_interval).max(1);
        hub_cfg.chunk_max_entries = cfg.server.snapshot_chunk;
        hub_cfg.chunk_max_bytes = cfg.server.max_message_bytes * 3 / 4;
        let state = Arc::new(Mutex::new(HubState {
            hub: Hub::new(hub_cfg, Epoch(now.0), now),
            down_state: cfg.federation.down_state,
            stats: ServerStats::default(),
        }));
        hooks.status.set(Arc::new(HubStatus(state.clone())));
        hooks.readiness.set("sockets", Ok(()));
        let (control_tx, control_rx) = mpsc::channel(4);
        let handle = ServerHandle {
            state: state.clone(),
            control: control_tx,
            router: bind.router_endpoint().into(),
            publisher: bind.pub_endpoint().into(),
            legacy_pull: legacy.as_ref().map(|l| l.pull.endpoint().into()),
            legacy_pub: legacy.as_ref().map(|l| l.publish.endpoint().into()),
        };
        if cfg.federation.shared_keys.is_empty() {
            tracing::warn!(
                "no [federation] shared_key: messages are neither signed nor authenticated"
            );
        }
        Ok(Server {
            cfg,
            hooks,
            bind,
            router_rx,
            legacy,
            state,
            control_rx,
            handle,
        })
    }

    /// A handle (endpoints, counters, key reload) that outlives [`Server::run`].
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown` is cancelled, then closes the sockets and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let Server {
            cfg,
            hooks,
            bind,
            router_rx,
            legacy,
            state,
            control_rx,
            handle: _,
        } = self;
        let keys = cfg.key_ring();
        let limits = core_limits(&cfg);
        let counters = Counters::new(&hooks.metrics);
        let mut rt = Runtime {
            verifier: Verifier::new(keys.clone(), limits.clone()),
            keys,
            limits,
            name: cfg.general.name.clone(),
            origin_timeout_ms: duration_ms(cfg.federation.origin_timeout),
            heartbeat_ms: duration_ms(cfg.server.heartbeat_interval).max(1),
            hooks,
            state,
            peers: HashMap::new(),
            origin_peer: HashMap::new(),
            known: BTreeMap::new(),
            synthetic: BTreeMap::new(),
            legacy_timeout_ms: legacy.as_ref().and_then(|l| l.timeout).map(duration_ms),
            legacy_on: legacy.is_some(),
            next_legacy_hb: Millis(0),
            outbox: Vec::new(),
            publish_buf: Vec::new(),
            replies_queued: false,
            snapshot_slots: Arc::new(Semaphore::new(SNAPSHOT_CHUNKS_IN_FLIGHT)),
            snapshots_pending: false,
            snapshot_peer: HashMap::new(),
            counters,
            warn: RateLimit::default(),
            seen_transport: StatsSnapshot::default(),
            seen_pull: StatsSnapshot::default(),
        };
        let (legacy_parts, mut legacy_rx) = match legacy {
            Some(l) => (Some((l.pull, l.publish)), Some(l.rx)),
            None => (None, None),
        };
        let legacy_pub = legacy_parts.as_ref().map(|(_, p)| p.clone());
        let mut router_rx = router_rx;
        let mut control_rx = control_rx;
        let period = Duration::from_millis(rt.heartbeat_ms.min(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tracing::info!(
            name = %rt.name,
            router = bind.router_endpoint(),
            publisher = bind.pub_endpoint(),
            "hub running"
        );
        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                msg = router_rx.recv() => match msg {
                    Some(m) => {
                        rt.on_router(m);
                        // Take what else is queued before sending (fewer wake-ups under load),
                        // but send a snapshot answer before serving the next request: several
                        // agents asking at once must not hold all their answers in memory.
                        for _ in 0..BATCH {
                            if rt.replies_queued {
                                break;
                            }
                            match router_rx.try_recv() {
                                Ok(m) => rt.on_router(m),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break Err(ServerError::Closed),
                },
                frames = async {
                    match legacy_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match frames {
                    Some(f) => rt.on_legacy(f),
                    None => legacy_rx = None,
                },
                c = control_rx.recv() => if let Some(Control::Keys(k)) = c {
                    tracing::info!(keys = k.len(), "shared keys replaced");
                    rt.verifier = Verifier::new(k.clone(), rt.limits.clone());
                    rt.keys = k;
                },
                _ = tick.tick() => {
                    let legacy_stats = legacy_parts.as_ref().map(|(p, _)| p.stats());
                    rt.on_tick(bind.stats(), legacy_stats, router_rx.len());
                }
                permit = rt.snapshot_slots.clone().acquire_owned(), if rt.snapshots_pending => {
                    if let Ok(p) = permit {
                        rt.stream_snapshots(Some(p));
                    }
                }
            }
            if !rt.flush(&bind, legacy_pub.as_ref()).await {
                break Err(ServerError::Closed);
            }
        };
        tracing::info!("hub stopping");
        bind.shutdown().await;
        if let Some((pull, publish)) = legacy_parts {
            pull.shutdown().await;
            publish.shutdown().await;
        }
        result
    }
}

/// Runs a server from its configuration until `shutdown`: [`Server::bind`] then
/// [`Server::run`].
pub async fn serve(
    cfg: ServerConfig,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    Server::bind(cfg, hooks).await?.run(shutdown).await
}

#[derive(Default)]
struct RateLimit {
    window: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl RateLimit {
    /// Whether to log now; `Some(n)` when n warnings were suppressed before this one.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.window {
            Some(start) if now.duration_since(start) < WARN_WINDOW => {}
            _ => {
                self.window = Some(now);
                self.count = 0;
            }
        }
        if self.count < WARN_BURST {
            self.count += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

fn peer_id(identity: &[u8]) -> String {
    identity
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Synthetic {
    epoch: Epoch,
    seq: u64,
    hlc: Hlc,
    last_heard: Millis,
}

enum Out {
    Publish(Publication),
    Reply(Bytes, Frames),
    Legacy(Frames),
}

struct Runtime {
    verifier: Verifier,
    keys: KeyRing,
    limits: CoreLimits,
    name: String,
    origin_timeout_ms: u64,
    heartbeat_ms: u64,
    hooks: Hooks,
    state: SharedState,
    /// Routing identity → last heard (verified messages only).
    peers: HashMap<Bytes, Millis>,
    /// Origin → the identity it last used, and when.
    origin_peer: HashMap<String, (Bytes, Millis)>,
    /// Origin → whether it was down when last looked at.
    known: BTreeMap<String, bool>,
    synthetic: BTreeMap<String, Synthetic>,
    legacy_timeout_ms: Option<u64>,
    legacy_on: bool,
    next_legacy_hb: Millis,
    outbox: Vec<Out>,
    /// The messages of the outbox to publish together (kept between flushes).
    publish_buf: Vec<Publication>,
    /// Whether the outbox holds replies (snapshot chunks, resync requests).
    replies_queued: bool,
    /// One permit per snapshot chunk in flight (released when the transport has taken the
    /// chunk's bytes, see [`Held`]).
    snapshot_slots: Arc<Semaphore>,
    /// Whether the core has snapshot answers to stream.
    snapshots_pending: bool,
    /// Origin → the identity its pending snapshot request came from.
    snapshot_peer: HashMap<String, Bytes>,
    counters: Counters,
    warn: RateLimit,
    seen_transport: StatsSnapshot,
    seen_pull: StatsSnapshot,
}

/// The per-kind counters, looked up once (a family lookup takes a lock and a hash).
struct Counters {
    received: [Counter; 3],
    published: [Counter; 3],
}

const KINDS: [MetricKind; 3] = [MetricKind::Device, MetricKind::Presence, MetricKind::Other];

fn kind_index(kind: MetricKind) -> usize {
    match kind {
        MetricKind::Device => 0,
        MetricKind::Presence => 1,
        MetricKind::Other => 2,
    }
}

impl Counters {
    fn new(m: &Metrics) -> Self {
        let family = |f: &Family<KindLabels, Counter>| {
            KINDS.map(|kind| f.get_or_create(&KindLabels { kind }).clone())
        };
        Counters {
            received: family(&m.updates_received),
            published: family(&m.updates_published),
        }
    }
}

fn metric_kind(env: &Envelope) -> MetricKind {
    match &env.body {
        Body::Update(u) => match u.kind() {
            Kind::Device => MetricKind::Device,
            Kind::Presence => MetricKind::Presence,
        },
        _ => MetricKind::Other,
    }
}

fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    at: impl Fn(&V) -> Millis,
) {
    if let Some(k) = map
        .iter()
        .min_by_key(|(_, v)| at(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&k);
    }
}

impl Runtime {
    fn reject(&mut self, reason: &str) {
        self.hooks.metrics.reject(reason);
        *lock(&self.state)
            .stats
            .rejects
            .entry(reason.to_owned())
            .or_insert(0) += 1;
    }

    fn on_router(&mut self, msg: RouterMessage) {
        let now = now_ms();
        let RouterMessage { identity, frames } = msg;
        if frames.len() > 2 {
            self.reject(RejectReason::Malformed.as_str());
            if let Some(s) = self.warn.allow() {
                tracing::warn!(peer = %peer_id(&identity), frames = frames.len(), suppressed = s, "rejected message: too many frames");
            }
            return;
        }
        let Some(payload) = frames.last().cloned() else {
            return;
        };
        let env = match self.verifier.verify(&payload) {
            Ok(env) => env,
            Err(e) => {
                let reason = e.reason();
                self.reject(reason.as_str());
                if reason == RejectReason::Duplicate {
                    tracing::debug!(peer = %peer_id(&identity), "duplicate message dropped");
                } else if let Some(s) = self.warn.allow() {
                    tracing::warn!(peer = %peer_id(&identity), reason = reason.as_str(), error = %e, suppressed = s, "rejected message");
                }
                return;
            }
        };
        lock(&self.state).stats.accepted += 1;
        if env.origin == self.name {
            self.reject("origin_is_hub_name");
            if let Some(s) = self.warn.allow() {
                tracing::warn!(peer = %peer_id(&identity), origin = %env.origin, suppressed = s, "a peer uses this hub's name as its origin; dropped (give hubs and agents distinct names)");
            }
            return;
        }
        self.note_peer(&identity, &env.origin, now);
        if self.synthetic.contains_key(&env.origin) {
            // A real agent took the name of a legacy agent bridged here: refuse, it would
            // corrupt the synthetic stream.
            self.reject("legacy_origin_conflict");
            if let Some(s) = self.warn.allow() {
                tracing::warn!(peer = %peer_id(&identity), origin = %env.origin, suppressed = s, "origin name is used by a legacy agent bridged by this hub; dropped");
            }
            return;
        }
        self.ingest(now, &env, payload, Some(&identity), false);
    }

    fn note_peer(&mut self, identity: &Bytes, origin: &str, now: Millis) {
        if !self.peers.contains_key(identity) && self.peers.len() >= MAX_PEERS {
            evict_oldest(&mut self.peers, |t| *t);
        }
        self.peers.insert(identity.clone(), now);
        match self.origin_peer.get_mut(origin) {
            Some(e) => *e = (identity.clone(), now),
            None => {
                if self.origin_peer.len() >= MAX_PEERS {
                    evict_oldest(&mut self.origin_peer, |(_, t)| *t);
                }
                self.origin_peer
                    .insert(origin.to_owned(), (identity.clone(), now));
            }
        }
    }

    /// Feeds one verified (or self-made) envelope to the core and queues what follows.
    fn ingest(
        &mut self,
        now: Millis,
        env: &Envelope,
        payload: Bytes,
        from: Option<&Bytes>,
        synthetic: bool,
    ) {
        if let (Body::SnapshotRequest { .. }, Some(id)) = (&env.body, from) {
            // The answer goes to the connection that asked, however long it streams.
            self.snapshot_peer.insert(env.origin.clone(), id.clone());
        }
        let ingest = {
            let mut s = lock(&self.state);
            let ingest = s.hub.on_envelope(now, env);
            match ingest {
                Ingest::Forward => s.stats.forwarded += 1,
                Ingest::Duplicate | Ingest::Stale => s.stats.duplicates += 1,
                Ingest::Handled | Ingest::Ignored => {}
            }
            ingest
        };
        if ingest == Ingest::Forward {
            let kind = metric_kind(env);
            self.counters.received[kind_index(kind)].inc();
            self.counters.published[kind_index(kind)].inc();
            // The origin's own message: not sent back to the origin's links that announced it
            // (they would drop it).
            self.outbox.push(Out::Publish(Publication::of(
                env.origin.as_str(),
                vec![Bytes::from_static(env.topic().as_bytes()), payload],
            )));
            if let Body::Update(u) = &env.body {
                if self.legacy_on
                    && !synthetic
                    && let Value::Device(state) = u.value
                {
                    self.outbox.push(Out::Legacy(legacy::device_event(
                        &env.origin,
                        &u.key,
                        state,
                    )));
                    lock(&self.state).stats.legacy_out += 1;
                }
                self.key_event(u);
            }
            if matches!(env.body, Body::FullSyncEnd { .. })
                && self.hooks.events.receiver_count() > 0
            {
                self.hooks.events.publish(StatusEvent::Resync);
            }
            self.check_origin(&env.origin, now);
            if let Body::OriginDown { origin, .. } = &env.body {
                self.check_origin(origin, now);
            }
        }
        self.take_actions(now, from.map(|id| (env.origin.as_str(), id)));
    }

    fn key_event(&self, u: &Update) {
        if self.hooks.events.receiver_count() == 0 {
            return;
        }
        let s = lock(&self.state);
        let ev = match u.kind() {
            Kind::Device => {
                views::device_view(s.hub.table(), s.hub.origins(), s.down_state, &u.key, None)
                    .map(StatusEvent::Device)
            }
            Kind::Presence => {
                views::presence_view(s.hub.table(), &u.key).map(StatusEvent::Presence)
            }
        };
        drop(s);
        if let Some(ev) = ev {
            self.hooks.events.publish(ev);
        }
    }

    /// Notices an origin going down or coming back: logs, events, legacy translation.
    fn check_origin(&mut self, origin: &str, now: Millis) {
        let s = lock(&self.state);
        let Some(info) = s.hub.origins().get(origin) else {
            return;
        };
        let down = info.down.is_some();
        if self.known.get(origin) == Some(&down) {
            return;
        }
        let before = self.known.insert(origin.to_owned(), down);
        if before == Some(down) {
            return;
        }
        if before.is_none() && !down {
            tracing::info!(%origin, epoch = info.epoch.0, "new origin");
            if self.hooks.events.receiver_count() > 0
                && let Some(v) = views::origin_view(s.hub.origins(), origin, now)
            {
                self.hooks.events.publish(StatusEvent::Origin(v));
            }
            return;
        }
        let keys = s.hub.table().device_keys_of(origin);
        if down {
            tracing::warn!(%origin, devices = keys.len(), "origin down");
        } else {
            tracing::info!(%origin, devices = keys.len(), "origin up again");
        }
        if self.legacy_on && !self.synthetic.contains_key(origin) {
            for k in &keys {
                let value = if down {
                    Some(s.down_state)
                } else {
                    s.hub
                        .table()
                        .device(k)
                        .and_then(|m| m.get(origin))
                        .map(|e| e.value)
                };
                if let Some(v) = value {
                    self.outbox
                        .push(Out::Legacy(legacy::device_event(origin, k, v)));
                }
            }
        }
        if self.hooks.events.receiver_count() > 0 {
            if let Some(v) = views::origin_view(s.hub.origins(), origin, now) {
                self.hooks.events.publish(StatusEvent::Origin(v));
            }
            if keys.len() > 64 {
                self.hooks.events.publish(StatusEvent::Resync);
            } else {
                for k in &keys {
                    if let Some(v) =
                        views::device_view(s.hub.table(), s.hub.origins(), s.down_state, k, None)
                    {
                        self.hooks.events.publish(StatusEvent::Device(v));
                    }
                }
            }
        }
    }

    /// Executes the core's pending actions. `current` is the origin and identity of the
    /// message being handled (the requester of a snapshot).
    fn take_actions(&mut self, now: Millis, current: Option<(&str, &Bytes)>) {
        let actions = lock(&self.state).hub.take_queued_actions();
        for action in actions {
            match action {
                HubAction::Publish(env) => {
                    let Some(bytes) = self.seal(&env) else {
                        continue;
                    };
                    {
                        let mut s = lock(&self.state);
                        s.stats.own_published += 1;
                        if matches!(env.body, Body::OriginDown { .. }) {
                            s.stats.origin_down_notices += 1;
                        }
                    }
                    self.counters.published[kind_index(MetricKind::Other)].inc();
                    self.outbox.push(Out::Publish(Publication::new(vec![
                        Bytes::from_static(env.topic().as_bytes()),
                        Bytes::from(bytes),
                    ])));
                    if let Body::OriginDown { origin, .. } = &env.body {
                        self.check_origin(origin, now);
                    }
                }
                HubAction::SendTo { to, envelope } => self.send_to(to, &envelope, current, None),
            }
        }
        self.stream_snapshots(None);
    }

    /// Seals and queues a control envelope for the peer that uses origin `to`; a snapshot
    /// chunk carries its in-flight `slot` until the transport has taken its bytes.
    fn send_to(
        &mut self,
        to: String,
        envelope: &Envelope,
        current: Option<(&str, &Bytes)>,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let answer = matches!(
            envelope.body,
            Body::SnapshotChunk { .. } | Body::SnapshotEnd { .. }
        );
        let identity = match current {
            Some((origin, id)) if origin == to => Some(id.clone()),
            _ => answer
                .then(|| self.snapshot_peer.get(&to).cloned())
                .flatten()
                .or_else(|| self.origin_peer.get(&to).map(|(id, _)| id.clone())),
        };
        if matches!(envelope.body, Body::SnapshotEnd { .. }) {
            self.snapshot_peer.remove(&to);
        }
        let Some(identity) = identity else {
            tracing::debug!(%to, kind = envelope.body.type_name(), "no connection known for origin; control message dropped");
            if matches!(envelope.body, Body::SnapshotChunk { .. }) {
                // Nobody to stream the rest of this answer to.
                lock(&self.state).hub.cancel_snapshot(&to);
            }
            return;
        };
        {
            let mut s = lock(&self.state);
            match &envelope.body {
                Body::SnapshotChunk { entries, .. } => {
                    s.stats.chunks_sent += 1;
                    self.hooks
                        .metrics
                        .snapshot_entries
                        .observe(entries.len() as f64);
                }
                Body::SnapshotEnd { chunks, .. } => {
                    s.stats.snapshots_served += 1;
                    tracing::debug!(%to, chunks, "snapshot served");
                }
                Body::ResyncRequest { .. } => {
                    s.stats.resync_requests += 1;
                    tracing::info!(origin = %to, "asking origin to republish its state");
                }
                _ => {}
            }
        }
        let Some(bytes) = self.seal(envelope) else {
            return;
        };
        self.replies_queued = true;
        self.outbox.push(Out::Reply(
            identity,
            vec![
                Bytes::from_static(envelope.topic().as_bytes()),
                match slot {
                    Some(slot) => Bytes::from_owner(Held { bytes, _slot: slot }),
                    None => Bytes::from(bytes),
                },
            ],
        ));
    }

    /// Streams snapshot answers: seals chunks while in-flight slots are free (`first`: one
    /// already taken).
    fn stream_snapshots(&mut self, mut first: Option<OwnedSemaphorePermit>) {
        loop {
            let Some(slot) = first
                .take()
                .or_else(|| self.snapshot_slots.clone().try_acquire_owned().ok())
            else {
                break;
            };
            let next = lock(&self.state).hub.next_snapshot_chunk();
            match next {
                Some(HubAction::SendTo { to, envelope }) => {
                    self.send_to(to, &envelope, None, Some(slot));
                }
                Some(HubAction::Publish(_)) | None => break,
            }
        }
        self.snapshots_pending = lock(&self.state).hub.snapshots_pending() > 0;
    }

    fn seal(&mut self, env: &Envelope) -> Option<Vec<u8>> {
        match self.keys.seal(env, &self.limits) {
            Ok(b) => Some(b),
            Err(e) => {
                if let Some(s) = self.warn.allow() {
                    tracing::error!(error = %e, kind = env.body.type_name(), suppressed = s, "cannot encode an envelope of the hub; dropped");
                }
                None
            }
        }
    }

    fn on_legacy(&mut self, frames: Frames) {
        let now = now_ms();
        let msg = match legacy::parse(&frames) {
            Ok(m) => m,
            Err(e) => {
                self.reject(e.reason());
                if let Some(s) = self.warn.allow() {
                    tracing::warn!(error = %e, suppressed = s, "rejected legacy message");
                }
                return;
            }
        };
        lock(&self.state).stats.legacy_in += 1;
        // The original server republished every message unchanged: legacy agents keep
        // talking to each other exactly as before.
        self.outbox.push(Out::Legacy(frames));
        if let Some(syn) = self.synthetic.get_mut(&msg.origin) {
            syn.last_heard = now;
        }
        match msg.device_change() {
            DeviceChange::State { device, state } => {
                self.hooks.metrics.event_in("legacy", MetricKind::Device);
                self.legacy_state(now, &msg.origin, device, state);
            }
            DeviceChange::Skipped => lock(&self.state).stats.legacy_skipped += 1,
            DeviceChange::BadState => self.reject("legacy_malformed"),
            DeviceChange::NotDevice => {}
        }
    }

    fn legacy_state(&mut self, now: Millis, origin: &str, device: String, state: DeviceState) {
        let conflict = origin == self.name
            || (!self.synthetic.contains_key(origin)
                && lock(&self.state).hub.origins().get(origin).is_some());
        if conflict {
            self.reject("legacy_origin_conflict");
            if let Some(s) = self.warn.allow() {
                tracing::warn!(%origin, suppressed = s, "legacy agent uses the name of a federation origin; dropped");
            }
            return;
        }
        if !self.synthetic.contains_key(origin) {
            if self.synthetic.len() >= MAX_LEGACY_ORIGINS {
                self.reject("legacy_too_many_origins");
                return;
            }
            tracing::info!(%origin, "legacy agent joins the federation");
            let epoch = lock(&self.state).hub.epoch();
            self.synthetic.insert(
                origin.to_owned(),
                Synthetic {
                    epoch: Epoch(epoch.0.max(now.0)),
                    seq: 0,
                    hlc: Hlc::new(),
                    last_heard: now,
                },
            );
        }
        let unchanged = {
            let s = lock(&self.state);
            !s.hub.origins().is_down(origin)
                && s.hub
                    .table()
                    .device(&device)
                    .and_then(|m| m.get(origin))
                    .is_some_and(|e| e.value == state)
        };
        if unchanged {
            lock(&self.state).stats.legacy_skipped += 1;
            return;
        }
        let Some(syn) = self.synthetic.get_mut(origin) else {
            return;
        };
        let ts = syn.hlc.now(now);
        let env = Envelope::new(
            origin,
            syn.epoch,
            syn.seq + 1,
            Body::Update(Update {
                key: device,
                value: Value::Device(state),
                ts,
            }),
        );
        if env.validate(&self.limits).is_err() {
            self.reject("legacy_malformed");
            return;
        }
        syn.seq += 1;
        let Some(bytes) = self.seal(&env) else { return };
        lock(&self.state).stats.legacy_federated += 1;
        self.ingest(now, &env, Bytes::from(bytes), None, true);
    }

    fn legacy_heartbeats(&mut self, now: Millis) {
        if now < self.next_legacy_hb {
            return;
        }
        self.next_legacy_hb = now.plus(self.heartbeat_ms);
        let timeout = self.legacy_timeout_ms;
        let due: Vec<(String, Epoch, u64)> = self
            .synthetic
            .iter_mut()
            .filter(|(_, s)| timeout.is_none_or(|t| now.since(s.last_heard) <= t))
            .map(|(name, s)| {
                s.seq += 1;
                (name.clone(), s.epoch, s.seq)
            })
            .collect();
        for (name, epoch, seq) in due {
            let env = Envelope::new(name, epoch, seq, Body::Heartbeat { local_down: false });
            if let Some(bytes) = self.seal(&env) {
                self.ingest(now, &env, Bytes::from(bytes), None, true);
            }
        }
    }

    fn on_tick(&mut self, transport: StatsSnapshot, pull: Option<StatsSnapshot>, inbound: usize) {
        let now = now_ms();
        lock(&self.state).hub.tick(now);
        self.take_actions(now, None);
        self.legacy_heartbeats(now);
        let origins: Vec<String> = lock(&self.state)
            .hub
            .origins()
            .iter()
            .map(|(o, _)| o.clone())
            .collect();
        for o in &origins {
            self.check_origin(o, now);
        }
        // Forget peers not heard for a long time; count the live ones.
        let keep = self.origin_timeout_ms.saturating_mul(4).max(60_000);
        self.peers.retain(|_, t| now.since(*t) <= keep);
        self.origin_peer.retain(|_, (_, t)| now.since(*t) <= keep);
        let live = self
            .peers
            .values()
            .filter(|t| now.since(**t) <= self.origin_timeout_ms)
            .count();
        let (up, down) = {
            let mut s = lock(&self.state);
            s.stats.peers = live;
            let down = s
                .hub
                .origins()
                .iter()
                .filter(|(_, i)| i.down.is_some())
                .count();
            (s.hub.origins().iter().count() - down, down)
        };
        let m = &self.hooks.metrics;
        m.origins_up.set(i64::try_from(up).unwrap_or(i64::MAX));
        m.origins_down.set(i64::try_from(down).unwrap_or(i64::MAX));
        m.set_queue_depth("peers", i64::try_from(live).unwrap_or(i64::MAX));
        m.set_queue_depth("router_inbound", i64::try_from(inbound).unwrap_or(i64::MAX));
        // Transport-level drops become rejects.
        let oversize = transport
            .dropped_oversize
            .saturating_sub(self.seen_transport.dropped_oversize);
        let full = transport
            .dropped_inbound_full
            .saturating_sub(self.seen_transport.dropped_inbound_full);
        let lost_out = transport
            .dropped_outbound
            .saturating_sub(self.seen_transport.dropped_outbound);
        if lost_out > 0
            && let Some(s) = self.warn.allow()
        {
            let timeouts = transport
                .send_timeouts
                .saturating_sub(self.seen_transport.send_timeouts);
            tracing::warn!(
                dropped = lost_out,
                send_timeouts = timeouts,
                suppressed = s,
                "replies or publications dropped by the transport (a peer gone or not reading)"
            );
        }
        self.seen_transport = transport;
        let (l_oversize, l_full) = match pull {
            Some(p) => {
                let d = (
                    p.dropped_oversize
                        .saturating_sub(self.seen_pull.dropped_oversize),
                    p.dropped_inbound_full
                        .saturating_sub(self.seen_pull.dropped_inbound_full),
                );
                self.seen_pull = p;
                d
            }
            None => (0, 0),
        };
        for (reason, n) in [
            ("too_large", oversize),
            ("overload", full),
            ("legacy_too_large", l_oversize),
            ("legacy_overload", l_full),
        ] {
            if n > 0 {
                self.hooks
                    .metrics
                    .rejects
                    .get_or_create(&hintfed_daemon::metrics::RejectLabels {
                        reason: reason.to_owned(),
                    })
                    .inc_by(n);
                *lock(&self.state)
                    .stats
                    .rejects
                    .entry(reason.to_owned())
                    .or_insert(0) += n;
                if let Some(s) = self.warn.allow() {
                    tracing::warn!(
                        reason,
                        dropped = n,
                        suppressed = s,
                        "messages dropped by the socket layer"
                    );
                }
            }
        }
    }

    /// Sends what the last step queued. Returns false when the hub sockets are gone.
    /// Consecutive publications go to the socket task as one batch (one queue operation).
    async fn flush(&mut self, bind: &HubBind, legacy_pub: Option<&PubBind>) -> bool {
        self.replies_queued = false;
        // Both lists keep their capacity from one flush to the next.
        let batch = &mut self.publish_buf;
        batch.clear();
        for out in self.outbox.drain(..) {
            match out {
                Out::Publish(p) => batch.push(p),
                Out::Reply(identity, frames) => {
                    let published = bind.publish_batch(batch).await;
                    batch.clear();
                    if published.is_err() || bind.reply(identity, frames).await.is_err() {
                        return false;
                    }
                }
                Out::Legacy(frames) => {
                    if let Some(p) = legacy_pub {
                        let _ = p.publish(frames).await;
                    }
                }
            }
        }
        let published = bind.publish_batch(batch).await;
        batch.clear();
        published.is_ok()
    }
}

/// The bytes of a snapshot chunk, holding its in-flight slot until dropped.
struct Held {
    bytes: Vec<u8>,
    _slot: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}
