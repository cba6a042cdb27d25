//! In-process federation peers around one real `hintfed-server`, for the `snapshot` and
//! `memory` modes:
//! - [`Fleet`]: `M` origins, each a core `Node` on a transport `MultiHub` (what
//!   `hintfed-agent` runs), that publish a full sync of their share of `N` device keys, keep
//!   heartbeating, answer the hub's resync requests, and on demand drive updates at a rate;
//! - [`SnapshotClient`]: a peer that says hello like an agent, subscribes to the fan-out and
//!   asks the hub for snapshots, counting entries, chunks and bytes (optionally keeping the
//!   chunk payloads to time their decoding).
//!
//! Fan-out messages are counted, never decoded, by the origins (they do not need them).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{
    Action, Body, DeviceState, Envelope, Epoch, KeyRing, LocalEvent, Millis, Node, NodeConfig, Role,
};
use hintfed_transport::{Channel, Incoming, MultiHub, MultiHubConfig, SNAPSHOT_TOPIC};
use tokio::sync::{mpsc, watch};

/// How a hub is filled: how many keys, from how many origins, how fast.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct FillArgs {
    /// Device keys the hub holds.
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    /// Origins publishing them (in this process).
    #[arg(long, default_value_t = 10)]
    pub origins: usize,
    /// Messages/s the origins publish at most while filling (0: unlimited; the hub drops
    /// at ingress when flooded, then asks for resyncs).
    #[arg(long, default_value_t = 20_000.0)]
    pub fill_rate: f64,
}

/// The shared HMAC key of every bench topology.
pub const KEY: &str = "bench-shared-key";

const STATES: [DeviceState; 4] = [
    DeviceState::Inuse,
    DeviceState::NotInuse,
    DeviceState::Ringing,
    DeviceState::Busy,
];

/// Wall clock in the core's unit.
pub fn now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
    )
}

/// Device key `j` of origin `o`.
pub fn key_name(o: usize, j: usize) -> String {
    format!("PJSIP/s{o}k{j}")
}

/// Keys of origin `o` when `total` keys are spread over `origins` (the first ones get one
/// more when it does not divide).
pub fn share(total: usize, origins: usize, o: usize) -> usize {
    let base = total / origins.max(1);
    base + usize::from(o < total % origins.max(1))
}

/// State of key `j` after `round` rounds of updates (round 0: the full sync); consecutive
/// rounds always differ.
pub fn state_of(j: usize, round: usize) -> DeviceState {
    STATES[(j + round) % 4]
}

fn seal(ring: &KeyRing, limits: &CoreLimits, env: &Envelope) -> anyhow::Result<Vec<Bytes>> {
    let bytes = ring.seal(env, limits)?;
    Ok(vec![
        Bytes::copy_from_slice(env.topic().as_bytes()),
        Bytes::from(bytes),
    ])
}

/// Queues `frames` on every hub link, waiting while the bounded link queue is full (up to
/// 30 s).
async fn send_blocking(multi: &MultiHub, frames: &Vec<Bytes>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while multi.send_all(frames) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "hub link refused messages for 30 s"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// Waits until `multi` has a connected hub.
async fn connected(multi: &MultiHub) -> anyhow::Result<()> {
    anyhow::ensure!(
        multi.wait_connected(Duration::from_secs(10)).await,
        "not connected to the hub within 10 s"
    );
    Ok(())
}

/// A token bucket for one origin's publishing: at most `rate` messages/s, bursts of up to
/// 100 ms worth; idle time is not saved up.
pub struct Pace {
    rate: f64,
    start: Instant,
    sent: f64,
}

impl Pace {
    /// At most `rate` messages/s (0 or less: unlimited).
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            start: Instant::now(),
            sent: 0.0,
        }
    }

    /// How long to wait before sending one more message at `now` (and counts it).
    pub fn delay(&mut self, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let due = self.start + Duration::from_secs_f64(self.sent / self.rate);
        if now > due + Duration::from_millis(100) {
            // Idle for a while: start a new window.
            self.start = now;
            self.sent = 0.0;
        }
        self.sent += 1.0;
        let due = self.start + Duration::from_secs_f64((self.sent - 1.0) / self.rate);
        due.saturating_duration_since(now + Duration::from_millis(100))
    }

    /// Waits as [`Pace::delay`] says.
    pub async fn wait(&mut self) {
        let d = self.delay(Instant::now());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

/// Counters shared by the origins of a [`Fleet`].
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Stream envelopes published (updates, heartbeats, full-sync markers).
    pub published: AtomicU64,
    /// Driven updates (after the full sync).
    pub driven: AtomicU64,
    /// Resync requests received from the hub.
    pub resyncs: AtomicU64,
    /// Origins whose initial full sync was queued.
    pub synced: AtomicU64,
}

