//! One simulated Asterisk: a TCP listener, the shared [`Pbx`] state behind a mutex, the event
//! fan-out to sessions, the load drivers, and the [`SimHandle`] that tests and the binary hold.
//!
//! Events produced by a state change are handed out while the state lock is held, so every
//! session sees them in state order: each logged-in session has a `Subscriber` queue, and an
//! event goes only into the queues of the sessions that want it (event mask and filters
//! checked once, here), waking a session only when its queue was empty and the session is not
//! running one of its own actions (it looks at its queue after each). A queue is bounded
//! ([`SimConfig::event_buffer`], rounded up to a power of two as the broadcast ring of
//! [`SimHandle::subscribe_events`] is): a session that falls that far behind is dropped, as
//! Asterisk drops a client that blocks a write for longer than `writetimeout`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hintfed_ami::{Limits, Message};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::event::{self, SimEvent};
use crate::extensions::Dialplan;
use crate::load::{RandomLoad, ScriptLine, ScriptStep};
use crate::state::{DeviceState, Pbx, PbxOptions, SetvarError};

/// Everything one simulated server needs. `SimConfig::default()` listens on `127.0.0.1:0`
/// with user `admin`/`adminsecret`, no hints and no load. Its `Debug` output hides the secret.
#[derive(Clone)]
pub struct SimConfig {
    /// Address to listen on (port 0: any free port, see [`SimHandle::local_addr`]).
    pub listen: SocketAddr,
    /// `systemname`: put in `SystemName:` on events and in unique ids. `None`: no SystemName.
    pub name: Option<String>,
    /// The one AMI user.
    pub username: String,
    /// Its secret (plain `Secret:` or MD5 `Key:`).
    pub secret: String,
    /// Its `write =` permissions (`EVENT_FLAG_*` bits): an action runs when they share a
    /// bit with the action's authority (or it needs none), else `Permission denied`.
    /// Default: every class.
    pub write: u32,
    /// Its `eventfilter =` lines, copied into each session at login (see
    /// [`crate::filter::EventFilters`]).
    pub event_filters: Vec<String>,
    /// Hints and globals (from an `extensions.conf`).
    pub dialplan: Dialplan,
    /// Phones (not `Custom:`, not `Local/`) emit each DeviceStateChange twice.
    pub phone_duplicates: bool,
    /// Asterisk's `writetimeout`: a write blocked this long drops the connection.
    pub write_timeout: Duration,
    /// Write the responses and events that are ready together in one write, flushing once no
    /// event and no action waits. `false` (the default) writes each answer (a response, or a
    /// whole list) and each event on its own, as Asterisk does; `true` takes the simulator's
    /// own CPU off a machine that also runs what is measured (hintfed-bench `run`).
    pub coalesce_writes: bool,
    /// Delay before `Authentication failed` (Asterisk sleeps 1 s), after which the connection
    /// is closed.
    pub auth_failure_delay: Duration,
    /// Events a session may lag behind before it is dropped.
    pub event_buffer: usize,
    /// Decoder limits for actions.
    pub limits: Limits,
    /// Preload `Custom:bench0..N-1` (states NOT_INUSE, RINGING, BUSY, INUSE in turn), like the
    /// server of `devicestatelist-500`.
    pub preload_custom: usize,
    /// Timed changes, relative to the server's start.
    pub script: Vec<ScriptLine>,
    /// Random load over phones.
    pub random: Option<RandomLoad>,
    /// Random changes per second (with `random`).
    pub random_rate: f64,
    /// Start the script and random load clocks at the first successful login instead of at
    /// start-up (makes what a client sees reproducible).
    pub load_after_login: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            name: None,
            username: "admin".to_owned(),
            secret: "adminsecret".to_owned(),
            write: crate::event::ALL,
            event_filters: Vec::new(),
            dialplan: Dialplan::default(),
            phone_duplicates: true,
            write_timeout: Duration::from_millis(1000),
            coalesce_writes: false,
            auth_failure_delay: Duration::from_secs(1),
            event_buffer: 4096,
            limits: Limits {
                max_line: 8 * 1024,
                max_headers: 256,
                max_message: 64 * 1024,
            },
            preload_custom: 0,
            script: Vec::new(),
            random: None,
            random_rate: 1.0,
            load_after_login: false,
        }
    }
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("listen", &self.listen)
            .field("name", &self.name)
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .field("write", &self.write)
            .field("event_filters", &self.event_filters)
            .field("hints", &self.dialplan.hints.len())
            .field("phone_duplicates", &self.phone_duplicates)
            .field("write_timeout", &self.write_timeout)
            .field("coalesce_writes", &self.coalesce_writes)
            .field("auth_failure_delay", &self.auth_failure_delay)
            .field("event_buffer", &self.event_buffer)
            .field("limits", &self.limits)
            .field("preload_custom", &self.preload_custom)
            .field("script_lines", &self.script.len())
            .field("random", &self.random.as_ref().map(|r| r.devices().len()))
            .field("random_rate", &self.random_rate)
            .field("load_after_login", &self.load_after_login)
            .finish()
    }
}

