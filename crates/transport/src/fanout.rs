//! The hub's PUB side, speaking ZMTP 3.0 (NULL mechanism, wire pieces in `zmtp`) directly on
//! the public listener:
//! each published message is encoded once and the same bytes are queued to every subscriber,
//! instead of the `zeromq` crate's PUB behind the byte-copying guard (which cloned and
//! re-encoded every message per subscriber and copied every byte through a loopback proxy).
//!
//! Per subscriber connection one task: greeting and READY exchange (bounded in time; the
//! READY's `X-Hintfed-Origin` property, if any, is the origin the subscriber publishes as,
//! whose messages it is not written), then it
//! reads subscriptions (ZMTP 3.0 messages `\x01prefix` / `\x00prefix`, or 3.1 `SUBSCRIBE` /
//! `CANCEL` commands; `PING` commands are answered) with the size [`Limits`] enforced before a
//! frame body is buffered, and writes the queued messages matching its subscriptions in
//! batches. Messages published together are encoded once and queued as one shared batch per
//! subscriber. Policies: a subscriber whose queue ([`SUBSCRIBER_QUEUE`] messages) has no room
//! for a batch loses that batch (counted per message as `dropped_outbound`), so one slow or deaf subscriber never
//! holds back the others or the hub; connections beyond `max_connections` are refused and
//! counted; a peer announcing an oversize frame is disconnected and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::guard::{OVERSIZE_WARN, accept_bounded};
use crate::hub::Publication;
use crate::link::{Frames, Limits, LinkStats};
use crate::zmtp::{
    End, MAX_ORIGIN, ORIGIN_PROPERTY, Reader, encode_message, handshake, pong_for, properties,
    ready,
};

/// Messages queued per subscriber before the newest are dropped for it.
pub(crate) const SUBSCRIBER_QUEUE: usize = 100_000;
/// A peer must complete the greeting and READY exchange within this.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes gathered before one write to a subscriber.
pub(crate) const WRITE_BATCH: usize = 64 * 1024;
/// Most subscriptions one peer may hold.
const MAX_SUBSCRIPTIONS: usize = 1024;

/// One published message: its first frame (for prefix matching), its whole wire encoding and,
/// after it in the same bytes, the origin whose message it is (not sent to a subscriber that
/// announced it; empty: no origin).
#[derive(Clone)]
pub(crate) struct Encoded {
    topic: Bytes,
    bytes: Bytes,
    /// Where the wire encoding ends in `bytes` and the origin starts.
    wire_end: usize,
}

impl Encoded {
    /// The message's wire encoding.
    fn wire(&self) -> &[u8] {
        &self.bytes[..self.wire_end]
    }

    /// The origin whose message it is (empty: none).
    fn origin(&self) -> &[u8] {
        &self.bytes[self.wire_end..]
    }
}

/// Bytes of `frames` on the wire (each frame: a header of at most 9 bytes, its body) and of
/// `origin`.
fn wire_len(frames: &Frames, origin: Option<&str>) -> usize {
    frames.iter().map(|f| f.len() + 9).sum::<usize>() + origin.map_or(0, str::len)
}

/// Encodes `frames` (first frame = topic) as one ZMTP message at the end of `buf`, `origin`
/// after it, and splits both off (slices of one buffer share its allocation).
fn encode_into(buf: &mut BytesMut, frames: &Frames, origin: Option<&str>) -> Option<Encoded> {
    let topic = frames.first()?.clone();
    encode_message(buf, frames);
    let wire_end = buf.len();
    buf.extend_from_slice(origin.unwrap_or_default().as_bytes());
    Some(Encoded {
        topic,
        bytes: buf.split().freeze(),
        wire_end,
    })
}

/// Encodes `frames` (first frame = topic) as one ZMTP message of no origin.
pub(crate) fn encode(frames: &Frames) -> Option<Encoded> {
    encode_into(
        &mut BytesMut::with_capacity(wire_len(frames, None)),
        frames,
        None,
    )
}

/// Messages published together, shared by every subscriber's queue: one allocation for
/// the list and one for all their bytes, whatever the number of messages.
type Batch = Arc<[Encoded]>;

/// The owner's end of one subscriber's queue: batches, and how many messages they hold.
struct Queue {
    tx: mpsc::UnboundedSender<Batch>,
    queued: Arc<AtomicUsize>,
}

