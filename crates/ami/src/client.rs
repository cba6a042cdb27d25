//! [`AmiClient`]: an async AMI client that stays connected.
//!
//! One task owns the socket. [`AmiClient`] is a cheap cloneable handle: it sends requests over a
//! bounded mpsc channel and gets each answer on a oneshot, correlated by an `ActionID` the task
//! generates (a per-client random prefix and a counter). The task connects (optionally over
//! TLS), reads the banner, logs in (plain or MD5 challenge), then serves requests, routes list
//! items to the pending list action carrying their `ActionID`, broadcasts every other event,
//! pings the server every `ping_interval`, and after any failure fails every pending action with
//! [`ClientError::Disconnected`] and reconnects with capped exponential backoff and jitter, until
//! [`AmiClient::shutdown`] (or until every handle is dropped).
//!
//! Each subscriber has its own queue of `event_buffer` events, holding an event only until the
//! subscriber takes it (a broadcast ring would keep the last `event_buffer` events for good:
//! 16,384 of them cost an agent ~4 MB). The client never waits for a subscriber: one that
//! falls behind loses the events that find its queue full, and reads, where they are missing,
//! how many ([`broadcast::error::RecvError::Lagged`]); from a loss until it reads that marker,
//! every event is lost (at the marker), so that what follows the marker is whole: a consumer
//! that resyncs on the marker can trust the events after it. The stream also carries
//! [`ClientEvent::Connected`] / [`ClientEvent::Disconnected`] markers so a consumer can resync
//! after each reconnect.

use std::collections::HashMap;
use std::fmt;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use crate::actions;
use crate::codec::{AmiCodec, CodecError, Frame, Limits, encode_message};
use crate::events::{ListComplete, Response, ResponseKind, starts_list};
use crate::message::Message;
use crate::writer::{self, SetvarWriter};

/// A password that never shows in `Debug` or `Display` output (both print `****`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the login action only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// How to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Auth {
    /// `Challenge`, then `Login` with `Key: md5(challenge + secret)`: the secret never crosses
    /// the wire.
    #[default]
    Md5,
    /// `Login` with `Secret` in plain text (use with TLS, or on loopback).
    Plain,
}

/// AMI over TLS (Asterisk's `tlsenable`, port 5039 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Name the server certificate must hold (and the SNI sent).
    pub server_name: String,
    /// Extra CA certificates (PEM) trusted besides the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. For tests and labs only: it defeats TLS authentication.
    pub insecure_skip_verify: bool,
}

/// Everything the client needs; build it with [`ClientConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the AMI server.
    pub addr: String,
    /// AMI user (`[name]` in `manager.conf`).
    pub username: String,
    /// That user's secret.
    pub secret: Secret,
    /// Login method. Default [`Auth::Md5`].
    pub auth: Auth,
    /// TLS settings; `None` (default) for plain TCP.
    pub tls: Option<TlsConfig>,
    /// `Events:` mask sent with `Login`, e.g. `on`, `off` or `system,call`. Default `on`.
    pub events: String,
    /// Event filters added after each login ([`actions::filter_add`]; e.g. `!Device: Custom:`
    /// drops the `DeviceStateChange` of every `Custom:` device), unless `events` is `off`.
    /// One Asterisk refuses (no `write = system`, or older than 10): logged (info), and its
    /// events arrive as manager.conf filters them. Default none.
    pub event_filters: Vec<String>,
    /// How long an action (or a whole list action) may wait for its answer. Default 10 s.
    pub action_timeout: Duration,
    /// How long connecting (TCP and TLS) may take. Default 10 s.
    pub connect_timeout: Duration,
    /// How long [`AmiClient::shutdown`] waits for the `Logoff` answer before closing anyway.
    /// Default 2 s.
    pub logoff_timeout: Duration,
    /// Interval between keepalive `Ping`s. Default 20 s.
    pub ping_interval: Duration,
    /// A `Ping` unanswered this long drops the connection. Default 10 s.
    pub ping_timeout: Duration,
    /// First reconnect delay. Default 500 ms.
    pub backoff_initial: Duration,
    /// Largest reconnect delay. Default 30 s.
    pub backoff_max: Duration,
    /// Events each subscriber may fall behind before it loses the next ones. Default 4096.
    pub event_buffer: usize,
    /// Requests queued towards the connection task before `send` waits. Default 256.
    pub request_buffer: usize,
    /// Decoder limits. Default [`Limits::default`].
    pub limits: Limits,
}

impl ClientConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(
        addr: impl Into<String>,
        username: impl Into<String>,
        secret: impl Into<Secret>,
    ) -> Self {
        Self {
            addr: addr.into(),
            username: username.into(),
            secret: secret.into(),
            auth: Auth::Md5,
            tls: None,
            events: "on".to_owned(),
            event_filters: Vec::new(),
            action_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            logoff_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            event_buffer: 4096,
            request_buffer: 256,
            limits: Limits::default(),
        }
    }
}

/// Errors of [`AmiClient`] calls (and reasons a connection attempt failed).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The client is not connected and logged in right now; nothing was sent.
    #[error("not connected to AMI")]
    NotConnected,
    /// The connection dropped before the answer arrived; the action may or may not have run.
    #[error("AMI connection lost before the answer: {reason}")]
    Disconnected {
        /// Why the connection dropped.
        reason: String,
    },
    /// No answer within `action_timeout`.
    #[error("AMI action {action} got no answer within {after:?}")]
    Timeout {
        /// The action's name.
        action: String,
        /// The timeout in force.
        after: Duration,
    },
    /// The server refused the login (`Response: Error`).
    #[error("AMI login refused: {message}")]
    AuthFailed {
        /// The server's `Message`, e.g. `Authentication failed`.
        message: String,
    },
    /// The action cannot be encoded (CR/LF in a value, bad key); nothing was sent.
    #[error("invalid AMI action: {0}")]
    InvalidAction(String),
    /// Connecting, TLS or the socket failed.
    #[error("AMI connection failed: {0}")]
    Connect(String),
    /// The server broke the protocol (no banner, garbage, limits exceeded).
    #[error("AMI protocol error: {0}")]
    Protocol(String),
    /// The client was shut down (or every handle dropped).
    #[error("AMI client shut down")]
    Shutdown,
}

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting or logging in (attempt counts from 1 since the last session that lasted at
    /// least `backoff_max`).
    Connecting {
        /// Attempt number.
        attempt: u32,
    },
    /// Logged in; actions are served.
    Connected {
        /// Counts successful logins since start, from 1.
        generation: u64,
        /// The server's banner, e.g. `Asterisk Call Manager/13.0.0`.
        banner: String,
    },
    /// Waiting before the next attempt.
    Disconnected {
        /// Why the last attempt or session ended.
        reason: String,
    },
    /// Shut down; the task has ended.
    Stopped,
}

