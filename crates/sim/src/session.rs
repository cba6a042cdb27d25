//! One AMI connection: the banner, then actions in and responses and events out.
//!
//! The session task owns the socket, split in halves: it reads actions through [`AmiCodec`]
//! (bounded by [`SimConfig::limits`](crate::SimConfig)), answers them through
//! [`crate::actions`], and forwards the events queued for it (the server queues only what
//! passes its `Events` mask and filters; an event's bytes are encoded once for every
//! session). Answers and events are queued in one buffer and written from it: each answer
//! and each event on its own, as Asterisk does, unless
//! [`SimConfig::coalesce_writes`](crate::SimConfig) asks for one write of what is ready
//! together (flushed once no event and no action waits).
//! Every write is bounded by the configured `writetimeout`; a session that cannot keep up with
//! the event stream is closed. A decoding error (garbage, oversize input) closes only this
//! connection. Warnings about a bad peer (bad input, slow reader) name its address and are
//! rate-limited process-wide ([`WARNINGS_PER_WINDOW`] per [`WARN_WINDOW`]; the next one logged
//! counts those held back).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use futures::{FutureExt as _, StreamExt};
use hintfed_ami::codec::encode_headers;
use hintfed_ami::{AmiCodec, CodecError, Frame, Message, encode_message};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::FramedRead;

use crate::event::{self, SimEvent};
use crate::server::{Shared, Subscriber};

/// The login banner (AMI version 13.0.0, what Asterisk 13 to 23 announce).
pub const BANNER: &str = "Asterisk Call Manager/13.0.0\r\n";

/// Most warnings about bad peers logged per [`WARN_WINDOW`].
pub const WARNINGS_PER_WINDOW: u32 = 10;
/// The window of [`WARNINGS_PER_WINDOW`].
pub const WARN_WINDOW: Duration = Duration::from_secs(10);

/// (window start, logged in this window, held back since the last logged).
type Budget = Mutex<(Option<Instant>, u32, u64)>;

static WARN_BUDGET: Budget = Mutex::new((None, 0, 0));

/// Whether a warning about a peer may be logged now: `Some(held back so far)`, or `None`
/// (counted).
fn warn_allowed(budget: &Budget, now: Instant) -> Option<u64> {
    let mut b = budget.lock().unwrap_or_else(PoisonError::into_inner);
    if b.0
        .is_none_or(|start| now.saturating_duration_since(start) >= WARN_WINDOW)
    {
        b.0 = Some(now);
        b.1 = 0;
    }
    if b.1 < WARNINGS_PER_WINDOW {
        b.1 += 1;
        Some(std::mem::take(&mut b.2))
    } else {
        b.2 += 1;
        None
    }
}

/// A rate-limited warning about `peer`.
fn warn_peer(id: u64, peer: SocketAddr, problem: &str, detail: &str) {
    if let Some(suppressed) = warn_allowed(&WARN_BUDGET, Instant::now()) {
        tracing::warn!(session = id, %peer, detail, suppressed, "{problem}: closing connection");
    }
}

/// Per-connection state the actions read and change.
pub(crate) struct SessionCtx {
    pub(crate) id: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) authenticated: bool,
    pub(crate) challenge: Option<String>,
    /// `send_events`: the classes this session wants (copied into `sub` on change).
    pub(crate) mask: u32,
    /// Event filters: the user's `eventfilter` lines from login on, plus `Filter` actions
    /// (copied into `sub` on change).
    pub(crate) filters: crate::filter::EventFilters,
    /// Blackhole of this connection only (`SimBlackhole` with `Scope: connection`).
    pub(crate) blackhole_until: Option<Instant>,
    /// The session's event queue, from login on.
    pub(crate) sub: Option<Arc<Subscriber>>,
    /// Notified by the queue when events wait (never before login).
    pub(crate) ready: Arc<tokio::sync::Notify>,
}

/// What an action asks the session to do.
pub(crate) struct Outcome {
    pub(crate) replies: Replies,
    pub(crate) close: bool,
}