/// The subscribers known to the owner of the PUB: what [`Fanout::publish`] queues to.
pub(crate) struct Fanout {
    subscribers: Vec<Queue>,
    joined: mpsc::Receiver<Queue>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Fanout {
    /// Starts accepting subscribers on `listener`. `welcome`: a message written to each
    /// subscriber once, as soon as its subscriptions take it in: whatever is published after
    /// the subscriber received it reaches it (what was published before may not). `linger`:
    /// the wait between writes to a busy subscriber (see [`Pace`]; zero: never wait).
    pub(crate) fn start(
        listener: TcpListener,
        limits: Limits,
        max_connections: usize,
        stats: Arc<LinkStats>,
        welcome: Option<&Frames>,
        linger: Duration,
    ) -> Self {
        let cancel = CancellationToken::new();
        let (join_tx, joined) = mpsc::channel(256);
        let each = Each {
            limits,
            linger,
            welcome: welcome.and_then(encode),
        };
        let task = tokio::spawn(accept_loop(
            listener,
            each,
            max_connections,
            stats.clone(),
            join_tx,
            cancel.clone(),
        ));
        Fanout {
            subscribers: Vec::new(),
            joined,
            stats,
            cancel,
            task: Some(task),
        }
    }

    /// Takes in the subscribers that completed their handshake since the last call.
    fn take_joined(&mut self) {
        while let Ok(s) = self.joined.try_recv() {
            self.subscribers.push(s);
        }
    }

    /// Queues one message of no origin to every subscriber (its task filters by
    /// subscription).
    pub(crate) fn publish(&mut self, frames: &Frames) {
        self.publish_all(std::iter::once((frames, None)));
    }

    /// Queues messages to every subscriber (each subscriber's task filters them by its
    /// subscriptions and its announced origin).
    pub(crate) fn publish_batch(&mut self, batch: &[Publication]) {
        self.publish_all(batch.iter().map(|p| (&p.frames, p.origin.as_deref())));
    }

    /// Queues messages (frames, origin) to every subscriber: each is encoded once and the
    /// whole batch is one shared queue entry per subscriber. A subscriber without room for
    /// the whole batch loses it (counted per message as `dropped_outbound`).
    fn publish_all<'a>(
        &mut self,
        batch: impl Iterator<Item = (&'a Frames, Option<&'a str>)> + Clone,
    ) {
        self.take_joined();
        if self.subscribers.is_empty() {
            return;
        }
        let size = batch.clone().map(|(f, o)| wire_len(f, o)).sum();
        let mut buf = BytesMut::with_capacity(size);
        let encoded: Batch = batch
            .filter_map(|(frames, origin)| encode_into(&mut buf, frames, origin))
            .collect();
        let n = encoded.len();
        if n == 0 {
            return;
        }
        let stats = &self.stats;
        let mut sent = false;
        self.subscribers.retain(|q| {
            if q.tx.is_closed() {
                return false;
            }
            if q.queued.load(Ordering::Acquire) + n > SUBSCRIBER_QUEUE {
                stats.dropped_outbound_by(n as u64);
                return true;
            }
            q.queued.fetch_add(n, Ordering::AcqRel);
            if q.tx.send(encoded.clone()).is_err() {
                return false;
            }
            sent = true;
            true
        });
        if sent {
            stats.messages_out_by(n as u64);
        }
    }

