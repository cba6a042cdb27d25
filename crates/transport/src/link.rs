//! Building blocks shared by every supervised socket: status, counters, backoff, size limits,
//! endpoint parsing, conversions between `Vec<Bytes>` and [`zeromq::ZmqMessage`], and the
//! bounded connect attempt that replaces the zeromq crate's unbounded `connect`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketEvent, SocketOptions, ZmqMessage};

use crate::error::TransportError;

/// One multipart message: its frames, in order.
pub type Frames = Vec<Bytes>;

/// Connection status of a supervised link, published on a `tokio::sync::watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    /// No usable connection; the supervisor is (re)connecting with backoff.
    Connecting,
    /// Connected (for bound sockets: listening).
    Connected,
    /// The supervisor has stopped; the link will not come back.
    Closed,
}

/// Counters kept by every supervisor. Cheap to read at any time with [`LinkStats::snapshot`].
#[derive(Debug, Default)]
pub struct LinkStats {
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    dropped_oversize: AtomicU64,
    dropped_inbound_full: AtomicU64,
    dropped_outbound: AtomicU64,
    send_timeouts: AtomicU64,
    silence_timeouts: AtomicU64,
    request_timeouts: AtomicU64,
    refused_connections: AtomicU64,
}

/// A point-in-time copy of [`LinkStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Times the socket was recreated after having been connected once.
    pub reconnects: u64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: u64,
    /// Messages received from the network and delivered (or offered) to the application.
    pub messages_in: u64,
    /// Messages handed to the socket for sending.
    pub messages_out: u64,
    /// Incoming (or outgoing) messages dropped because they exceed the size limits.
    pub dropped_oversize: u64,
    /// Incoming messages dropped because the application's inbound channel was full.
    pub dropped_inbound_full: u64,
    /// Outgoing messages dropped: not connected, queue full, send failed or link lost.
    pub dropped_outbound: u64,
    /// Sends that did not complete within the send deadline (the socket was recreated).
    pub send_timeouts: u64,
    /// Times the peer was silent past the silence timeout (the socket was recreated).
    pub silence_timeouts: u64,
    /// Requests that got no reply within the request timeout (REQ recreated).
    pub request_timeouts: u64,
    /// Incoming TCP connections refused because a bound socket had `max_connections` already.
    pub refused_connections: u64,
}