/// An action's answers: most actions answer with one message, kept without a `Vec` of its
/// own.
pub(crate) enum Replies {
    One(Message),
    /// `astman_send_ack` (`Response: Success`, the action's non-empty `ActionID`, `Message`),
    /// encoded straight from its parts by the writer (the answer of every `Setvar`).
    Ack {
        id: Option<CompactString>,
        message: &'static str,
    },
    Many(Vec<Message>),
}

impl IntoIterator for Replies {
    type Item = Out;
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<Out>,
        std::iter::Map<std::vec::IntoIter<Message>, fn(Message) -> Out>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        let (one, many) = match self {
            Self::One(m) => (Some(Out::Message(m)), Vec::new()),
            Self::Ack { id, message } => (Some(Out::Ack { id, message }), Vec::new()),
            Self::Many(v) => (None, v),
        };
        one.into_iter()
            .chain(many.into_iter().map(Out::Message as fn(Message) -> Out))
    }
}

impl Outcome {
    pub(crate) fn reply(m: Message) -> Self {
        Self {
            replies: Replies::One(m),
            close: false,
        }
    }
    pub(crate) fn ack(id: Option<CompactString>, message: &'static str) -> Self {
        Self {
            replies: Replies::Ack { id, message },
            close: false,
        }
    }
    pub(crate) fn many(replies: Vec<Message>) -> Self {
        Self {
            replies: Replies::Many(replies),
            close: false,
        }
    }
    pub(crate) fn closing(self) -> Self {
        Self {
            close: true,
            ..self
        }
    }
}

/// What a session writes: an answer, or an event whose bytes are shared by every session.
pub(crate) enum Out {
    /// A response, list item or login event, encoded on its own.
    Message(Message),
    /// [`Replies::Ack`].
    Ack {
        id: Option<CompactString>,
        message: &'static str,
    },
    /// A queued event.
    Event(Arc<SimEvent>),
}

impl Out {
    /// Appends what `AmiCodec` writes for this item to `dst` (an error where it refuses).
    fn encode(self, dst: &mut BytesMut) -> Result<(), CodecError> {
        match self {
            Self::Message(m) => encode_message(&m, dst),
            Self::Ack { id, message } => encode_ack(id.as_deref(), message, dst),
            Self::Event(ev) => match ev.wire() {
                // What the codec writes for this event, encoded once for every session.
                Some(bytes) => {
                    dst.extend_from_slice(bytes);
                    Ok(())
                }
                // Refused: the codec refuses it here too.
                None => encode_message(ev.message(), dst),
            },
        }
    }
}