    /// Stops accepting and closes every subscriber connection; returns the listener task to
    /// await (outside any lock) until the port is released.
    pub(crate) fn close(&mut self) -> Option<JoinHandle<()>> {
        self.cancel.cancel();
        self.subscribers.clear();
        self.task.take()
    }
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("subscribers", &self.subscribers.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What every subscriber connection is served with.
#[derive(Clone)]
struct Each {
    limits: Limits,
    linger: Duration,
    welcome: Option<Encoded>,
}

async fn accept_loop(
    listener: TcpListener,
    each: Each,
    max_connections: usize,
    stats: Arc<LinkStats>,
    join_tx: mpsc::Sender<Queue>,
    cancel: CancellationToken,
) {
    accept_bounded(
        listener,
        max_connections,
        stats,
        cancel,
        move |stream, peer, stats| {
            let join_tx = join_tx.clone();
            let each = each.clone();
            async move { serve(stream, peer, each, &stats, join_tx).await }
        },
    )
    .await;
}

/// A subscriber's handshake: its first command must be READY. Returns the origin it
/// announces, if any (see [`announced_origin`]).
async fn sub_handshake(
    stream: TcpStream,
    limits: Limits,
) -> Result<(Reader, OwnedWriteHalf, Option<Bytes>), End> {
    let (reader, write, first) = handshake(stream, limits, &ready(b"PUB", &[]), 4096).await?;
    let Some(props) = first.body.strip_prefix(b"\x05READY") else {
        return Err(End::Closed);
    };
    Ok((reader, write, announced_origin(props)))
}

/// The origin a subscriber's READY properties (`props`, read in place) announce as
/// [`ORIGIN_PROPERTY`] (the first one, copied: the READY's buffer is not held), so that it is
/// not sent that origin's messages. `None`, and everything is sent as to any subscriber, when
/// there is none, when it is empty or longer than [`MAX_ORIGIN`] bytes (no message could be
/// of it), or when the properties are malformed (such a READY was always accepted here).
fn announced_origin(props: &[u8]) -> Option<Bytes> {
    let mut origin = None;
    for p in properties(props) {
        let (name, value) = p.ok()?;
        if origin.is_none() && name.eq_ignore_ascii_case(ORIGIN_PROPERTY) {
            origin = Some(value);
        }
    }
    origin
        .filter(|o| !o.is_empty() && o.len() <= MAX_ORIGIN)
        .map(Bytes::copy_from_slice)
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    each: Each,
    stats: &LinkStats,
    join_tx: mpsc::Sender<Queue>,
) {
    let _ = stream.set_nodelay(true);
    let handshake = sub_handshake(stream, each.limits);
    let end = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => End::Closed,
        Ok(Err(e)) => e,
        Ok(Ok((reader, write, origin))) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let queue = Queue {
                tx,
                queued: queued.clone(),
            };
            if join_tx.send(queue).await.is_err() {
                return;
            }
            run(
                reader,
                write,
                origin,
                rx,
                &queued,
                each.welcome,
                each.linger,
            )
            .await
        }
    };
    if let End::Oversize = end {
        stats.dropped_oversize();
        if let Some(held_back) = OVERSIZE_WARN.allow() {
            tracing::warn!(%peer, held_back, "peer announced an oversize ZeroMQ message; connection closed");
        }
    }
}

/// Serves one subscriber past its handshake; `origin`: the one it announced, whose messages
/// it is not sent.
async fn run(
    mut reader: Reader,
    mut write: OwnedWriteHalf,
    origin: Option<Bytes>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    queued: &AtomicUsize,
    mut welcome: Option<Encoded>,
    linger: Duration,
) -> End {
    let mut subscriptions: Vec<Bytes> = Vec::new();
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    let mut pace = Pace::new(linger);
    // Whether the next message frame starts a message (not a continuation).
    let mut at_start = true;
    // A busy subscriber, once written, waits out its linger on this timer, not on its queue:
    // the queue is read when the linger ends (one wake-up per write, not one for the first
    // message queued and one more at the end of the linger). Not lingering: the queue is
    // read as messages come, and a subscriber is only ever read from the queue at a time
    // `Pace::hold_until` lets it be written.
    let linger_end = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(linger_end);
    let mut lingering = false;
    loop {
        let first = tokio::select! {
            f = reader.frame() => {
                let f = match f {
                    Ok(f) => f,
                    Err(e) => return e,
                };
                if f.command {
                    handle_command(&f.body, &mut subscriptions, &mut out);
                } else {
                    if at_start {
                        handle_subscription(&f.body, &mut subscriptions);
                    }
                    at_start = !f.more;
                }
                // Written now, after the subscriptions it answers: a batch taken from the
                // queue from here on is matched against them.
                if welcome.as_ref().is_some_and(|w| matches(&subscriptions, &w.topic))
                    && let Some(w) = welcome.take()
                {
                    out.extend_from_slice(w.wire());
                }
                if !out.is_empty() {
                    if write.write_all(&out).await.is_err() {
                        return End::Closed;
                    }
                    out.clear();
                }
                continue;
            }
            b = rx.recv(), if !lingering => match b {
                Some(b) => b,
                None => return End::Closed,
            },
            () = &mut linger_end, if lingering => {
                lingering = false;
                match rx.try_recv() {
                    Ok(b) => b,
                    // Nothing came meanwhile: wait for the queue (a closed one ends there).
                    Err(_) => continue,
                }
            }
        };
        // Everything queued now, in one write (or a few of WRITE_BATCH bytes).
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(b) = next.take() {
            for m in b.iter() {
                if sent_to(m, &subscriptions, origin.as_deref()) {
                    out.extend_from_slice(m.wire());
                    if out.len() >= WRITE_BATCH {
                        if write.write_all(&out).await.is_err() {
                            return End::Closed;
                        }
                        out.clear();
                    }
                }
            }
            queued.fetch_sub(b.len(), Ordering::AcqRel);
            taken += b.len();
            next = rx.try_recv().ok();
        }
        pace.taken(Instant::now(), taken);
        if !out.is_empty() {
            if write.write_all(&out).await.is_err() {
                return End::Closed;
            }
            out.clear();
            pace.wrote(Instant::now());
        }
        if let Some(at) = pace.hold_until(Instant::now()) {
            lingering = true;
            linger_end.as_mut().reset(at.into());
        }
    }
}