/// `M` in-process origins publishing `N` keys to one hub.
pub struct Fleet {
    /// Shared counters.
    pub stats: Arc<FleetStats>,
    rate: watch::Sender<f64>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Fleet {
    /// Starts `origins` origins on `endpoint` (`tcp://host:port` of the hub's ROUTER) with
    /// `keys` keys in total. Each connects, says hello and publishes its full sync; all
    /// together publish at most `max_rate` messages/s (0: unlimited), so that the fill does
    /// not overflow the hub's bounded ingress (which drops, and then asks for resyncs).
    pub fn start(endpoint: &str, origins: usize, keys: usize, max_rate: f64) -> Self {
        let stats = Arc::new(FleetStats::default());
        let (rate, rate_rx) = watch::channel(0.0);
        let (stop, stop_rx) = watch::channel(false);
        let tasks = (0..origins)
            .map(|o| {
                tokio::spawn(origin_task(
                    o,
                    endpoint.to_owned(),
                    share(keys, origins, o),
                    rate_rx.clone(),
                    stop_rx.clone(),
                    stats.clone(),
                    max_rate / origins.max(1) as f64,
                ))
            })
            .collect();
        Self {
            stats,
            rate,
            stop,
            tasks,
        }
    }

    /// Sets the update rate of every origin (updates/s per origin; 0: heartbeats only).
    pub fn set_rate_per_origin(&self, r: f64) {
        let _ = self.rate.send(r);
    }

    /// Whether an origin task ended (with an error: they only end when stopped).
    pub fn failed(&self) -> bool {
        self.tasks.iter().any(|t| t.is_finished())
    }

    /// Stops every origin; returns the first error of one.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.context("origin task")??;
        }
        Ok(())
    }
}

