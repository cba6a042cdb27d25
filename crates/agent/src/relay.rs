//! [`Relay`]: drives one [`Node`] against one Asterisk ([`Pbx`]) and one federation
//! transport (any [`FederationTransport`]: the ZeroMQ hubs of the agent, or the broker's
//! in-process bus).
//!
//! One Tokio task runs a select loop over:
//! - [`PbxEvent`]s: `Up` → [`Node::on_local_restored`] (or [`Node::on_local_restarted`] when
//!   no `Down` came in between) and a full sync; `Resync` → a full sync; `Down` →
//!   [`Node::on_local_lost`]; device and presence changes → [`Node::on_local_event`];
//! - inbound transport messages → [`Verifier::verify`] (rejects counted by reason in
//!   `hintfed_rejects_total`, except duplicates, which every second hub produces and which
//!   only [`RelayCounters::rejects`] counts) → [`Node::on_remote`];
//! - a tick ([`RelayConfig::tick`]) → [`Node::tick`], snapshot fallback, status and gauges;
//! - `Setvar`s finished, taken in batches ([`Pbx::take_setvars`] →
//!   [`Node::on_apply_results`], one call a batch), and completions
//!   of the work it spawned: full syncs ([`Node::on_local_full_sync`]) and local queries
//!   (fed back as local events);
//! - the number of reachable hubs (a hub link that comes back while no snapshot completed
//!   triggers [`Node::request_snapshot`]; every new link gets a `Hello`);
//! - [`RelayHandle`] controls (SIGHUP reload of the device filter and keys).
//!
//! After each input it drains [`Node::take_actions`]: `Publish` → [`KeyRing::seal`] →
//! [`FederationTransport::publish`] under [`Envelope::topic`]; `Request` →
//! [`FederationTransport::request_snapshot`] (a different hub than the last one when several
//! are up, so a dead hub does not hold the snapshot hostage); `Apply` → `Setvar`
//! ([`Pbx::start_setvar`] under a token, pipelined on the AMI connection: no future, task
//! or channel per write; the node's apply queue bounds how many are in flight);
//! `QueryLocal` → `Getvar` per device over AMI, or over res_zmq_manager (where `Getvar`
//! crashes Asterisk) the state derived from `ExtensionStateList` for hints holding that
//! device alone.
//!
//! # Full sync
//! `DeviceStateList` + `PresenceStateList` + `ExtensionStateList`; devices named in hints but
//! missing from `DeviceStateList` (it lists only cached states) are read with `Getvar` over
//! AMI. Over res_zmq_manager a hint device is derived from the hint's extension state only
//! when the hint holds that one device (a hint mixing devices reports their aggregate, which
//! cannot be split back): devices in mixed hints and not cached stay unknown until their next
//! change. Local events arriving while a full sync is in flight are held and replayed after
//! it, so a change racing the lists is never overwritten by an older listed value; events
//! held before a newer listing was asked, and query answers older than an event or a listing
//! of their device, are not believed ([`Intake`]).
//!
//! A failed full sync is retried after a second; local events keep being held meanwhile.
//! Failed writes (refused, or timed out while Asterisk did not answer) are written again a
//! second later ([`Node::retry_failed_writes`]), and again while they keep failing. A write
//! left unanswered also has the Asterisk listed again then: events it sent while it stalled
//! may be lost, and its link may never have dropped to say so.
//! On shutdown the relay does not announce its origin down: a restart for an upgrade leaves
//! the lamps as they are, and an agent that does not come back is timed out by everyone after
//! `origin_timeout`.
//!
//! # Filtering
//! `include`/`exclude` are applied here ([`DeviceFilter`]), not in the node's policy, so they
//! can be reloaded; a reload starts a full sync, which withdraws devices no longer federated.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use compact_str::CompactString;

use futures::StreamExt;
use hintfed_asterisk::event::{extension_status_to_device_state, hint_devices};
use hintfed_asterisk::pbx::SetvarDone;
use hintfed_asterisk::{Pbx, PbxError, PbxEvent};
use hintfed_core::{
    Action, Body, DeviceState, Envelope, KeyRing, Kind, Limits, LocalEvent, Millis, Node, Presence,
    Role, Value, Verifier, WriteId, is_custom_device,
};
use hintfed_daemon::http::{
    BoxFuture, OriginView, Readiness, StateView, StatusEvent, StatusEvents, StatusSource,
};
use hintfed_daemon::metrics::{self, ApplyResult, Metrics};
use hintfed_daemon::views;
use hintfed_transport::{FederationTransport, Incoming};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use regex::Regex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::intake::Intake;

/// Which local devices are federated: `include` (if set) must match, `exclude` must not.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    include: Option<Regex>,
    exclude: Option<Regex>,
}

impl DeviceFilter {
    /// Compiles the two optional patterns.
    pub fn new(include: Option<&str>, exclude: Option<&str>) -> Result<Self, regex::Error> {
        Ok(DeviceFilter {
            include: include.map(Regex::new).transpose()?,
            exclude: exclude.map(Regex::new).transpose()?,
        })
    }

    /// Whether `device` is federated.
    pub fn allows(&self, device: &str) -> bool {
        self.include.as_ref().is_none_or(|r| r.is_match(device))
            && !self.exclude.as_ref().is_some_and(|r| r.is_match(device))
    }
}

/// Settings of a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Period of [`Node::tick`] (default 100 ms).
    pub tick: Duration,
    /// A snapshot whose hub has sent nothing of it for this long is asked of another hub
    /// (default 2 s).
    pub snapshot_timeout: Duration,
    /// Wire limits for sealing and verifying.
    pub limits: Limits,
    /// Label of this Asterisk in metrics (`source` of `hintfed_events_in_total`).
    pub source_label: String,
    /// On shutdown, how long to wait for `Setvar`s in flight (default 2 s).
    pub drain_timeout: Duration,
    /// Keys that sign what is sent and verify what is received (empty: no authentication).
    pub keys: KeyRing,
    /// Which local devices are federated.
    pub filter: DeviceFilter,
}

impl RelayConfig {
    /// Defaults, with `source_label` as the metrics label.
    pub fn new(source_label: impl Into<String>) -> Self {
        RelayConfig {
            tick: Duration::from_millis(100),
            snapshot_timeout: Duration::from_secs(2),
            limits: Limits::default(),
            source_label: source_label.into(),
            drain_timeout: Duration::from_secs(2),
            keys: KeyRing::default(),
            filter: DeviceFilter::default(),
        }
    }
}