/// Errors starting a simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Counters a simulator keeps (`Action: SimStats` reports them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Accepted logins.
    pub logins_accepted: u64,
    /// Refused logins.
    pub logins_failed: u64,
    /// `Setvar` actions received.
    pub setvar_total: u64,
    /// `Setvar` answered `Variable Set`.
    pub setvar_accepted: u64,
    /// `Setvar` answered `Variable not set` (or another error).
    pub setvar_refused: u64,
    /// Actions received per action name (as Asterisk matches them: case-insensitive; the key
    /// is the canonical spelling for known actions).
    pub actions: BTreeMap<String, u64>,
    /// Events broadcast.
    pub events: u64,
    /// Sessions dropped for reading too slowly.
    pub slow_readers_dropped: u64,
    /// Actions swallowed by a blackhole.
    pub blackholed_actions: u64,
    /// Simulated restarts.
    pub restarts: u64,
}

/// What a logged-in session wants of the events, and the events queued for it.
pub(crate) struct SubState {
    /// `send_events`: the classes the session wants.
    pub(crate) mask: u32,
    /// The session's event filters.
    pub(crate) filters: crate::filter::EventFilters,
    /// Wanted events not yet taken by the session, in state order.
    pub(crate) queue: std::collections::VecDeque<Arc<SimEvent>>,
    /// Wanted events dropped because the queue was full: the session must go.
    pub(crate) missed: u64,
}

impl SubState {
    /// Whether the session receives `ev`: the event's class in its mask, and passing its
    /// filters.
    pub(crate) fn wants(&self, ev: &SimEvent) -> bool {
        ev.passes(self.mask)
            && (self.filters.is_empty() || ev.with_text(|text| self.filters.passes(text)))
    }
}

/// The event queue of one logged-in session.
pub(crate) struct Subscriber {
    pub(crate) state: Mutex<SubState>,
    /// Notified when the queue stops being empty (or events were missed); the session's own,
    /// from before its login on (it waits on it from its start).
    pub(crate) ready: Arc<tokio::sync::Notify>,
    /// The session is running one of its actions and takes its queue right after it: what is
    /// queued meanwhile (the action's own events) wakes no one (a wake of the running task
    /// would reschedule it, and wake an idle runtime thread, once more per action).
    busy: AtomicBool,
    /// Most events queued at once.
    capacity: usize,
}

impl Subscriber {
    pub(crate) fn new(
        mask: u32,
        filters: crate::filter::EventFilters,
        capacity: usize,
        ready: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            state: Mutex::new(SubState {
                mask,
                filters,
                queue: std::collections::VecDeque::new(),
                missed: 0,
            }),
            ready,
            busy: AtomicBool::new(false),
            capacity,
        }
    }

    /// Marks the session as running an action (`true`) or done with it (`false`: it then
    /// takes its queue, under [`Subscriber::lock`], so that nothing queued while it was busy
    /// waits for a wake that did not come).
    pub(crate) fn set_busy(&self, busy: bool) {
        // The queue's lock orders this with `offer`: an offer locking after the session's
        // next look at the queue sees `false` and wakes it; one locking before is taken.
        self.busy.store(busy, Ordering::Relaxed);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `ev` if the session wants it.
    fn offer(&self, ev: &Arc<SimEvent>) {
        let mut st = self.lock();
        if !st.wants(ev) {
            return;
        }
        let wake = st.queue.is_empty() && st.missed == 0 && !self.busy.load(Ordering::Relaxed);
        if st.queue.len() >= self.capacity {
            st.missed += 1;
        } else {
            st.queue.push_back(ev.clone());
        }
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }
}

