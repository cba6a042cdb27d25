//! The agent/server federation sockets: [`HubLink`] (agent side: DEALER to the hub's base port
//! P and SUB to P+1, supervised and recreated on loss) and [`HubBind`] (server side: ROUTER
//! bound on P and PUB bound on P+1).
//!
//! The link's SUB and DEALER are not `zeromq` crate sockets: they speak ZMTP 3.0 themselves
//! (private module `zmtp`, shared with the hub's ROUTER and PUB), so one read of the fan-out
//! connection yields every complete fan-out message it holds, handed to the inbound channel
//! in one wake-up of the link's task (the crate's SUB took each message through its own tasks,
//! fair queue and channel), and every message queued for the hub when the link's task runs
//! (up to 256 messages or 64 KiB) goes out in one write (the crate's DEALER wrote each one on
//! its own, waking the hub's reader each time). Both connections are made with the same
//! bounded attempt; a peer that is not a ZMTP 3 publisher (fan-out) or ROUTER (requests), or
//! sends garbage, fails the attempt or ends the connection, and the link reconnects with its
//! backoff. Oversize messages (fan-out or replies) are skipped as their bytes arrive (never
//! buffered) and counted as `dropped_oversize`; the connection stays up.
//!
//! Transport-level liveness, invisible to the application:
//! - the link sends the one-frame message [`PING`] on its DEALER every `ping_interval`; a
//!   [`HubBind`] answers with [`PONG`] and does not deliver either to the application;
//! - a [`HubBind`] publishes the one-frame message [`HEARTBEAT_TOPIC`] every
//!   `heartbeat_interval`; links always subscribe to it and swallow it;
//! - any message counts as a sign of life; when either socket is silent past
//!   `silence_timeout`, the link drops and recreates both sockets;
//! - a [`HubBind`] also sends the heartbeat to each new subscriber as soon as its
//!   subscriptions are in force, and a link reports [`LinkStatus::Connected`] only once its
//!   SUB received a first message: a snapshot asked after that misses nothing the hub
//!   publishes later (from an older hub without it, the first periodic heartbeat).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::{SendError, TransportError};
use crate::fanout::{Fanout, WRITE_BATCH};
use crate::guard;
use crate::link::{
    Backoff, BackoffConfig, CancelOnDrop, DEFAULT_MAX_CONNECTIONS, Frames, Limits, LinkStats,
    LinkStatus, Shared, StatsSnapshot, parse_tcp_endpoint, sleep_or_cancel, tcp_endpoint,
};
use crate::router::Router;
use crate::zmtp::{Conn, ZmtpError};

/// One-frame liveness request a [`HubLink`] sends on its DEALER.
pub const PING: &[u8] = b"\x00hintfed-ping";
/// One-frame answer of a [`HubBind`] to [`PING`].
pub const PONG: &[u8] = b"\x00hintfed-pong";
/// Topic (and only frame) of the transport heartbeat a [`HubBind`] publishes.
pub const HEARTBEAT_TOPIC: &str = "\x00hintfed-hb";

/// A connection that lasted this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(2);

/// Which socket of a hub link a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A reply on the DEALER (request/reply with the hub: acks, snapshot chunks).
    Reply,
    /// A message from the hub's PUB fan-out.
    Fanout,
}

/// A message received from a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Index of the hub (its position in the configuration; 0 for a lone [`HubLink`]).
    pub hub: usize,
    /// Which socket it arrived on.
    pub channel: Channel,
    /// Its frames (for fan-out: the topic frame first).
    pub frames: Frames,
}

