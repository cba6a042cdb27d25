//! The apply path towards one sink (one local Asterisk): a conflating queue with a bounded
//! in-flight window, and what the sink is believed to hold.
//!
//! - **Conflation**: per target only the newest wanted value is kept; a key keeps its place
//!   in the queue when its value is replaced.
//! - **Fair order**: targets are dispatched first-queued first; a target whose previous write
//!   is still in flight waits (writes of one target are never reordered) without blocking the
//!   others.
//! - **Window**: at most `in_flight` writes are outstanding; [`ApplyQueue::complete`] frees a
//!   slot.
//! - **Skip**: a write is dropped when the sink already holds the value (tracked from
//!   confirmed writes and trustworthy observations) or when the same value is already in
//!   flight.
//! - **Observations**: what the sink reports on its own ([`ApplyQueue::note_held`] for live
//!   events, [`ApplyQueue::note_listed`] for listings) is believed only when no write of ours
//!   can be newer: never while a write to the target is in flight or waits, and for a listing
//!   never when a write to the target completed after the listing was asked
//!   ([`ApplyQueue::listing_requested`] marks the write generation). A believed device state
//!   that differs from the wanted one queues the wanted value again (a repair; presence seen
//!   changing is a user's change, left to the federation), at most
//!   [`MAX_REPAIRS`] times per wanted value, so a sink that reports a value other than the
//!   one written cannot make the queue write forever.
//! - **Bound**: at most `max_keys` distinct targets wait. When full, the new target is refused
//!   and the queue is flagged overflowed; the owner (a [`crate::node::Node`]) re-derives every
//!   target from its table once the queue drained, so nothing is lost: the table, not the
//!   queue, is the source of truth.
//!
//! Memory: one slot per target ever written or observed (a shared key and three compact
//! values, ~64 bytes plus the key); the queue order holds a second reference to the key of
//! waiting targets only.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::state::{DeviceState, Value};

/// Repairs (writes queued again because the sink was seen holding another value) per wanted
/// value at most.
pub const MAX_REPAIRS: u8 = 3;

/// Bounds of an apply queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyConfig {
    /// Distinct targets waiting at most. Default 100 000.
    pub max_keys: usize,
    /// Writes outstanding at most (pipelined `Setvar`). Default 8.
    pub in_flight: usize,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_keys: 100_000,
            in_flight: 8,
        }
    }
}

/// What [`ApplyQueue::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued as a new target.
    Queued,
    /// Replaced the pending value of the target.
    Conflated,
    /// Nothing to do: the sink holds (or is being written) that value.
    Skipped,
    /// Refused: the queue is full (flagged overflowed).
    Overflow,
}

/// Counters of an apply queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Writes dispatched.
    pub dispatched: u64,
    /// Pending values replaced by newer ones.
    pub conflated: u64,
    /// Writes skipped because the sink held the value.
    pub skipped: u64,
    /// Targets refused because the queue was full.
    pub overflowed: u64,
    /// Writes confirmed.
    pub confirmed: u64,
    /// Writes failed.
    pub failed: u64,
    /// Writes queued again because the sink was seen holding another value than wanted.
    pub repaired: u64,
    /// Observations not believed (a write of ours to the target was in flight, waiting, or
    /// completed after a listing was asked).
    pub stale_observations: u64,
}

/// A value as a slot keeps it: device states inline, presence boxed (16 bytes, not 56).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Val {
    Device(DeviceState),
    Other(Box<Value>),
}

static INVALID: Value = Value::Device(DeviceState::Invalid);
static UNKNOWN: Value = Value::Device(DeviceState::Unknown);
static UNAVAILABLE: Value = Value::Device(DeviceState::Unavailable);
static NOT_INUSE: Value = Value::Device(DeviceState::NotInuse);
static ONHOLD: Value = Value::Device(DeviceState::Onhold);
static RINGING: Value = Value::Device(DeviceState::Ringing);
static INUSE: Value = Value::Device(DeviceState::Inuse);
static BUSY: Value = Value::Device(DeviceState::Busy);
static RINGINUSE: Value = Value::Device(DeviceState::Ringinuse);

