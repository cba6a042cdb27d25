//! The hub's ROUTER side, speaking ZMTP 3.0 (NULL mechanism) directly on the public listener,
//! like the PUB in `fanout`: inbound messages go from the peer's connection task straight to
//! the application's channel (one task hop), instead of through the size guard's byte-copying
//! proxy, a loopback TCP connection, the `zeromq` crate's ROUTER and a receiver task.
//!
//! Per peer connection two tasks: the reader (greeting and READY exchange bounded in time, then
//! frames with the size [`Limits`] checked on each frame header before its body is buffered,
//! whole messages handed to the application with backpressure) and the writer (replies and
//! pongs queued to this peer, written in batches). Policies, as the guarded `zeromq` ROUTER had
//! them and stricter where the crate had none:
//! - a peer announcing a frame or message beyond the limits is disconnected, counted as
//!   `dropped_oversize`, and warned about (rate-limited) with its address; a message with too
//!   many frames for the application (a REQ peer's delimiter) is dropped and counted;
//! - connections beyond `max_connections` are refused and counted (shared accept loop);
//! - a peer that does not complete its greeting and READY within [`HANDSHAKE_TIMEOUT`] is
//!   closed; peers must be DEALER, REQ or ROUTER sockets (ZeroMQ's compatibility rule);
//! - routing identity: the peer's own (`Identity` in READY, 1 to 255 bytes) when no live
//!   connection uses it, else 16 random bytes (a peer cannot take over another's replies);
//! - replies: a bounded queue per peer (`outbound_capacity` messages); a reply to an identity that
//!   is gone or whose queue is full is dropped and counted (`dropped_outbound`), never waited
//!   for; a write that makes no progress within `send_timeout` closes the connection (counted
//!   as `send_timeouts`), so a peer that never reads cannot hold queued replies (or snapshot
//!   chunks, whose bytes are taken only when written) for long;
//! - the transport's one-frame [`crate::hub::PING`] is answered here with [`crate::hub::PONG`]
//!   and never delivered; ZMTP `PING` commands (libzmq heartbeats) are answered with `PONG`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fanout::{HANDSHAKE_TIMEOUT, WRITE_BATCH};
use crate::guard::{OVERSIZE_WARN, WarnLimit, accept_bounded};
use crate::hub::{PING, PONG, RouterMessage};
use crate::link::{Frames, Limits, LinkStats};
use crate::zmtp::{self, End, Reader, pong_for, properties};

/// Rate limit of the warning about peers closed for not reading.
static STALLED_WARN: WarnLimit = WarnLimit::new();

/// Longest routing identity a peer may choose (ZeroMQ's limit).
const MAX_IDENTITY: usize = 255;

/// One peer's outbound queue, as the reply side sees it.
struct PeerOut {
    tx: mpsc::Sender<Out>,
    /// Which connection registered it (a later connection may take over the identity only
    /// after this one is gone; its end must not remove the newer one).
    conn: u64,
}

/// What a peer's writer sends.
enum Out {
    /// A reply (frames after the identity).
    Message(Frames),
    /// A ZMTP command, already encoded (`PONG`).
    Command(Vec<u8>),
}

type Peers = Arc<std::sync::Mutex<HashMap<Bytes, PeerOut>>>;

fn lock(peers: &Peers) -> std::sync::MutexGuard<'_, HashMap<Bytes, PeerOut>> {
    // Every operation under the lock is a map edit or a non-blocking queue push.
    peers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ROUTER: accepts peers on its listener and routes replies to them by identity.
