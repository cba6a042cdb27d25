//! [`Intake`]: what a relay learns of its own Asterisk, let through in an order where an
//! older fact never overwrites a newer one.
//!
//! Three ways bring it facts, each on its own path and with its own delay:
//! - the event stream, in Asterisk's order but possibly far behind (a slow relay reads events
//!   queued long ago), and with a gap when the relay fell behind so far that events were
//!   dropped (then a listing is asked);
//! - listings (a full sync): Asterisk's whole state at the time it answered, later than every
//!   event read before the listing was asked;
//! - queries (`Getvar` of some devices), whose answers are collected and come back whenever
//!   the last one is read.
//!
//! The rules:
//! - While a listing runs, events and answers are held, then replayed after it in order. Those
//!   that came before this listing was asked (a listing asked again, after events were missed
//!   once more) are older than it: dropped for what it names; for devices it does not name
//!   the device is asked again ([`Finished::requery`]), since the missed events may have
//!   changed it.
//! - Events read in order end where Asterisk is, as long as none are missed. A query's answer
//!   is let through only when nothing else said anything of that device since the query was
//!   sent (no event, no listing naming it, no newer query); otherwise it may be older than
//!   what was said (answers take their own way, beside the event stream) and is dropped.

use std::collections::{HashMap, HashSet};

use hintfed_core::{LocalEvent, Value};

/// Events held while a listing runs (beyond: dropped, and the listing is asked again).
pub const MAX_HELD: usize = 65_536;

/// One held fact.
#[derive(Debug)]
struct Held {
    /// The listing that was asked when it arrived.
    listing: u64,
    /// The query it answers, if it is an answer.
    query: Option<u64>,
    event: LocalEvent,
}

/// What a finished listing leaves to do, after the node took the listing itself.
#[derive(Debug, Default, PartialEq)]
pub struct Finished {
    /// The facts held while it ran, in order, each to pass [`Intake::admit`] again.
    pub replay: Vec<(LocalEvent, Option<u64>)>,
    /// Devices to query afresh: named by facts older than the listing that the listing does
    /// not name.
    pub requery: Vec<String>,
    /// Facts were dropped while it ran (more than [`MAX_HELD`]): list again.
    pub overflowed: bool,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Intake {
    /// The number of the latest listing asked.
    listing: u64,
    /// Whether that listing has not finished yet.
    listing_runs: bool,
    held: Vec<Held>,
    overflowed: bool,
    /// Devices queried and not answered yet, with the number of their latest query.
    querying: HashMap<String, u64>,
    query: u64,
}

impl Intake {
    /// A listing is asked (again): returns its number. Any listing still running is
    /// superseded; what is held stays held.
    pub fn listing_asked(&mut self) -> u64 {
        self.listing += 1;
        self.listing_runs = true;
        self.listing
    }

    /// Whether a listing runs (facts are held).
    pub fn listing_runs(&self) -> bool {
        self.listing_runs
    }

    /// Whether `id` is the listing running (not superseded, not finished, not lost).
    pub fn is_running(&self, id: u64) -> bool {
        self.listing_runs && id == self.listing
    }

    /// The listing `id` finished with `items`: `None` when a newer one was asked since (its
    /// result is dropped), else what to do once the node took `items`.
    pub fn listing_finished(&mut self, id: u64, items: &[LocalEvent]) -> Option<Finished> {
        if !self.is_running(id) {
            return None;
        }
        self.listing_runs = false;
        let listed: HashSet<&str> = items.iter().map(|e| e.key.as_str()).collect();
        for k in &listed {
            self.querying.remove(*k);
        }
        let mut done = Finished {
            overflowed: std::mem::take(&mut self.overflowed),
            ..Finished::default()
        };
        for h in std::mem::take(&mut self.held) {
            if h.listing == id {
                done.replay.push((h.event, h.query));
            } else if !listed.contains(h.event.key.as_str()) {
                match h.event.value {
                    Value::Device(_) => done.requery.push(h.event.key),
                    // Every presence state set is listed: one missing was never set.
                    Value::Presence(_) => {}
                }
            }
        }
        done.requery.sort_unstable();
        done.requery.dedup();
        Some(done)
    }