/// What subscribers receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Logged in (again): state read before this point may be stale, resync now.
    Connected {
        /// The server's banner.
        banner: String,
        /// Counts successful logins since start, from 1.
        generation: u64,
    },
    /// An event that is not an item of a pending list action.
    Event(Message),
    /// The session of `generation` ended; events may be missed until the next `Connected`.
    Disconnected {
        /// The generation that ended.
        generation: u64,
        /// Why it ended.
        reason: String,
    },
}

/// A list action's complete answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    /// The response (`EventList: start` on success; `Response: Error` with no list otherwise).
    pub response: Message,
    /// The item events carrying the action's `ActionID`, in order.
    pub items: Vec<Message>,
    /// The `...ListComplete` event; `None` when the action answered an error.
    pub complete: Option<Message>,
}

impl ListResult {
    /// True when the response was a success.
    pub fn is_success(&self) -> bool {
        Response::from_message(&self.response).is_some_and(|r| r.is_success())
    }
}

/// What a subscriber's queue carries.
#[derive(Debug)]
enum Item {
    Event(ClientEvent),
    /// Events are missing here: how many is in [`Lost::count`].
    Lagged,
}

/// Events a subscriber lost, shared by its queue's two ends (under one lock: the sender
/// decides whether to queue an event and the receiver takes the marker's count atomically).
#[derive(Debug, Default)]
struct Lost(Mutex<LostState>);

#[derive(Debug, Default)]
struct LostState {
    count: u64,
    /// An [`Item::Lagged`] waits in the queue.
    marked: bool,
}

impl Lost {
    fn lock(&self) -> std::sync::MutexGuard<'_, LostState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending end of one subscriber.
#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Item>,
    lost: Arc<Lost>,
}

impl Subscriber {
    /// Queues `ev`, or counts it lost when the queue is full (the last slot is kept for the
    /// marker that tells the subscriber where events are missing) or a marker waits in it:
    /// an event queued after the marker would let the subscriber take what follows the
    /// marker as whole while later losses were counted in the marker.
    fn deliver(&self, ev: ClientEvent) {
        let mut lost = self.lost.lock();
        if !lost.marked && self.tx.capacity() > 1 && self.tx.try_send(Item::Event(ev)).is_ok() {
            return;
        }
        lost.count += 1;
        if !lost.marked {
            lost.marked = self.tx.try_send(Item::Lagged).is_ok();
        }
    }
}

/// The subscribers of one client (shared by its handles and its connection task).
#[derive(Debug, Clone, Default)]
struct Subscribers(Arc<Mutex<Vec<Subscriber>>>);

impl Subscribers {
    fn add(&self, buffer: usize) -> Subscription {
        // One slot more than the buffer: the marker's.
        let (tx, rx) = mpsc::channel(buffer.max(1) + 1);
        let lost = Arc::new(Lost::default());
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Subscriber {
                tx,
                lost: lost.clone(),
            });
        Subscription {
            rx,
            lost,
            taken: Vec::new(),
            marker_taken: false,
        }
    }

    /// Gives `ev` to every subscriber still listening (no receiver is fine: nothing is kept).
    fn send(&self, ev: ClientEvent) {
        let mut subs = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        subs.retain(|s| !s.tx.is_closed());
        if let Some((last, others)) = subs.split_last() {
            for s in others {
                s.deliver(ev.clone());
            }
            last.deliver(ev);
        }
    }
}

/// A subscriber's receiving end; see [`AmiClient::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Item>,
    lost: Arc<Lost>,
    /// What [`Subscription::recv_many`] takes from the queue at once (kept for its room).
    taken: Vec<Item>,
    /// [`Subscription::recv_many`] took a marker after events: the next call reports it.
    /// (Nothing is queued behind a marker until its count is taken: see
    /// [`Subscriber::deliver`].)
    marker_taken: bool,
}

impl Subscription {
    /// The next event. `Err(Lagged(n))`: this subscriber fell behind and lost `n` events at
    /// this point of the stream (the next call goes on after them). `Err(Closed)`: the client
    /// stopped.
    pub async fn recv(&mut self) -> Result<ClientEvent, broadcast::error::RecvError> {
        if let Some(n) = self.taken_marker() {
            return Err(broadcast::error::RecvError::Lagged(n));
        }
        loop {
            match self.rx.recv().await {
                Some(Item::Event(ev)) => return Ok(ev),
                Some(Item::Lagged) => match self.take_lost() {
                    0 => {}
                    n => return Err(broadcast::error::RecvError::Lagged(n)),
                },
                None => return Err(broadcast::error::RecvError::Closed),
            }
        }
    }

    /// [`Subscription::recv`] for a batch: waits for the next event, then appends it and the
    /// events queued behind it to `events`, at most `limit` (at least one) in all, and
    /// returns how many. A batch ends where events are missing: `Err(Lagged(n))` comes from
    /// the call after the events before the loss, and the call after it goes on after them,
    /// exactly as [`Subscription::recv`] would tell them one by one. `Err(Closed)`: the
    /// client stopped.
    pub async fn recv_many(
        &mut self,
        events: &mut Vec<ClientEvent>,
        limit: usize,
    ) -> Result<usize, broadcast::error::RecvError> {
        loop {
            if let Some(n) = self.taken_marker() {
                return Err(broadcast::error::RecvError::Lagged(n));
            }
            if self.rx.recv_many(&mut self.taken, limit.max(1)).await == 0 {
                return Err(broadcast::error::RecvError::Closed);
            }
            let before = events.len();
            for item in self.taken.drain(..) {
                debug_assert!(!self.marker_taken, "an item queued behind a marker");
                match item {
                    Item::Event(ev) => events.push(ev),
                    Item::Lagged => self.marker_taken = true,
                }
            }
            if events.len() > before {
                return Ok(events.len() - before);
            }
        }
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Result<ClientEvent, broadcast::error::TryRecvError> {
        use mpsc::error::TryRecvError;
        if let Some(n) = self.taken_marker() {
            return Err(broadcast::error::TryRecvError::Lagged(n));
        }
        loop {
            match self.rx.try_recv() {
                Ok(Item::Event(ev)) => return Ok(ev),
                Ok(Item::Lagged) => match self.take_lost() {
                    0 => {}
                    n => return Err(broadcast::error::TryRecvError::Lagged(n)),
                },
                Err(TryRecvError::Empty) => return Err(broadcast::error::TryRecvError::Empty),
                Err(TryRecvError::Disconnected) => {
                    return Err(broadcast::error::TryRecvError::Closed);
                }
            }
        }
    }

    /// The count of the marker [`Subscription::recv_many`] took last, if it took one and
    /// it is not reported yet (`None` too for a marker of no loss).
    fn taken_marker(&mut self) -> Option<u64> {
        if !std::mem::take(&mut self.marker_taken) {
            return None;
        }
        match self.take_lost() {
            0 => None,
            n => Some(n),
        }
    }

    /// The events lost up to the marker just taken (the next loss queues a new marker).
    fn take_lost(&self) -> u64 {
        let mut lost = self.lost.lock();
        lost.marked = false;
        std::mem::take(&mut lost.count)
    }
}

enum Request {
    Action {
        msg: Message,
        reply: oneshot::Sender<Result<Message, ClientError>>,
    },
    List {
        msg: Message,
        items: Items,
        reply: oneshot::Sender<Result<ListResult, ClientError>>,
    },
}

/// Where a list's item events go.
enum Items {
    /// Kept for the [`ListResult`].
    Kept(Vec<Message>),
    /// Handed to the caller's function as they arrive ([`AmiClient::list_each`]).
    Each(Box<dyn FnMut(Message) + Send>),
}

impl Items {
    fn push(&mut self, m: Message) {
        match self {
            Items::Kept(v) => v.push(m),
            Items::Each(f) => f(m),
        }
    }