/// What the codec writes for [`crate::actions::ack_headers`] (the answer of every `Setvar`),
/// checking only what came from the client: the `ActionID`, refused like the codec refuses it
/// (a CR or LF); `message` is one of the actions' own texts.
fn encode_ack(
    id: Option<&str>,
    message: &'static str,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    if id.is_some_and(|id| id.bytes().any(|b| b == b'\r' || b == b'\n')) {
        // The codec's own error.
        return encode_headers(crate::actions::ack_headers(id, message), dst);
    }
    const RESPONSE: &[u8] = b"Response: Success\r\n";
    const ACTION_ID: &[u8] = b"ActionID: ";
    const MESSAGE: &[u8] = b"Message: ";
    let id_len = id.map_or(0, |id| ACTION_ID.len() + id.len() + 2);
    dst.reserve(RESPONSE.len() + id_len + MESSAGE.len() + message.len() + 4);
    dst.extend_from_slice(RESPONSE);
    if let Some(id) = id {
        dst.extend_from_slice(ACTION_ID);
        dst.extend_from_slice(id.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(MESSAGE);
    dst.extend_from_slice(message.as_bytes());
    dst.extend_from_slice(b"\r\n\r\n");
    Ok(())
}

/// Bytes queued past which a session writes out before queuing more (what `Framed` does).
const BACKPRESSURE: usize = 8 * 1024;

/// The write side of a session: its half of the socket and what is queued on it.
struct Writer {
    io: OwnedWriteHalf,
    out: BytesMut,
    wt: Duration,
    id: u64,
    peer: SocketAddr,
}

impl Writer {
    /// Queues `item` without flushing (a full buffer writes out first, bounded by the write
    /// timeout). `false` when the connection must go.
    async fn feed(&mut self, item: Out) -> bool {
        if self.out.len() >= BACKPRESSURE && !self.flush().await {
            return false;
        }
        let r = item.encode(&mut self.out);
        write_done(Ok(r), self.id, self.peer)
    }

    /// Queues `items` without flushing. `false` when the connection must go.
    async fn feed_all(&mut self, items: impl IntoIterator<Item = Out>) -> bool {
        for item in items {
            if !self.feed(item).await {
                return false;
            }
        }
        true
    }

    /// [`Writer::feed_all`], then a flush unless `hold` (coalescing: the session flushes
    /// later). `false` when the connection must go.
    async fn send_all(&mut self, items: impl IntoIterator<Item = Out>, hold: bool) -> bool {
        self.feed_all(items).await && (hold || self.flush().await)
    }

    /// Writes out what is queued, bounded by the write timeout. Cancel-safe: what was
    /// written is gone from the queue. `false` when the connection must go.
    async fn flush(&mut self) -> bool {
        let Self { io, out, .. } = self;
        let r = tokio::time::timeout(self.wt, async {
            while !out.is_empty() {
                if io.write_buf(out).await? == 0 {
                    return Err(CodecError::Io(std::io::ErrorKind::WriteZero.into()));
                }
            }
            Ok(())
        })
        .await;
        write_done(r, self.id, self.peer)
    }
}

/// Whether a bounded write (feed or flush) succeeded; logs why not.
fn write_done(
    r: Result<Result<(), hintfed_ami::CodecError>, tokio::time::error::Elapsed>,
    id: u64,
    peer: SocketAddr,
) -> bool {
    match r {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(session = id, error = %e, "write failed");
            false
        }
        Err(_) => {
            warn_peer(id, peer, "slow reader", "write timed out");
            false
        }
    }
}

impl SessionCtx {
    fn blackholed(&self, shared: &Shared) -> bool {
        self.blackhole_until.is_some_and(|t| Instant::now() < t) || shared.blackholed()
    }
}

/// Takes the events waiting in the session's queue and queues them for writing (each written
/// on its own unless coalescing; then `unflushed` is set). `false` when the session must go (it
/// missed events, or a write failed).
async fn forward(
    shared: &Shared,
    ctx: &SessionCtx,
    sink: &mut Writer,
    batch: &mut std::collections::VecDeque<Arc<SimEvent>>,
    unflushed: &mut bool,
) -> bool {
    let Some(sub) = &ctx.sub else { return true };
    let missed = {
        let mut st = sub.lock();
        std::mem::swap(&mut st.queue, batch);
        std::mem::take(&mut st.missed)
    };
    if missed > 0 {
        warn_peer(
            ctx.id,
            ctx.peer,
            "slow reader",
            &format!("missed {missed} events"),
        );
        shared.lock().stats.slow_readers_dropped += 1;
        return false;
    }
    if batch.is_empty() {
        return true;
    }
    if ctx.blackholed(shared) {
        batch.clear();
        return true;
    }
    let coalesce = shared.cfg.coalesce_writes;
    let ok = if coalesce {
        sink.feed_all(batch.drain(..).map(Out::Event)).await
    } else {
        // Each event written on its own.
        let mut ok = true;
        while let Some(ev) = batch.pop_front() {
            if !sink.send_all([Out::Event(ev)], false).await {
                ok = false;
                break;
            }
        }
        ok
    };
    batch.clear();
    if !ok {
        shared.lock().stats.slow_readers_dropped += 1;
        return false;
    }
    *unflushed = coalesce;
    true
}

