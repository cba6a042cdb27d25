//! The HTTP listener (`[http] listen`, off when unset), built on axum.
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | `200 ok` while the process runs |
//! | `GET /readyz` | `200 ready`, or `503` with the reasons (one per line) from [`Readiness`] |
//! | `GET /metrics` | OpenMetrics text of [`Metrics`] |
//! | `GET /api/info` | `{"daemon": "hintfed-agent", "version": "0.1.0", "started_ms": 1700000000000}` |
//! | `GET /api/state` | [`StateView`] from the daemon's [`StatusSource`] |
//! | `GET /api/origins` | `[OriginView]` from the daemon's [`StatusSource`] |
//! | `GET /events` | server-sent events, each `data:` one [`StatusEvent`] as JSON |
//! | `GET /` (+ `/status.css`, `/status.js`) | the status page, embedded in the binary |
//!
//! # JSON shapes
//! All times are Unix milliseconds (`*_ms`) or durations in milliseconds (`*_ms_ago`,
//! `lag_ms`). Device states are Asterisk's names (`NOT_INUSE`, `INUSE`, `BUSY`, `INVALID`,
//! `UNAVAILABLE`, `RINGING`, `RINGINUSE`, `ONHOLD`, `UNKNOWN`).
//!
//! `/api/state`:
//! ```json
//! { "devices": [ { "key": "PJSIP/100", "aggregate": "INUSE", "changed_ms": 1700000000000,
//!                  "origins": { "pbx-a": "INUSE", "pbx-b": "NOT_INUSE" } } ],
//!   "presence": [ { "key": "CustomPresence:alice", "status": "dnd", "subtype": "lunch",
//!                   "message": "back at 2", "origin": "pbx-c", "changed_ms": 1700000000000 } ] }
//! ```
//! `/api/origins`:
//! ```json
//! [ { "name": "pbx-a", "up": true, "epoch": 1700000000, "last_seq": 42,
//!     "last_seen_ms_ago": 180, "lag_ms": 3, "detail": null } ]
//! ```
//! `/events` (`data:` lines; the event name is the default `message`):
//! ```json
//! { "type": "device", "key": "PJSIP/100", "aggregate": "INUSE", "changed_ms": 1, "origins": {} }
//! { "type": "presence", "key": "CustomPresence:alice", "status": "dnd", ... }
//! { "type": "origin", "name": "pbx-a", "up": false, ... }
//! { "type": "resync" }
//! ```
//! An item event replaces the item with the same `key` (`name` for origins). `resync` tells
//! the client to fetch `/api/state` and `/api/origins` again: the daemon sends it after a
//! bulk change, and the server sends it to a client that lagged behind (the broadcast
//! channel is bounded; a slow client loses events, never slows the daemon).
//!
//! # Bounds
//! Served by hyper's HTTP/1.1 connection directly (not `axum::serve`, which offers no
//! timeouts and logs nothing). At most [`HttpLimits::max_connections`] connections: at the
//! cap the oldest connection that has not sent a whole request is closed to make room (a
//! flood of silent or trickling peers cannot lock real clients out), and when every slot is
//! a real client new ones wait in the accept path. At most [`HttpLimits::max_event_clients`]
//! `/events` streams (`503` beyond). A connection that sends nothing within
//! [`HttpLimits::first_byte_timeout`], or whose request head is not complete within
//! [`HttpLimits::head_timeout`] (slowloris; also the keep-alive idle timeout), or that reads
//! nothing of a response for [`HttpLimits::write_timeout`], is closed. Request heads are
//! capped at [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] (`431`), announced bodies at
//! [`MAX_BODY_BYTES`] (`413`); only `GET`/`HEAD` are routed. Each of these, and malformed
//! requests (`400`), is logged as a warning naming the peer address, at most 10 lines per
//! 10 s ([`WarnLimiter`]; the next line counts the ones held back).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
/// The future [`StatusSource::state`] returns.
pub use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use crate::metrics::{self, Metrics};
use crate::ratelimit::WarnLimiter;

