//! [`Message`]: one AMI action, response or event.

use std::fmt;
use std::ops::Range;

/// One AMI message: `Key: Value` headers in wire order.
///
/// Duplicated keys are kept (several `Output:` or `Variable:` lines), lookups ignore ASCII case
/// as Asterisk does, and values may be empty or contain `: `.
///
/// The text of every header lives in one string and each header is a pair of ranges into
/// it, so a decoded message costs two allocations however many headers it has.
#[derive(Clone, Default)]
pub struct Message {
    /// Keys and values (and, in a decoded message, the separators and line ends between them).
    text: String,
    /// Per header: where its key and its value are in `text`.
    spans: Vec<Span>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    key_start: usize,
    key_end: usize,
    value_start: usize,
    value_end: usize,
}

impl Span {
    fn key(self) -> Range<usize> {
        self.key_start..self.key_end
    }

    fn value(self) -> Range<usize> {
        self.value_start..self.value_end
    }

    /// Whether this header of `text` is named `key` (ASCII case-insensitive). Compares
    /// bytes: no text is sliced for a header that does not match.
    fn is_named(self, text: &str, key: &str) -> bool {
        text.as_bytes()[self.key()].eq_ignore_ascii_case(key.as_bytes())
    }
}

impl Message {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty message with room for `headers` headers of `bytes` bytes of text in all.
    pub fn with_capacity(bytes: usize, headers: usize) -> Self {
        Message {
            text: String::with_capacity(bytes),
            spans: Vec::with_capacity(headers),
        }
    }

    /// An action message: `Action: <name>` as its first header.
    pub fn action(name: &str) -> Self {
        Self::new().with("Action", name)
    }

    /// Builder form of [`Message::push`].
    #[must_use]
    pub fn with(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.push(key, value);
        self
    }

    /// Appends a header, keeping any earlier header of the same name.
    pub fn push(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let key_start = self.text.len();
        self.text.push_str(key.as_ref());
        let key_end = self.text.len();
        self.text.push_str(value.as_ref());
        self.spans.push(Span {
            key_start,
            key_end,
            value_start: key_end,
            value_end: self.text.len(),
        });
    }

    /// A message of `text` as read, with room for `headers` headers, each added with
    /// [`Message::push_range`].
    pub(crate) fn from_text(text: String, headers: usize) -> Self {
        Message {
            text,
            spans: Vec::with_capacity(headers),
        }
    }

    /// Appends the header whose key and value are these ranges of the text given to
    /// [`Message::from_text`]; each must lie in it, on character boundaries.
    pub(crate) fn push_range(&mut self, key: Range<usize>, value: Range<usize>) {
        debug_assert!(
            self.text.get(key.clone()).is_some() && self.text.get(value.clone()).is_some()
        );
        self.spans.push(Span {
            key_start: key.start,
            key_end: key.end,
            value_start: value.start,
            value_end: value.end,
        });
    }

    fn key_of(&self, s: Span) -> &str {
        &self.text[s.key()]
    }

    fn value_of(&self, s: Span) -> &str {
        &self.text[s.value()]
    }

    /// Replaces the value of the first header named `key`, or appends it.
    pub fn set(&mut self, key: &str, value: impl AsRef<str>) {
        let found = self.spans.iter().position(|&s| s.is_named(&self.text, key));
        match found {
            Some(i) => {
                let value = value.as_ref();
                let s = self.spans[i];
                if s.value_end == self.text.len() {
                    // The last text written: replace in place.
                    self.text.truncate(s.value_start);
                    self.text.push_str(value);
                    self.spans[i].value_end = self.text.len();
                } else {
                    // Move the header to the end of the text; the old bytes stay unused.
                    let key_start = self.text.len();
                    self.text.extend_from_within(s.key());
                    let key_end = self.text.len();
                    self.text.push_str(value);
                    self.spans[i] = Span {
                        key_start,
                        key_end,
                        value_start: key_end,
                        value_end: self.text.len(),
                    };
                }
            }
            None => self.push(key, value),
        }
    }

    /// Removes every header named `key`; returns how many were removed.
    pub fn remove(&mut self, key: &str) -> usize {
        let before = self.spans.len();
        let text = &self.text;
        self.spans.retain(|s| !s.is_named(text, key));
        before - self.spans.len()
    }

