//! [`KafkaSource`]: reads app_ami_kafka's topic and sends this server's device and presence
//! changes to the relay as [`PbxEvent`]s.
//!
//! Kafka is one-way: writes still go through AMI or res_zmq_manager, whose link also tells
//! whether Asterisk is up. The source reads every partition from its end at start (the full
//! sync over the action link covers what came before), without a consumer group.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{MAX_BODY_BYTES, OwnServer, parse_record};
use crate::event::{PbxEvent, classify};

/// Settings of the app_ami_kafka source.
#[derive(Clone)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers` of the cluster app_ami_kafka writes to.
    pub brokers: String,
    /// The topic (app_ami_kafka's default: `asterisk_ami`).
    pub topic: String,
    /// Which server's events to keep.
    pub own: OwnServer,
    /// librdkafka properties passed through (SASL, TLS); secret values never logged.
    pub properties: Vec<(String, String)>,
    /// Largest body read ([`MAX_BODY_BYTES`] by default).
    pub max_body_bytes: usize,
    /// How often a missing topic is looked for again (default 5 s).
    pub retry_interval: Duration,
}

impl std::fmt::Debug for KafkaSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSourceConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("own", &self.own)
            .field(
                "properties",
                &self.properties.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl KafkaSourceConfig {
    /// Defaults for `brokers`, topic `asterisk_ami`, keeping the events of `own`.
    pub fn new(brokers: impl Into<String>, own: OwnServer) -> Self {
        KafkaSourceConfig {
            brokers: brokers.into(),
            topic: "asterisk_ami".to_owned(),
            own,
            properties: Vec::new(),
            max_body_bytes: MAX_BODY_BYTES,
            retry_interval: Duration::from_secs(5),
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    /// Neither a system name nor an entity id tells this server's records apart.
    #[error(
        "the Kafka event source needs this Asterisk's system name or entity id to pick its \
         records out of the shared topic"
    )]
    NoIdentity,
    /// librdkafka refused the configuration.
    #[error("cannot create the Kafka consumer: {0}")]
    Client(String),
}

/// A running source; dropping it stops the reader.
#[derive(Debug)]
pub struct KafkaSource {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KafkaSource {
    /// Starts reading (needs a Tokio runtime); this server's device and presence changes go
    /// to `tx` as [`PbxEvent`]s, its `FullyBooted` as a [`PbxEvent::Resync`].
    pub fn start(
        cfg: KafkaSourceConfig,
        tx: mpsc::Sender<PbxEvent>,
    ) -> Result<Self, KafkaSourceError> {
        if !cfg.own.is_set() {
            return Err(KafkaSourceError::NoIdentity);
        }
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers);
        let unique: u64 = rand::random();
        cc.set("group.id", format!("hintfed-source-{unique:016x}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "100");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let consumer: StreamConsumer = cc
            .create()
            .map_err(|e| KafkaSourceError::Client(e.to_string()))?;
        let task = tokio::spawn(run(Arc::new(consumer), cfg, tx));
        Ok(KafkaSource { task })
    }
}

async fn assign_from_end(consumer: &Arc<StreamConsumer>, cfg: &KafkaSourceConfig) -> bool {
    loop {
        let c = Arc::clone(consumer);
        let topic = cfg.topic.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            let md = c
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            if n == 0 {
                return Err(format!(
                    "topic {topic:?} does not exist (app_ami_kafka does not create it: create it)"
                ));
            }
            let mut tpl = TopicPartitionList::new();
            for p in 0..i32::try_from(n).unwrap_or(i32::MAX) {
                tpl.add_partition_offset(&topic, p, Offset::End)
                    .map_err(|e| e.to_string())?;
            }
            c.assign(&tpl).map_err(|e| e.to_string())?;
            Ok(n)
        })
        .await;
        match res {
            Ok(Ok(n)) => {
                info!(topic = %cfg.topic, partitions = n, "reading Asterisk events from Kafka");
                return true;
            }
            Ok(Err(e)) => error!(topic = %cfg.topic, error = %e, "Kafka event source"),
            Err(_) => return false,
        }
        tokio::time::sleep(cfg.retry_interval).await;
    }
}

async fn run(consumer: Arc<StreamConsumer>, cfg: KafkaSourceConfig, tx: mpsc::Sender<PbxEvent>) {
    if !assign_from_end(&consumer, &cfg).await {
        return;
    }
    let mut unreadable = 0u64;
    loop {
        let m = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "Kafka event source");
                continue;
            }
        };
        let Some(body) = m.payload() else { continue };
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        if let Some(h) = m.headers() {
            for x in h.iter() {
                if let Some(v) = x.value {
                    headers.push((x.key, v));
                }
            }
        }
        let ev = match parse_record(&headers, body, cfg.max_body_bytes) {
            Ok(ev) => ev,
            Err(e) => {
                unreadable += 1;
                if unreadable.is_power_of_two() {
                    warn!(error = %e, unreadable, "unreadable app_ami_kafka records dropped");
                }
                continue;
            }
        };
        if !cfg.own.matches(&ev) {
            continue;
        }
        let out = if ev.message.is_event("FullyBooted") {
            Some(PbxEvent::Resync {
                reason: "FullyBooted read from Kafka".to_owned(),
            })
        } else {
            classify(&ev.message)
        };
        if let Some(out) = out
            && tx.send(out).await.is_err()
        {
            return;
        }
    }
}