/// One device row of the status table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device name as published, e.g. `PJSIP/100`.
    pub key: String,
    /// The aggregate state applied everywhere.
    pub aggregate: String,
    /// When the aggregate last changed, Unix ms.
    pub changed_ms: u64,
    /// The state reported by each origin (origin name → state).
    pub origins: BTreeMap<String, String>,
}

/// One presence row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceView {
    /// Presentity, e.g. `CustomPresence:alice`.
    pub key: String,
    /// `available`, `away`, `dnd`, `xa`, `chat`, `unavailable`, `not_set`...
    pub status: String,
    /// Subtype, possibly empty.
    pub subtype: String,
    /// Message, possibly empty.
    pub message: String,
    /// Origin of the winning (latest) write.
    pub origin: String,
    /// When it last changed, Unix ms.
    pub changed_ms: u64,
}

/// One origin (Asterisk server) and its health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginView {
    /// Origin name (system name).
    pub name: String,
    /// Alive (heartbeats arriving, Asterisk connected).
    pub up: bool,
    /// Current epoch of the origin.
    pub epoch: u64,
    /// Last sequence number seen.
    pub last_seq: u64,
    /// Milliseconds since anything was heard from it, if ever.
    pub last_seen_ms_ago: Option<u64>,
    /// Propagation lag (receive time minus origin timestamp), ms, if known.
    pub lag_ms: Option<u64>,
    /// Free text, e.g. why it is down.
    pub detail: Option<String>,
}

/// The body of `/api/state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    /// Devices, any order (the page sorts).
    pub devices: Vec<DeviceView>,
    /// Presence entries.
    pub presence: Vec<PresenceView>,
}

/// A live change notification pushed on `/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StatusEvent {
    /// A device row changed (replace the row with this key).
    Device(DeviceView),
    /// A presence row changed.
    Presence(PresenceView),
    /// An origin changed.
    Origin(OriginView),
    /// Refetch everything.
    Resync,
}

/// What the daemon shows on `/api/state` and `/api/origins`. Called on every request.
pub trait StatusSource: Send + Sync {
    /// Every device and presence key. A future: the daemon may build the view where its
    /// state lives (the agent's relay task) instead of keeping a copy for the page.
    fn state(&self) -> BoxFuture<'_, StateView>;
    /// Every origin (quick: copy out of a lock, no I/O).
    fn origins(&self) -> Vec<OriginView>;
}

/// A source with nothing to show (before the daemon installs its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyStatus;

impl StatusSource for EmptyStatus {
    fn state(&self) -> BoxFuture<'_, StateView> {
        Box::pin(std::future::ready(StateView::default()))
    }
    fn origins(&self) -> Vec<OriginView> {
        Vec::new()
    }
}

/// A replaceable [`StatusSource`]: the HTTP server starts before the daemon has built its
/// state, and the daemon installs its source when ready.
#[derive(Clone)]
pub struct StatusSlot(Arc<RwLock<Arc<dyn StatusSource>>>);

impl Default for StatusSlot {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(Arc::new(EmptyStatus))))
    }
}

impl std::fmt::Debug for StatusSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusSlot")
    }
}

impl StatusSlot {
    /// Install the daemon's source.
    pub fn set(&self, source: Arc<dyn StatusSource>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = source;
    }

    /// The current source.
    pub fn get(&self) -> Arc<dyn StatusSource> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Sender side of `/events`: a bounded broadcast (capacity [`EVENT_BUFFER`]); publishing
/// never blocks, lagging clients get a `resync`.
#[derive(Debug, Clone)]
pub struct StatusEvents(broadcast::Sender<StatusEvent>);

/// Events buffered per `/events` client before it is considered lagging.
pub const EVENT_BUFFER: usize = 1024;

impl Default for StatusEvents {
    fn default() -> Self {
        Self(broadcast::channel(EVENT_BUFFER).0)
    }
}

impl StatusEvents {
    /// Push a change to every connected client (no-op when none is connected).
    pub fn publish(&self, event: StatusEvent) {
        let _ = self.0.send(event);
    }

