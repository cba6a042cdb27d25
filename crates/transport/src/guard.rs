//! A ZMTP-aware TCP front for bound sockets: the zeromq crate has no maximum message size
//! and reserves memory for whatever frame length a peer announces, so a single TCP client
//! announcing a 1 TiB frame aborts the process (verified). Every bound socket of this crate
//! therefore listens through this guard: it accepts the public TCP connections, forwards
//! them byte for byte to the real zeromq socket bound on loopback, and inspects the ZMTP frame
//! headers of the inbound direction, closing (and counting) any connection that announces a
//! frame or message larger than the [`Limits`] allow, before a byte of it is buffered.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::TransportError;
use crate::link::{Limits, LinkStats, parse_tcp_endpoint, tcp_endpoint};

/// Largest ZMTP command body accepted (READY metadata, PING/PONG, SUBSCRIBE in 3.1).
const MAX_COMMAND: u64 = 64 * 1024;
/// ZMTP 3 greeting length.
const GREETING: u64 = 64;

#[derive(Debug, Clone, Copy)]
enum State {
    Greeting { left: u64 },
    Flags,
    Len { flags: u8, left: u8, acc: u64 },
    Body { flags: u8, left: u64 },
}

/// Incremental inspector of one inbound ZMTP byte stream.
#[derive(Debug)]
pub(crate) struct Inspector {
    state: State,
    limits: Limits,
    message_bytes: u64,
    message_frames: usize,
}

/// Rate limit of the guard's warnings: at most one per kind per second (process-wide); the
/// ones held back are counted and reported with the next (a flood must not flood the log).
pub(crate) struct WarnLimit {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    held_back: std::sync::atomic::AtomicU64,
}

