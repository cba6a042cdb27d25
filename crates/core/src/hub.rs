//! [`Hub`]: the sans-IO brain of hintfed-server. It ingests verified envelopes from agents
//! (deduplicated by `(origin, epoch, seq)`), keeps the [`Table`], tells the daemon which
//! envelopes to forward to subscribers, answers snapshot requests in bounded chunks, tracks
//! origin liveness (announcing [`Body::OriginDown`] for silent origins), heartbeats, and asks
//! an origin to republish its state ([`Body::ResyncRequest`]) when it missed part of its
//! stream (e.g. after the hub restarted).
//!
//! Daemon loop: for each received frame, verify it, call [`Hub::on_envelope`]; on
//! [`Ingest::Forward`] publish the frame as received (or re-sealed) to every subscriber;
//! call [`Hub::tick`] periodically; send every [`HubAction`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::envelope::{Body, Envelope, OriginSummary, SnapshotEntry};
use crate::liveness::Origins;
use crate::replica::Replica;
use crate::seq::SeqStatus;
use crate::table::Table;
use crate::time::{Epoch, Millis};

/// Configuration of a [`Hub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub's own origin name (used for its heartbeats and notices).
    pub name: String,
    /// An origin silent this long is announced down. Default 15 000 ms.
    pub origin_timeout_ms: u64,
    /// Heartbeat period. Default 1 000 ms.
    pub heartbeat_interval_ms: u64,
    /// Largest encoded size of the entries and summaries of one snapshot chunk. Default
    /// 48 KiB (below the default 64 KiB message limit, leaving room for the envelope).
    pub chunk_max_bytes: usize,
    /// Most entries plus summaries in one chunk. Default 1 000.
    pub chunk_max_entries: usize,
    /// How long a gap in an origin's stream may stay open before a resync is requested.
    /// Default 500 ms.
    pub gap_grace_ms: u64,
    /// A resync request not answered after this long is sent again. Default 5 000 ms.
    pub resync_retry_ms: u64,
}

impl HubConfig {
    /// Defaults for a hub named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        HubConfig {
            name: name.into(),
            origin_timeout_ms: 15_000,
            heartbeat_interval_ms: 1_000,
            chunk_max_bytes: 48 * 1024,
            chunk_max_entries: 1_000,
            gap_grace_ms: 500,
            resync_retry_ms: 5_000,
        }
    }
}

/// What to do with an ingested envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingest {
    /// A new stream envelope: publish it to every subscriber.
    Forward,
    /// A control envelope, answered through [`HubAction`]s.
    Handled,
    /// Already seen: drop.
    Duplicate,
    /// From an older epoch of its origin: drop.
    Stale,
    /// Not for a hub (or from this hub itself): drop.
    Ignored,
}

/// What the hub daemon must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubAction {
    /// The hub's own stream envelope (heartbeat, origin down): publish to every subscriber.
    Publish(Envelope),
    /// A control envelope for one peer (snapshot chunk/end, resync request), addressed by the
    /// origin name it used (the daemon maps it to its connection).
    SendTo {
        /// Recipient origin.
        to: String,
        /// The envelope.
        envelope: Envelope,
    },
}

/// Counters of a [`Hub`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Envelopes to forward.
    pub forwarded: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Stale envelopes dropped.
    pub stale: u64,
    /// Snapshots served.
    pub snapshots_served: u64,
    /// Snapshot chunks sent.
    pub chunks_sent: u64,
    /// Resync requests sent.
    pub resync_requests: u64,
    /// Origins announced down for silence.
    pub origins_down: u64,
}

/// The hub. See the module docs.
#[derive(Debug)]
pub struct Hub {
    cfg: HubConfig,
    epoch: Epoch,
    seq: u64,
    replica: Replica,
    actions: VecDeque<HubAction>,
    next_heartbeat: Millis,
    resync_sent: BTreeMap<String, Millis>,
    stats: HubStats,
    /// Snapshot answers being streamed, served first come first served.
    snapshots: VecDeque<Cursor>,
    /// Per peer, the `(epoch, request id)` of the last snapshot request answered (one entry
    /// per peer ever heard, like `resync_sent`).
    answered: BTreeMap<String, (Epoch, u64)>,
}

