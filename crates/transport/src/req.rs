//! [`ReqClient`]: a lazy-pirate REQ client for res_zmq_manager's command (REP) socket.
//!
//! One request in flight at a time. A request waits at most `request_timeout` for its reply
//! (connecting first if needed); on timeout the REQ socket is dropped and recreated (the
//! zeromq crate's REQ cannot send again until it gets a reply, and never reconnects by
//! itself) and the caller gets [`RequestError::Timeout`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::{ReqSocket, SocketEvent, SocketRecv, SocketSend};

use crate::error::{RequestError, TransportError};
use crate::link::{
    Backoff, BackoffConfig, CancelOnDrop, Frames, Limits, LinkStats, LinkStatus, Shared,
    StatsSnapshot, connect_socket, is_disconnect, parse_tcp_endpoint, to_message,
};

/// Configuration of a [`ReqClient`].
#[derive(Debug, Clone)]
pub struct ReqClientConfig {
    /// The REP socket, `tcp://host:port` (res_zmq_manager's `addr_cmd`).
    pub endpoint: String,
    /// How long one request may take, connect included (default 1000 ms, as the original
    /// broker's `request_timeout`).
    pub request_timeout: Duration,
    /// Bound on one connect attempt (default 250 ms).
    pub connect_attempt_timeout: Duration,
    /// Delays between background reconnect attempts while idle.
    pub backoff: BackoffConfig,
    /// Size limits for requests and replies (default 16 MiB, 16 frames: a list reply of a
    /// large PBX is one big JSON frame).
    pub limits: Limits,
    /// Requests that may wait behind the one in flight (default 64).
    pub queue_capacity: usize,
}

impl ReqClientConfig {
    /// Defaults for the REP socket at `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            request_timeout: Duration::from_millis(1000),
            connect_attempt_timeout: Duration::from_millis(250),
            backoff: BackoffConfig::default(),
            limits: Limits {
                max_message_bytes: 16 * 1024 * 1024,
                ..Limits::default()
            },
            queue_capacity: 64,
        }
    }
}

type Job = (Frames, oneshot::Sender<Result<Frames, RequestError>>);

/// Handle to a supervised REQ socket. Cheap to clone; the task stops with the last clone.
///
/// Queue policy: bounded (`queue_capacity`); [`ReqClient::request`] fails at once with
/// [`RequestError::QueueFull`] when full (never waits for space). A request whose caller has
/// gone away (future dropped) before its turn is skipped, not sent.
#[derive(Debug, Clone)]
pub struct ReqClient {
    tx: mpsc::Sender<Job>,
    shared: Shared,
    limits: Limits,
    _cancel: Arc<CancelOnDrop>,
}

impl ReqClient {
    /// Spawns the client task (needs a Tokio runtime). It connects in the background.
    pub fn connect(config: ReqClientConfig) -> Result<Self, TransportError> {
        parse_tcp_endpoint(&config.endpoint)?;
        if config.queue_capacity == 0 || config.request_timeout.is_zero() {
            return Err(TransportError::Config(
                "queue_capacity and request_timeout must be > 0",
            ));
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (shared, status_tx) = Shared::new();
        let cancel = CancellationToken::new();
        let limits = config.limits;
        let task = ReqTask {
            config,
            rx,
            status_tx,
            stats: shared.stats.clone(),
            cancel: cancel.clone(),
            socket: None,
            connected_once: false,
        };
        tokio::spawn(task.run());
        Ok(Self {
            tx,
            limits,
            shared,
            _cancel: Arc::new(CancelOnDrop(cancel)),
        })
    }

    /// Sends one request and waits for its reply (at most `request_timeout` once it is this
    /// request's turn).
    pub async fn request(&self, frames: Frames) -> Result<Frames, RequestError> {
        if frames.is_empty() {
            return Err(RequestError::Empty);
        }
        if !self.limits.accepts(&frames) {
            self.shared.stats.dropped_oversize();
            return Err(RequestError::Oversize);
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx.try_send((frames, reply_tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.shared.stats.dropped_outbound();
                RequestError::QueueFull
            }
            mpsc::error::TrySendError::Closed(_) => RequestError::Closed,
        })?;
        reply_rx.await.unwrap_or(Err(RequestError::Closed))
    }

    /// A receiver of the connection status.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.shared.status.clone()
    }

    /// Whether the REQ socket is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.is_connected()
    }

    /// Waits until connected or `timeout` elapses; returns whether connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.shared.wait_connected(timeout).await
    }

    /// The client's counters (`request_timeouts`, `reconnects`, ...).
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

struct ReqTask {
    config: ReqClientConfig,
    rx: mpsc::Receiver<Job>,
    status_tx: watch::Sender<LinkStatus>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
    socket: Option<(ReqSocket, futures::channel::mpsc::Receiver<SocketEvent>)>,
    connected_once: bool,
}

