//! Hybrid logical clock: wall-clock milliseconds plus a logical counter, so that timestamps
//! issued by one origin always increase and a write made after seeing another write always
//! orders after it, even with skewed clocks. Ties between origins are broken by origin name
//! ([`wins`]).

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// A hybrid logical clock timestamp. Ordered by `wall`, then `counter`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct HlcTimestamp {
    /// Physical part: wall-clock milliseconds (since the Unix epoch in production).
    pub wall: u64,
    /// Logical part: orders events within the same millisecond.
    pub counter: u32,
}

impl HlcTimestamp {
    /// The smallest timestamp: orders before every timestamp a clock issues.
    pub const ZERO: HlcTimestamp = HlcTimestamp {
        wall: 0,
        counter: 0,
    };
}

/// Whether the write `(a, origin_a)` is newer than `(b, origin_b)`: compares timestamps,
/// and on equal timestamps the lexicographically greater origin name wins. This is a strict
/// total order on distinct `(timestamp, origin)` pairs, so every replica picks the same
/// winner.
pub fn wins(a: HlcTimestamp, origin_a: &str, b: HlcTimestamp, origin_b: &str) -> bool {
    (a, origin_a) > (b, origin_b)
}

/// A hybrid logical clock. Owned by one origin; `now` issues strictly increasing timestamps.
#[derive(Clone, Debug, Default)]
pub struct Hlc {
    last: HlcTimestamp,
}

impl Hlc {
    /// A clock that has issued nothing yet.
    pub fn new() -> Self {
        Hlc::default()
    }

    /// Issues a timestamp for a local event at wall time `wall`: strictly greater than every
    /// timestamp issued or observed before.
    pub fn now(&mut self, wall: Millis) -> HlcTimestamp {
        if wall.0 > self.last.wall {
            self.last = HlcTimestamp {
                wall: wall.0,
                counter: 0,
            };
        } else if self.last.counter == u32::MAX {
            self.last = HlcTimestamp {
                wall: self.last.wall.saturating_add(1),
                counter: 0,
            };
        } else {
            self.last.counter += 1;
        }
        self.last
    }

    /// Takes note of a timestamp received from another origin, so that later local events
    /// order after it. (A peer with a clock far in the future drags this clock along; that is
    /// inherent to hybrid logical clocks, keep servers NTP-synchronised.)
    pub fn observe(&mut self, remote: HlcTimestamp) {
        if remote > self.last {
            self.last = remote;
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> HlcTimestamp {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_strictly_increasing_even_when_the_wall_clock_stalls_or_steps_back() {
        let mut c = Hlc::new();
        let a = c.now(Millis(100));
        let b = c.now(Millis(100));
        let d = c.now(Millis(50));
        let e = c.now(Millis(101));
        assert!(a < b && b < d && d < e);
        assert_eq!(
            e,
            HlcTimestamp {
                wall: 101,
                counter: 0
            }
        );
    }

    #[test]
    fn observe_orders_later_local_events_after_remote_ones() {
        let mut c = Hlc::new();
        c.now(Millis(10));
        let remote = HlcTimestamp {
            wall: 5000,
            counter: 7,
        };
        c.observe(remote);
        let t = c.now(Millis(11));
        assert!(t > remote);
        // Observing something older changes nothing.
        c.observe(HlcTimestamp {
            wall: 1,
            counter: 0,
        });
        assert!(c.now(Millis(12)) > t);
    }

    #[test]
    fn counter_overflow_carries_into_wall() {
        let mut c = Hlc::new();
        c.observe(HlcTimestamp {
            wall: 10,
            counter: u32::MAX,
        });
        assert_eq!(
            c.now(Millis(3)),
            HlcTimestamp {
                wall: 11,
                counter: 0
            }
        );
    }

    #[test]
    fn ties_are_broken_by_origin() {
        let t = HlcTimestamp {
            wall: 1,
            counter: 1,
        };
        assert!(wins(t, "pbx-b", t, "pbx-a"));
        assert!(!wins(t, "pbx-a", t, "pbx-b"));
        assert!(!wins(t, "pbx-a", t, "pbx-a"));
        let later = HlcTimestamp {
            wall: 1,
            counter: 2,
        };
        assert!(wins(later, "pbx-a", t, "pbx-z"));
    }
}
