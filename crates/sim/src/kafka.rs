//! The app_ami_kafka mode: a simulated server also publishes every manager event it emits to
//! a Kafka topic, laid out exactly like the records of the real module in
//! `shared/fixtures/app_ami_kafka/`:
//!
//! - record key: the event name;
//! - headers `entity_id`, `system_name` (when the server has a name), `asterisk_version`,
//!   `event_type`, `event_category`, `format`, `timestamp` (epoch seconds), `hostname`;
//! - body, `format = json`: one object of strings, `Event` first, then `EntityID` and
//!   `SystemName`, then the event's other fields;
//! - body, `format = ami`: `EntityID:` and `SystemName:` lines **before** the event (which
//!   carries its own `SystemName` again), CRLF line ends, a trailing empty line.
//!
//! One difference from the module: [`KafkaPublisher::start`] creates the topic when it is
//! missing (the module does not), so tests need no separate step.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hintfed_ami::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::event::SimEvent;
use crate::server::SimHandle;

/// The `--kafka-*` options of `hintfed-sim` (the app_ami_kafka mode).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct KafkaArgs {
    /// app_ami_kafka mode: also publish every event of every server to this Kafka cluster
    /// (`host:port[,host:port]`), laid out like app_ami_kafka's records.
    #[arg(long, value_name = "BROKERS")]
    pub kafka_brokers: Option<String>,

    /// app_ami_kafka mode: the topic (created when missing).
    #[arg(long, value_name = "TOPIC", default_value = "asterisk_ami")]
    pub kafka_topic: String,

    /// app_ami_kafka mode: the record body layout.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = KafkaFormat::Json)]
    pub kafka_format: KafkaFormat,
}

impl KafkaArgs {
    /// Starts one publisher per server when `--kafka-brokers` is given (none otherwise). A
    /// server without a name gets the entity id of `sim-<index>`.
    pub async fn start(&self, servers: &[SimHandle]) -> Result<Vec<KafkaPublisher>, KafkaSimError> {
        let Some(brokers) = &self.kafka_brokers else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (i, h) in servers.iter().enumerate() {
            let seed = h.name().map_or_else(|| format!("sim-{i}"), str::to_owned);
            out.push(
                KafkaPublisher::start(
                    KafkaSimConfig {
                        brokers: brokers.clone(),
                        topic: self.kafka_topic.clone(),
                        format: self.kafka_format,
                        entity_id: entity_id_for(&seed),
                        system_name: h.name().map(str::to_owned),
                    },
                    h.subscribe_events(),
                )
                .await?,
            );
        }
        Ok(out)
    }
}

/// The body layout (app_ami_kafka's `format` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KafkaFormat {
    /// One JSON object.
    Json,
    /// AMI text.
    Ami,
}

impl KafkaFormat {
    /// The `format` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaFormat::Json => "json",
            KafkaFormat::Ami => "ami",
        }
    }
}

/// Where and how one server publishes.
#[derive(Debug, Clone)]
pub struct KafkaSimConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic (app_ami_kafka's default `asterisk_ami`).
    pub topic: String,
    /// Body layout.
    pub format: KafkaFormat,
    /// The server's `EntityID` (see [`entity_id_for`]).
    pub entity_id: String,
    /// The server's `SystemName`, if it has one.
    pub system_name: Option<String>,
}

