//! [`SetvarWriter`]: pipelined `Setvar`s without a future, a channel or a message per write.
//!
//! [`AmiClient::send`](crate::AmiClient::send) costs, per action, a [`Message`], an `ActionID`
//! string, a oneshot channel, a slot in the request channel, an entry keyed by that string and
//! a future for the caller to poll. A relay that writes tens of thousands of `Setvar`s a second
//! pays that for each. A [`SetvarWriter`] (from
//! [`AmiClient::setvar_writer`](crate::AmiClient::setvar_writer)) instead encodes each
//! `Setvar` at once into a buffer shared with the connection task, under a numbered `ActionID`
//! (the client's prefix, `w`, a sequence number), and records `(sequence, token)` in a queue in
//! sending order. The connection task writes the whole buffer with one flush when woken, matches
//! each answer to its write by the number in its `ActionID` (in any order), and reports every
//! write once as a [`WriteDone`] carrying the caller's token: `Response: Success` is `Ok`,
//! anything else, no answer within `action_timeout`, or a connection lost first is an `Err`.
//! The caller takes the completions in batches ([`SetvarWriter::take`]) when
//! [`SetvarWriter::completed`] wakes it.
//!
//! While at least 128 (`LOW_WATER`) written writes are unanswered (Asterisk has work
//! queued), new ones are held until 64 (`HOLD_BATCH`) of them can go out together: under a
//! full window each `write(2)` (and each of Asterisk's reads) carries dozens of `Setvar`s
//! instead of a few, while a light load still writes each at once. The connection task writes
//! at most 64 a flush and yields between flushes, so the readers of what comes back (each
//! `Setvar`'s event among it) keep up. A held write that times out is dropped unsent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::ClientError;
use crate::codec::Limits;
use crate::message::Message;

/// Why a write of a [`SetvarWriter`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Asterisk answered `Response: Error` (its `Message` here).
    #[error("refused: {0}")]
    Refused(String),
    /// The answer was not a `Response` (the message as read).
    #[error("unreadable answer: {0}")]
    Malformed(String),
    /// Not written, or not answered: not connected, invalid, timed out, connection lost.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// One write of a [`SetvarWriter`], finished.
#[derive(Debug, Clone)]
pub struct WriteDone {
    /// The token given to [`SetvarWriter::setvar`].
    pub token: u64,
    /// `Ok` when Asterisk answered `Response: Success`.
    pub result: Result<(), WriteError>,
}

/// Writes buffered are held (not written yet) while fewer than this many wait...
const HOLD_BATCH: usize = 64;
/// ... and at least this many written ones are unanswered: Asterisk has work queued, so a
/// fuller batch later costs no throughput and saves a `write(2)` per few writes on both
/// sides. Below it (a light load, a small window) every write goes out at once.
const LOW_WATER: usize = 128;

/// A write sent (or buffered to send) and not answered yet.
#[derive(Debug)]
struct Slot {
    token: u64,
    at: Instant,
    /// Still waits for its answer (false: answered out of order, kept until the older ones
    /// are answered).
    open: bool,
}

#[derive(Debug)]
struct State {
    /// A session serves writes.
    live: bool,
    /// What a write fails with while not live.
    closed: ClientError,
    /// Encoded writes the connection task has not taken yet.
    out: BytesMut,
    /// The length of each write in `out`, in order.
    out_lens: VecDeque<usize>,
    /// Sequence number of `slots[0]`.
    base: u64,
    /// Sequence number of the next write.
    next: u64,
    /// Writes of this session not yet reported, in sending order.
    slots: VecDeque<Slot>,
    /// Slots still open (buffered or written, unanswered).
    open: usize,
    /// The connection task was woken for the buffered writes and has not taken them yet.
    conn_woken: bool,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// `ActionID` prefix of writes: the client's prefix and `w`.
    prefix: String,
    state: Mutex<State>,
    /// Wakes the connection task: `out` holds bytes.
    to_conn: Notify,
    /// Finished writes the caller has not taken.
    done: Completions<WriteDone>,
}

/// Finished work handed from its producers to one consumer in batches: pushed one at a time,
/// taken all at once ([`Completions::take`]), waited for with [`Completions::completed`].
#[derive(Debug)]
pub struct Completions<T> {
    items: Mutex<Vec<T>>,
    notify: Notify,
}