/// Where a streamed snapshot answer stands.
#[derive(Debug)]
struct Cursor {
    to: String,
    request_id: u64,
    /// Chunks produced so far (the index of the next one).
    index: u32,
    /// Origin summaries as of the request (what the entries sent are at least as new as).
    summaries: Vec<OriginSummary>,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Device entries from key `.0` on (all keys when `None`), skipping its first `.1`
    /// entries (a key whose entries did not all fit in the previous chunk).
    Devices(Option<(String, usize)>),
    /// Presence winners after this key (all when `None`).
    Presence(Option<String>),
    /// Origin summaries from this index.
    Origins(usize),
    /// Only the end is left.
    End,
}

/// Counts the bytes a value encodes to without keeping them.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encoded size of one chunk item (plus its separator); `max` when it cannot be encoded.
fn encoded_size<T: serde::Serialize>(item: &T, max: usize) -> usize {
    let mut n = ByteCount(1);
    match serde_json::to_writer(&mut n, item) {
        Ok(()) => n.0,
        Err(_) => max,
    }
}

impl Hub {
    /// A hub starting epoch `epoch` (wall-clock ms at start) at `now`.
    pub fn new(config: HubConfig, epoch: Epoch, now: Millis) -> Self {
        Hub {
            replica: Replica::new(config.origin_timeout_ms),
            cfg: config,
            epoch,
            seq: 0,
            actions: VecDeque::new(),
            next_heartbeat: now,
            resync_sent: BTreeMap::new(),
            stats: HubStats::default(),
            snapshots: VecDeque::new(),
            answered: BTreeMap::new(),
        }
    }

    /// The hub's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The hub's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The table of known state.
    pub fn table(&self) -> &Table {
        &self.replica.table
    }

    /// Liveness of every origin.
    pub fn origins(&self) -> &Origins {
        &self.replica.origins
    }

    /// Counters.
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// The next action, if any: queued actions first, then the next chunk of a snapshot
    /// answer being streamed.
    pub fn poll_action(&mut self) -> Option<HubAction> {
        self.actions
            .pop_front()
            .or_else(|| self.next_snapshot_chunk())
    }

    /// Every pending action, including every chunk of every snapshot answer being streamed
    /// (materialised whole: for tests and simulations; a daemon streams them with
    /// [`Hub::take_queued_actions`] and [`Hub::next_snapshot_chunk`]).
    pub fn take_actions(&mut self) -> Vec<HubAction> {
        let mut out: Vec<HubAction> = self.actions.drain(..).collect();
        while let Some(a) = self.next_snapshot_chunk() {
            out.push(a);
        }
        out
    }

    /// Every queued action except snapshot chunks (publications, resync requests).
    pub fn take_queued_actions(&mut self) -> Vec<HubAction> {
        self.actions.drain(..).collect()
    }

    /// Drops the snapshot answer being streamed to `to` (e.g. its connection is gone).
    pub fn cancel_snapshot(&mut self, to: &str) {
        self.snapshots.retain(|c| c.to != to);
    }

    /// Number of snapshot answers being streamed.
    pub fn snapshots_pending(&self) -> usize {
        self.snapshots.len()
    }

    /// The next message of the oldest snapshot answer being streamed (a
    /// [`Body::SnapshotChunk`] or, last, its [`Body::SnapshotEnd`]), made from the table as
    /// it is now; `None` when no answer is pending. Answers are served one after the other,
    /// so the daemon holds only the chunks it has in flight, however many peers ask at once.
    ///
    /// Consistency: the entries of a chunk are the table's current entries, each with its
    /// version; the summaries (sent last) are those of the moment of the request. Every entry
    /// sent is at least as new as at the request, and whatever changes after it reaches the
    /// requester through the stream, so its merge (by version) converges.
    pub fn next_snapshot_chunk(&mut self) -> Option<HubAction> {
        let mut cur = self.snapshots.pop_front()?;
        let body = self.make_chunk(&mut cur);
        let to = cur.to.clone();
        if matches!(body, Body::SnapshotEnd { .. }) {
            self.stats.snapshots_served += 1;
        } else {
            self.stats.chunks_sent += 1;
            self.snapshots.push_front(cur);
        }
        Some(HubAction::SendTo {
            to,
            envelope: self.control(body),
        })
    }

