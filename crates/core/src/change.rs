//! Change suppression: the last value sent for each key, so that a repeated event (a real
//! Asterisk emits every `DeviceStateChange` twice) is not sent again. (The echoes of our own
//! writes are recognised by the apply queue, whose slot per target holds the values written:
//! [`crate::apply::ApplyQueue::is_echo`].)

use std::collections::HashMap;

use crate::state::Value;

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