/// Where a relay reports (all optional, so tests and the broker pick what they need).
#[derive(Debug, Clone, Default)]
pub struct RelayHooks {
    /// Prometheus metrics.
    pub metrics: Option<Arc<Metrics>>,
    /// Live status events for `/events`.
    pub events: Option<StatusEvents>,
    /// Readiness conditions `asterisk` and `federation` (prefixed by `readiness_prefix`).
    pub readiness: Option<Readiness>,
    /// Prefix of the readiness condition names (e.g. `pbx-a ` in the broker); empty here.
    pub readiness_prefix: String,
}

/// Why a relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The transport's inbound stream was already taken by someone else.
    #[error("the transport's inbound stream was already taken")]
    IncomingTaken,
    /// The Asterisk event stream ended (the [`Pbx`] tasks stopped).
    #[error("the Asterisk event stream ended")]
    EventsClosed,
}

/// A change a [`RelayHandle`] asks for.
#[derive(Debug)]
enum Control {
    /// SIGHUP: a new device filter and keys.
    Reload { filter: DeviceFilter, keys: KeyRing },
    /// `/api/state`: the rows, built from the table.
    State(oneshot::Sender<StateView>),
}

/// Counters of a relay, beside the node's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Full syncs completed.
    pub full_syncs: u64,
    /// Inbound messages rejected by the verifier, by reason label.
    pub rejects: BTreeMap<String, u64>,
    /// Inbound messages accepted.
    pub accepted: u64,
    /// Inbound messages naming this node's origin, dropped unchecked (its own, sent back by
    /// a hub that does not honour the origin the hub link announces, an older one; see
    /// [`hintfed_core::sealed_by`]). Zero against current hubs, which send none back.
    pub own_dropped: u64,
    /// Stream updates published.
    pub published: u64,
    /// Publishes no hub took.
    pub publish_failed: u64,
    /// `Setvar`s that succeeded / failed.
    pub applies_ok: u64,
    /// `Setvar`s that failed.
    pub applies_failed: u64,
    /// Local devices queried (`Getvar` or hint-derived).
    pub queried: u64,
    /// Snapshots requested through the transport.
    pub snapshot_requests: u64,
    /// Whether the node completed a snapshot.
    pub snapshot_done: bool,
    /// Whether the local Asterisk is up (actions served).
    pub pbx_up: bool,
    /// Reachable hubs.
    pub hubs_connected: usize,
}

/// What the status page reads without asking the relay: the origin rows and the counters,
/// refreshed at most once per tick. Device and presence rows are built from the node's table
/// when `/api/state` asks ([`Control::State`]): the agent keeps no copy of its table for the
/// page.
#[derive(Debug, Default)]
struct StatusShared {
    origins: Vec<OriginView>,
    counters: RelayCounters,
}

/// What the rows pushed on `/events` depend on beside their own table entries: when it
/// changes (an origin down or back, which changes how every row of it reads), listeners are
/// told to fetch the state again.
#[derive(Debug, PartialEq, Eq)]
struct StatusSig {
    down: DeviceState,
    down_origins: Vec<String>,
}

/// Access to a relay's state: implements [`StatusSource`] for `/api/state` (built by the relay
/// on request) and `/api/origins`, and exposes [`RelayCounters`] (tests, the broker).
#[derive(Debug, Clone)]
pub struct RelayStatus {
    shared: Arc<RwLock<StatusShared>>,
    control: mpsc::Sender<Control>,
}

impl RelayStatus {
    fn read<R>(&self, f: impl FnOnce(&StatusShared) -> R) -> R {
        let g = self
            .shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&g)
    }

    fn write(&self, f: impl FnOnce(&mut StatusShared)) {
        let mut g = self
            .shared
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g);
    }

    /// The counters as of the last refresh.
    pub fn counters(&self) -> RelayCounters {
        self.read(|c| c.counters.clone())
    }
}

impl StatusSource for RelayStatus {
    /// Asks the relay for its rows (empty once the relay has stopped).
    fn state(&self) -> BoxFuture<'_, StateView> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if self.control.send(Control::State(tx)).await.is_err() {
                return StateView::default();
            }
            rx.await.unwrap_or_default()
        })
    }

    fn origins(&self) -> Vec<OriginView> {
        self.read(|c| c.origins.clone())
    }
}

/// Handle to a running [`Relay`]: status and reload.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    tx: mpsc::Sender<Control>,
    status: RelayStatus,
}

impl RelayHandle {
    /// The relay's status source.
    pub fn status(&self) -> RelayStatus {
        self.status.clone()
    }

    /// Replaces the device filter and the keys (SIGHUP). Returns false when the relay is gone.
    pub async fn reload(&self, filter: DeviceFilter, keys: KeyRing) -> bool {
        self.tx.send(Control::Reload { filter, keys }).await.is_ok()
    }
}

/// A `Setvar` in flight, under its token ([`Pbx::start_setvar`]).
#[derive(Debug)]
struct InFlight {
    /// Reports it to the node.
    id: WriteId,
    /// For the log of a failure.
    target: CompactString,
    kind: Kind,
    started: tokio::time::Instant,
}

/// `Setvar`s in flight: each under a token (its slot's index) given to
/// [`Pbx::start_setvar`], which reports the finished ones in batches ([`Pbx::take_setvars`]):
/// no future, task or channel per write.
#[derive(Debug, Default)]
struct Writes {
    slots: Vec<Option<InFlight>>,
    /// Indexes of empty slots.
    free: Vec<usize>,
    /// Finished writes taken from the Pbx, reused between batches.
    done: Vec<SetvarDone>,
    /// Their outcomes, handed to the node together (reused between batches).
    results: Vec<(WriteId, bool)>,
    /// The `Setvar` variable being written (reused between writes).
    variable: String,
}