    /// Ingests one verified envelope received at `now`.
    pub fn on_envelope(&mut self, now: Millis, env: &Envelope) -> Ingest {
        if env.origin == self.cfg.name {
            return Ingest::Ignored;
        }
        match &env.body {
            Body::Hello { .. } => {
                if self.replica.origins.get(&env.origin).is_none() && env.seq > 0 {
                    // It published before we knew it (we restarted): ask for everything.
                    self.send_resync(&env.origin, now);
                }
                Ingest::Handled
            }
            Body::SnapshotRequest { request_id } => {
                // A request seen again (duplicated or delayed on the way) is not answered
                // twice: the peer merges the chunks of one request id by index, and two
                // answers made at different times would mix, a summary of one covering
                // entries that only the other holds. A peer asks again with a new id; its next
                // incarnation (another epoch) starts its ids over.
                let id = (env.epoch, *request_id);
                if self
                    .answered
                    .get(&env.origin)
                    .is_some_and(|&(epoch, last)| epoch == id.0 && *request_id <= last)
                {
                    return Ingest::Duplicate;
                }
                self.answered.insert(env.origin.clone(), id);
                self.serve_snapshot(&env.origin, *request_id);
                Ingest::Handled
            }
            Body::SnapshotChunk { .. } | Body::SnapshotEnd { .. } | Body::ResyncRequest { .. } => {
                Ingest::Ignored
            }
            _ => {
                let ing = self.replica.ingest(env, false, now);
                match ing.status {
                    SeqStatus::Duplicate => {
                        self.stats.duplicates += 1;
                        Ingest::Duplicate
                    }
                    SeqStatus::Stale => {
                        self.stats.stale += 1;
                        Ingest::Stale
                    }
                    SeqStatus::New => {
                        if matches!(env.body, Body::FullSyncEnd { .. }) {
                            self.resync_sent.remove(&env.origin);
                        }
                        self.stats.forwarded += 1;
                        Ingest::Forward
                    }
                }
            }
        }
    }

    /// Time passes: heartbeat, silent origins announced down, resync requests for gaps.
    pub fn tick(&mut self, now: Millis) {
        if now >= self.next_heartbeat {
            self.publish(Body::Heartbeat { local_down: false });
            self.next_heartbeat = now.plus(self.cfg.heartbeat_interval_ms.max(1));
        }
        for (origin, epoch, last_seq) in self.replica.expire(now) {
            self.stats.origins_down += 1;
            self.publish(Body::OriginDown {
                origin,
                epoch,
                last_seq,
                reason: "silent for longer than origin_timeout".to_owned(),
            });
        }
        for origin in self
            .replica
            .gaps(now, self.cfg.gap_grace_ms, &BTreeSet::new())
        {
            let due = self
                .resync_sent
                .get(&origin)
                .is_none_or(|t| now.since(*t) >= self.cfg.resync_retry_ms);
            if due {
                self.send_resync(&origin, now);
            }
        }
    }

    fn publish(&mut self, body: Body) {
        self.seq += 1;
        let env = Envelope::new(self.cfg.name.clone(), self.epoch, self.seq, body);
        self.actions.push_back(HubAction::Publish(env));
    }

    fn control(&self, body: Body) -> Envelope {
        Envelope::new(self.cfg.name.clone(), self.epoch, self.seq, body)
    }

    fn send_resync(&mut self, origin: &str, now: Millis) {
        self.resync_sent.insert(origin.to_owned(), now);
        self.stats.resync_requests += 1;
        let envelope = self.control(Body::ResyncRequest {
            origin: origin.to_owned(),
        });
        self.actions.push_back(HubAction::SendTo {
            to: origin.to_owned(),
            envelope,
        });
    }