    fn into_kept(self) -> Vec<Message> {
        match self {
            Items::Kept(v) => v,
            Items::Each(_) => Vec::new(),
        }
    }
}

impl Request {
    fn fail(self, err: ClientError) {
        // The caller may have given up (timeout): nobody to tell then.
        match self {
            Request::Action { reply, .. } => drop(reply.send(Err(err))),
            Request::List { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

/// Cloneable handle to one AMI connection task; see the module docs.
#[derive(Clone, Debug)]
pub struct AmiClient {
    requests: mpsc::Sender<Request>,
    events: Subscribers,
    event_buffer: usize,
    state: watch::Receiver<ConnectionState>,
    stop: CancellationToken,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
    action_timeout: Duration,
    writer: Arc<writer::Shared>,
}

impl AmiClient {
    /// Spawns the connection task (on the current Tokio runtime) and returns at once; the task
    /// connects, logs in and keeps reconnecting until [`AmiClient::shutdown`] or until every
    /// handle is dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime (as `tokio::spawn` does).
    pub fn start(config: ClientConfig) -> Self {
        let (req_tx, req_rx) = mpsc::channel(config.request_buffer.max(1));
        let ev_tx = Subscribers::default();
        let event_buffer = config.event_buffer;
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting { attempt: 1 });
        let stop = CancellationToken::new();
        let prefix = format!("hf{:08x}-", rand::rng().random::<u32>());
        let action_timeout = config.action_timeout;
        let writer = writer::Shared::new(&prefix);
        let conn = Connection {
            config,
            requests: req_rx,
            events: ev_tx.clone(),
            state: state_tx,
            stop: stop.clone(),
            ids: IdGen { prefix, next: 0 },
            writer: Arc::clone(&writer),
        };
        let task = tokio::spawn(conn.run());
        Self {
            requests: req_tx,
            events: ev_tx,
            event_buffer,
            state: state_rx,
            stop,
            task: Arc::new(Mutex::new(Some(task))),
            action_timeout,
            writer,
        }
    }

    /// A handle writing pipelined `Setvar`s through this client's connection without a
    /// future per write; see [`SetvarWriter`]. Every handle of one client shares one queue of
    /// completions: use one writer per client.
    pub fn setvar_writer(&self) -> SetvarWriter {
        SetvarWriter::new(Arc::clone(&self.writer))
    }

    /// Sends `action` and returns its response (also a `Response: Error` one: inspect it, e.g.
    /// with [`Response::from_message`]). The client sets the `ActionID` (replacing any given).
    /// Fails fast with [`ClientError::NotConnected`] while not logged in,
    /// [`ClientError::Timeout`] after `action_timeout`, [`ClientError::Disconnected`] if the
    /// connection drops first.
    pub async fn send(&self, action: Message) -> Result<Message, ClientError> {
        let name = action.action_name().unwrap_or_default().to_owned();
        self.ensure_connected()?;
        let (reply, rx) = oneshot::channel();
        self.request(Request::Action { msg: action, reply }, rx, name)
            .await
    }

    /// Sends a list action (e.g. [`actions::device_state_list`]) and collects its answer: the
    /// `EventList: start` response, every item event carrying its `ActionID`, and the
    /// `...Complete` event. A `Response: Error` answer returns at once with no items. The whole
    /// list must arrive within `action_timeout`. Errors as for [`AmiClient::send`].
    pub async fn list(&self, action: Message) -> Result<ListResult, ClientError> {
        self.list_into(action, Items::Kept(Vec::new())).await
    }

    /// [`AmiClient::list`], handing each item event to `on_item` as it arrives (in order, on
    /// the connection's task: keep it short) instead of keeping it: the returned
    /// [`ListResult::items`] is empty. A list of 100,000 device states is then never held as
    /// messages at once (~400 bytes each). After an error or a timeout `on_item` may have seen
    /// part of the list.
    pub async fn list_each(
        &self,
        action: Message,
        on_item: impl FnMut(Message) + Send + 'static,
    ) -> Result<ListResult, ClientError> {
        self.list_into(action, Items::Each(Box::new(on_item))).await
    }

    async fn list_into(&self, action: Message, items: Items) -> Result<ListResult, ClientError> {
        let name = action.action_name().unwrap_or_default().to_owned();
        self.ensure_connected()?;
        let (reply, rx) = oneshot::channel();
        self.request(
            Request::List {
                msg: action,
                items,
                reply,
            },
            rx,
            name,
        )
        .await
    }

    fn ensure_connected(&self) -> Result<(), ClientError> {
        match &*self.state.borrow() {
            ConnectionState::Connected { .. } => Ok(()),
            ConnectionState::Stopped => Err(ClientError::Shutdown),
            _ => Err(ClientError::NotConnected),
        }
    }

    async fn request<T>(
        &self,
        req: Request,
        rx: oneshot::Receiver<Result<T, ClientError>>,
        action: String,
    ) -> Result<T, ClientError> {
        let exchange = async {
            self.requests
                .send(req)
                .await
                .map_err(|_| ClientError::Shutdown)?;
            rx.await.map_err(|_| ClientError::Shutdown)?
        };
        timeout(self.action_timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                action,
                after: self.action_timeout,
            })?
    }

    /// A new subscriber, receiving events from now on (see [`Subscription::recv`]).
    pub fn subscribe(&self) -> Subscription {
        self.events.add(self.event_buffer)
    }

    /// The connection state now.
    pub fn status(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// A watch of the connection state, to await changes.
    pub fn state_watch(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// True while logged in.
    pub fn is_connected(&self) -> bool {
        matches!(*self.state.borrow(), ConnectionState::Connected { .. })
    }

    /// Waits until logged in, at most `within`; false on timeout or shutdown.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let mut state = self.state.clone();
        let waited = timeout(
            within,
            state.wait_for(|s| {
                matches!(
                    s,
                    ConnectionState::Connected { .. } | ConnectionState::Stopped
                )
            }),
        )
        .await;
        matches!(waited, Ok(Ok(s)) if matches!(*s, ConnectionState::Connected { .. }))
    }

    /// Logs off (when connected, waiting at most `logoff_timeout` for `Goodbye`), closes the
    /// connection, fails pending actions with [`ClientError::Shutdown`] and waits for the task
    /// to end. Idempotent; every clone of the handle sees the client stopped.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(task) = task
            && let Err(e) = task.await
        {
            warn!(error = %e, "AMI client task ended abnormally");
        }
    }
}

/// Any byte stream the client can run AMI over (TCP or TLS over TCP).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = Framed<Box<dyn Io>, ClientCodec>;

/// The client's framing: [`AmiCodec`], except that the plain success answer to a write of its
/// [`SetvarWriter`] is taken as just the write's number (see
/// [`writer::Shared::success_at_front`]): the most frequent message of a relay's connection
/// never becomes a [`Message`].
struct ClientCodec {
    ami: AmiCodec,
    writer: Arc<writer::Shared>,
}

/// What [`ClientCodec`] yields.
#[derive(Debug)]
enum Incoming {
    Frame(Frame),
    /// `Response: Success` to the [`SetvarWriter`] write of this number.
    Written(u64),
}

impl tokio_util::codec::Decoder for ClientCodec {
    type Item = Incoming;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut bytes::BytesMut) -> Result<Option<Incoming>, CodecError> {
        if self.ami.between_messages()
            && let Some((seq, len)) = self.writer.success_at_front(buf, self.ami.limits())
        {
            bytes::Buf::advance(buf, len);
            return Ok(Some(Incoming::Written(seq)));
        }
        Ok(self.ami.decode(buf)?.map(Incoming::Frame))
    }

    fn decode_eof(&mut self, buf: &mut bytes::BytesMut) -> Result<Option<Incoming>, CodecError> {
        if let Some(item) = self.decode(buf)? {
            return Ok(Some(item));
        }
        Ok(self.ami.decode_eof(buf)?.map(Incoming::Frame))
    }
}

impl tokio_util::codec::Encoder<&Message> for ClientCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &Message, dst: &mut bytes::BytesMut) -> Result<(), CodecError> {
        encode_message(msg, dst)
    }
}

