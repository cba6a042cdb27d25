//! A [`Replica`] of the federation's state as seen by one participant: the [`Table`], the
//! liveness registry ([`Origins`]) and a [`SeqTracker`] per origin. [`crate::node::Node`] and
//! [`crate::hub::Hub`] both ingest stream envelopes through it, so agents, hubs and broker
//! relays agree on every merge rule.

use std::collections::{BTreeSet, HashMap};

use crate::envelope::{Body, Envelope, OriginSummary, SnapshotEntry};
use crate::liveness::Origins;
use crate::seq::{SeqStatus, SeqTracker};
use crate::state::{DeviceState, Kind};
use crate::table::{Settle, Settled, Table};
use crate::time::{Epoch, Millis};

/// What ingesting one stream envelope did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingested {
    /// New, duplicate, or stale (older epoch). Only `New` envelopes changed anything.
    pub status: SeqStatus,
    /// First message ever seen from this origin.
    pub first: bool,
    /// An update changed its key's entry (that key, the envelope's, is not repeated in
    /// `dirty_keys`).
    pub key_changed: bool,
    /// With [`Replica::ingest_settling`], a device update that changed its key: the key's
    /// aggregate, the key marked ([`Table::aggregate_and_mark`]), with the key's tag.
    pub settled: Option<Settled>,
    /// Keys whose entries changed (other than an update's own key, see `key_changed`).
    pub dirty_keys: Vec<(Kind, String)>,
    /// Origins whose status changed (every device key of theirs must be re-aggregated).
    pub dirty_origins: Vec<String>,
}

impl Ingested {
    fn status(status: SeqStatus) -> Self {
        Ingested {
            status,
            first: false,
            key_changed: false,
            settled: None,
            dirty_keys: Vec::new(),
            dirty_origins: Vec::new(),
        }
    }
}

/// Table + liveness + sequence tracking.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The table of known state.
    pub table: Table,
    /// Liveness of every origin.
    pub origins: Origins,
    /// Hashed (foldhash, seeded per process) rather than ordered: every stream message looks
    /// its origin up, and a hash lookup compares one name where a B-tree node's linear
    /// search compares several.
    seqs: HashMap<String, SeqTracker, foldhash::fast::RandomState>,
}

impl Replica {
    /// An empty replica declaring origins silent after `origin_timeout_ms`.
    pub fn new(origin_timeout_ms: u64) -> Self {
        Replica {
            table: Table::new(),
            origins: Origins::new(origin_timeout_ms),
            seqs: HashMap::default(),
        }
    }

    /// Ingests a stream envelope received at `now`. `assume_complete`: when this is the first
    /// message seen from its origin, whether the history before it counts as received (true
    /// while a snapshot will cover it) or as a gap. Control envelopes are ignored here.
    pub fn ingest(&mut self, env: &Envelope, assume_complete: bool, now: Millis) -> Ingested {
        self.ingest_settling(env, assume_complete, now, None)
    }