    /// Queues a snapshot answer for `to`. A new request of a peer already waiting replaces
    /// its old one in place (its old answer is useless to it: the node only accepts the
    /// chunks of its latest request).
    fn serve_snapshot(&mut self, to: &str, request_id: u64) {
        let cursor = Cursor {
            to: to.to_owned(),
            request_id,
            index: 0,
            summaries: self.replica.summaries(),
            phase: Phase::Devices(None),
        };
        match self.snapshots.iter_mut().find(|c| c.to == to) {
            Some(c) => *c = cursor,
            None => self.snapshots.push_back(cursor),
        }
    }

    /// The next chunk of `cur` (or its end), advancing it.
    fn make_chunk(&self, cur: &mut Cursor) -> Body {
        let max_bytes = self.cfg.chunk_max_bytes.max(1);
        let max_items = self.cfg.chunk_max_entries.max(1);
        let table = &self.replica.table;
        let mut entries: Vec<SnapshotEntry> = Vec::new();
        let mut origins: Vec<OriginSummary> = Vec::new();
        let mut bytes = 0usize;
        // Whether an item of `size` still fits (the first one always does).
        let fits = |bytes: usize, items: usize, size: usize| {
            items == 0 || (bytes + size <= max_bytes && items < max_items)
        };
        loop {
            match &mut cur.phase {
                Phase::Devices(from) => {
                    let (start, skip) = match from.take() {
                        Some((k, n)) => (Some(k), n),
                        None => (None, 0),
                    };
                    // The partly sent key first (if it still exists), then the keys after it.
                    let head = start
                        .as_deref()
                        .and_then(|k| table.device(k).map(|d| (k, d)));
                    let rest = table.device_range(start.as_deref());
                    let mut stopped = None;
                    'keys: for (i, (key, per)) in head.into_iter().chain(rest).enumerate() {
                        let skip = if i == 0 && head.is_some() { skip } else { 0 };
                        for (n, (origin, e)) in per.iter().enumerate().skip(skip) {
                            let entry = Table::device_snapshot_entry(key, origin, e);
                            let size = encoded_size(&entry, max_bytes);
                            if !fits(bytes, entries.len(), size) {
                                stopped = Some((key.to_owned(), n));
                                break 'keys;
                            }
                            bytes += size;
                            entries.push(entry);
                        }
                    }
                    match stopped {
                        Some(at) => {
                            cur.phase = Phase::Devices(Some(at));
                            break;
                        }
                        None => cur.phase = Phase::Presence(None),
                    }
                }
                Phase::Presence(after) => {
                    let mut last = after.take();
                    let mut stopped = false;
                    for (key, e) in table.presence_range(last.clone().as_deref()) {
                        let entry = Table::presence_snapshot_entry(key, e);
                        let size = encoded_size(&entry, max_bytes);
                        if !fits(bytes, entries.len(), size) {
                            stopped = true;
                            break;
                        }
                        bytes += size;
                        entries.push(entry);
                        last = Some(key.to_owned());
                    }
                    if stopped {
                        cur.phase = Phase::Presence(last);
                        break;
                    }
                    cur.phase = Phase::Origins(0);
                }
                Phase::Origins(from) => {
                    let mut next = *from;
                    while let Some(o) = cur.summaries.get(next) {
                        let size = encoded_size(o, max_bytes);
                        if !fits(bytes, entries.len() + origins.len(), size) {
                            break;
                        }
                        bytes += size;
                        origins.push(o.clone());
                        next += 1;
                    }
                    if next < cur.summaries.len() {
                        cur.phase = Phase::Origins(next);
                        break;
                    }
                    cur.phase = Phase::End;
                }
                Phase::End => break,
            }
        }
        if entries.is_empty() && origins.is_empty() {
            return Body::SnapshotEnd {
                request_id: cur.request_id,
                chunks: cur.index,
            };
        }
        let index = cur.index;
        cur.index += 1;
        Body::SnapshotChunk {
            request_id: cur.request_id,
            index,
            entries,
            origins,
        }
    }
}