/// A stable, locally administered MAC-like entity id derived from a server name (or index).
pub fn entity_id_for(seed: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in seed.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// The first class label of a `Privilege` value (`call,all` → `call`).
fn category(msg: &Message) -> String {
    msg.get("Privilege")
        .and_then(|p| p.split(',').next())
        .unwrap_or("")
        .to_owned()
}

/// The record body of `msg` in `format`, as app_ami_kafka writes it.
pub fn body(
    msg: &Message,
    format: KafkaFormat,
    entity_id: &str,
    system_name: Option<&str>,
) -> Vec<u8> {
    match format {
        KafkaFormat::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert(
                "Event".to_owned(),
                msg.event().unwrap_or_default().to_owned().into(),
            );
            obj.insert("EntityID".to_owned(), entity_id.to_owned().into());
            if let Some(s) = system_name {
                obj.insert("SystemName".to_owned(), s.to_owned().into());
            }
            for (k, v) in msg.headers() {
                if k.eq_ignore_ascii_case("Event") || k.eq_ignore_ascii_case("SystemName") {
                    continue;
                }
                obj.insert(k.to_owned(), v.into());
            }
            serde_json::Value::Object(obj).to_string().into_bytes()
        }
        KafkaFormat::Ami => {
            let mut s = format!("EntityID: {entity_id}\r\n");
            if let Some(n) = system_name {
                s.push_str(&format!("SystemName: {n}\r\n"));
            }
            for (k, v) in msg.headers() {
                s.push_str(&format!("{k}: {v}\r\n"));
            }
            s.push_str("\r\n");
            s.into_bytes()
        }
    }
}

/// The record headers, in the module's order.
pub fn headers(
    msg: &Message,
    format: KafkaFormat,
    entity_id: &str,
    system_name: Option<&str>,
    timestamp_secs: u64,
) -> Vec<(&'static str, String)> {
    let mut h = vec![("entity_id", entity_id.to_owned())];
    if let Some(s) = system_name {
        h.push(("system_name", s.to_owned()));
    }
    h.push(("asterisk_version", "hintfed-sim".to_owned()));
    h.push(("event_type", msg.event().unwrap_or_default().to_owned()));
    h.push(("event_category", category(msg)));
    h.push(("format", format.as_str().to_owned()));
    h.push(("timestamp", timestamp_secs.to_string()));
    h.push((
        "hostname",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "hintfed-sim".to_owned()),
    ));
    h
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSimError {
    /// librdkafka refused the configuration.
    #[error("Kafka client: {0}")]
    Client(String),
    /// The topic could not be created.
    #[error("cannot create topic {topic:?}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's reason.
        reason: String,
    },
}

/// A running publisher; dropping it stops publishing.
#[derive(Debug)]
pub struct KafkaPublisher {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KafkaPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KafkaPublisher {
    /// Creates the topic when missing, then publishes every event of `events`.
    pub async fn start(
        cfg: KafkaSimConfig,
        events: broadcast::Receiver<Arc<SimEvent>>,
    ) -> Result<Self, KafkaSimError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers);
        let producer: FutureProducer = cc
            .clone()
            .set("linger.ms", "1")
            .create()
            .map_err(|e| KafkaSimError::Client(e.to_string()))?;
        let exists = {
            let p = producer.clone();
            let topic = cfg.topic.clone();
            tokio::task::spawn_blocking(move || {
                p.client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .is_ok_and(|md| {
                        md.topics().iter().any(|t| {
                            t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                        })
                    })
            })
            .await
            .unwrap_or(false)
        };
        if !exists {
            create_topic(&cc, &cfg.topic).await?;
        }
        let task = tokio::spawn(publish(producer, cfg, events));
        Ok(KafkaPublisher { task })
    }
}