pub(crate) struct Inner {
    pub(crate) pbx: Pbx,
    /// The queues of the logged-in sessions.
    pub(crate) subscribers: Vec<Arc<Subscriber>>,
    pub(crate) boot: Instant,
    /// Wall-clock time of the (simulated) start, for `CoreStatus`.
    pub(crate) boot_wall: SystemTime,
    pub(crate) stats: SimStats,
    /// Set through [`Shared::set_blackhole`] only.
    pub(crate) blackhole_until: Option<Instant>,
    pub(crate) down_until: Option<Instant>,
    pub(crate) session_seq: u64,
    /// [`SimHandle::subscribe_events`] was called (before that, no receiver exists).
    pub(crate) events_watched: bool,
}

pub(crate) struct Shared {
    pub(crate) cfg: SimConfig,
    pub(crate) inner: Mutex<Inner>,
    /// Every event, for [`SimHandle::subscribe_events`] (sessions have their own queues).
    pub(crate) events: broadcast::Sender<Arc<SimEvent>>,
    /// The bound of each session's queue.
    pub(crate) queue_capacity: usize,
    /// Bumped by every restart: sessions of an older generation close.
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) shutdown: CancellationToken,
    /// Whether `Inner::blackhole_until` is set (written with it, under the lock).
    pub(crate) blackhole_set: AtomicBool,
    pub(crate) local_addr: SocketAddr,
    /// Set at the first successful login.
    pub(crate) logged_in: watch::Sender<bool>,
    /// Actions received, per known action (in `actions::ACTIONS` order): counted without the
    /// lock; [`Shared::stats`] adds them to [`SimStats::actions`], which holds the unknown
    /// ones.
    pub(crate) action_counts: Box<[std::sync::atomic::AtomicU64]>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; keep serving with whatever state is there.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `events` to the sessions that want them and to [`SimHandle::subscribe_events`]
    /// (call with the lock held, to keep state order).
    pub(crate) fn emit<E: Into<Arc<SimEvent>>>(&self, inner: &mut Inner, events: Vec<E>) {
        // The broadcast's lock is taken only once someone subscribed.
        let watched = inner.events_watched && self.events.receiver_count() > 0;
        for ev in events {
            inner.stats.events += 1;
            if inner.subscribers.is_empty() && !watched {
                continue;
            }
            let ev: Arc<SimEvent> = ev.into();
            for sub in &inner.subscribers {
                sub.offer(&ev);
            }
            if watched {
                // A receiver gone since is fine.
                let _ = self.events.send(ev);
            }
        }
    }

    /// A new queue for a session logging in, receiving events from now on and notifying
    /// `ready` when they wait (call with the lock held, before emitting anything the session
    /// must see).
    pub(crate) fn subscribe(
        &self,
        inner: &mut Inner,
        mask: u32,
        filters: crate::filter::EventFilters,
        ready: Arc<tokio::sync::Notify>,
    ) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber::new(mask, filters, self.queue_capacity, ready));
        inner.subscribers.push(sub.clone());
        sub
    }

    /// Removes a session's queue.
    pub(crate) fn unsubscribe(&self, sub: &Arc<Subscriber>) {
        self.lock().subscribers.retain(|s| !Arc::ptr_eq(s, sub));
    }

    /// Whether the server is blackholed now: the lock is taken only while a blackhole is set
    /// (sessions ask per action and per batch of events).
    pub(crate) fn blackholed(&self) -> bool {
        self.blackhole_set.load(Ordering::Acquire)
            && self
                .lock()
                .blackhole_until
                .is_some_and(|t| Instant::now() < t)
    }

    /// Sets or ends (`None`) the server's blackhole; `inner` is the locked state.
    pub(crate) fn set_blackhole(&self, inner: &mut Inner, until: Option<Instant>) {
        inner.blackhole_until = until;
        self.blackhole_set.store(until.is_some(), Ordering::Release);
    }

    /// The counters (`inner` is the locked state).
    pub(crate) fn stats(&self, inner: &Inner) -> SimStats {
        let mut stats = inner.stats.clone();
        crate::actions::add_action_counts(&mut stats.actions, &self.action_counts);
        stats
    }

    pub(crate) fn uptime(&self, inner: &Inner) -> u64 {
        inner.boot.elapsed().as_secs()
    }

    /// Simulated restart: a `Shutdown` event, every connection dropped, state rebuilt.
    pub(crate) fn restart(&self, down: Duration) {
        let mut inner = self.lock();
        let ev = SimEvent::new(
            "Shutdown",
            event::SYSTEM,
            inner.pbx.system_name(),
            Message::new()
                .with("Shutdown", "Cleanly")
                .with("Restart", "True"),
        );
        self.emit(&mut inner, vec![ev]);
        self.generation.send_modify(|g| *g += 1);
        inner.pbx.restart();
        inner.boot = Instant::now();
        inner.boot_wall = SystemTime::now();
        inner.stats.restarts += 1;
        self.set_blackhole(&mut inner, None);
        inner.down_until = (!down.is_zero()).then(|| Instant::now() + down);
    }

    pub(crate) fn set_device_state(
        &self,
        device: &str,
        state: DeviceState,
    ) -> Result<(), SetvarError> {
        let mut inner = self.lock();
        let evs = inner.pbx.device_state_events(device, state)?;
        crate::trace::record(self.cfg.name.as_deref(), "dev", device, state.as_str());
        self.emit(&mut inner, evs);
        Ok(())
    }
}