    /// A receiver (what `/events` uses; also handy for the demo's live log).
    pub fn subscribe(&self) -> broadcast::Receiver<StatusEvent> {
        self.0.subscribe()
    }

    /// Number of connected receivers.
    pub fn receiver_count(&self) -> usize {
        self.0.receiver_count()
    }
}

/// Whether the daemon is ready: `Ready`, or not with the reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyState {
    /// Serving.
    Ready,
    /// Not serving, why (one reason per failing condition).
    NotReady(Vec<String>),
}

/// Readiness as a set of named conditions (e.g. `asterisk`, `transport`): ready when at
/// least one condition was set and all are OK. Starts not ready (`starting`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
    tx: Arc<watch::Sender<ReadyState>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Not ready, reason `starting`.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(ReadyState::NotReady(vec!["starting".into()]));
        Self {
            conditions: Arc::default(),
            tx: Arc::new(tx),
        }
    }

    /// Set one condition: `Ok(())` when fine, `Err(reason)` when not (e.g.
    /// `Err("AMI connection refused".into())`). The reason is shown on `/readyz` as
    /// `<condition>: <reason>`.
    pub fn set(&self, condition: &str, state: Result<(), String>) {
        let mut c = self
            .conditions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.insert(condition.to_owned(), state);
        let failing: Vec<String> = c
            .iter()
            .filter_map(|(k, v)| v.as_ref().err().map(|r| format!("{k}: {r}")))
            .collect();
        let next = if failing.is_empty() {
            ReadyState::Ready
        } else {
            ReadyState::NotReady(failing)
        };
        self.tx.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }

    /// The current state.
    pub fn get(&self) -> ReadyState {
        self.tx.borrow().clone()
    }

    /// Watch changes.
    pub fn subscribe(&self) -> watch::Receiver<ReadyState> {
        self.tx.subscribe()
    }
}

