//! Unix signals: SIGINT/SIGTERM cancel a shutdown [`CancellationToken`]; SIGHUP bumps a reload
//! counter that any number of [`ReloadReceiver`]s watch (several SIGHUPs while a reload is in
//! progress coalesce into one more reload). [`drain`] bounds the shutdown work by a grace
//! period. The binary decides what reloads and logs what it did.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
pub use tokio_util::sync::CancellationToken;

/// The signal handles of the process.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Cancelled on the first SIGINT or SIGTERM (or by anyone calling `cancel`).
    pub shutdown: CancellationToken,
    reload_tx: watch::Sender<u64>,
}

/// Receives SIGHUP notifications.
#[derive(Debug, Clone)]
pub struct ReloadReceiver {
    rx: watch::Receiver<u64>,
}

impl ReloadReceiver {
    /// Wait for the next reload request; returns how many SIGHUPs arrived since start, or
    /// `None` when the signal task is gone (the [`Signals`] were dropped).
    pub async fn recv(&mut self) -> Option<u64> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }
}

impl Signals {
    /// Register the handlers and spawn the task that watches them for the life of the
    /// process. Call inside a tokio runtime. Once registered, SIGINT, SIGTERM and SIGHUP no
    /// longer have their default effect: they only act through these handles.
    pub fn install() -> std::io::Result<Self> {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let shutdown = CancellationToken::new();
        let (reload_tx, _) = watch::channel(0u64);
        let this = Self {
            shutdown: shutdown.clone(),
            reload_tx: reload_tx.clone(),
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = int.recv() => {
                        tracing::info!(signal = "SIGINT", "shutdown requested");
                        shutdown.cancel();
                    }
                    Some(()) = term.recv() => {
                        tracing::info!(signal = "SIGTERM", "shutdown requested");
                        shutdown.cancel();
                    }
                    Some(()) = hup.recv() => {
                        tracing::info!(signal = "SIGHUP", "reload requested");
                        reload_tx.send_modify(|n| *n += 1);
                    }
                    // Signal streams do not end; if they ever did, stop watching.
                    else => break,
                }
            }
        });
        Ok(this)
    }

    /// Handles without OS signal handlers (for tests and embedding): cancel the token or call
    /// [`Signals::request_reload`] by hand.
    pub fn manual() -> Self {
        let (reload_tx, _) = watch::channel(0u64);
        Self {
            shutdown: CancellationToken::new(),
            reload_tx,
        }
    }

    /// A receiver of reload requests made after this call.
    pub fn reload_receiver(&self) -> ReloadReceiver {
        ReloadReceiver {
            rx: self.reload_tx.subscribe(),
        }
    }

    /// Request a reload as SIGHUP would.
    pub fn request_reload(&self) {
        self.reload_tx.send_modify(|n| *n += 1);
    }
}

/// The drain did not finish within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("drain did not finish within {0:?}")]
pub struct DrainTimeout(pub Duration);

/// Run the shutdown work `fut` for at most `grace`.
pub async fn drain<F: Future>(grace: Duration, fut: F) -> Result<F::Output, DrainTimeout> {
    tokio::time::timeout(grace, fut)
        .await
        .map_err(|_| DrainTimeout(grace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_bounds_the_work() {
        let ok = drain(Duration::from_secs(5), async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let slow = drain(
            Duration::from_secs(5),
            tokio::time::sleep(Duration::from_secs(60)),
        )
        .await;
        assert_eq!(slow, Err(DrainTimeout(Duration::from_secs(5))));
    }

    #[tokio::test]
    async fn manual_reload_coalesces() {
        let s = Signals::manual();
        let mut rx = s.reload_receiver();
        s.request_reload();
        s.request_reload();
        assert_eq!(rx.recv().await, Some(2));
        s.request_reload();
        assert_eq!(rx.recv().await, Some(3));
        drop(s);
        assert_eq!(rx.recv().await, None);
    }
}