/// Configuration of one [`HubLink`].
#[derive(Debug, Clone)]
pub struct HubLinkConfig {
    /// `tcp://host:P`, the hub's ROUTER; the SUB connects to `tcp://host:P+1`.
    pub endpoint: String,
    /// Overrides the fan-out endpoint (default: same host, port P+1).
    pub sub_endpoint: Option<String>,
    /// Topic prefixes to subscribe to (default `[""]`: everything).
    pub subscriptions: Vec<String>,
    /// The origin the link's owner publishes as (default `None`). Announced to the hub when
    /// the fan-out connection is made (ZMTP READY property `X-Hintfed-Origin`; left out when
    /// longer than 255 bytes): a [`HubBind`] then sends this link none of that origin's
    /// messages ([`Publication::origin`]). A hub that does not know the property (an older
    /// one, a libzmq PUB) ignores it and sends everything.
    pub origin: Option<String>,
    /// How often to ping the hub on the DEALER (default 500 ms).
    pub ping_interval: Duration,
    /// Silence on either socket past this recreates both (default 3 s).
    pub silence_timeout: Duration,
    /// A write to the hub that makes no progress within this recreates the sockets (default
    /// 1 s); the messages it carried are counted as `dropped_outbound`.
    pub send_timeout: Duration,
    /// Bound on one TCP connect of one socket (default 250 ms); each connection's ZMTP
    /// greeting and READY exchange after its TCP connect gets this or 1 s, whichever is longer.
    pub connect_attempt_timeout: Duration,
    /// Delays between reconnect attempts.
    pub backoff: BackoffConfig,
    /// Size limits for received (and sent) messages.
    pub limits: Limits,
    /// Capacity of the outbound queue (default 1024).
    pub outbound_capacity: usize,
    /// Capacity of the inbound channel created by [`HubLink::connect`] (default 4096).
    pub inbound_capacity: usize,
}

impl HubLinkConfig {
    /// Defaults for the hub at `endpoint` (`tcp://host:P`).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            sub_endpoint: None,
            subscriptions: vec![String::new()],
            origin: None,
            ping_interval: Duration::from_millis(500),
            silence_timeout: Duration::from_secs(3),
            send_timeout: Duration::from_secs(1),
            connect_attempt_timeout: Duration::from_millis(250),
            backoff: BackoffConfig::default(),
            limits: Limits::default(),
            outbound_capacity: 1024,
            inbound_capacity: 4096,
        }
    }

    fn validate(&self) -> Result<String, TransportError> {
        let (host, port) = parse_tcp_endpoint(&self.endpoint)?;
        if self.outbound_capacity == 0 || self.inbound_capacity == 0 {
            return Err(TransportError::Config("channel capacities must be > 0"));
        }
        if self.ping_interval.is_zero() || self.silence_timeout <= self.ping_interval {
            return Err(TransportError::Config(
                "need 0 < ping_interval < silence_timeout",
            ));
        }
        match &self.sub_endpoint {
            Some(ep) => {
                parse_tcp_endpoint(ep)?;
                Ok(ep.clone())
            }
            None => {
                let sub_port = port.checked_add(1).ok_or(TransportError::InvalidEndpoint {
                    endpoint: self.endpoint.clone(),
                    reason: "port P+1 overflows",
                })?;
                Ok(tcp_endpoint(
                    host.trim_start_matches('[').trim_end_matches(']'),
                    sub_port,
                ))
            }
        }
    }
}

/// Most messages that may wait in a link's inbound channel before the link stops reading
/// replies (see [`HubLink`]); with snapshot chunks of up to 48 KiB, a few MB at most.
const REPLY_BACKLOG: usize = 64;

/// How often a link whose replies are held back looks at its inbound channel again.
const BACKLOG_POLL: Duration = Duration::from_millis(1);

/// Most queued messages a link writes at once (with at most [`WRITE_BATCH`] bytes).
const SEND_BATCH_MESSAGES: u64 = 256;

/// Agent-side link to one hub: a supervised DEALER (to P) + SUB (to P+1) pair.
///
/// Cheap to clone; the supervisor task stops when the last clone is dropped.
///
/// Channel policies:
/// - outbound ([`HubLink::try_send`]): bounded (`outbound_capacity`), never blocks; a message
///   is refused and counted as `dropped_outbound` when the link is not connected or the queue
///   is full; messages still queued when the link is lost are dropped and counted. Delivery is
///   at most once: a message handed to a connection that dies may be lost silently (the
///   federation detects gaps by sequence number and fetches a snapshot).
/// - inbound ([`Incoming`]): bounded (`inbound_capacity`, or the shared channel of a
///   [`crate::MultiHub`]). Replies (DEALER) are read from the socket only while fewer than
///   64 messages (at most half the channel) wait in the channel: a longer answer (a
///   snapshot) waits in the socket and the hub's queue instead of piling up here (and in the
///   read buffer its frames point into), and none is dropped; meanwhile the hub counts as
///   alive. Fan-out (SUB) messages are always read: when the channel is full the newest is
///   dropped and counted as `dropped_inbound_full`, so the socket task never stalls and
///   liveness keeps working.
#[derive(Debug, Clone)]
pub struct HubLink {
    tx: mpsc::Sender<Frames>,
    shared: Shared,
    index: usize,
    endpoint: Arc<str>,
    limits: Limits,
    _cancel: Arc<CancelOnDrop>,
}

