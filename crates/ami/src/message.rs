//! [`Message`]: one AMI action, response or event.

use std::fmt;

/// One AMI message: `Key: Value` headers in wire order.
///
/// Duplicated keys are kept (several `Output:` or `Variable:` lines), lookups ignore ASCII case
/// as Asterisk does, and values may be empty or contain `: `.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Message {
    headers: Vec<(String, String)>,
}

impl Message {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    /// An action message: `Action: <name>` as its first header.
    pub fn action(name: &str) -> Self {
        Self::new().with("Action", name)
    }

    /// Builder form of [`Message::push`].
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.push(key, value);
        self
    }

    /// Appends a header, keeping any earlier header of the same name.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.headers.push((key.into(), value.into()));
    }

    /// Replaces the value of the first header named `key`, or appends it.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        match self
            .headers
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            Some((_, v)) => *v = value.into(),
            None => self.headers.push((key.to_owned(), value.into())),
        }
    }

    /// Removes every header named `key`; returns how many were removed.
    pub fn remove(&mut self, key: &str) -> usize {
        let before = self.headers.len();
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        before - self.headers.len()
    }

    /// The value of the first header named `key` (ASCII case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of headers named `key`, in wire order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// All headers in wire order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.headers.len()
    }

    /// True when the message has no header.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// `Event:` value, when this is an event.
    pub fn event(&self) -> Option<&str> {
        self.get("Event")
    }

    /// `Response:` value, when this is a response.
    pub fn response(&self) -> Option<&str> {
        self.get("Response")
    }

    /// `Action:` value, when this is an action.
    pub fn action_name(&self) -> Option<&str> {
        self.get("Action")
    }

    /// `ActionID:` value.
    pub fn action_id(&self) -> Option<&str> {
        self.get("ActionID")
    }

    /// True for an event named `name` (ASCII case-insensitive).
    pub fn is_event(&self, name: &str) -> bool {
        self.event().is_some_and(|e| e.eq_ignore_ascii_case(name))
    }
}

impl fmt::Debug for Message {
    /// Headers as a list; the values of `Secret` and `Key` are masked so that a logged login
    /// action never shows a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("Secret") || k.eq_ignore_ascii_case("Key") {
                list.entry(&format_args!("{k}: ****"));
            } else {
                list.entry(&format_args!("{k}: {v}"));
            }
        }
        list.finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Message {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            headers: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_is_case_insensitive_and_keeps_duplicates() {
        let m = Message::new()
            .with("Response", "Success")
            .with("Output", "a")
            .with("output", "b: c");
        assert_eq!(m.get("RESPONSE"), Some("Success"));
        assert_eq!(m.get_all("Output").collect::<Vec<_>>(), vec!["a", "b: c"]);
    }

    #[test]
    fn debug_masks_secrets() {
        let m = Message::action("Login")
            .with("Secret", "hunter2")
            .with("Key", "abc");
        let s = format!("{m:?}");
        assert!(!s.contains("hunter2") && !s.contains("abc"), "{s}");
    }
}
