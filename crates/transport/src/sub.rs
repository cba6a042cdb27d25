//! [`SubClient`]: a supervised SUB socket for res_zmq_manager's PUB (event) socket.
//!
//! The module's sockets vanish when Asterisk restarts or crashes and come back with the new
//! process. The client recreates its SUB socket whenever the publisher's connection closes
//! (and, optionally, after a silence timeout), reconnecting with a short capped backoff rather
//! than the zeromq crate's own SUB reconnect (whose backoff grows to 30 s).
//!
//! The SUB is our own ZMTP 3.0 client (private module `zmtp`, as the hub link's fan-out):
//! every complete message of one read is delivered at once; a peer that is not a ZMTP 3
//! publisher fails the connect attempt; messages beyond the [`Limits`] are skipped as they
//! arrive (never buffered) and counted as `dropped_oversize`; libzmq's ZMTP `PING`s are
//! answered.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::TransportError;
use crate::link::{
    Backoff, BackoffConfig, CancelOnDrop, Frames, Limits, LinkStats, LinkStatus, Shared,
    StatsSnapshot, parse_tcp_endpoint, sleep_or_cancel,
};
use crate::zmtp::{Conn, ZmtpError};

const STABLE_AFTER: Duration = Duration::from_secs(2);
/// Bound on writing the answer to a ZMTP `PING` (a few bytes; the publisher reads them).
const PONG_TIMEOUT: Duration = Duration::from_secs(1);

/// Configuration of a [`SubClient`].
#[derive(Debug, Clone)]
pub struct SubClientConfig {
    /// The PUB socket, `tcp://host:port` (res_zmq_manager's `addr_evt`).
    pub endpoint: String,
    /// Subscription prefixes (default `["{"]`, which matches every JSON event object).
    pub subscriptions: Vec<String>,
    /// Recreate the socket after this long without any message (default `None`: an idle
    /// Asterisk may legitimately send nothing; disconnects are detected from the connection).
    pub silence_timeout: Option<Duration>,
    /// Bound on one TCP connect attempt (default 250 ms); the ZMTP greeting and READY exchange
    /// after it gets this or 1 s, whichever is longer.
    pub connect_attempt_timeout: Duration,
    /// Delays between reconnect attempts.
    pub backoff: BackoffConfig,
    /// Size limits for received messages.
    pub limits: Limits,
    /// Capacity of the inbound channel (default 8192).
    pub inbound_capacity: usize,
}

impl SubClientConfig {
    /// Defaults for the PUB socket at `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            subscriptions: vec!["{".to_owned()],
            silence_timeout: None,
            connect_attempt_timeout: Duration::from_millis(250),
            backoff: BackoffConfig::default(),
            limits: Limits::default(),
            inbound_capacity: 8192,
        }
    }
}

/// Handle to a supervised SUB socket. Cheap to clone; the task stops when the last clone is
/// dropped or the inbound receiver is dropped.
///
/// Inbound policy: bounded (`inbound_capacity`); when full the newest message is dropped and
/// counted as `dropped_inbound_full` (watch [`SubClient::stats`] and resync when it grows).
#[derive(Debug, Clone)]
pub struct SubClient {
    shared: Shared,
    _cancel: Arc<CancelOnDrop>,
}

impl SubClient {
    /// Spawns the client task (needs a Tokio runtime); messages arrive on the receiver.
    pub fn connect(
        config: SubClientConfig,
    ) -> Result<(Self, mpsc::Receiver<Frames>), TransportError> {
        parse_tcp_endpoint(&config.endpoint)?;
        if config.inbound_capacity == 0 {
            return Err(TransportError::Config("inbound_capacity must be > 0"));
        }
        let (in_tx, in_rx) = mpsc::channel(config.inbound_capacity);
        let (shared, status_tx) = Shared::new();
        let cancel = CancellationToken::new();
        let task = SubTask {
            config,
            inbound: in_tx,
            status_tx,
            stats: shared.stats.clone(),
            cancel: cancel.clone(),
        };
        tokio::spawn(task.run());
        Ok((
            Self {
                shared,
                _cancel: Arc::new(CancelOnDrop(cancel)),
            },
            in_rx,
        ))
    }

    /// A receiver of the connection status.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.shared.status.clone()
    }

    /// Whether the SUB socket is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.is_connected()
    }

    /// Waits until connected or `timeout` elapses; returns whether connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.shared.wait_connected(timeout).await
    }

    /// The client's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

struct SubTask {
    config: SubClientConfig,
    inbound: mpsc::Sender<Frames>,
    status_tx: watch::Sender<LinkStatus>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
}

impl SubTask {
    async fn run(self) {
        let mut backoff = Backoff::new(self.config.backoff);
        let mut connected_once = false;
        loop {
            self.status_tx.send_replace(LinkStatus::Connecting);
            let attempt = Conn::subscriber(
                &self.config.endpoint,
                self.config.connect_attempt_timeout,
                &self.config.subscriptions,
                None,
                self.config.limits,
            );
            let result = tokio::select! {
                r = attempt => r,
                () = self.cancel.cancelled() => break,
                () = self.inbound.closed() => break,
            };
            match result {
                Err(error) => {
                    self.stats.connect_failures();
                    tracing::debug!(endpoint = %self.config.endpoint, %error, "SUB connect attempt failed");
                }
                Ok(mut sub) => {
                    if connected_once {
                        self.stats.reconnects();
                    }
                    connected_once = true;
                    self.status_tx.send_replace(LinkStatus::Connected);
                    let started = Instant::now();
                    let mut last_rx = Instant::now();
                    let silence = self.config.silence_timeout;
                    let mut batch: Vec<Frames> = Vec::new();
                    let stop = loop {
                        let check_at = silence.map(|s| last_rx + s);
                        tokio::select! {
                            () = self.cancel.cancelled() => break true,
                            () = self.inbound.closed() => break true,
                            r = sub.recv(&mut batch, usize::MAX) => match r {
                                Ok(parsed) => {
                                    last_rx = Instant::now();
                                    for _ in 0..parsed.oversize {
                                        self.stats.dropped_oversize();
                                    }
                                    for frames in batch.drain(..) {
                                        self.deliver(frames);
                                    }
                                    if sub.flush(PONG_TIMEOUT).await.is_err() {
                                        tracing::warn!(endpoint = %self.config.endpoint, "SUB could not answer a ZMTP ping; recreating");
                                        break false;
                                    }
                                }
                                Err(ZmtpError::Closed) => {
                                    tracing::warn!(endpoint = %self.config.endpoint, "publisher went away; recreating SUB");
                                    break false;
                                }
                                Err(error) => {
                                    tracing::warn!(endpoint = %self.config.endpoint, %error, "SUB receive failed; recreating");
                                    break false;
                                }
                            },
                            () = sleep_until_opt(check_at) => {
                                self.stats.silence_timeouts();
                                tracing::warn!(endpoint = %self.config.endpoint, "publisher silent; recreating SUB");
                                break false;
                            }
                        }
                    };
                    self.status_tx.send_replace(LinkStatus::Connecting);
                    if stop {
                        break;
                    }
                    if started.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                }
            }
            if !sleep_or_cancel(backoff.next_delay(), &self.cancel).await {
                break;
            }
        }
        self.status_tx.send_replace(LinkStatus::Closed);
    }

    fn deliver(&self, frames: Frames) {
        if !self.config.limits.accepts(&frames) {
            self.stats.dropped_oversize();
            return;
        }
        self.stats.messages_in();
        if let Err(mpsc::error::TrySendError::Full(_)) = self.inbound.try_send(frames) {
            self.stats.dropped_inbound_full();
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