impl HubLink {
    /// Spawns the supervisor (needs a Tokio runtime) and returns the handle and its own
    /// inbound channel.
    pub fn connect(
        config: HubLinkConfig,
    ) -> Result<(Self, mpsc::Receiver<Incoming>), TransportError> {
        let (in_tx, in_rx) = mpsc::channel(config.inbound_capacity.max(1));
        let link = Self::connect_with(config, 0, in_tx)?;
        Ok((link, in_rx))
    }

    /// Spawns the supervisor delivering into `inbound`, tagging messages with `index`.
    pub fn connect_with(
        config: HubLinkConfig,
        index: usize,
        inbound: mpsc::Sender<Incoming>,
    ) -> Result<Self, TransportError> {
        let sub_endpoint = config.validate()?;
        let (tx, rx) = mpsc::channel(config.outbound_capacity);
        let (shared, status_tx) = Shared::new();
        let cancel = CancellationToken::new();
        let task = LinkTask {
            sub_endpoint,
            index,
            rx,
            inbound,
            status_tx,
            stats: shared.stats.clone(),
            cancel: cancel.clone(),
            config: config.clone(),
        };
        tokio::spawn(task.run());
        Ok(Self {
            tx,
            shared,
            index,
            endpoint: config.endpoint.into(),
            limits: config.limits,
            _cancel: Arc::new(CancelOnDrop(cancel)),
        })
    }

    /// Queues one multipart message for the hub's ROUTER (see the type's channel policy).
    pub fn try_send(&self, frames: Frames) -> Result<(), SendError> {
        let stats = &self.shared.stats;
        if frames.is_empty() {
            return Err(SendError::Empty);
        }
        if !self.limits.accepts(&frames) {
            stats.dropped_oversize();
            return Err(SendError::Oversize);
        }
        if !self.shared.is_connected() {
            stats.dropped_outbound();
            return Err(SendError::NotConnected);
        }
        self.tx.try_send(frames).map_err(|e| {
            stats.dropped_outbound();
            match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            }
        })
    }

    /// A receiver of the link's status.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.shared.status.clone()
    }

    /// Whether both sockets are connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.is_connected()
    }

    /// Waits until connected or `timeout` elapses; returns whether connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.shared.wait_connected(timeout).await
    }

    /// The link's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The index this link tags its messages with.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The hub endpoint (`tcp://host:P`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

struct LinkTask {
    config: HubLinkConfig,
    sub_endpoint: String,
    index: usize,
    rx: mpsc::Receiver<Frames>,
    inbound: mpsc::Sender<Incoming>,
    status_tx: watch::Sender<LinkStatus>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
}

enum Exit {
    Stop,
    Lost(String),
}

