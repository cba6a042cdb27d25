//! [`KafkaTransport`]: the federation over a Kafka cluster (topology 3 of the design), behind
//! the same [`FederationTransport`] interface as the ZeroMQ hubs, so the agent's relay and its
//! [`hintfed_core::Node`] run unchanged.
//!
//! # Topics and record keys
//! Every stream envelope of one origin goes to one partition (FNV-1a of the origin name modulo
//! the partition count), so Kafka keeps that origin's stream in order. The payload is the
//! sealed envelope exactly as the agent gave it; the record key tells log compaction what may
//! be forgotten:
//!
//! | envelope | topic | key |
//! | --- | --- | --- |
//! | update (device) | state (compacted) | `device/<origin>/<key>` |
//! | update (presence) | state | `presence/<origin>/<key>` |
//! | full-sync begin and end | state | `sync/<origin>` |
//! | origin down (about itself) | state | `down/<origin>` |
//! | heartbeat | heartbeat topic | `heartbeat/<origin>` |
//! | hello, snapshot request, resync request | not sent | |
//!
//! Why these keys are safe to compact: an update record is superseded only by a newer value
//! of the same key from the same origin. Of the full-sync markers only the newest is needed:
//! a `FullSyncEnd { begin_seq }` drops every device of its origin whose newest update is older
//! than `begin_seq`, and each update record surviving compaction keeps its original sequence,
//! so replaying the compacted log drops exactly what the live stream dropped. The newest
//! `down/<origin>` record is followed (at higher offsets) by that origin's later records, so a
//! replay marks it down and then revives it exactly as live delivery did. Heartbeats live on
//! their own topic (`cleanup.policy=delete`, short retention) so that one record per second
//! per agent does not bloat the state topic that every starting agent must read; the
//! reordering this introduces between the two topics is what the core's sequence tracking
//! already tolerates (a hole open shorter than `gap_grace_ms` is no gap).
//!
//! # Snapshot: the topic is the snapshot
//! Each transport owns a private reader: it reads the state topic from the beginning and the
//! heartbeat topic from `heartbeat_lookback` ago, up to the high watermark each partition had
//! at start, verifying every record (bad MACs are counted and dropped) and feeding it to an
//! in-process [`hintfed_core::Hub`], with the record's timestamp as "now" (so an origin whose
//! newest record is older than `origin_timeout` is known down before anyone asks). Nothing is
//! delivered to the agent while catching up, and [`FederationTransport::connected`] stays 0.
//! Once every partition is read, `connected` becomes 1; the relay then asks for a snapshot and
//! [`FederationTransport::request_snapshot`] answers at once from that hub, with chunks sealed
//! by the same keys, as [`Channel::Reply`]s from source 0. From then on every new record is
//! fed to the hub and, when new to it, delivered as [`Channel::Fanout`] after any snapshot
//! already answered — so the node sees a snapshot covering offset N followed by every record
//! after N, the Clone pattern with Kafka offsets in place of a hub's sequence. Later snapshot
//! requests (a gap) are answered from the same, current hub.
//!
//! Every agent reads every record: partitions are assigned manually (no consumer group is
//! joined; the `group.id` is unique per transport and offsets are never committed).
//!
//! # Liveness, delivery errors
//! Liveness is the core's: heartbeat records keep an origin up; an origin silent past its
//! timeout turns `down_state` in every node. `connected` drops to 0 while librdkafka reports
//! every broker down and returns to 1 once metadata can be fetched again. The producer is
//! idempotent (`enable.idempotence=true`: no duplicates, per-partition order kept across
//! librdkafka's own retries, which run until `delivery_timeout`). A record that still fails is
//! counted and logged, and the transport then asks its own node to republish its whole state
//! (a [`hintfed_core::Body::ResyncRequest`] on the inbound stream, at most once per
//! `resync_debounce`), which repairs whatever was lost.
//!
//! # Topic creation and rights
//! At start, missing topics are created (`cleanup.policy=compact` for the state topic,
//! `cleanup.policy=delete` with `retention.ms` for the heartbeat topic). When the cluster
//! refuses (no `CREATE` right), [`KafkaTransport::start`] fails with
//! [`KafkaStartError::CreateTopic`] naming the topic, the broker's reason, and what to create
//! by hand; an existing topic is used as it is.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hintfed_core::{
    Body, Envelope, Hub, HubAction, HubConfig, Ingest, KeyRing, Limits, Millis, open,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::hub::{Channel, Incoming};
