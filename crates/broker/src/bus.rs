//! [`InProcessBus`]: the broker's federation transport. Every relay gets one [`BusPort`]
//! (a [`FederationTransport`]); what a port publishes reaches the inbound stream of every
//! *other* port, in publish order per sender.
//!
//! # Full-channel policy
//! Each port's inbound queue is bounded ([`BusConfig::capacity`], default 8192 messages).
//! `publish` never waits for a receiver: it `try_send`s to each other port; when a port's
//! queue is full it yields once (so that relay can run and drain, which matters on a busy or
//! single-threaded runtime) and tries again, and if the queue is still full the message is
//! dropped *for that port only*, counted ([`BusPortStats::dropped`]) and the
//! (receiver, sender) pair is remembered. A slow relay therefore never stalls the others (the
//! original broker's flaw was waiting on each server in turn). Because the broker's nodes run
//! with snapshots off, a dropped update would otherwise stay lost until the key changes
//! again, so [`InProcessBus::repair`] (run periodically by the broker, see
//! [`InProcessBus::run_repair`]) asks every sender whose messages were dropped to republish
//! its full state: it delivers a `ResyncRequest` for that sender's origin to the sender's
//! own port, once the lagging port has room again. Remote states merge by version, so the
//! republish repairs the lagging relay and is harmless for the others.
//!
//! Relays normally never lag: their select loop does no I/O towards Asterisk inline (each
//! `Setvar` runs in its own task, bounded by the node's apply window), so the queue only
//! fills if a relay task is starved of CPU.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use hintfed_core::{Body, Envelope, Epoch, KeyRing, Limits};
use hintfed_transport::{Channel, FederationTransport, Incoming, TransportError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Origin name of the bus's own control envelopes (resync requests after drops).
pub const BUS_ORIGIN: &str = "hintfed-broker bus";

/// Settings of an [`InProcessBus`].
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Inbound queue of each port, in messages (default 8192).
    pub capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig { capacity: 8192 }
    }
}

/// Counters of one port.
#[derive(Debug, Default)]
pub struct BusPortStats {
    /// Messages this port published (each counted once, whatever the number of receivers).
    pub published: AtomicU64,
    /// Messages delivered to this port's inbound queue.
    pub received: AtomicU64,
    /// Messages for this port dropped because its queue was full.
    pub dropped: AtomicU64,
    /// Resync requests the bus sent to this port's relay after others dropped its messages.
    pub resyncs_requested: AtomicU64,
}

impl BusPortStats {
    fn load(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// `(published, received, dropped, resyncs_requested)` now.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            Self::load(&self.published),
            Self::load(&self.received),
            Self::load(&self.dropped),
            Self::load(&self.resyncs_requested),
        )
    }
}

#[derive(Debug)]
struct Slot {
    origin: String,
    tx: mpsc::Sender<Incoming>,
    stats: Arc<BusPortStats>,
    /// Senders (port indices) whose messages to this port were dropped and not yet repaired.
    lost_from: BTreeSet<usize>,
    /// Drops to an observer (the `verbose_messages` logger) are counted, never repaired.
    observer: bool,
}

#[derive(Debug)]
struct Inner {
    cfg: BusConfig,
    slots: Mutex<Vec<Slot>>,
    control_seq: AtomicU64,
    epoch: Epoch,
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The in-process bus. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    inner: Arc<Inner>,
}

impl InProcessBus {
    /// An empty bus.
    pub fn new(cfg: BusConfig) -> Self {
        let epoch = hintfed_agent::relay::now_millis().0;
        InProcessBus {
            inner: Arc::new(Inner {
                cfg,
                slots: Mutex::new(Vec::new()),
                control_seq: AtomicU64::new(0),
                epoch: Epoch(epoch),
            }),
        }
    }

    /// Adds a port for the relay of `origin`. Messages published before a port exists do not
    /// reach it (the broker creates every port before starting any relay).
    pub fn port(&self, origin: impl Into<String>) -> BusPort {
        self.add_port(origin.into(), false)
    }

    /// Adds a port that only listens (e.g. a logger): it receives everything, and what it
    /// misses when its queue is full is counted but not repaired (no republish for it).
    pub fn observer_port(&self, name: impl Into<String>) -> BusPort {
        self.add_port(name.into(), true)
    }

    fn add_port(&self, origin: String, observer: bool) -> BusPort {
        let (tx, rx) = mpsc::channel(self.inner.cfg.capacity.max(1));
        let stats = Arc::new(BusPortStats::default());
        let mut slots = self.inner.slots();
        let index = slots.len();
        slots.push(Slot {
            origin,
            tx,
            stats: stats.clone(),
            lost_from: BTreeSet::new(),
            observer,
        });
        let (connected, _) = watch::channel(1);
        BusPort {
            index,
            bus: self.inner.clone(),
            incoming: Mutex::new(Some(rx)),
            connected,
            stats,
        }
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        self.inner.slots().len()
    }

