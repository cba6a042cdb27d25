//! Shared helpers of the server's integration tests: an in-process hub, and fake agents made
//! of the core's `Node` and the transport's `MultiHub` (exactly what hintfed-agent uses).
#![allow(dead_code)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{
    Action, Envelope, Epoch, KeyRing, LocalEvent, Millis, Node, NodeConfig, Role, Verifier,
};
use hintfed_server::{Hooks, Server, ServerConfig, ServerHandle};
use hintfed_transport::{Channel, HubLink, HubLinkConfig, Incoming, MultiHub, MultiHubConfig};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous bound for conditions that normally hold within milliseconds.
pub const WITHIN: Duration = Duration::from_secs(8);

pub fn now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as u64,
    )
}

/// An in-process hub on 127.0.0.1 (free port pair), stopped on drop.
pub struct TestHub {
    pub handle: ServerHandle,
    pub hooks: Hooks,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), hintfed_server::ServerError>>>,
}

impl TestHub {
    pub async fn start(cfg: ServerConfig) -> TestHub {
        let hooks = Hooks::standalone();
        let server = Server::bind(cfg, hooks.clone()).await.expect("bind hub");
        let handle = server.handle();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        TestHub {
            handle,
            hooks,
            stop,
            task: Some(task),
        }
    }

    /// A config for a hub named `name` on a free port pair.
    pub fn config(name: &str) -> ServerConfig {
        ServerConfig::new(name, "tcp://127.0.0.1:0")
    }

    pub fn endpoint(&self) -> String {
        self.handle.router_endpoint().to_owned()
    }

