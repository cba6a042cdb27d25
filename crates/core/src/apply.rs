//! The apply path towards one sink (one local Asterisk): a conflating queue with a bounded
//! in-flight window.
//!
//! - **Conflation**: per target only the newest pending value is kept; a key keeps its place
//!   in the queue when its value is replaced.
//! - **Fair order**: targets are dispatched first-queued first; a target whose previous write
//!   is still in flight waits (writes of one target are never reordered) without blocking the
//!   others.
//! - **Window**: at most `in_flight` writes are outstanding; [`ApplyQueue::complete`] frees a
//!   slot.
//! - **Skip**: a write is dropped when the sink already holds the value (tracked from
//!   confirmed writes) or when the same value is already in flight.
//! - **Bound**: at most `max_keys` distinct targets wait. When full, the new target is refused
//!   and the queue is flagged overflowed; the owner (a [`crate::node::Node`]) re-derives every
//!   target from its table once the queue drained, so nothing is lost: the table, not the
//!   queue, is the source of truth.

use std::collections::{HashMap, VecDeque};

use crate::state::Value;

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
}

/// A conflating apply queue for one sink.
#[derive(Clone, Debug, Default)]
pub struct ApplyQueue {
    config: ApplyConfig,
    pending: HashMap<String, Value>,
    order: VecDeque<String>,
    in_flight: HashMap<String, Value>,
    held: HashMap<String, Value>,
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

    /// Asks for `target` to hold `value`.
    pub fn push(&mut self, target: String, value: Value) -> Push {
        let in_flight = self.in_flight.get(&target);
        let already = match in_flight {
            Some(v) => *v == value,
            None => self.held.get(&target) == Some(&value),
        };
        if already {
            self.pending.remove(&target);
            self.stats.skipped += 1;
            return Push::Skipped;
        }
        if let Some(v) = self.pending.get_mut(&target) {
            *v = value;
            self.stats.conflated += 1;
            return Push::Conflated;
        }
        if self.pending.len() >= self.config.max_keys.max(1) {
            self.overflowed = true;
            self.stats.overflowed += 1;
            return Push::Overflow;
        }
        self.order.push_back(target.clone());
        self.pending.insert(target, value);
        Push::Queued
    }

    /// The next write to send, if the window has room and something is pending.
    pub fn next_write(&mut self) -> Option<(String, Value)> {
        if self.in_flight.len() >= self.config.in_flight.max(1) {
            return None;
        }
        let mut rotated = 0;
        let budget = self.order.len();
        while rotated < budget {
            rotated += 1;
            let target = self.order.pop_front()?;
            if !self.pending.contains_key(&target) {
                continue; // skipped or already dispatched
            }
            if self.in_flight.contains_key(&target) {
                self.order.push_back(target);
                continue;
            }
            let Some(value) = self.pending.remove(&target) else {
                continue;
            };
            if self.held.get(&target) == Some(&value) {
                self.stats.skipped += 1;
                continue;
            }
            self.in_flight.insert(target.clone(), value.clone());
            self.stats.dispatched += 1;
            return Some((target, value));
        }
        None
    }

    /// The write to `target` finished. On success the sink now holds the value; on failure
    /// what it holds is unknown. Returns whether a write to `target` was in flight.
    pub fn complete(&mut self, target: &str, ok: bool) -> bool {
        let Some(v) = self.in_flight.remove(target) else {
            return false;
        };
        if ok {
            self.stats.confirmed += 1;
            self.held.insert(target.to_owned(), v);
        } else {
            self.stats.failed += 1;
            self.held.remove(target);
        }
        true
    }

    /// The sink reported (by an event or a listing) that `target` holds `value`. Ignored
    /// while a write to `target` is in flight (its result decides).
    pub fn note_held(&mut self, target: &str, value: &Value) {
        if !self.in_flight.contains_key(target) {
            self.held.insert(target.to_owned(), value.clone());
        }
    }

    /// Forgets what the sink holds (it restarted or reconnected: write everything again).
    pub fn forget_held(&mut self) {
        self.held.clear();
    }

    /// Drops everything: pending, in flight and held (the sink connection is gone).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.order.clear();
        self.in_flight.clear();
        self.held.clear();
    }

    /// What the sink is known to hold for `target`.
    pub fn held(&self, target: &str) -> Option<&Value> {
        self.held.get(target)
    }

    /// Number of targets waiting.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Number of writes outstanding.
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
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