    /// [`Replica::ingest`]; with `settle` = `(down_state, exclude)`, a device update that
    /// changes its key is also aggregated (over every origin but `exclude`, a down one
    /// counting as `down_state`) and marked, in the table lookup that merged it
    /// ([`Ingested::settled`]).
    pub fn ingest_settling(
        &mut self,
        env: &Envelope,
        assume_complete: bool,
        now: Millis,
        settle: Option<(DeviceState, &str)>,
    ) -> Ingested {
        if !env.is_stream() {
            return Ingested::status(SeqStatus::Duplicate);
        }
        let origin = env.origin.as_str();
        let status = match self.seqs.get_mut(origin) {
            Some(t) => t.observe(env.epoch, env.seq, now),
            None => {
                let mut t = SeqTracker::new(env.epoch, env.seq, assume_complete);
                let s = t.observe(env.epoch, env.seq, now);
                self.seqs.insert(origin.to_owned(), t);
                s
            }
        };
        if status != SeqStatus::New {
            return Ingested::status(status);
        }
        // A device update's lag is noted in the lookup that observes it.
        let obs = match &env.body {
            Body::Update(u) if u.kind() == Kind::Device => self
                .origins
                .observe_device_update(origin, env.epoch, env.seq, u.ts.wall, now),
            body => {
                let is_end = matches!(body, Body::FullSyncEnd { .. });
                self.origins
                    .observe(origin, env.epoch, env.seq, is_end, now)
            }
        };
        if obs.stale {
            return Ingested::status(SeqStatus::Stale);
        }
        let mut out = Ingested::status(SeqStatus::New);
        out.first = obs.first;
        if obs.new_epoch || obs.revived {
            out.dirty_origins.push(origin.to_owned());
        }
        match &env.body {
            Body::Update(u) => {
                let settle = settle.map(|(down_state, exclude)| Settle {
                    origins: &self.origins,
                    down_state,
                    exclude: Some(exclude),
                });
                let applied = self.table.apply_settling(
                    origin, env.epoch, env.seq, &u.key, &u.value, u.ts, now, settle,
                );
                out.key_changed = applied.changed;
                out.settled = applied.settled;
            }
            Body::FullSyncEnd { begin_seq } => {
                let complete = self.seqs.get_mut(origin).is_some_and(|t| {
                    t.cover(env.epoch, begin_seq.saturating_sub(1), now);
                    t.complete_through(env.epoch, env.seq)
                });
                if complete {
                    for k in self.table.end_full_sync(origin, env.epoch, *begin_seq) {
                        out.dirty_keys.push((Kind::Device, k));
                    }
                } else {
                    // Part of the full sync was lost here: which devices it no longer names
                    // is unknown until a snapshot (its summary carries this floor) or the
                    // next full sync; withdrawing now would withdraw the lost ones too.
                    self.table.raise_floor(origin, env.epoch, *begin_seq);
                }
            }
            Body::Heartbeat { local_down: true }
                if self.origins.mark_self_down(origin, env.epoch, env.seq, now) =>
            {
                out.dirty_origins.push(origin.to_owned());
            }
            Body::Heartbeat { local_down: false }
                if self.origins.heard_up(origin, env.epoch, env.seq) =>
            {
                out.dirty_origins.push(origin.to_owned());
            }
            Body::OriginDown {
                origin: who,
                epoch,
                last_seq,
                ..
            } => {
                let changed = if who == origin {
                    self.origins.mark_self_down(origin, env.epoch, env.seq, now)
                } else {
                    self.origins.notify_down(who, *epoch, *last_seq, now)
                };
                if changed {
                    out.dirty_origins.push(who.clone());
                }
            }
            _ => {}
        }
        out
    }

    /// Summaries of every origin for a snapshot. `last_seq` is the origin's *contiguous*
    /// sequence here (everything up to it was received), so a receiver never takes a hole
    /// of ours as covered.
    pub fn summaries(&self) -> Vec<OriginSummary> {
        let mut out = self.origins.summaries();
        for s in &mut out {
            if let Some(t) = self.seqs.get(&s.origin)
                && t.epoch() == s.epoch
            {
                s.last_seq = s.last_seq.min(t.contiguous());
            }
            s.floor = match self.table.floor(&s.origin) {
                Some((epoch, begin)) if epoch == s.epoch && begin <= s.last_seq => Some(begin),
                _ => None,
            };
        }
        out
    }

    /// Merges one snapshot entry. Returns whether the table changed.
    pub fn merge_entry(&mut self, e: &SnapshotEntry, now: Millis) -> bool {
        self.table
            .apply(&e.origin, e.epoch, e.seq, &e.key, &e.value, e.ts, now)
    }

    /// Merges a snapshot's summary of one origin: liveness, and the snapshot covers the
    /// origin's stream up to `last_seq`. Returns whether the origin's status changed.
    /// With a `floor`, the origin's device entries older than it are dropped (call after
    /// merging the snapshot's entries; the caller re-applies every key).
    pub fn apply_summary(&mut self, s: &OriginSummary, now: Millis) -> bool {
        let changed = self.origins.apply_summary(s, now);
        self.seqs
            .entry(s.origin.clone())
            .or_insert_with(|| SeqTracker::new(s.epoch, s.last_seq.saturating_add(1), true))
            .cover(s.epoch, s.last_seq, now);
        if let Some(begin) = s.floor {
            self.table.end_full_sync(&s.origin, s.epoch, begin);
        }
        changed
    }

    /// Closes the gaps of `origin`: it republished its full state, or it is a hub whose
    /// complete snapshot answer is, by definition, current with its own stream.
    pub fn cover_origin(&mut self, origin: &str, now: Millis) {
        if let Some(t) = self.seqs.get_mut(origin) {
            t.cover_all(now);
        }
    }

    /// Origins with a gap open since at least `grace_ms`, except those in `ignore`.
    pub fn gaps(&self, now: Millis, grace_ms: u64, ignore: &BTreeSet<String>) -> Vec<String> {
        let mut gaps: Vec<String> = self
            .seqs
            .iter()
            .filter(|(o, _)| !ignore.contains(*o))
            .filter(|(_, t)| t.gap_since().is_some_and(|s| now.since(s) >= grace_ms))
            .map(|(o, _)| o.clone())
            .collect();
        // In name order, as when the trackers were kept ordered.
        gaps.sort_unstable();
        gaps
    }

