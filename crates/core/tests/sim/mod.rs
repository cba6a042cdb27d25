//! A deterministic multi-node harness: simulated Asterisk servers, agents ([`Node`]s), hubs,
//! a simulated clock and a network that delays, reorders, duplicates, drops and partitions.
//! Every message goes through the real wire form ([`KeyRing::seal`] / [`Verifier::verify`]).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use hintfed_core::{
    Action, ApplyCmd, Body, DeviceState, Epoch, Hub, HubAction, HubConfig, Ingest, Key, KeyRing,
    Limits, LocalEvent, Millis, Node, NodeConfig, Presence, Value, Verifier, aggregate,
};

/// A tiny deterministic PRNG (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A model of one Asterisk: device and presence maps; setting a `Custom:` device or a
/// presence emits the event (twice, as real Asterisk does), phones emit their changes twice.
#[derive(Clone, Debug, Default)]
pub struct SimAsterisk {
    pub devices: BTreeMap<String, DeviceState>,
    pub presence: BTreeMap<String, Presence>,
    pub events: Vec<LocalEvent>,
    pub up: bool,
    pub setvars: u64,
}

impl SimAsterisk {
    pub fn new() -> Self {
        SimAsterisk {
            up: true,
            ..Default::default()
        }
    }

    fn emit(&mut self, ev: LocalEvent) {
        if self.up {
            self.events.push(ev.clone());
            self.events.push(ev);
        }
    }

    /// A phone changes state (real change on this server).
    pub fn phone(&mut self, dev: &str, st: DeviceState) -> bool {
        let changed = self.devices.insert(dev.to_owned(), st) != Some(st);
        self.emit(LocalEvent::device(dev, st));
        changed
    }

    /// An operator sets presence on this server.
    pub fn set_presence(&mut self, key: &str, p: Presence) -> bool {
        let changed = self.presence.insert(key.to_owned(), p.clone()).as_ref() != Some(&p);
        self.emit(LocalEvent::presence(key, p));
        changed
    }

    /// `Setvar` as Asterisk does it: DEVICE_STATE only for `Custom:` and never UNKNOWN;
    /// PRESENCE_STATE parsed from the wire value (exercising the `e` encoding).
    pub fn setvar(&mut self, cmd: &ApplyCmd) -> bool {
        if !self.up {
            return false;
        }
        self.setvars += 1;
        match &cmd.value {
            Value::Device(_) => {
                let Ok(st) = cmd.setvar_value().parse::<DeviceState>() else {
                    return false;
                };
                if !cmd.target.starts_with("Custom:") || st == DeviceState::Unknown {
                    return false;
                }
                self.devices.insert(cmd.target.to_string(), st);
                self.emit(LocalEvent::device(cmd.target.as_str(), st));
                true
            }
            Value::Presence(_) => {
                let Ok(p) = Presence::parse_setvar_value(&cmd.setvar_value()) else {
                    return false;
                };
                self.presence.insert(cmd.target.to_string(), p.clone());
                self.emit(LocalEvent::presence(cmd.target.as_str(), p));
                true
            }
        }
    }

    /// DeviceStateList + PresenceStateList.
    pub fn list(&self) -> Vec<LocalEvent> {
        let mut v: Vec<LocalEvent> = self
            .devices
            .iter()
            .map(|(k, s)| LocalEvent::device(k.clone(), *s))
            .collect();
        v.extend(
            self.presence
                .iter()
                .map(|(k, p)| LocalEvent::presence(k.clone(), p.clone())),
        );
        v
    }

    /// A restart: `Custom:a/b` comes back as `Custom:b` (astdb keys), events are lost.
    pub fn restart(&mut self) {
        let devices = std::mem::take(&mut self.devices);
        for (k, s) in devices {
            let k = match k.strip_prefix("Custom:").and_then(|r| r.split_once('/')) {
                Some((_, rest)) => format!("Custom:{rest}"),
                None => k,
            };
            self.devices.insert(k, s);
        }
        self.events.clear();
    }