async fn origin_task(
    o: usize,
    endpoint: String,
    keys: usize,
    mut rate: watch::Receiver<f64>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<FleetStats>,
    max_rate: f64,
) -> anyhow::Result<()> {
    let name = format!("origin-{o}");
    let mut pace = Pace::new(max_rate);
    let multi = MultiHub::connect(MultiHubConfig::new([endpoint]))?;
    let mut incoming = multi.take_incoming().context("incoming stream")?;
    connected(&multi).await?;
    let ring = KeyRing::from_secrets([KEY]);
    let limits = CoreLimits::default();
    let t = now();
    let mut cfg = NodeConfig::new(name.clone());
    cfg.snapshots = false;
    let mut node = Node::new(cfg, Epoch(t.0), t);
    send_blocking(
        &multi,
        &seal(&ring, &limits, &node.hello(Role::Agent, "hintfed-bench"))?,
    )
    .await?;
    let items = (0..keys)
        .map(|j| LocalEvent::device(key_name(o, j), state_of(j, 0)))
        .collect();
    node.on_local_full_sync(now(), items);
    let pump = |node: &mut Node| node.take_actions();
    for act in pump(&mut node) {
        if let Action::Publish(env) = act {
            pace.wait().await;
            send_blocking(&multi, &seal(&ring, &limits, &env)?).await?;
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats.synced.fetch_add(1, Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Driving: updates due since `since` at the current rate.
    let mut since = Instant::now();
    let mut done_at_rate = 0u64;
    let mut cur_rate = 0.0;
    let mut k = 0u64;
    loop {
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            m = incoming.recv() => {
                let Some(Incoming { channel, frames, .. }) = m else { break };
                if channel == Channel::Reply
                    && let Some(p) = frames.last()
                    && let Ok(env) = hintfed_core::open(p, &ring, &limits)
                {
                    if matches!(env.body, Body::ResyncRequest { .. }) {
                        stats.resyncs.fetch_add(1, Ordering::Relaxed);
                    }
                    node.on_remote(now(), &env);
                }
            }
            _ = tick.tick() => {
                let r = *rate.borrow_and_update();
                if r != cur_rate {
                    // A new rate counts from now.
                    cur_rate = r;
                    since = Instant::now();
                    done_at_rate = 0;
                }
                if r > 0.0 && keys > 0 {
                    let due = (since.elapsed().as_secs_f64() * r) as u64;
                    while done_at_rate < due {
                        let j = (k % keys as u64) as usize;
                        let round = (k / keys as u64) as usize + 1;
                        node.on_local_event(now(), LocalEvent::device(key_name(o, j), state_of(j, round)));
                        k += 1;
                        done_at_rate += 1;
                        stats.driven.fetch_add(1, Ordering::Relaxed);
                    }
                }
                node.tick(now());
            }
        }
        for act in pump(&mut node) {
            if let Action::Publish(env) = act {
                pace.wait().await;
                send_blocking(&multi, &seal(&ring, &limits, &env)?).await?;
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Whether fan-out `frames` carry a state update (topic `state.`), not a heartbeat or a
/// control message.
pub fn is_update(frames: &[Bytes]) -> bool {
    frames.first().is_some_and(|t| t.starts_with(b"state."))
}

/// What one snapshot answer held.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries received.
    pub entries: u64,
    /// Distinct keys among them (only counted with `keep`).
    pub distinct_keys: u64,
    /// Chunks received.
    pub chunks: u64,
    /// Bytes of the chunk messages (signed wire form).
    pub bytes: u64,
    /// From sending the request to the end marker.
    pub secs: f64,
    /// The chunk payloads (with `keep`).
    pub payloads: Vec<Bytes>,
    /// Requests sent again because no chunk arrived for [`SNAPSHOT_RETRY`].
    pub retries: u64,
}

/// A peer asks again when its answer made no progress for this long, as the agent's `Node`
/// does (`snapshot_retry_ms`): a peer that reconnected meanwhile is otherwise never answered.
pub const SNAPSHOT_RETRY: Duration = Duration::from_secs(5);

/// A peer that asks the hub for snapshots (like an agent at start).
pub struct SnapshotClient {
    name: String,
    multi: MultiHub,
    incoming: mpsc::Receiver<Incoming>,
    ring: KeyRing,
    limits: CoreLimits,
    epoch: Epoch,
    seq: u64,
    next_id: u64,
    /// Fan-out messages received so far.
    pub fanout: Arc<AtomicU64>,
}

impl SnapshotClient {
    /// Connects to the hub at `endpoint` and says hello as an agent named `name`.
    pub async fn connect(endpoint: &str, name: &str) -> anyhow::Result<Self> {
        let multi = MultiHub::connect(MultiHubConfig::new([endpoint.to_owned()]))?;
        let incoming = multi.take_incoming().context("incoming stream")?;
        connected(&multi).await?;
        let t = now();
        let c = Self {
            name: name.to_owned(),
            multi,
            incoming,
            ring: KeyRing::from_secrets([KEY]),
            limits: CoreLimits::default(),
            epoch: Epoch(t.0),
            seq: 0,
            next_id: 1,
            fanout: Arc::new(AtomicU64::new(0)),
        };
        c.hello().await?;
        Ok(c)
    }

    async fn hello(&self) -> anyhow::Result<()> {
        let hello = Envelope::new(
            self.name.clone(),
            self.epoch,
            self.seq,
            Body::Hello {
                role: Role::Agent,
                software: "hintfed-bench".into(),
            },
        );
        send_blocking(&self.multi, &seal(&self.ring, &self.limits, &hello)?).await
    }

    /// Sends a snapshot request; returns its id.
    fn request(&mut self) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Envelope::new(
            self.name.clone(),
            self.epoch,
            self.seq,
            Body::SnapshotRequest { request_id: id },
        );
        let payload = Bytes::from(self.ring.seal(&req, &self.limits)?);
        self.multi
            .request(
                vec![Bytes::from_static(SNAPSHOT_TOPIC.as_bytes()), payload],
                &[],
            )
            .map_err(|e| anyhow::anyhow!("snapshot request not sent: {e}"))?;
        Ok(id)
    }

    /// Asks for a snapshot and reads until its end marker (or `timeout`); asks again (hello
    /// and a new request) when no chunk arrived for [`SNAPSHOT_RETRY`].
    pub async fn fetch(&mut self, keep: bool, timeout: Duration) -> anyhow::Result<Snapshot> {
        let t0 = Instant::now();
        let mut id = self.request()?;
        let mut s = Snapshot::default();
        let mut keys = HashSet::new();
        let deadline = t0 + timeout;
        let mut progress = Instant::now();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("snapshot not complete within {timeout:?}");
            }
            let wait = left.min(SNAPSHOT_RETRY.saturating_sub(progress.elapsed()));
            let m = match tokio::time::timeout(wait, self.incoming.recv()).await {
                Ok(m) => m.context("hub link closed")?,
                Err(_) if Instant::now() < deadline => {
                    // The hub keeps a retried request's place in its queue but answers it
                    // from the start: count the new answer alone.
                    self.hello().await?;
                    id = self.request()?;
                    s = Snapshot {
                        retries: s.retries + 1,
                        ..Snapshot::default()
                    };
                    keys.clear();
                    progress = Instant::now();
                    continue;
                }
                Err(_) => anyhow::bail!("snapshot not complete within {timeout:?}"),
            };
            if m.channel == Channel::Fanout {
                if is_update(&m.frames) {
                    self.fanout.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            let Some(p) = m.frames.last() else { continue };
            let Ok(env) = hintfed_core::open(p, &self.ring, &self.limits) else {
                continue;
            };
            match env.body {
                Body::SnapshotChunk {
                    request_id,
                    entries,
                    ..
                } if request_id == id => {
                    progress = Instant::now();
                    s.chunks += 1;
                    s.entries += entries.len() as u64;
                    s.bytes += p.len() as u64;
                    if keep {
                        keys.extend(entries.into_iter().map(|e| e.key));
                        s.payloads.push(p.clone());
                    }
                }
                Body::SnapshotEnd { request_id, .. } if request_id == id => break,
                _ => {}
            }
        }
        s.secs = t0.elapsed().as_secs_f64();
        s.distinct_keys = keys.len() as u64;
        Ok(s)
    }

    /// Keeps reading (and counting) fan-out in a background task until the client is
    /// dropped; returns the counter.
    pub fn count_fanout_in_background(
        self,
    ) -> (Arc<AtomicU64>, MultiHub, tokio::task::JoinHandle<()>) {
        let counter = self.fanout.clone();
        let multi = self.multi.clone();
        let mut me = self;
        let h = tokio::spawn(async move {
            while let Some(m) = me.incoming.recv().await {
                if m.channel == Channel::Fanout && is_update(&m.frames) {
                    me.fanout.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        (counter, multi, h)
    }
}

/// Time to decode and verify `payloads` (the CPU floor of reading a snapshot), in seconds.
pub fn decode_secs(payloads: &[Bytes]) -> f64 {
    let ring = KeyRing::from_secrets([KEY]);
    let limits = CoreLimits::default();
    let t0 = Instant::now();
    let mut n = 0usize;
    for p in payloads {
        if let Ok(env) = hintfed_core::open(p, &ring, &limits)
            && let Body::SnapshotChunk { entries, .. } = env.body
        {
            n += entries.len();
        }
    }
    std::hint::black_box(n);
    t0.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for (total, m) in [(100_000, 10), (100_001, 7), (3, 5), (0, 4)] {
            let v: Vec<usize> = (0..m).map(|o| share(total, m, o)).collect();
            assert_eq!(v.iter().sum::<usize>(), total);
            let (lo, hi) = (v.iter().min().copied(), v.iter().max().copied());
            assert!(hi.unwrap_or(0) - lo.unwrap_or(0) <= 1, "{v:?}");
        }
    }

    #[test]
    fn pace_allows_a_100ms_burst_then_spaces_messages() {
        let mut p = Pace::new(1000.0);
        let t = p.start;
        // 100 ms worth (100 messages) pass at once, then one per millisecond.
        for _ in 0..101 {
            assert_eq!(p.delay(t), Duration::ZERO);
        }
        assert_eq!(p.delay(t), Duration::from_millis(1));
        // Long idle: a new window, no debt.
        assert_eq!(p.delay(t + Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(Pace::new(0.0).delay(t), Duration::ZERO);
    }

    #[test]
    fn only_state_topics_count_as_updates() {
        let f = |t: &'static [u8]| vec![Bytes::from_static(t), Bytes::from_static(b"{}")];
        assert!(is_update(&f(b"state.device")));
        assert!(!is_update(&f(b"control")));
        assert!(!is_update(&[]));
    }

    #[test]
    fn consecutive_rounds_change_every_key() {
        for j in 0..8 {
            for round in 0..8 {
                assert_ne!(state_of(j, round), state_of(j, round + 1));
            }
        }
        assert_eq!(key_name(3, 17), "PJSIP/s3k17");
    }
}
