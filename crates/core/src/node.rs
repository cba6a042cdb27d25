//! [`Node`]: the sans-IO brain of one origin (an agent beside one Asterisk, or one relay of
//! the central broker). It turns local Asterisk events into published envelopes, merges
//! remote envelopes into its [`Replica`], and asks for writes to the local Asterisk through
//! its [`ApplyQueue`]. Inputs are method calls with `now`; outputs are [`Action`]s collected
//! with [`Node::poll_action`] / [`Node::take_actions`].
//!
//! Rules it enforces:
//! - never applies its own origin's updates (the aggregate excludes itself);
//! - swallows the echo of its own `Setvar` writes ([`ApplyQueue::is_echo`]) and never republishes
//!   a value equal to the last one sent ([`ChangeSuppressor`]);
//! - a gap in an origin's stream (open longer than `gap_grace_ms`) requests a snapshot;
//!   snapshot entries merge by version, so updates arriving before, during or after the
//!   snapshot all land right (the Clone pattern without a buffer);
//! - after its Asterisk (re)connects or restarts it starts a new epoch, republishes its full
//!   state and re-applies every remote state;
//! - when its Asterisk is lost it announces itself down; other nodes then show its devices
//!   as the policy's `down_state` until its next full sync ends;
//! - an origin's full sync withdraws the devices it no longer names, but only where it
//!   arrived whole: a receiver that lost part of it keeps what it had until the snapshot that
//!   closes the gap, whose summary carries the origin's floor and withdraws them then.
//!
//! Presence listed during a full sync (`PresenceStateList`) is published only when nobody
//! else holds a newer write for the key: its time of setting is unknown, so a value written
//! elsewhere meanwhile wins and is applied locally instead. The exception is a key whose last
//! write was our own: a different listed value is then a local change made while we were
//! away, and it is published.
//!
//! Snapshots are requested from every hub and every answer is merged; a hub that missed part
//! of an origin's stream asks that origin to republish ([`Body::ResyncRequest`]), and the
//! node republishes its last sent values plus its own still-winning presence writes (with
//! their original timestamps, so the republish changes nothing where it is known), and the
//! still-winning writes of origins that restarted since (their new incarnation no longer
//! knows them). Known limits: a presence write that every hub and every node missed and
//! whose origin restarted before republishing it is lost (the others converge on the
//! previous winner); a restarted node
//! whose snapshot came from hubs that know nothing of a presentity yet (restarted themselves)
//! publishes the copy it applied earlier as a new write (everyone converges on that copy).
//!
//! # Daemon loop (agent)
//! 1. `Node::new(config, Epoch(unix_ms_now), now)`; send [`Node::hello`] to each hub.
//! 2. On connecting to Asterisk: list devices and presence, then
//!    [`Node::on_local_full_sync`] (after a loss: [`Node::on_local_restored`] first; after an
//!    Asterisk restart seen on a live connection: [`Node::on_local_restarted`]).
//! 3. Feed `DeviceStateChange`/`PresenceStateChange` to [`Node::on_local_event`], verified
//!    envelopes from the hubs to [`Node::on_remote`], call [`Node::tick`] every ~100 ms, and
//!    [`Node::on_local_lost`] when the Asterisk connection drops.
//! 4. After every call drain [`Node::poll_action`]: seal and send `Publish` to every hub and
//!    `Request` to every hub, write `Apply` with `Setvar` and report it with
//!    [`Node::on_apply_result`], answer `QueryLocal` with the devices' current states.
//!
//! A broker runs one `Node` per Asterisk connection (they are cheap, keyed by origin name)
//! and delivers each node's [`Action::Publish`] envelopes to all the others, with
//! [`NodeConfig::snapshots`] off.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use compact_str::CompactString;

use crate::apply::{ApplyConfig, ApplyQueue, Write, WriteId};
use crate::change::ChangeSuppressor;
use crate::envelope::{Body, Envelope, OriginSummary, Role, SnapshotEntry, Update};
use crate::hlc::{Hlc, HlcTimestamp};
use crate::liveness::Origins;
use crate::policy::{Policy, is_custom_device};
use crate::replica::Replica;
use crate::seq::SeqStatus;
use crate::state::{DeviceState, Kind, Presence, Value};
use crate::table::{PresenceEntry, Settled, Table};
use crate::time::{Epoch, Millis};

/// Configuration of a [`Node`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This origin's name (unique per Asterisk).
    pub origin: String,
    /// Federation policy.
    pub policy: Policy,
    /// An origin silent this long is down. Default 15 000 ms.
    pub origin_timeout_ms: u64,
    /// Heartbeat period. Default 1 000 ms.
    pub heartbeat_interval_ms: u64,
    /// How long a hole in an origin's stream may stay open before a snapshot is requested
    /// (messages may arrive reordered across hubs). Default 2 000 ms.
    pub gap_grace_ms: u64,
    /// A snapshot whose answer made no progress (no chunk arrived) for this long is requested
    /// again. Default 5 000 ms.
    pub snapshot_retry_ms: u64,
    /// Republishes asked for by hubs are at least this far apart: a request arriving sooner
    /// after the last one is answered once this long has passed, together with any other
    /// request arriving meanwhile (several hubs often ask at once). Default 1 000 ms.
    pub resync_min_interval_ms: u64,
    /// Whether snapshots exist (hub topologies). Off for the broker, whose relays exchange
    /// envelopes in process.
    pub snapshots: bool,
    /// Apply queue bounds, and how long the echoes of a write are expected
    /// (`echo_max_age_ms`; bounded by its targets and [`crate::apply::ECHO_VALUES`] per
    /// target).
    pub apply: ApplyConfig,
}