impl LinkTask {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff);
        let mut connected_once = false;
        loop {
            self.status_tx.send_replace(LinkStatus::Connecting);
            let attempt_timeout = self.config.connect_attempt_timeout;
            let attempt = async {
                let dealer =
                    Conn::dealer(&self.config.endpoint, attempt_timeout, self.config.limits)
                        .await
                        .map_err(|e| format!("request socket: {e}"))?;
                let mut subs = self.config.subscriptions.clone();
                subs.push(HEARTBEAT_TOPIC.to_owned());
                let sub = Conn::subscriber(
                    &self.sub_endpoint,
                    attempt_timeout,
                    &subs,
                    self.config.origin.as_deref(),
                    self.config.limits,
                )
                .await
                .map_err(|e| format!("fan-out socket {}: {e}", self.sub_endpoint))?;
                Ok::<_, String>((dealer, sub))
            };
            let result = tokio::select! {
                r = attempt => Some(r),
                () = drain(&mut self.rx, &self.stats) => None,
                () = self.cancel.cancelled() => None,
            };
            let Some(result) = result else { break };
            match result {
                Err(error) => {
                    self.stats.connect_failures();
                    tracing::debug!(hub = self.index, endpoint = %self.config.endpoint, %error, "hub connect attempt failed");
                }
                Ok((dealer, sub)) => {
                    if connected_once {
                        self.stats.reconnects();
                    }
                    connected_once = true;
                    let started = Instant::now();
                    let exit = self.connected(dealer, sub).await;
                    self.status_tx.send_replace(LinkStatus::Connecting);
                    while self.rx.try_recv().is_ok() {
                        self.stats.dropped_outbound();
                    }
                    match exit {
                        Exit::Stop => break,
                        Exit::Lost(why) => {
                            tracing::warn!(hub = self.index, endpoint = %self.config.endpoint, reason = %why, "hub link lost; recreating sockets");
                        }
                    }
                    if started.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                }
            }
            let delay = backoff.next_delay();
            let paused = tokio::select! {
                ok = sleep_or_cancel(delay, &self.cancel) => ok,
                () = drain(&mut self.rx, &self.stats) => false,
            };
            if !paused {
                break;
            }
        }
        self.status_tx.send_replace(LinkStatus::Closed);
    }

    async fn connected(&mut self, mut dealer: Conn, mut sub: Conn) -> Exit {
        let cfg = &self.config;
        let mut ping = tokio::time::interval(cfg.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_reply = Instant::now();
        let mut last_fanout = Instant::now();
        // Connected once the first fan-out message arrives (the hub's welcome heartbeat, or
        // its periodic one from an older hub): the subscriptions are then in force at the
        // hub, so a snapshot asked from here on misses nothing published after it. Before,
        // a snapshot could be answered while the subscription was still on its way, and
        // what was published in between was lost until a gap was noticed.
        let mut announced = false;
        let backlog_max = REPLY_BACKLOG.min(self.inbound.max_capacity() / 2).max(1);
        // Messages taken by one read of either connection (reused: no allocation per
        // wake-up).
        let mut batch: Vec<Frames> = Vec::new();
        let mut replies: Vec<Frames> = Vec::new();
        // One timer for the look at a held-back channel, reset when it fires (not a new
        // timer for every pass of the loop while replies are held back).
        let backlog_poll = tokio::time::sleep(BACKLOG_POLL);
        tokio::pin!(backlog_poll);
        loop {
            // Replies wait in the socket (the read buffer holds what was read until the
            // application takes it) while the application is behind.
            let backlog = self.inbound.max_capacity() - self.inbound.capacity();
            let read_replies = backlog < backlog_max;
            tokio::select! {
                () = self.cancel.cancelled() => return Exit::Stop,
                cmd = self.rx.recv() => {
                    let Some(first) = cmd else { return Exit::Stop };
                    // Everything queued meanwhile goes in the same write (up to a bound).
                    let mut sent = 0u64;
                    let mut next = Some(first);
                    while let Some(frames) = next.take() {
                        if !frames.is_empty() {
                            dealer.push(&frames);
                            sent += 1;
                        }
                        if sent >= SEND_BATCH_MESSAGES || dealer.pushed() >= WRITE_BATCH {
                            break;
                        }
                        next = self.rx.try_recv().ok();
                    }
                    match dealer.flush(cfg.send_timeout).await {
                        Ok(()) => self.stats.messages_out_by(sent),
                        Err(e) => {
                            self.stats.dropped_outbound_by(sent);
                            return self.write_failed("send", e);
                        }
                    }
                }
                // (A disabled branch's expression is still evaluated: no underflow then.)
                r = dealer.recv(&mut replies, backlog_max.saturating_sub(backlog)), if read_replies => match r {
                    Ok(parsed) => {
                        last_reply = Instant::now();
                        for _ in 0..parsed.oversize {
                            self.stats.dropped_oversize();
                        }
                        for frames in replies.drain(..) {
                            if frames.len() == 1 && frames[0] == PONG {
                                continue;
                            }
                            self.deliver(Channel::Reply, frames);
                        }
                        if let Err(e) = dealer.flush(cfg.send_timeout).await {
                            return self.write_failed("request pong send", e);
                        }
                    }
                    Err(ZmtpError::Closed) => return Exit::Lost("hub closed the request connection".into()),
                    Err(e) => return Exit::Lost(format!("receive failed: {e}")),
                },
                () = &mut backlog_poll, if !read_replies => {
                    // Not reading: the hub's replies (pongs too) wait unread.
                    last_reply = Instant::now();
                    backlog_poll.as_mut().reset(last_reply + BACKLOG_POLL);
                }
                r = sub.recv(&mut batch, usize::MAX) => match r {
                    Ok(parsed) => {
                        for _ in 0..parsed.oversize {
                            self.stats.dropped_oversize();
                        }
                        if !batch.is_empty() || parsed.oversize > 0 {
                            last_fanout = Instant::now();
                            if !announced {
                                announced = true;
                                tracing::info!(hub = self.index, endpoint = %self.config.endpoint, "hub link connected");
                                self.status_tx.send_replace(LinkStatus::Connected);
                            }
                        }
                        for frames in batch.drain(..) {
                            if frames.first().is_some_and(|f| f.as_ref() == HEARTBEAT_TOPIC.as_bytes()) {
                                continue;
                            }
                            self.deliver(Channel::Fanout, frames);
                        }
                        if let Err(e) = sub.flush(cfg.send_timeout).await {
                            return self.write_failed("fan-out pong send", e);
                        }
                    }
                    Err(ZmtpError::Closed) => return Exit::Lost("hub closed the fan-out connection".into()),
                    Err(e) => return Exit::Lost(format!("fan-out receive failed: {e}")),
                },
                _ = ping.tick() => {
                    if last_reply.elapsed() > cfg.silence_timeout || last_fanout.elapsed() > cfg.silence_timeout {
                        self.stats.silence_timeouts();
                        return Exit::Lost(format!("hub silent for more than {:?}", cfg.silence_timeout));
                    }
                    dealer.push(&[Bytes::from_static(PING)]);
                    if let Err(e) = dealer.flush(cfg.send_timeout).await {
                        return self.write_failed("ping send", e);
                    }
                }
            }
        }
    }

    /// The link is lost: a write (`what`) to the hub failed with `e` (a stall counts as a
    /// send timeout).
    fn write_failed(&self, what: &str, e: ZmtpError) -> Exit {
        if let ZmtpError::WriteTimeout = e {
            self.stats.send_timeouts();
            return Exit::Lost(format!("{what} timed out"));
        }
        Exit::Lost(format!("{what} failed: {e}"))
    }

    fn deliver(&self, channel: Channel, frames: Frames) {
        if !self.config.limits.accepts(&frames) {
            self.stats.dropped_oversize();
            return;
        }
        self.stats.messages_in();
        let incoming = Incoming {
            hub: self.index,
            channel,
            frames,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.inbound.try_send(incoming) {
            self.stats.dropped_inbound_full();
        }
    }
}

/// Receives and drops outbound messages until the channel closes (used while disconnected).
pub(crate) async fn drain<T>(rx: &mut mpsc::Receiver<T>, stats: &LinkStats) {
    while rx.recv().await.is_some() {
        stats.dropped_outbound();
    }
}

/// Configuration of a [`HubBind`].
#[derive(Debug, Clone)]
pub struct HubBindConfig {
    /// `tcp://host:P` for the ROUTER; the PUB binds P+1. Port 0 picks a free pair P, P+1.
    pub endpoint: String,
    /// Overrides the PUB endpoint (default: same host, port P+1).
    pub pub_endpoint: Option<String>,
    /// Transport heartbeat period on the PUB (default 1 s; `None` disables it).
    pub heartbeat_interval: Option<Duration>,
    /// A peer connection whose queued replies cannot be written within this is closed
    /// (default 10 s: a live peer on a busy machine may not read for a second or two; a peer
    /// that never reads must not hold its queued snapshot chunks for long).
    pub send_timeout: Duration,
    /// Size limits for received messages.
    pub limits: Limits,
    /// Capacity of the inbound channel (default 8192).
    pub inbound_capacity: usize,
    /// Capacity of each peer's reply queue (default 8192); replies beyond it are dropped.
    pub outbound_capacity: usize,
    /// Simultaneous peer connections per socket; more are refused and counted (default 4096).
    pub max_connections: usize,
    /// While a subscriber's fan-out comes faster than 5,000 messages a second, its writes
    /// are at least this far apart, so it gets what comes meanwhile in one write: one wake-up
    /// of the agent per linger instead of one per message, at the cost of up to this much
    /// latency at those rates (default 1 ms; zero: every message is written at once).
    /// Slower subscribers are always written at once.
    pub fanout_linger: Duration,
}

impl HubBindConfig {
    /// Defaults for a hub listening on `endpoint` (`tcp://host:P`).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            pub_endpoint: None,
            heartbeat_interval: Some(Duration::from_secs(1)),
            send_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            inbound_capacity: 8192,
            outbound_capacity: 8192,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            fanout_linger: DEFAULT_FANOUT_LINGER,
        }
    }
}