/// Actions buffered at most before one flush writes them out.
const MAX_BATCH: usize = 64;

/// Frames (answers, events) taken at most in one pass of a session's loop.
const MAX_FRAMES_AT_ONCE: usize = 256;

/// Why a session ended.
enum End {
    /// Shut down on request: stop.
    Stop,
    /// Failed: reconnect.
    Lost(String),
}

enum Pending {
    Action(oneshot::Sender<Result<Message, ClientError>>),
    List {
        response: Option<Message>,
        items: Items,
        reply: oneshot::Sender<Result<ListResult, ClientError>>,
    },
}

impl Pending {
    fn is_closed(&self) -> bool {
        match self {
            Pending::Action(r) => r.is_closed(),
            Pending::List { reply, .. } => reply.is_closed(),
        }
    }

    fn fail(self, err: ClientError) {
        match self {
            Pending::Action(r) => drop(r.send(Err(err))),
            Pending::List { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

struct Connection {
    config: ClientConfig,
    requests: mpsc::Receiver<Request>,
    events: Subscribers,
    state: watch::Sender<ConnectionState>,
    stop: CancellationToken,
    ids: IdGen,
    /// Writes of the [`SetvarWriter`]s.
    writer: Arc<writer::Shared>,
}

/// ActionIDs of one client: a random per-client prefix and a counter.
struct IdGen {
    prefix: String,
    next: u64,
}

impl IdGen {
    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}{}", self.prefix, self.next)
    }
}

impl Connection {
    /// The connection task. Never logs the secret: only the address and user name.
    #[instrument(name = "ami_client", skip_all, fields(addr = %self.config.addr))]
    async fn run(mut self) {
        let mut generation = 0u64;
        let mut attempt = 0u32;
        let mut auth_streak = false;
        loop {
            attempt += 1;
            self.state
                .send_replace(ConnectionState::Connecting { attempt });
            let connected = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                r = connect_and_login(&self.config, &mut self.ids, &self.writer) => r,
                // Nothing is served before login: answer at once rather than queue.
                () = reject_requests(&mut self.requests) => break,
            };
            let reason = match connected {
                Ok((conn, banner, early_events)) => {
                    generation += 1;
                    auth_streak = false;
                    let session_start = Instant::now();
                    info!(generation, %banner, "AMI logged in");
                    self.writer.open();
                    self.state.send_replace(ConnectionState::Connected {
                        generation,
                        banner: banner.clone(),
                    });
                    self.events
                        .send(ClientEvent::Connected { banner, generation });
                    for ev in early_events {
                        self.events.send(ClientEvent::Event(ev));
                    }
                    let end = self.serve(conn).await;
                    // A session that lasted resets the backoff; one that drops at once (a
                    // flapping server) keeps it growing.
                    if session_start.elapsed() >= self.config.backoff_max {
                        attempt = 0;
                    }
                    let reason = match end {
                        End::Stop => {
                            self.events.send(ClientEvent::Disconnected {
                                generation,
                                reason: "shut down".to_owned(),
                            });
                            break;
                        }
                        End::Lost(reason) => reason,
                    };
                    warn!(generation, %reason, "AMI connection lost");
                    self.events.send(ClientEvent::Disconnected {
                        generation,
                        reason: reason.clone(),
                    });
                    reason
                }
                Err(ClientError::AuthFailed { message }) => {
                    if auth_streak {
                        debug!(%message, attempt, "AMI login refused again");
                    } else {
                        error!(username = %self.config.username, %message,
                            "AMI login refused: check username and secret");
                        auth_streak = true;
                    }
                    format!("login refused: {message}")
                }
                Err(e) => {
                    // A server down for long: say so at once, then only now and then.
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        warn!(error = %e, attempt, "AMI connection attempt failed");
                    } else {
                        debug!(error = %e, attempt, "AMI connection attempt failed");
                    }
                    e.to_string()
                }
            };
            self.state
                .send_replace(ConnectionState::Disconnected { reason });
            let delay = backoff(
                self.config.backoff_initial,
                self.config.backoff_max,
                attempt.max(1),
            );
            debug!(?delay, "AMI reconnect backoff");
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                () = sleep(delay) => {}
                () = reject_requests(&mut self.requests) => break,
            }
        }
        self.requests.close();
        while let Ok(req) = self.requests.try_recv() {
            req.fail(ClientError::Shutdown);
        }
        self.writer
            .close(&ClientError::Shutdown, ClientError::Shutdown);
        self.state.send_replace(ConnectionState::Stopped);
        info!("AMI client stopped");
    }
}