    pub fn phones(&self) -> impl Iterator<Item = (&String, &DeviceState)> {
        self.devices
            .iter()
            .filter(|(k, _)| !k.starts_with("Custom:"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Addr {
    Node(usize),
    Hub(usize),
}

#[derive(Clone, Debug)]
struct Packet {
    at: u64,
    order: u64,
    to: Addr,
    from: Addr,
    bytes: Vec<u8>,
}

/// Network fault settings.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub max_delay_ms: u64,
    pub drop_percent: u64,
    pub dup_percent: u64,
}

pub struct Agent {
    pub node: Option<Node>,
    pub verifier: Verifier,
    pub ast: SimAsterisk,
    pub name: String,
    pub partitioned: bool,
    pub next_hub: usize,
}

pub struct HubSlot {
    pub hub: Option<Hub>,
    pub verifier: Verifier,
}

/// Timing used by the harness (short, so that simulated runs stay small).
pub const ORIGIN_TIMEOUT: u64 = 3_000;
pub const STEP: u64 = 20;

pub struct World {
    pub now: Millis,
    pub agents: Vec<Agent>,
    pub hubs: Vec<HubSlot>,
    pub keys: KeyRing,
    pub limits: Limits,
    pub faults: Faults,
    pub rng: Rng,
    packets: Vec<Packet>,
    order: u64,
    /// Update envelopes published, per agent.
    pub updates_published: Vec<u64>,
    /// Items listed in full syncs (republished on purpose).
    pub full_sync_items: u64,
    /// Envelopes delivered (any kind).
    pub delivered: u64,
    /// Apply actions issued.
    pub applies: u64,
    /// Apply actions the sim Asterisk refused.
    pub apply_refused: u64,
    /// Print every published update (debugging).
    pub trace: bool,
}

pub fn node_config(name: &str) -> NodeConfig {
    let mut c = NodeConfig::new(name);
    c.origin_timeout_ms = ORIGIN_TIMEOUT;
    c.heartbeat_interval_ms = 500;
    c.gap_grace_ms = 600;
    c.snapshot_retry_ms = 1_500;
    c
}

pub fn hub_config(name: &str) -> HubConfig {
    let mut c = HubConfig::new(name);
    c.origin_timeout_ms = ORIGIN_TIMEOUT;
    c.heartbeat_interval_ms = 500;
    c.gap_grace_ms = 300;
    c.resync_retry_ms = 1_500;
    // Small chunks, so snapshots span several chunks in tests.
    c.chunk_max_entries = 5;
    c
}

impl World {
    pub fn new(servers: usize, hubs: usize, seed: u64) -> Self {
        let keys = KeyRing::new(vec![Key::new(Some("k1".into()), "test-secret")]);
        let limits = Limits::default();
        let mut w = World {
            now: Millis(1_000),
            agents: Vec::new(),
            hubs: Vec::new(),
            keys: keys.clone(),
            limits: limits.clone(),
            faults: Faults::default(),
            rng: Rng::new(seed),
            packets: Vec::new(),
            order: 0,
            updates_published: vec![0; servers],
            full_sync_items: 0,
            delivered: 0,
            applies: 0,
            apply_refused: 0,
            trace: false,
        };
        for h in 0..hubs {
            w.hubs.push(HubSlot {
                hub: Some(Hub::new(
                    hub_config(&format!("hub-{h}")),
                    Epoch(w.now.0),
                    w.now,
                )),
                verifier: Verifier::new(keys.clone(), limits.clone()),
            });
        }
        for i in 0..servers {
            w.agents.push(Agent {
                node: None,
                verifier: Verifier::new(keys.clone(), limits.clone()),
                ast: SimAsterisk::new(),
                name: format!("pbx-{i}"),
                partitioned: false,
                next_hub: i,
            });
            w.start_agent(i);
        }
        w
    }

    pub fn start_agent(&mut self, i: usize) {
        let now = self.now;
        let name = self.agents[i].name.clone();
        let mut node = Node::new(node_config(&name), Epoch(now.0), now);
        self.agents[i].verifier = Verifier::new(self.keys.clone(), self.limits.clone());
        if self.agents[i].ast.up {
            let list = self.agents[i].ast.list();
            self.full_sync_items += list.len() as u64;
            node.on_local_full_sync(now, list);
        }
        self.agents[i].ast.events.clear();
        self.agents[i].node = Some(node);
        self.process_node_actions(i);
    }

    pub fn kill_agent(&mut self, i: usize) {
        self.agents[i].node = None;
    }

    pub fn asterisk_lost(&mut self, i: usize) {
        let now = self.now;
        self.agents[i].ast.up = false;
        self.agents[i].ast.events.clear();
        if let Some(n) = &mut self.agents[i].node {
            n.on_local_lost(now);
        }
        self.process_node_actions(i);
    }

    pub fn asterisk_back(&mut self, i: usize, restarted: bool) {
        let now = self.now;
        if restarted {
            self.agents[i].ast.restart();
        }
        self.agents[i].ast.up = true;
        self.agents[i].ast.events.clear();
        let list = self.agents[i].ast.list();
        if let Some(n) = &mut self.agents[i].node {
            if n.is_local_down() {
                n.on_local_restored(now);
            } else if restarted {
                n.on_local_restarted(now);
            }
            self.full_sync_items += list.len() as u64;
            n.on_local_full_sync(now, list);
        }
        self.process_node_actions(i);
    }

    pub fn kill_hub(&mut self, h: usize) {
        self.hubs[h].hub = None;
    }

    pub fn start_hub(&mut self, h: usize) {
        self.hubs[h].hub = Some(Hub::new(
            hub_config(&format!("hub-{h}")),
            Epoch(self.now.0),
            self.now,
        ));
        self.hubs[h].verifier = Verifier::new(self.keys.clone(), self.limits.clone());
    }

    fn send(&mut self, from: Addr, to: Addr, bytes: Vec<u8>) {
        let cut = |a: Addr| matches!(a, Addr::Node(i) if self.agents[i].partitioned);
        if cut(from) || cut(to) {
            return;
        }
        if self.rng.chance(self.faults.drop_percent) {
            return;
        }
        let copies = if self.rng.chance(self.faults.dup_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(self.faults.max_delay_ms + 1);
            self.order += 1;
            self.packets.push(Packet {
                at: self.now.0 + delay,
                order: self.order,
                to,
                from,
                bytes: bytes.clone(),
            });
        }
    }

    fn seal(&self, env: &hintfed_core::Envelope) -> Vec<u8> {
        self.keys
            .seal(env, &self.limits)
            .expect("envelopes fit the limit")
    }

    fn process_node_actions(&mut self, i: usize) {
        loop {
            let Some(node) = self.agents[i].node.as_mut() else {
                return;
            };
            let actions = node.take_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                match a {
                    Action::Publish(env) => {
                        if matches!(env.body, Body::Update(_)) {
                            self.updates_published[i] += 1;
                            if self.trace {
                                eprintln!(
                                    "TRACE t={} {} publishes {:?} {} {:?} stats {:?}",
                                    self.now.0,
                                    self.agents[i].name,
                                    env.epoch,
                                    env.seq,
                                    env.body,
                                    self.agents[i].node.as_ref().map(|n| n.stats().clone())
                                );
                            }
                        }
                        let bytes = self.seal(&env);
                        for h in 0..self.hubs.len() {
                            self.send(Addr::Node(i), Addr::Hub(h), bytes.clone());
                        }
                    }
                    Action::Request(env) => {
                        if self.trace {
                            eprintln!(
                                "TRACE t={} {} requests {:?}",
                                self.now.0, self.agents[i].name, env.body
                            );
                        }
                        let bytes = self.seal(&env);
                        for h in 0..self.hubs.len() {
                            self.send(Addr::Node(i), Addr::Hub(h), bytes.clone());
                        }
                    }
                    Action::Apply(cmd) => {
                        self.applies += 1;
                        let ok = self.agents[i].ast.setvar(&cmd);
                        if !ok {
                            self.apply_refused += 1;
                        }
                        let now = self.now;
                        if let Some(n) = self.agents[i].node.as_mut() {
                            n.on_apply_result(now, cmd.id, ok);
                        }
                    }
                    Action::QueryLocal(keys) => {
                        let now = self.now;
                        let evs: Vec<LocalEvent> = keys
                            .iter()
                            .filter_map(|k| {
                                self.agents[i]
                                    .ast
                                    .devices
                                    .get(k)
                                    .map(|s| LocalEvent::device(k.clone(), *s))
                            })
                            .collect();
                        if let Some(n) = self.agents[i].node.as_mut() {
                            for e in evs {
                                n.on_local_event(now, e);
                            }
                        }
                    }
                }
            }
        }
    }

    fn process_hub_actions(&mut self, h: usize) {
        let Some(hub) = self.hubs[h].hub.as_mut() else {
            return;
        };
        let actions = hub.take_actions();
        for a in actions {
            match a {
                HubAction::Publish(env) => {
                    let bytes = self.seal(&env);
                    for i in 0..self.agents.len() {
                        self.send(Addr::Hub(h), Addr::Node(i), bytes.clone());
                    }
                }
                HubAction::SendTo { to, envelope } => {
                    if self.trace
                        && !matches!(
                            envelope.body,
                            Body::SnapshotChunk { .. } | Body::SnapshotEnd { .. }
                        )
                    {
                        eprintln!(
                            "TRACE t={} hub-{h} sends {to} {:?}",
                            self.now.0, envelope.body
                        );
                    }
                    let bytes = self.seal(&envelope);
                    if let Some(i) = self.agents.iter().position(|a| a.name == to) {
                        self.send(Addr::Hub(h), Addr::Node(i), bytes);
                    }
                }
            }
        }
    }

    fn deliver(&mut self, p: Packet) {
        let now = self.now;
        match p.to {
            Addr::Hub(h) => {
                let slot = &mut self.hubs[h];
                let Some(hub) = slot.hub.as_mut() else { return };
                let Ok(env) = slot.verifier.verify(&p.bytes) else {
                    return;
                };
                self.delivered += 1;
                if hub.on_envelope(now, &env) == Ingest::Forward {
                    for i in 0..self.agents.len() {
                        self.send(Addr::Hub(h), Addr::Node(i), p.bytes.clone());
                    }
                }
                self.process_hub_actions(h);
            }
            Addr::Node(i) => {
                let a = &mut self.agents[i];
                let Some(node) = a.node.as_mut() else { return };
                let Ok(env) = a.verifier.verify(&p.bytes) else {
                    return;
                };
                self.delivered += 1;
                node.on_remote(now, &env);
                self.process_node_actions(i);
            }
        }
    }

    /// One step of simulated time.
    pub fn step(&mut self) {
        self.now = self.now.plus(STEP);
        let now = self.now.0;
        let mut due: Vec<Packet> = Vec::new();
        let mut rest = Vec::new();
        for p in self.packets.drain(..) {
            if p.at <= now {
                due.push(p)
            } else {
                rest.push(p)
            }
        }
        self.packets = rest;
        due.sort_by_key(|p| (p.at, p.order));
        for p in due {
            self.deliver(p);
        }
        for i in 0..self.agents.len() {
            let events = std::mem::take(&mut self.agents[i].ast.events);
            let now = self.now;
            if let Some(n) = self.agents[i].node.as_mut() {
                for e in events {
                    n.on_local_event(now, e);
                }
                n.tick(now);
            }
            self.process_node_actions(i);
        }
        for h in 0..self.hubs.len() {
            let now = self.now;
            if let Some(hub) = self.hubs[h].hub.as_mut() {
                hub.tick(now);
            }
            self.process_hub_actions(h);
        }
    }

    pub fn run(&mut self, ms: u64) {
        for _ in 0..ms.div_ceil(STEP) {
            self.step();
        }
    }

    /// Whether server `i` is live (agent running, Asterisk up).
    pub fn live(&self, i: usize) -> bool {
        self.agents[i].node.is_some() && self.agents[i].ast.up
    }

    /// What `Custom:<dev>` must read on server `s`: the aggregate over every other server
    /// having that phone, a server that is not live counting as UNAVAILABLE.
    pub fn expected(&self, s: usize, dev: &str) -> Option<DeviceState> {
        let states: Vec<DeviceState> = (0..self.agents.len())
            .filter(|&o| o != s)
            .filter_map(|o| {
                self.agents[o].ast.devices.get(dev).map(|st| {
                    if self.live(o) {
                        *st
                    } else {
                        DeviceState::Unavailable
                    }
                })
            })
            .collect();
        if states.is_empty() {
            return None;
        }
        let st = aggregate(states);
        Some(if st == DeviceState::Unknown {
            DeviceState::NotInuse
        } else {
            st
        })
    }

    /// Every phone name on any server.
    pub fn all_phones(&self) -> BTreeSet<String> {
        self.agents
            .iter()
            .flat_map(|a| a.ast.phones().map(|(k, _)| k.clone()))
            .collect()
    }

    /// Mismatches between what live servers show and what they must show.
    pub fn device_mismatches(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in 0..self.agents.len() {
            if !self.live(s) {
                continue;
            }
            for dev in self.all_phones() {
                let want = self.expected(s, &dev);
                let got = self.agents[s]
                    .ast
                    .devices
                    .get(&format!("Custom:{dev}"))
                    .copied();
                if want.is_some() && want != got {
                    out.push(format!(
                        "{}: Custom:{dev} is {got:?}, want {want:?}",
                        self.agents[s].name
                    ));
                }
            }
        }
        out
    }

    /// Presence keys on which live servers disagree.
    pub fn presence_mismatches(&self) -> Vec<String> {
        let live: Vec<usize> = (0..self.agents.len()).filter(|&i| self.live(i)).collect();
        let keys: BTreeSet<String> = live
            .iter()
            .flat_map(|&i| self.agents[i].ast.presence.keys().cloned())
            .collect();
        let mut out = Vec::new();
        for k in keys {
            let vals: BTreeSet<String> = live
                .iter()
                .map(|&i| format!("{:?}", self.agents[i].ast.presence.get(&k)))
                .collect();
            if vals.len() > 1 {
                out.push(format!("{k}: {vals:?}"));
            }
        }
        out
    }

    pub fn total_updates(&self) -> u64 {
        self.updates_published.iter().sum()
    }

    /// Runs until every live server shows what it must (or `max_ms` passes); returns whether
    /// it converged.
    pub fn settle(&mut self, max_ms: u64) -> bool {
        let mut waited = 0;
        loop {
            if self.device_mismatches().is_empty() && self.presence_mismatches().is_empty() {
                return true;
            }
            if waited >= max_ms {
                return false;
            }
            self.run(100);
            waited += 100;
        }
    }

    /// A human-readable dump of every node's view of presence (for failure messages).
    pub fn dump_presence(&self) -> String {
        let mut out = String::new();
        for a in &self.agents {
            out.push_str(&format!(
                "\n{} live={} ast={:?}",
                a.name,
                a.node.is_some() && a.ast.up,
                a.ast.presence
            ));
            if let Some(n) = &a.node {
                for (k, e) in n.table().presence_entries() {
                    out.push_str(&format!(
                        "\n   table {k} = {:?} by {} ts {:?} epoch {:?}",
                        e.value.status, e.origin, e.ts, e.epoch
                    ));
                }
                out.push_str(&format!(
                    "\n   epoch {:?} local_down {} stats {:?}",
                    n.epoch(),
                    n.is_local_down(),
                    n.stats()
                ));
            }
        }
        for h in &self.hubs {
            if let Some(h) = &h.hub {
                for (k, e) in h.table().presence_entries() {
                    out.push_str(&format!(
                        "\n {} table {k} = {:?} by {} ts {:?}",
                        h.name(),
                        e.value.status,
                        e.origin,
                        e.ts
                    ));
                }
            }
        }
        out
    }

    /// A dump of every view of device `dev`.
    pub fn dump_device(&self, dev: &str) -> String {
        let mut out = String::new();
        for a in &self.agents {
            out.push_str(&format!(
                "\n{} live={} phone={:?} custom={:?}",
                a.name,
                a.node.is_some() && a.ast.up,
                a.ast.devices.get(dev),
                a.ast.devices.get(&format!("Custom:{dev}"))
            ));
            if let Some(n) = &a.node {
                out.push_str(&format!(
                    "\n   table {:?}\n   held {:?} pending {} inflight {} want {:?} origins {:?}",
                    n.table().device(dev),
                    n.apply_queue().held(&format!("Custom:{dev}")),
                    n.apply_queue().pending_len(),
                    n.apply_queue().in_flight_len(),
                    n.remote_value(dev),
                    n.origins()
                        .iter()
                        .map(|(o, i)| (o.clone(), i.epoch, i.last_seq, i.down))
                        .collect::<Vec<_>>()
                ));
            }
        }
        for h in &self.hubs {
            if let Some(h) = &h.hub {
                out.push_str(&format!(
                    "\n {} {:?} {:?}",
                    h.name(),
                    h.table().device(dev),
                    h.origins()
                        .iter()
                        .map(|(o, i)| (o.clone(), i.epoch, i.last_seq, i.down))
                        .collect::<Vec<_>>()
                ));
            }
        }
        out
    }

    pub fn in_flight_packets(&self) -> usize {
        self.packets.len()
    }
}
