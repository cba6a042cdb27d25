//! Echo suppression: when hintfed writes a value to its local Asterisk, Asterisk emits an
//! event for that write (possibly twice). The [`EchoSuppressor`] remembers what was written,
//! by key and value, and recognises those events so they are not forwarded as local changes.
//! There is no time window: an event is an echo when it carries a value written for that key
//! and not yet superseded. Expectations are bounded in number (per key and in keys) and in
//! age, so a write whose event never comes cannot be held forever.

use std::collections::{HashMap, VecDeque};

use crate::state::Value;
use crate::time::Millis;

/// Bounds of the echo suppressor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoConfig {
    /// Keys with expectations kept at most (the least recently written is dropped). Default
    /// 100 000.
    pub max_keys: usize,
    /// Expected values kept per key (oldest dropped). Default 8.
    pub max_values_per_key: usize,
    /// Age after which an expectation is dropped, in ms. Default 60 000.
    pub max_age_ms: u64,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            max_keys: 100_000,
            max_values_per_key: 8,
            max_age_ms: 60_000,
        }
    }
}

/// Remembers values written locally and recognises their echoes.
#[derive(Clone, Debug, Default)]
pub struct EchoSuppressor {
    config: EchoConfig,
    keys: HashMap<String, VecDeque<(Value, Millis)>>,
}

impl EchoSuppressor {
    /// An empty suppressor with the given bounds.
    pub fn new(config: EchoConfig) -> Self {
        EchoSuppressor {
            config,
            keys: HashMap::new(),
        }
    }

    /// Records that `value` is being written to `key` at `now`.
    pub fn expect(&mut self, key: &str, value: &Value, now: Millis) {
        if !self.keys.contains_key(key) && self.keys.len() >= self.config.max_keys.max(1) {
            let oldest = self
                .keys
                .iter()
                .min_by_key(|(_, q)| q.back().map(|(_, t)| *t))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.keys.remove(&k);
            }
        }
        // Most keys expect one value at a time: room for one (64 bytes, where the default
        // first allocation of a VecDeque holds four), and no key copy when the key is known.
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_owned(), VecDeque::with_capacity(1));
        }
        let Some(q) = self.keys.get_mut(key) else {
            return;
        };
        q.retain(|(v, _)| v != value);
        q.push_back((value.clone(), now));
        while q.len() > self.config.max_values_per_key.max(1) {
            q.pop_front();
        }
    }

    /// Whether an event saying `key` now holds `value` is the echo of one of our writes.
    ///
    /// On a match, expectations written before the matched one are dropped (Asterisk reports
    /// writes in order, so they are superseded); the matched one stays, so a repeated event
    /// is recognised too. An event with any other value is a real local change: every
    /// expectation for the key is dropped.
    pub fn is_echo(&mut self, key: &str, value: &Value, now: Millis) -> bool {
        let max_age = self.config.max_age_ms;
        let Some(q) = self.keys.get_mut(key) else {
            return false;
        };
        q.retain(|(_, t)| now.since(*t) <= max_age);
        let found = q.iter().position(|(v, _)| v == value);
        match found {
            Some(i) => {
                q.drain(..i);
                true
            }
            None => {
                self.keys.remove(key);
                false
            }
        }
    }

    /// Drops expectations older than the age bound.
    pub fn expire(&mut self, now: Millis) {
        let max_age = self.config.max_age_ms;
        self.keys.retain(|_, q| {
            q.retain(|(_, t)| now.since(*t) <= max_age);
            !q.is_empty()
        });
    }

    /// Drops every expectation (e.g. the local connection was lost).
    pub fn clear(&mut self) {
        self.keys.clear();
    }

    /// Number of keys with expectations.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is expected.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Change suppression: remembers the last value sent for each key, so that a repeated event
/// (real Asterisk emits every DeviceStateChange twice) is not sent again.
#[derive(Clone, Debug, Default)]
pub struct ChangeSuppressor {
    last: HashMap<String, Value>,
}

impl ChangeSuppressor {
    /// An empty suppressor.
    pub fn new() -> Self {
        ChangeSuppressor::default()
    }

    /// Whether sending `value` for `key` would change anything.
    pub fn is_change(&self, key: &str, value: &Value) -> bool {
        self.last.get(key) != Some(value)
    }

    /// Records that `value` was sent for `key`.
    pub fn record(&mut self, key: &str, value: &Value) {
        self.last.insert(key.to_owned(), value.clone());
    }

    /// The last value sent for `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.last.get(key)
    }

    /// Every key and its last sent value.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.last.iter()
    }

    /// Forgets everything (a full sync resends every value).
    pub fn clear(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeviceState::*;

    fn d(s: crate::state::DeviceState) -> Value {
        Value::Device(s)
    }

    #[test]
    fn echo_of_a_write_is_swallowed_even_when_repeated() {
        let mut e = EchoSuppressor::new(EchoConfig::default());
        e.expect("Custom:a", &d(Inuse), Millis(0));
        assert!(e.is_echo("Custom:a", &d(Inuse), Millis(1)));
        assert!(
            e.is_echo("Custom:a", &d(Inuse), Millis(2)),
            "Asterisk repeats events"
        );
        assert!(!e.is_echo("Custom:b", &d(Inuse), Millis(2)));
    }

    #[test]
    fn a_different_value_is_a_real_change_and_clears_expectations() {
        let mut e = EchoSuppressor::new(EchoConfig::default());
        e.expect("k", &d(Inuse), Millis(0));
        assert!(!e.is_echo("k", &d(Busy), Millis(1)));
        assert!(
            !e.is_echo("k", &d(Inuse), Millis(2)),
            "expectation gone after a real change"
        );
    }

    #[test]
    fn pipelined_writes_are_matched_in_order() {
        let mut e = EchoSuppressor::new(EchoConfig::default());
        e.expect("k", &d(Ringing), Millis(0));
        e.expect("k", &d(Inuse), Millis(0));
        e.expect("k", &d(NotInuse), Millis(0));
        assert!(e.is_echo("k", &d(Ringing), Millis(1)));
        assert!(
            e.is_echo("k", &d(NotInuse), Millis(1)),
            "skipped echo (coalesced)"
        );
        assert!(
            !e.is_echo("k", &d(Inuse), Millis(1)),
            "superseded expectation dropped"
        );
    }

    #[test]
    fn bounded_in_age_values_and_keys() {
        let mut e = EchoSuppressor::new(EchoConfig {
            max_keys: 2,
            max_values_per_key: 2,
            max_age_ms: 100,
        });
        e.expect("k", &d(Ringing), Millis(0));
        assert!(!e.is_echo("k", &d(Ringing), Millis(101)));
        e.expect("k", &d(Ringing), Millis(200));
        e.expect("k", &d(Inuse), Millis(200));
        e.expect("k", &d(Busy), Millis(200));
        assert!(
            !e.is_echo("k", &d(Ringing), Millis(201)),
            "only two values kept"
        );
        e.expect("a", &d(Busy), Millis(300));
        e.expect("b", &d(Busy), Millis(301));
        e.expect("c", &d(Busy), Millis(302));
        assert_eq!(e.len(), 2);
        e.expire(Millis(1000));
        assert!(e.is_empty());
    }

    #[test]
    fn change_suppression() {
        let mut c = ChangeSuppressor::new();
        assert!(c.is_change("k", &d(Inuse)));
        c.record("k", &d(Inuse));
        assert!(!c.is_change("k", &d(Inuse)));
        assert!(c.is_change("k", &d(NotInuse)));
        c.clear();
        assert!(c.is_change("k", &d(Inuse)));
    }
}
