//! [`Pbx`]: one Asterisk as a relay sees it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hintfed_ami::{
    AmiClient, ClientConfig, ClientError, ClientEvent, Completions, DeviceStateChange,
    ExtensionStatus, Message, PresenceStateChange, Response, SetvarWriter, WriteDone, WriteError,
    actions,
};
use hintfed_transport::{LinkStatus, ReqClient, ReqClientConfig, SubClient, SubClientConfig};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::event::{HintItem, PbxEvent, PresenceItem, classify};
use crate::zmq::{action_to_json, event_from_json, reply_from_json};

/// Where state events come from.
#[derive(Debug, Clone)]
pub enum EventsVia {
    /// AMI over TCP (or TLS). When [`ActionsVia::Ami`] names the same address and user, one
    /// connection serves both.
    Ami(Box<ClientConfig>),
    /// res_zmq_manager's PUB socket (`addr_evt`), subscribed with the prefix `{`.
    Zmq {
        /// `tcp://host:port`.
        endpoint: String,
    },
    /// The Kafka topic app_ami_kafka writes (events only: actions still need AMI or
    /// res_zmq_manager, whose link also says whether Asterisk is up).
    #[cfg(feature = "kafka")]
    Kafka(Box<crate::kafka::KafkaSourceConfig>),
}

/// Where actions (`Setvar`, the state lists) go.
#[derive(Debug, Clone)]
pub enum ActionsVia {
    /// AMI over TCP (or TLS).
    Ami(Box<ClientConfig>),
    /// res_zmq_manager's REP socket (`addr_cmd`), lazy-pirate REQ.
    Zmq(ReqClientConfig),
}

/// How to reach one Asterisk.
#[derive(Debug, Clone)]
pub struct PbxConfig {
    /// Event source.
    pub events: EventsVia,
    /// Action sink.
    pub actions: ActionsVia,
    /// Over res_zmq_manager, how often a `Ping` checks that Asterisk answers (default 2 s).
    pub zmq_ping_interval: Duration,
    /// Capacity of the event channel to the relay (default 4096). When it is full the
    /// producer waits; the AMI client never does (its subscribers lag, which becomes a
    /// [`PbxEvent::Resync`]).
    pub event_capacity: usize,
}

impl PbxConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(events: EventsVia, actions: ActionsVia) -> Self {
        Self {
            events,
            actions,
            zmq_ping_interval: Duration::from_secs(2),
            event_capacity: 4096,
        }
    }
}

/// Why an action on a [`Pbx`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PbxError {
    /// Asterisk is not reachable right now; nothing was done.
    #[error("Asterisk not reachable: {0}")]
    NotConnected(String),
    /// Asterisk answered `Response: Error`.
    #[error("Asterisk refused {action}: {message}")]
    Refused {
        /// The action.
        action: String,
        /// Asterisk's `Message`.
        message: String,
    },
    /// No answer in time, or the link broke during the action.
    #[error("Asterisk did not answer {action}: {detail}")]
    NoAnswer {
        /// The action.
        action: String,
        /// What happened.
        detail: String,
    },
    /// The answer could not be read.
    #[error("unreadable answer from Asterisk: {0}")]
    Malformed(String),
    /// The action is not available over this link (e.g. `Getvar` over res_zmq_manager, which
    /// crashes Asterisk).
    #[error("{0}")]
    Unsupported(&'static str),
}

#[derive(Debug, Clone)]
enum Actions {
    Ami(AmiClient),
    Zmq(ReqClient),
}

/// A `Setvar` started with [`Pbx::start_setvar`], finished.
#[derive(Debug)]
pub struct SetvarDone {
    /// The token given to [`Pbx::start_setvar`].
    pub token: u64,
    /// As [`Pbx::setvar`] would have answered.
    pub result: Result<(), PbxError>,
}

/// Where [`Pbx::start_setvar`] writes go.
#[derive(Debug, Clone)]
enum Writes {
    /// Pipelined on the AMI connection, answers matched by `ActionID`.
    Ami(SetvarWriter),
    /// Over res_zmq_manager: a task per write (the REQ link serves one at a time anyway).
    Zmq(Arc<Completions<SetvarDone>>),
}

/// Handle to one Asterisk: cheap to clone. Events arrive on the receiver given by
/// [`Pbx::start`]; dropping every handle and the receiver stops the background tasks.
#[derive(Debug, Clone)]
pub struct Pbx {
    actions: Actions,
    writes: Writes,
    up: Arc<AtomicBool>,
    // Kept so the event clients live as long as the handle.
    _events_ami: Option<AmiClient>,
    _events_zmq: Option<SubClient>,
    #[cfg(feature = "kafka")]
    _events_kafka: Option<Arc<crate::kafka::KafkaSource>>,
}

