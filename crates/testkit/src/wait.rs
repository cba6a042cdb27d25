//! Waiting for a condition with a deadline: poll, never sleep a guessed time. Both helpers
//! use tokio's clock, so they also work under `tokio::time::pause()`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_until`] asks its (usually network-bound) condition.
const ASYNC_POLL: Duration = Duration::from_millis(20);
/// How often [`eventually`] asks its (in-memory) condition.
const SYNC_POLL: Duration = Duration::from_millis(5);

/// Polls the async `cond` every 20 ms until it holds or `timeout` passes; returns whether it
/// held (it is asked once more at the deadline).
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ASYNC_POLL).await;
    }
}

/// How long [`eventually`] waits: long enough for a loaded 2-core CI machine, short enough
/// that a broken test fails in seconds.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it holds; panics with `timed out: <what>` after [`DEADLINE`].
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_within(what, DEADLINE, cond).await;
}

/// [`eventually`] with another deadline.
pub async fn eventually_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(SYNC_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_until_reports_whether_the_condition_held() {
        let start = Instant::now();
        assert!(
            wait_until(Duration::from_secs(1), || async {
                start.elapsed() > Duration::from_millis(100)
            })
            .await
        );
        assert!(!wait_until(Duration::from_secs(1), || async { false }).await);
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_returns_once_true_and_panics_after_the_deadline() {
        let start = Instant::now();
        eventually("100 ms", || start.elapsed() > Duration::from_millis(100)).await;
        let never = tokio::spawn(eventually_within("never", Duration::from_secs(1), || false));
        let err = never.await.expect_err("panics");
        assert!(err.is_panic());
    }
}