macro_rules! counter {
    ($($name:ident),*) => {
        impl LinkStats {
            $(pub(crate) fn $name(&self) { self.$name.fetch_add(1, Ordering::Relaxed); })*

            /// Copies every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}
counter!(
    reconnects,
    connect_failures,
    messages_in,
    messages_out,
    dropped_oversize,
    dropped_inbound_full,
    dropped_outbound,
    send_timeouts,
    silence_timeouts,
    request_timeouts,
    refused_connections
);

impl LinkStats {
    /// Counts `n` messages handed to the socket at once.
    pub(crate) fn messages_out_by(&self, n: u64) {
        self.messages_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` outgoing messages dropped at once.
    pub(crate) fn dropped_outbound_by(&self, n: u64) {
        self.dropped_outbound.fetch_add(n, Ordering::Relaxed);
    }
}

/// Capped exponential backoff with jitter, used between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// First delay (default 50 ms).
    pub initial: Duration,
    /// Upper bound of any delay before jitter (default 500 ms; keep it well under 2 s).
    pub max: Duration,
    /// Growth factor per failed attempt (default 2.0).
    pub multiplier: f64,
    /// Random spread applied to each delay, as a fraction: 0.2 means ±20 % (default 0.2).
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// Stateful backoff sequence built from a [`BackoffConfig`].
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    next: Duration,
}

impl Backoff {
    /// Starts a sequence at `config.initial`.
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            next: config.initial,
        }
    }

    /// Returns the next delay (jittered, never above `max * (1 + jitter)`) and grows the base.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next.min(self.config.max);
        self.next = base
            .mul_f64(self.config.multiplier.max(1.0))
            .min(self.config.max);
        let jitter = self.config.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return base;
        }
        let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
        base.mul_f64(factor)
    }

    /// Back to `initial` (after a connection proved stable).
    pub fn reset(&mut self) {
        self.next = self.config.initial;
    }
}

/// Limits applied to every message read from (or written to) the network.
///
/// The zeromq crate itself has **no** message size limit: it buffers a whole multipart message
/// (whatever length the peer announces) before handing it over. These limits make the
/// supervisor drop and count oversize messages so they never reach the application; bound
/// sockets and our own ZMTP clients (`zmtp`: the hub link, the SUB client) additionally
/// enforce them on the wire (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum total payload bytes of one multipart message (default 1 MiB).
    pub max_message_bytes: usize,
    /// Maximum number of frames in one multipart message (default 16).
    pub max_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_frames: 16,
        }
    }
}

impl Limits {
    /// Whether `frames` fits within these limits.
    pub fn accepts(&self, frames: &[Bytes]) -> bool {
        frames.len() <= self.max_frames
            && frames.iter().map(Bytes::len).sum::<usize>() <= self.max_message_bytes
    }
}

/// Default cap on simultaneous peer connections of one bound socket.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Parses `tcp://host:port` into `(host, port)`.
pub fn parse_tcp_endpoint(endpoint: &str) -> Result<(String, u16), TransportError> {
    let invalid = |reason| TransportError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let rest = endpoint
        .strip_prefix("tcp://")
        .ok_or_else(|| invalid("only tcp:// endpoints are supported"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid("missing :port"))?;
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    let port = port.parse::<u16>().map_err(|_| invalid("bad port"))?;
    Ok((host.to_owned(), port))
}

/// Formats `tcp://host:port` (brackets IPv6 literals that lack them).
pub fn tcp_endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("tcp://[{host}]:{port}")
    } else {
        format!("tcp://{host}:{port}")
    }
}

pub(crate) fn to_message(frames: Frames) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

/// Builds a socket and connects it with one bounded attempt (the crate's own `connect`
/// retries a refused connection for up to 30 s with growing delays; we bound it and retry
/// ourselves with a short capped backoff instead).
pub(crate) async fn connect_socket<S: Socket>(
    endpoint: &str,
    attempt_timeout: Duration,
) -> Result<(S, fmpsc::Receiver<SocketEvent>), zeromq::ZmqError> {
    let mut options = SocketOptions::default();
    options.connect_timeout(attempt_timeout);
    let mut socket = S::with_options(options);
    let monitor = socket.monitor();
    socket.connect(endpoint).await?;
    Ok((socket, monitor))
}

/// Whether a monitor event means the (single) peer is gone.
pub(crate) fn is_disconnect(event: Option<&SocketEvent>) -> bool {
    matches!(event, Some(SocketEvent::Disconnected(_)) | None)
}

/// Cancels the supervisor when the last public handle is dropped.
#[derive(Debug)]
pub(crate) struct CancelOnDrop(pub(crate) CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Everything a public handle shares with its supervisor.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) status: tokio::sync::watch::Receiver<LinkStatus>,
    pub(crate) stats: Arc<LinkStats>,
}

impl Shared {
    pub(crate) fn new() -> (Self, tokio::sync::watch::Sender<LinkStatus>) {
        let (tx, rx) = tokio::sync::watch::channel(LinkStatus::Connecting);
        (
            Self {
                status: rx,
                stats: Arc::new(LinkStats::default()),
            },
            tx,
        )
    }

    pub(crate) fn is_connected(&self) -> bool {
        *self.status.borrow() == LinkStatus::Connected
    }

    /// Waits until connected or `timeout` elapses; returns whether connected.
    pub(crate) async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.status.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s == LinkStatus::Connected))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Sleeps for `delay` unless cancelled first; returns false when cancelled.
pub(crate) async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(BackoffConfig {
            jitter: 0.0,
            ..BackoffConfig::default()
        });
        let seq: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, vec![50, 100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 50);
    }

    #[test]
    fn backoff_jitter_stays_in_bounds() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..100 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(600), "{d:?}");
            assert!(d >= Duration::from_millis(40), "{d:?}");
        }
    }

    #[test]
    fn limits() {
        let l = Limits {
            max_message_bytes: 4,
            max_frames: 2,
        };
        assert!(l.accepts(&[Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]));
        assert!(!l.accepts(&[Bytes::from_static(b"abc"), Bytes::from_static(b"de")]));
        assert!(!l.accepts(&[Bytes::new(), Bytes::new(), Bytes::new()]));
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_tcp_endpoint("tcp://hub-1:5560").ok(),
            Some(("hub-1".to_owned(), 5560))
        );
        assert_eq!(
            parse_tcp_endpoint("tcp://[::1]:5560").ok(),
            Some(("[::1]".to_owned(), 5560))
        );
        assert!(parse_tcp_endpoint("ipc://x").is_err());
        assert!(parse_tcp_endpoint("tcp://h:99999").is_err());
        assert!(parse_tcp_endpoint("tcp://:1").is_err());
        assert_eq!(tcp_endpoint("::1", 5), "tcp://[::1]:5");
        assert_eq!(tcp_endpoint("h", 5), "tcp://h:5");
    }
}
