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
//! At most [`HttpLimits::max_connections`] connections (further ones wait in the kernel's
//! accept queue), at most [`HttpLimits::max_event_clients`] `/events` streams (`503` beyond),
//! request bodies capped at 16 KiB (no endpoint takes one), only `GET`/`HEAD`. A connection
//! that sends nothing within [`HttpLimits::first_byte_timeout`] is closed, so peers that
//! connect and never speak cannot hold every slot (a peer that trickles bytes still can, up to
//! the connection cap).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics};

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

/// What the daemon shows on `/api/state` and `/api/origins`. Called on every request: keep
/// it quick (copy out of a lock, no I/O).
pub trait StatusSource: Send + Sync {
    /// Every device and presence key.
    fn state(&self) -> StateView;
    /// Every origin.
    fn origins(&self) -> Vec<OriginView>;
}

/// A source with nothing to show (before the daemon installs its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyStatus;

impl StatusSource for EmptyStatus {
    fn state(&self) -> StateView {
        StateView::default()
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
    /// Concurrent connections (default 256).
    pub max_connections: usize,
    /// Concurrent `/events` streams (default 32).
    pub max_event_clients: usize,
    /// A connection that sends no byte this long after it was accepted is closed
    /// (default 5 s).
    pub first_byte_timeout: std::time::Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_event_clients: 32,
            first_byte_timeout: std::time::Duration::from_secs(5),
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
    json(&s.ctx.status.get().state())
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
    /// end at once).
    pub async fn run(self) -> std::io::Result<()> {
        let shutdown = self.ctx.shutdown.clone();
        let listener = LimitedListener {
            inner: self.listener,
            slots: Arc::new(Semaphore::new(self.ctx.limits.max_connections.max(1))),
            first_byte_timeout: self.ctx.limits.first_byte_timeout,
        };
        axum::serve(listener, router(self.ctx))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

/// Accepts a connection only when a slot is free.
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    first_byte_timeout: std::time::Duration,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquire cannot fail; if it ever did, fall back
        // to accepting without a permit rather than stopping the server.
        let permit = self.slots.clone().acquire_owned().await.ok();
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let _ = io.set_nodelay(true);
        (
            LimitedIo {
                io,
                _permit: permit,
                first_byte: Some(Box::pin(tokio::time::sleep(self.first_byte_timeout))),
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its slot; closed if its first byte does not arrive in time.
struct LimitedIo {
    io: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
    /// Deadline for the first byte; `None` once one arrived.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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