struct Signals {
    tx: mpsc::Sender<PbxEvent>,
    generation: AtomicU64,
    up: Arc<AtomicBool>,
}

impl Signals {
    async fn up(&self) -> bool {
        self.up.store(true, Ordering::SeqCst);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.tx.send(PbxEvent::Up { generation }).await.is_ok()
    }

    async fn down(&self, reason: String) -> bool {
        self.up.store(false, Ordering::SeqCst);
        self.tx.send(PbxEvent::Down { reason }).await.is_ok()
    }

    /// Queues `ev`, waiting for room only when the relay's queue is full.
    async fn send(&self, ev: PbxEvent) -> bool {
        match self.tx.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(ev)) => self.tx.send(ev).await.is_ok(),
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

fn same_ami(a: &ClientConfig, b: &ClientConfig) -> bool {
    a.addr == b.addr && a.username == b.username
}

impl Pbx {
    /// Connects in the background (needs a Tokio runtime) and returns the handle and the
    /// event receiver. The first [`PbxEvent::Up`] arrives once actions are served.
    pub fn start(config: PbxConfig) -> Result<(Self, mpsc::Receiver<PbxEvent>), PbxError> {
        let (tx, rx) = mpsc::channel(config.event_capacity.max(1));
        let up = Arc::new(AtomicBool::new(false));
        let signals = Arc::new(Signals {
            tx,
            generation: AtomicU64::new(0),
            up: Arc::clone(&up),
        });

        let mut events_ami = None;
        let mut events_zmq = None;
        #[cfg(feature = "kafka")]
        let mut events_kafka = None;
        let (actions, writes) = match &config.actions {
            ActionsVia::Ami(actions_cfg) => {
                let shared =
                    matches!(&config.events, EventsVia::Ami(e) if same_ami(e, actions_cfg));
                let mut cfg = ClientConfig::clone(actions_cfg);
                if !shared {
                    // This connection only carries actions.
                    cfg.events = "off".to_owned();
                }
                let client = AmiClient::start(cfg);
                tokio::spawn(ami_pump(
                    client.clone(),
                    client.subscribe(),
                    Arc::clone(&signals),
                    shared,
                    true,
                ));
                let writer = client.setvar_writer();
                (Actions::Ami(client), Writes::Ami(writer))
            }
            ActionsVia::Zmq(req_cfg) => {
                let req = ReqClient::connect(req_cfg.clone())
                    .map_err(|e| PbxError::NotConnected(e.to_string()))?;
                tokio::spawn(zmq_liveness(
                    req.clone(),
                    Arc::clone(&signals),
                    config.zmq_ping_interval,
                ));
                (Actions::Zmq(req), Writes::Zmq(Arc::default()))
            }
        };
        match &config.events {
            EventsVia::Ami(cfg) => {
                let shared = matches!(&config.actions, ActionsVia::Ami(a) if same_ami(cfg, a));
                if !shared {
                    let client = AmiClient::start(ClientConfig::clone(cfg));
                    tokio::spawn(ami_pump(
                        client.clone(),
                        client.subscribe(),
                        Arc::clone(&signals),
                        true,
                        false,
                    ));
                    events_ami = Some(client);
                }
            }
            EventsVia::Zmq { endpoint } => {
                let mut sub_cfg = SubClientConfig::new(endpoint.clone());
                sub_cfg.subscriptions = vec!["{".to_owned()];
                let (sub, frames) = SubClient::connect(sub_cfg)
                    .map_err(|e| PbxError::NotConnected(e.to_string()))?;
                tokio::spawn(zmq_events(sub.status(), frames, Arc::clone(&signals)));
                events_zmq = Some(sub);
            }
            #[cfg(feature = "kafka")]
            EventsVia::Kafka(cfg) => {
                let src = crate::kafka::KafkaSource::start(
                    crate::kafka::KafkaSourceConfig::clone(cfg),
                    signals.tx.clone(),
                )
                .map_err(|e| PbxError::NotConnected(e.to_string()))?;
                events_kafka = Some(Arc::new(src));
            }
        }
        Ok((
            Self {
                actions,
                writes,
                up,
                _events_ami: events_ami,
                _events_zmq: events_zmq,
                #[cfg(feature = "kafka")]
                _events_kafka: events_kafka,
            },
            rx,
        ))
    }

