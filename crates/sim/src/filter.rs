//! A manager session's event filters, as Asterisk keeps them (`main/manager.c`): the user's
//! `eventfilter` lines of `manager.conf`, copied into each session at login, plus what the
//! session adds with the `Filter` action.
//!
//! A filter is a regular expression run, unanchored, on the whole text of an event as
//! queued for the sessions (`Event:` and `Privilege:` lines first, `\r\n` after each line).
//! A leading `!` makes it exclude (Asterisk's "black" filter). With no filter every event
//! passes; with include filters only, an event passes when one matches; with exclude filters
//! only, when none matches; with both, when an include matches and no exclude does. Filters
//! apply to events only: responses and the items of list actions are written to the
//! session directly and never filtered.
//!
//! The difference, stated: Asterisk compiles with POSIX `regcomp` (basic syntax up to 20.x,
//! extended since the filter rework); the simulator uses the `regex` crate, which reads the
//! usual patterns (literals, `.`, `*`, classes, anchors) the same way.

use regex::Regex;

/// Most filters one session may hold (Asterisk sets no limit; a client adding filters
/// without end must not grow the simulator's memory without end).
pub const MAX_FILTERS: usize = 64;

/// Why a filter was not added.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The pattern does not compile (or compiles too large).
    #[error(transparent)]
    Regex(#[from] regex::Error),
    /// The session holds [`MAX_FILTERS`] already.
    #[error("more than {MAX_FILTERS} filters")]
    TooMany,
}

/// One compiled filter: a pattern without regex syntax is searched as plain text (the same
/// unanchored match, without the regex engine's per-search overhead).
#[derive(Debug, Clone)]
enum Pattern {
    Literal(String),
    Regex(Regex),
}

impl Pattern {
    fn new(pattern: &str) -> Result<Self, regex::Error> {
        let re = Regex::new(pattern)?;
        Ok(if regex::escape(pattern) == pattern {
            Self::Literal(pattern.to_owned())
        } else {
            Self::Regex(re)
        })
    }

    fn is_match(&self, text: &str) -> bool {
        match self {
            Self::Literal(l) => text.contains(l.as_str()),
            Self::Regex(r) => r.is_match(text),
        }
    }
}

/// The filters of one session.
#[derive(Debug, Clone, Default)]
pub struct EventFilters {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

impl EventFilters {
    /// Adds one filter (`!` first: exclude).
    pub fn add(&mut self, filter: &str) -> Result<(), FilterError> {
        if self.include.len() + self.exclude.len() >= MAX_FILTERS {
            return Err(FilterError::TooMany);
        }
        match filter.strip_prefix('!') {
            Some(pattern) => self.exclude.push(Pattern::new(pattern)?),
            None => self.include.push(Pattern::new(filter)?),
        }
        Ok(())
    }

    /// Whether no filter is set (every event passes without looking at its text).
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether an event whose whole text is `text` reaches the session.
    pub fn passes(&self, text: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(text)))
            && !self.exclude.iter().any(|r| r.is_match(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUSTOM: &str =
        "Event: DeviceStateChange\r\nPrivilege: call,all\r\nDevice: Custom:100\r\nState: BUSY\r\n";
    const PHONE: &str =
        "Event: DeviceStateChange\r\nPrivilege: call,all\r\nDevice: PJSIP/100\r\nState: BUSY\r\n";
    const HINT: &str = "Event: ExtensionStatus\r\nPrivilege: call,all\r\nExten: 100\r\n";

    fn filters(list: &[&str]) -> EventFilters {
        let mut f = EventFilters::default();
        for s in list {
            f.add(s).expect("valid filter");
        }
        f
    }

    #[test]
    fn no_filter_passes_everything() {
        let f = filters(&[]);
        assert!(f.is_empty());
        assert!([CUSTOM, PHONE, HINT].iter().all(|t| f.passes(t)));
    }

    #[test]
    fn exclude_only_drops_what_matches() {
        let f = filters(&["!Device: Custom:", "!Event: ExtensionStatus"]);
        assert!(!f.passes(CUSTOM));
        assert!(f.passes(PHONE));
        assert!(!f.passes(HINT));
    }

    #[test]
    fn include_only_keeps_what_matches_and_exclude_wins_over_include() {
        let f = filters(&["Event: DeviceStateChange"]);
        assert!(f.passes(CUSTOM) && f.passes(PHONE) && !f.passes(HINT));
        let f = filters(&["Event: DeviceStateChange", "!Device: Custom:"]);
        assert!(!f.passes(CUSTOM) && f.passes(PHONE) && !f.passes(HINT));
    }

    #[test]
    fn plain_text_filters_match_as_the_regex_does() {
        let plain = Pattern::new("Event: ExtensionStatus").expect("valid");
        assert!(matches!(plain, Pattern::Literal(_)));
        let re = Pattern::new("Device: Custom:.*").expect("valid");
        assert!(matches!(re, Pattern::Regex(_)));
        let regex = Regex::new("Event: ExtensionStatus").expect("valid");
        for text in [CUSTOM, PHONE, HINT, "", "event: extensionstatus"] {
            assert_eq!(plain.is_match(text), regex.is_match(text), "{text:?}");
        }
        assert!(Pattern::new("").expect("valid").is_match("anything"));
    }

    #[test]
    fn a_bad_pattern_is_refused_and_not_added() {
        let mut f = EventFilters::default();
        assert!(matches!(
            f.add("!Device: (Custom"),
            Err(FilterError::Regex(_))
        ));
        assert!(f.is_empty());
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_filters() {
        let mut f = EventFilters::default();
        for i in 0..MAX_FILTERS {
            f.add(&format!("!x{i}")).expect("under the cap");
        }
        assert!(matches!(f.add("!y"), Err(FilterError::TooMany)));
        assert!(f.passes("y"));
    }
}