impl Writes {
    fn insert(&mut self, w: InFlight) -> u64 {
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(w);
                i
            }
            None => {
                self.slots.push(Some(w));
                self.slots.len() - 1
            }
        };
        i as u64
    }

    fn remove(&mut self, token: u64) -> Option<InFlight> {
        let i = usize::try_from(token).ok()?;
        let w = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(w)
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Work spawned by the relay, reporting back.
#[derive(Debug)]
enum Done {
    Sync {
        id: u64,
        result: Result<Listing, PbxError>,
    },
    Query {
        /// The query's number ([`Intake::query_sent`]).
        id: u64,
        keys: Vec<String>,
        events: Vec<LocalEvent>,
    },
}

/// The per-event counters, looked up once: a lookup per event hashed the labels under a lock
/// (and for `events_in` allocated the source label).
#[derive(Debug, Clone)]
struct MetricHandles {
    /// By [`kind_index`].
    events_in: [Counter; 2],
    received: [Counter; 2],
    published: [Counter; 2],
    echoes: [Counter; 2],
    applied: Counter,
    apply_failed: Counter,
}

impl MetricHandles {
    fn new(m: &Metrics, source: &str) -> Self {
        // One lookup per statement: a lookup's read guard lives to the end of its statement,
        // and a second lookup that has to create its label waits for the write lock.
        let kinds = [metrics::Kind::Device, metrics::Kind::Presence];
        let by_kind = |f: &Family<metrics::KindLabels, Counter>| -> [Counter; 2] {
            kinds.map(|kind| f.get_or_create(&metrics::KindLabels { kind }).clone())
        };
        let events_in = kinds.map(|kind| {
            m.events_in
                .get_or_create(&metrics::EventLabels {
                    source: source.to_owned(),
                    kind,
                })
                .clone()
        });
        let received = by_kind(&m.updates_received);
        let published = by_kind(&m.updates_published);
        let echoes = by_kind(&m.echoes_suppressed);
        let applied = m
            .applies
            .get_or_create(&metrics::ApplyLabels {
                result: ApplyResult::Applied,
            })
            .clone();
        let apply_failed = m
            .applies
            .get_or_create(&metrics::ApplyLabels {
                result: ApplyResult::Failed,
            })
            .clone();
        MetricHandles {
            events_in,
            received,
            published,
            echoes,
            applied,
            apply_failed,
        }
    }
}

/// Index of a kind in [`MetricHandles`]' arrays.
fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Device => 0,
        Kind::Presence => 1,
    }
}

/// Delay before a failed full sync is tried again.
const SYNC_RETRY: Duration = Duration::from_secs(1);

/// Queued hub messages, or Asterisk events, taken in one turn of the relay's loop after the
/// one that woke it.
const BATCH: usize = 256;

/// Delay before writes that failed are tried again.
const WRITE_RETRY: Duration = Duration::from_secs(1);

fn wall_now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    )
}

/// The wall clock as the node's [`Millis`] (Unix ms); also a fine first [`hintfed_core::Epoch`].
pub fn now_millis() -> Millis {
    wall_now()
}

/// Converts an AMI device event into a node event (the event's own name taken over when
/// given as a `String`); `None` for an unknown state word.
fn device_event(device: impl Into<String>, state: &str) -> Option<LocalEvent> {
    match state.parse::<DeviceState>() {
        Ok(s) => Some(LocalEvent::device(device, s)),
        Err(_) => {
            let device: String = device.into();
            debug!(device, state, "unknown device state word ignored");
            None
        }
    }
}

fn presence_event(key: &str, status: &str, subtype: &str, message: &str) -> Option<LocalEvent> {
    match Presence::from_event(status, subtype, message) {
        Ok(p) => Some(LocalEvent::presence(key, p)),
        Err(e) => {
            debug!(presentity = key, status, error = %e, "unreadable presence ignored");
            None
        }
    }
}

/// The relay. See the module docs.
pub struct Relay<T: FederationTransport> {
    node: Node,
    pbx: Pbx,
    pbx_events: mpsc::Receiver<PbxEvent>,
    /// The events of `pbx_events` taken in one turn (kept for its room).
    pbx_batch: Vec<PbxEvent>,
    transport: T,
    incoming: mpsc::Receiver<Incoming>,
    connected: watch::Receiver<usize>,
    link_ups: watch::Receiver<u64>,
    /// Whether the transport reports link ups (else a rising connected count stands for one).
    link_ups_reported: bool,
    keys: KeyRing,
    verifier: Verifier,
    /// The envelope inbound messages are read into, kept between them (its strings' room).
    inbound: Envelope,
    filter: DeviceFilter,
    cfg: RelayConfig,
    hooks: RelayHooks,
    handles: Option<MetricHandles>,
    control_tx: mpsc::Sender<Control>,
    control_rx: mpsc::Receiver<Control>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    status: RelayStatus,
    counters: RelayCounters,
    pbx_up: bool,
    /// Orders events, listings and query answers of the local Asterisk.
    intake: Intake,
    sync_retry_at: Option<Instant>,
    writes: Writes,
    write_retry_at: Option<Instant>,
    /// A write went unanswered: Asterisk stalled, and events it sent meanwhile may be lost
    /// (a hung Asterisk, or one whose link stayed open while it dropped what it sent); it is
    /// listed again when the failed writes are retried.
    stalled: bool,
    last_snapshot_hub: Option<(usize, Instant)>,
    hubs: usize,
    pending_hello: Option<Envelope>,
    dirty: bool,
    /// Table version of the last `/events` refresh (`None`: none yet).
    status_seen: Option<u64>,
    /// Origins down (and the down state) at the last refresh.
    status_sig: Option<StatusSig>,
}