impl Val {
    fn of(v: &Value) -> Val {
        match v {
            Value::Device(s) => Val::Device(*s),
            other => Val::Other(Box::new(other.clone())),
        }
    }

    fn get(&self) -> &Value {
        match self {
            Val::Device(s) => match s {
                DeviceState::Invalid => &INVALID,
                DeviceState::Unknown => &UNKNOWN,
                DeviceState::Unavailable => &UNAVAILABLE,
                DeviceState::NotInuse => &NOT_INUSE,
                DeviceState::Onhold => &ONHOLD,
                DeviceState::Ringing => &RINGING,
                DeviceState::Inuse => &INUSE,
                DeviceState::Busy => &BUSY,
                DeviceState::Ringinuse => &RINGINUSE,
            },
            Val::Other(b) => b,
        }
    }

    fn is(&self, v: &Value) -> bool {
        self.get() == v
    }
}

/// Everything known about one target.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// What the owner last asked the target to hold.
    want: Option<Val>,
    /// What the sink is believed to hold.
    held: Option<Val>,
    /// The value of the write in flight.
    flight: Option<Val>,
    /// `want` waits to be written (the key is in the order).
    pending: bool,
    /// Repairs since `want` last changed.
    repairs: u8,
    /// Write generation of the target's last completed write (0: none).
    done_at: u64,
}

impl Slot {
    fn holds(&self, v: &Value) -> bool {
        self.held.as_ref().is_some_and(|h| h.is(v))
    }
}

/// A conflating apply queue for one sink.
#[derive(Clone, Debug, Default)]
pub struct ApplyQueue {
    config: ApplyConfig,
    slots: HashMap<Arc<str>, Slot>,
    order: VecDeque<Arc<str>>,
    pending: usize,
    in_flight: usize,
    /// Write generation: completed writes so far.
    completions: u64,
    /// Write generation when the listing being taken was asked.
    listing_mark: Option<u64>,
    overflowed: bool,
    stats: ApplyStats,
}

impl ApplyQueue {
    /// An empty queue.
    pub fn new(config: ApplyConfig) -> Self {
        ApplyQueue {
            config,
            ..ApplyQueue::default()
        }
    }

    fn slot_mut(&mut self, target: &str) -> &mut Slot {
        if !self.slots.contains_key(target) {
            self.slots.insert(Arc::from(target), Slot::default());
        }
        self.slots.get_mut(target).expect("inserted just above")
    }

    /// Puts `target` (which has a slot) at the back of the order.
    fn enqueue(&mut self, target: &str) {
        if let Some((key, _)) = self.slots.get_key_value(target) {
            let key = Arc::clone(key);
            self.pending += 1;
            self.order.push_back(key);
        }
    }

    /// Asks for `target` to hold `value`.
    pub fn push(&mut self, target: String, value: Value) -> Push {
        self.push_ref(&target, &value)
    }

    /// [`ApplyQueue::push`] without giving up the key and value.
    pub fn push_ref(&mut self, target: &str, value: &Value) -> Push {
        let full = self.pending >= self.config.max_keys.max(1);
        let slot = self.slot_mut(target);
        if !slot.want.as_ref().is_some_and(|w| w.is(value)) {
            slot.want = Some(Val::of(value));
            slot.repairs = 0;
        }
        let already = match &slot.flight {
            Some(f) => f.is(value),
            None => slot.holds(value),
        };
        if already {
            if slot.pending {
                slot.pending = false;
                self.pending -= 1;
            }
            self.stats.skipped += 1;
            return Push::Skipped;
        }
        if slot.pending {
            self.stats.conflated += 1;
            return Push::Conflated;
        }
        if full {
            self.overflowed = true;
            self.stats.overflowed += 1;
            return Push::Overflow;
        }
        slot.pending = true;
        self.enqueue(target);
        Push::Queued
    }