/// Limits of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Concurrent connections (default 256). At the cap, the oldest connection that has not
    /// sent a whole request yet is closed to make room; when there is none, new connections
    /// wait.
    pub max_connections: usize,
    /// Concurrent `/events` streams (default 32).
    pub max_event_clients: usize,
    /// A connection that sends no byte this long after it was accepted is closed
    /// (default 5 s).
    pub first_byte_timeout: Duration,
    /// A request head (request line and headers) must be complete this long after the
    /// server started waiting for it, or the connection is closed: cuts slow clients that
    /// trickle header bytes, and is also the keep-alive idle timeout (default 10 s).
    pub head_timeout: Duration,
    /// A write that makes no progress this long (a peer that never reads) closes the
    /// connection (default 30 s).
    pub write_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_event_clients: 32,
            first_byte_timeout: Duration::from_secs(5),
            head_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The body of `/api/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoView {
    /// Daemon name, e.g. `hintfed-agent`.
    pub daemon: String,
    /// Version.
    pub version: String,
    /// Process start, Unix ms.
    pub started_ms: u64,
}

/// What the HTTP handlers read. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpContext {
    /// Name and version for the page.
    pub info: InfoView,
    /// Metrics for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Source of `/api/state` and `/api/origins`.
    pub status: StatusSlot,
    /// Readiness for `/readyz`.
    pub readiness: Readiness,
    /// Events for `/events`.
    pub events: StatusEvents,
    /// Limits.
    pub limits: HttpLimits,
    /// Cancelled at shutdown: ends `/events` streams so the server can stop.
    pub shutdown: CancellationToken,
}

#[derive(Clone)]
struct AppState {
    ctx: HttpContext,
    sse_slots: Arc<Semaphore>,
}

const STATUS_HTML: &str = include_str!("../assets/status.html");
const STATUS_CSS: &str = include_str!("../assets/status.css");
const STATUS_JS: &str = include_str!("../assets/status.js");
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The router (for tests or to nest into a bigger app).
pub fn router(ctx: HttpContext) -> Router {
    let state = AppState {
        sse_slots: Arc::new(Semaphore::new(ctx.limits.max_event_clients)),
        ctx,
    };
    Router::new()
        .route("/", get(page))
        .route("/status.css", get(css))
        .route("/status.js", get(js))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/info", get(api_info))
        .route("/api/state", get(api_state))
        .route("/api/origins", get(api_origins))
        .route("/events", get(events))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

fn with_headers(mut resp: Response, content_type: &'static str) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn page() -> Response {
    let mut r = with_headers(STATUS_HTML.into_response(), "text/html; charset=utf-8");
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

async fn css() -> Response {
    with_headers(STATUS_CSS.into_response(), "text/css; charset=utf-8")
}

async fn js() -> Response {
    with_headers(STATUS_JS.into_response(), "text/javascript; charset=utf-8")
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.ctx.readiness.get() {
        ReadyState::Ready => (StatusCode::OK, "ready\n").into_response(),
        ReadyState::NotReady(reasons) => {
            let mut body = reasons.join("\n");
            body.push('\n');
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    with_headers(
        s.ctx.metrics.encode().into_response(),
        metrics::CONTENT_TYPE,
    )
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(body) => with_headers(body.into_response(), "application/json"),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn api_info(State(s): State<AppState>) -> Response {
    json(&s.ctx.info)
}

async fn api_state(State(s): State<AppState>) -> Response {
    let source = s.ctx.status.get();
    json(&source.state().await)
}

async fn api_origins(State(s): State<AppState>) -> Response {
    json(&s.ctx.status.get().origins())
}

async fn events(State(s): State<AppState>) -> Response {
    let Ok(permit) = s.sse_slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many event clients\n").into_response();
    };
    let rx = s.ctx.events.subscribe();
    let stream = BroadcastStream::new(rx)
        .map(move |item| {
            // The permit lives as long as the stream: dropping the client frees the slot.
            let _slot = &permit;
            Ok::<Event, Infallible>(Event::default().data(sse_data(item)))
        })
        .take_until(s.ctx.shutdown.clone().cancelled_owned());
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The `data:` of one SSE item: the event as JSON, or `resync` for a client that lagged.
fn sse_data(item: Result<StatusEvent, BroadcastStreamRecvError>) -> String {
    let ev = match item {
        Ok(ev) => ev,
        Err(BroadcastStreamRecvError::Lagged(_)) => StatusEvent::Resync,
    };
    serde_json::to_string(&ev).unwrap_or_else(|_| "{\"type\":\"resync\"}".to_owned())
}

/// A bound, not yet running HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    listener: TcpListener,
    ctx: HttpContext,
}

impl HttpServer {
    /// Bind `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, ctx: HttpContext) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self { listener, ctx })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `ctx.shutdown` is cancelled, then finish in-flight requests (SSE streams
    /// end at once) and return once every connection closed.
    pub async fn run(self) -> std::io::Result<()> {
        let Self { listener, ctx } = self;
        let shutdown = ctx.shutdown.clone();
        let limits = ctx.limits;
        let shared = Arc::new(Shared {
            router: router(ctx),
            limits,
            shutdown: shutdown.clone(),
            waiting: Mutex::new(BTreeMap::new()),
            warn: WarnLimiter::default(),
        });
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let tracker = TaskTracker::new();
        let mut next_id = 0u64;
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: log, back off a little, go on.
                    if let Some(suppressed) = shared.warn.allow() {
                        warn!(error = %e, suppressed, "HTTP: accept failed");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            };
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // At the cap: shed the oldest connection that has not sent a request yet
                    // (a flood of silent or trickling peers must not lock others out); when
                    // every connection is a real client, this one waits for a free slot.
                    let shed = shared.shed_oldest_waiting();
                    if let Some(suppressed) = shared.warn.allow() {
                        match shed {
                            Some(victim) => warn!(
                                %peer, closed = %victim, max_connections = limits.max_connections,
                                suppressed,
                                "HTTP: too many connections; closed the oldest one that sent no request"
                            ),
                            None => warn!(
                                %peer, max_connections = limits.max_connections, suppressed,
                                "HTTP: too many connections; this one waits for a free slot"
                            ),
                        }
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        p = slots.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            // Never closed; stop serving rather than spin if it ever is.
                            Err(_) => break,
                        },
                    }
                }
            };
            let _ = stream.set_nodelay(true);
            let id = next_id;
            next_id += 1;
            let evict = CancellationToken::new();
            shared
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, (peer, evict.clone()));
            tracker.spawn(serve_connection(
                shared.clone(),
                stream,
                peer,
                id,
                evict,
                permit,
            ));
        }
        drop(listener);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// Wait after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every connection task shares.