impl<T> Default for Completions<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }
}

impl<T> Completions<T> {
    fn items(&self) -> MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one; wakes the consumer when it is the first waiting.
    pub fn push(&self, item: T) {
        let mut items = self.items();
        items.push(item);
        if items.len() == 1 {
            self.notify.notify_one();
        }
    }

    /// Moves every one waiting into `into` (appended); returns how many.
    pub fn take(&self, into: &mut Vec<T>) -> usize {
        self.take_map(into, std::convert::identity)
    }

    /// [`Completions::take`], each converted by `f` on the way (no batch in between).
    pub fn take_map<U>(&self, into: &mut Vec<U>, f: impl FnMut(T) -> U) -> usize {
        let mut items = self.items();
        let n = items.len();
        into.extend(items.drain(..).map(f));
        n
    }

    /// Waits until at least one can be taken.
    pub async fn completed(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.items().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Cloneable handle writing `Setvar`s through one [`AmiClient`](crate::AmiClient); see the
/// module docs.
#[derive(Debug, Clone)]
pub struct SetvarWriter {
    shared: Arc<Shared>,
}

impl SetvarWriter {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Queues `Setvar variable=value`, reported later as a [`WriteDone`] with `token`; `at`
    /// is when it was started (`action_timeout` counts from it: a caller starting several
    /// writes together reads the clock once for all; never before the previous write's `at`,
    /// as writes expire in order). Never waits: while not logged in (or
    /// with CR/LF in the variable or value) the write is reported failed at once, through
    /// [`SetvarWriter::take`] like any other.
    pub fn setvar(&self, token: u64, variable: &str, value: &str, at: Instant) {
        if variable.contains(['\r', '\n']) || value.contains(['\r', '\n']) {
            let err = ClientError::InvalidAction("Setvar variable or value holds CR or LF".into());
            self.shared.done.push(WriteDone {
                token,
                result: Err(err.into()),
            });
            return;
        }
        let mut st = self.shared.lock();
        if !st.live {
            let result = Err(st.closed.clone().into());
            self.shared.done.push(WriteDone { token, result });
            return;
        }
        let seq = st.next;
        st.next += 1;
        let prefix = &self.shared.prefix;
        let out = &mut st.out;
        let start = out.len();
        out.reserve(64 + prefix.len() + variable.len() + value.len());
        out.put_slice(b"Action: Setvar\r\nActionID: ");
        out.put_slice(prefix.as_bytes());
        put_decimal(out, seq);
        out.put_slice(b"\r\nVariable: ");
        out.put_slice(variable.as_bytes());
        out.put_slice(b"\r\nValue: ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n\r\n");
        let len = out.len() - start;
        st.out_lens.push_back(len);
        st.slots.push_back(Slot {
            token,
            at,
            open: true,
        });
        st.open += 1;
        st.wake_conn(&self.shared);
    }

    /// Moves every finished write into `into` (appended); returns how many.
    pub fn take(&self, into: &mut Vec<WriteDone>) -> usize {
        self.shared.done.take(into)
    }

    /// [`SetvarWriter::take`], each converted by `f` on the way.
    pub fn take_map<U>(&self, into: &mut Vec<U>, f: impl FnMut(WriteDone) -> U) -> usize {
        self.shared.done.take_map(into, f)
    }

    /// Waits until at least one finished write can be taken.
    pub async fn completed(&self) {
        self.shared.done.completed().await;
    }

    /// Writes queued or sent and not yet reported.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().open
    }
}

/// Appends `n` in decimal.
fn put_decimal(out: &mut BytesMut, n: u64) {
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

impl State {
    /// Wakes the connection task when the buffered writes should go out (see [`HOLD_BATCH`]).
    fn wake_conn(&mut self, shared: &Shared) {
        let buffered = self.out_lens.len();
        if self.conn_woken || buffered == 0 {
            return;
        }
        if buffered >= HOLD_BATCH || self.open.saturating_sub(buffered) < LOW_WATER {
            self.conn_woken = true;
            shared.to_conn.notify_one();
        }
    }

    /// Closes the open slot of the write numbered `seq`, answered; its token, or `None` when
    /// no such write waits.
    fn answered(&mut self, seq: u64) -> Option<u64> {
        let idx = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let slot = self.slots.get_mut(idx).filter(|s| s.open)?;
        slot.open = false;
        self.open -= 1;
        Some(slot.token)
    }

    /// Drops answered (and expired) slots off the front.
    fn trim(&mut self) {
        while self.slots.front().is_some_and(|s| !s.open) {
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// Fails every write not yet reported and forgets the unsent bytes.
    fn fail_all(&mut self, shared: &Shared, err: &ClientError) {
        self.open = 0;
        self.conn_woken = false;
        for s in self.slots.drain(..) {
            if s.open {
                shared.done.push(WriteDone {
                    token: s.token,
                    result: Err(err.clone().into()),
                });
            }
        }
        self.base = self.next;
        self.out.clear();
        self.out_lens.clear();
    }
}

impl Shared {
    pub(crate) fn new(prefix: &str) -> Arc<Self> {
        Arc::new(Self {
            prefix: format!("{prefix}w"),
            state: Mutex::new(State {
                live: false,
                closed: ClientError::NotConnected,
                out: BytesMut::new(),
                out_lens: VecDeque::new(),
                base: 0,
                next: 0,
                slots: VecDeque::new(),
                open: 0,
                conn_woken: false,
            }),
            to_conn: Notify::new(),
            done: Completions::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A session starts serving writes.
    pub(crate) fn open(&self) {
        let mut st = self.lock();
        st.live = true;
        st.out.clear();
        st.out_lens.clear();
        st.slots.clear();
        st.open = 0;
        st.conn_woken = false;
        st.base = st.next;
    }

    /// The session ended (`err`: what its writes fail with); writes fail with `closed` until
    /// the next [`Shared::open`].
    pub(crate) fn close(&self, err: &ClientError, closed: ClientError) {
        let mut st = self.lock();
        st.live = false;
        st.closed = closed;
        st.fail_all(self, err);
    }

    /// Waits until writes are buffered for the connection.
    pub(crate) async fn to_write(&self) {
        self.to_conn.notified().await;
    }

    /// Appends up to `max` buffered writes to `dst`; returns how many, and whether the
    /// connection was woken again for more.
    pub(crate) fn take_out(&self, dst: &mut BytesMut, max: usize) -> (usize, bool) {
        let mut st = self.lock();
        let n = st.out_lens.len().min(max);
        let bytes: usize = st.out_lens.drain(..n).sum();
        if st.out_lens.is_empty() && dst.is_empty() {
            // All of it to an empty buffer (the usual case): the two buffers trade places,
            // no byte is copied, and each keeps its capacity for the next round.
            std::mem::swap(dst, &mut st.out);
        } else {
            dst.extend_from_slice(&st.out[..bytes]);
            // Advancing keeps the buffer unshared (a split_to would share it, with a count to
            // keep for each split); clearing it once empty lets it reuse its whole capacity.
            st.out.advance(bytes);
            if st.out_lens.is_empty() {
                st.out.clear();
            }
        }
        st.conn_woken = false;
        st.wake_conn(self);
        (n, st.conn_woken)
    }

    /// The sequence number in `action_id` when it names a write of this client.
    pub(crate) fn seq_of(&self, action_id: &str) -> Option<u64> {
        action_id.strip_prefix(self.prefix.as_str())?.parse().ok()
    }

    /// The plain success answer to a write of this client at the front of `buf`, read
    /// without making a message of it: `(sequence number, its length)`. Only the shape
    /// Asterisk sends, `Response: Success`, `ActionID: <prefix><digits>`, optionally
    /// `Message: Variable Set`, then the empty line, with CRLF line ends and within `limits`;
    /// `None` for anything else, which the decoder then reads as any message (and
    /// [`Shared::answer`] takes). The same as decoding that message and matching its
    /// `ActionID` with [`Shared::seq_of`] (a test compares the two).
    pub(crate) fn success_at_front(&self, buf: &[u8], limits: Limits) -> Option<(u64, usize)> {
        const RESPONSE: &[u8] = b"Response: Success\r\n";
        const MESSAGE: &[u8] = b"Message: Variable Set\r\n";
        let rest = buf
            .strip_prefix(RESPONSE)?
            .strip_prefix(b"ActionID: ".as_slice())?;
        let rest = rest.strip_prefix(self.prefix.as_bytes())?;
        // 19 digits always fit a u64.
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=19).contains(&digits) {
            return None;
        }
        let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let rest = rest[digits..].strip_prefix(b"\r\n")?;
        let (rest, headers) = match rest.strip_prefix(MESSAGE) {
            Some(rest) => (rest, 3),
            None => (rest, 2),
        };
        if !rest.starts_with(b"\r\n") {
            return None;
        }
        let len = buf.len() - rest.len() + 2;
        let id_line = "ActionID: ".len() + self.prefix.len() + digits;
        let longest = id_line.max(MESSAGE.len() - 2);
        if len > limits.max_message || longest > limits.max_line || headers > limits.max_headers {
            return None;
        }
        Some((seq, len))
    }

    /// Reports the write numbered `seq` answered by `m`; false when no such write waits
    /// (already expired, or not ours).
    pub(crate) fn answer(&self, seq: u64, m: &Message) -> bool {
        let result = match m.response() {
            Some(r) if r.eq_ignore_ascii_case("success") => Ok(()),
            Some(r) if r.eq_ignore_ascii_case("error") => Err(WriteError::Refused(
                m.get("Message").unwrap_or("").to_owned(),
            )),
            _ => Err(WriteError::Malformed(format!("{m:?}"))),
        };
        self.finish(seq, result)
    }

    /// Reports the write numbered `seq` finished with `result`; false when no such write
    /// waits (already expired, or not ours).
    pub(crate) fn finish(&self, seq: u64, result: Result<(), WriteError>) -> bool {
        let mut st = self.lock();
        let Some(token) = st.answered(seq) else {
            return false;
        };
        self.done.push(WriteDone { token, result });
        st.trim();
        st.wake_conn(self);
        true
    }

    /// Reports the writes numbered `seqs` answered `Response: Success`: each as
    /// [`Shared::finish`] would, in order, all under one lock of each list; returns how many
    /// of them waited for no such write (already expired, or not ours).
    pub(crate) fn succeeded(&self, seqs: &[u64]) -> usize {
        let mut st = self.lock();
        let mut unknown = 0;
        {
            let mut done = self.done.items();
            let was_empty = done.is_empty();
            for &seq in seqs {
                match st.answered(seq) {
                    Some(token) => done.push(WriteDone {
                        token,
                        result: Ok(()),
                    }),
                    None => unknown += 1,
                }
            }
            if was_empty && !done.is_empty() {
                self.done.notify.notify_one();
            }
        }
        st.trim();
        st.wake_conn(self);
        unknown
    }

    /// Fails the writes unanswered for `after` (as of `now`); those still held are dropped
    /// unsent (as an action whose caller gave up is never sent).
    pub(crate) fn expire(&self, now: Instant, after: Duration) {
        let mut st = self.lock();
        // The buffered writes are the last slots (every one open: no answer comes unsent).
        let first_buffered = st.slots.len() - st.out_lens.len();
        let mut unsent = 0;
        let mut i = 0;
        while let Some(s) = st.slots.get(i) {
            if s.at + after > now {
                break;
            }
            if i >= first_buffered {
                unsent += 1;
            }
            if s.open {
                let token = s.token;
                st.slots[i].open = false;
                st.open -= 1;
                let err = ClientError::Timeout {
                    action: "Setvar".to_owned(),
                    after,
                };
                self.done.push(WriteDone {
                    token,
                    result: Err(err.into()),
                });
            }
            i += 1;
        }
        let bytes: usize = st.out_lens.drain(..unsent).sum();
        st.out.advance(bytes);
        st.trim();
        st.wake_conn(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut b = BytesMut::new();
            put_decimal(&mut b, n);
            assert_eq!(&b[..], n.to_string().as_bytes());
        }
    }

    /// What `take_out` hands over is the writes' bytes in order, whether it trades buffers
    /// (all taken, into an empty one) or copies (a part taken, or into one holding bytes), and
    /// the writer keeps working on the buffer it got back.
    #[test]
    fn take_out_hands_over_the_writes_in_order() {
        let shared = Shared::new("p-");
        let w = SetvarWriter::new(Arc::clone(&shared));
        shared.open();
        let at = Instant::now();
        let write = |seq: u64, v: &str| {
            format!("Action: Setvar\r\nActionID: p-w{seq}\r\nVariable: V\r\nValue: {v}\r\n\r\n")
        };
        // All of it, into an empty buffer.
        w.setvar(0, "V", "a", at);
        w.setvar(1, "V", "b", at);
        let mut dst = BytesMut::new();
        assert_eq!(shared.take_out(&mut dst, 64), (2, false));
        assert_eq!(
            dst,
            format!("{}{}", write(0, "a"), write(1, "b")).as_bytes()
        );
        // Into a buffer holding bytes (another action): appended.
        w.setvar(2, "V", "c", at);
        assert_eq!(shared.take_out(&mut dst, 64), (1, false));
        let expected = format!("{}{}{}", write(0, "a"), write(1, "b"), write(2, "c"));
        assert_eq!(dst, expected.as_bytes());
        // A part of it, then the rest (into an emptied buffer).
        dst.clear();
        for (t, v) in [(3, "d"), (4, "e"), (5, "f")] {
            w.setvar(t, "V", v, at);
        }
        assert_eq!(shared.take_out(&mut dst, 2).0, 2);
        assert_eq!(
            dst,
            format!("{}{}", write(3, "d"), write(4, "e")).as_bytes()
        );
        dst.clear();
        assert_eq!(shared.take_out(&mut dst, 2), (1, false));
        assert_eq!(dst, write(5, "f").as_bytes());
        assert_eq!(shared.take_out(&mut dst, 2), (0, false));
        assert_eq!(dst, write(5, "f").as_bytes());
    }

    /// `succeeded` reports what `finish(seq, Ok(()))` of each would, in the same order.
    #[test]
    fn successes_together_are_each_one_finished() {
        let run = |together: bool| {
            let shared = Shared::new("p-");
            let w = SetvarWriter::new(Arc::clone(&shared));
            shared.open();
            for t in 0..6 {
                w.setvar(100 + t, "V", "x", Instant::now());
            }
            let mut dst = BytesMut::new();
            shared.take_out(&mut dst, 64);
            // Out of order, one twice, one never written.
            let seqs = [3, 0, 3, 9, 1, 5];
            let unknown = if together {
                shared.succeeded(&seqs)
            } else {
                seqs.iter().filter(|&&s| !shared.finish(s, Ok(()))).count()
            };
            let mut got = Vec::new();
            w.take(&mut got);
            let tokens: Vec<u64> = got.iter().map(|d| d.token).collect();
            assert!(got.iter().all(|d| d.result.is_ok()));
            (unknown, tokens, w.in_flight())
        };
        assert_eq!(run(true), (2, vec![103, 100, 101, 105], 2));
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn the_timeout_counts_from_the_start_given() {
        let shared = Shared::new("hf1-");
        let w = SetvarWriter::new(Arc::clone(&shared));
        shared.open();
        let t0 = Instant::now();
        w.setvar(1, "V", "x", t0);
        w.setvar(2, "V", "y", t0 + Duration::from_secs(5));
        // 12 s after the first start only the first has waited the 10 s.
        shared.expire(t0 + Duration::from_secs(12), Duration::from_secs(10));
        let mut got = Vec::new();
        assert_eq!(w.take(&mut got), 1);
        assert_eq!(got[0].token, 1);
        assert!(matches!(
            got[0].result,
            Err(WriteError::Client(ClientError::Timeout { .. }))
        ));
        assert_eq!(w.in_flight(), 1);
    }

    #[tokio::test]
    async fn answers_out_of_order_expiry_and_loss() {
        let shared = Shared::new("hf1-");
        let w = SetvarWriter::new(Arc::clone(&shared));
        let mut got = Vec::new();
        // Not live: fails at once.
        w.setvar(1, "V", "x", Instant::now());
        w.completed().await;
        assert_eq!(w.take(&mut got), 1);
        assert!(matches!(
            got[0].result,
            Err(WriteError::Client(ClientError::NotConnected))
        ));
        got.clear();

        shared.open();
        for t in 10..14 {
            w.setvar(t, "DEVICE_STATE(Custom:a)", "INUSE", Instant::now());
        }
        let mut out = BytesMut::new();
        assert_eq!(shared.take_out(&mut out, 3), (3, true));
        assert_eq!(shared.take_out(&mut out, 3), (1, false));
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert_eq!(text.matches("Action: Setvar\r\n").count(), 4);
        assert!(text.contains(
            "ActionID: hf1-w3\r\nVariable: DEVICE_STATE(Custom:a)\r\nValue: INUSE\r\n\r\n"
        ));
        let ok = Message::new().with("Response", "Success");
        let bad = Message::new()
            .with("Response", "Error")
            .with("Message", "No");
        assert_eq!(shared.seq_of("hf1-w2"), Some(2));
        assert_eq!(shared.seq_of("hf1-2"), None);
        assert!(shared.answer(2, &bad));
        assert!(shared.answer(0, &ok));
        assert!(!shared.answer(0, &ok), "answered once");
        assert_eq!(w.in_flight(), 2);
        // Seq 1 and 3 expire; their late answers are ignored.
        shared.expire(
            Instant::now() + Duration::from_secs(60),
            Duration::from_secs(10),
        );
        assert!(!shared.answer(1, &ok));
        w.take(&mut got);
        let r: Vec<(u64, &str)> = got
            .iter()
            .map(|d| {
                let k = match &d.result {
                    Ok(()) => "ok",
                    Err(WriteError::Refused(_)) => "refused",
                    Err(WriteError::Client(ClientError::Timeout { .. })) => "timeout",
                    Err(_) => "other",
                };
                (d.token, k)
            })
            .collect();
        assert_eq!(
            r,
            vec![
                (12, "refused"),
                (10, "ok"),
                (11, "timeout"),
                (13, "timeout")
            ]
        );
        got.clear();

        w.setvar(20, "V", "1", Instant::now());
        w.setvar(21, "V", "bad\r\nAction: Logoff", Instant::now());
        shared.close(
            &ClientError::Disconnected {
                reason: "gone".into(),
            },
            ClientError::NotConnected,
        );
        w.take(&mut got);
        assert_eq!(got.len(), 2);
        assert!(matches!(
            got[0].result,
            Err(WriteError::Client(ClientError::InvalidAction(_)))
        ));
        assert!(matches!(
            got[1].result,
            Err(WriteError::Client(ClientError::Disconnected { .. }))
        ));
        let mut out = BytesMut::new();
        assert_eq!(
            shared.take_out(&mut out, 8),
            (0, false),
            "unsent bytes dropped"
        );
    }

    #[test]
    fn writes_are_held_while_enough_are_unanswered_and_dropped_unsent_on_expiry() {
        let shared = Shared::new("hf1-");
        let w = SetvarWriter::new(Arc::clone(&shared));
        shared.open();
        for t in 0..200 {
            w.setvar(t, "V", "x", Instant::now());
        }
        let mut out = BytesMut::new();
        assert_eq!(shared.take_out(&mut out, 64), (64, true));
        assert_eq!(
            shared.take_out(&mut out, 64),
            (64, true),
            "72 wait: a batch"
        );
        // 192 written and unanswered, 8 buffered: held.
        assert_eq!(shared.take_out(&mut out, 64), (64, false));
        assert!(!shared.lock().conn_woken);
        let ok = Message::new().with("Response", "Success");
        for seq in 0..64 {
            assert!(shared.answer(seq, &ok));
        }
        assert!(!shared.lock().conn_woken, "128 still unanswered");
        assert!(shared.answer(64, &ok));
        assert!(shared.lock().conn_woken, "127 unanswered: the 8 go out");
        // Every one times out: the 8 never sent are dropped, not written late.
        shared.expire(
            Instant::now() + Duration::from_secs(60),
            Duration::from_secs(10),
        );
        assert_eq!(w.in_flight(), 0);
        let mut rest = BytesMut::new();
        assert_eq!(shared.take_out(&mut rest, 64), (0, false));
        assert!(rest.is_empty());
        let mut got = Vec::new();
        assert_eq!(w.take(&mut got), 200);
    }
}