    /// The next write to send, if the window has room and something is pending.
    pub fn next_write(&mut self) -> Option<(String, Value)> {
        if self.in_flight >= self.config.in_flight.max(1) {
            return None;
        }
        let budget = self.order.len();
        for _ in 0..budget {
            let key = self.order.pop_front()?;
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            if !slot.pending {
                continue; // skipped, or queued twice and already dispatched
            }
            if slot.flight.is_some() {
                self.order.push_back(key);
                continue;
            }
            slot.pending = false;
            self.pending -= 1;
            let Some(want) = slot.want.clone() else {
                continue;
            };
            if slot.holds(want.get()) {
                self.stats.skipped += 1;
                continue;
            }
            let value = want.get().clone();
            slot.flight = Some(want);
            self.in_flight += 1;
            self.stats.dispatched += 1;
            return Some((key.to_string(), value));
        }
        None
    }

    /// The write to `target` finished. On success the sink now holds the value; on failure
    /// what it holds is unknown. Returns whether a write to `target` was in flight.
    pub fn complete(&mut self, target: &str, ok: bool) -> bool {
        let Some(slot) = self.slots.get_mut(target) else {
            return false;
        };
        let Some(v) = slot.flight.take() else {
            return false;
        };
        self.in_flight -= 1;
        self.completions += 1;
        slot.done_at = self.completions;
        if ok {
            self.stats.confirmed += 1;
            slot.held = Some(v);
        } else {
            self.stats.failed += 1;
            slot.held = None;
        }
        true
    }

    /// The sink reported by a live event (not the echo of a write of ours) that `target`
    /// holds `value`. Not believed while a write to `target` is in flight or waits (the
    /// event may be older than that write); otherwise recorded, and when the wanted value is
    /// another one, that is queued again (see the module docs on repairs).
    pub fn note_held(&mut self, target: &str, value: &Value) {
        let slot = self.slot_mut(target);
        if slot.flight.is_some() || slot.pending {
            self.stats.stale_observations += 1;
            return;
        }
        self.observed(target, value);
    }

    /// Marks the write generation at which a listing of the sink is asked: items of that
    /// listing ([`ApplyQueue::note_listed`]) are not believed for targets whose write
    /// completed later. Call when the listing action is sent.
    pub fn listing_requested(&mut self) {
        self.listing_mark = Some(self.completions);
    }

    /// A listing (asked at the last [`ApplyQueue::listing_requested`], or now if none is
    /// marked) arrives: forgets what the sink was believed to hold for every target that the
    /// listing speaks for (no write in flight, none completed after the mark), so that
    /// targets missing from the listing are written again. Follow with
    /// [`ApplyQueue::note_listed`] per item and [`ApplyQueue::listing_done`].
    pub fn listing_begins(&mut self) {
        let mark = self.listing_mark.unwrap_or(self.completions);
        for slot in self.slots.values_mut() {
            if slot.flight.is_none() && slot.done_at <= mark {
                slot.held = None;
            }
        }
    }

    /// One item of a listing says `target` holds `value`. Believed unless a write to
    /// `target` is in flight or completed after the listing was asked; a believed value
    /// other than the wanted one queues the wanted one again.
    pub fn note_listed(&mut self, target: &str, value: &Value) {
        let mark = self.listing_mark.unwrap_or(self.completions);
        let slot = self.slot_mut(target);
        if slot.flight.is_some() || slot.done_at > mark {
            self.stats.stale_observations += 1;
            return;
        }
        self.observed(target, value);
    }

    /// The listing is processed: the mark is dropped.
    pub fn listing_done(&mut self) {
        self.listing_mark = None;
    }