/// Messages a second (counted over [`PACE_WINDOW`]) above which a subscriber's writes are
/// paced by the linger (see [`Pace`]).
const BUSY_RATE: usize = 5_000;
/// The window a subscriber's rate is counted over.
const PACE_WINDOW: Duration = Duration::from_millis(20);
/// [`BUSY_RATE`] as messages in one [`PACE_WINDOW`].
const BUSY_PER_WINDOW: usize = BUSY_RATE * PACE_WINDOW.as_millis() as usize / 1000;

/// The pacing of one subscriber's writes. While its messages come faster than [`BUSY_RATE`]
/// a second, each write waits until `linger` after the previous one: a busy subscriber gets
/// one write (one wake-up of its reader, one `send` here) per linger instead of one per
/// message. A slower subscriber is written at once, so light traffic gains no latency.
#[derive(Debug, Default)]
struct Pace {
    /// The wait between writes of a busy subscriber (zero: never wait).
    linger: Duration,
    /// Start of the current counting window.
    window_start: Option<Instant>,
    /// Messages taken in the current window.
    in_window: usize,
    /// The previous full window was above [`BUSY_RATE`].
    busy: bool,
    /// When the previous write ended.
    last_write: Option<Instant>,
}

impl Pace {
    /// A subscriber's pacing with `linger` between the writes of a busy one.
    fn new(linger: Duration) -> Self {
        Self {
            linger,
            ..Self::default()
        }
    }

    /// Messages taken from the queue at `now`.
    fn taken(&mut self, now: Instant, n: usize) {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= PACE_WINDOW {
            // Only the window just ended counts; a gap of more than one window is quiet.
            self.busy = elapsed < 2 * PACE_WINDOW && self.in_window >= BUSY_PER_WINDOW;
            self.window_start = Some(now);
            self.in_window = 0;
        }
        self.in_window += n;
    }

    /// A write ended at `now`.
    fn wrote(&mut self, now: Instant) {
        self.last_write = Some(now);
    }

    /// Until when the next write should wait, when a message is ready at `now`.
    fn hold_until(&self, now: Instant) -> Option<Instant> {
        if !self.busy || self.linger.is_zero() {
            return None;
        }
        let at = self.last_write? + self.linger;
        (at > now).then_some(at)
    }
}

fn matches(subscriptions: &[Bytes], topic: &[u8]) -> bool {
    subscriptions.iter().any(|s| topic.starts_with(s))
}

/// Whether `m` goes to a subscriber with `subscriptions` that announced `origin` (never
/// empty): its topic is subscribed to, and it is not a message of the origin announced.
fn sent_to(m: &Encoded, subscriptions: &[Bytes], origin: Option<&[u8]>) -> bool {
    matches(subscriptions, &m.topic) && origin.is_none_or(|o| m.origin() != o)
}

fn subscribe(subscriptions: &mut Vec<Bytes>, prefix: Bytes) {
    if subscriptions.len() < MAX_SUBSCRIPTIONS {
        subscriptions.push(prefix);
    }
}

fn unsubscribe(subscriptions: &mut Vec<Bytes>, prefix: &[u8]) {
    if let Some(i) = subscriptions.iter().position(|s| s.as_ref() == prefix) {
        subscriptions.swap_remove(i);
    }
}

fn handle_subscription(body: &Bytes, subscriptions: &mut Vec<Bytes>) {
    match body.first() {
        Some(1) => subscribe(subscriptions, body.slice(1..)),
        Some(0) => unsubscribe(subscriptions, &body[1..]),
        _ => {}
    }
}