impl<T: FederationTransport + 'static> Relay<T> {
    /// A relay for `node` (its origin is this Asterisk), reading `pbx_events` from `pbx` and
    /// federating over `transport`, signing and verifying with `cfg.keys`.
    pub fn new(
        node: Node,
        (pbx, pbx_events): (Pbx, mpsc::Receiver<PbxEvent>),
        transport: T,
        cfg: RelayConfig,
        hooks: RelayHooks,
    ) -> Result<Self, RelayError> {
        let keys = cfg.keys.clone();
        let filter = cfg.filter.clone();
        let incoming = transport.take_incoming().ok_or(RelayError::IncomingTaken)?;
        let connected = transport.connected();
        let link_ups = transport.link_ups();
        // The trait's default is a channel whose sender is already gone.
        let link_ups_reported = link_ups.has_changed().is_ok();
        let (control_tx, control_rx) = mpsc::channel(8);
        let status = RelayStatus {
            shared: Arc::default(),
            control: control_tx.clone(),
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Relay {
            verifier: Verifier::new(keys.clone(), cfg.limits.clone()),
            inbound: Envelope::empty(),
            node,
            pbx,
            pbx_events,
            pbx_batch: Vec::with_capacity(1 + BATCH),
            transport,
            incoming,
            connected,
            link_ups,
            link_ups_reported,
            keys,
            filter,
            handles: hooks
                .metrics
                .as_deref()
                .map(|m| MetricHandles::new(m, &cfg.source_label)),
            cfg,
            hooks,
            control_tx,
            control_rx,
            done_tx,
            done_rx,
            status,
            counters: RelayCounters::default(),
            pbx_up: false,
            intake: Intake::default(),
            sync_retry_at: None,
            writes: Writes::default(),
            write_retry_at: None,
            stalled: false,
            last_snapshot_hub: None,
            hubs: 0,
            pending_hello: None,
            dirty: true,
            status_seen: None,
            status_sig: None,
        })
    }

    /// A handle for status and reload.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            tx: self.control_tx.clone(),
            status: self.status.clone(),
        }
    }

    fn ready(&self, condition: &str, state: Result<(), String>) {
        if let Some(r) = &self.hooks.readiness {
            r.set(
                &format!("{}{condition}", self.hooks.readiness_prefix),
                state,
            );
        }
    }

    fn metrics(&self) -> Option<&Metrics> {
        self.hooks.metrics.as_deref()
    }

    /// Runs until `shutdown` is cancelled (then waits up to `drain_timeout` for `Setvar`s in
    /// flight) or the Asterisk event stream ends.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), RelayError> {
        self.ready("asterisk", Err("connecting to Asterisk".into()));
        self.ready("federation", Err("no hub connected".into()));
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.on_connected_changed();
        self.drain_actions().await;
        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                // The event that woke the loop and what else is queued, up to a batch: each
                // of our writes comes back as an event, and a fast Asterisk answers a window
                // of writes at once; one event a turn fell behind the writes, the AMI queue
                // overflowed and forced a full resync. Not everything queued either: at
                // 20,000 updates/s a turn of up to 4,096 events kept the AMI connection from
                // reading long enough to overflow its queue.
                n = self.pbx_events.recv_many(&mut self.pbx_batch, 1 + BATCH) => {
                    if n == 0 {
                        break Err(RelayError::EventsClosed);
                    }
                    // One clock read for the batch (taken within microseconds).
                    let now = wall_now();
                    let mut batch = std::mem::take(&mut self.pbx_batch);
                    for ev in batch.drain(..) {
                        self.on_pbx_event(now, ev);
                    }
                    self.pbx_batch = batch;
                }
                Some(msg) = self.incoming.recv() => {
                    let now = wall_now();
                    self.on_incoming(now, &msg);
                    // Take what else is queued before acting (bursts, snapshots).
                    for _ in 0..BATCH {
                        match self.incoming.try_recv() {
                            Ok(m) => self.on_incoming(now, &m),
                            Err(_) => break,
                        }
                    }
                }
                () = self.pbx.setvars_done(), if !self.writes.is_empty() => {
                    // Completions come in bursts (pipelined writes): every finished one at
                    // once, freeing their slots before new writes are made.
                    self.poll_writes();
                }
                Some(done) = self.done_rx.recv() => self.on_done(done),
                Ok(()) = self.connected.changed() => self.on_connected_changed(),
                Ok(()) = self.link_ups.changed() => {
                    self.link_ups.borrow_and_update();
                    self.on_link_up();
                }
                Some(ctl) = self.control_rx.recv() => self.on_control(ctl),
                _ = tick.tick() => self.on_tick(),
            }
            self.drain_actions().await;
        };
        self.drain_in_flight().await;
        self.refresh_status();
        result
    }

    async fn drain_in_flight(&mut self) {
        let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
        while !self.writes.is_empty() {
            match tokio::time::timeout_at(deadline, self.pbx.setvars_done()).await {
                Ok(()) => {
                    self.poll_writes();
                }
                Err(_) => {
                    warn!(
                        in_flight = self.writes.len(),
                        "shutdown: writes still in flight abandoned"
                    );
                    break;
                }
            }
        }
    }

    // ----- inputs -------------------------------------------------------------------------

    fn on_pbx_event(&mut self, now: Millis, ev: PbxEvent) {
        self.dirty = true;
        match ev {
            PbxEvent::Up { generation } => {
                // The listing is asked first: the node's re-apply of every remote state
                // waits for it, and does not write what Asterisk already holds.
                self.start_sync();
                if self.pbx_up {
                    info!(
                        generation,
                        "Asterisk restarted under a live link; new epoch, resync"
                    );
                    self.node.on_local_restarted(now);
                } else {
                    info!(generation, "Asterisk connected; resync");
                    self.node.on_local_restored(now);
                }
                if generation > 1
                    && let Some(m) = self.metrics()
                {
                    m.reconnect("asterisk");
                }
                self.pbx_up = true;
                self.ready("asterisk", Ok(()));
            }
            PbxEvent::Down { reason } => {
                warn!(%reason, "Asterisk lost; announcing this origin down");
                self.pbx_up = false;
                self.sync_retry_at = None;
                self.stalled = false;
                self.intake.lost();
                self.node.on_local_lost(now);
                self.ready("asterisk", Err(format!("Asterisk not reachable: {reason}")));
            }
            PbxEvent::Resync { reason } => {
                info!(%reason, "resync requested");
                if self.pbx_up {
                    self.start_sync();
                }
            }
            PbxEvent::Device(d) => {
                if let Some(c) = &self.handles {
                    c.events_in[0].inc();
                }
                if !self.filter.allows(&d.device) {
                    return;
                }
                if let Some(e) = device_event(d.device, &d.state) {
                    self.local_event(now, e, None);
                }
            }
            PbxEvent::Presence(p) => {
                if let Some(c) = &self.handles {
                    c.events_in[1].inc();
                }
                if let Some(e) = presence_event(&p.presentity, &p.status, &p.subtype, &p.message) {
                    self.local_event(now, e, None);
                }
            }
        }
    }

    /// An event of the local Asterisk, or (`query`) a query's answer, through the intake.
    fn local_event(&mut self, now: Millis, e: LocalEvent, query: Option<u64>) {
        let Some(e) = self.intake.admit(e, query) else {
            return;
        };
        let kind = e.value.kind();
        let echoes = self.node.stats().echoes;
        self.node.on_local_event(now, e);
        if self.node.stats().echoes > echoes
            && let Some(c) = &self.handles
        {
            c.echoes[kind_index(kind)].inc();
        }
        self.dirty = true;
    }

    fn on_incoming(&mut self, now: Millis, msg: &Incoming) {
        let Some(payload) = msg.frames.last() else {
            return;
        };
        // Our own messages, which an older hub sends back to every subscriber (a current
        // one honours the origin our hub links announce and sends none): the node ignores
        // them ([`Node::on_remote`]), so they are dropped before their check (a tenth of
        // what an agent of ten receives). One that names us but would not verify is dropped
        // the same way.
        if hintfed_core::sealed_by(payload, self.node.origin()) {
            self.counters.own_dropped += 1;
            self.dirty = true;
            return;
        }
        // Read into the envelope kept from the last message: no allocation for its origin
        // and key.
        let mut env = std::mem::replace(&mut self.inbound, Envelope::empty());
        match self.verifier.verify_into(payload, &mut env) {
            Ok(()) => {
                self.counters.accepted += 1;
                if env.origin != self.node.origin() {
                    if let (Body::Update(u), Some(c)) = (&env.body, &self.handles) {
                        c.received[kind_index(u.value.kind())].inc();
                    }
                    if let (Body::SnapshotChunk { entries, .. }, Some(m)) =
                        (&env.body, self.metrics())
                    {
                        m.snapshot_entries.observe(entries.len() as f64);
                    }
                }
                // `now` was read for the whole batch, which updates (microseconds each) pass
                // through at once; anything else (a snapshot chunk may take milliseconds)
                // reads the clock afresh.
                let now = match env.body {
                    Body::Update(_) => now,
                    _ => wall_now(),
                };
                let done_before = self.node.snapshot_done();
                self.node.on_remote(now, &env);
                if !done_before && self.node.snapshot_done() {
                    info!(hub = msg.hub, "snapshot complete");
                    self.last_snapshot_hub = None;
                } else if matches!(env.body, Body::SnapshotChunk { .. })
                    && let Some((hub, at)) = &mut self.last_snapshot_hub
                    && *hub == msg.hub
                {
                    // The hub is answering: the timeout counts from its last chunk, so a large
                    // table on a slow link is not asked again (and restarted) every timeout.
                    *at = Instant::now();
                }
                self.dirty = true;
            }
            Err(e) => self.on_rejected(msg.hub, &e),
        }
        // Kept for the next message when it holds an update (not a snapshot chunk's entries).
        if matches!(env.body, Body::Update(_)) {
            self.inbound = env;
        }
    }

    fn on_rejected(&mut self, hub: usize, e: &hintfed_core::Reject) {
        let reason = e.reason().as_str();
        // Looked up by `&str` first: no copy of the label per duplicate (one per message
        // with two hubs).
        match self.counters.rejects.get_mut(reason) {
            Some(n) => *n += 1,
            None => {
                self.counters.rejects.insert(reason.to_owned(), 1);
            }
        }
        if e.reason() == hintfed_core::RejectReason::Duplicate {
            // Normal with several hubs (each forwards every message): counted here,
            // not as a reject in the metrics, so alerts on rejects stay meaningful.
            return;
        }
        if let Some(m) = self.metrics() {
            m.reject(reason);
        }
        debug!(hub, error = %e, "inbound message rejected");
    }

    fn on_done(&mut self, done: Done) {
        let now = wall_now();
        self.dirty = true;
        match done {
            Done::Sync {
                id,
                result: Ok(Listing { items, targets }),
            } => {
                let Some(done) = self.intake.listing_finished(id, &items) else {
                    return;
                };
                self.counters.full_syncs += 1;
                info!(
                    items = items.len(),
                    targets = targets.len(),
                    "full sync listed; publishing"
                );
                self.node
                    .on_local_full_sync_with_targets(now, items, targets.iter());
                for (e, query) in done.replay {
                    self.local_event(now, e, query);
                }
                if !done.requery.is_empty() {
                    debug!(
                        devices = done.requery.len(),
                        "events older than the listing name devices it does not; asking them"
                    );
                    self.query(done.requery);
                }
                if done.overflowed {
                    warn!("events dropped while the full sync ran; listing again");
                    self.start_sync();
                }
            }
            Done::Sync { id, result: Err(e) } => {
                // Facts stay held until the listing asked again finishes.
                if self.intake.is_running(id) {
                    warn!(error = %e, "full sync failed; retrying in 1s");
                    self.sync_retry_at = Some(Instant::now() + SYNC_RETRY);
                }
            }
            Done::Query { id, keys, events } => {
                let mut answered = HashSet::new();
                for e in events {
                    if let Value::Device(_) = e.value
                        && !self.filter.allows(&e.key)
                    {
                        continue;
                    }
                    answered.insert(e.key.clone());
                    self.local_event(now, e, Some(id));
                }
                self.intake.query_unanswered(
                    id,
                    keys.iter()
                        .map(String::as_str)
                        .filter(|k| !answered.contains(*k)),
                );
            }
        }
    }

    /// Counts and logs a finished write (`now`, when metrics are kept: the time it was
    /// taken); returns it and whether it succeeded, for the node.
    fn on_written(
        &mut self,
        w: InFlight,
        result: Result<(), PbxError>,
        now: Option<tokio::time::Instant>,
    ) -> (WriteId, bool) {
        self.dirty = true;
        let InFlight {
            id,
            target,
            kind,
            started,
        } = w;
        let ok = result.is_ok();
        if let Err(e) = &result {
            warn!(%target, kind = kind.as_str(), error = %e, "write to Asterisk failed; retried later");
            self.counters.applies_failed += 1;
            self.write_retry_at
                .get_or_insert_with(|| Instant::now() + WRITE_RETRY);
            self.stalled |= matches!(e, PbxError::NoAnswer { .. });
        } else {
            self.counters.applies_ok += 1;
        }
        if let (Some(m), Some(c), Some(now)) = (self.metrics(), &self.handles, now) {
            if ok {
                c.applied.inc();
            } else {
                c.apply_failed.inc();
            }
            m.apply_latency
                .observe(now.saturating_duration_since(started).as_secs_f64());
        }
        (id, ok)
    }

    fn on_connected_changed(&mut self) {
        let n = *self.connected.borrow_and_update();
        let before = self.hubs;
        self.hubs = n;
        self.counters.hubs_connected = n;
        if n > 0 {
            self.ready("federation", Ok(()));
        } else {
            self.ready("federation", Err("no hub connected".into()));
        }
        if n > before {
            info!(hubs = n, "hub link up");
            if !self.link_ups_reported {
                self.on_link_up();
            }
        } else if n < before {
            warn!(hubs = n, "hub link lost");
        }
    }

    /// A hub link came (back) up: introduce ourselves (so the hub can address replies at
    /// once) and fetch a snapshot if none completed yet and no hub is answering one (a hub that
    /// took the request and then stops sending is asked again after `snapshot_timeout`).
    fn on_link_up(&mut self) {
        if let Some(m) = self.metrics() {
            m.reconnect("hub");
        }
        let hello = self.node.hello(
            Role::Agent,
            concat!("hintfed-agent ", env!("CARGO_PKG_VERSION")),
        );
        self.pending_hello = Some(hello);
        if !self.node.snapshot_done() && self.last_snapshot_hub.is_none() {
            self.node.request_snapshot(wall_now());
        }
    }

    fn on_control(&mut self, ctl: Control) {
        match ctl {
            Control::Reload { filter, keys } => {
                info!(
                    keys = keys.len(),
                    "reload: device filter and keys replaced; resync"
                );
                self.filter = filter;
                self.verifier = Verifier::new(keys.clone(), self.cfg.limits.clone());
                self.keys = keys;
                if self.pbx_up {
                    self.start_sync();
                }
            }
            Control::State(reply) => {
                let _ = reply.send(views::state_view(
                    self.node.table(),
                    self.node.origins(),
                    self.node.config().policy.down_state(),
                    Some(self.node.origin()),
                ));
            }
        }
    }

    fn on_tick(&mut self) {
        let now = wall_now();
        self.node.tick(now);
        if let Some(at) = self.write_retry_at
            && Instant::now() >= at
        {
            self.write_retry_at = None;
            if self.pbx_up {
                if std::mem::take(&mut self.stalled) && !self.intake.listing_runs() {
                    info!("Asterisk left writes unanswered; listing it again");
                    self.start_sync();
                }
                debug!("writing again what failed");
                self.node.retry_failed_writes(now);
            }
        }
        if let Some(at) = self.sync_retry_at
            && Instant::now() >= at
        {
            self.sync_retry_at = None;
            if self.pbx_up {
                self.start_sync();
            }
        }
        if !self.node.snapshot_done()
            && let Some((_, at)) = self.last_snapshot_hub
            && at.elapsed() >= self.cfg.snapshot_timeout
            && self.hubs > 0
        {
            debug!("snapshot late; asking another hub");
            self.node.request_snapshot(now);
        }
        if self.dirty {
            self.dirty = false;
            self.refresh_status();
        }
        if let Some(m) = self.metrics() {
            let q = self.node.apply_queue();
            m.set_queue_depth(
                &format!("apply {}", self.cfg.source_label),
                i64::try_from(q.pending_len() + q.in_flight_len()).unwrap_or(i64::MAX),
            );
        }
    }

    // ----- outputs ------------------------------------------------------------------------

    async fn drain_actions(&mut self) {
        if let Some(hello) = self.pending_hello.take() {
            self.send(&hello, false).await;
        }
        loop {
            let mut wrote = false;
            // One clock read for a run of writes (started together, microseconds apart): their
            // latency and their timeout in the AMI writer count from it.
            let mut started = None;
            while let Some(a) = self.node.poll_action() {
                match a {
                    Action::Publish(env) => {
                        self.send(&env, true).await;
                        started = None;
                    }
                    Action::Request(env) => {
                        self.request(&env).await;
                        started = None;
                    }
                    Action::Apply(cmd) => {
                        cmd.variable_into(&mut self.writes.variable);
                        let value = cmd.setvar_value();
                        let at = *started.get_or_insert_with(tokio::time::Instant::now);
                        let token = self.writes.insert(InFlight {
                            id: cmd.id,
                            kind: cmd.kind(),
                            target: cmd.target,
                            started: at,
                        });
                        self.pbx
                            .start_setvar(token, &self.writes.variable, &value, at);
                        wrote = true;
                    }
                    Action::QueryLocal(keys) => self.query(keys),
                }
            }
            // Writes that finished at once (Asterisk not reachable) free room for more.
            if !wrote || self.poll_writes() == 0 {
                break;
            }
        }
    }

    /// Takes the writes finished so far (without waiting); returns how many.
    fn poll_writes(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.writes.done);
        let mut results = std::mem::take(&mut self.writes.results);
        self.pbx.take_setvars(&mut done);
        // One clock read for the batch's latencies.
        let now = (!done.is_empty() && self.metrics().is_some()).then(tokio::time::Instant::now);
        for SetvarDone { token, result } in done.drain(..) {
            let Some(w) = self.writes.remove(token) else {
                warn!(
                    token,
                    "a write finished twice, or one never started; ignored"
                );
                continue;
            };
            results.push(self.on_written(w, result, now));
        }
        let n = results.len();
        if n > 0 {
            // The window is refilled once for the whole batch, not once per write.
            self.node
                .on_apply_results(wall_now(), results.iter().copied());
        }
        results.clear();
        self.writes.done = done;
        self.writes.results = results;
        n
    }

    async fn send(&mut self, env: &Envelope, stream: bool) {
        let bytes = match self.keys.seal(env, &self.cfg.limits) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                warn!(error = %e, body = env.body.type_name(), "cannot encode envelope; dropped");
                return;
            }
        };
        let kind = match &env.body {
            Body::Update(u) => Some(u.value.kind()),
            _ => None,
        };
        match self.transport.publish(env.topic(), bytes).await {
            Ok(_) => {
                if let Some(k) = kind {
                    self.counters.published += 1;
                    if let Some(c) = &self.handles {
                        c.published[kind_index(k)].inc();
                    }
                }
            }
            Err(e) => {
                if stream {
                    self.counters.publish_failed += 1;
                }
                debug!(error = %e, body = env.body.type_name(), "not published (no hub)");
            }
        }
    }

    async fn request(&mut self, env: &Envelope) {
        let bytes = match self.keys.seal(env, &self.cfg.limits) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                warn!(error = %e, "cannot encode snapshot request");
                return;
            }
        };
        let exclude: Vec<usize> = match self.last_snapshot_hub {
            Some((h, _)) if self.hubs > 1 => vec![h],
            _ => Vec::new(),
        };
        let mut r = self
            .transport
            .request_snapshot(bytes.clone(), &exclude)
            .await;
        if r.is_err() && !exclude.is_empty() {
            r = self.transport.request_snapshot(bytes, &[]).await;
        }
        match r {
            Ok(hub) => {
                debug!(hub, "snapshot requested");
                self.counters.snapshot_requests += 1;
                self.last_snapshot_hub = Some((hub, Instant::now()));
            }
            Err(e) => debug!(error = %e, "snapshot request not sent (no hub); retried on connect"),
        }
    }

    fn start_sync(&mut self) {
        self.sync_retry_at = None;
        let id = self.intake.listing_asked();
        // Writes that complete from now on are newer than what the listing may say.
        self.node.local_listing_requested(wall_now());
        let pbx = self.pbx.clone();
        let filter = self.filter.clone();
        let presence = self.node.config().policy.config().presence;
        let devices = self.node.config().policy.config().device_state;
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let result = full_sync(&pbx, &filter, devices, presence).await;
            let _ = tx.send(Done::Sync { id, result });
        });
    }

    fn query(&mut self, keys: Vec<String>) {
        let keys: Vec<String> = keys.into_iter().filter(|k| self.filter.allows(k)).collect();
        if keys.is_empty() {
            return;
        }
        self.counters.queried += keys.len() as u64;
        let id = self.intake.query_sent(&keys);
        let pbx = self.pbx.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let events = query_devices(&pbx, keys.clone()).await;
            let _ = tx.send(Done::Query { id, keys, events });
        });
    }

    // ----- status -------------------------------------------------------------------------

    /// Refreshes the shared status (the origin rows and the counters) and pushes on
    /// `/events`, when someone listens, the rows of the keys the table journal names as
    /// changed since the last refresh (a resync when it cannot name them: journal overflow,
    /// or an origin went down or came back, which changes how every row of it reads).
    fn refresh_status(&mut self) {
        let now = wall_now();
        let table = self.node.table();
        let origins = self.node.origins();
        let down = self.node.config().policy.down_state();
        let me = self.node.origin();
        let sig = StatusSig {
            down,
            down_origins: origins
                .iter()
                .filter(|(_, i)| i.down.is_some())
                .map(|(n, _)| n.clone())
                .collect(),
        };
        let events = self
            .hooks
            .events
            .clone()
            .filter(|ev| ev.receiver_count() > 0);
        // The journal is read on every refresh (it records only once read), listeners or not,
        // so a listener arriving later gets the changes from then on. The first refresh
        // switches it on (the changes since now: none), so the second one already pushes the
        // rows that changed instead of a resync.
        let changed = table
            .changes_since(self.status_seen.unwrap_or_else(|| table.version()))
            .filter(|_| self.status_sig.as_ref() == Some(&sig));
        if let Some(ev) = &events {
            match changed {
                Some(keys) => {
                    let keys: BTreeSet<&str> = keys.collect();
                    let mut removed = false;
                    for key in keys {
                        let device = views::device_view(table, origins, down, key, Some(me));
                        let presence = views::presence_view(table, key);
                        removed |= device.is_none() && presence.is_none();
                        if let Some(d) = device {
                            ev.publish(StatusEvent::Device(d));
                        }
                        if let Some(p) = presence {
                            ev.publish(StatusEvent::Presence(p));
                        }
                    }
                    if removed {
                        ev.publish(StatusEvent::Resync);
                    }
                }
                None if self.status_seen.is_some() => ev.publish(StatusEvent::Resync),
                None => {}
            }
        }
        self.status_seen = Some(table.version());
        self.status_sig = Some(sig);
        let mut origin_views: Vec<OriginView> = vec![OriginView {
            name: me.to_owned(),
            up: !self.node.is_local_down(),
            epoch: self.node.epoch().0,
            last_seq: self.node.seq(),
            last_seen_ms_ago: Some(0),
            lag_ms: None,
            detail: Some(if self.node.is_local_down() {
                "this agent: local Asterisk not connected".to_owned()
            } else {
                "this agent".to_owned()
            }),
        }];
        let (mut up, mut dn) = (0i64, 0i64);
        for (name, info) in origins.iter() {
            if name == me {
                continue;
            }
            if info.down.is_some() {
                dn += 1;
            } else {
                up += 1;
            }
            origin_views.extend(views::origin_view(origins, name, now));
        }
        if let Some(m) = self.metrics() {
            m.origins_up.set(up);
            m.origins_down.set(dn);
        }
        self.counters.snapshot_done = self.node.snapshot_done();
        self.counters.pbx_up = self.pbx_up;
        let counters = self.counters.clone();
        self.status.write(|c| {
            if let Some(ev) = &events {
                let old_o: HashMap<&str, &OriginView> =
                    c.origins.iter().map(|o| (o.name.as_str(), o)).collect();
                for o in &origin_views {
                    if old_o
                        .get(o.name.as_str())
                        .is_none_or(|p| p.up != o.up || p.epoch != o.epoch)
                    {
                        ev.publish(StatusEvent::Origin(o.clone()));
                    }
                }
            }
            c.origins = origin_views;
            c.counters = counters;
        });
    }
}