/// Default [`HubBindConfig::fanout_linger`].
pub const DEFAULT_FANOUT_LINGER: Duration = Duration::from_millis(1);

/// A message for the hub's fan-out ([`HubBind::publish_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Its frames (first = topic).
    pub frames: Frames,
    /// The origin whose message it is: not sent to the subscribers that announced that
    /// origin ([`HubLinkConfig::origin`]), which would drop it. `None` (the hub's own
    /// messages, or none of an origin's), or empty: sent to every subscriber.
    pub origin: Option<String>,
}

impl Publication {
    /// `frames`, a message of no origin (sent to every subscriber).
    pub fn new(frames: Frames) -> Self {
        Self {
            frames,
            origin: None,
        }
    }

    /// `frames`, a message of `origin`.
    pub fn of(origin: impl Into<String>, frames: Frames) -> Self {
        Self {
            frames,
            origin: Some(origin.into()),
        }
    }
}

/// A message received on the hub's ROUTER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterMessage {
    /// The sender's routing identity (pass it to [`HubBind::reply`]).
    pub identity: Bytes,
    /// The frames the peer sent.
    pub frames: Frames,
}

enum BindCmd {
    Shutdown(oneshot::Sender<()>),
}

/// The fan-out behind its lock (a panic while holding it cannot leave it inconsistent: every
/// operation is a queue push or a list edit).
fn lock_fanout(f: &std::sync::Mutex<Fanout>) -> std::sync::MutexGuard<'_, Fanout> {
    f.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Server-side hub sockets: ROUTER bound on P, PUB bound on P+1, both speaking ZMTP directly