/// Creates `name` (one partition, so per-key order is total order).
async fn create_topic(cc: &ClientConfig, name: &str) -> Result<(), KafkaSimError> {
    let admin: AdminClient<_> = cc
        .create()
        .map_err(|e| KafkaSimError::Client(e.to_string()))?;
    let topic = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results =
        admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| KafkaSimError::CreateTopic {
                topic: name.to_owned(),
                reason: e.to_string(),
            })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(KafkaSimError::CreateTopic {
                    topic: t,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

async fn publish(
    producer: FutureProducer,
    cfg: KafkaSimConfig,
    mut events: broadcast::Receiver<Arc<SimEvent>>,
) {
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(lost = n, "Kafka publisher lagged; events lost");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let msg = ev.message();
        let name = msg.event().unwrap_or_default().to_owned();
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let sys = cfg.system_name.as_deref();
        let payload = body(msg, cfg.format, &cfg.entity_id, sys);
        let mut oh = OwnedHeaders::new();
        for (k, v) in headers(msg, cfg.format, &cfg.entity_id, sys, secs) {
            oh = oh.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let record = FutureRecord::to(&cfg.topic)
            .key(name.as_bytes())
            .payload(&payload)
            .headers(oh);
        match producer.send_result(record) {
            Ok(delivery) => {
                tokio::spawn(async move {
                    if let Ok(Err((e, _))) = delivery.await {
                        warn!(error = %e, "Kafka record not delivered");
                    }
                });
            }
            Err((e, _)) => debug!(error = %e, "Kafka producer queue refused a record"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_options_parse() {
        use clap::Parser as _;
        let args = crate::cli::Args::parse_from(["hintfed-sim"]);
        assert_eq!(args.kafka.kafka_brokers, None);
        let args = crate::cli::Args::parse_from([
            "hintfed-sim",
            "--kafka-brokers",
            "127.0.0.1:9092",
            "--kafka-format",
            "ami",
        ]);
        assert_eq!(args.kafka.kafka_brokers.as_deref(), Some("127.0.0.1:9092"));
        assert_eq!(args.kafka.kafka_topic, "asterisk_ami");
        assert_eq!(args.kafka.kafka_format, KafkaFormat::Ami);
    }

    const JSON: &str = include_str!("../../../../shared/fixtures/app_ami_kafka/json-format.jsonl");
    const AMI: &str = include_str!("../../../../shared/fixtures/app_ami_kafka/ami-format.jsonl");

    /// Rebuilds every captured record from its event and compares body and header names.
    fn check(text: &str, format: KafkaFormat) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let rec: serde_json::Value = serde_json::from_str(line).expect("capture line");
            let value = rec["value"].as_str().expect("value");
            // The event as the server emitted it: the body without the module's prefix.
            let msg: Message = match format {
                KafkaFormat::Json => {
                    let obj: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(value).expect("object");
                    let mut m = Message::new();
                    m.push("Event", obj["Event"].as_str().expect("Event"));
                    m.push("Privilege", obj["Privilege"].as_str().expect("Privilege"));
                    m.push("SystemName", obj["SystemName"].as_str().expect("sys"));
                    for (k, v) in &obj {
                        if !["Event", "EntityID", "SystemName", "Privilege"].contains(&k.as_str()) {
                            m.push(k.clone(), v.as_str().expect("string"));
                        }
                    }
                    m
                }
                KafkaFormat::Ami => {
                    let mut m = Message::new();
                    for l in value.split("\r\n").skip(2) {
                        if let Some((k, v)) = l.split_once(": ") {
                            m.push(k, v);
                        }
                    }
                    m
                }
            };
            let eid = rec["headers"]["entity_id"].as_str().expect("eid");
            let sys = rec["headers"]["system_name"].as_str();
            let got = body(&msg, format, eid, sys);
            assert_eq!(String::from_utf8_lossy(&got), value);
            let hs = headers(&msg, format, eid, sys, 1);
            let names: Vec<&str> = hs.iter().map(|(k, _)| *k).collect();
            let want: Vec<&str> = rec["headers"]
                .as_object()
                .expect("headers")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(names, want);
            let get = |n: &str| hs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
            assert_eq!(get("event_type"), rec["headers"]["event_type"].as_str());
            assert_eq!(
                get("event_category"),
                rec["headers"]["event_category"].as_str()
            );
            assert_eq!(get("format"), Some(format.as_str()));
            assert_eq!(Some(rec["key"].as_str().expect("key")), msg.event());
        }
    }

    #[test]
    fn json_records_are_byte_exact() {
        check(JSON, KafkaFormat::Json);
    }

    #[test]
    fn ami_records_are_byte_exact() {
        check(AMI, KafkaFormat::Ami);
    }

    #[test]
    fn entity_ids_are_stable_and_mac_like() {
        let a = entity_id_for("pbx-a");
        assert_eq!(a, entity_id_for("pbx-a"));
        assert_ne!(a, entity_id_for("pbx-b"));
        assert_eq!(a.len(), 17);
    }
}