/// Connects, reads the banner and logs in. Returns the framed connection, the banner and any
/// event received before the login answer.
async fn connect_and_login(
    cfg: &ClientConfig,
    ids: &mut IdGen,
    writer: &Arc<writer::Shared>,
) -> Result<(Conn, String, Vec<Message>), ClientError> {
    {
        let tcp = timeout(cfg.connect_timeout, TcpStream::connect(&cfg.addr))
            .await
            .map_err(|_| {
                ClientError::Connect(format!("connect timed out after {:?}", cfg.connect_timeout))
            })?
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &cfg.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let connector = tls_connector(tls)?;
                let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                    .map_err(|e| ClientError::Connect(format!("TLS server name: {e}")))?;
                let stream = timeout(cfg.connect_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| ClientError::Connect("TLS handshake timed out".to_owned()))?
                    .map_err(|e| ClientError::Connect(format!("TLS: {e}")))?;
                Box::new(stream)
            }
        };
        let codec = ClientCodec {
            ami: AmiCodec::with_limits(true, cfg.limits),
            writer: Arc::clone(writer),
        };
        let mut conn = Framed::new(io, codec);
        let banner = match timeout(cfg.action_timeout, conn.next()).await {
            Err(_) => return Err(ClientError::Protocol("no banner".to_owned())),
            Ok(None) => return Err(ClientError::Connect("closed before the banner".to_owned())),
            Ok(Some(Err(e))) => return Err(codec_error(e)),
            Ok(Some(Ok(Incoming::Frame(Frame::Banner(b))))) => b,
            Ok(Some(Ok(_))) => unreachable_frame()?,
        };
        debug!(%banner, "AMI banner");
        let mut early = Vec::new();
        let login = match cfg.auth {
            Auth::Plain => {
                actions::login_plain(&cfg.username, cfg.secret.expose(), Some(&cfg.events))
            }
            Auth::Md5 => {
                let id = ids.next();
                let answer = exchange(cfg, &mut conn, actions::challenge(), id, &mut early).await?;
                let challenge = match (Response::from_message(&answer), answer.get("Challenge")) {
                    (Some(r), Some(c)) if r.kind == ResponseKind::Success => c.to_owned(),
                    (r, _) => {
                        return Err(ClientError::Protocol(format!(
                            "Challenge refused: {}",
                            r.and_then(|r| r.message).unwrap_or_default()
                        )));
                    }
                };
                actions::login_md5(
                    &cfg.username,
                    &challenge,
                    cfg.secret.expose(),
                    Some(&cfg.events),
                )
            }
        };
        let id = ids.next();
        let answer = exchange(cfg, &mut conn, login, id, &mut early).await?;
        match Response::from_message(&answer) {
            Some(r) if r.kind == ResponseKind::Success => {}
            r => {
                return Err(ClientError::AuthFailed {
                    message: r
                        .and_then(|r| r.message)
                        .unwrap_or_else(|| "no message".to_owned()),
                });
            }
        }
        if !cfg.events.eq_ignore_ascii_case("off") {
            for filter in &cfg.event_filters {
                let id = ids.next();
                let answer =
                    exchange(cfg, &mut conn, actions::filter_add(filter), id, &mut early).await?;
                match Response::from_message(&answer) {
                    Some(r) if r.kind == ResponseKind::Success => {
                        debug!(filter = %filter, "AMI event filter added");
                    }
                    // Not a fault: the user may lack `write = system` and have the same
                    // filters as `eventfilter` lines in manager.conf.
                    r => info!(
                        filter = %filter,
                        answer = %r.and_then(|r| r.message).unwrap_or_default(),
                        "Asterisk did not take the event filter; its events arrive unless \
                         manager.conf filters them (eventfilter), or give the AMI user \
                         write = system"
                    ),
                }
            }
        }
        Ok((conn, banner, early))
    }
}

/// Sends one action during login and waits for its response, keeping events aside.
async fn exchange(
    cfg: &ClientConfig,
    conn: &mut Conn,
    mut msg: Message,
    id: String,
    early: &mut Vec<Message>,
) -> Result<Message, ClientError> {
    msg.set("ActionID", id.clone());
    let wait = async {
        conn.send(&msg).await.map_err(codec_error)?;
        loop {
            match conn.next().await {
                None => {
                    return Err(ClientError::Connect(
                        "closed by the server during login".to_owned(),
                    ));
                }
                Some(Err(e)) => return Err(codec_error(e)),
                Some(Ok(Incoming::Frame(Frame::Banner(_)))) => return unreachable_frame(),
                // No write is served before login: not one of ours.
                Some(Ok(Incoming::Written(_))) => {}
                Some(Ok(Incoming::Frame(Frame::Message(m)))) => {
                    if m.event().is_some() {
                        early.push(m);
                    } else if m.action_id() == Some(id.as_str())
                        || (m.action_id().is_none() && m.response().is_some())
                    {
                        return Ok(m);
                    }
                }
            }
        }
    };
    timeout(cfg.action_timeout, wait).await.map_err(|_| {
        ClientError::Protocol(format!(
            "no answer to {} during login",
            msg.action_name().unwrap_or("?")
        ))
    })?
}