impl NodeConfig {
    /// Defaults for origin `origin`.
    pub fn new(origin: impl Into<String>) -> Self {
        NodeConfig {
            origin: origin.into(),
            policy: Policy::default(),
            origin_timeout_ms: 15_000,
            heartbeat_interval_ms: 1_000,
            gap_grace_ms: 2_000,
            snapshot_retry_ms: 5_000,
            resync_min_interval_ms: 1_000,
            snapshots: true,
            apply: ApplyConfig::default(),
        }
    }
}

/// A state event read from the local Asterisk (`DeviceStateChange`, `PresenceStateChange`,
/// or one item of a list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEvent {
    /// Device name or presentity, as the local Asterisk names it.
    pub key: String,
    /// The value.
    pub value: Value,
}

impl LocalEvent {
    /// A device state event.
    pub fn device(key: impl Into<String>, state: DeviceState) -> Self {
        LocalEvent {
            key: key.into(),
            value: Value::Device(state),
        }
    }

    /// A presence event.
    pub fn presence(key: impl Into<String>, presence: Presence) -> Self {
        LocalEvent {
            key: key.into(),
            value: Value::Presence(presence),
        }
    }
}

/// A write to the local Asterisk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyCmd {
    /// Reports the write's outcome ([`Node::on_apply_result`]).
    pub id: WriteId,
    /// Local name: `Custom:<device>` (per the template) or `CustomPresence:<name>` (up to
    /// 24 bytes kept inline, without an allocation).
    pub target: CompactString,
    /// Value to write (already mapped to a writable one).
    pub value: Value,
}

impl ApplyCmd {
    /// The kind written.
    pub fn kind(&self) -> Kind {
        self.value.kind()
    }

    /// The `Setvar` variable, `DEVICE_STATE(<target>)` or `PRESENCE_STATE(<target>)`, in
    /// `out` (cleared first: one buffer serves every write).
    pub fn variable_into(&self, out: &mut String) {
        out.clear();
        out.push_str(match self.kind() {
            Kind::Device => "DEVICE_STATE(",
            Kind::Presence => "PRESENCE_STATE(",
        });
        out.push_str(&self.target);
        out.push(')');
    }

    /// The `Setvar` value (presence in the `e` form when needed; a device state's word
    /// without an allocation).
    pub fn setvar_value(&self) -> Cow<'static, str> {
        self.value.to_setvar_value()
    }
}

/// What the daemon must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this stream envelope to every hub (or, in the broker, to every other relay).
    Publish(Envelope),
    /// Send this control envelope (a snapshot request) to every connected hub. Answers of
    /// several hubs are all merged (merges are monotone), which also repairs what one hub
    /// missed.
    Request(Envelope),
    /// Write to the local Asterisk, then report with [`Node::on_apply_result`].
    Apply(ApplyCmd),
    /// Read the current state of these local devices (this origin published them in an
    /// earlier epoch but they are missing from the full sync, e.g. not cached by
    /// `DeviceStateList`) and feed the results to [`Node::on_local_event`]. Over AMI use
    /// `Getvar DEVICE_STATE(<device>)`; never `Getvar` over res_zmq_manager.
    QueryLocal(Vec<String>),
}

/// Counters of a [`Node`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Stream envelopes published.
    pub published: u64,
    /// Local events received.
    pub local_events: u64,
    /// Local events recognised as echoes of our writes.
    pub echoes: u64,
    /// Local events not sent because nothing changed.
    pub suppressed: u64,
    /// Local events not federated by policy.
    pub filtered: u64,
    /// Local events ignored while the local Asterisk was lost.
    pub ignored_while_down: u64,
    /// Remote stream envelopes merged.
    pub remote_accepted: u64,
    /// Remote stream envelopes already seen (or stale).
    pub remote_duplicates: u64,
    /// Snapshots requested.
    pub snapshots_requested: u64,
    /// Snapshots completed.
    pub snapshots_completed: u64,
    /// Snapshot messages not matching the pending request.
    pub snapshot_rejected: u64,
    /// Snapshot requests caused by a stream gap.
    pub gaps: u64,
    /// Full republishes requested by a hub.
    pub resyncs: u64,
    /// Failed writes reported.
    pub apply_errors: u64,
}

#[derive(Clone, Debug)]
struct PendingSnapshot {
    id: u64,
    sent_at: Millis,
    /// When the request was sent or a chunk or end of its answer last arrived: an answer
    /// still streaming in (a hub serves many requests one after the other) is not asked again.
    progress: Millis,
    /// Per answering hub: its partial answer.
    hubs: BTreeMap<String, PartialAnswer>,
    /// Whether one hub's answer completed.
    complete: bool,
}

#[derive(Clone, Debug, Default)]
struct PartialAnswer {
    /// Indices of the chunks received.
    seen: BTreeSet<u32>,
    /// Summaries, applied only once the answer is complete.
    summaries: Vec<OriginSummary>,
    /// Number of chunks announced by the end, once it arrived (it may overtake chunks).
    expected: Option<u32>,
    /// Already applied (later duplicates are ignored).
    done: bool,
}

