//! Origin liveness: for every origin, its current epoch, last sequence, when it was last
//! heard, and whether (and why) it is down.
//!
//! An origin goes down when it announces it lost its Asterisk ([`DownReason::SelfAnnounced`]),
//! when it is silent past `origin_timeout` ([`DownReason::Silent`], default 15 s), or when a
//! hub reports it silent and nothing newer was heard from it here ([`DownReason::Notified`]).
//! While down, its devices count as the policy's `down_state` in every aggregate.
//!
//! It comes back:
//! - silent or notified, same epoch: with any newer message of that epoch (it was only
//!   unreachable, its last values are still right);
//! - otherwise (it restarted, or had lost its Asterisk): only with the end of a full sync
//!   newer than the down notice, so stale values never light up between the restart and the
//!   moment its full sync has replaced them;
//! - announced down at its first start (before its Asterisk answered), same epoch: also with
//!   a newer heartbeat saying it is up ([`Origins::heard_up`]), which it sends only after its
//!   full sync ended (that end was missed here; the gap it leaves brings a snapshot);
//! - or when a hub's snapshot summary says it is up at a position newer than the down mark
//!   (the hub saw that full sync end; we missed it, e.g. while disconnected).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::envelope::OriginSummary;
use crate::time::{Epoch, Millis};

/// Why an origin is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownReason {
    /// The origin said it lost its Asterisk.
    SelfAnnounced,
    /// Nothing heard from it for longer than `origin_timeout`.
    Silent,
    /// A hub reported it silent.
    Notified,
}

/// A down mark: why, and the last `(epoch, seq)` known when it was set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Down {
    /// Why.
    pub reason: DownReason,
    /// Epoch at the time.
    pub epoch: Epoch,
    /// Sequence at the time.
    pub seq: u64,
    /// When it was marked.
    pub since: Millis,
}

/// What is known about one origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginInfo {
    /// Current epoch.
    pub epoch: Epoch,
    /// Highest stream sequence seen in that epoch.
    pub last_seq: u64,
    /// When a stream message was last received from it.
    pub last_seen: Millis,
    /// Set while the origin is down.
    pub down: Option<Down>,
    /// Age of its last device update on arrival: the receiver's clock minus the update's
    /// timestamp (the origin's clock), so it includes the clocks' skew; `None` before the
    /// first update.
    pub lag_ms: Option<u64>,
}

/// What observing a stream message changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The message is from an older epoch than known: ignore it.
    pub stale: bool,
    /// First message ever seen from this origin.
    pub first: bool,
    /// A new epoch started.
    pub new_epoch: bool,
    /// The origin came back up.
    pub revived: bool,
}

/// The liveness registry of every known origin.
#[derive(Clone, Debug)]
pub struct Origins {
    /// Hashed (foldhash, seeded per process) rather than ordered: every stream message looks
    /// its origin up, and a hash lookup compares one name where a B-tree node's linear search
    /// compares several. What lists origins lists them in name order.
    map: HashMap<String, OriginInfo, foldhash::fast::RandomState>,
    /// How many entries of `map` are down: while none is, [`Origins::is_down`] (asked for
    /// every origin of every device update merged) answers without a lookup.
    downs: usize,
    timeout_ms: u64,
}

/// Sets `info.down`, keeping [`Origins`]' count of down entries.
fn set_down(downs: &mut usize, info: &mut OriginInfo, down: Option<Down>) {
    match (info.down.is_some(), down.is_some()) {
        (false, true) => *downs += 1,
        (true, false) => *downs -= 1,
        _ => {}
    }
    info.down = down;
}

impl Origins {
    /// A registry declaring origins silent after `timeout_ms`.
    pub fn new(timeout_ms: u64) -> Self {
        Origins {
            map: HashMap::default(),
            downs: 0,
            timeout_ms,
        }
    }

    /// Info about `origin`.
    pub fn get(&self, origin: &str) -> Option<&OriginInfo> {
        self.map.get(origin)
    }

    /// Every known origin, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &OriginInfo)> {
        let mut all: Vec<_> = self.map.iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    /// Whether `origin` is known and down.
    pub fn is_down(&self, origin: &str) -> bool {
        self.downs > 0 && self.map.get(origin).is_some_and(|i| i.down.is_some())
    }