use crate::{FederationTransport, TransportError};

/// Properties whose values never appear in logs or `Debug` output.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.contains("key") || k.contains("token")
}

/// Settings of a [`KafkaTransport`].
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port...]`.
    pub brokers: String,
    /// The compacted state topic (default `hintfed.state`).
    pub topic: String,
    /// The heartbeat topic (default `hintfed.heartbeat`).
    pub heartbeat_topic: String,
    /// This agent's origin name (client and group ids, the local hub's name).
    pub origin: String,
    /// Keys that verify every record read (and seal the snapshots answered locally).
    pub keys: KeyRing,
    /// Wire limits (records larger than `max_message_bytes` are dropped and counted).
    pub limits: Limits,
    /// librdkafka properties passed through to the producer, the consumer and the admin
    /// client (e.g. `security.protocol`, `sasl.*`, `ssl.*`). Values of keys that look secret
    /// never appear in logs or `Debug`.
    pub properties: Vec<(String, String)>,
    /// Create missing topics at start (default true).
    pub create_topics: bool,
    /// Partitions of topics created here (default 1; more spread load over brokers).
    pub partitions: i32,
    /// Replication factor of topics created here (default 1; use 3 in production).
    pub replication_factor: i32,
    /// `retention.ms` of a heartbeat topic created here (default 1 hour).
    pub heartbeat_retention: Duration,
    /// Must equal the node's `origin_timeout_ms` (default 15 s): an origin with no record
    /// this long is down in locally answered snapshots.
    pub origin_timeout: Duration,
    /// How far back the heartbeat topic is read at start (default twice `origin_timeout`).
    pub heartbeat_lookback: Duration,
    /// `delivery.timeout.ms` of the producer: how long librdkafka retries a record (default
    /// 10 s).
    pub delivery_timeout: Duration,
    /// Timeout of each metadata, watermark and admin call (default 10 s).
    pub request_timeout: Duration,
    /// Capacity of the inbound channel to the agent (default 4096; the reader waits when it
    /// is full, Kafka buffers meanwhile).
    pub inbound_capacity: usize,
    /// At most one self-resync per this period after delivery failures (default 5 s).
    pub resync_debounce: Duration,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                if is_secret(k) {
                    format!("{k}=<redacted>")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("heartbeat_topic", &self.heartbeat_topic)
            .field("origin", &self.origin)
            .field("keys", &self.keys)
            .field("properties", &props)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("origin_timeout", &self.origin_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaConfig {
    /// Defaults (documented on each field) for `origin` on `brokers`.
    pub fn new(brokers: impl Into<String>, origin: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            topic: "hintfed.state".to_owned(),
            heartbeat_topic: "hintfed.heartbeat".to_owned(),
            origin: origin.into(),
            keys: KeyRing::default(),
            limits: Limits::default(),
            properties: Vec::new(),
            create_topics: true,
            partitions: 1,
            replication_factor: 1,
            heartbeat_retention: Duration::from_secs(3600),
            origin_timeout: Duration::from_secs(15),
            heartbeat_lookback: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            inbound_capacity: 4096,
            resync_debounce: Duration::from_secs(5),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", format!("hintfed-{}", self.origin));
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// Why a [`KafkaTransport`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaStartError {
    /// A configuration value is unusable.
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    /// librdkafka refused to create a client (bad property, missing feature).
    #[error("cannot create the Kafka {what}: {source}")]
    Client {
        /// Which client.
        what: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The cluster could not be reached, or refused to describe a topic.
    #[error("cannot read metadata of topic {topic:?} from {brokers}: {detail}")]
    Metadata {
        /// The topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
        /// What went wrong.
        detail: String,
    },
    /// A missing topic could not be created (typically: no `CREATE` right).
    #[error(
        "topic {topic:?} does not exist and could not be created: {reason}. Create it yourself \
         (e.g. kafka-topics.sh --create --topic {topic} --config cleanup.policy={policy}) or \
         grant this principal CREATE on it"
    )]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's reason.
        reason: String,
        /// The cleanup policy it needs.
        policy: &'static str,
    },
}

/// Counters of a [`KafkaTransport`].
#[derive(Debug, Default)]
struct Counters {
    produced: AtomicU64,
    delivery_failed: AtomicU64,
    consumed: AtomicU64,
    rejected: AtomicU64,
    forwarded: AtomicU64,
    snapshots_served: AtomicU64,
    self_resyncs: AtomicU64,
}

/// A copy of the counters of a [`KafkaTransport`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KafkaStats {
    /// Records handed to the producer.
    pub produced: u64,
    /// Records librdkafka finally failed to deliver.
    pub delivery_failed: u64,
    /// Records read.
    pub consumed: u64,
    /// Records dropped by verification (bad MAC, malformed, oversize).
    pub rejected: u64,
    /// Records delivered to the agent as fan-out.
    pub forwarded: u64,
    /// Snapshots answered from the local hub.
    pub snapshots_served: u64,
    /// Self-resyncs asked after delivery failures.
    pub self_resyncs: u64,
}

/// Replaces the keys of a running [`KafkaTransport`] (see [`KafkaTransport::keys_handle`]).
#[derive(Clone)]
pub struct KafkaKeys {
    cmd_tx: mpsc::UnboundedSender<Cmd>,
}

impl fmt::Debug for KafkaKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaKeys").finish_non_exhaustive()
    }
}

impl KafkaKeys {
    /// Replaces the keys; false when the transport is gone.
    pub fn set(&self, keys: KeyRing) -> bool {
        self.cmd_tx.send(Cmd::SetKeys(keys)).is_ok()
    }
}

/// Which topic and key an envelope is published under; `None`: not published on Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// True for the heartbeat topic, false for the state topic.
    pub heartbeat: bool,
    /// The record key.
    pub key: String,
}

/// The route of one envelope (see the module docs for the table).
pub fn route(env: &Envelope) -> Option<Route> {
    let o = &env.origin;
    let (heartbeat, key) = match &env.body {
        Body::Update(u) => (false, format!("{}/{o}/{}", u.value.kind().as_str(), u.key)),
        Body::FullSyncBegin | Body::FullSyncEnd { .. } => (false, format!("sync/{o}")),
        Body::OriginDown { origin, .. } => (false, format!("down/{origin}")),
        Body::Heartbeat { .. } => (true, format!("heartbeat/{o}")),
        Body::Hello { .. }
        | Body::SnapshotRequest { .. }
        | Body::SnapshotChunk { .. }
        | Body::SnapshotEnd { .. }
        | Body::ResyncRequest { .. } => return None,
    };
    Some(Route { heartbeat, key })
}

/// The partition of `origin` among `partitions` (FNV-1a 32 modulo the count), so that one
/// origin's stream stays in one partition and in order.
pub fn partition_of(origin: &str, partitions: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in origin.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let n = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(h % n).unwrap_or(0)
}

/// Logs librdkafka errors and notes when every broker is down.
struct Ctx {
    all_down: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            self.all_down.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
        match error.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication,
            ) => error!(
                error = %error,
                reason,
                "Kafka refused this principal: check its ACLs (READ and WRITE on both topics, \
                 DESCRIBE on the cluster) and credentials"
            ),
            _ => warn!(error = %error, reason, "librdkafka"),
        }
    }
}

impl ConsumerContext for Ctx {}

enum Cmd {
    Snapshot(Envelope),
    SetKeys(KeyRing),
    DeliveryFailed,
}

struct Shared {
    counters: Counters,
}

/// The Kafka federation transport. Cheap to share behind an `Arc`; dropping it stops the
/// reader. See the module docs.
pub struct KafkaTransport {
    producer: FutureProducer,
    state_topic: String,
    heartbeat_topic: String,
    state_partitions: i32,
    heartbeat_partitions: i32,
    limits: Limits,
    shared: Arc<Shared>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    incoming: Mutex<Option<mpsc::Receiver<Incoming>>>,
    connected: watch::Receiver<usize>,
    reader: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("state_topic", &self.state_topic)
            .field("heartbeat_topic", &self.heartbeat_topic)
            .field("connected", &*self.connected.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for KafkaTransport {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn wall_now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    )
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KafkaStartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KafkaStartError::Config(format!("blocking task failed: {e}")))
}

/// Partition count of `topic`, `None` when it does not exist.
fn partitions_of(
    consumer: &StreamConsumer<Ctx>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, String> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => Ok(Some(
            i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
        )),
        Some(e) => {
            let code = RDKafkaErrorCode::from(e);
            if matches!(
                code,
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
            ) {
                Ok(None)
            } else {
                Err(code.to_string())
            }
        }
    }
}

impl KafkaTransport {
    /// Connects, creates missing topics, assigns every partition and starts catching up in
    /// the background (needs a Tokio runtime). [`FederationTransport::connected`] turns 1 once
    /// both topics are read up to their high watermarks at start.
    pub async fn start(cfg: KafkaConfig) -> Result<Self, KafkaStartError> {
        if cfg.brokers.trim().is_empty() {
            return Err(KafkaStartError::Config("no brokers".into()));
        }
        if cfg.topic.is_empty()
            || cfg.heartbeat_topic.is_empty()
            || cfg.topic == cfg.heartbeat_topic
        {
            return Err(KafkaStartError::Config(
                "the state and heartbeat topics must be two different, non-empty names".into(),
            ));
        }
        let all_down = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());
        let ctx = || Ctx {
            all_down: Arc::clone(&all_down),
            wake: Arc::clone(&wake),
        };

        let mut pc = cfg.client_config();
        pc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("delivery.timeout.ms", ms(cfg.delivery_timeout))
            .set("linger.ms", "2");
        let producer: FutureProducer = pc.create().map_err(|source| KafkaStartError::Client {
            what: "producer",
            source,
        })?;

        let mut cc = cfg.client_config();
        let unique: u64 = rand::random();
        cc.set("group.id", format!("hintfed-{}-{unique:016x}", cfg.origin))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100");
        let consumer: StreamConsumer<Ctx> =
            cc.create_with_context(ctx())
                .map_err(|source| KafkaStartError::Client {
                    what: "consumer",
                    source,
                })?;
        let consumer = Arc::new(consumer);

        if cfg.create_topics {
            create_missing(&cfg, &consumer).await?;
        }
        let mut counts = Vec::new();
        for topic in [&cfg.topic, &cfg.heartbeat_topic] {
            let c = Arc::clone(&consumer);
            let t = topic.clone();
            let timeout = cfg.request_timeout;
            let n = blocking(move || partitions_of(&c, &t, timeout))
                .await?
                .map_err(|detail| KafkaStartError::Metadata {
                    topic: topic.clone(),
                    brokers: cfg.brokers.clone(),
                    detail,
                })?
                .ok_or_else(|| KafkaStartError::Metadata {
                    topic: topic.clone(),
                    brokers: cfg.brokers.clone(),
                    detail: "topic does not exist (and create_topics is off)".into(),
                })?;
            counts.push(n);
        }
        let (state_partitions, heartbeat_partitions) = (counts[0], counts[1]);

        // Assign: state from the beginning, heartbeats from the lookback; targets = the high
        // watermarks now.
        let targets = {
            let c = Arc::clone(&consumer);
            let cfg2 = cfg.clone();
            blocking(move || assign(&c, &cfg2, state_partitions, heartbeat_partitions))
                .await?
                .map_err(|detail| KafkaStartError::Metadata {
                    topic: cfg.topic.clone(),
                    brokers: cfg.brokers.clone(),
                    detail,
                })?
        };
        info!(
            topic = %cfg.topic,
            heartbeat_topic = %cfg.heartbeat_topic,
            state_partitions,
            heartbeat_partitions,
            to_read = targets.len(),
            "Kafka transport: catching up from the compacted topic"
        );

        let (in_tx, in_rx) = mpsc::channel(cfg.inbound_capacity.max(16));
        let (conn_tx, conn_rx) = watch::channel(0usize);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
        });
        let now = wall_now();
        let mut hub_cfg = HubConfig::new(format!("kafka-snapshot@{}", cfg.origin));
        hub_cfg.origin_timeout_ms =
            u64::try_from(cfg.origin_timeout.as_millis()).unwrap_or(u64::MAX);
        hub_cfg.chunk_max_bytes = cfg.limits.max_message_bytes.saturating_mul(3) / 4;
        let reader = Reader {
            consumer,
            cfg: cfg.clone(),
            hub: Hub::new(hub_cfg, hintfed_core::Epoch(now.0), now),
            keys: cfg.keys.clone(),
            targets,
            caught_up: false,
            pending: VecDeque::new(),
            last_ts: HashMap::new(),
            in_tx,
            conn_tx,
            cmd_rx,
            shared: Arc::clone(&shared),
            all_down,
            wake,
            last_resync: None,
            resync_wanted: false,
            started: Instant::now(),
        };
        let reader = tokio::spawn(reader.run());
        Ok(KafkaTransport {
            producer,
            state_topic: cfg.topic.clone(),
            heartbeat_topic: cfg.heartbeat_topic.clone(),
            state_partitions,
            heartbeat_partitions,
            limits: cfg.limits.clone(),
            shared,
            cmd_tx,
            incoming: Mutex::new(Some(in_rx)),
            connected: conn_rx,
            reader,
        })
    }

    /// Replaces the keys that verify records and seal local snapshots (SIGHUP).
    pub fn set_keys(&self, keys: KeyRing) {
        let _ = self.cmd_tx.send(Cmd::SetKeys(keys));
    }

    /// A handle that replaces the keys later, for whoever reloads the configuration while
    /// the transport itself is owned by the relay.
    pub fn keys_handle(&self) -> KafkaKeys {
        KafkaKeys {
            cmd_tx: self.cmd_tx.clone(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> KafkaStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KafkaStats {
            produced: g(&c.produced),
            delivery_failed: g(&c.delivery_failed),
            consumed: g(&c.consumed),
            rejected: g(&c.rejected),
            forwarded: g(&c.forwarded),
            snapshots_served: g(&c.snapshots_served),
            self_resyncs: g(&c.self_resyncs),
        }
    }

    /// Waits until every record sent so far is delivered or failed (bounded by `timeout`).
    pub async fn flush(&self, timeout: Duration) -> Result<(), TransportError> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .map_err(|_| TransportError::Closed)?
            .map_err(|_| TransportError::NotConnected)
    }
}

async fn create_missing(
    cfg: &KafkaConfig,
    consumer: &Arc<StreamConsumer<Ctx>>,
) -> Result<(), KafkaStartError> {
    let mut missing = Vec::new();
    for (topic, compact) in [(&cfg.topic, true), (&cfg.heartbeat_topic, false)] {
        let c = Arc::clone(consumer);
        let t = topic.clone();
        let timeout = cfg.request_timeout;
        match blocking(move || partitions_of(&c, &t, timeout)).await? {
            Ok(Some(_)) => {}
            Ok(None) => missing.push((topic.clone(), compact)),
            Err(detail) => {
                return Err(KafkaStartError::Metadata {
                    topic: topic.clone(),
                    brokers: cfg.brokers.clone(),
                    detail,
                });
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<_> =
        cfg.client_config()
            .create()
            .map_err(|source| KafkaStartError::Client {
                what: "admin client",
                source,
            })?;
    let retention = ms(cfg.heartbeat_retention);
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|(t, compact)| {
            let n = NewTopic::new(
                t,
                cfg.partitions.max(1),
                TopicReplication::Fixed(cfg.replication_factor.max(1)),
            );
            if *compact {
                n.set("cleanup.policy", "compact")
            } else {
                n.set("cleanup.policy", "delete")
                    .set("retention.ms", &retention)
            }
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(cfg.request_timeout))
        .request_timeout(Some(cfg.request_timeout));
    let results =
        admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| KafkaStartError::CreateTopic {
                topic: missing
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: e.to_string(),
                policy: "compact",
            })?;
    for r in results {
        match r {
            Ok(t) => info!(topic = %t, "Kafka topic created"),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                debug!(topic = %t, "topic created meanwhile by another agent");
            }
            Err((t, code)) => {
                let policy = if t == cfg.topic { "compact" } else { "delete" };
                return Err(KafkaStartError::CreateTopic {
                    topic: t,
                    reason: match code {
                        RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed => {
                            format!("{code} (this principal lacks the CREATE right)")
                        }
                        c => c.to_string(),
                    },
                    policy,
                });
            }
        }
    }
    Ok(())
}

/// Assigns every partition of both topics and returns the offsets to reach before the
/// catch-up is complete, by (topic, partition).
fn assign(
    consumer: &StreamConsumer<Ctx>,
    cfg: &KafkaConfig,
    state_partitions: i32,
    heartbeat_partitions: i32,
) -> Result<BTreeMap<(String, i32), i64>, String> {
    let t = cfg.request_timeout;
    let mut tpl = TopicPartitionList::new();
    let mut targets = BTreeMap::new();
    for p in 0..state_partitions {
        let (low, high) = consumer
            .fetch_watermarks(&cfg.topic, p, t)
            .map_err(|e| format!("watermarks of {}/{p}: {e}", cfg.topic))?;
        tpl.add_partition_offset(&cfg.topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        if high > low {
            targets.insert((cfg.topic.clone(), p), high);
        }
    }
    // Heartbeats: from `heartbeat_lookback` ago (the end when the broker cannot say).
    let since = i64::try_from(wall_now().0).unwrap_or(i64::MAX)
        - i64::try_from(cfg.heartbeat_lookback.as_millis()).unwrap_or(0);
    let mut times = TopicPartitionList::new();
    for p in 0..heartbeat_partitions {
        times
            .add_partition_offset(&cfg.heartbeat_topic, p, Offset::Offset(since))
            .map_err(|e| e.to_string())?;
    }
    let starts: HashMap<i32, Offset> = match consumer.offsets_for_times(times, t) {
        Ok(list) => list
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect(),
        Err(e) => {
            debug!(error = %e, "offsets_for_times unsupported; heartbeats read from the end");
            HashMap::new()
        }
    };
    for p in 0..heartbeat_partitions {
        let (_, high) = consumer
            .fetch_watermarks(&cfg.heartbeat_topic, p, t)
            .map_err(|e| format!("watermarks of {}/{p}: {e}", cfg.heartbeat_topic))?;
        let start = match starts.get(&p) {
            Some(Offset::Offset(o)) if *o >= 0 && *o < high => Offset::Offset(*o),
            _ => Offset::End,
        };
        if let Offset::Offset(o) = start {
            targets.insert((cfg.heartbeat_topic.clone(), p), high.max(o));
        }
        tpl.add_partition_offset(&cfg.heartbeat_topic, p, start)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(targets)
}

struct Reader {
    consumer: Arc<StreamConsumer<Ctx>>,
    cfg: KafkaConfig,
    hub: Hub,
    keys: KeyRing,
    targets: BTreeMap<(String, i32), i64>,
    caught_up: bool,
    pending: VecDeque<Envelope>,
    last_ts: HashMap<String, Millis>,
    in_tx: mpsc::Sender<Incoming>,
    conn_tx: watch::Sender<usize>,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    shared: Arc<Shared>,
    all_down: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    last_resync: Option<Instant>,
    resync_wanted: bool,
    started: Instant,
}

impl Reader {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
        if self.targets.is_empty() {
            self.finish_catch_up().await;
        }
        loop {
            let consumer = Arc::clone(&self.consumer);
            tokio::select! {
                msg = consumer.recv() => match msg {
                    Ok(m) => {
                        let topic = m.topic().to_owned();
                        let partition = m.partition();
                        let offset = m.offset();
                        let ts = m.timestamp().to_millis();
                        let payload = m.payload().map(Bytes::copy_from_slice);
                        drop(m);
                        if self.all_down.swap(false, Ordering::SeqCst) {
                            self.publish_connected();
                        }
                        if !self.on_record(&topic, payload, ts).await {
                            return;
                        }
                        if !self.caught_up {
                            if let Some(t) = self.targets.get(&(topic.clone(), partition))
                                && offset + 1 >= *t
                            {
                                self.targets.remove(&(topic, partition));
                            }
                            if self.targets.is_empty() {
                                self.finish_catch_up().await;
                            }
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "Kafka consumer");
                    }
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::SetKeys(k)) => self.keys = k,
                    Some(Cmd::Snapshot(env)) => {
                        if self.caught_up {
                            if !self.serve(&env).await {
                                return;
                            }
                        } else {
                            self.pending.push_back(env);
                        }
                    }
                    Some(Cmd::DeliveryFailed) => self.resync_wanted = true,
                },
                _ = self.wake.notified() => self.publish_connected(),
                _ = tick.tick() => {
                    let now = wall_now();
                    self.hub.tick(now);
                    // The local hub's own heartbeats and notices stay local.
                    let _ = self.hub.take_actions();
                    if !self.caught_up {
                        self.check_positions();
                        if self.targets.is_empty() {
                            self.finish_catch_up().await;
                        } else if self.started.elapsed() > Duration::from_secs(30) {
                            debug!(left = self.targets.len(), "still catching up");
                        }
                    }
                    if self.all_down.load(Ordering::SeqCst) && probe.is_none() {
                        let c = Arc::clone(&self.consumer);
                        let topic = self.cfg.topic.clone();
                        probe = Some(tokio::task::spawn_blocking(move || {
                            c.fetch_metadata(Some(&topic), Duration::from_secs(1)).is_ok()
                        }));
                    }
                    if probe.as_ref().is_some_and(tokio::task::JoinHandle::is_finished)
                        && let Some(p) = probe.take()
                        && matches!(p.await, Ok(true))
                    {
                        self.all_down.store(false, Ordering::SeqCst);
                        self.publish_connected();
                    }
                    if self.resync_wanted && !self.send_resync().await {
                        return;
                    }
                }
            }
        }
    }

    fn publish_connected(&self) {
        let n = usize::from(self.caught_up && !self.all_down.load(Ordering::SeqCst));
        self.conn_tx.send_if_modified(|v| {
            let changed = *v != n;
            *v = n;
            changed
        });
    }

    fn check_positions(&mut self) {
        let Ok(pos) = self.consumer.position() else {
            return;
        };
        for e in pos.elements() {
            if let Offset::Offset(o) = e.offset() {
                let k = (e.topic().to_owned(), e.partition());
                if self.targets.get(&k).is_some_and(|t| o >= *t) {
                    self.targets.remove(&k);
                }
            }
        }
    }

    async fn finish_catch_up(&mut self) {
        self.caught_up = true;
        let now = wall_now();
        self.hub.tick(now);
        let _ = self.hub.take_actions();
        info!(
            origins = self.hub.origins().iter().count(),
            down = self
                .hub
                .origins()
                .iter()
                .filter(|(_, i)| i.down.is_some())
                .count(),
            "Kafka transport: caught up with the state topic"
        );
        while let Some(env) = self.pending.pop_front() {
            if !self.serve(&env).await {
                return;
            }
        }
        self.publish_connected();
    }

    /// Answers a snapshot request from the local hub; false when the agent is gone.
    async fn serve(&mut self, req: &Envelope) -> bool {
        let now = wall_now();
        self.hub.on_envelope(now, req);
        self.shared
            .counters
            .snapshots_served
            .fetch_add(1, Ordering::Relaxed);
        for a in self.hub.take_actions() {
            if let HubAction::SendTo { envelope, .. } = a
                && !self.reply(&envelope).await
            {
                return false;
            }
        }
        true
    }

    async fn reply(&self, env: &Envelope) -> bool {
        match self.keys.seal(env, &self.cfg.limits) {
            Ok(b) => self
                .in_tx
                .send(Incoming {
                    hub: 0,
                    channel: Channel::Reply,
                    frames: vec![Bytes::from(b)],
                })
                .await
                .is_ok(),
            Err(e) => {
                warn!(error = %e, "cannot seal a local snapshot chunk");
                true
            }
        }
    }

    async fn send_resync(&mut self) -> bool {
        if !self.caught_up
            || self.all_down.load(Ordering::SeqCst)
            || self
                .last_resync
                .is_some_and(|t| t.elapsed() < self.cfg.resync_debounce)
        {
            return true;
        }
        self.resync_wanted = false;
        self.last_resync = Some(Instant::now());
        self.shared
            .counters
            .self_resyncs
            .fetch_add(1, Ordering::Relaxed);
        warn!("records were lost on the way to Kafka; republishing this origin's full state");
        let env = Envelope::new(
            self.hub.name().to_owned(),
            self.hub.epoch(),
            0,
            Body::ResyncRequest {
                origin: self.cfg.origin.clone(),
            },
        );
        self.reply(&env).await
    }

    /// Verifies and ingests one record; false when the agent is gone.
    async fn on_record(&mut self, topic: &str, payload: Option<Bytes>, ts: Option<i64>) -> bool {
        let c = &self.shared.counters;
        c.consumed.fetch_add(1, Ordering::Relaxed);
        let Some(payload) = payload else {
            // A tombstone: nothing to apply.
            return true;
        };
        let env = match open(&payload, &self.keys, &self.cfg.limits) {
            Ok(env) if env.is_stream() => env,
            Ok(env) => {
                debug!(
                    body = env.body.type_name(),
                    "control record on Kafka ignored"
                );
                return true;
            }
            Err(e) => {
                c.rejected.fetch_add(1, Ordering::Relaxed);
                debug!(%topic, error = %e, "Kafka record rejected");
                return true;
            }
        };
        let wall = wall_now();
        let now = if self.caught_up {
            wall
        } else {
            // Liveness during the catch-up follows the records' own times, never backwards
            // for one origin and never ahead of the clock.
            let rec = ts
                .and_then(|t| u64::try_from(t).ok())
                .map_or(wall, |t| Millis(t.min(wall.0)));
            let last = self.last_ts.entry(env.origin.clone()).or_insert(rec);
            if rec.0 > last.0 {
                *last = rec;
            }
            *last
        };
        let ing = self.hub.on_envelope(now, &env);
        if self.caught_up && ing == Ingest::Forward {
            c.forwarded.fetch_add(1, Ordering::Relaxed);
            let frames = vec![Bytes::copy_from_slice(env.topic().as_bytes()), payload];
            return self
                .in_tx
                .send(Incoming {
                    hub: 0,
                    channel: Channel::Fanout,
                    frames,
                })
                .await
                .is_ok();
        }
        true
    }
}

impl FederationTransport for KafkaTransport {
    async fn publish(&self, _topic: &str, payload: Bytes) -> Result<usize, TransportError> {
        let env = open(&payload, &KeyRing::default(), &self.limits)
            .map_err(|_| TransportError::Config("publish: not an envelope"))?;
        let Some(route) = route(&env) else {
            // Nothing to tell the others on Kafka (hello, requests): accepted.
            return Ok(1);
        };
        let (topic, partitions) = if route.heartbeat {
            (&self.heartbeat_topic, self.heartbeat_partitions)
        } else {
            (&self.state_topic, self.state_partitions)
        };
        let partition = partition_of(&env.origin, partitions);
        let record = FutureRecord::to(topic)
            .key(route.key.as_bytes())
            .payload(payload.as_ref())
            .partition(partition);
        match self.producer.send_result(record) {
            Ok(delivery) => {
                self.shared
                    .counters
                    .produced
                    .fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&self.shared);
                let cmd = self.cmd_tx.clone();
                let key = route.key;
                tokio::spawn(async move {
                    let failed = match delivery.await {
                        Ok(Ok(_)) => None,
                        Ok(Err((e, _))) => Some(e.to_string()),
                        Err(_) => Some("producer dropped".to_owned()),
                    };
                    if let Some(e) = failed {
                        shared
                            .counters
                            .delivery_failed
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(%key, error = %e, "Kafka record not delivered");
                        let _ = cmd.send(Cmd::DeliveryFailed);
                    }
                });
                Ok(1)
            }
            Err((e, _)) => {
                self.shared
                    .counters
                    .delivery_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(key = %route.key, error = %e, "Kafka producer refused a record");
                let _ = self.cmd_tx.send(Cmd::DeliveryFailed);
                Err(TransportError::NotConnected)
            }
        }
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        self.incoming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    async fn request_snapshot(
        &self,
        payload: Bytes,
        _exclude: &[usize],
    ) -> Result<usize, TransportError> {
        let env = open(&payload, &KeyRing::default(), &self.limits)
            .map_err(|_| TransportError::Config("snapshot request: not an envelope"))?;
        self.cmd_tx
            .send(Cmd::Snapshot(env))
            .map_err(|_| TransportError::Closed)?;
        Ok(0)
    }

    fn connected(&self) -> watch::Receiver<usize> {
        self.connected.clone()
    }
}

#[cfg(test)]
mod tests {
    use hintfed_core::{DeviceState, Epoch, HlcTimestamp, Update, Value};

    use super::*;

    fn update(origin: &str, key: &str) -> Envelope {
        Envelope::new(
            origin.to_owned(),
            Epoch(1),
            3,
            Body::Update(Update {
                key: key.to_owned(),
                value: Value::Device(DeviceState::Inuse),
                ts: HlcTimestamp::default(),
            }),
        )
    }

    #[test]
    fn routes_follow_the_table() {
        let r = route(&update("pbx-a", "PJSIP/100")).expect("routed");
        assert_eq!(r.key, "device/pbx-a/PJSIP/100");
        assert!(!r.heartbeat);
        let hb = Envelope::new("pbx-a", Epoch(1), 4, Body::Heartbeat { local_down: false });
        assert_eq!(
            route(&hb),
            Some(Route {
                heartbeat: true,
                key: "heartbeat/pbx-a".into()
            })
        );
        let end = Envelope::new("pbx-a", Epoch(1), 5, Body::FullSyncEnd { begin_seq: 2 });
        assert_eq!(route(&end).map(|r| r.key), Some("sync/pbx-a".into()));
        let hello = Envelope::new(
            "pbx-a",
            Epoch(1),
            5,
            Body::Hello {
                role: hintfed_core::Role::Agent,
                software: String::new(),
            },
        );
        assert_eq!(route(&hello), None);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        for n in 1..8 {
            for o in ["pbx-a", "pbx-b", "", "ä"] {
                let p = partition_of(o, n);
                assert!((0..n).contains(&p));
                assert_eq!(p, partition_of(o, n));
            }
        }
        assert_eq!(partition_of("x", 0), 0);
    }

    #[test]
    fn debug_hides_secrets() {
        let mut c = KafkaConfig::new("k:9092", "pbx-a");
        c.properties = vec![
            ("sasl.password".into(), "hunter2".into()),
            ("security.protocol".into(), "SASL_SSL".into()),
        ];
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"));
        assert!(s.contains("SASL_SSL"));
    }
}
