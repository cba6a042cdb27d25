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

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<HubAction> {
        self.actions.pop_front()
    }

    /// Every pending action.
    pub fn take_actions(&mut self) -> Vec<HubAction> {
        self.actions.drain(..).collect()
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

    fn serve_snapshot(&mut self, to: &str, request_id: u64) {
        self.stats.snapshots_served += 1;
        let entries = self.replica.table.snapshot();
        let summaries = self.replica.summaries();
        let max_bytes = self.cfg.chunk_max_bytes.max(1);
        let max_items = self.cfg.chunk_max_entries.max(1);
        let mut chunks = 0u32;
        let mut cur_e: Vec<SnapshotEntry> = Vec::new();
        let mut cur_o: Vec<OriginSummary> = Vec::new();
        let mut bytes = 0usize;
        let mut flush = |hub: &mut Hub, e: &mut Vec<SnapshotEntry>, o: &mut Vec<OriginSummary>| {
            if e.is_empty() && o.is_empty() {
                return;
            }
            let envelope = hub.control(Body::SnapshotChunk {
                request_id,
                index: chunks,
                entries: std::mem::take(e),
                origins: std::mem::take(o),
            });
            hub.actions.push_back(HubAction::SendTo {
                to: to.to_owned(),
                envelope,
            });
            hub.stats.chunks_sent += 1;
            chunks += 1;
        };
        for e in entries {
            let size = serde_json::to_vec(&e)
                .map(|v| v.len() + 1)
                .unwrap_or(max_bytes);
            if !(cur_e.is_empty() && cur_o.is_empty())
                && (bytes + size > max_bytes || cur_e.len() + cur_o.len() >= max_items)
            {
                flush(self, &mut cur_e, &mut cur_o);
                bytes = 0;
            }
            bytes += size;
            cur_e.push(e);
        }
        for o in summaries {
            let size = serde_json::to_vec(&o)
                .map(|v| v.len() + 1)
                .unwrap_or(max_bytes);
            if !(cur_e.is_empty() && cur_o.is_empty())
                && (bytes + size > max_bytes || cur_e.len() + cur_o.len() >= max_items)
            {
                flush(self, &mut cur_e, &mut cur_o);
                bytes = 0;
            }
            bytes += size;
            cur_o.push(o);
        }
        flush(self, &mut cur_e, &mut cur_o);
        let envelope = self.control(Body::SnapshotEnd { request_id, chunks });
        self.actions.push_back(HubAction::SendTo {
            to: to.to_owned(),
            envelope,
        });
    }
}