fn handle_command(body: &Bytes, subscriptions: &mut Vec<Bytes>, out: &mut Vec<u8>) {
    let Some(&n) = body.first() else { return };
    let n = usize::from(n);
    if body.len() < 1 + n {
        return;
    }
    let name = &body[1..1 + n];
    let rest = body.slice(1 + n..);
    match name {
        b"SUBSCRIBE" => subscribe(subscriptions, rest),
        b"CANCEL" => unsubscribe(subscriptions, &rest),
        b"PING" => out.extend(pong_for(&rest)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zmtp::command;

    /// Takes `n` messages at `at` and writes them at once, as `run` does.
    fn take_and_write(pace: &mut Pace, at: Instant, n: usize) {
        pace.taken(at, n);
        pace.wrote(at);
    }

    #[test]
    fn a_slow_subscriber_is_written_at_once() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut pace = Pace::new(ms(1));
        // 1,000 messages a second, one each millisecond, for half a second.
        for i in 0..500 {
            let at = t0 + ms(i);
            assert_eq!(pace.hold_until(at), None, "message {i}");
            take_and_write(&mut pace, at, 1);
        }
        // Bursts of 10 every 10 ms (1,000 a second in bursts): written at once too.
        for i in 0..50 {
            let at = t0 + ms(500 + 10 * i);
            assert_eq!(pace.hold_until(at), None, "burst {i}");
            take_and_write(&mut pace, at, 10);
        }
    }

    #[test]
    fn a_busy_subscriber_waits_the_linger_and_stops_when_it_slows_down() {
        let us = Duration::from_micros;
        let t0 = Instant::now();
        let mut pace = Pace::new(us(1000));
        // 20,000 messages a second (one each 50 us), each written alone, for one window: not
        // yet known to be busy.
        let mut at = t0;
        while at < t0 + PACE_WINDOW {
            assert_eq!(pace.hold_until(at), None);
            take_and_write(&mut pace, at, 1);
            at += us(50);
        }
        // The next window starts busy: the next message waits until a linger after the last
        // write, and is written with what came meanwhile.
        take_and_write(&mut pace, at, 1);
        let next = at + us(50);
        assert_eq!(pace.hold_until(next), Some(at + us(1000)));
        take_and_write(&mut pace, at + us(1000), 20);
        // A message a linger or more after the previous write waits for nothing.
        assert_eq!(pace.hold_until(at + us(2000)), None);
        // Quiet for longer than a window: the rate is counted afresh, nothing waits.
        let later = at + 3 * PACE_WINDOW;
        take_and_write(&mut pace, later, 1);
        assert!(!pace.busy);
        assert_eq!(pace.hold_until(later + us(50)), None);
    }

    #[test]
    fn a_zero_linger_never_waits() {
        let t0 = Instant::now();
        let mut pace = Pace::new(Duration::ZERO);
        for i in 0..2_000u32 {
            let at = t0 + Duration::from_micros(u64::from(i) * 20);
            assert_eq!(pace.hold_until(at), None);
            take_and_write(&mut pace, at, 1);
        }
        assert!(pace.busy);
    }

    #[test]
    fn encodes_short_and_long_frames() {
        let big = Bytes::from(vec![7u8; 300]);
        let m = encode(&vec![Bytes::from_static(b"ab"), big]).expect("frames");
        assert_eq!(&m.topic[..], b"ab");
        assert_eq!(&m.wire()[..4], &[0x01, 2, b'a', b'b']);
        assert_eq!(m.wire()[4], 0x02);
        assert_eq!(&m.wire()[5..13], &300u64.to_be_bytes());
        assert_eq!(m.wire().len(), 4 + 9 + 300);
        assert!(m.origin().is_empty());
        assert!(encode(&Vec::new()).is_none());
    }

    /// The properties of our READY with `props` (a short or a long command frame).
    fn ready_props(props: &[(&[u8], &[u8])]) -> Vec<u8> {
        let r = ready(b"SUB", props);
        let head = if r[0] == 0x06 { 9 } else { 2 };
        r[head..]
            .strip_prefix(b"\x05READY")
            .expect("READY")
            .to_vec()
    }

    #[test]
    fn the_origin_a_subscriber_announces() {
        let origin = |props: &[(&[u8], &[u8])]| announced_origin(&ready_props(props));
        assert_eq!(origin(&[]), None);
        assert_eq!(
            origin(&[(ORIGIN_PROPERTY, b"pbx-a")]).as_deref(),
            Some(&b"pbx-a"[..])
        );
        // Names are case-insensitive; the first one counts.
        assert_eq!(
            origin(&[(b"x-hintfed-origin", b"pbx-a"), (ORIGIN_PROPERTY, b"pbx-b")]).as_deref(),
            Some(&b"pbx-a"[..])
        );
        // Any bytes are an origin's bytes.
        let odd = b"a\"b\\c\x00\xff\xfe";
        assert_eq!(origin(&[(ORIGIN_PROPERTY, odd)]).as_deref(), Some(&odd[..]));
        // Empty, oversize or malformed: none announced (everything is sent).
        assert_eq!(origin(&[(ORIGIN_PROPERTY, b"")]), None);
        let long = vec![b'a'; MAX_ORIGIN + 1];
        assert_eq!(origin(&[(ORIGIN_PROPERTY, &long)]), None);
        let longest = vec![b'a'; MAX_ORIGIN];
        assert_eq!(
            origin(&[(ORIGIN_PROPERTY, &longest)]).as_deref(),
            Some(&longest[..])
        );
        let mut cut = ready_props(&[(ORIGIN_PROPERTY, b"pbx-a")]);
        cut.pop();
        assert_eq!(announced_origin(&cut), None);
        let mut trailing = ready_props(&[(ORIGIN_PROPERTY, b"pbx-a")]);
        trailing.push(7);
        assert_eq!(announced_origin(&trailing), None);
    }

    fn of_none_like(topic: &'static [u8]) -> Encoded {
        encode(&vec![Bytes::from_static(topic), Bytes::new()]).expect("frames")
    }

    #[test]
    fn a_subscriber_that_announced_its_origin_is_not_sent_its_messages() {
        let frames = |topic: &'static [u8]| vec![Bytes::from_static(topic), Bytes::new()];
        let mut buf = BytesMut::new();
        let of_a = encode_into(&mut buf, &frames(b"state.a"), Some("pbx-a")).expect("frames");
        let of_b = encode_into(&mut buf, &frames(b"state.b"), Some("pbx-b")).expect("frames");
        let of_none = encode_into(&mut buf, &frames(b"control"), None).expect("frames");
        // The origin rides beside the wire bytes, not in them.
        assert_eq!(
            of_a.wire(),
            encode(&frames(b"state.a")).expect("frames").wire()
        );
        assert_eq!(of_a.origin(), b"pbx-a");
        let all = [Bytes::new()];
        let sent = |origin: Option<&[u8]>| {
            [&of_a, &of_b, &of_none]
                .map(|m| sent_to(m, &all, origin))
                .to_vec()
        };
        // Announced pbx-a: everything but pbx-a's.
        assert_eq!(sent(Some(b"pbx-a")), [false, true, true]);
        assert_eq!(sent(Some(b"pbx-b")), [true, false, true]);
        // Announced nothing, or an origin of no message: everything.
        assert_eq!(sent(None), [true, true, true]);
        assert_eq!(sent(Some(b"pbx-c")), [true, true, true]);
        // Subscriptions still apply.
        let only_state = [Bytes::from_static(b"state.")];
        assert!(!sent_to(&of_none, &only_state, Some(b"pbx-a")));
        // An empty origin is none.
        let of_empty = encode_into(&mut buf, &frames(b"state.e"), Some("")).expect("frames");
        assert_eq!(of_empty.wire(), of_none_like(b"state.e").wire());
        assert!(sent_to(&of_empty, &all, Some(b"pbx-a")));
        assert!(sent_to(&of_b, &only_state, Some(b"pbx-a")));
    }

    #[test]
    fn subscriptions_and_commands() {
        let mut subs = Vec::new();
        let mut out = Vec::new();
        handle_subscription(&Bytes::from_static(b"\x01state."), &mut subs);
        assert!(matches(&subs, b"state.dev"));
        assert!(!matches(&subs, b"other"));
        handle_subscription(&Bytes::from_static(b"\x00state."), &mut subs);
        assert!(!matches(&subs, b"state.dev"));
        handle_command(&Bytes::from_static(b"\x09SUBSCRIBE"), &mut subs, &mut out);
        assert!(matches(&subs, b"anything"));
        handle_command(&Bytes::from_static(b"\x06CANCEL"), &mut subs, &mut out);
        assert!(subs.is_empty());
        handle_command(
            &Bytes::from_static(b"\x04PING\x00\x10ctx"),
            &mut subs,
            &mut out,
        );
        assert_eq!(out, command(b"PONG", b"ctx"));
        assert_eq!(&out[..2], &[0x04, 8]);
    }
}
