//! Per-origin stream sequence tracking: deduplication and gap detection.
//!
//! A [`SeqTracker`] knows, for one origin's current epoch, that every sequence up to
//! `contiguous` was received (or covered by a snapshot / full sync) and which sequences above
//! it arrived out of order. A hole below a received sequence is a gap; how long a gap may
//! stay open before a snapshot (or resync) is requested is the caller's choice.

use std::collections::BTreeSet;

use crate::time::{Epoch, Millis};

/// Result of observing one sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    /// Not seen before: process it.
    New,
    /// Already received (or covered).
    Duplicate,
    /// From an older epoch than the tracker's.
    Stale,
}

/// Sequence state of one origin.
#[derive(Clone, Debug)]
pub struct SeqTracker {
    epoch: Epoch,
    contiguous: u64,
    above: BTreeSet<u64>,
    overflow_at: Option<u64>,
    gap_since: Option<Millis>,
}

impl SeqTracker {
    /// Out-of-order sequences remembered before the tracker gives up and reports a gap that
    /// only a snapshot or full sync can close.
    pub const MAX_OUT_OF_ORDER: usize = 4096;

    /// A tracker whose first message is `(epoch, seq)`. With `assume_complete`, everything
    /// before `seq` counts as received (use it when a pending snapshot will cover the past);
    /// otherwise the history before `seq` is a gap.
    pub fn new(epoch: Epoch, seq: u64, assume_complete: bool) -> Self {
        SeqTracker {
            epoch,
            contiguous: if assume_complete {
                seq.saturating_sub(1)
            } else {
                0
            },
            above: BTreeSet::new(),
            overflow_at: None,
            gap_since: None,
        }
    }

    /// The tracker's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Every sequence up to this one was received or covered.
    pub fn contiguous(&self) -> u64 {
        self.contiguous
    }

    /// Highest sequence received or covered.
    pub fn highest(&self) -> u64 {
        self.above.last().copied().unwrap_or(0).max(self.contiguous)
    }

    /// Since when a gap is open, if one is.
    pub fn gap_since(&self) -> Option<Millis> {
        self.gap_since
    }

    /// Moves `contiguous` over what arrived; `from` is where it stood before the change.
    /// A hole that remains above a closed one counts as open since `now`: its messages may
    /// still be on their way (e.g. a republish reordered in flight), and the grace period
    /// of the hole that was closed must not hurry a request for this one.
    fn advance(&mut self, from: u64, now: Millis) {
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        if self.above.first().is_some_and(|s| *s <= self.contiguous) {
            // Only after a cover; O(log n), unlike a retain over every remembered sequence.
            self.above = self.above.split_off(&(self.contiguous + 1));
        }
        if self.above.is_empty() && self.overflow_at.is_none() {
            self.gap_since = None;
        } else if self.gap_since.is_none() || (self.contiguous > from && self.overflow_at.is_none())
        {
            self.gap_since = Some(now);
        }
    }

    fn reset(&mut self, epoch: Epoch) {
        self.epoch = epoch;
        self.contiguous = 0;
        self.above.clear();
        self.overflow_at = None;
        self.gap_since = None;
    }

    /// Records `(epoch, seq)` received at `now`.
    pub fn observe(&mut self, epoch: Epoch, seq: u64, now: Millis) -> SeqStatus {
        // The next sequence of a stream without holes (nearly every message): what the
        // general path below ends with, without inserting it in `above` and taking it out.
        if epoch == self.epoch
            && self.contiguous.checked_add(1) == Some(seq)
            && self.above.is_empty()
            && self.overflow_at.is_none()
        {
            self.contiguous = seq;
            self.gap_since = None;
            return SeqStatus::New;
        }
        self.observe_general(epoch, seq, now)
    }

    /// [`SeqTracker::observe`] without its shortcut (the reference its tests compare it to).
    fn observe_general(&mut self, epoch: Epoch, seq: u64, now: Millis) -> SeqStatus {
        if epoch < self.epoch {
            return SeqStatus::Stale;
        }
        if epoch > self.epoch {
            self.reset(epoch);
        }
        if seq <= self.contiguous || self.above.contains(&seq) {
            return SeqStatus::Duplicate;
        }
        let from = self.contiguous;
        if self.above.len() >= SeqTracker::MAX_OUT_OF_ORDER {
            // Too much out of order: jump and keep a gap open until covered.
            self.above.clear();
            self.contiguous = seq;
            self.overflow_at = Some(seq);
        } else {
            self.above.insert(seq);
        }
        self.advance(from, now);
        SeqStatus::New
    }

    /// Marks everything up to `up_to` in `epoch` as covered (by a snapshot that included it,
    /// or by a full sync that superseded it).
    pub fn cover(&mut self, epoch: Epoch, up_to: u64, now: Millis) {
        if epoch < self.epoch {
            return;
        }
        if epoch > self.epoch {
            self.reset(epoch);
        }
        let from = self.contiguous;
        if up_to > self.contiguous {
            self.contiguous = up_to;
        }
        if self.overflow_at.is_some_and(|at| up_to >= at) {
            self.overflow_at = None;
        }
        self.advance(from, now);
    }

    /// Whether everything of `epoch` up to `seq` was received or covered, with no gap left
    /// open by an overflow.
    pub fn complete_through(&self, epoch: Epoch, seq: u64) -> bool {
        self.epoch == epoch && self.contiguous >= seq && self.overflow_at.is_none()
    }

