//! [`WarnLimiter`]: at most N log lines per time window for one kind of warning, counting
//! what it held back, so hostile peers cannot flood the log (each line carries the peer
//! address; the first line after a quiet spell says how many were suppressed).
//!
//! ```
//! use std::time::Duration;
//! use hintfed_daemon::ratelimit::WarnLimiter;
//!
//! let limiter = WarnLimiter::new(2, Duration::from_secs(10));
//! assert_eq!(limiter.allow(), Some(0));
//! assert_eq!(limiter.allow(), Some(0));
//! assert_eq!(limiter.allow(), None); // third within the window: held back and counted
//! ```

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A fixed-window limiter for warnings. Cheap; share it behind an `Arc`.
#[derive(Debug)]
pub struct WarnLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl Default for WarnLimiter {
    /// 10 lines per 10 seconds.
    fn default() -> Self {
        Self::new(10, Duration::from_secs(10))
    }
}

impl WarnLimiter {
    /// At most `per_window` lines every `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window: per_window.max(1),
            window,
            state: Mutex::new(State {
                window_start: None,
                emitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines held back since
    /// the last one logged (put it in the line), `None` to stay quiet (counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`WarnLimiter::allow`] at a given instant (for tests).
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            s.window_start = Some(now);
            s.emitted = 0;
        }
        if s.emitted < self.per_window {
            s.emitted += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_window_and_reports_what_it_held_back() {
        let l = WarnLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(1)), Some(0));
        for i in 0..5 {
            assert_eq!(l.allow_at(t0 + Duration::from_secs(2 + i)), None);
        }
        assert_eq!(l.allow_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(12)), None);
    }
}