    /// The Asterisk is gone: nothing held or asked is worth anything any more.
    pub fn lost(&mut self) {
        self.listing += 1;
        self.listing_runs = false;
        self.held.clear();
        self.overflowed = false;
        self.querying.clear();
    }

    /// A query of `keys` is sent: returns its number.
    pub fn query_sent(&mut self, keys: &[String]) -> u64 {
        self.query += 1;
        for k in keys {
            self.querying.insert(k.clone(), self.query);
        }
        self.query
    }

    /// The query `id` of `keys` came back, with an answer for some of them: the devices it
    /// could not read are no longer waited for (they stay unknown until their next change).
    pub fn query_unanswered<'a>(&mut self, id: u64, keys: impl IntoIterator<Item = &'a str>) {
        for k in keys {
            if self.querying.get(k) == Some(&id) {
                self.querying.remove(k);
            }
        }
    }

    /// An event (`query` `None`) or a query's answer: `Some` when it is to be taken now,
    /// `None` when it is held (a listing runs) or dropped (something newer was said).
    pub fn admit(&mut self, event: LocalEvent, query: Option<u64>) -> Option<LocalEvent> {
        if self.listing_runs {
            if self.held.len() < MAX_HELD {
                self.held.push(Held {
                    listing: self.listing,
                    query,
                    event,
                });
            } else {
                self.overflowed = true;
            }
            return None;
        }
        let latest = if self.querying.is_empty() {
            None
        } else {
            self.querying.get(&event.key).copied()
        };
        match (query, latest) {
            (None, None) => Some(event),
            (None, Some(_)) => {
                self.querying.remove(&event.key);
                Some(event)
            }
            (Some(q), Some(l)) if q == l => {
                self.querying.remove(&event.key);
                Some(event)
            }
            (Some(_), _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hintfed_core::{DeviceState, Presence, PresenceStatus};

    fn dev(key: &str, s: DeviceState) -> LocalEvent {
        LocalEvent::device(key, s)
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn events_pass_while_no_listing_runs() {
        let mut i = Intake::default();
        let e = dev("PJSIP/1", DeviceState::Busy);
        assert_eq!(i.admit(e.clone(), None), Some(e));
    }

    #[test]
    fn held_facts_are_replayed_in_order_after_their_listing() {
        let mut i = Intake::default();
        let id = i.listing_asked();
        let a = dev("PJSIP/1", DeviceState::Busy);
        let b = dev("PJSIP/1", DeviceState::NotInuse);
        assert_eq!(i.admit(a.clone(), None), None);
        assert_eq!(i.admit(b.clone(), None), None);
        let done = i
            .listing_finished(id, &[dev("PJSIP/1", DeviceState::Inuse)])
            .expect("current listing");
        assert_eq!(done.replay, vec![(a, None), (b, None)]);
        assert!(done.requery.is_empty() && !done.overflowed);
        assert!(!i.is_running(id));
    }

    #[test]
    fn facts_held_before_a_newer_listing_yield_to_it() {
        let mut i = Intake::default();
        let first = i.listing_asked();
        assert_eq!(i.admit(dev("PJSIP/1", DeviceState::Busy), None), None);
        assert_eq!(i.admit(dev("PJSIP/2", DeviceState::Busy), None), None);
        assert_eq!(
            i.admit(
                LocalEvent::presence(
                    "CustomPresence:a",
                    Presence::new(PresenceStatus::Away, "", "")
                ),
                None
            ),
            None
        );
        // Events were missed again: the listing is asked again.
        let second = i.listing_asked();
        let after = dev("PJSIP/1", DeviceState::Ringing);
        assert_eq!(i.admit(after.clone(), None), None);
        assert_eq!(
            i.listing_finished(first, &[]),
            None,
            "a superseded listing's result is dropped"
        );
        let done = i
            .listing_finished(second, &[dev("PJSIP/1", DeviceState::NotInuse)])
            .expect("current listing");
        assert_eq!(
            done.replay,
            vec![(after, None)],
            "only what came after the listing was asked is replayed"
        );
        assert_eq!(
            done.requery,
            keys(&["PJSIP/2"]),
            "a device the listing does not name is asked afresh"
        );
    }

    #[test]
    fn overflow_is_reported_once() {
        let mut i = Intake::default();
        let id = i.listing_asked();
        for _ in 0..=MAX_HELD {
            i.admit(dev("PJSIP/1", DeviceState::Busy), None);
        }
        let done = i.listing_finished(id, &[]).expect("current");
        assert!(done.overflowed);
        assert_eq!(done.replay.len(), MAX_HELD);
        let id = i.listing_asked();
        assert!(!i.listing_finished(id, &[]).expect("current").overflowed);
    }

    #[test]
    fn an_answer_after_an_event_of_its_device_is_dropped() {
        let mut i = Intake::default();
        let q = i.query_sent(&keys(&["PJSIP/1", "PJSIP/2"]));
        let event = dev("PJSIP/1", DeviceState::Inuse);
        assert_eq!(i.admit(event.clone(), None), Some(event));
        assert_eq!(
            i.admit(dev("PJSIP/1", DeviceState::NotInuse), Some(q)),
            None,
            "the event was read after the query was sent"
        );
        let answer = dev("PJSIP/2", DeviceState::Busy);
        assert_eq!(i.admit(answer.clone(), Some(q)), Some(answer));
        assert_eq!(
            i.admit(dev("PJSIP/2", DeviceState::Busy), Some(q)),
            None,
            "one answer per query"
        );
    }

    #[test]
    fn only_the_latest_query_of_a_device_is_believed() {
        let mut i = Intake::default();
        let old = i.query_sent(&keys(&["PJSIP/1"]));
        let new = i.query_sent(&keys(&["PJSIP/1"]));
        assert_eq!(i.admit(dev("PJSIP/1", DeviceState::Busy), Some(old)), None);
        let answer = dev("PJSIP/1", DeviceState::Inuse);
        assert_eq!(i.admit(answer.clone(), Some(new)), Some(answer));
    }

    #[test]
    fn a_listing_naming_a_device_outdates_its_query() {
        let mut i = Intake::default();
        let q = i.query_sent(&keys(&["PJSIP/1", "PJSIP/2"]));
        let id = i.listing_asked();
        // Both answers arrive while the listing runs: held.
        let one = dev("PJSIP/1", DeviceState::Busy);
        let two = dev("PJSIP/2", DeviceState::Busy);
        assert_eq!(i.admit(one.clone(), Some(q)), None);
        assert_eq!(i.admit(two.clone(), Some(q)), None);
        let done = i
            .listing_finished(id, &[dev("PJSIP/1", DeviceState::NotInuse)])
            .expect("current");
        let replayed: Vec<_> = done
            .replay
            .into_iter()
            .filter_map(|(e, q)| i.admit(e, q))
            .collect();
        assert_eq!(
            replayed,
            vec![two],
            "the listing named PJSIP/1, not PJSIP/2"
        );
    }

    #[test]
    fn unanswered_devices_and_a_lost_asterisk_forget_queries() {
        let mut i = Intake::default();
        let q = i.query_sent(&keys(&["PJSIP/1", "PJSIP/2"]));
        i.query_unanswered(q, ["PJSIP/1"]);
        assert!(!i.querying.contains_key("PJSIP/1"));
        assert!(i.querying.contains_key("PJSIP/2"));
        let id = i.listing_asked();
        i.admit(dev("PJSIP/3", DeviceState::Busy), None);
        i.lost();
        assert!(i.querying.is_empty() && !i.is_running(id));
        assert_eq!(
            i.listing_finished(id, &[]),
            None,
            "a listing of a lost link is dropped"
        );
        let id = i.listing_asked();
        assert!(
            i.listing_finished(id, &[])
                .expect("current")
                .replay
                .is_empty()
        );
    }
}