/// What a full sync listed.
#[derive(Debug)]
struct Listing {
    /// The local state to federate: devices the filter allows, presence.
    items: Vec<LocalEvent>,
    /// Listed `Custom:` devices the filter excludes: what Asterisk holds for our write
    /// targets (see [`Node::on_local_full_sync_with_targets`]).
    targets: Targets,
}

/// Device states kept compactly: 100,000 `Custom:` devices are listed on every full sync of
/// a large federation (names in one string, about 30 bytes a device in all).
#[derive(Debug, Default)]
struct Targets {
    names: String,
    /// End of each name in `names`, and its state.
    ends: Vec<(u32, DeviceState)>,
}

impl Targets {
    fn push(&mut self, name: &str, state: DeviceState) {
        self.names.push_str(name);
        let end = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.ends.push((end, state));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&str, DeviceState)> {
        let mut start = 0;
        self.ends.iter().filter_map(move |&(end, state)| {
            let name = self.names.get(start..end as usize)?;
            start = end as usize;
            Some((name, state))
        })
    }
}

/// Lists the local state: cached devices, presence, and hint devices missing from the cache
/// (Getvar over AMI; hint-derived over res_zmq_manager, see the module docs).
async fn full_sync(
    pbx: &Pbx,
    filter: &DeviceFilter,
    devices: bool,
    presence: bool,
) -> Result<Listing, PbxError> {
    let mut listed = BTreeSet::new();
    let mut items = Vec::new();
    let targets = Arc::new(std::sync::Mutex::new(Targets::default()));
    if devices {
        // Each listed device is read as it arrives; those the filter excludes (by default
        // every `Custom:` device, possibly 100,000 of them) are kept compactly, and only
        // when they are `Custom:` ones.
        let f = filter.clone();
        let t = Arc::clone(&targets);
        items = pbx
            .list_devices_map(move |d| {
                if f.allows(&d.device) {
                    return device_event(&d.device, &d.state);
                }
                if is_custom_device(&d.device)
                    && let Ok(s) = d.state.parse::<DeviceState>()
                {
                    t.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(&d.device, s);
                }
                None
            })
            .await?;
        listed.extend(items.iter().map(|e| e.key.clone()));
        let hints = pbx.list_hints().await?;
        let mut missing = BTreeSet::new();
        for h in &hints {
            for dev in hint_devices(&h.hint) {
                if filter.allows(dev) && !listed.contains(dev) {
                    missing.insert(dev.to_owned());
                }
            }
        }
        if !missing.is_empty() {
            if pbx.supports_getvar() {
                items.extend(getvar_devices(pbx, missing.into_iter().collect()).await);
            } else {
                items.extend(derive_from_hints(&hints, &missing));
            }
        }
    }
    if presence {
        for p in pbx.list_presence().await? {
            if let Some(e) = presence_event(&p.presentity, &p.status, &p.subtype, &p.message) {
                items.push(e);
            }
        }
    }
    let targets = std::mem::take(
        &mut *targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(Listing { items, targets })
}

async fn getvar_devices(pbx: &Pbx, keys: Vec<String>) -> Vec<LocalEvent> {
    futures::stream::iter(keys)
        .map(|k| async move {
            match pbx.device_state(&k).await {
                Ok(v) => device_event(&k, &v),
                Err(e) => {
                    debug!(device = %k, error = %e, "Getvar failed");
                    None
                }
            }
        })
        .buffer_unordered(8)
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// Device states read back from hint states, for hints holding exactly one device that is
/// one of `wanted` (the extension state of a one-device hint is that device's state).
fn derive_from_hints(
    hints: &[hintfed_asterisk::HintItem],
    wanted: &BTreeSet<String>,
) -> Vec<LocalEvent> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for h in hints {
        let devs: Vec<&str> = hint_devices(&h.hint).collect();
        if let [dev] = devs.as_slice()
            && wanted.contains(*dev)
            && seen.insert((*dev).to_owned())
            && let Some(state) = extension_status_to_device_state(h.status)
            && let Some(e) = device_event(*dev, state)
        {
            out.push(e);
        }
    }
    out
}

async fn query_devices(pbx: &Pbx, keys: Vec<String>) -> Vec<LocalEvent> {
    if pbx.supports_getvar() {
        return getvar_devices(pbx, keys).await;
    }
    match pbx.list_hints().await {
        Ok(hints) => derive_from_hints(&hints, &keys.into_iter().collect()),
        Err(e) => {
            debug!(error = %e, "ExtensionStateList failed; devices not queried");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(hint: &str, status: i32) -> hintfed_asterisk::HintItem {
        hintfed_asterisk::HintItem {
            exten: "1".into(),
            context: "phones".into(),
            hint: hint.into(),
            status,
            status_text: String::new(),
        }
    }

    #[test]
    fn filter_include_and_exclude() {
        let f = DeviceFilter::new(Some("^PJSIP/"), Some("^Custom:|/9")).expect("valid");
        assert!(f.allows("PJSIP/100"));
        assert!(!f.allows("PJSIP/900"));
        assert!(!f.allows("SIP/100"));
        assert!(!f.allows("Custom:PJSIP/100"));
        assert!(DeviceFilter::default().allows("anything"));
        assert!(DeviceFilter::new(Some("("), None).is_err());
    }

    #[test]
    fn hint_states_are_split_back_only_for_one_device_hints() {
        let hints = [
            hint("PJSIP/101", 1),
            hint("PJSIP/100&Custom:PJSIP/100", 1),
            hint("PJSIP/102,CustomPresence:bob", 4),
            hint("PJSIP/103", -1),
        ];
        let wanted: BTreeSet<String> = ["PJSIP/100", "PJSIP/101", "PJSIP/102", "PJSIP/103"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        let got = derive_from_hints(&hints, &wanted);
        assert_eq!(
            got,
            vec![
                LocalEvent::device("PJSIP/101", DeviceState::Inuse),
                LocalEvent::device("PJSIP/102", DeviceState::Unavailable),
            ],
            "a mixed hint (100) and an unknown extension state (103) are not guessed"
        );
    }

    #[test]
    fn targets_keep_names_and_states_in_order() {
        let mut t = Targets::default();
        t.push("Custom:PJSIP/1", DeviceState::Inuse);
        t.push("Custom:b", DeviceState::Busy);
        t.push("", DeviceState::Ringing);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![
                ("Custom:PJSIP/1", DeviceState::Inuse),
                ("Custom:b", DeviceState::Busy),
                ("", DeviceState::Ringing),
            ]
        );
    }

    #[test]
    fn events_with_unknown_words_are_dropped() {
        assert_eq!(device_event("PJSIP/1", "SLEEPING"), None);
        assert!(presence_event("CustomPresence:a", "dnd", "x", "y, z").is_some());
        assert_eq!(presence_event("CustomPresence:a", "bogus", "", ""), None);
    }
}