impl PartialAnswer {
    fn is_complete(&self) -> bool {
        !self.done
            && self
                .expected
                .is_some_and(|n| self.seen.len() == n as usize && self.seen.iter().all(|i| *i < n))
    }
}

/// Hubs answering one snapshot request, and hubs remembered, at most (a hostile peer cannot
/// grow them without bound).
const MAX_HUBS: usize = 64;

/// Device keys a [`Node::reapply_all`] pass pushes at once, and the pending writes below
/// which it pushes the next batch.
const REAPPLY_BATCH: usize = 2_048;

/// How long a [`Node::reapply_all`] pass waits for a listing asked of the local Asterisk
/// ([`Node::local_listing_requested`]): what it lists as held is not written again.
const LISTING_WAIT_MS: u64 = 5_000;

/// Summaries kept at most per snapshot (a hostile hub cannot grow them without bound).
const MAX_SNAPSHOT_ORIGINS: usize = 100_000;

/// The brain of one origin. See the module docs.
#[derive(Debug)]
pub struct Node {
    cfg: NodeConfig,
    epoch: Epoch,
    seq: u64,
    hlc: Hlc,
    replica: Replica,
    apply: ApplyQueue,
    sent: ChangeSuppressor,
    actions: VecDeque<Action>,
    local_down: bool,
    need_new_epoch: bool,
    synced_once: bool,
    next_heartbeat: Millis,
    snapshot: Option<PendingSnapshot>,
    snapshot_done: bool,
    next_request_id: u64,
    buffered_presence: Vec<(String, Presence)>,
    query: BTreeSet<String>,
    /// Hubs that answered a snapshot: their own streams (heartbeats, down notices) carry no
    /// state a snapshot could repair, so a hole in them never asks for one.
    hubs: BTreeSet<String>,
    last_republish: Option<Millis>,
    /// A deferred republish (a hub asked too soon after the last one).
    republish_due: Option<Millis>,
    stats: NodeStats,
    /// A pass re-applying every remote state, still walking the device keys after this one
    /// (`Some(None)`: from the first); see [`Node::reapply_all`].
    reapply: Option<Option<Box<str>>>,
    /// When the listing the re-apply pass waits for was asked (see [`LISTING_WAIT_MS`]).
    listing_asked: Option<Millis>,
    /// The target name of the device being recomputed (a buffer reused, not one per key).
    target_buf: String,
}

impl Node {
    /// A node for `config.origin` starting epoch `epoch` (wall-clock ms at start, larger than
    /// any epoch this origin used before) at `now`. The local Asterisk counts as not yet
    /// connected: call [`Node::on_local_full_sync`] once it is. With snapshots on, a snapshot
    /// request is queued right away.
    pub fn new(config: NodeConfig, epoch: Epoch, now: Millis) -> Self {
        let mut n = Node {
            replica: Replica::new(config.origin_timeout_ms),
            // Echo expectations live in the apply slots (one map per target, not two).
            apply: ApplyQueue::new(config.apply.clone()),
            cfg: config,
            epoch,
            seq: 0,
            hlc: Hlc::new(),
            sent: ChangeSuppressor::new(),
            actions: VecDeque::new(),
            local_down: true,
            need_new_epoch: false,
            synced_once: false,
            next_heartbeat: now,
            snapshot: None,
            snapshot_done: false,
            next_request_id: 1,
            buffered_presence: Vec::new(),
            query: BTreeSet::new(),
            hubs: BTreeSet::new(),
            last_republish: None,
            republish_due: None,
            stats: NodeStats::default(),
            reapply: None,
            listing_asked: None,
            target_buf: String::new(),
        };
        n.request_snapshot(now);
        n
    }

    /// This origin's name.
    pub fn origin(&self) -> &str {
        &self.cfg.origin
    }

    /// Current epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Last stream sequence used in the current epoch.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The table of known state (including this origin's own reports).
    pub fn table(&self) -> &Table {
        &self.replica.table
    }

    /// Liveness of the other origins (and hubs).
    pub fn origins(&self) -> &Origins {
        &self.replica.origins
    }