/// (private modules `router` and `fanout`), with one task for heartbeats and shutdown.
///
/// Cheap to clone; the task stops (and releases both ports) on [`HubBind::shutdown`] or when
/// the last clone is dropped.
///
/// Channel policies:
/// - replies ([`HubBind::reply`]): queued from the caller's task to the peer's own bounded
///   queue (`outbound_capacity` messages), written by that connection's writer task. Never
///   waits: a reply to an identity that is gone or whose queue is full is dropped and counted
///   (`dropped_outbound`); a connection whose writes make no progress for `send_timeout` is
///   closed (`send_timeouts`).
/// - publications ([`HubBind::publish`], [`HubBind::publish_batch`]): encoded once (ZMTP spoken
///   directly) and queued to every subscriber from the caller's task, without a hop through the
///   socket task; a batch is one shared queue entry per subscriber. Each subscriber is written
///   the messages of its subscriptions, less those of the origin it announced in its READY
///   (property `X-Hintfed-Origin`, see [`HubLinkConfig::origin`]; a subscriber that announces
///   none, or a malformed or oversize one, gets every message). A subscriber whose queue
///   of 100 000 messages has no room drops the newest, counted as `dropped_outbound`; the
///   others are not held back. Never waits.
/// - inbound ([`RouterMessage`]): each peer connection's reader task hands whole messages
///   to one bounded channel (`inbound_capacity`) with backpressure: when it is full that peer
///   is not read until the application takes a message, so TCP holds back the sender; nothing
///   is dropped for overload. [`PING`] messages are answered by the peer's own tasks and never
///   delivered (a peer held back by a full channel is answered once it is read again, well
///   within a link's silence timeout).
#[derive(Debug, Clone)]
pub struct HubBind {
    tx: mpsc::Sender<BindCmd>,
    /// The ROUTER side: replies are queued to the peer's writer from the caller's task.
    router: Arc<Router>,
    /// The PUB side, shared with the socket task (heartbeats, shutdown): publications are
    /// encoded and queued to the subscribers from the caller's task, one task hop less.
    fanout: Arc<std::sync::Mutex<Fanout>>,
    shared: Shared,
    router_endpoint: Arc<str>,
    pub_endpoint: Arc<str>,
    _cancel: Arc<CancelOnDrop>,
}