/// Starts simulators.
#[derive(Debug)]
pub struct SimServer;

impl SimServer {
    /// Binds `cfg.listen` and serves in the background until [`SimHandle::shutdown`] or the
    /// handle is dropped.
    pub async fn spawn(cfg: SimConfig) -> Result<SimHandle, SimError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let mut pbx = Pbx::new(
            cfg.dialplan.hints.clone(),
            cfg.dialplan.globals.clone(),
            PbxOptions {
                system_name: cfg.name.clone(),
                phone_duplicates: cfg.phone_duplicates,
            },
        );
        const BENCH: [&str; 4] = ["NOT_INUSE", "RINGING", "BUSY", "INUSE"];
        for i in 0..cfg.preload_custom {
            // Valid by construction; nobody is connected, so the events go nowhere.
            let _ = pbx.set_device_state_var(&format!("Custom:bench{i}"), BENCH[i % 4]);
        }
        let queue_capacity = cfg.event_buffer.max(16).next_power_of_two();
        let (events, _) = broadcast::channel(queue_capacity);
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                pbx,
                subscribers: Vec::new(),
                boot: Instant::now(),
                boot_wall: SystemTime::now(),
                stats: SimStats::default(),
                blackhole_until: None,
                down_until: None,
                session_seq: 0,
                events_watched: false,
            }),
            cfg,
            events,
            queue_capacity,
            generation,
            shutdown: CancellationToken::new(),
            blackhole_set: AtomicBool::new(false),
            local_addr,
            logged_in: watch::channel(false).0,
            action_counts: crate::actions::action_counters(),
        });
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(accept_loop(shared.clone(), listener)));
        if !shared.cfg.script.is_empty() {
            tasks.push(tokio::spawn(run_script(shared.clone())));
        }
        if shared.cfg.random.is_some() {
            tasks.push(tokio::spawn(run_random(shared.clone())));
        }
        tracing::info!(name = ?shared.cfg.name, addr = %local_addr, "simulator listening");
        Ok(SimHandle { shared, tasks })
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        {
            let inner = shared.lock();
            if inner.down_until.is_some_and(|t| Instant::now() < t) {
                // Restarting: the connection is closed at once.
                drop(stream);
                continue;
            }
        }
        tokio::spawn(crate::session::run(shared.clone(), stream, peer));
    }
}

/// Waits for the first login when the load starts then; `false` on shutdown.
async fn load_start(shared: &Shared) -> bool {
    if !shared.cfg.load_after_login {
        return true;
    }
    let mut rx = shared.logged_in.subscribe();
    tokio::select! {
        () = shared.shutdown.cancelled() => false,
        r = rx.wait_for(|v| *v) => r.is_ok(),
    }
}

async fn run_script(shared: Arc<Shared>) {
    if !load_start(&shared).await {
        return;
    }
    let start = tokio::time::Instant::now();
    for line in shared.cfg.script.clone() {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep_until(start + line.at) => {}
        }
        match &line.step {
            ScriptStep::Device { device, state } => {
                if let Err(e) = shared.set_device_state(device, *state) {
                    tracing::warn!(device = %device, error = %e, "script step refused");
                }
            }
            ScriptStep::Presence { provider, value } => {
                let mut inner = shared.lock();
                match inner.pbx.set_presence_var(provider, value) {
                    Ok(evs) => shared.emit(&mut inner, evs),
                    Err(e) => {
                        tracing::warn!(provider = %provider, error = %e, "script step refused")
                    }
                }
            }
            ScriptStep::Restart => shared.restart(Duration::ZERO),
        }
    }
}