    /// The value of the first header named `key` (ASCII case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        let s = *self.spans.iter().find(|&&s| s.is_named(&self.text, key))?;
        Some(self.value_of(s))
    }

    /// Every value of headers named `key`, in wire order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.spans
            .iter()
            .filter(move |&&s| s.is_named(&self.text, key))
            .map(|&s| self.value_of(s))
    }

    /// All headers in wire order, as `(key, value)`.
    pub fn headers(&self) -> Headers<'_> {
        Headers {
            msg: self,
            spans: self.spans.iter(),
        }
    }

    /// The `index`-th header in wire order.
    pub fn header(&self, index: usize) -> Option<(&str, &str)> {
        let s = *self.spans.get(index)?;
        Some((self.key_of(s), self.value_of(s)))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when the message has no header.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Bytes of text held: the keys and values, and in a decoded message the separators and
    /// line ends between them too (a size hint for encoding the message again).
    pub fn text_len(&self) -> usize {
        self.text.len()
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

/// The headers of a [`Message`] in wire order, from [`Message::headers`].
#[derive(Clone, Debug)]
pub struct Headers<'a> {
    msg: &'a Message,
    spans: std::slice::Iter<'a, Span>,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let s = *self.spans.next()?;
        Some((self.msg.key_of(s), self.msg.value_of(s)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl DoubleEndedIterator for Headers<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let s = *self.spans.next_back()?;
        Some((self.msg.key_of(s), self.msg.value_of(s)))
    }
}

impl ExactSizeIterator for Headers<'_> {}

impl PartialEq for Message {
    /// Equal when the headers are, in order (keys compared exactly).
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.headers().eq(other.headers())
    }
}

impl Eq for Message {}

impl fmt::Debug for Message {
    /// Headers as a list; the values of `Secret` and `Key` are masked so that a logged login
    /// action never shows a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (k, v) in self.headers() {
            if k.eq_ignore_ascii_case("Secret") || k.eq_ignore_ascii_case("Key") {
                list.entry(&format_args!("{k}: ****"));
            } else {
                list.entry(&format_args!("{k}: {v}"));
            }
        }
        list.finish()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Message {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = Message::new();
        for (k, v) in iter {
            m.push(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// `get` and `get_all`, which compare keys as bytes, find what a search through
        /// `headers()` finds.
        #[test]
        fn lookups_match_a_search_of_the_headers(
            headers in proptest::collection::vec(("(?i:event|actionid|é|Ü|x)", "[a-zé]{0,3}"), 0..8),
            key in "(?i:event|actionid|é|Ü|x|y)",
        ) {
            let m: Message = headers.into_iter().collect();
            let reference: Vec<&str> = m
                .headers()
                .filter(|(k, _)| k.eq_ignore_ascii_case(&key))
                .map(|(_, v)| v)
                .collect();
            prop_assert_eq!(m.get(&key), reference.first().copied());
            prop_assert_eq!(m.get_all(&key).collect::<Vec<_>>(), reference);
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_keeps_duplicates() {
        let m = Message::new()
            .with("Response", "Success")
            .with("Output", "a")
            .with("output", "b: c");
        assert_eq!(m.get("RESPONSE"), Some("Success"));
        assert_eq!(m.get_all("Output").collect::<Vec<_>>(), vec!["a", "b: c"]);
        assert_eq!(m.header(2), Some(("output", "b: c")));
        assert_eq!(m.header(3), None);
    }

    #[test]
    fn set_replaces_in_place_or_moves_and_remove_drops_every_copy() {
        let mut m = Message::action("Setvar")
            .with("Variable", "V")
            .with("Value", "1");
        m.set("value", "22");
        m.set("variable", "DEVICE_STATE(Custom:x)");
        m.set("ActionID", "7");
        assert_eq!(
            m.headers().collect::<Vec<_>>(),
            vec![
                ("Action", "Setvar"),
                ("Variable", "DEVICE_STATE(Custom:x)"),
                ("Value", "22"),
                ("ActionID", "7"),
            ]
        );
        let same = Message::action("Setvar")
            .with("Variable", "DEVICE_STATE(Custom:x)")
            .with("Value", "22")
            .with("ActionID", "7");
        assert_eq!(m, same, "equality is by headers, not by layout");
        m.push("value", "3");
        assert_eq!(m.remove("VALUE"), 2);
        assert_eq!(m.get("Value"), None);
        assert_eq!(m.len(), 3);
        assert_ne!(m, same);
    }

    #[test]
    fn collects_from_pairs() {
        let m: Message = [("Event", "X"), ("A", "")].into_iter().collect();
        assert_eq!(m.event(), Some("X"));
        assert_eq!(m.get("a"), Some(""));
        assert_eq!(m.headers().len(), 2);
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