    /// Records a stream message `(epoch, seq)` from `origin` at `now`; `full_sync_end` tells
    /// whether it ends a full sync (the only message that revives a restarted origin).
    pub fn observe(
        &mut self,
        origin: &str,
        epoch: Epoch,
        seq: u64,
        full_sync_end: bool,
        now: Millis,
    ) -> Observed {
        self.observe_lagged(origin, epoch, seq, full_sync_end, now, None)
    }

    /// [`Origins::observe`] of a device update stamped `ts_wall_ms` (the origin's clock),
    /// recording its lag ([`OriginInfo::lag_ms`]) in the same lookup unless it is stale.
    pub fn observe_device_update(
        &mut self,
        origin: &str,
        epoch: Epoch,
        seq: u64,
        ts_wall_ms: u64,
        now: Millis,
    ) -> Observed {
        self.observe_lagged(origin, epoch, seq, false, now, Some(ts_wall_ms))
    }

    fn observe_lagged(
        &mut self,
        origin: &str,
        epoch: Epoch,
        seq: u64,
        full_sync_end: bool,
        now: Millis,
        ts_wall_ms: Option<u64>,
    ) -> Observed {
        let mut out = Observed::default();
        // Looked up by `&str` first: no copy of the name per message of a known origin.
        let info = match self.map.get_mut(origin) {
            Some(info) => info,
            None => {
                out.first = true;
                out.new_epoch = true;
                self.map.entry(origin.to_owned()).or_insert(OriginInfo {
                    epoch,
                    last_seq: 0,
                    last_seen: now,
                    down: None,
                    lag_ms: None,
                })
            }
        };
        if epoch < info.epoch {
            out.stale = true;
            return out;
        }
        if epoch > info.epoch {
            info.epoch = epoch;
            info.last_seq = 0;
            out.new_epoch = true;
        }
        info.last_seq = info.last_seq.max(seq);
        info.last_seen = now;
        if let Some(wall) = ts_wall_ms {
            info.lag_ms = Some(now.0.saturating_sub(wall));
        }
        if let Some(d) = info.down {
            let newer = (epoch, seq) > (d.epoch, d.seq);
            let revive = match d.reason {
                DownReason::Silent | DownReason::Notified => {
                    newer && (epoch == d.epoch || full_sync_end)
                }
                DownReason::SelfAnnounced => newer && full_sync_end,
            };
            if revive {
                set_down(&mut self.downs, info, None);
                out.revived = true;
            }
        }
        out
    }

    /// Marks `origin` down because it said so (in the message `(epoch, seq)`). Returns
    /// whether it was up before.
    pub fn mark_self_down(&mut self, origin: &str, epoch: Epoch, seq: u64, now: Millis) -> bool {
        let info = self.map.entry(origin.to_owned()).or_insert(OriginInfo {
            epoch,
            last_seq: seq,
            last_seen: now,
            down: None,
            lag_ms: None,
        });
        match info.down {
            Some(d) if d.reason == DownReason::SelfAnnounced => false,
            prev => {
                let down = Down {
                    reason: DownReason::SelfAnnounced,
                    epoch,
                    seq,
                    since: now,
                };
                set_down(&mut self.downs, info, Some(down));
                prev.is_none()
            }
        }
    }

    /// `origin` says its Asterisk is up (a heartbeat) in the message `(epoch, seq)`. An origin
    /// says so only once its full sync ended, and one that loses its Asterisk syncs again in
    /// a new epoch; so an older down mark it announced in the same epoch (at its first start,
    /// before its Asterisk answered) was lifted by a full-sync end missed here (e.g. lost
    /// before a snapshot filled the gap). Returns whether it revived.
    pub fn heard_up(&mut self, origin: &str, epoch: Epoch, seq: u64) -> bool {
        let Some(info) = self.map.get_mut(origin) else {
            return false;
        };
        match info.down {
            Some(d) if d.reason == DownReason::SelfAnnounced && d.epoch == epoch && seq > d.seq => {
                set_down(&mut self.downs, info, None);
                true
            }
            _ => false,
        }
    }