impl std::fmt::Debug for BindCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BindCmd")
    }
}

impl HubBind {
    /// Binds both sockets and spawns the owning task. Errors name the endpoint that failed
    /// (for example "address already in use").
    pub async fn bind(
        config: HubBindConfig,
    ) -> Result<(Self, mpsc::Receiver<RouterMessage>), TransportError> {
        if config.inbound_capacity == 0 || config.outbound_capacity == 0 {
            return Err(TransportError::Config("channel capacities must be > 0"));
        }
        let (shared, status_tx) = Shared::new();
        let (in_tx, in_rx) = mpsc::channel(config.inbound_capacity);
        let bound = bind_pair(&config, &shared.stats, in_tx).await?;
        let (router_ep, pub_ep) = (bound.router_endpoint, bound.pub_endpoint);
        let router = Arc::new(bound.router);
        let (tx, rx) = mpsc::channel(1);
        status_tx.send_replace(LinkStatus::Connected);
        let cancel = CancellationToken::new();
        let fanout = Arc::new(std::sync::Mutex::new(bound.fanout));
        let task = BindTask {
            router: router.clone(),
            fanout: fanout.clone(),
            rx,
            cancel: cancel.clone(),
            config,
        };
        tokio::spawn(async move {
            task.run().await;
            status_tx.send_replace(LinkStatus::Closed);
        });
        tracing::info!(router = %router_ep, publisher = %pub_ep, "hub sockets bound");
        Ok((
            Self {
                tx,
                router,
                fanout,
                shared,
                router_endpoint: router_ep.into(),
                pub_endpoint: pub_ep.into(),
                _cancel: Arc::new(CancelOnDrop(cancel)),
            },
            in_rx,
        ))
    }

    /// Queues a reply to the peer `identity` (never waits; see the type's channel policy).
    pub async fn reply(&self, identity: Bytes, frames: Frames) -> Result<(), SendError> {
        if frames.is_empty() {
            return Err(SendError::Empty);
        }
        if self.tx.is_closed() {
            return Err(SendError::Closed);
        }
        self.router.reply(&identity, frames);
        Ok(())
    }

    /// Queues a message of no origin for the PUB (first frame = topic; never waits).
    pub async fn publish(&self, frames: Frames) -> Result<(), SendError> {
        if frames.is_empty() {
            return Err(SendError::Empty);
        }
        if self.tx.is_closed() {
            return Err(SendError::Closed);
        }
        lock_fanout(&self.fanout).publish(&frames);
        Ok(())
    }

    /// Queues many messages for the PUB in one queue slot (each: first frame = topic; never
    /// waits). Empty messages are skipped.
    pub async fn publish_batch(&self, batch: &[Publication]) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.tx.is_closed() {
            return Err(SendError::Closed);
        }
        // Encoded once and queued to every subscriber, here, without a hop through the
        // socket task (the subscriber queues never block; see the type's channel policy).
        lock_fanout(&self.fanout).publish_batch(batch);
        Ok(())
    }

    /// The ROUTER's bound endpoint (port resolved).
    pub fn router_endpoint(&self) -> &str {
        &self.router_endpoint
    }

    /// The PUB's bound endpoint (port resolved).
    pub fn pub_endpoint(&self) -> &str {
        &self.pub_endpoint
    }

    /// Status: `Connected` while bound, `Closed` after shutdown.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.shared.status.clone()
    }

    /// The task's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Closes both sockets and waits until their ports are released. Other clones then get
    /// [`SendError::Closed`].
    pub async fn shutdown(self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(BindCmd::Shutdown(ack_tx)).await.is_ok() {
            let _ = ack_rx.await;
        }
    }
}

struct Bound {
    router: Router,
    fanout: Fanout,
    router_endpoint: String,
    pub_endpoint: String,
}