    /// The apply queue (what the local Asterisk is known to hold, counters).
    pub fn apply_queue(&self) -> &ApplyQueue {
        &self.apply
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Whether the local Asterisk is currently considered lost (or not yet synced).
    pub fn is_local_down(&self) -> bool {
        self.local_down
    }

    /// Whether a snapshot has completed (always false with snapshots off).
    pub fn snapshot_done(&self) -> bool {
        self.snapshot_done
    }

    /// The value this node wants on the local `Custom:` device for remote device `key`: the
    /// aggregate over every other origin, mapped to a writable state.
    pub fn remote_value(&self, key: &str) -> Option<DeviceState> {
        self.replica
            .table
            .aggregate(
                key,
                &self.replica.origins,
                self.cfg.policy.down_state(),
                Some(&self.cfg.origin),
            )
            .map(|s| self.cfg.policy.writable(s))
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Every pending action.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.actions.drain(..).collect()
    }

    /// A `Hello` control envelope introducing this node to a hub.
    pub fn hello(&self, role: Role, software: impl Into<String>) -> Envelope {
        Envelope::new(
            self.cfg.origin.clone(),
            self.epoch,
            self.seq,
            Body::Hello {
                role,
                software: software.into(),
            },
        )
    }

    // ----- local side -------------------------------------------------------------------

    /// A state event from the local Asterisk.
    pub fn on_local_event(&mut self, now: Millis, event: LocalEvent) {
        self.stats.local_events += 1;
        if self.local_down {
            self.stats.ignored_while_down += 1;
            return;
        }
        if self.apply.is_echo(&event.key, &event.value, now) {
            // The write's own confirmation already recorded what Asterisk holds; an echo read
            // late (events and action responses travel apart) may be of an earlier write and
            // must not overwrite it.
            self.stats.echoes += 1;
            return;
        }
        self.note_held(&event);
        self.local_change(now, event.key, event.value);
        self.pump(now);
    }

    /// The complete local state, listed after connecting (or reconnecting) to Asterisk:
    /// starts a new epoch if the connection had been lost, publishes a full sync (begin,
    /// every federated value, end) and re-applies every remote state.
    pub fn on_local_full_sync(&mut self, now: Millis, items: Vec<LocalEvent>) {
        self.on_local_full_sync_with_targets(now, items, std::iter::empty());
    }

    /// [`Node::on_local_full_sync`], plus `targets`: listed states of `Custom:` devices that
    /// this origin does not federate (an agent's `exclude`, by default `^Custom:`, keeps them
    /// out of `items`). They are not published; what the listing says they hold is believed
    /// like any listed write target, so a restart or a resync does not write again what
    /// Asterisk already holds. Other devices in `targets` are ignored.
    pub fn on_local_full_sync_with_targets<'a>(
        &mut self,
        now: Millis,
        items: Vec<LocalEvent>,
        targets: impl IntoIterator<Item = (&'a str, DeviceState)>,
    ) {
        if self.need_new_epoch {
            self.bump_epoch(now);
        }
        self.local_down = false;
        self.sent.clear();
        // What the listing says is believed only for targets no write of ours changed since
        // it was asked (see `local_listing_requested`).
        self.apply.listing_begins();
        for (key, state) in targets {
            if is_custom_device(key) {
                self.apply.note_listed(key, &Value::Device(state));
            }
        }
        let begin = self.publish(now, Body::FullSyncBegin);
        for item in items {
            if is_apply_target(&item) {
                self.apply.note_listed(&item.key, &item.value);
            }
            match item.value {
                Value::Device(_) => {
                    self.stats.local_events += 1;
                    self.local_change(now, item.key, item.value);
                }
                Value::Presence(p) => {
                    if self.snapshot_done || !self.cfg.snapshots {
                        self.listed_presence(now, item.key, p);
                    } else {
                        self.buffered_presence.push((item.key, p));
                    }
                }
            }
        }
        self.republish_own_presence(now, false);
        let own_old: Vec<String> = self
            .replica
            .table
            .device_keys_of(&self.cfg.origin)
            .into_iter()
            .filter(|k| {
                self.replica
                    .table
                    .device(k)
                    .and_then(|m| m.get(&self.cfg.origin))
                    .is_some_and(|e| e.epoch < self.epoch || e.seq < begin)
            })
            .collect();
        self.query.extend(own_old);
        self.publish(now, Body::FullSyncEnd { begin_seq: begin });
        self.synced_once = true;
        self.apply.listing_done();
        self.listing_asked = None;
        self.flush_query();
        self.reapply_all();
        self.pump(now);
    }

    /// A listing of the local Asterisk (for [`Node::on_local_full_sync`]) is being asked now:
    /// its items will not be believed for targets whose write completes after this call, and
    /// a re-apply of every remote state waits for it (up to 5 s), so what Asterisk already
    /// holds is not written again. Changes arriving meanwhile are written as usual. After a
    /// (re)connection, call it before [`Node::on_local_restored`] or
    /// [`Node::on_local_restarted`], whose re-apply then waits too. A listing asked again
    /// (the last one failed, or was superseded) does not stretch the wait.
    pub fn local_listing_requested(&mut self, now: Millis) {
        self.apply.listing_requested();
        self.listing_asked.get_or_insert(now);
    }

    /// The connection to the local Asterisk was lost: announces this origin down (its devices
    /// become `down_state` everywhere) and forgets everything about the sink.
    pub fn on_local_lost(&mut self, now: Millis) {
        if self.local_down {
            return;
        }
        self.local_down = true;
        self.need_new_epoch = true;
        let last_seq = self.seq + 1;
        self.publish(
            now,
            Body::OriginDown {
                origin: self.cfg.origin.clone(),
                epoch: self.epoch,
                last_seq,
                reason: "local Asterisk connection lost".to_owned(),
            },
        );
        self.apply.clear();
        self.reapply = None;
        self.listing_asked = None;
    }

    /// The connection to the local Asterisk is back (before its full sync): starts a new
    /// epoch and re-applies every remote state. Follow with [`Node::on_local_full_sync`];
    /// other nodes keep this origin down until that full sync ends.
    pub fn on_local_restored(&mut self, now: Millis) {
        if self.need_new_epoch {
            self.bump_epoch(now);
        }
        self.local_down = false;
        self.apply.forget_held();
        self.reapply_all();
        self.pump(now);
    }

    /// The local Asterisk restarted while connected (uptime went back, `FullyBooted` on a
    /// live connection): starts a new epoch and re-applies every remote state (`Custom:`
    /// devices whose name holds `/` do not survive a restart). Follow with a full sync.
    pub fn on_local_restarted(&mut self, now: Millis) {
        self.bump_epoch(now);
        self.apply.forget_echoes();
        self.apply.forget_held();
        self.reapply_all();
        self.pump(now);
    }

    /// Result of an [`Action::Apply`] write, by its [`ApplyCmd::id`] (a write asked before
    /// the local Asterisk was lost is ignored).
    pub fn on_apply_result(&mut self, now: Millis, id: WriteId, ok: bool) {
        self.on_apply_results(now, [(id, ok)]);
    }

    /// [`Node::on_apply_result`] of many writes at once (a batch of pipelined answers): each
    /// completes, then the window is refilled once instead of once per write.
    pub fn on_apply_results(
        &mut self,
        now: Millis,
        results: impl IntoIterator<Item = (WriteId, bool)>,
    ) {
        for (id, ok) in results {
            if self.apply.complete(id, ok) && !ok {
                self.stats.apply_errors += 1;
            }
        }
        self.pump(now);
    }

    /// Writes again what failed: every remote state is pushed to the apply queue, which skips
    /// the values the local Asterisk is known to hold, so only targets whose last write failed
    /// (or was never confirmed) are written. A failed write is otherwise not retried until
    /// its value changes; call this some time after failures (e.g. writes that timed out
    /// while Asterisk did not answer), not in a tight loop.
    pub fn retry_failed_writes(&mut self, now: Millis) {
        self.reapply_all();
        self.pump(now);
    }

    // ----- remote side ------------------------------------------------------------------

    /// An envelope from the federation, already verified ([`crate::auth::Verifier`]). Stream
    /// envelopes, snapshot chunks/ends and resync requests are all accepted here.
    pub fn on_remote(&mut self, now: Millis, env: &Envelope) {
        if env.origin == self.cfg.origin {
            return;
        }
        match &env.body {
            Body::SnapshotChunk {
                request_id,
                index,
                entries,
                origins,
            } => self.on_chunk(now, &env.origin, *request_id, *index, entries, origins),
            Body::SnapshotEnd { request_id, chunks } => {
                self.on_snapshot_end(now, &env.origin, *request_id, *chunks)
            }
            Body::ResyncRequest { origin } => {
                if *origin == self.cfg.origin && self.synced_once && !self.local_down {
                    self.stats.resyncs += 1;
                    match self.last_republish {
                        Some(t) if now.since(t) < self.cfg.resync_min_interval_ms => {
                            self.republish_due = Some(t.plus(self.cfg.resync_min_interval_ms));
                        }
                        _ => self.republish_for_hubs(now),
                    }
                }
            }
            Body::Hello { .. } | Body::SnapshotRequest { .. } => {}
            _ => {
                // The history before an origin's first message seen here is a gap that a
                // snapshot closes (its summary covers the origin up to what the hub had; the
                // rest is still on its way in the stream). Without snapshots nothing could
                // close it, so it is assumed complete.
                let assume_complete = !self.cfg.snapshots;
                // A device update is aggregated in the lookup that merges it (when this node
                // writes devices at all: see `recompute_device`).
                let settle = (!self.local_down && self.cfg.policy.applies_devices())
                    .then(|| (self.cfg.policy.down_state(), self.cfg.origin.as_str()));
                let ing = self
                    .replica
                    .ingest_settling(env, assume_complete, now, settle);
                if ing.status != SeqStatus::New {
                    self.stats.remote_duplicates += 1;
                    return;
                }
                self.stats.remote_accepted += 1;
                if let Body::Update(u) = &env.body {
                    self.hlc.observe(u.ts);
                }
                if let (true, Body::Update(u)) = (ing.key_changed, &env.body) {
                    match (u.kind(), ing.settled) {
                        (Kind::Device, Some(settled)) => self.push_device(&u.key, settled),
                        // Nothing to write, or not settled (not writing devices).
                        (Kind::Device, None) => {}
                        (Kind::Presence, _) => self.recompute_presence(&u.key),
                    }
                }
                for (kind, key) in ing.dirty_keys {
                    self.recompute(kind, &key);
                }
                for o in ing.dirty_origins {
                    self.recompute_origin(now, &o);
                }
            }
        }
        self.pump(now);
    }

    /// Asks a hub for a snapshot (also done automatically at start, on gaps and on retry).
    /// Call it when a hub connection comes up if no snapshot completed yet.
    pub fn request_snapshot(&mut self, now: Millis) {
        if !self.cfg.snapshots {
            return;
        }
        let id = self.next_request_id;
        self.next_request_id += 1;
        self.snapshot = Some(PendingSnapshot {
            id,
            sent_at: now,
            progress: now,
            hubs: BTreeMap::new(),
            complete: false,
        });
        self.stats.snapshots_requested += 1;
        // A request not yet taken by the caller asks for an answer nobody waits for any more.
        self.actions.retain(
            |a| !matches!(a, Action::Request(e) if matches!(e.body, Body::SnapshotRequest { .. })),
        );
        self.actions.push_back(Action::Request(Envelope::new(
            self.cfg.origin.clone(),
            self.epoch,
            self.seq,
            Body::SnapshotRequest { request_id: id },
        )));
    }

    /// Time passes: heartbeats, origin timeouts, gap and snapshot retries, expectation
    /// expiry, apply-queue overflow recovery.
    pub fn tick(&mut self, now: Millis) {
        if now >= self.next_heartbeat {
            let local_down = self.local_down;
            self.publish(now, Body::Heartbeat { local_down });
            self.next_heartbeat = now.plus(self.cfg.heartbeat_interval_ms.max(1));
        }
        for (o, _, _) in self.replica.expire(now) {
            self.recompute_origin(now, &o);
        }
        if self.cfg.snapshots {
            let retry = self.cfg.snapshot_retry_ms;
            match &self.snapshot {
                Some(s) if !s.complete && now.since(s.progress) >= retry => {
                    self.request_snapshot(now)
                }
                // Incomplete and not yet due, or complete but recent: at most one request
                // per retry period.
                Some(s) if !s.complete || now.since(s.sent_at) < retry => {}
                _ if !self
                    .replica
                    .gaps(now, self.cfg.gap_grace_ms, &self.hubs)
                    .is_empty() =>
                {
                    self.stats.gaps += 1;
                    self.request_snapshot(now);
                }
                _ => {}
            }
        }
        if self.republish_due.is_some_and(|t| now >= t) {
            if self.synced_once && !self.local_down {
                self.republish_for_hubs(now);
            }
            self.republish_due = None;
        }
        if self.apply.take_overflow() && self.apply.pending_len() == 0 {
            self.reapply_all();
        }
        self.pump(now);
    }

    // ----- internals --------------------------------------------------------------------

    fn bump_epoch(&mut self, now: Millis) {
        self.epoch = self.epoch.next(now);
        self.seq = 0;
        self.need_new_epoch = false;
        self.sent.clear();
    }

    fn publish(&mut self, now: Millis, body: Body) -> u64 {
        self.seq += 1;
        let env = Envelope::new(self.cfg.origin.clone(), self.epoch, self.seq, body);
        match &env.body {
            Body::Update(u) => {
                self.replica.table.apply(
                    &env.origin,
                    env.epoch,
                    env.seq,
                    &u.key,
                    &u.value,
                    u.ts,
                    now,
                );
            }
            Body::FullSyncEnd { begin_seq } => {
                self.replica
                    .table
                    .end_full_sync(&env.origin, env.epoch, *begin_seq);
            }
            _ => {}
        }
        self.stats.published += 1;
        self.actions.push_back(Action::Publish(env));
        self.seq
    }

    fn publish_update(&mut self, now: Millis, key: String, value: Value, ts: HlcTimestamp) {
        self.publish(now, Body::Update(Update { key, value, ts }));
    }

    /// An event or listing item says what the local Asterisk holds for a possible target.
    fn note_held(&mut self, event: &LocalEvent) {
        if is_apply_target(event) {
            self.apply.note_held(&event.key, &event.value);
        }
    }

    fn local_change(&mut self, now: Millis, key: String, value: Value) {
        match &value {
            Value::Device(s) => {
                if !self.cfg.policy.federates_device(&key) || !self.cfg.policy.sends_state(*s) {
                    self.stats.filtered += 1;
                    return;
                }
                if !self.sent.is_change(&key, &value) {
                    self.stats.suppressed += 1;
                    return;
                }
                self.sent.record(&key, &value);
                self.query.remove(&key);
            }
            Value::Presence(p) => {
                if !self.cfg.policy.federates_presence(&key) {
                    self.stats.filtered += 1;
                    return;
                }
                if self
                    .replica
                    .table
                    .presence(&key)
                    .is_some_and(|w| w.value == *p)
                {
                    self.stats.suppressed += 1;
                    return;
                }
            }
        }
        let ts = self.hlc.now(now);
        self.publish_update(now, key, value, ts);
    }

    fn listed_presence(&mut self, now: Millis, key: String, p: Presence) {
        if !self.cfg.policy.federates_presence(&key) {
            self.stats.filtered += 1;
            return;
        }
        let publish = match self.replica.table.presence(&key) {
            None => true,
            Some(w) if w.value == p => false,
            Some(w) => w.origin == self.cfg.origin,
        };
        if publish {
            let ts = self.hlc.now(now);
            self.publish_update(now, key, Value::Presence(p), ts);
        }
    }

    /// Republishes the presence writes of this origin that are still winners, with their
    /// original timestamps (idempotent everywhere), so that a hub or node that missed one
    /// gets it; with `older_epochs_only`, only those written in an earlier epoch.
    fn republish_own_presence(&mut self, now: Millis, older_epochs_only: bool) {
        self.republish_presence(now, |n, w| {
            w.origin == n.cfg.origin && (!older_epochs_only || w.epoch < n.epoch)
        });
    }

    /// Republishes the presence winners `keep` picks, with their original timestamps.
    fn republish_presence(&mut self, now: Millis, keep: impl Fn(&Self, &PresenceEntry) -> bool) {
        let picked: Vec<(String, Presence, HlcTimestamp)> = self
            .replica
            .table
            .presence_entries()
            .filter(|(_, w)| keep(self, w))
            .map(|(k, w)| (k.clone(), w.value.clone(), w.ts))
            .collect();
        for (k, p, ts) in picked {
            self.publish_update(now, k, Value::Presence(p), ts);
        }
    }

    /// A republish asked for by hubs.
    fn republish_for_hubs(&mut self, now: Millis) {
        self.last_republish = Some(now);
        self.republish_due = None;
        self.republish(now);
    }

    fn republish(&mut self, now: Millis) {
        let begin = self.publish(now, Body::FullSyncBegin);
        let mut devices: Vec<(String, Value)> = self
            .sent
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        devices.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in devices {
            let ts = self.hlc.now(now);
            self.publish_update(now, k, v, ts);
        }
        self.republish_own_presence(now, false);
        self.republish_orphaned_presence(now);
        self.publish(now, Body::FullSyncEnd { begin_seq: begin });
    }

    /// Republishes, with their original timestamps, the presence writes still winning here
    /// whose origin has restarted since (a newer epoch is known): that origin no longer knows
    /// them and will not republish them, and a hub that missed them (restarted meanwhile)
    /// would otherwise keep an older winner, which the origin's new incarnation and the
    /// nodes that missed them then converge on while this node keeps the newer one.
    fn republish_orphaned_presence(&mut self, now: Millis) {
        self.republish_presence(now, |n, w| {
            w.origin != n.cfg.origin
                && n.replica
                    .origins
                    .get(&w.origin)
                    .is_some_and(|i| i.epoch > w.epoch)
        });
    }

    fn flush_query(&mut self) {
        if !self.synced_once || self.local_down {
            return;
        }
        let keys: Vec<String> = std::mem::take(&mut self.query)
            .into_iter()
            .filter(|k| self.sent.get(k).is_none() && self.cfg.policy.federates_device(k))
            .collect();
        if !keys.is_empty() {
            self.actions.push_back(Action::QueryLocal(keys));
        }
    }

    fn on_chunk(
        &mut self,
        now: Millis,
        hub: &str,
        request_id: u64,
        index: u32,
        entries: &[SnapshotEntry],
        origins: &[OriginSummary],
    ) {
        match &mut self.snapshot {
            Some(s)
                if s.id == request_id && (s.hubs.len() < MAX_HUBS || s.hubs.contains_key(hub)) =>
            {
                s.progress = now;
                let part = s.hubs.entry(hub.to_owned()).or_default();
                if !part.seen.insert(index) {
                    return; // duplicate chunk
                }
                let room = MAX_SNAPSHOT_ORIGINS.saturating_sub(part.summaries.len());
                part.summaries.extend(origins.iter().take(room).cloned());
            }
            _ => {
                self.stats.snapshot_rejected += 1;
                return;
            }
        }
        for e in entries {
            if e.origin == self.cfg.origin {
                match &e.value {
                    Value::Device(_) => {
                        if self.sent.get(&e.key).is_none() {
                            self.query.insert(e.key.clone());
                        }
                    }
                    Value::Presence(_) => {
                        self.replica.merge_entry(e, now);
                    }
                }
                continue;
            }
            self.hlc.observe(e.ts);
            // Before the first snapshot completes, its completion re-applies every key
            // (`reapply_all`): recomputing each entry on arrival as well only doubled the
            // work and spent the window on writes while the answer was still streaming in.
            if self.replica.merge_entry(e, now) && self.snapshot_done {
                self.recompute(e.value.kind(), &e.key);
            }
        }
        self.finish_answer_if_complete(now, hub);
    }

    fn on_snapshot_end(&mut self, now: Millis, hub: &str, request_id: u64, chunks: u32) {
        match &mut self.snapshot {
            Some(s)
                if s.id == request_id && (s.hubs.len() < MAX_HUBS || s.hubs.contains_key(hub)) =>
            {
                s.progress = now;
                s.hubs.entry(hub.to_owned()).or_default().expected = Some(chunks);
            }
            _ => {
                self.stats.snapshot_rejected += 1;
                return;
            }
        }
        // If a chunk was lost, what arrived is merged (merges are monotone) and, unless
        // another hub completes, the retry asks again.
        self.finish_answer_if_complete(now, hub);
    }

    /// Applies one hub's answer once all its chunks and its end arrived (in any order).
    fn finish_answer_if_complete(&mut self, now: Millis, hub: &str) {
        let summaries = match &mut self.snapshot {
            Some(s) if s.hubs.get(hub).is_some_and(PartialAnswer::is_complete) => {
                s.complete = true;
                // Keep the record, marked done, so duplicates of this answer are ignored.
                let part = s.hubs.entry(hub.to_owned()).or_default();
                part.done = true;
                std::mem::take(&mut part.summaries)
            }
            _ => return,
        };
        // Every device key is recomputed below (`reapply_all`), so an origin whose status the
        // summaries change needs no pass of its own.
        for sum in &summaries {
            if sum.origin == self.cfg.origin {
                continue;
            }
            self.replica.apply_summary(sum, now);
        }
        // Origins the answer does not list stay as they are: a hub that just restarted knows
        // nobody yet, and its answer must not close the holes it cannot fill (the origins
        // republish when it asks them to). Only the hub's own stream is covered.
        if self.hubs.len() < MAX_HUBS {
            self.hubs.insert(hub.to_owned());
        }
        self.replica.cover_origin(hub, now);
        self.snapshot_done = true;
        self.stats.snapshots_completed += 1;
        for (k, p) in std::mem::take(&mut self.buffered_presence) {
            self.listed_presence(now, k, p);
        }
        if self.synced_once && !self.local_down {
            // Writes of an earlier incarnation some hub may have missed.
            self.republish_own_presence(now, true);
        }
        self.flush_query();
        // The answer's keys arrived in order, leaving the table's nodes half full.
        self.replica.table.compact();
        self.reapply_all();
    }

    fn recompute(&mut self, kind: Kind, key: &str) {
        match kind {
            Kind::Device => self.recompute_device(key),
            Kind::Presence => self.recompute_presence(key),
        }
    }

    /// Every device of `origin` (its status changed). While a listing of the local Asterisk
    /// is awaited, the whole re-apply pass stands in (it waits for the listing): pushed now,
    /// the keys would be written before the listing says which of them Asterisk holds.
    fn recompute_origin(&mut self, now: Millis, origin: &str) {
        if self.listing_awaited(now) {
            self.reapply_all();
            return;
        }
        for key in self.replica.table.device_keys_of(origin) {
            self.recompute_device(&key);
        }
    }

    fn recompute_device(&mut self, key: &str) {
        if self.local_down || !self.cfg.policy.applies_devices() {
            return;
        }
        // Without an aggregate (nobody reports it any more) a key applied before gets
        // Asterisk's aggregate of no device. (The table marks the keys applied: a bit of the
        // key's entries, no copy of the key.)
        let Some(settled) = self.replica.table.aggregate_and_mark(
            key,
            &self.replica.origins,
            self.cfg.policy.down_state(),
            Some(&self.cfg.origin),
        ) else {
            return;
        };
        self.push_device(key, settled);
    }

    /// Asks for the local target of remote device `key` to hold its aggregate (made
    /// writable). The key's tag in the table is the apply queue's id of its target (a hint,
    /// checked by the queue: see [`ApplyQueue::push_device`]), set when it is not yet: a
    /// push then finds the target's slot without looking its name up.
    fn push_device(&mut self, key: &str, settled: Settled) {
        let state = self.cfg.policy.writable(settled.state);
        self.cfg.policy.target_name_into(key, &mut self.target_buf);
        let (_, id) = self.apply.push_device(&self.target_buf, state, settled.tag);
        if id != settled.tag {
            self.replica.table.set_device_tag(key, id);
        }
    }

    fn recompute_presence(&mut self, key: &str) {
        if self.local_down || !self.cfg.policy.federates_presence(key) {
            return;
        }
        // Also when the winner is our own write: it may be one of an earlier incarnation,
        // learned from a snapshot, that the local Asterisk no longer holds. The queue skips
        // it when the local Asterisk reported holding it.
        if let Some(w) = self.replica.table.presence(key) {
            let value = Value::Presence(w.value.clone());
            self.apply.push(key.to_owned(), value);
        }
    }

    /// Re-applies every remote state: pushes each device key's aggregate (and each presence
    /// winner) to the apply queue, which skips what the local Asterisk is known to hold. The
    /// pass is walked in batches of [`REAPPLY_BATCH`] keys by [`Node::pump`] while the queue
    /// holds fewer than that many pending writes, so a table of 100,000 keys is neither
    /// pushed at once (a snapshot's completion no longer waits for it, the queue stays
    /// small) nor forgotten: a key reached later gets its aggregate of that moment, and a key
    /// changed meanwhile was recomputed by that change. Calling it again restarts the walk.
    fn reapply_all(&mut self) {
        if self.local_down {
            return;
        }
        self.apply
            .reserve_devices(self.replica.table.keys(Kind::Device));
        self.reapply = Some(None);
    }

    /// One batch of the pass started by [`Node::reapply_all`].
    fn reapply_step(&mut self) {
        let Some(after) = self.reapply.take() else {
            return;
        };
        let keys: Vec<Box<str>> = self
            .replica
            .table
            .device_range(after.as_deref())
            .take(REAPPLY_BATCH)
            .map(|(k, _)| Box::from(k))
            .collect();
        for k in &keys {
            self.recompute_device(k);
        }
        if keys.len() == REAPPLY_BATCH {
            self.reapply = Some(keys.into_iter().next_back());
            return;
        }
        // Keys applied before that vanished from the table entirely.
        let vanished: Vec<String> = self
            .replica
            .table
            .marked_gone()
            .map(str::to_owned)
            .collect();
        for k in vanished {
            self.recompute_device(&k);
        }
        let pkeys: Vec<String> = self
            .replica
            .table
            .presence_entries()
            .map(|(k, _)| k.clone())
            .collect();
        for k in pkeys {
            self.recompute_presence(&k);
        }
    }

    /// Whether bulk re-applies wait for a listing asked of the local Asterisk (see
    /// [`LISTING_WAIT_MS`]; a wall clock that went back does not stretch the wait).
    fn listing_awaited(&self, now: Millis) -> bool {
        self.listing_asked
            .is_some_and(|t| now >= t && now.since(t) < LISTING_WAIT_MS)
    }

    fn pump(&mut self, now: Millis) {
        if self.local_down {
            return;
        }
        loop {
            while let Some(Write { id, target, value }) = self.apply.next_write_at(now) {
                self.actions.push_back(Action::Apply(ApplyCmd {
                    id,
                    target: target.into(),
                    value,
                }));
            }
            if self.reapply.is_none()
                || self.apply.pending_len() >= REAPPLY_BATCH
                || self.listing_awaited(now)
            {
                break;
            }
            self.reapply_step();
        }
    }
}

/// Whether a local event or listing item names something the apply queue may write: a
/// presence key or a `Custom:` device.
fn is_apply_target(event: &LocalEvent) -> bool {
    match event.value {
        Value::Presence(_) => true,
        Value::Device(_) => is_custom_device(&event.key),
    }
}