    /// Whether the bus has no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per port: origin, messages waiting in its inbound queue, messages dropped so far.
    pub fn queues(&self) -> Vec<(String, usize, u64)> {
        let cap = self.inner.cfg.capacity.max(1);
        self.inner
            .slots()
            .iter()
            .map(|s| {
                (
                    s.origin.clone(),
                    cap.saturating_sub(s.tx.capacity()),
                    s.stats.dropped.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Repairs after drops: for every port that lost messages and has room again, asks each
    /// sender it lost messages from to republish its full state. Returns how many resync
    /// requests were sent.
    pub fn repair(&self) -> usize {
        let mut slots = self.inner.slots();
        // sender index -> receivers that lost its messages
        let mut wanted: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (r, s) in slots.iter_mut().enumerate() {
            if s.lost_from.is_empty() {
                continue;
            }
            // Room for the republish to land: at least half the queue free.
            if s.tx.capacity() < self.inner.cfg.capacity / 2 {
                continue;
            }
            for sender in std::mem::take(&mut s.lost_from) {
                wanted.entry(sender).or_default().push(r);
            }
        }
        let mut sent = 0;
        for (sender, receivers) in wanted {
            let Some(slot) = slots.get(sender) else {
                continue;
            };
            let seq = self.inner.control_seq.fetch_add(1, Ordering::Relaxed) + 1;
            let env = Envelope::new(
                BUS_ORIGIN,
                self.inner.epoch,
                seq,
                Body::ResyncRequest {
                    origin: slot.origin.clone(),
                },
            );
            let delivered = match KeyRing::default().seal(&env, &Limits::default()) {
                Ok(b) => {
                    let msg = Incoming {
                        hub: usize::MAX,
                        channel: Channel::Reply,
                        frames: vec![Bytes::from_static(b"hintfed.resync"), Bytes::from(b)],
                    };
                    slot.tx.try_send(msg).is_ok()
                }
                Err(e) => {
                    warn!(error = %e, "cannot encode a resync request");
                    false
                }
            };
            if delivered {
                slot.stats.resyncs_requested.fetch_add(1, Ordering::Relaxed);
                debug!(origin = %slot.origin, "asked to republish after drops");
                sent += 1;
            } else {
                // The sender's own queue is full: try again next time.
                for r in receivers {
                    if let Some(s) = slots.get_mut(r) {
                        s.lost_from.insert(sender);
                    }
                }
            }
        }
        sent
    }

    /// Runs [`InProcessBus::repair`] every `period` until `stop` is cancelled.
    pub async fn run_repair(self, period: Duration, stop: CancellationToken) {
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = t.tick() => {
                    let n = self.repair();
                    if n > 0 {
                        warn!(resyncs = n, "bus: a relay lagged and lost messages; asked the senders to republish");
                    }
                }
            }
        }
    }
}

/// One relay's end of the bus; implements [`FederationTransport`].
#[derive(Debug)]
pub struct BusPort {
    index: usize,
    bus: Arc<Inner>,
    incoming: Mutex<Option<mpsc::Receiver<Incoming>>>,
    connected: watch::Sender<usize>,
    stats: Arc<BusPortStats>,
}

impl BusPort {
    /// This port's index on the bus (the `hub` tag its messages carry at the receivers).
    pub fn index(&self) -> usize {
        self.index
    }

    /// This port's counters.
    pub fn stats(&self) -> Arc<BusPortStats> {
        self.stats.clone()
    }

    /// Delivers `[topic, payload]` to every other port without waiting; returns how many took
    /// it (a full queue drops the message for that port, see the module docs).
    pub fn send(&self, topic: &str, payload: Bytes) -> usize {
        let (delivered, full) = self.offer(topic, payload);
        self.dropped(full.into_iter().map(|(r, _)| r));
        delivered
    }

    /// Tries every other port once; returns the number delivered and the messages refused by
    /// full queues (by port index).
    fn offer(&self, topic: &str, payload: Bytes) -> (usize, Vec<(usize, Incoming)>) {
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let topic = Bytes::copy_from_slice(topic.as_bytes());
        let slots = self.bus.slots();
        let mut delivered = 0;
        let mut full = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            if i == self.index {
                continue;
            }
            let msg = Incoming {
                hub: self.index,
                channel: Channel::Fanout,
                frames: vec![topic.clone(), payload.clone()],
            };
            match s.tx.try_send(msg) {
                Ok(()) => {
                    s.stats.received.fetch_add(1, Ordering::Relaxed);
                    delivered += 1;
                }
                Err(mpsc::error::TrySendError::Full(msg)) => full.push((i, msg)),
                // The receiving relay stopped; nothing to do.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        (delivered, full)
    }

    /// One more try for each refused message; returns how many went through.
    fn retry(&self, full: Vec<(usize, Incoming)>) -> (usize, Vec<usize>) {
        let slots = self.bus.slots();
        let mut delivered = 0;
        let mut still = Vec::new();
        for (r, msg) in full {
            let Some(s) = slots.get(r) else { continue };
            match s.tx.try_send(msg) {
                Ok(()) => {
                    s.stats.received.fetch_add(1, Ordering::Relaxed);
                    delivered += 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => still.push(r),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        (delivered, still)
    }

    /// Records drops for these receiving ports (the repair asks us to republish later).
    fn dropped(&self, ports: impl IntoIterator<Item = usize>) {
        let mut slots = self.bus.slots();
        for r in ports {
            let Some(s) = slots.get_mut(r) else { continue };
            let n = s.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if s.observer {
                continue;
            }
            if n == 0 || s.lost_from.is_empty() {
                warn!(to = %s.origin, "bus: relay inbound queue full; message dropped (repaired by a republish)");
            }
            s.lost_from.insert(self.index);
        }
    }
}

impl FederationTransport for BusPort {
    /// Like [`BusPort::send`], except that when a receiver's queue is full it yields once
    /// (letting that relay run, which matters most on a busy or single-threaded runtime)
    /// and tries again before dropping. It never waits for a receiver beyond that yield.
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<usize, TransportError> {
        let (mut delivered, full) = self.offer(topic, payload);
        if !full.is_empty() {
            tokio::task::yield_now().await;
            let (more, still) = self.retry(full);
            delivered += more;
            self.dropped(still);
        }
        Ok(delivered)
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        self.incoming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    async fn request_snapshot(
        &self,
        _payload: Bytes,
        _exclude: &[usize],
    ) -> Result<usize, TransportError> {
        // The broker's nodes run with snapshots off; nothing asks.
        Err(TransportError::NotConnected)
    }

    fn connected(&self) -> watch::Receiver<usize> {
        self.connected.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fans_out_to_every_other_port() {
        let bus = InProcessBus::new(BusConfig::default());
        let a = bus.port("a");
        let b = bus.port("b");
        let c = bus.port("c");
        let mut rb = b.take_incoming().expect("first take");
        let mut rc = c.take_incoming().expect("first take");
        let mut ra = a.take_incoming().expect("first take");
        assert!(a.take_incoming().is_none());
        assert_eq!(a.publish("t", Bytes::from_static(b"x")).await.ok(), Some(2));
        for r in [&mut rb, &mut rc] {
            let m = r.recv().await.expect("delivered");
            assert_eq!(m.hub, 0);
            assert_eq!(
                m.frames,
                vec![Bytes::from_static(b"t"), Bytes::from_static(b"x")]
            );
        }
        assert!(ra.try_recv().is_err(), "no echo to the sender");
        assert_eq!(*a.connected().borrow(), 1);
    }

    #[tokio::test]
    async fn full_port_drops_without_blocking_others_then_repairs() {
        let bus = InProcessBus::new(BusConfig { capacity: 4 });
        let a = bus.port("a");
        let slow = bus.port("slow");
        let fast = bus.port("fast");
        let mut ra = a.take_incoming().expect("take");
        let mut rs = slow.take_incoming().expect("take");
        let mut rf = fast.take_incoming().expect("take");
        for i in 0..10u8 {
            a.send("t", Bytes::from(vec![i]));
            // The fast relay keeps up.
            assert_eq!(rf.recv().await.expect("fast").frames[1][0], i);
        }
        let (_, received, dropped, _) = slow.stats().snapshot();
        assert_eq!((received, dropped), (4, 6));
        // Still full: no repair yet.
        assert_eq!(bus.repair(), 0);
        while rs.try_recv().is_ok() {}
        assert_eq!(bus.repair(), 1);
        let m = ra.recv().await.expect("resync request to the sender");
        let env = hintfed_core::open(&m.frames[1], &KeyRing::default(), &Limits::default())
            .expect("valid envelope");
        assert_eq!(env.body, Body::ResyncRequest { origin: "a".into() });
        assert_eq!(bus.repair(), 0, "repaired once");
    }

    #[tokio::test]
    async fn drops_to_an_observer_are_not_repaired() {
        let bus = InProcessBus::new(BusConfig { capacity: 2 });
        let a = bus.port("a");
        let log = bus.observer_port("log");
        let mut rl = log.take_incoming().expect("take");
        for i in 0..5u8 {
            a.send("t", Bytes::from(vec![i]));
        }
        assert_eq!(log.stats().snapshot().2, 3);
        while rl.try_recv().is_ok() {}
        assert_eq!(bus.repair(), 0);
    }
}