    /// Stops the hub and waits until its ports are released.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("hub task").expect("hub run");
        }
    }

    pub async fn wait_stats(
        &self,
        what: &str,
        mut pred: impl FnMut(&hintfed_server::ServerStats) -> bool,
    ) {
        let deadline = Instant::now() + WITHIN;
        loop {
            let s = self.handle.stats();
            if pred(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hub: {what} never happened: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A fake agent: a core `Node` speaking through a `MultiHub`, as hintfed-agent does.
pub struct FakeAgent {
    pub node: Node,
    hubs: MultiHub,
    rx: mpsc::Receiver<Incoming>,
    keys: KeyRing,
    limits: CoreLimits,
    verifier: Verifier,
    connected: usize,
    /// Every verified message received: (hub index, channel, topic, envelope).
    pub received: Vec<(usize, Channel, String, Envelope)>,
    /// The origin of every fan-out message that opens, copies from several hubs included
    /// (before the replay check, which keeps the first only): (hub index, origin).
    pub fanout_origins: Vec<(usize, String)>,
}

impl FakeAgent {
    /// Connects to every hub and waits until all links are up.
    pub async fn connect(name: &str, hubs: &[String], keys: KeyRing) -> FakeAgent {
        Self::connect_with(name, hubs, keys, false).await
    }

    /// [`Self::connect`]; `announce`: the links announce `name` as their origin, as
    /// hintfed-agent's do (the hubs then send none of its own messages back).
    pub async fn connect_with(
        name: &str,
        hubs: &[String],
        keys: KeyRing,
        announce: bool,
    ) -> FakeAgent {
        let mut config = MultiHubConfig::new(hubs.iter().cloned());
        if announce {
            for hub in &mut config.hubs {
                hub.origin = Some(name.to_owned());
            }
        }
        let multi = MultiHub::connect(config).expect("multihub");
        let rx = multi.take_incoming().expect("incoming");
        let mut count = multi.connected();
        let deadline = Instant::now() + WITHIN;
        while *count.borrow() < hubs.len() {
            assert!(Instant::now() < deadline, "{name}: hubs not connected");
            let _ = tokio::time::timeout(Duration::from_millis(100), count.changed()).await;
        }
        let t = now();
        let limits = CoreLimits::default();
        let mut agent = FakeAgent {
            node: Node::new(NodeConfig::new(name), Epoch(t.0), t),
            hubs: multi,
            rx,
            verifier: Verifier::new(keys.clone(), limits.clone()),
            keys,
            limits,
            connected: hubs.len(),
            received: Vec::new(),
            fanout_origins: Vec::new(),
        };
        agent.hello();
        agent.flush();
        agent
    }

    fn hello(&mut self) {
        let env = self.node.hello(Role::Agent, "fake-agent");
        let bytes = self.keys.seal(&env, &self.limits).expect("seal");
        self.hubs.send_all(&vec![
            Bytes::from_static(env.topic().as_bytes()),
            Bytes::from(bytes),
        ]);
    }

    /// Sends what the node wants sent.
    pub fn flush(&mut self) {
        for action in self.node.take_actions() {
            match action {
                Action::Publish(env) => {
                    let bytes = self.keys.seal(&env, &self.limits).expect("seal");
                    self.hubs.send_all(&vec![
                        Bytes::from_static(env.topic().as_bytes()),
                        Bytes::from(bytes),
                    ]);
                }
                Action::Request(env) => {
                    let bytes = self.keys.seal(&env, &self.limits).expect("seal");
                    let _ = self.hubs.request(
                        vec![
                            Bytes::from_static(hintfed_transport::SNAPSHOT_TOPIC.as_bytes()),
                            Bytes::from(bytes),
                        ],
                        &[],
                    );
                }
                Action::Apply(cmd) => self.node.on_apply_result(now(), cmd.id, true),
                Action::QueryLocal(_) => {}
            }
        }
    }

    /// The local Asterisk listed `items`: full sync.
    pub fn full_sync(&mut self, items: Vec<LocalEvent>) {
        self.node.on_local_full_sync(now(), items);
        self.flush();
    }

    /// One local event.
    pub fn event(&mut self, ev: LocalEvent) {
        self.node.on_local_event(now(), ev);
        self.flush();
    }

    /// Pumps the inbound stream (and the node's clock) until `pred` holds; false on timeout.
    pub async fn pump_until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&FakeAgent) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.pump(Duration::from_millis(50)).await;
        }
    }

    /// Like [`Self::pump_until`] but panics with `what` on timeout.
    pub async fn wait(&mut self, what: &str, pred: impl FnMut(&FakeAgent) -> bool) {
        assert!(
            self.pump_until(WITHIN, pred).await,
            "{}: {what} never happened; received {:?}",
            self.node.origin(),
            self.received
                .iter()
                .map(|r| (&r.2, r.3.origin.as_str(), r.3.body.type_name()))
                .collect::<Vec<_>>()
        );
    }

    /// Handles inbound messages for about `d`, ticking the node.
    pub async fn pump(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            let msg = tokio::select! {
                m = self.rx.recv() => m,
                () = tokio::time::sleep_until(until) => None,
            };
            let Some(msg) = msg else { break };
            if let (Channel::Fanout, Some(payload)) = (msg.channel, msg.frames.last())
                && let Ok(env) = hintfed_core::open(payload, &self.keys, &self.limits)
            {
                self.fanout_origins.push((msg.hub, env.origin));
            }
            if let (Some(payload), Some(topic)) = (msg.frames.last(), msg.frames.first())
                && let Ok(env) = self.verifier.verify(payload)
            {
                self.node.on_remote(now(), &env);
                let topic = String::from_utf8_lossy(topic).into_owned();
                self.received.push((msg.hub, msg.channel, topic, env));
            }
            self.flush();
        }
        self.node.tick(now());
        let c = *self.hubs.connected().borrow();
        if c > self.connected {
            // A hub came (back): introduce ourselves like hintfed-agent does.
            self.hello();
        }
        self.connected = c;
        self.flush();
    }
}

/// A raw DEALER to a hub for hostile input (large limits so oversize frames get out).
pub async fn raw_link(endpoint: &str) -> HubLink {
    let mut cfg = HubLinkConfig::new(endpoint);
    cfg.limits = hintfed_transport::Limits {
        max_message_bytes: 8 * 1024 * 1024,
        max_frames: 64,
    };
    let (link, _rx) = HubLink::connect(cfg).expect("link");
    let mut st = link.status();
    let deadline = Instant::now() + WITHIN;
    while *st.borrow() != hintfed_transport::LinkStatus::Connected {
        assert!(Instant::now() < deadline, "raw link not connected");
        let _ = tokio::time::timeout(Duration::from_millis(100), st.changed()).await;
    }
    link
}

/// The device state `origin` reports for `key` in an agent's table.
pub fn device_of(agent: &FakeAgent, key: &str, origin: &str) -> Option<hintfed_core::DeviceState> {
    agent
        .node
        .table()
        .device(key)
        .and_then(|m| m.get(origin))
        .map(|e| e.value)
}