    /// A believed observation of `key` (no write in flight).
    fn observed(&mut self, target: &str, value: &Value) {
        let Some(slot) = self.slots.get_mut(target) else {
            return;
        };
        if !slot.holds(value) {
            slot.held = Some(Val::of(value));
        }
        // Only devices are repaired: a `Custom:` device is ours to write, whereas a presence
        // set locally is a user's change that the federation decides about.
        let differs =
            matches!(value, Value::Device(_)) && slot.want.as_ref().is_some_and(|w| !w.is(value));
        if differs && !slot.pending && slot.repairs < MAX_REPAIRS {
            slot.repairs += 1;
            slot.pending = true;
            self.stats.repaired += 1;
            self.enqueue(target);
        }
    }

    /// Forgets what the sink holds (it restarted or reconnected: write everything again).
    pub fn forget_held(&mut self) {
        for slot in self.slots.values_mut() {
            slot.held = None;
        }
    }

    /// Drops everything: pending, in flight and held (the sink connection is gone).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.order.clear();
        self.pending = 0;
        self.in_flight = 0;
        self.listing_mark = None;
    }

    /// What the sink is known to hold for `target`.
    pub fn held(&self, target: &str) -> Option<&Value> {
        self.slots.get(target)?.held.as_ref().map(Val::get)
    }

    /// Number of targets waiting.
    pub fn pending_len(&self) -> usize {
        self.pending
    }

    /// Number of writes outstanding.
    pub fn in_flight_len(&self) -> usize {
        self.in_flight
    }

    /// Number of targets the queue knows (written, wanted or observed).
    pub fn targets_len(&self) -> usize {
        self.slots.len()
    }

    /// Returns and clears the overflow flag.
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// The counters.
    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeviceState::{self, *};

    fn d(s: DeviceState) -> Value {
        Value::Device(s)
    }

    fn q(max_keys: usize, in_flight: usize) -> ApplyQueue {
        ApplyQueue::new(ApplyConfig {
            max_keys,
            in_flight,
        })
    }

    #[test]
    fn conflates_per_key_and_keeps_position() {
        let mut a = q(10, 1);
        assert_eq!(a.push("x".into(), d(Ringing)), Push::Queued);
        assert_eq!(a.push("y".into(), d(Inuse)), Push::Queued);
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Conflated);
        assert_eq!(a.next_write(), Some(("x".into(), d(Inuse))));
        assert_eq!(a.next_write(), None, "window of one");
        assert!(a.complete("x", true));
        assert_eq!(a.next_write(), Some(("y".into(), d(Inuse))));
        assert!(!a.complete("zz", true));
    }

    #[test]
    fn skips_what_the_sink_holds_or_is_being_written() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Inuse));
        let (t, _) = a.next_write().unwrap();
        assert_eq!(
            a.push("x".into(), d(Inuse)),
            Push::Skipped,
            "same value in flight"
        );
        a.complete(&t, true);
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Skipped, "held");
        assert_eq!(a.push("x".into(), d(Busy)), Push::Queued);
        assert_eq!(
            a.push("x".into(), d(Inuse)),
            Push::Skipped,
            "back to held: pending dropped"
        );
        assert_eq!(a.next_write(), None);
        a.forget_held();
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Queued);
        let (t, _) = a.next_write().unwrap();
        a.complete(&t, false);
        assert_eq!(a.held("x"), None, "failed write: unknown");
        assert_eq!(a.stats().failed, 1);
    }

    #[test]
    fn writes_of_one_target_are_not_reordered_and_do_not_block_others() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        assert_eq!(a.next_write(), Some(("x".into(), d(Ringing))));
        a.push("x".into(), d(Inuse));
        a.push("y".into(), d(Busy));
        assert_eq!(
            a.next_write(),
            Some(("y".into(), d(Busy))),
            "x waits for its write in flight"
        );
        assert_eq!(a.next_write(), None);
        a.complete("x", true);
        assert_eq!(a.next_write(), Some(("x".into(), d(Inuse))));
    }

    #[test]
    fn window_bounds_in_flight() {
        let mut a = q(100, 3);
        for i in 0..10 {
            a.push(format!("k{i}"), d(Inuse));
        }
        let mut got = Vec::new();
        while let Some((t, _)) = a.next_write() {
            got.push(t);
        }
        assert_eq!(got, vec!["k0", "k1", "k2"], "fair: first queued first");
        assert_eq!(a.in_flight_len(), 3);
        a.complete("k1", true);
        assert_eq!(a.next_write().unwrap().0, "k3");
    }

    #[test]
    fn random_pushes_end_with_the_last_value_per_key_and_respect_the_window() {
        use proptest::prelude::*;
        let states = [Inuse, NotInuse, Busy, Ringing];
        proptest!(ProptestConfig::with_cases(200), |(
            ops in proptest::collection::vec((0..5usize, 0..4usize, any::<bool>()), 1..60),
            window in 1..4usize,
        )| {
            let mut a = q(100, window);
            let mut last = std::collections::HashMap::new();
            let mut in_flight: Vec<String> = Vec::new();
            for (k, s, complete) in ops {
                let key = format!("k{k}");
                a.push(key.clone(), d(states[s]));
                last.insert(key, d(states[s]));
                while let Some((t, _)) = a.next_write() {
                    prop_assert!(!in_flight.contains(&t), "one write per target at a time");
                    in_flight.push(t);
                }
                prop_assert!(a.in_flight_len() <= window);
                if complete && !in_flight.is_empty() {
                    let t = in_flight.remove(0);
                    a.complete(&t, true);
                }
            }
            // Drain everything.
            loop {
                while let Some((t, _)) = a.next_write() {
                    in_flight.push(t);
                }
                if in_flight.is_empty() {
                    break;
                }
                let t = in_flight.remove(0);
                a.complete(&t, true);
            }
            for (k, v) in last {
                prop_assert_eq!(a.held(&k), Some(&v));
            }
        });
    }

    /// Dispatches and confirms everything pending; returns the writes in order.
    fn drain(a: &mut ApplyQueue) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some((t, v)) = a.next_write() {
            a.complete(&t, true);
            out.push((t, v));
        }
        out
    }

    #[test]
    fn a_listing_older_than_a_completed_write_is_not_believed() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        drain(&mut a);
        // The listing is asked while x holds RINGING...
        a.listing_requested();
        // ...then x is written INUSE and confirmed before the listing arrives.
        a.push("x".into(), d(Inuse));
        assert_eq!(drain(&mut a), vec![("x".into(), d(Inuse))]);
        a.listing_begins();
        a.note_listed("x", &d(Ringing));
        a.listing_done();
        assert_eq!(a.held("x"), Some(&d(Inuse)), "the confirmation is newer");
        assert_eq!(a.stats().stale_observations, 1);
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Skipped);
        assert_eq!(a.next_write(), None);
        // The same listing item for a target written before the mark is believed, and since
        // it is not what is wanted, the wanted value is written again.
        a.push("y".into(), d(Busy));
        drain(&mut a);
        a.listing_requested();
        a.listing_begins();
        a.note_listed("y", &d(NotInuse));
        a.listing_done();
        assert_eq!(a.held("y"), Some(&d(NotInuse)));
        assert_eq!(drain(&mut a), vec![("y".into(), d(Busy))]);
    }

    #[test]
    fn a_listing_ignores_writes_in_flight_and_forgets_targets_it_does_not_name() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        a.push("y".into(), d(Busy));
        drain(&mut a);
        a.push("x".into(), d(Inuse));
        let w = a.next_write().unwrap();
        a.listing_requested();
        a.listing_begins();
        a.note_listed("x", &d(Ringing));
        a.listing_done();
        assert_eq!(a.held("y"), None, "not listed: unknown, written again");
        a.complete(&w.0, true);
        assert_eq!(a.held("x"), Some(&d(Inuse)));
        assert_eq!(a.push("y".into(), d(Busy)), Push::Queued);
        // Without a mark a listing is taken as current (but never over a write in flight).
        a.listing_begins();
        a.note_listed("x", &d(Inuse));
        a.listing_done();
        assert_eq!(a.held("x"), Some(&d(Inuse)));
    }

    #[test]
    fn a_live_event_is_not_believed_over_a_waiting_or_flying_write() {
        let mut a = q(10, 1);
        a.push("x".into(), d(Inuse));
        drain(&mut a);
        a.push("x".into(), d(Busy));
        a.push("y".into(), d(Busy));
        assert_eq!(a.next_write(), Some(("x".into(), d(Busy))));
        // A late event of the earlier INUSE while BUSY flies, and one saying BUSY for y
        // while y still waits: neither may decide.
        a.note_held("x", &d(Inuse));
        a.note_held("y", &d(Busy));
        assert_eq!(a.stats().stale_observations, 2);
        a.complete("x", true);
        assert_eq!(a.held("x"), Some(&d(Busy)));
        assert_eq!(
            a.next_write(),
            Some(("y".into(), d(Busy))),
            "y is written although an event said it held BUSY"
        );
    }

    #[test]
    fn a_sink_seen_drifting_from_the_wanted_value_is_repaired_a_bounded_number_of_times() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Inuse));
        drain(&mut a);
        a.note_held("x", &d(Inuse));
        assert_eq!(a.next_write(), None, "as wanted: nothing to do");
        for _ in 0..MAX_REPAIRS {
            a.note_held("x", &d(NotInuse));
            assert_eq!(a.held("x"), Some(&d(NotInuse)));
            assert_eq!(drain(&mut a), vec![("x".into(), d(Inuse))], "repaired");
        }
        a.note_held("x", &d(NotInuse));
        assert_eq!(
            a.next_write(),
            None,
            "a sink that keeps disagreeing is left alone"
        );
        assert_eq!(a.stats().repaired, u64::from(MAX_REPAIRS));
        // A new wanted value starts over.
        a.push("x".into(), d(Busy));
        drain(&mut a);
        a.note_held("x", &d(Ringing));
        assert_eq!(drain(&mut a), vec![("x".into(), d(Busy))]);
        // Targets nobody wants are only recorded.
        a.note_held("z", &d(Inuse));
        assert_eq!(a.held("z"), Some(&d(Inuse)));
        assert_eq!(a.next_write(), None);
        assert_eq!(a.push("z".into(), d(Inuse)), Push::Skipped);
    }

    #[test]
    fn presence_values_round_trip_through_the_compact_slot() {
        use crate::state::{Presence, PresenceStatus};
        let p = Value::Presence(Presence {
            status: PresenceStatus::Away,
            subtype: "lunch".into(),
            message: "back at 2".into(),
        });
        let mut a = q(10, 4);
        a.push("CustomPresence:alice".into(), p.clone());
        assert_eq!(
            drain(&mut a),
            vec![("CustomPresence:alice".into(), p.clone())]
        );
        assert_eq!(a.held("CustomPresence:alice"), Some(&p));
        assert_eq!(a.push("CustomPresence:alice".into(), p), Push::Skipped);
        assert_eq!(a.targets_len(), 1);
    }

    #[test]
    fn full_queue_refuses_and_flags() {
        let mut a = q(2, 1);
        a.push("a".into(), d(Inuse));
        a.push("b".into(), d(Inuse));
        assert_eq!(a.push("c".into(), d(Inuse)), Push::Overflow);
        assert_eq!(
            a.push("a".into(), d(Busy)),
            Push::Conflated,
            "existing keys still conflate"
        );
        assert!(a.take_overflow());
        assert!(!a.take_overflow());
        a.clear();
        assert_eq!(a.pending_len(), 0);
    }
}