    /// Whether actions are served right now (as last seen).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether [`Pbx::device_state`] may be used (not over res_zmq_manager).
    pub fn supports_getvar(&self) -> bool {
        matches!(self.actions, Actions::Ami(_))
    }

    /// Sends one action and returns the messages of its answer: over AMI its response; over
    /// res_zmq_manager the whole reply (the response first, then any list events; AMI lists
    /// go through [`Pbx::request_items`]). A `Response: Error` becomes [`PbxError::Refused`].
    async fn request(&self, action: Message) -> Result<Vec<Message>, PbxError> {
        let name = action.action_name().unwrap_or("?").to_owned();
        let msgs = match &self.actions {
            Actions::Ami(client) => client
                .send(action)
                .await
                .map(|m| vec![m])
                .map_err(|e| client_error(&name, e))?,
            Actions::Zmq(req) => {
                let reply = req
                    .request(vec![Bytes::from(action_to_json(&action))])
                    .await
                    .map_err(|e| PbxError::NoAnswer {
                        action: name.clone(),
                        detail: e.to_string(),
                    })?;
                let frame = reply.first().cloned().unwrap_or_default();
                reply_from_json(&frame).map_err(|e| PbxError::Malformed(e.to_string()))?
            }
        };
        let first = msgs
            .first()
            .ok_or_else(|| PbxError::Malformed(format!("empty answer to {name}")))?;
        answered(name, first)?;
        Ok(msgs)
    }

    /// A list action's items, each read with `item` (`None`: not an item). Over AMI each item
    /// event is read as it arrives and dropped, so a long list (100,000 device states) is
    /// never held as messages at once.
    async fn request_items<T: Send + 'static>(
        &self,
        action: Message,
        item: impl Fn(&Message) -> Option<T> + Send + 'static,
    ) -> Result<Vec<T>, PbxError> {
        let Actions::Ami(client) = &self.actions else {
            let msgs = self.request(action).await?;
            return Ok(msgs.iter().skip(1).filter_map(&item).collect());
        };
        let name = action.action_name().unwrap_or("?").to_owned();
        let items = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&items);
        let r = client
            .list_each(action, move |m| {
                if let Some(t) = item(&m) {
                    sink.lock().unwrap_or_else(PoisonError::into_inner).push(t);
                }
            })
            .await
            .map_err(|e| client_error(&name, e))?;
        answered(name, &r.response)?;
        let mut items = items.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(std::mem::take(&mut *items))
    }

    /// `Setvar variable=value`, e.g. `DEVICE_STATE(Custom:PJSIP/100)` = `INUSE`.
    pub async fn setvar(&self, variable: &str, value: &str) -> Result<(), PbxError> {
        self.request(actions::setvar(variable, value))
            .await
            .map(drop)
    }

    /// Starts `Setvar variable=value` without waiting: its outcome is reported once, as a
    /// [`SetvarDone`] carrying `token`, by [`Pbx::take_setvars`] (wait with
    /// [`Pbx::setvars_done`]). Over AMI the writes are pipelined on the connection with no
    /// future, channel or message per write (see [`SetvarWriter`]); over res_zmq_manager each
    /// runs as [`Pbx::setvar`] in a task. Failures are as [`Pbx::setvar`]'s; a write started
    /// while Asterisk is not reachable is reported failed at once. `at`: when it was started
    /// (an AMI write's timeout counts from it; writes started together share one clock read).
    pub fn start_setvar(&self, token: u64, variable: &str, value: &str, at: Instant) {
        match &self.writes {
            Writes::Ami(w) => w.setvar(token, variable, value, at),
            Writes::Zmq(done) => {
                let pbx = self.clone();
                let done = Arc::clone(done);
                let action = actions::setvar(variable, value);
                tokio::spawn(async move {
                    let result = pbx.request(action).await.map(drop);
                    done.push(SetvarDone { token, result });
                });
            }
        }
    }

    /// Moves the writes of [`Pbx::start_setvar`] finished so far into `into` (appended);
    /// returns how many.
    pub fn take_setvars(&self, into: &mut Vec<SetvarDone>) -> usize {
        match &self.writes {
            Writes::Ami(w) => w.take_map(into, |WriteDone { token, result }| SetvarDone {
                token,
                result: result.map_err(write_error),
            }),
            Writes::Zmq(done) => done.take(into),
        }
    }

    /// Waits until [`Pbx::take_setvars`] has something to take.
    pub async fn setvars_done(&self) {
        match &self.writes {
            Writes::Ami(w) => w.completed().await,
            Writes::Zmq(done) => done.completed().await,
        }
    }

    /// `DeviceStateList`: the device states Asterisk holds in its cache.
    pub async fn list_devices(&self) -> Result<Vec<DeviceStateChange>, PbxError> {
        self.list_devices_map(Some).await
    }

    /// [`Pbx::list_devices`], each device read with `f` as it arrives (`None`: left out): a
    /// long list is never held in two forms at once.
    pub async fn list_devices_map<T: Send + 'static>(
        &self,
        f: impl Fn(DeviceStateChange) -> Option<T> + Send + 'static,
    ) -> Result<Vec<T>, PbxError> {
        self.request_items(actions::device_state_list(), move |m| {
            DeviceStateChange::from_message(m).and_then(&f)
        })
        .await
    }

    /// `PresenceStateList`.
    pub async fn list_presence(&self) -> Result<Vec<PresenceItem>, PbxError> {
        self.request_items(
            actions::presence_state_list(),
            PresenceStateChange::from_message,
        )
        .await
    }

    /// `ExtensionStateList`: every hint and its extension state.
    pub async fn list_hints(&self) -> Result<Vec<HintItem>, PbxError> {
        self.request_items(actions::extension_state_list(), |m| {
            if m.is_event("ExtensionStatus") {
                ExtensionStatus::from_message(m)
            } else {
                None
            }
        })
        .await
    }

    /// The current state of one device (`Getvar DEVICE_STATE(device)`), over AMI only.
    pub async fn device_state(&self, device: &str) -> Result<String, PbxError> {
        if !self.supports_getvar() {
            return Err(PbxError::Unsupported(
                "Getvar is never sent through res_zmq_manager (it crashes Asterisk)",
            ));
        }
        let msgs = self
            .request(actions::getvar(&format!("DEVICE_STATE({device})")))
            .await?;
        msgs[0]
            .get("Value")
            .map(str::to_owned)
            .ok_or_else(|| PbxError::Malformed("Getvar answer without Value".into()))
    }
}