impl ReqTask {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff);
        let mut retry_at = Instant::now();
        loop {
            if self.socket.is_none() && Instant::now() >= retry_at {
                // Background connect, abandoned as soon as a request arrives (the request
                // then connects by itself within its own deadline).
                enum Step {
                    Connected(
                        Result<
                            (ReqSocket, futures::channel::mpsc::Receiver<SocketEvent>),
                            zeromq::ZmqError,
                        >,
                    ),
                    Job(Option<Job>),
                    Stop,
                }
                let attempt = connect_socket::<ReqSocket>(
                    &self.config.endpoint,
                    self.config.connect_attempt_timeout,
                );
                let step = tokio::select! {
                    r = attempt => Step::Connected(r),
                    job = self.rx.recv() => Step::Job(job),
                    () = self.cancel.cancelled() => Step::Stop,
                };
                match step {
                    Step::Connected(r) => {
                        if self.install(r) {
                            backoff.reset();
                        } else {
                            retry_at = Instant::now() + backoff.next_delay();
                        }
                    }
                    Step::Job(Some(job)) => self.handle(job).await,
                    Step::Job(None) | Step::Stop => break,
                }
                continue;
            }
            tokio::select! {
                () = self.cancel.cancelled() => break,
                job = self.rx.recv() => match job {
                    None => break,
                    Some(job) => self.handle(job).await,
                },
                ev = next_event(&mut self.socket) => {
                    if is_disconnect(ev.as_ref()) {
                        self.drop_socket();
                    }
                }
                () = tokio::time::sleep_until(retry_at), if self.socket.is_none() => {}
            }
        }
        self.status_tx.send_replace(LinkStatus::Closed);
    }

    async fn try_connect(&mut self, attempt: Duration) -> bool {
        let r = connect_socket::<ReqSocket>(&self.config.endpoint, attempt).await;
        self.install(r)
    }

    fn install(
        &mut self,
        r: Result<(ReqSocket, futures::channel::mpsc::Receiver<SocketEvent>), zeromq::ZmqError>,
    ) -> bool {
        match r {
            Ok(sock) => {
                if self.connected_once {
                    self.stats.reconnects();
                }
                self.connected_once = true;
                self.socket = Some(sock);
                self.status_tx.send_replace(LinkStatus::Connected);
                true
            }
            Err(error) => {
                self.stats.connect_failures();
                tracing::debug!(endpoint = %self.config.endpoint, %error, "REQ connect attempt failed");
                false
            }
        }
    }

    fn drop_socket(&mut self) {
        self.socket = None;
        self.status_tx.send_replace(LinkStatus::Connecting);
    }

    async fn handle(&mut self, (frames, reply): Job) {
        if reply.is_closed() {
            return;
        }
        let result = self.exchange(frames).await;
        let _ = reply.send(result);
    }

    async fn exchange(&mut self, frames: Frames) -> Result<Frames, RequestError> {
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(self.config.backoff);
        while self.socket.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(RequestError::NotConnected(timeout));
            }
            let attempt = self.config.connect_attempt_timeout.min(remaining);
            if !self.try_connect(attempt).await {
                let pause = backoff
                    .next_delay()
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
            }
        }
        let msg = to_message(frames).ok_or(RequestError::Empty)?;
        let Some((socket, _)) = self.socket.as_mut() else {
            return Err(RequestError::NotConnected(timeout));
        };
        match tokio::time::timeout_at(deadline, socket.send(msg)).await {
            Ok(Ok(())) => self.stats.messages_out(),
            Ok(Err(error)) => {
                tracing::debug!(%error, "REQ send failed; recreating socket");
                self.stats.dropped_outbound();
                self.drop_socket();
                return Err(RequestError::Disconnected);
            }
            Err(_) => {
                self.stats.request_timeouts();
                self.drop_socket();
                return Err(RequestError::Timeout(timeout));
            }
        }
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Ok(msg)) => {
                let frames = msg.into_vec();
                if self.config.limits.accepts(&frames) {
                    self.stats.messages_in();
                    Ok(frames)
                } else {
                    self.stats.dropped_oversize();
                    Err(RequestError::Oversize)
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "REQ receive failed; recreating socket");
                self.drop_socket();
                Err(RequestError::Disconnected)
            }
            Err(_) => {
                tracing::warn!(endpoint = %self.config.endpoint, ?timeout, "no reply; recreating REQ socket");
                self.stats.request_timeouts();
                self.drop_socket();
                Err(RequestError::Timeout(timeout))
            }
        }
    }
}

async fn next_event(
    socket: &mut Option<(ReqSocket, futures::channel::mpsc::Receiver<SocketEvent>)>,
) -> Option<SocketEvent> {
    match socket {
        Some((_, monitor)) => monitor.next().await,
        None => std::future::pending().await,
    }
}