struct Shared {
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    /// Connections that have not sent a whole request head yet (oldest first), the ones
    /// shed when the connection cap is reached.
    waiting: Mutex<BTreeMap<u64, (SocketAddr, CancellationToken)>>,
    /// One budget for every warning about a peer.
    warn: WarnLimiter,
}

impl Shared {
    fn shed_oldest_waiting(&self) -> Option<SocketAddr> {
        let (_, (peer, token)) = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_first()?;
        token.cancel();
        Some(peer)
    }

    fn not_waiting(&self, id: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Removes a connection from the waiting list however its task ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.not_waiting(self.id);
    }
}

/// One connection: HTTP/1.1 with the head timeout (which also bounds the keep-alive idle
/// time, as hyper reads the next head while idle), the head size cap, the first-byte and
/// write-stall timeouts of [`LimitedIo`]; problems are logged with the peer address.
async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    evict: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _registered = Registered {
        shared: shared.clone(),
        id,
    };
    let limits = shared.limits;
    let read_total = Arc::new(AtomicU64::new(0));
    let read_at_last_head = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(LimitedIo {
        read_total: read_total.clone(),
        io: stream,
        first_byte: Some(Box::pin(tokio::time::sleep(limits.first_byte_timeout))),
        write_timeout: limits.write_timeout,
        write_stall: None,
    });
    let svc_shared = shared.clone();
    let (svc_total, svc_at_head) = (read_total.clone(), read_at_last_head.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        svc_at_head.store(svc_total.load(Ordering::Relaxed), Ordering::Relaxed);
        async move {
            // A whole head arrived: a real request, no longer sheddable.
            shared.not_waiting(id);
            Ok::<_, Infallible>(handle_request(&shared, peer, req).await)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = evict.cancelled() => return, // shed at the cap (logged there); dropping closes
        () = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Nothing read since the last whole request: an idle keep-alive connection (browsers
        // keep them), not a slow client.
        let at_head = read_at_last_head.load(Ordering::Relaxed);
        let idle_keep_alive = at_head > 0 && read_total.load(Ordering::Relaxed) == at_head;
        if idle_keep_alive && e.is_timeout() {
            debug!(%peer, "HTTP keep-alive connection idle past head_timeout; closed");
        } else {
            report(&shared, peer, &e);
        }
    }
}

/// Longest request head accepted (request line and headers; beyond: `431`, closed).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request (beyond: `431`, closed).
pub const MAX_HEADERS: usize = 64;
/// Largest request body announced (beyond: `413`, closed). No endpoint takes a body.
pub const MAX_BODY_BYTES: u64 = 16 * 1024;

async fn handle_request(shared: &Shared, peer: SocketAddr, mut req: Request<Incoming>) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES) {
        if let Some(suppressed) = shared.warn.allow() {
            warn!(%peer, content_length = announced, suppressed, "HTTP: request body too large; closed");
        }
        let mut r = (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    req.extensions_mut().insert(ConnectInfo(peer));
    match shared.router.clone().oneshot(req.map(Body::new)).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// Logs why a connection failed, when it is the peer's doing (rate-limited, with the peer).
fn report(shared: &Shared, peer: SocketAddr, e: &hyper::Error) {
    let io_timeout = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .filter(|io| io.kind() == std::io::ErrorKind::TimedOut)
        .map(ToString::to_string);
    let problem = if e.is_parse_too_large() {
        "request head too large".to_owned()
    } else if e.is_parse() {
        "malformed request".to_owned()
    } else if e.is_timeout() {
        "request head not complete within head_timeout (slow client)".to_owned()
    } else if let Some(t) = io_timeout {
        t
    } else {
        debug!(%peer, error = %e, "HTTP connection ended with an error");
        return;
    };
    if let Some(suppressed) = shared.warn.allow() {
        warn!(%peer, %problem, error = %e, suppressed, "HTTP: bad client; connection closed");
    }
}

/// A connection closed if its first byte does not arrive in time, or if a write makes no
/// progress for `write_timeout` (a peer that never reads).
struct LimitedIo {
    io: TcpStream,
    /// Bytes read so far.
    read_total: Arc<AtomicU64>,
    /// Deadline for the first byte; `None` once one arrived.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
    write_timeout: Duration,
    /// Running while a write is blocked; reset by any progress.
    write_stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl LimitedIo {
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let timeout = self.write_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer read nothing within the write timeout",
            )));
        }
        Poll::Pending
    }

    fn track_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Pending => match self.check_stall(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            ready => {
                self.write_stall = None;
                ready
            }
        }
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let got = buf.filled().len().saturating_sub(before);
        if got > 0 {
            self.read_total
                .fetch_add(u64::try_from(got).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        if let Some(deadline) = self.first_byte.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_byte = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within the first-byte timeout",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track_write(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.track_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.track_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_shapes() {
        let ev = StatusEvent::Device(DeviceView {
            key: "PJSIP/100".into(),
            aggregate: "INUSE".into(),
            changed_ms: 5,
            origins: BTreeMap::from([("pbx-a".into(), "INUSE".into())]),
        });
        assert_eq!(
            serde_json::to_string(&ev).expect("json"),
            r#"{"type":"device","key":"PJSIP/100","aggregate":"INUSE","changed_ms":5,"origins":{"pbx-a":"INUSE"}}"#
        );
        assert_eq!(
            serde_json::to_string(&StatusEvent::Resync).expect("json"),
            r#"{"type":"resync"}"#
        );
        let o: StatusEvent = serde_json::from_str(
            r#"{"type":"origin","name":"pbx-a","up":false,"epoch":1,"last_seq":2,"last_seen_ms_ago":null,"lag_ms":3,"detail":"AMI lost"}"#,
        )
        .expect("parse");
        assert!(matches!(
            o,
            StatusEvent::Origin(OriginView { up: false, .. })
        ));
    }

    #[tokio::test]
    async fn lagging_client_gets_resync_then_continues() {
        let (tx, rx) = broadcast::channel(2);
        let mut stream = BroadcastStream::new(rx).map(sse_data);
        for i in 0..5 {
            let _ = tx.send(StatusEvent::Origin(OriginView {
                name: format!("pbx-{i}"),
                up: true,
                epoch: 1,
                last_seq: i,
                last_seen_ms_ago: None,
                lag_ms: None,
                detail: None,
            }));
        }
        assert_eq!(stream.next().await.as_deref(), Some(r#"{"type":"resync"}"#));
        let next = stream.next().await.expect("newest events follow");
        assert!(next.contains(r#""name":"pbx-3""#), "{next}");
    }

    #[test]
    fn readiness_conditions() {
        let r = Readiness::new();
        assert_eq!(r.get(), ReadyState::NotReady(vec!["starting".into()]));
        r.set("asterisk", Err("connection refused".into()));
        r.set("transport", Ok(()));
        assert_eq!(
            r.get(),
            ReadyState::NotReady(vec!["asterisk: connection refused".into()])
        );
        r.set("asterisk", Ok(()));
        assert_eq!(r.get(), ReadyState::Ready);
    }
}