/// Forwards an AMI client's lifecycle and (when `events`) its state events.
///
/// The client may have logged in before `sub` was taken (its task runs on another worker as
/// soon as it is spawned), so its `Connected` event may be missed: a session already up when
/// the pump starts is reported at once, and its `Connected` event, if it arrives anyway, is
/// skipped by generation.
async fn ami_pump(
    client: AmiClient,
    mut sub: hintfed_ami::Subscription,
    signals: Arc<Signals>,
    events: bool,
    lifecycle: bool,
) {
    let mut seen_generation = 0u64;
    if let hintfed_ami::ConnectionState::Connected { generation, .. } = client.status() {
        seen_generation = generation;
        if !session_up(&signals, lifecycle, "AMI event connection established").await {
            return;
        }
    }
    // The pump must not keep the client alive: only its subscription.
    drop(client);
    let mut batch = Vec::with_capacity(PUMP_BATCH);
    loop {
        let ok = match sub.recv_many(&mut batch, PUMP_BATCH).await {
            Ok(_) => {
                let mut ok = true;
                for ev in batch.drain(..) {
                    if !forward(ev, &signals, seen_generation, events, lifecycle).await {
                        ok = false;
                        break;
                    }
                }
                ok
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(missed = n, "fell behind the AMI event stream; resyncing");
                signals
                    .send(PbxEvent::Resync {
                        reason: format!("{n} AMI events missed"),
                    })
                    .await
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !ok {
            return;
        }
    }
}

/// AMI client events the pump takes from its subscription at once.
const PUMP_BATCH: usize = 256;

/// What [`ami_pump`] does with one client event; false once the relay is gone.
async fn forward(
    ev: ClientEvent,
    signals: &Signals,
    seen_generation: u64,
    events: bool,
    lifecycle: bool,
) -> bool {
    match ev {
        ClientEvent::Connected { generation, .. } if generation <= seen_generation => true,
        ClientEvent::Connected { generation, .. } => {
            debug!(generation, "AMI session up");
            session_up(signals, lifecycle, "AMI event connection re-established").await
        }
        ClientEvent::Disconnected { reason, .. } => {
            if lifecycle {
                signals.down(reason).await
            } else {
                true
            }
        }
        ClientEvent::Event(msg) if events => match classify(&msg) {
            Some(ev) => signals.send(ev).await,
            None => true,
        },
        ClientEvent::Event(_) => true,
    }
}

/// Tells the relay an AMI session is up: `Up` for the lifecycle pump, else a resync for
/// `reason`. False once the relay is gone.
async fn session_up(signals: &Signals, lifecycle: bool, reason: &str) -> bool {
    if lifecycle {
        signals.up().await
    } else {
        signals
            .send(PbxEvent::Resync {
                reason: reason.into(),
            })
            .await
    }
}

/// A client error as the Pbx reports it.
fn client_error(action: &str, e: ClientError) -> PbxError {
    match e {
        ClientError::NotConnected | ClientError::Shutdown => PbxError::NotConnected(e.to_string()),
        ClientError::InvalidAction(d) => PbxError::Malformed(d),
        other => PbxError::NoAnswer {
            action: action.to_owned(),
            detail: other.to_string(),
        },
    }
}

/// A failed write of a [`SetvarWriter`] as the Pbx reports it.
fn write_error(e: WriteError) -> PbxError {
    match e {
        WriteError::Refused(message) => PbxError::Refused {
            action: "Setvar".to_owned(),
            message,
        },
        WriteError::Malformed(d) => PbxError::Malformed(format!("Setvar answered {d}")),
        WriteError::Client(e) => client_error("Setvar", e),
    }
}

/// `Ok` when `first` (an answer's response) is a success; a `Response: Error` is
/// [`PbxError::Refused`].
fn answered(action: String, first: &Message) -> Result<(), PbxError> {
    match Response::from_message(first) {
        Some(r) if r.is_success() => Ok(()),
        Some(r) => Err(PbxError::Refused {
            action,
            message: r.message.unwrap_or_default(),
        }),
        None => Err(PbxError::Malformed(format!("{action} answered {first:?}"))),
    }
}

/// Pings res_zmq_manager's REP socket; turns answers and silence into `Up` / `Down`.
async fn zmq_liveness(req: ReqClient, signals: Arc<Signals>, interval: Duration) {
    let ping = Bytes::from(action_to_json(&actions::ping()));
    let mut up = false;
    let mut failures = 0u32;
    loop {
        if signals.tx.is_closed() {
            return;
        }
        match req.request(vec![ping.clone()]).await {
            Ok(_) => {
                failures = 0;
                if !up {
                    up = true;
                    info!("res_zmq_manager answers");
                    if !signals.up().await {
                        return;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                // One lost ping is not a dead Asterisk; two in a row are.
                if up && failures >= 2 {
                    up = false;
                    warn!(error = %e, "res_zmq_manager does not answer");
                    if !signals.down(e.to_string()).await {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Reads res_zmq_manager's event frames; a reconnect of the SUB link (while the action link
/// still counts Asterisk up) or a `FullyBooted` (Asterisk just started) is reported as
/// [`PbxEvent::Up`]: resync and re-apply.
async fn zmq_events(
    mut status: tokio::sync::watch::Receiver<LinkStatus>,
    mut frames: mpsc::Receiver<hintfed_transport::Frames>,
    signals: Arc<Signals>,
) {
    let mut was_connected = false;
    // The `Up` count when the link was lost (None before the first connection).
    let mut generation_at_loss: Option<u64> = None;
    loop {
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *status.borrow_and_update() == LinkStatus::Connected;
                // The module's sockets come back only with a new Asterisk process: a
                // reconnect not yet reported by the action link (no `Up` since the loss while
                // actions still answer) is a restart: `Up` (list local state, re-apply remote
                // state). Otherwise the action link reports (or reported) the `Up`, but events
                // published before this SUB joined are lost: `Resync` (list local state again).
                // While actions are down, their `Up` will come with a full sync anyway.
                if now && !was_connected && signals.up.load(Ordering::SeqCst) {
                    let restart = generation_at_loss
                        .is_some_and(|g| g == signals.generation.load(Ordering::SeqCst));
                    let ok = if restart {
                        signals.up().await
                    } else {
                        signals
                            .send(PbxEvent::Resync {
                                reason: "res_zmq_manager event link (re)connected".into(),
                            })
                            .await
                    };
                    if !ok {
                        return;
                    }
                } else if !now && was_connected {
                    generation_at_loss = Some(signals.generation.load(Ordering::SeqCst));
                }
                was_connected = now;
            }
            frame = frames.recv() => {
                let Some(frame) = frame else { return };
                let Some(first) = frame.first() else { continue };
                let msg = match event_from_json(first) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "unreadable res_zmq_manager event dropped");
                        continue;
                    }
                };
                let ok = if msg.is_event("FullyBooted") {
                    info!("Asterisk reported FullyBooted: it (re)started");
                    signals.up().await
                } else {
                    match classify(&msg) {
                        Some(ev) => signals.send(ev).await,
                        None => true,
                    }
                };
                if !ok {
                    return;
                }
            }
        }
    }
}