pub(crate) struct Router {
    peers: Peers,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// What every connection of one ROUTER shares.
#[derive(Clone)]
struct Ctx {
    limits: Limits,
    send_timeout: Duration,
    queue: usize,
    inbound: mpsc::Sender<RouterMessage>,
    peers: Peers,
    next_conn: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Router {
    /// Starts accepting peers on `listener`; their messages go to `inbound`.
    pub(crate) fn start(
        listener: TcpListener,
        limits: Limits,
        max_connections: usize,
        send_timeout: Duration,
        queue: usize,
        stats: Arc<LinkStats>,
        inbound: mpsc::Sender<RouterMessage>,
    ) -> Self {
        let cancel = CancellationToken::new();
        let peers: Peers = Arc::default();
        let ctx = Ctx {
            limits,
            send_timeout,
            queue: queue.max(1),
            inbound,
            peers: peers.clone(),
            next_conn: Arc::new(AtomicU64::new(0)),
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(accept_bounded(
            listener,
            max_connections,
            stats.clone(),
            cancel.clone(),
            move |stream, peer, stats| {
                let ctx = ctx.clone();
                async move { serve(stream, peer, ctx, stats).await }
            },
        ));
        Router {
            peers,
            stats,
            cancel,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Queues `frames` to the peer `identity` without waiting (see the module's policies).
    pub(crate) fn reply(&self, identity: &[u8], frames: Frames) {
        let peers = lock(&self.peers);
        let Some(out) = peers.get(identity) else {
            self.stats.dropped_outbound();
            return;
        };
        match out.tx.try_send(Out::Message(frames)) {
            Ok(()) => self.stats.messages_out(),
            Err(_) => self.stats.dropped_outbound(),
        }
    }

    /// Stops accepting and closes every connection; returns the listener task to await
    /// until the port is released.
    pub(crate) fn close(&self) -> Option<JoinHandle<()>> {
        self.cancel.cancel();
        lock(&self.peers).clear();
        self.task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("peers", &lock(&self.peers).len())
            .finish_non_exhaustive()
    }
}

/// What the peer's READY says: its routing identity if it chose one. Refuses peers that are
/// not DEALER, REQ or ROUTER sockets.
fn peer_ready(body: &[u8]) -> Result<Option<Bytes>, End> {
    let rest = body.strip_prefix(b"\x05READY").ok_or(End::Closed)?;
    let mut socket_ok = false;
    let mut identity = None;
    for p in properties(rest) {
        let (name, value) = p.map_err(|_| End::Closed)?;
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            socket_ok = matches!(value, b"DEALER" | b"REQ" | b"ROUTER");
        } else if name.eq_ignore_ascii_case(b"Identity")
            && !value.is_empty()
            && value.len() <= MAX_IDENTITY
        {
            identity = Some(Bytes::copy_from_slice(value));
        }
    }
    if socket_ok {
        Ok(identity)
    } else {
        Err(End::Closed)
    }
}

/// A DEALER/REQ/ROUTER peer's handshake: its READY names its socket type and maybe an
/// identity.
async fn handshake(
    stream: TcpStream,
    limits: Limits,
) -> Result<(Reader, OwnedWriteHalf, Option<Bytes>), End> {
    let (reader, write, first) =
        zmtp::handshake(stream, limits, &zmtp::ready(b"ROUTER", &[]), 16 * 1024).await?;
    let identity = peer_ready(&first.body)?;
    Ok((reader, write, identity))
}

/// Cancels a token when dropped (ends the other half of a connection).
struct CancelGuard(CancellationToken);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Ctx, stats: Arc<LinkStats>) {
    let _ = stream.set_nodelay(true);
    let (reader, write, chosen) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, ctx.limits)).await {
            Err(_) | Ok(Err(End::Closed)) => return,
            Ok(Err(End::Oversize)) => return oversize(peer, &stats),
            Ok(Ok(parts)) => parts,
        };
    let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(ctx.queue);
    let identity = {
        let mut peers = lock(&ctx.peers);
        let identity = match chosen {
            Some(id) if !peers.contains_key(&id) => id,
            _ => loop {
                let id = Bytes::copy_from_slice(&rand::random::<[u8; 16]>());
                if !peers.contains_key(&id) {
                    break id;
                }
            },
        };
        peers.insert(
            identity.clone(),
            PeerOut {
                tx: tx.clone(),
                conn,
            },
        );
        identity
    };
    // Either half ending ends both: the writer on a failed or stalled write, the reader on
    // close, oversize, or the application gone.
    let done = ctx.cancel.child_token();
    let writer = tokio::spawn(write_loop(
        peer,
        write,
        rx,
        ctx.send_timeout,
        stats.clone(),
        done.clone(),
    ));
    let end = {
        let _done = CancelGuard(done.clone());
        read_loop(reader, &identity, &tx, &ctx, &stats, &done).await
    };
    {
        let mut peers = lock(&ctx.peers);
        if peers.get(&identity).is_some_and(|p| p.conn == conn) {
            peers.remove(&identity);
        }
    }
    drop(tx);
    let _ = writer.await;
    if let End::Oversize = end {
        oversize(peer, &stats);
    }
}

fn oversize(peer: SocketAddr, stats: &LinkStats) {
    stats.dropped_oversize();
    if let Some(held_back) = OVERSIZE_WARN.allow() {
        tracing::warn!(%peer, held_back, "peer announced an oversize ZeroMQ message; connection closed");
    }
}

async fn read_loop(
    mut reader: Reader,
    identity: &Bytes,
    tx: &mpsc::Sender<Out>,
    ctx: &Ctx,
    stats: &LinkStats,
    done: &CancellationToken,
) -> End {
    let limits = ctx.limits;
    let mut frames: Frames = Vec::new();
    let mut message_bytes = 0usize;
    loop {
        let budget = limits.max_message_bytes.saturating_sub(message_bytes);
        let frame = match reader.parse(budget) {
            Err(e) => return e,
            Ok(Some(f)) => f,
            Ok(None) => {
                tokio::select! {
                    r = reader.fill() => if let Err(e) = r { return e },
                    () = done.cancelled() => return End::Closed,
                }
                continue;
            }
        };
        if frame.command {
            answer_command(&frame.body, tx);
            continue;
        }
        message_bytes += frame.body.len();
        frames.push(frame.body);
        // One extra frame for a REQ peer's empty delimiter (dropped below, as before).
        if frames.len() > limits.max_frames + 1 {
            return End::Oversize;
        }
        if frame.more {
            continue;
        }
        let frames = std::mem::take(&mut frames);
        message_bytes = 0;
        if frames.len() == 1 && frames[0] == PING {
            let _ = tx.try_send(Out::Message(vec![Bytes::from_static(PONG)]));
            continue;
        }
        if !limits.accepts(&frames) {
            stats.dropped_oversize();
            continue;
        }
        stats.messages_in();
        // Backpressure: while the application's channel is full this peer is not read.
        let msg = RouterMessage {
            identity: identity.clone(),
            frames,
        };
        tokio::select! {
            r = ctx.inbound.send(msg) => if r.is_err() { return End::Closed },
            () = done.cancelled() => return End::Closed,
        }
    }
}

/// Answers a ZMTP `PING` command (libzmq heartbeats) with `PONG`; other commands are ignored.
fn answer_command(body: &Bytes, tx: &mpsc::Sender<Out>) {
    let Some(rest) = body.strip_prefix(b"\x04PING") else {
        return;
    };
    let _ = tx.try_send(Out::Command(pong_for(rest)));
}

async fn write_loop(
    peer: SocketAddr,
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    send_timeout: Duration,
    stats: Arc<LinkStats>,
    done: CancellationToken,
) {
    let _done = CancelGuard(done.clone());
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            () = done.cancelled() => return,
        };
        let Some(first) = first else { return };
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Out::Command(raw) => out.extend_from_slice(&raw),
                // The frames (a snapshot chunk's in-flight slot) are released here.
                Out::Message(frames) => zmtp::encode_message(&mut out, &frames),
            }
            if out.len() >= WRITE_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        match tokio::time::timeout(send_timeout, write.write_all(&out)).await {
            Ok(Ok(())) => out.clear(),
            Ok(Err(_)) => return,
            Err(_) => {
                stats.send_timeouts();
                stats.dropped_outbound();
                if let Some(held_back) = STALLED_WARN.allow() {
                    tracing::warn!(%peer, held_back, ?send_timeout, "peer does not read its replies; connection closed");
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_frames_with_more_flags() {
        let mut out = Vec::new();
        zmtp::encode_message(
            &mut out,
            &[Bytes::from_static(b"ab"), Bytes::from(vec![7u8; 300])],
        );
        assert_eq!(&out[..4], &[0x01, 2, b'a', b'b']);
        assert_eq!(out[4], 0x02);
        assert_eq!(&out[5..13], &300u64.to_be_bytes());
        assert_eq!(out.len(), 4 + 9 + 300);
    }

    fn ready_body(props: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut b = b"\x05READY".to_vec();
        for (n, v) in props {
            b.push(n.len() as u8);
            b.extend_from_slice(n);
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v);
        }
        b
    }

    #[test]
    fn ready_gives_the_identity_and_checks_the_socket_type() {
        let b = ready_body(&[(b"Socket-Type", b"DEALER"), (b"Identity", b"me")]);
        assert_eq!(peer_ready(&b).ok().flatten().as_deref(), Some(&b"me"[..]));
        let b = ready_body(&[(b"socket-type", b"REQ"), (b"Identity", b"")]);
        assert!(matches!(peer_ready(&b), Ok(None)));
        let b = ready_body(&[(b"Socket-Type", b"PUB")]);
        assert!(peer_ready(&b).is_err());
        assert!(peer_ready(&ready_body(&[])).is_err());
        // Truncated property value.
        let mut b = ready_body(&[(b"Socket-Type", b"DEALER")]);
        b.truncate(b.len() - 1);
        assert!(peer_ready(&b).is_err());
        let mut b = ready_body(&[(b"Socket-Type", b"DEALER")]);
        let n = b.len();
        b[n - 7..n - 6].copy_from_slice(&[0xff]);
        assert!(peer_ready(&b).is_err());
    }
}