    /// Marks silent origins down; returns them with their last `(epoch, seq)`.
    pub fn expire(&mut self, now: Millis) -> Vec<(String, Epoch, u64)> {
        self.origins.expire(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Update;
    use crate::hlc::HlcTimestamp;
    use crate::state::{DeviceState, Value};

    fn up(seq: u64, key: &str, v: DeviceState) -> Envelope {
        Envelope::new(
            "a",
            Epoch(1),
            seq,
            Body::Update(Update {
                key: key.into(),
                value: Value::Device(v),
                ts: HlcTimestamp::ZERO,
            }),
        )
    }

    #[test]
    fn dedupe_gap_and_full_sync_cover() {
        let mut r = Replica::new(1000);
        let i = r.ingest(&up(1, "d", DeviceState::Inuse), false, Millis(0));
        assert!(i.first && i.status == SeqStatus::New);
        assert!(i.key_changed && i.dirty_keys.is_empty());
        assert_eq!(
            r.ingest(&up(1, "d", DeviceState::Inuse), false, Millis(0))
                .status,
            SeqStatus::Duplicate
        );
        r.ingest(&up(4, "d", DeviceState::Busy), false, Millis(10));
        assert_eq!(
            r.gaps(Millis(10), 0, &BTreeSet::new()),
            vec!["a".to_owned()]
        );
        assert!(r.gaps(Millis(10), 5, &BTreeSet::new()).is_empty(), "grace");
        r.ingest(
            &Envelope::new("a", Epoch(1), 5, Body::FullSyncBegin),
            false,
            Millis(11),
        );
        r.ingest(
            &Envelope::new("a", Epoch(1), 6, Body::FullSyncEnd { begin_seq: 5 }),
            false,
            Millis(12),
        );
        assert!(
            r.gaps(Millis(100), 0, &BTreeSet::new()).is_empty(),
            "the full sync superseded the hole"
        );
        assert!(r.table.device("d").is_none(), "not reported in the sync");
    }

    #[test]
    fn lag_is_the_age_of_the_last_device_update_on_arrival() {
        let mut r = Replica::new(1000);
        let mut e = up(1, "d", DeviceState::Inuse);
        if let Body::Update(u) = &mut e.body {
            u.ts = HlcTimestamp {
                wall: 100,
                counter: 0,
            };
        }
        r.ingest(&e, false, Millis(130));
        assert_eq!(r.origins.get("a").and_then(|i| i.lag_ms), Some(30));
        r.ingest(
            &Envelope::new("a", Epoch(1), 2, Body::Heartbeat { local_down: false }),
            false,
            Millis(500),
        );
        assert_eq!(r.origins.get("a").and_then(|i| i.lag_ms), Some(30));
    }

    #[test]
    fn origin_down_messages() {
        let mut r = Replica::new(1000);
        r.ingest(&up(1, "d", DeviceState::Inuse), false, Millis(0));
        let down = Envelope::new(
            "a",
            Epoch(1),
            2,
            Body::OriginDown {
                origin: "a".into(),
                epoch: Epoch(1),
                last_seq: 2,
                reason: "lost".into(),
            },
        );
        assert_eq!(
            r.ingest(&down, false, Millis(1)).dirty_origins,
            vec!["a".to_owned()]
        );
        assert!(r.origins.is_down("a"));
        let notice = Envelope::new(
            "hub",
            Epoch(1),
            1,
            Body::OriginDown {
                origin: "b".into(),
                epoch: Epoch(3),
                last_seq: 7,
                reason: "timeout".into(),
            },
        );
        assert!(
            r.ingest(&notice, false, Millis(1))
                .dirty_origins
                .contains(&"b".to_owned())
        );
        assert!(r.origins.is_down("b"));
    }

    #[test]
    fn gaps_are_listed_in_name_order() {
        let mut r = Replica::new(1000);
        let names = ["pbx-c", "a", "pbx-a", "hub-1"];
        for n in names {
            // Its first message is its third: the two before are a gap.
            let env = Envelope::new(n, Epoch(1), 3, Body::Heartbeat { local_down: false });
            r.ingest(&env, false, Millis(0));
        }
        let mut sorted: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        sorted.sort_unstable();
        assert_eq!(r.gaps(Millis(10), 0, &BTreeSet::new()), sorted);
        let ignore = BTreeSet::from(["a".to_owned()]);
        assert_eq!(r.gaps(Millis(10), 0, &ignore), sorted[1..].to_vec());
    }
}