/// Answers one frame read from the client: an action's answers are queued (and flushed unless
/// coalescing; then `unflushed` is set). `false` when the session must go (end of input, bad
/// input, a failed write, or an action that closes it).
async fn answer(
    shared: &Arc<Shared>,
    ctx: &mut SessionCtx,
    sink: &mut Writer,
    frame: Option<Result<Frame, CodecError>>,
    unflushed: &mut bool,
) -> bool {
    let m = match frame {
        None => return false,
        Some(Err(e)) => {
            warn_peer(ctx.id, ctx.peer, "bad input", &e.to_string());
            return false;
        }
        Some(Ok(Frame::Banner(_))) => return true,
        Some(Ok(Frame::Message(m))) => m,
    };
    if ctx.blackholed(shared) && !crate::actions::ends_blackhole(&m) {
        shared.lock().stats.blackholed_actions += 1;
        return true;
    }
    if let Some(sub) = &ctx.sub {
        sub.set_busy(true);
    }
    let out = crate::actions::handle(shared, ctx, &m).await;
    let coalesce = shared.cfg.coalesce_writes;
    if !sink.send_all(out.replies, coalesce).await {
        return false;
    }
    *unflushed = coalesce;
    if out.close {
        return false;
    }
    if let Some(sub) = &ctx.sub {
        sub.set_busy(false);
    }
    true
}

/// Serves one connection until it ends.
#[tracing::instrument(skip(shared, stream), fields(server = ?shared.cfg.name))]
pub(crate) async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let id = {
        let mut inner = shared.lock();
        inner.session_seq += 1;
        inner.stats.connections += 1;
        inner.stats.connections_total += 1;
        inner.session_seq
    };
    serve(&shared, stream, peer, id).await;
    shared.lock().stats.connections -= 1;
    tracing::debug!(session = id, "connection closed");
}