impl Connection {
    /// Serves one logged-in session until it fails or the client stops.
    async fn serve(&mut self, mut conn: Conn) -> End {
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut ping: Option<(String, Instant)> = None;
        // Writes answered `Response: Success`, reported together.
        let mut succeeded: Vec<u64> = Vec::new();
        let mut ping_tick = tokio::time::interval_at(
            Instant::now() + self.config.ping_interval,
            self.config.ping_interval,
        );
        ping_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sweep_every = self.config.action_timeout.min(Duration::from_secs(1));
        let mut sweep = tokio::time::interval_at(Instant::now() + sweep_every, sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            let ping_deadline = ping.as_ref().map(|(_, d)| *d);
            tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    self.logoff(&mut conn).await;
                    break End::Stop;
                }
                frame = conn.next() => {
                    // Every frame already read (or readable without waiting), up to a bound,
                    // in this one pass: not one pass of this loop (polling each of its
                    // branches) per answer; the plain successes of writes among them are
                    // reported together (one lock).
                    let mut frame = frame;
                    let mut taken = 1;
                    let lost = loop {
                        let done = &mut succeeded;
                        if let Some(end) = self.on_frame(frame, &mut pending, &mut ping, done) {
                            break Some(end);
                        }
                        if taken == MAX_FRAMES_AT_ONCE {
                            break None;
                        }
                        match futures::poll!(conn.next()) {
                            Poll::Ready(f) => frame = f,
                            Poll::Pending => break None,
                        }
                        taken += 1;
                    };
                    self.written(&mut succeeded);
                    if let Some(end) = lost {
                        break end;
                    }
                }
                () = async { sleep_until(ping_deadline.unwrap_or_else(Instant::now)).await },
                    if ping_deadline.is_some() =>
                {
                    break End::Lost(format!("no answer to Ping within {:?}", self.config.ping_timeout));
                }
                req = self.requests.recv() => match req {
                    None => {
                        // Every handle is gone: nobody can use this client any more.
                        self.logoff(&mut conn).await;
                        break End::Stop;
                    }
                    Some(req) => {
                        // Take what else is queued and write it all with one flush (one
                        // syscall for a burst of pipelined actions).
                        let mut r = self.submit(&mut conn, req, &mut pending);
                        let mut n = 1;
                        while r.is_ok() && n < MAX_BATCH {
                            match self.requests.try_recv() {
                                Ok(req) => r = self.submit(&mut conn, req, &mut pending),
                                Err(_) => break,
                            }
                            n += 1;
                        }
                        if r.is_ok() {
                            self.writer.take_out(conn.write_buffer_mut(), MAX_BATCH);
                            r = self.flush(&mut conn).await;
                        }
                        if let Err(reason) = r {
                            break End::Lost(reason);
                        }
                    }
                },
                () = self.writer.to_write() => {
                    // The writes queued since the last flush, up to a batch, in one flush.
                    let (n, more) = self.writer.take_out(conn.write_buffer_mut(), MAX_BATCH);
                    if n > 0
                        && let Err(reason) = self.flush(&mut conn).await
                    {
                        break End::Lost(reason);
                    }
                    if more {
                        // Let the readers of what the written ones bring back (answers,
                        // and each Setvar's event) run before the next batch: writes that
                        // outrun their events overflow the subscribers' queues.
                        tokio::task::yield_now().await;
                    }
                }
                _ = ping_tick.tick(), if ping.is_none() => {
                    let id = self.ids.next();
                    let mut msg = actions::ping();
                    msg.set("ActionID", id.clone());
                    ping = Some((id, Instant::now() + self.config.ping_timeout));
                    if let Err(e) = self.write(&mut conn, &msg).await {
                        break End::Lost(e);
                    }
                }
                _ = sweep.tick() => {
                    pending.retain(|_, p| !p.is_closed());
                    self.writer.expire(Instant::now(), self.config.action_timeout);
                }
            }
        };
        let err = match &end {
            End::Stop => ClientError::Shutdown,
            End::Lost(reason) => ClientError::Disconnected {
                reason: reason.clone(),
            },
        };
        let closed = match &end {
            End::Stop => ClientError::Shutdown,
            End::Lost(_) => ClientError::NotConnected,
        };
        self.writer.close(&err, closed);
        for (_, p) in pending.drain() {
            p.fail(err.clone());
        }
        end
    }

    /// Takes one item of the connection's stream; `Some` when it ends the session. The plain
    /// successes of writes gather in `succeeded`, reported before anything read after them.
    fn on_frame(
        &mut self,
        frame: Option<Result<Incoming, CodecError>>,
        pending: &mut HashMap<String, Pending>,
        ping: &mut Option<(String, Instant)>,
        succeeded: &mut Vec<u64>,
    ) -> Option<End> {
        let frame = match frame {
            Some(Ok(Incoming::Written(seq))) => {
                succeeded.push(seq);
                return None;
            }
            Some(Ok(Incoming::Frame(f))) => f,
            None => return Some(End::Lost("closed by the server".to_owned())),
            Some(Err(e)) => return Some(End::Lost(e.to_string())),
        };
        self.written(succeeded);
        match frame {
            Frame::Banner(_) => Some(End::Lost("unexpected banner".to_owned())),
            Frame::Message(m) => {
                self.route(m, pending, ping);
                None
            }
        }
    }

    /// Writes one message, bounded in time so a peer that stops reading cannot stall us.
    async fn write(&self, conn: &mut Conn, msg: &Message) -> Result<(), String> {
        match timeout(self.config.action_timeout, conn.send(msg)).await {
            Err(_) => Err(format!(
                "write stalled for {:?}",
                self.config.action_timeout
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Writes out what [`Connection::submit`] buffered, bounded in time like
    /// [`Connection::write`].
    async fn flush(&self, conn: &mut Conn) -> Result<(), String> {
        match timeout(self.config.action_timeout, SinkExt::<&Message>::flush(conn)).await {
            Err(_) => Err(format!(
                "write stalled for {:?}",
                self.config.action_timeout
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Buffers a caller's action (written by the next [`Connection::flush`]); `Err` means
    /// the connection failed.
    fn submit(
        &mut self,
        conn: &mut Conn,
        req: Request,
        pending: &mut HashMap<String, Pending>,
    ) -> Result<(), String> {
        let id = self.ids.next();
        let (mut msg, entry) = match req {
            Request::Action { msg, reply } => (msg, Pending::Action(reply)),
            Request::List { msg, items, reply } => (
                msg,
                Pending::List {
                    response: None,
                    items,
                    reply,
                },
            ),
        };
        if entry.is_closed() {
            return Ok(());
        }
        msg.set("ActionID", id.clone());
        // Encode aside first: a bad action is the caller's error, not the connection's.
        let mut encoded = bytes::BytesMut::new();
        if let Err(e) = encode_message(&msg, &mut encoded) {
            entry.fail(ClientError::InvalidAction(e.to_string()));
            return Ok(());
        }
        pending.insert(id, entry);
        conn.write_buffer_mut().extend_from_slice(&encoded);
        Ok(())
    }

    /// Reports the [`SetvarWriter`] writes numbered `seqs` answered `Response: Success`
    /// (and empties `seqs`).
    fn written(&self, seqs: &mut Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        let unknown = self.writer.succeeded(seqs);
        if unknown > 0 {
            debug!(unknown, "AMI answers to no pending write (expired?)");
        }
        seqs.clear();
    }

    /// Routes one received message to its pending action, its pending list, or subscribers.
    fn route(
        &mut self,
        m: Message,
        pending: &mut HashMap<String, Pending>,
        ping: &mut Option<(String, Instant)>,
    ) {
        if m.event().is_some() {
            if let Some(id) = m.action_id()
                && let Some(Pending::List { .. }) = pending.get(id)
            {
                let id = id.to_owned();
                let complete = ListComplete::from_message(&m).is_some();
                if complete {
                    if let Some(Pending::List {
                        response,
                        items,
                        reply,
                    }) = pending.remove(&id)
                    {
                        let response = response.unwrap_or_default();
                        let _ = reply.send(Ok(ListResult {
                            response,
                            items: items.into_kept(),
                            complete: Some(m),
                        }));
                    }
                } else if let Some(Pending::List { items, .. }) = pending.get_mut(&id) {
                    items.push(m);
                }
                return;
            }
            self.events.send(ClientEvent::Event(m));
            return;
        }
        let Some(id) = m.action_id() else {
            debug!(message = ?m, "AMI message without ActionID ignored");
            return;
        };
        if let Some(seq) = self.writer.seq_of(id) {
            if !self.writer.answer(seq, &m) {
                debug!(action_id = %id, "AMI answer to no pending write (expired?)");
            }
            return;
        }
        if ping.as_ref().is_some_and(|(pid, _)| pid == id) {
            *ping = None;
            return;
        }
        // The common case (one answer to one action) without copying the id.
        let entry = match pending.remove(id) {
            Some(Pending::Action(reply)) => {
                let _ = reply.send(Ok(m));
                return;
            }
            None => {
                debug!(action_id = %id, "AMI response to no pending action");
                return;
            }
            Some(list) => list,
        };
        let id = id.to_owned();
        match entry {
            Pending::List {
                response: None,
                items,
                reply,
            } => {
                let refused = Response::from_message(&m).is_none_or(|r| !r.is_success());
                if refused && !starts_list(&m) {
                    let _ = reply.send(Ok(ListResult {
                        response: m,
                        items: items.into_kept(),
                        complete: None,
                    }));
                } else {
                    pending.insert(
                        id,
                        Pending::List {
                            response: Some(m),
                            items,
                            reply,
                        },
                    );
                }
            }
            other => {
                debug!(action_id = %id, "second response to a list action ignored");
                pending.insert(id, other);
            }
        }
    }

    /// Best-effort `Logoff`: waits at most `logoff_timeout` for `Goodbye` (or the close).
    async fn logoff(&mut self, conn: &mut Conn) {
        let id = self.ids.next();
        let mut msg = actions::logoff();
        msg.set("ActionID", id.clone());
        let bye = async {
            conn.send(&msg).await.ok()?;
            while let Some(Ok(frame)) = conn.next().await {
                if let Incoming::Frame(Frame::Message(m)) = frame
                    && m.event().is_none()
                    && m.action_id() == Some(id.as_str())
                {
                    return Some(());
                }
            }
            Some(())
        };
        if timeout(self.config.logoff_timeout, bye).await.is_err() {
            debug!("no Goodbye to Logoff; closing anyway");
        }
        let _ = SinkExt::<&Message>::close(conn).await;
    }
}

/// Answers every request with [`ClientError::NotConnected`]; returns when all handles are gone.
async fn reject_requests(requests: &mut mpsc::Receiver<Request>) {
    while let Some(req) = requests.recv().await {
        req.fail(ClientError::NotConnected);
    }
}

fn unreachable_frame<T>() -> Result<T, ClientError> {
    Err(ClientError::Protocol("unexpected frame".to_owned()))
}

fn codec_error(e: CodecError) -> ClientError {
    match e {
        CodecError::Io(e) => ClientError::Connect(e.to_string()),
        other => ClientError::Protocol(other.to_string()),
    }
}

/// Capped exponential backoff with jitter: a random delay in `[d/2, d]`, where
/// `d = min(max, initial * 2^(attempt-1))`.
fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let d = initial.saturating_mul(1u32 << exp).min(max);
    let half = d / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    let extra = if jitter_ms == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    };
    half + extra
}

fn tls_connector(tls: &TlsConfig) -> Result<TlsConnector, ClientError> {
    let bad = |what: &str, e: &dyn fmt::Display| ClientError::Connect(format!("TLS {what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &tls.ca_file {
        let file = std::fs::File::open(path)
            .map_err(|e| bad(&format!("CA file {}", path.display()), &e))?;
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert = cert.map_err(|e| bad(&format!("CA file {}", path.display()), &e))?;
            roots
                .add(cert)
                .map_err(|e| bad(&format!("CA file {}", path.display()), &e))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("config", &e))?;
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    if tls.insecure_skip_verify {
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(NoVerify(provider)));
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts any server certificate (still checks handshake signatures). `insecure_skip_verify`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    use super::*;

    /// Lines answers are made of: the plain success answer's and near misses of it.
    const ANSWER_LINES: &[&str] = &[
        "Response: Success",
        "Response: Error",
        "response: success",
        "Response: Success ",
        "Response:Success",
        "Message: Variable Set",
        "Message: Variable not set",
        "Event: DeviceStateChange",
        "ActionID: hf1-1",
        "ActionID: hf2-w3",
        "ActionID: hf1-w",
        "State: INUSE",
        "",
    ];

    const SEQS: &[&str] = &[
        "0",
        "17",
        "007",
        "+5",
        "5 ",
        "1234567890123456789",
        "18446744073709551615",
        "99999999999999999999",
    ];

    /// A message: a few lines (our answer's `ActionID` among them, often), each ended by CRLF
    /// or LF, then an empty line.
    fn answerish() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            2 => proptest::sample::select(ANSWER_LINES).prop_map(str::to_owned),
            1 => proptest::sample::select(SEQS).prop_map(|s| format!("ActionID: hf1-w{s}")),
        ];
        let shaped = (proptest::sample::select(SEQS), any::<bool>()).prop_map(|(seq, msg)| {
            let mut lines = vec![
                "Response: Success".to_owned(),
                format!("ActionID: hf1-w{seq}"),
            ];
            if msg {
                lines.push("Message: Variable Set".to_owned());
            }
            lines
        });
        let lines = prop_oneof![shaped, proptest::collection::vec(line, 0..5)];
        (lines, any::<u8>()).prop_map(|(lines, lf)| {
            let mut out = Vec::new();
            for (i, l) in lines.iter().chain([&String::new()]).enumerate() {
                out.extend_from_slice(l.as_bytes());
                out.extend_from_slice(if lf >> (i % 8) & 1 == 1 {
                    b"\n"
                } else {
                    b"\r\n"
                });
            }
            out
        })
    }

    fn limits() -> impl Strategy<Value = Limits> {
        prop_oneof![
            Just(Limits::default()),
            (10usize..40, 1usize..4, 20usize..80).prop_map(
                |(max_line, max_headers, max_message)| {
                    Limits {
                        max_line,
                        max_headers,
                        max_message,
                    }
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// [`ClientCodec`] takes a write's answer as its number only where decoding it as a
        /// message and routing it would report that write answered `Success`; everything
        /// else is the frames, errors and buffered bytes of [`AmiCodec`].
        #[test]
        fn write_answers_match_the_messages_they_stand_for(
            msgs in proptest::collection::vec(answerish(), 1..12),
            banner in any::<bool>(),
            limits in limits(),
            chunk in 1usize..300,
        ) {
            let mut input = if banner { b"Asterisk Call Manager/13.0.0\r\n".to_vec() } else { Vec::new() };
            input.extend(msgs.concat());
            let shared = writer::Shared::new("hf1-");
            let mut fast = ClientCodec { ami: AmiCodec::with_limits(banner, limits), writer: Arc::clone(&shared) };
            let mut reference = AmiCodec::with_limits(banner, limits);
            let (mut fb, mut rb) = (bytes::BytesMut::new(), bytes::BytesMut::new());
            'feed: for piece in input.chunks(chunk) {
                fb.extend_from_slice(piece);
                rb.extend_from_slice(piece);
                loop {
                    let f = fast.decode(&mut fb).map_err(|e| e.to_string());
                    let r = reference.decode(&mut rb).map_err(|e| e.to_string());
                    prop_assert_eq!(&fb[..], &rb[..]);
                    match (f, r) {
                        (Ok(Some(Incoming::Written(seq))), Ok(Some(Frame::Message(m)))) => {
                            prop_assert!(m.event().is_none(), "{:?}", m);
                            prop_assert_eq!(m.action_id().and_then(|id| shared.seq_of(id)), Some(seq));
                            prop_assert!(m.response().is_some_and(|r| r.eq_ignore_ascii_case("success")));
                        }
                        (Ok(Some(Incoming::Frame(f))), Ok(Some(r))) => prop_assert_eq!(f, r),
                        (Ok(None), Ok(None)) => break,
                        (Err(f), Err(r)) => {
                            prop_assert_eq!(f, r);
                            break 'feed;
                        }
                        (f, r) => prop_assert!(false, "{:?} vs {:?}", f, r),
                    }
                }
            }
        }
    }

    fn numbered(n: u64) -> ClientEvent {
        ClientEvent::Event(
            Message::new()
                .with("Event", "Test")
                .with("N", n.to_string()),
        )
    }

    /// A subscriber reading slower than events come, in every pattern of reads between
    /// deliveries: each event it misses is reported by a marker before the next event it
    /// gets, so the stream after a marker is whole.
    #[test]
    fn no_event_is_missed_silently_after_a_marker() {
        for pattern in 0u32..256 {
            let subs = Subscribers::default();
            let mut sub = subs.add(3);
            let mut got: Vec<Option<u64>> = Vec::new();
            let read = |sub: &mut Subscription, got: &mut Vec<Option<u64>>| match sub.try_recv() {
                Ok(ClientEvent::Event(m)) => got.push(m.get("N").and_then(|n| n.parse().ok())),
                Err(broadcast::error::TryRecvError::Lagged(_)) => got.push(None),
                _ => {}
            };
            for n in 0..40u64 {
                subs.send(numbered(n));
                // Bits of the pattern say how many reads follow this delivery (0 or 1; every
                // eighth delivery, a drain).
                if n % 8 == 7 {
                    for _ in 0..5 {
                        read(&mut sub, &mut got);
                    }
                } else if pattern >> (n % 8) & 1 == 1 {
                    read(&mut sub, &mut got);
                }
            }
            for _ in 0..10 {
                read(&mut sub, &mut got);
            }
            let mut last: Option<u64> = None;
            let mut marker = false;
            for g in &got {
                match g {
                    None => marker = true,
                    Some(n) => {
                        let expected = last.map_or(0, |l| l + 1);
                        assert!(
                            *n == expected || marker,
                            "pattern {pattern:08b}: {expected}..{n} missed without a marker: {got:?}"
                        );
                        assert!(
                            *n >= expected,
                            "pattern {pattern:08b}: out of order {got:?}"
                        );
                        last = Some(*n);
                        marker = false;
                    }
                }
            }
        }
    }

    /// What a subscription reads: an event's number, or a marker's count.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Read {
        Event(u64),
        Lagged(u64),
    }

    fn number(ev: &ClientEvent) -> u64 {
        match ev {
            ClientEvent::Event(m) => m.get("N").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX),
            other => panic!("not a numbered event: {other:?}"),
        }
    }

    /// One [`Subscription::recv_many`] call if it is ready at once (`None`: it would wait).
    fn read_many(sub: &mut Subscription, limit: usize) -> Option<Vec<Read>> {
        use futures::FutureExt;
        let mut batch = Vec::new();
        match sub.recv_many(&mut batch, limit).now_or_never()? {
            Ok(n) => {
                assert_eq!(n, batch.len());
                assert!(
                    (1..=limit.max(1)).contains(&n),
                    "{n} events for a limit of {limit}"
                );
                Some(batch.iter().map(|e| Read::Event(number(e))).collect())
            }
            Err(broadcast::error::RecvError::Lagged(n)) => Some(vec![Read::Lagged(n)]),
            Err(broadcast::error::RecvError::Closed) => panic!("closed"),
        }
    }

    /// A batch ends where events are missing; the marker comes next, with the count of
    /// every event lost up to the call that reports it (also those lost after the batch
    /// took the marker off the queue), then the events after the loss.
    #[test]
    fn a_batch_ends_at_a_loss() {
        let subs = Subscribers::default();
        let mut sub = subs.add(3);
        for n in 0..5 {
            subs.send(numbered(n));
        }
        assert_eq!(
            read_many(&mut sub, 10),
            Some(vec![Read::Event(0), Read::Event(1), Read::Event(2)])
        );
        // The marker is off the queue but not reported yet: still lost at it.
        subs.send(numbered(5));
        assert_eq!(read_many(&mut sub, 10), Some(vec![Read::Lagged(3)]));
        assert_eq!(read_many(&mut sub, 10), None);
        for n in 6..9 {
            subs.send(numbered(n));
        }
        assert_eq!(
            read_many(&mut sub, 2),
            Some(vec![Read::Event(6), Read::Event(7)])
        );
        assert_eq!(read_many(&mut sub, 2), Some(vec![Read::Event(8)]));

        // A marker taken by a batch is reported by the next `recv` / `try_recv` as well.
        for n in 9..14 {
            subs.send(numbered(n));
        }
        assert_eq!(read_many(&mut sub, 3).map(|b| b.len()), Some(3));
        assert!(matches!(
            sub.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(2))
        ));
        for n in 14..18 {
            subs.send(numbered(n));
        }
        assert_eq!(read_many(&mut sub, 10).map(|b| b.len()), Some(3));
        {
            use futures::FutureExt;
            assert!(matches!(
                sub.recv().now_or_never(),
                Some(Err(broadcast::error::RecvError::Lagged(1)))
            ));
        }
        assert!(matches!(
            sub.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }

    /// Read in batches, in every pattern of reads between deliveries and with every batch
    /// limit, a subscriber gets the events in order, a marker wherever some are missing,
    /// and every event either read or counted by a marker.
    #[test]
    fn batches_miss_nothing_silently() {
        for limit in [0, 1, 2, 3, 5] {
            for pattern in 0u32..256 {
                let subs = Subscribers::default();
                let mut sub = subs.add(3);
                let mut got: Vec<Read> = Vec::new();
                let mut sent = 0u64;
                for n in 0..40u64 {
                    subs.send(numbered(n));
                    sent += 1;
                    let reads = if n % 8 == 7 {
                        4
                    } else {
                        pattern >> (n % 8) & 1
                    };
                    for _ in 0..reads {
                        got.extend(read_many(&mut sub, limit).unwrap_or_default());
                    }
                }
                while let Some(b) = read_many(&mut sub, limit) {
                    got.extend(b);
                }
                let mut expected = 0u64;
                let mut lost = 0u64;
                let mut marker = false;
                for g in &got {
                    match *g {
                        Read::Lagged(k) => {
                            assert!(
                                k > 0 && !marker,
                                "limit {limit} pattern {pattern:08b}: {got:?}"
                            );
                            lost += k;
                            marker = true;
                        }
                        Read::Event(n) => {
                            assert!(
                                n == expected || (marker && n > expected),
                                "limit {limit} pattern {pattern:08b}: {expected}..{n} missed \
                                 without a marker: {got:?}"
                            );
                            expected = n + 1;
                            marker = false;
                        }
                    }
                }
                let read = got.iter().filter(|g| matches!(g, Read::Event(_))).count();
                assert_eq!(
                    read as u64 + lost,
                    sent,
                    "limit {limit} pattern {pattern:08b}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s} {s:?}"), "**** ****");
        let cfg = ClientConfig::new("127.0.0.1:5038", "admin", "hunter2");
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert_eq!(cfg.secret.expose(), "hunter2");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 1..40 {
            let d = backoff(i, m, attempt);
            let cap = i.saturating_mul(1 << (attempt - 1).min(20)).min(m);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs {cap:?}"
            );
        }
        assert_eq!(backoff(Duration::ZERO, m, 3), Duration::ZERO);
    }
}