    /// A hub says `origin` is silent since `(epoch, last_seq)`. Marks it down unless
    /// something newer was heard from it here. Returns whether it was up before.
    pub fn notify_down(&mut self, origin: &str, epoch: Epoch, last_seq: u64, now: Millis) -> bool {
        let info = self.map.entry(origin.to_owned()).or_insert(OriginInfo {
            epoch,
            last_seq,
            last_seen: now,
            down: None,
            lag_ms: None,
        });
        if info.down.is_some() || (info.epoch, info.last_seq) > (epoch, last_seq) {
            return false;
        }
        let down = Down {
            reason: DownReason::Notified,
            epoch: info.epoch,
            seq: info.last_seq,
            since: now,
        };
        set_down(&mut self.downs, info, Some(down));
        true
    }

    /// Marks origins silent past the timeout as down; returns them with their last
    /// `(epoch, seq)`, in name order.
    pub fn expire(&mut self, now: Millis) -> Vec<(String, Epoch, u64)> {
        let mut out = Vec::new();
        for (name, info) in &mut self.map {
            if info.down.is_none() && now.since(info.last_seen) > self.timeout_ms {
                let down = Down {
                    reason: DownReason::Silent,
                    epoch: info.epoch,
                    seq: info.last_seq,
                    since: now,
                };
                set_down(&mut self.downs, info, Some(down));
                out.push((name.clone(), info.epoch, info.last_seq));
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Summaries of every origin (for a snapshot), in name order.
    pub fn summaries(&self) -> Vec<OriginSummary> {
        self.iter()
            .map(|(o, i)| OriginSummary {
                origin: o.clone(),
                epoch: i.epoch,
                last_seq: i.last_seq,
                down: i.down.map(|d| d.reason),
                floor: None,
            })
            .collect()
    }

    /// Merges a hub's summary of one origin. Returns whether the epoch or the down status
    /// changed.
    pub fn apply_summary(&mut self, s: &OriginSummary, now: Millis) -> bool {
        let down_mark = |reason| Down {
            reason,
            epoch: s.epoch,
            seq: s.last_seq,
            since: now,
        };
        let Some(info) = self.map.get_mut(&s.origin) else {
            self.downs += usize::from(s.down.is_some());
            self.map.insert(
                s.origin.clone(),
                OriginInfo {
                    epoch: s.epoch,
                    last_seq: s.last_seq,
                    last_seen: now,
                    down: s.down.map(down_mark),
                    lag_ms: None,
                },
            );
            return true;
        };
        let theirs = (s.epoch, s.last_seq);
        let ours = (info.epoch, info.last_seq);
        // The hub saw the origin up after our down mark: e.g. it restarted while we were
        // away and we missed the end of its full sync, which the hub saw (and whose values
        // this snapshot carries). That revives it here, even when we have heard more of its
        // current epoch than the hub summarised (its summary counts only what it holds
        // without a hole). A down mark newer than the summary stands.
        let revive = s.down.is_none()
            && s.epoch >= info.epoch
            && info.down.is_some_and(|d| (d.epoch, d.seq) < theirs);
        // Otherwise only strictly newer knowledge counts: a hub at the same position may
        // still miss a message we have (e.g. the full-sync end that revived the origin here).
        if theirs <= ours && !revive {
            return false;
        }
        let mut changed = false;
        if s.epoch > info.epoch {
            info.epoch = s.epoch;
            info.last_seq = s.last_seq;
            changed = true;
        } else {
            info.last_seq = info.last_seq.max(s.last_seq);
        }
        info.last_seen = info.last_seen.max(now);
        if revive {
            set_down(&mut self.downs, info, None);
            changed = true;
        } else if let (Some(r), None) = (s.down, info.down) {
            set_down(&mut self.downs, info, Some(down_mark(r)));
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_then_return_in_the_same_epoch() {
        let mut o = Origins::new(15_000);
        assert!(o.observe("a", Epoch(1), 1, false, Millis(0)).first);
        assert!(o.expire(Millis(15_000)).is_empty());
        assert_eq!(
            o.expire(Millis(15_001)),
            vec![("a".to_owned(), Epoch(1), 1)]
        );
        assert!(o.is_down("a"));
        assert!(o.expire(Millis(40_000)).is_empty(), "reported once");
        let r = o.observe("a", Epoch(1), 2, false, Millis(40_001));
        assert!(r.revived && !r.new_epoch);
        assert!(!o.is_down("a"));
    }

    #[test]
    fn restarted_origin_revives_only_with_its_full_sync_end() {
        let mut o = Origins::new(1000);
        o.observe("a", Epoch(1), 5, false, Millis(0));
        o.expire(Millis(2000));
        let r = o.observe("a", Epoch(2), 1, false, Millis(2001));
        assert!(r.new_epoch && !r.revived);
        assert!(o.is_down("a"));
        assert!(o.observe("a", Epoch(2), 3, true, Millis(2002)).revived);
        assert!(o.observe("a", Epoch(1), 9, false, Millis(2003)).stale);
    }

    #[test]
    fn self_announced_down_needs_a_newer_full_sync() {
        let mut o = Origins::new(1000);
        o.observe("a", Epoch(1), 5, false, Millis(0));
        assert!(o.mark_self_down("a", Epoch(1), 6, Millis(1)));
        assert!(
            !o.observe("a", Epoch(1), 7, false, Millis(2)).revived,
            "heartbeat"
        );
        assert!(
            !o.observe("a", Epoch(2), 1, false, Millis(3)).revived,
            "new epoch begins"
        );
        assert!(o.observe("a", Epoch(2), 4, true, Millis(4)).revived);
    }

    #[test]
    fn an_up_heartbeat_lifts_only_an_older_self_announced_mark_of_its_epoch() {
        let mut o = Origins::new(1000);
        // First start: down until the Asterisk answers, then up in the same epoch.
        assert!(o.mark_self_down("a", Epoch(1), 1, Millis(0)));
        assert!(!o.heard_up("a", Epoch(1), 1), "not newer");
        assert!(o.heard_up("a", Epoch(1), 9));
        assert!(!o.is_down("a"));
        // Lost its Asterisk: a new epoch must sync; an up heartbeat of the old one is stale.
        assert!(o.mark_self_down("a", Epoch(1), 10, Millis(1)));
        o.observe("a", Epoch(2), 1, false, Millis(2));
        assert!(!o.heard_up("a", Epoch(2), 2), "another epoch");
        assert!(o.is_down("a"));
        // Silent or notified: not this rule's business.
        let mut o = Origins::new(1000);
        o.observe("b", Epoch(1), 5, false, Millis(0));
        o.expire(Millis(2000));
        assert!(!o.heard_up("b", Epoch(1), 6));
        assert!(!o.heard_up("nobody", Epoch(1), 6));
    }

    #[test]
    fn hub_notice_ignored_when_we_heard_newer() {
        let mut o = Origins::new(1000);
        o.observe("a", Epoch(1), 10, false, Millis(0));
        assert!(!o.notify_down("a", Epoch(1), 9, Millis(1)));
        assert!(o.notify_down("a", Epoch(1), 10, Millis(1)));
        assert!(o.observe("a", Epoch(1), 11, false, Millis(2)).revived);
    }

    #[test]
    fn a_hub_that_saw_the_missed_full_sync_end_revives_the_origin() {
        let mut o = Origins::new(1000);
        o.observe("a", Epoch(1), 5, false, Millis(0));
        o.expire(Millis(2000));
        // It restarted meanwhile; we missed its full sync and only hear its heartbeats.
        assert!(!o.observe("a", Epoch(2), 9, false, Millis(2001)).revived);
        let up = |epoch, last_seq, down| OriginSummary {
            origin: "a".into(),
            epoch: Epoch(epoch),
            last_seq,
            down,
            floor: None,
        };
        assert!(
            !o.apply_summary(&up(2, 4, Some(DownReason::Silent)), Millis(2002)),
            "the hub thinks it down too"
        );
        assert!(o.is_down("a"));
        assert!(o.apply_summary(&up(2, 4, None), Millis(2003)));
        assert!(!o.is_down("a"));
        assert_eq!(o.get("a").map(|i| i.last_seq), Some(9), "never goes back");

        // A hub summary older than a self-announced down does not revive.
        let mut o = Origins::new(1000);
        o.observe("a", Epoch(2), 3, false, Millis(0));
        o.mark_self_down("a", Epoch(2), 8, Millis(1));
        assert!(!o.apply_summary(&up(2, 5, None), Millis(2)));
        assert!(o.is_down("a"));
    }

    #[test]
    fn summaries_merge() {
        let mut o = Origins::new(1000);
        o.observe("a", Epoch(1), 10, false, Millis(0));
        let s = OriginSummary {
            origin: "a".into(),
            epoch: Epoch(1),
            last_seq: 12,
            down: Some(DownReason::SelfAnnounced),
            floor: None,
        };
        assert!(o.apply_summary(&s, Millis(1)));
        assert!(o.is_down("a"));
        let s2 = OriginSummary {
            origin: "a".into(),
            epoch: Epoch(2),
            last_seq: 3,
            down: None,
            floor: None,
        };
        assert!(o.apply_summary(&s2, Millis(2)));
        assert!(!o.is_down("a"));
        assert!(!o.apply_summary(&s, Millis(3)), "older summary ignored");
        assert_eq!(o.summaries().len(), 1);
    }

    #[test]
    fn a_device_update_notes_its_lag_unless_stale() {
        let mut o = Origins::new(1000);
        assert!(
            o.observe_device_update("a", Epoch(2), 1, 70, Millis(100))
                .first
        );
        assert_eq!(o.get("a").and_then(|i| i.lag_ms), Some(30));
        assert!(
            o.observe_device_update("a", Epoch(1), 9, 99, Millis(100))
                .stale
        );
        assert_eq!(
            o.get("a").and_then(|i| i.lag_ms),
            Some(30),
            "stale: not noted"
        );
        o.observe("a", Epoch(2), 2, false, Millis(200));
        assert_eq!(o.get("a").and_then(|i| i.lag_ms), Some(30), "not an update");
        // A clock ahead of ours counts as no lag.
        o.observe_device_update("a", Epoch(2), 3, 500, Millis(300));
        assert_eq!(o.get("a").and_then(|i| i.lag_ms), Some(0));
    }

    proptest::proptest! {
        /// The count of down origins behind `is_down`'s shortcut stays the number of origins
        /// marked down, whatever the sequence of marks and revivals.
        #[test]
        fn the_down_count_follows_the_marks(
            ops in proptest::collection::vec((0u8..6, 0usize..3, 1u64..4, 0u64..12, proptest::bool::ANY), 0..60)
        ) {
            let names = ["a", "b", "c"];
            let mut o = Origins::new(1000);
            for (i, (op, who, epoch, seq, flag)) in ops.into_iter().enumerate() {
                let (who, epoch, now) = (names[who], Epoch(epoch), Millis(i as u64 * 400));
                match op {
                    0 => {
                        o.observe(who, epoch, seq, flag, now);
                    }
                    1 => {
                        o.mark_self_down(who, epoch, seq, now);
                    }
                    2 => {
                        o.heard_up(who, epoch, seq);
                    }
                    3 => {
                        o.notify_down(who, epoch, seq, now);
                    }
                    4 => {
                        o.expire(now);
                    }
                    _ => {
                        let down = flag.then_some(DownReason::Notified);
                        o.apply_summary(
                            &OriginSummary {
                                origin: who.into(),
                                epoch,
                                last_seq: seq,
                                down,
                                floor: None,
                            },
                            now,
                        );
                    }
                }
                let marked = o.map.values().filter(|i| i.down.is_some()).count();
                proptest::prop_assert_eq!(o.downs, marked);
                for n in names {
                    let down = o.get(n).is_some_and(|i| i.down.is_some());
                    proptest::prop_assert_eq!(o.is_down(n), down);
                }
            }
        }
    }

    #[test]
    fn origins_are_listed_in_name_order() {
        let mut o = Origins::new(1000);
        let names = ["pbx-b", "pbx-a", "hub-1", "pbx-c", "a"];
        for n in names {
            o.observe(n, Epoch(1), 1, false, Millis(0));
        }
        let mut sorted = names.to_vec();
        sorted.sort_unstable();
        let listed: Vec<&str> = o.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(listed, sorted);
        let summarised: Vec<String> = o.summaries().into_iter().map(|s| s.origin).collect();
        assert_eq!(summarised, sorted);
        let expired: Vec<String> = o.expire(Millis(5000)).into_iter().map(|e| e.0).collect();
        assert_eq!(expired, sorted);
    }
}