async fn serve(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, id: u64) {
    let wt = shared.cfg.write_timeout;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(shared.local_addr);
    let mut gen_rx = shared.generation.subscribe();
    let generation = *gen_rx.borrow_and_update();
    // A blackholed (hung) server accepts TCP but sends nothing, not even the banner, until
    // the blackhole ends.
    while shared.blackholed() {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    match tokio::time::timeout(wt, stream.write_all(BANNER.as_bytes())).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let (read, write) = stream.into_split();
    let mut source = FramedRead::new(read, AmiCodec::with_limits(false, shared.cfg.limits));
    let mut sink = Writer {
        io: write,
        out: BytesMut::with_capacity(BACKPRESSURE),
        wt,
        id,
        peer,
    };
    // Responses and events queued since the last flush (only when coalescing).
    let mut unflushed = false;
    let ready = Arc::new(tokio::sync::Notify::new());
    let mut ctx = SessionCtx {
        id,
        peer,
        local,
        authenticated: false,
        challenge: None,
        mask: event::ALL,
        filters: crate::filter::EventFilters::default(),
        blackhole_until: None,
        sub: None,
        ready: ready.clone(),
    };
    // The events taken from the queue at once (kept for its capacity).
    let mut batch = std::collections::VecDeque::new();
    // Made once and polled by every turn of the loop (a future made per turn would register
    // with its notifier and deregister on every turn); `events` is remade once it fired.
    let mut shutdown = std::pin::pin!(shared.shutdown.cancelled());
    let mut restarted = std::pin::pin!(gen_rx.changed());
    let mut events = std::pin::pin!(ready.notified());
    // The queue is to be looked at after an action (the branch after `events`, so that a
    // shutdown or restart still comes first).
    let mut after_action = false;
    'session: loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = &mut restarted => {
                // Restart: deliver what was already queued (the Shutdown event), then go.
                if let Some(sub) = &ctx.sub {
                    std::mem::swap(&mut sub.lock().queue, &mut batch);
                }
                sink.send_all(batch.drain(..).map(Out::Event), false).await;
                break;
            }
            () = &mut events => {
                events.set(ready.notified());
                after_action = false;
                if !forward(shared, &ctx, &mut sink, &mut batch, &mut unflushed).await {
                    break;
                }
            }
            // What the session's own action queued (it woke no one, see `set_busy`).
            () = std::future::ready(()), if after_action => {
                after_action = false;
                if !forward(shared, &ctx, &mut sink, &mut batch, &mut unflushed).await {
                    break;
                }
            }
            frame = source.next() => {
                let mut frame = frame;
                loop {
                    if !answer(shared, &mut ctx, &mut sink, frame, &mut unflushed).await {
                        break 'session;
                    }
                    after_action = ctx.sub.is_some();
                    // Actions already read are answered in turn, each followed by the events
                    // queued by then, without a turn of this loop (whose shutdown, restart
                    // and queue futures each take a lock per poll); back to the loop, in its
                    // order, once a shutdown or restart is signalled or no action is read.
                    if shared.shutdown.is_cancelled() || *shared.generation.borrow() != generation {
                        break;
                    }
                    if after_action {
                        after_action = false;
                        if !forward(shared, &ctx, &mut sink, &mut batch, &mut unflushed).await {
                            break 'session;
                        }
                    }
                    // Polled again by the loop (with this task's waker) when not ready.
                    match source.next().now_or_never() {
                        Some(next) => frame = next,
                        None => break,
                    }
                }
            }
            // Last: only once no event and no action is ready.
            ok = sink.flush(), if unflushed => {
                if !ok {
                    shared.lock().stats.slow_readers_dropped += 1;
                    break;
                }
                unflushed = false;
            }
        }
    }
    if let Some(sub) = ctx.sub.take() {
        shared.unsubscribe(&sub);
    }
    // What Framed's close does: write out what is queued, then shut the write side.
    let _ = tokio::time::timeout(wt, async {
        if sink.flush().await {
            let _ = sink.io.shutdown().await;
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::Encoder as _;

    use super::*;

    /// What the session writes for `replies`.
    fn written(replies: Replies) -> String {
        let mut out = BytesMut::new();
        for item in replies {
            item.encode(&mut out).expect("encodable");
        }
        String::from_utf8(out.to_vec()).expect("utf8")
    }

    #[test]
    fn replies_are_written_in_order() {
        let m = |n: &str| Message::new().with("Response", n);
        assert_eq!(written(Replies::One(m("a"))), "Response: a\r\n\r\n");
        assert_eq!(
            written(Replies::Many(vec![m("a"), m("b")])),
            "Response: a\r\n\r\nResponse: b\r\n\r\n"
        );
        assert_eq!(Replies::Many(Vec::new()).into_iter().count(), 0);
    }

    #[test]
    fn an_ack_is_written_as_the_codec_writes_its_message() {
        let messages = [
            "Variable Set",
            "Originate successfully queued",
            "Restarting",
        ];
        for (id, message) in [
            None,
            Some("hf-17"),
            Some("an ActionID longer than the inline 24 bytes"),
            Some("é: ü "),
        ]
        .into_iter()
        .zip(messages.into_iter().cycle())
        {
            let mut m = Message::new().with("Response", "Success");
            if let Some(id) = id {
                m.push("ActionID", id);
            }
            let m = m.with("Message", message);
            let mut expected = BytesMut::new();
            AmiCodec::server()
                .encode(&m, &mut expected)
                .expect("encodable");
            let ack = Replies::Ack {
                id: id.map(CompactString::new),
                message,
            };
            assert_eq!(written(ack).as_bytes(), &expected[..], "{id:?}");
        }
        // Refused where the codec refuses (an ActionID never holds CR or LF once decoded).
        for id in ["a\r\nb", "a\rb", "\n"] {
            let bad = Out::Ack {
                id: Some(CompactString::new(id)),
                message: "Variable Set",
            };
            let mut out = BytesMut::new();
            assert!(bad.encode(&mut out).is_err(), "{id:?}");
            assert!(out.is_empty(), "nothing written for {id:?}");
        }
    }

    #[test]
    fn peer_warnings_are_rate_limited_per_window() {
        let budget: Budget = Mutex::new((None, 0, 0));
        let t0 = Instant::now();
        let allowed: Vec<Option<u64>> = (0..WARNINGS_PER_WINDOW + 3)
            .map(|_| warn_allowed(&budget, t0))
            .collect();
        assert!(
            allowed[..WARNINGS_PER_WINDOW as usize]
                .iter()
                .all(Option::is_some)
        );
        assert!(
            allowed[WARNINGS_PER_WINDOW as usize..]
                .iter()
                .all(Option::is_none)
        );
        assert_eq!(warn_allowed(&budget, t0 + WARN_WINDOW), Some(3));
    }
}