async fn bind_pair(
    config: &HubBindConfig,
    stats: &Arc<LinkStats>,
    inbound: mpsc::Sender<RouterMessage>,
) -> Result<Bound, TransportError> {
    let (host, port) = parse_tcp_endpoint(&config.endpoint)?;
    let (router_listener, pub_listener, pub_host) = match &config.pub_endpoint {
        Some(pub_ep) => {
            let (l1, _) = guard::listen_endpoint(&config.endpoint).await?;
            let (l2, pub_host) = guard::listen_endpoint(pub_ep).await?;
            (l1, l2, pub_host)
        }
        None => {
            // Port 0: search a free adjacent pair P, P+1.
            let tries = if port == 0 { 50 } else { 1 };
            let mut found = None;
            let mut last_err = None;
            for _ in 0..tries {
                let l1 = guard::listen(&host, port)
                    .await
                    .map_err(|e| guard::bind_error(&config.endpoint, e))?;
                let p = l1
                    .local_addr()
                    .map_err(|e| guard::bind_error(&config.endpoint, e))?
                    .port();
                let Some(p1) = p.checked_add(1) else { continue };
                match guard::listen(&host, p1).await {
                    Ok(l2) => {
                        found = Some((l1, l2));
                        break;
                    }
                    Err(e) => {
                        last_err = Some(guard::bind_error(&tcp_endpoint(&host, p1), e));
                    }
                }
            }
            let (l1, l2) = found.ok_or_else(|| {
                last_err.unwrap_or(TransportError::Config("no free port pair found"))
            })?;
            (l1, l2, host.clone())
        }
    };
    let router_endpoint = bound_endpoint(&router_listener, &host, &config.endpoint)?;
    let router = Router::start(
        router_listener,
        config.limits,
        config.max_connections,
        config.send_timeout,
        config.outbound_capacity,
        stats.clone(),
        inbound,
    );
    let pub_endpoint = bound_endpoint(&pub_listener, &pub_host, &config.endpoint)?;
    // A heartbeat at once to each new subscriber: links announce themselves connected when
    // it arrives (their subscriptions are in force), so what they ask next (a snapshot) is
    // answered after every publication they will miss.
    let fanout = Fanout::start(
        pub_listener,
        config.limits,
        config.max_connections,
        stats.clone(),
        Some(&vec![Bytes::from_static(HEARTBEAT_TOPIC.as_bytes())]),
        config.fanout_linger,
    );
    Ok(Bound {
        router,
        fanout,
        router_endpoint,
        pub_endpoint,
    })
}

/// The `tcp://host:port` endpoint `listener` is bound on (`host` may be a bracketed IPv6
/// address); a failure names `endpoint`, the configured one.
fn bound_endpoint(
    listener: &tokio::net::TcpListener,
    host: &str,
    endpoint: &str,
) -> Result<String, TransportError> {
    let port = listener
        .local_addr()
        .map_err(|e| guard::bind_error(endpoint, e))?
        .port();
    Ok(tcp_endpoint(
        host.trim_start_matches('[').trim_end_matches(']'),
        port,
    ))
}

struct BindTask {
    router: Arc<Router>,
    fanout: Arc<std::sync::Mutex<Fanout>>,
    rx: mpsc::Receiver<BindCmd>,
    cancel: CancellationToken,
    config: HubBindConfig,
}

impl BindTask {
    async fn run(self) {
        let BindTask {
            router,
            fanout,
            mut rx,
            cancel,
            config,
        } = self;
        let period = config
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(3600));
        let mut heartbeat = tokio::time::interval(period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ack = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(BindCmd::Shutdown(tx)) => { ack = Some(tx); break; }
                },
                _ = heartbeat.tick(), if config.heartbeat_interval.is_some() => {
                    lock_fanout(&fanout).publish(&vec![Bytes::from_static(HEARTBEAT_TOPIC.as_bytes())]);
                }
            }
        }
        // Close the receive side first so that repliers and publishers see `Closed` from now
        // on.
        rx.close();
        if let Some(task) = router.close() {
            let _ = task.await;
        }
        let listener = lock_fanout(&fanout).close();
        if let Some(task) = listener {
            let _ = task.await;
        }
        if let Some(tx) = ack {
            let _ = tx.send(());
        }
    }
}