impl WarnLimit {
    pub(crate) const fn new() -> Self {
        Self {
            last: std::sync::Mutex::new(None),
            held_back: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last warning)` when a warning may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

pub(crate) static REFUSED_WARN: WarnLimit = WarnLimit::new();
pub(crate) static OVERSIZE_WARN: WarnLimit = WarnLimit::new();

/// A peer announced more than the limits allow.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Violation;

impl Inspector {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            state: State::Greeting { left: GREETING },
            limits,
            message_bytes: 0,
            message_frames: 0,
        }
    }

    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        while !data.is_empty() {
            match self.state {
                State::Greeting { left } => {
                    let n = left.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.state = if n == left {
                        State::Flags
                    } else {
                        State::Greeting { left: left - n }
                    };
                }
                State::Flags => {
                    let flags = data[0];
                    data = &data[1..];
                    let left = if flags & 0x02 != 0 { 8 } else { 1 };
                    self.state = State::Len {
                        flags,
                        left,
                        acc: 0,
                    };
                }
                State::Len { flags, left, acc } => {
                    let acc = (acc << 8) | u64::from(data[0]);
                    data = &data[1..];
                    if left > 1 {
                        self.state = State::Len {
                            flags,
                            left: left - 1,
                            acc,
                        };
                        continue;
                    }
                    self.check(flags, acc)?;
                    self.state = State::Body { flags, left: acc };
                    if acc == 0 {
                        self.end_frame(flags);
                    }
                }
                State::Body { flags, left } => {
                    let n = left.min(data.len() as u64);
                    data = &data[n as usize..];
                    if n == left {
                        self.end_frame(flags);
                    } else {
                        self.state = State::Body {
                            flags,
                            left: left - n,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn check(&mut self, flags: u8, len: u64) -> Result<(), Violation> {
        if flags & 0x04 != 0 {
            return if len <= MAX_COMMAND {
                Ok(())
            } else {
                Err(Violation)
            };
        }
        self.message_bytes = self.message_bytes.saturating_add(len);
        self.message_frames += 1;
        // One extra frame for a REQ peer's empty delimiter.
        if self.message_bytes > self.limits.max_message_bytes as u64
            || self.message_frames > self.limits.max_frames + 1
        {
            return Err(Violation);
        }
        Ok(())
    }

    fn end_frame(&mut self, flags: u8) {
        self.state = State::Flags;
        let command = flags & 0x04 != 0;
        let more = flags & 0x01 != 0;
        if !command && !more {
            self.message_bytes = 0;
            self.message_frames = 0;
        }
    }
}

/// Accepts connections on `listener` until `cancel`, at most `max_connections` at once (more
/// are refused, counted and warned about, rate-limited, with the peer address), and runs
/// `serve` for each one until it ends or `cancel`.
pub(crate) async fn accept_bounded<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<LinkStats>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    stats.refused_connections();
                    if let Some(held_back) = REFUSED_WARN.allow() {
                        tracing::warn!(%peer, max_connections, held_back, "too many connections; refused");
                    }
                    continue;
                };
                let cancel = cancel.clone();
                let work = serve(stream, peer, stats.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = work => {}
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "accept failed"),
        }
    }
}

/// A running guard: public listener → loopback zeromq socket.
#[derive(Debug)]
pub(crate) struct Guard {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Guard {
    /// Starts forwarding connections accepted on `listener` to `inner`.
    pub(crate) fn start(
        listener: TcpListener,
        inner: SocketAddr,
        limits: Limits,
        max_connections: usize,
        stats: Arc<LinkStats>,
    ) -> Self {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_bounded(
            listener,
            max_connections,
            stats,
            cancel.clone(),
            move |stream, peer, stats| async move { forward(stream, peer, inner, limits, &stats).await },
        ));
        Self {
            cancel,
            task: Some(task),
        }
    }

    /// Stops accepting, closes every forwarded connection and waits for the listener to close.
    pub(crate) async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn forward(
    outer: TcpStream,
    peer: SocketAddr,
    inner: SocketAddr,
    limits: Limits,
    stats: &LinkStats,
) {
    let _ = outer.set_nodelay(true);
    let inner_stream = match TcpStream::connect(inner).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot reach the inner socket");
            return;
        }
    };
    let _ = inner_stream.set_nodelay(true);
    let (mut outer_r, mut outer_w) = outer.into_split();
    let (mut inner_r, mut inner_w) = inner_stream.into_split();
    let inbound = async {
        let mut inspector = Inspector::new(limits);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match outer_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if inspector.feed(&buf[..n]).is_err() {
                stats.dropped_oversize();
                if let Some(held_back) = OVERSIZE_WARN.allow() {
                    tracing::warn!(%peer, held_back, "peer announced an oversize ZeroMQ message; connection closed");
                }
                return;
            }
            if inner_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let outbound = async {
        let _ = tokio::io::copy(&mut inner_r, &mut outer_w).await;
    };
    // Whichever direction ends first closes both connections.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
}

/// Binds a public TCP listener for `host:port` (`*` means every IPv4 interface; IPv6
/// literals may be bracketed).
pub(crate) async fn listen(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let host = match host.trim_start_matches('[').trim_end_matches(']') {
        "*" => "0.0.0.0",
        h => h,
    };
    TcpListener::bind((host, port)).await
}

/// Binds the public listener for `endpoint` (`tcp://host:port`), reporting errors with it.
pub(crate) async fn listen_endpoint(
    endpoint: &str,
) -> Result<(TcpListener, String), TransportError> {
    let (host, port) = parse_tcp_endpoint(endpoint)?;
    let listener = listen(&host, port)
        .await
        .map_err(|e| bind_error(endpoint, e))?;
    Ok((listener, host))
}

pub(crate) fn bind_error(endpoint: &str, error: std::io::Error) -> TransportError {
    TransportError::Bind {
        endpoint: endpoint.to_owned(),
        source: zeromq::ZmqError::Network(error),
    }
}

/// Binds `socket` on a loopback ephemeral port and starts a guard forwarding `listener` to
/// it. Returns the guard and the public endpoint (`tcp://host:port`, port resolved).
pub(crate) async fn guard_socket<S: zeromq::Socket>(
    socket: &mut S,
    listener: TcpListener,
    host: &str,
    limits: Limits,
    max_connections: usize,
    stats: Arc<LinkStats>,
) -> Result<(Guard, String), TransportError> {
    let public_port = listener
        .local_addr()
        .map_err(|e| bind_error(host, e))?
        .port();
    let public = tcp_endpoint(
        host.trim_start_matches('[').trim_end_matches(']'),
        public_port,
    );
    let bound = socket
        .bind("tcp://127.0.0.1:0")
        .await
        .map_err(|source| TransportError::Bind {
            endpoint: format!("{public} (loopback side)"),
            source,
        })?;
    let inner_port = match bound {
        zeromq::Endpoint::Tcp(_, p) => p,
        _ => return Err(TransportError::Config("inner socket is not TCP")),
    };
    let inner = SocketAddr::from(([127, 0, 0, 1], inner_port));
    Ok((
        Guard::start(listener, inner, limits, max_connections, stats),
        public,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited_and_count_what_was_held_back() {
        let w = WarnLimit::new();
        assert_eq!(w.allow(), Some(0));
        assert_eq!(w.allow(), None);
        assert_eq!(w.allow(), None);
        // A second later the next warning reports the two held back.
        *w.last.lock().expect("lock") =
            Some(std::time::Instant::now() - std::time::Duration::from_secs(2));
        assert_eq!(w.allow(), Some(2));
    }

    fn limits() -> Limits {
        Limits {
            max_message_bytes: 100,
            max_frames: 2,
        }
    }

    fn greeting() -> Vec<u8> {
        let mut g = vec![0xff];
        g.extend([0u8; 8]);
        g.push(0x7f);
        g.extend([3, 0]);
        g.extend(b"NULL");
        g.resize(64, 0);
        g
    }

    fn short(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![flags, body.len() as u8];
        v.extend(body);
        v
    }

    #[test]
    fn accepts_normal_traffic_split_anywhere() {
        let mut stream = greeting();
        stream.extend(short(0x04, b"\x05READY"));
        stream.extend(short(0x01, b"topic"));
        stream.extend(short(0x00, &[b'x'; 90]));
        // Long-form frame of 50 bytes.
        stream.push(0x02);
        stream.extend(50u64.to_be_bytes());
        stream.extend([b'y'; 50]);
        for cut in 0..stream.len() {
            let mut i = Inspector::new(limits());
            assert_eq!(i.feed(&stream[..cut]), Ok(()), "cut {cut}");
            assert_eq!(i.feed(&stream[cut..]), Ok(()), "cut {cut}");
        }
    }

    #[test]
    fn rejects_huge_announced_frame_before_its_body() {
        let mut stream = greeting();
        stream.push(0x02);
        stream.extend((1u64 << 40).to_be_bytes());
        let mut i = Inspector::new(limits());
        assert_eq!(i.feed(&stream), Err(Violation));
    }

    #[test]
    fn rejects_oversize_multipart_and_too_many_frames() {
        let mut i = Inspector::new(limits());
        let mut s = greeting();
        s.extend(short(0x01, &[0; 60]));
        s.extend(short(0x00, &[0; 60]));
        assert_eq!(i.feed(&s), Err(Violation));

        let mut i = Inspector::new(limits());
        let mut s = greeting();
        for _ in 0..4 {
            s.extend(short(0x01, b"a"));
        }
        assert_eq!(i.feed(&s), Err(Violation));
    }

    #[test]
    fn rejects_huge_command() {
        let mut i = Inspector::new(limits());
        let mut s = greeting();
        s.push(0x06);
        s.extend((MAX_COMMAND + 1).to_be_bytes());
        assert_eq!(i.feed(&s), Err(Violation));
    }
}
