//! Time as plain numbers: the core never reads a clock, callers pass `now` in.

use serde::{Deserialize, Serialize};

/// A point in time in milliseconds since an arbitrary, caller-chosen origin.
///
/// Daemons pass wall-clock milliseconds since the Unix epoch (so that hybrid logical clock
/// timestamps are comparable between servers); tests pass a simulated clock. The core only
/// ever compares and subtracts these values and tolerates a clock that steps backwards
/// (differences saturate at zero).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Milliseconds elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// An origin's incarnation number. A new epoch starts whenever the agent (or relay) restarts
/// or its Asterisk connection is restored; epochs of one origin must increase, so they are
/// taken from the wall clock in milliseconds at the start of the incarnation (and at least
/// the previous epoch plus one). A larger epoch supersedes every message of a smaller one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch that follows `self` when a new incarnation starts at `now`.
    pub fn next(self, now: Millis) -> Epoch {
        Epoch(now.0.max(self.0.saturating_add(1)))
    }
}