async fn run_random(shared: Arc<Shared>) {
    let Some(mut gen_) = shared.cfg.random.clone() else {
        return;
    };
    if !load_start(&shared).await {
        return;
    }
    let rate = if shared.cfg.random_rate.is_finite() && shared.cfg.random_rate > 0.0 {
        shared.cfg.random_rate
    } else {
        1.0
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (device, state) = gen_.next_change();
        if let Err(e) = shared.set_device_state(&device, state) {
            tracing::warn!(device = %device, error = %e, "random change refused");
        }
    }
}

/// A running simulator. Dropping it stops everything (listener, sessions, load, call timers)
/// without waiting; [`SimHandle::shutdown`] does the same and waits for the listener and load
/// tasks to end.
pub struct SimHandle {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("name", &self.shared.cfg.name)
            .field("local_addr", &self.shared.local_addr)
            .finish()
    }
}

impl SimHandle {
    /// The bound address (the real port when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The configured system name.
    pub fn name(&self) -> Option<&str> {
        self.shared.cfg.name.as_deref()
    }

    /// Sets any device's state (what `Action: SimSetDeviceState` does).
    pub fn set_device_state(&self, device: &str, state: DeviceState) -> Result<(), SetvarError> {
        self.shared.set_device_state(device, state)
    }

    /// `Setvar` without a connection (functions `DEVICE_STATE`/`PRESENCE_STATE` or globals).
    pub fn setvar(&self, variable: &str, value: &str) -> Result<(), SetvarError> {
        let mut inner = self.shared.lock();
        let evs = inner.pbx.setvar_events(variable, value)?;
        self.shared.emit(&mut inner, evs);
        Ok(())
    }

    /// What `Getvar` would answer.
    pub fn getvar(&self, variable: &str) -> String {
        self.shared.lock().pbx.getvar(variable)
    }

    /// A simulated Asterisk restart (what `Action: SimRestart` does); during `down` new
    /// connections are accepted and closed at once.
    pub fn restart(&self, down: Duration) {
        self.shared.restart(down);
    }

    /// Blackholes the whole server: actions are read and never answered, events are not sent,
    /// TCP stays open. `Some(d)`: for `d`; `None`: until [`SimHandle::unblackhole`].
    pub fn blackhole(&self, duration: Option<Duration>) {
        let until = Instant::now() + duration.unwrap_or(Duration::from_secs(100 * 365 * 86_400));
        let mut inner = self.shared.lock();
        self.shared.set_blackhole(&mut inner, Some(until));
    }

    /// Ends a blackhole.
    pub fn unblackhole(&self) {
        let mut inner = self.shared.lock();
        self.shared.set_blackhole(&mut inner, None);
    }

    /// Every manager event this server emits from now on, in state order (what the
    /// app_ami_kafka mode publishes). Lagging more than [`SimConfig::event_buffer`] loses
    /// events.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<SimEvent>> {
        // Under the lock: every event emitted after this call sees the flag.
        let mut inner = self.shared.lock();
        inner.events_watched = true;
        self.shared.events.subscribe()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.shared.stats(&self.shared.lock())
    }

    /// Stops listening, closes every session and the load tasks, and waits for them.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The wall clock as `(seconds, microseconds)` since the epoch.
pub(crate) fn now_epoch() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_micros())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    fn dsc() -> Arc<SimEvent> {
        Arc::new(SimEvent::with_body(
            "DeviceStateChange",
            event::CALL,
            None,
            &[("Device", "Custom:a"), ("State", "INUSE")],
        ))
    }

    #[test]
    fn a_busy_session_is_not_woken_and_finds_its_events_queued() {
        let ready = Arc::new(tokio::sync::Notify::new());
        let sub = Subscriber::new(event::ALL, Default::default(), 8, ready.clone());
        sub.set_busy(true);
        sub.offer(&dsc());
        sub.offer(&dsc());
        assert!(
            ready.notified().now_or_never().is_none(),
            "woken while busy"
        );
        sub.set_busy(false);
        assert_eq!(std::mem::take(&mut sub.lock().queue).len(), 2);
        // Done with its action: the next event wakes it again.
        sub.offer(&dsc());
        assert!(ready.notified().now_or_never().is_some(), "not woken");
        assert_eq!(sub.lock().queue.len(), 1);
    }
}