    /// Covers everything received so far: closes every gap.
    pub fn cover_all(&mut self, now: Millis) {
        let top = self.highest();
        self.overflow_at = None;
        self.cover(self.epoch, top, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_duplicates_and_gaps() {
        let mut t = SeqTracker::new(Epoch(1), 1, false);
        assert_eq!(t.observe(Epoch(1), 1, Millis(0)), SeqStatus::New);
        assert_eq!(t.observe(Epoch(1), 2, Millis(0)), SeqStatus::New);
        assert_eq!(t.observe(Epoch(1), 2, Millis(0)), SeqStatus::Duplicate);
        assert_eq!(t.gap_since(), None);
        assert_eq!(t.observe(Epoch(1), 5, Millis(7)), SeqStatus::New);
        assert_eq!(t.gap_since(), Some(Millis(7)));
        assert_eq!(t.observe(Epoch(1), 5, Millis(8)), SeqStatus::Duplicate);
        assert_eq!(t.observe(Epoch(1), 3, Millis(8)), SeqStatus::New);
        assert_eq!(t.observe(Epoch(1), 4, Millis(9)), SeqStatus::New);
        assert_eq!(t.gap_since(), None, "filled");
        assert_eq!(t.highest(), 5);
        assert_eq!(t.observe(Epoch(0), 9, Millis(9)), SeqStatus::Stale);
    }

    #[test]
    fn first_sight_and_new_epochs() {
        let mut t = SeqTracker::new(Epoch(1), 50, true);
        assert_eq!(t.observe(Epoch(1), 50, Millis(0)), SeqStatus::New);
        assert_eq!(t.gap_since(), None);
        let mut t = SeqTracker::new(Epoch(1), 50, false);
        t.observe(Epoch(1), 50, Millis(0));
        assert!(t.gap_since().is_some());
        t.observe(Epoch(2), 1, Millis(1));
        assert_eq!(t.gap_since(), None, "a new epoch starting at 1 has no gap");
        t.observe(Epoch(3), 3, Millis(1));
        assert!(
            t.gap_since().is_some(),
            "a new epoch starting at 3 missed 1 and 2"
        );
    }

    #[test]
    fn cover_closes_gaps() {
        let mut t = SeqTracker::new(Epoch(1), 1, false);
        t.observe(Epoch(1), 1, Millis(0));
        t.observe(Epoch(1), 4, Millis(0));
        t.cover(Epoch(1), 2, Millis(1));
        assert!(t.gap_since().is_some());
        t.cover(Epoch(1), 3, Millis(1));
        assert_eq!(t.gap_since(), None);
        assert_eq!(t.observe(Epoch(1), 3, Millis(1)), SeqStatus::Duplicate);
        t.observe(Epoch(1), 9, Millis(2));
        t.cover_all(Millis(3));
        assert_eq!(t.gap_since(), None);
    }

    #[test]
    fn a_hole_left_above_a_closed_one_gets_its_own_grace() {
        let mut t = SeqTracker::new(Epoch(1), 1, false);
        t.observe(Epoch(1), 1, Millis(0));
        t.observe(Epoch(1), 3, Millis(0));
        t.observe(Epoch(1), 5, Millis(1));
        assert_eq!(t.gap_since(), Some(Millis(0)));
        t.observe(Epoch(1), 2, Millis(10));
        assert_eq!(t.gap_since(), Some(Millis(10)), "4 is still on its way");
        t.observe(Epoch(1), 7, Millis(11));
        assert_eq!(t.gap_since(), Some(Millis(10)), "the open hole is still 4");
        t.cover(Epoch(1), 5, Millis(20));
        assert_eq!(t.gap_since(), Some(Millis(20)));
        t.observe(Epoch(1), 6, Millis(21));
        assert_eq!(t.gap_since(), None);
    }

    #[test]
    fn out_of_order_is_bounded() {
        let mut t = SeqTracker::new(Epoch(1), 1, true);
        for s in 0..(SeqTracker::MAX_OUT_OF_ORDER as u64 + 10) {
            t.observe(Epoch(1), 10 + 2 * s, Millis(0));
        }
        assert!(t.above.len() <= SeqTracker::MAX_OUT_OF_ORDER);
        assert!(t.gap_since().is_some());
        let top = t.highest();
        t.cover(Epoch(1), top, Millis(1));
        assert_eq!(t.gap_since(), None);
    }

    proptest::proptest! {
        /// The in-order shortcut of `observe` leaves the tracker as the general path does,
        /// with the same answers, over any mix of observations and covers.
        #[test]
        fn observe_agrees_with_its_general_path(
            ops in proptest::collection::vec((0u8..4, 1u64..3, 0u64..40), 0..80),
            start in 0u64..5,
        ) {
            let mut fast = SeqTracker::new(Epoch(1), start + 1, start % 2 == 0);
            let mut general = fast.clone();
            for (i, (op, epoch, seq)) in ops.into_iter().enumerate() {
                let (epoch, now) = (Epoch(epoch), Millis(i as u64));
                if op == 0 {
                    fast.cover(epoch, seq, now);
                    general.cover(epoch, seq, now);
                } else {
                    // Mostly the next one, as a stream without holes sends them.
                    let seq = if op == 1 { seq } else { fast.contiguous + 1 };
                    proptest::prop_assert_eq!(
                        fast.observe(epoch, seq, now),
                        general.observe_general(epoch, seq, now)
                    );
                }
                proptest::prop_assert_eq!(format!("{fast:?}"), format!("{general:?}"));
            }
        }
    }
}
