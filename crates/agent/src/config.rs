//! [`AgentConfig`]: the typed `hintfed-agent` configuration, read from the INI file of
//! issue 4 (plus `HINTFED_<SECTION>_<KEY>` environment overrides) and validated as a whole
//! before any socket exists. Every default lives in [`defaults`]; every problem is one
//! [`ConfigError`] line naming file, `[section] key` and what is wrong (exit status 64).
//!
//! ```ini
//! [general]
//! name = pbx-a              ; origin name, unique per Asterisk (default: the host name)
//! device_state = yes
//! presence = yes
//! log_level = info
//!
//! [asterisk]
//! source = ami              ; ami | zmq | kafka (app_ami_kafka's topic; apply stays ami/zmq)
//! apply = ami               ; ami | zmq
//! host = 127.0.0.1
//! port = 5038
//! username = hintfed
//! secret = ...              ; or HINTFED_ASTERISK_SECRET
//! tls = no                  ; + tls_ca_file, tls_server_name, tls_insecure
//! zmq_evt = tcp://127.0.0.1:33333
//! zmq_cmd = tcp://127.0.0.1:44444
//! request_timeout = 1000    ; ms
//! filter_events = yes       ; AMI Filter: no ExtensionStatus, no Custom: echoes (see below)
//! kafka_topic = asterisk_ami  ; source = kafka: the topic app_ami_kafka writes
//! kafka_brokers = ...       ; default: [kafka] brokers
//! kafka_system_name = pbx-a ; whose records are ours (default: [general] name)
//! kafka_entity_id = ...     ; or/and by EntityID
//!
//! [federation]
//! transport = zmq           ; zmq | kafka
//! servers = tcp://hub-1:5560, tcp://hub-2:5560   ; zmq only
//! shared_key = ...          ; or shared_keys = k1, k2 (the first signs, all verify)
//! include = ^PJSIP/         ; one regex: local devices to federate (default: all)
//! exclude = ^Custom:        ; one regex: local devices never federated
//! never_send = UNKNOWN, INVALID
//! unknown_as = NOT_INUSE    ; written instead of UNKNOWN (Asterisk refuses it)
//! device_template = Custom:{device}
//! origin_timeout = 15s
//! heartbeat_interval = 1s
//! down_state = UNAVAILABLE
//!
//! [kafka]                   ; transport = kafka (see docs/kafka.md)
//! brokers = kafka-1:9092, kafka-2:9092
//! topic = hintfed.state     ; compacted state topic
//! heartbeat_topic = hintfed.heartbeat
//! ; any key with a dot is a librdkafka property, passed through (values never logged):
//! ; security.protocol = SASL_SSL, sasl.mechanism = SCRAM-SHA-512, sasl.username = ...
//!
//! [http]
//! listen = 127.0.0.1:9480
//! ```
//!
//! `[general] name` defaults to the host name (`/proc/sys/kernel/hostname`, else
//! `/etc/hostname`, else `$HOSTNAME`), with a configuration warning (logged once at start and
//! printed by `--check-config`, whose output shows the name in force); an explicit empty
//! `name =` is an error, as is no name at all when the host name cannot be read.
//! `[asterisk] filter_events` (default yes, AMI events only): after each login the agent asks
//! Asterisk (AMI `Filter`, the user needs `write = system`) not to send it `ExtensionStatus`
//! events, which it never reads, and, when `[federation] exclude` drops every `Custom:`
//! device (the default `^Custom:`; see [`drops_every_custom`]), the `DeviceStateChange` of
//! `Custom:` devices: the echoes of its own writes, one per write. Refused (no `system`
//! write permission): an info line, and everything still works with the events unfiltered;
//! `eventfilter` lines in `manager.conf` do the same without that permission (see
//! `deploy/asterisk/manager.conf`).
//! Limitations, stated: the SystemName Asterisk reports is not used as a default; `include`/`exclude` hold one regular expression each (a regex may
//! contain commas).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hintfed_core::{DeviceState, KeyRing, Policy, PolicyConfig, PolicyError};
use hintfed_daemon::config::{ConfigError, ConfigFile, Secret, Section, ser};
use hintfed_daemon::run::{GENERAL_KEYS, HTTP_KEYS};
use hintfed_transport::link::parse_tcp_endpoint;
use regex::Regex;
use serde::Serialize;

/// Every default of the agent configuration, in one place.
pub mod defaults {
    use std::time::Duration;

    /// `[asterisk] host`.
    pub const HOST: &str = "127.0.0.1";
    /// `[asterisk] port` (AMI).
    pub const PORT: u16 = 5038;
    /// `[asterisk] port` when `tls = yes`.
    pub const TLS_PORT: u16 = 5039;
    /// `[asterisk] zmq_evt`.
    pub const ZMQ_EVT: &str = "tcp://127.0.0.1:33333";
    /// `[asterisk] zmq_cmd`.
    pub const ZMQ_CMD: &str = "tcp://127.0.0.1:44444";
    /// `[asterisk] request_timeout`.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
    /// `[federation] exclude`.
    pub const EXCLUDE: &str = "^Custom:";
    /// `[federation] device_template`.
    pub const DEVICE_TEMPLATE: &str = "Custom:{device}";
    /// `[federation] origin_timeout`.
    pub const ORIGIN_TIMEOUT: Duration = Duration::from_secs(15);
    /// `[federation] heartbeat_interval`.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    /// `[federation] down_state`.
    pub const DOWN_STATE: &str = "UNAVAILABLE";
    /// `[asterisk] kafka_topic` (app_ami_kafka's default).
    pub const KAFKA_SOURCE_TOPIC: &str = "asterisk_ami";
    /// `[kafka] topic`.
    pub const KAFKA_TOPIC: &str = "hintfed.state";
    /// `[kafka] heartbeat_topic`.
    pub const KAFKA_HEARTBEAT_TOPIC: &str = "hintfed.heartbeat";
    /// `[federation] unknown_as`.
    pub const UNKNOWN_AS: &str = "NOT_INUSE";
}

/// Sections this daemon reads (also the sections environment variables may create).
pub const SECTIONS: &[&str] = &["general", "asterisk", "federation", "kafka", "http"];

const GENERAL: &[&str] = &["name", "device_state", "presence"];
const ASTERISK: &[&str] = &[
    "source",
    "apply",
    "host",
    "port",
    "username",
    "secret",
    "tls",
    "tls_ca_file",
    "tls_server_name",
    "tls_insecure",
    "zmq_evt",
    "zmq_cmd",
    "request_timeout",
    "filter_events",
    "kafka_topic",
    "kafka_brokers",
    "kafka_system_name",
    "kafka_entity_id",
];
const KAFKA: &[&str] = &["brokers", "topic", "heartbeat_topic"];
const FEDERATION: &[&str] = &[
    "transport",
    "servers",
    "shared_key",
    "shared_keys",
    "include",
    "exclude",
    "never_send",
    "unknown_as",
    "device_template",
    "origin_timeout",
    "heartbeat_interval",
    "down_state",
];

/// Where local events come from / where writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// AMI over TCP (or TLS).
    Ami,
    /// res_zmq_manager's sockets.
    Zmq,
    /// app_ami_kafka's topic (events only).
    Kafka,
}

/// `[general]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeneralConfig {
    /// Origin name (default: the host name).
    pub name: String,
    /// Federate device states.
    pub device_state: bool,
    /// Federate presence.
    pub presence: bool,
}

/// `[asterisk]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AsteriskConfig {
    /// Event source.
    pub source: Via,
    /// Write sink.
    pub apply: Via,
    /// AMI host.
    pub host: String,
    /// AMI port.
    pub port: u16,
    /// AMI user (required when AMI is used).
    pub username: Option<String>,
    /// AMI secret (required when AMI is used).
    pub secret: Option<Secret>,
    /// AMI over TLS.
    pub tls: bool,
    /// Extra CA file (PEM) for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Name the certificate must hold (default: `host`).
    pub tls_server_name: Option<String>,
    /// Accept any certificate (labs only).
    pub tls_insecure: bool,
    /// res_zmq_manager event (PUB) endpoint.
    pub zmq_evt: String,
    /// res_zmq_manager command (REP) endpoint.
    pub zmq_cmd: String,
    /// Timeout of one action.
    #[serde(serialize_with = "ser::duration")]
    pub request_timeout: Duration,
    /// `filter_events`: ask Asterisk not to send the AMI events the agent ignores.
    pub filter_events: bool,
    /// The AMI event filters added after each login (from `filter_events`, `source` and
    /// `[federation] exclude`; see the module documentation).
    pub event_filters: Vec<String>,
    /// `source = kafka`: app_ami_kafka's topic.
    pub kafka_topic: String,
    /// `source = kafka`: its brokers (default: `[kafka] brokers`).
    pub kafka_brokers: Option<String>,
    /// `source = kafka`: the system name whose records are this Asterisk's (default:
    /// `[general] name`).
    pub kafka_system_name: Option<String>,
    /// `source = kafka`: the entity id whose records are this Asterisk's.
    pub kafka_entity_id: Option<String>,
}

impl AsteriskConfig {
    /// Whether any AMI connection is configured.
    pub fn uses_ami(&self) -> bool {
        self.source == Via::Ami || self.apply == Via::Ami
    }
}

/// `[federation]`.
#[derive(Debug, Clone, Serialize)]
pub struct FederationConfig {
    /// `zmq` or `kafka`.
    pub transport: &'static str,
    /// Hub endpoints `tcp://host:P`.
    pub servers: Vec<String>,
    /// Shared keys (the first signs); empty = authentication off.
    pub shared_keys: Vec<Secret>,
    /// Include regex.
    pub include: Option<String>,
    /// Exclude regex.
    pub exclude: Option<String>,
    /// States never sent.
    pub never_send: Vec<String>,
    /// Written instead of UNKNOWN.
    pub unknown_as: String,
    /// Local name of a remote device.
    pub device_template: String,
    /// An origin silent this long is down.
    #[serde(serialize_with = "ser::duration")]
    pub origin_timeout: Duration,
    /// Heartbeat period.
    #[serde(serialize_with = "ser::duration")]
    pub heartbeat_interval: Duration,
    /// What a down origin's devices show.
    pub down_state: String,
    #[serde(skip)]
    policy: PolicyConfig,
}

impl FederationConfig {
    /// The key ring built from the shared keys.
    pub fn keyring(&self) -> KeyRing {
        KeyRing::from_secrets(self.shared_keys.iter().map(Secret::expose))
    }

    /// The federation policy for the node (include/exclude left out: the relay applies them,
    /// so they can be reloaded; see [`crate::relay::DeviceFilter`]).
    pub fn node_policy(&self) -> Policy {
        let cfg = PolicyConfig {
            include: Vec::new(),
            exclude: Vec::new(),
            ..self.policy.clone()
        };
        Policy::new(cfg).expect("validated when the configuration was loaded")
    }

    /// The include/exclude filter of local devices.
    pub fn device_filter(&self) -> crate::relay::DeviceFilter {
        crate::relay::DeviceFilter::new(self.include.as_deref(), self.exclude.as_deref())
            .expect("validated when the configuration was loaded")
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// `[general]`.
    pub general: GeneralConfig,
    /// `[asterisk]`.
    pub asterisk: AsteriskConfig,
    /// `[federation]`.
    pub federation: FederationConfig,
    /// `[kafka]`, when the transport or the event source is Kafka.
    pub kafka: Option<KafkaSection>,
}

/// `[kafka]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KafkaSection {
    /// `bootstrap.servers`, comma-joined.
    pub brokers: String,
    /// The compacted state topic.
    pub topic: String,
    /// The heartbeat topic.
    pub heartbeat_topic: String,
    /// librdkafka properties passed through (every key with a dot); values masked in output.
    pub properties: Vec<(String, Secret)>,
}

impl KafkaSection {
    /// The properties as librdkafka takes them.
    pub fn property_pairs(&self) -> Vec<(String, String)> {
        self.properties
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_owned()))
            .collect()
    }
}

/// What SIGHUP may change without a restart.
#[derive(Debug, Clone)]
pub struct Reloadable {
    /// Include/exclude of local devices.
    pub filter: crate::relay::DeviceFilter,
    /// Shared keys.
    pub keys: KeyRing,
    /// For logging what changed.
    pub include: Option<String>,
    /// For logging what changed.
    pub exclude: Option<String>,
    /// Number of keys, for logging.
    pub key_count: usize,
}

impl AgentConfig {
    /// Reads and validates the agent's sections of `file`.
    pub fn from_file(file: &ConfigFile) -> Result<Self, ConfigError> {
        for e in file.unknown_sections(SECTIONS) {
            file.warn(e);
        }
        let general = general(file)?;
        let mut asterisk = asterisk(file)?;
        let federation = federation(file, &general)?;
        let kafka = kafka(file, &federation, &mut asterisk, &general)?;
        asterisk.event_filters = event_filters(
            asterisk.source,
            asterisk.filter_events,
            federation.exclude.as_deref(),
        );
        let http = file.section("http");
        http.reject_unknown_keys(HTTP_KEYS)?;
        Ok(AgentConfig {
            general,
            asterisk,
            federation,
            kafka,
        })
    }

    /// The settings SIGHUP reloads.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            filter: self.federation.device_filter(),
            keys: self.federation.keyring(),
            include: self.federation.include.clone(),
            exclude: self.federation.exclude.clone(),
            key_count: self.federation.shared_keys.len(),
        }
    }
}

/// The host name: `/proc/sys/kernel/hostname`, else `/etc/hostname`, else `$HOSTNAME`
/// (first non-empty, trimmed).
pub fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .chain(std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .find(|h| !h.is_empty())
}

fn general(file: &ConfigFile) -> Result<GeneralConfig, ConfigError> {
    let s = file.section("general");
    let known: Vec<&str> = GENERAL.iter().chain(GENERAL_KEYS).copied().collect();
    s.reject_unknown_keys(&known)?;
    let name = match s.get("name") {
        Some(v) if v.trim().is_empty() => {
            return Err(s.error(
                "name",
                "empty: give the origin name, or remove the key to use the host name",
            ));
        }
        Some(v) => v.trim().to_owned(),
        None => {
            let host = host_name().ok_or_else(|| {
                s.error(
                    "name",
                    "missing, and the host name cannot be read to default it: set the origin name",
                )
            })?;
            file.warn(s.error(
                "name",
                format!("not set; using the host name {host:?} as the origin name"),
            ));
            host
        }
    };
    if name.len() > 128 {
        return Err(s.error("name", "longer than 128 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(s.error(
            "name",
            format!("{name:?} must not contain blanks or control characters"),
        ));
    }
    Ok(GeneralConfig {
        name,
        device_state: s.bool_or("device_state", true)?,
        presence: s.bool_or("presence", true)?,
    })
}

/// AMI filter of the `ExtensionStatus` events (hints; the agent reads hints by listing them).
pub const FILTER_EXTENSION_STATUS: &str = "!Event: ExtensionStatus";
/// AMI filter of the `DeviceStateChange` of `Custom:` devices.
pub const FILTER_CUSTOM_DEVICES: &str = "!Device: Custom:";

/// The AMI event filters of `[asterisk] filter_events` (the agent) or `[general]
/// filter_events` (the broker): none unless events come over AMI (`source`); the `Custom:`
/// devices' filter only when `exclude` drops every one of them.
pub fn event_filters(source: Via, filter_events: bool, exclude: Option<&str>) -> Vec<String> {
    if !filter_events || source != Via::Ami {
        return Vec::new();
    }
    let mut filters = vec![FILTER_EXTENSION_STATUS.to_owned()];
    if exclude.is_some_and(drops_every_custom) {
        filters.push(FILTER_CUSTOM_DEVICES.to_owned());
    }
    filters
}

/// Whether the `exclude` regex `pattern` surely matches every `Custom:` device name: one of
/// its top-level alternatives is `^Custom:`, `^Custom:.*` or `^Custom:.+` (only patterns
/// without groups, classes or escapes are split into alternatives; others count as no).
pub fn drops_every_custom(pattern: &str) -> bool {
    if pattern.contains(['(', '[', '\\']) {
        return matches!(pattern, "^Custom:" | "^Custom:.*" | "^Custom:.+");
    }
    pattern
        .split('|')
        .any(|alt| matches!(alt, "^Custom:" | "^Custom:.*" | "^Custom:.+"))
}

fn via(s: &Section<'_>, key: &str, allow_kafka: bool) -> Result<Via, ConfigError> {
    let allowed: &[&'static str] = if allow_kafka {
        &["ami", "zmq", "kafka"]
    } else {
        &["ami", "zmq"]
    };
    match s.one_of(key, allowed)? {
        None | Some("ami") => Ok(Via::Ami),
        Some("zmq") => Ok(Via::Zmq),
        Some(_) => Ok(Via::Kafka),
    }
}

fn endpoint(s: &Section<'_>, key: &str, default: &str) -> Result<String, ConfigError> {
    let v = s.str(key).unwrap_or(default).to_owned();
    parse_tcp_endpoint(&v).map_err(|e| s.error(key, format!("{v:?}: {e}")))?;
    Ok(v)
}

fn asterisk(file: &ConfigFile) -> Result<AsteriskConfig, ConfigError> {
    let s = file.section("asterisk");
    s.reject_unknown_keys(ASTERISK)?;
    let source = via(&s, "source", true)?;
    let apply = via(&s, "apply", false)?;
    let tls = s.bool_or("tls", false)?;
    let host = s.str("host").unwrap_or(defaults::HOST).to_owned();
    if host.contains(char::is_whitespace) || host.contains('/') {
        return Err(s.error("host", format!("{host:?} is not a host name or address")));
    }
    let port = s.port("port")?.unwrap_or(if tls {
        defaults::TLS_PORT
    } else {
        defaults::PORT
    });
    let uses_ami = source == Via::Ami || apply == Via::Ami;
    let (username, secret) = if uses_ami {
        (
            Some(s.required("username")?.to_owned()),
            Some(s.secret("secret").ok_or_else(|| {
                s.error(
                    "secret",
                    "missing (required for AMI; may come from HINTFED_ASTERISK_SECRET)",
                )
            })?),
        )
    } else {
        (s.string("username"), s.secret("secret"))
    };
    let tls_ca_file = s.string("tls_ca_file").map(PathBuf::from);
    if let Some(p) = &tls_ca_file
        && !p.is_file()
    {
        return Err(s.error(
            "tls_ca_file",
            format!("{} is not a readable file", p.display()),
        ));
    }
    let request_timeout = s.duration_ms_or("request_timeout", defaults::REQUEST_TIMEOUT)?;
    if request_timeout.is_zero() {
        return Err(s.error("request_timeout", "must be greater than 0"));
    }
    Ok(AsteriskConfig {
        source,
        apply,
        host,
        port,
        username,
        secret,
        tls,
        tls_ca_file,
        tls_server_name: s.string("tls_server_name"),
        tls_insecure: s.bool_or("tls_insecure", false)?,
        zmq_evt: endpoint(&s, "zmq_evt", defaults::ZMQ_EVT)?,
        zmq_cmd: endpoint(&s, "zmq_cmd", defaults::ZMQ_CMD)?,
        request_timeout,
        filter_events: s.bool_or("filter_events", true)?,
        event_filters: Vec::new(),
        kafka_topic: s
            .str("kafka_topic")
            .unwrap_or(defaults::KAFKA_SOURCE_TOPIC)
            .to_owned(),
        kafka_brokers: s.string("kafka_brokers"),
        kafka_system_name: s.string("kafka_system_name"),
        kafka_entity_id: s.string("kafka_entity_id"),
    })
}

/// The federation policy keys, read the same way by the agent (`[federation]`) and the
/// broker (`[general]`): include/exclude, never_send, unknown_as, down_state,
/// device_template, origin_timeout, heartbeat_interval.
#[derive(Debug, Clone)]
pub struct PolicyKeys {
    /// `include`: one regex, local devices to federate (default: all).
    pub include: Option<String>,
    /// `exclude`: one regex, local devices never federated (default `^Custom:`).
    pub exclude: Option<String>,
    /// `never_send`, as written.
    pub never_send_names: Vec<String>,
    /// `never_send`, parsed.
    pub never_send: Vec<DeviceState>,
    /// `unknown_as`.
    pub unknown_as: DeviceState,
    /// `down_state`.
    pub down_state: DeviceState,
    /// `device_template`.
    pub device_template: String,
    /// `origin_timeout`.
    pub origin_timeout: Duration,
    /// `heartbeat_interval`.
    pub heartbeat_interval: Duration,
}

impl PolicyKeys {
    /// Reads and checks the policy keys of section `s` (defaults from [`defaults`]).
    pub fn read(s: &Section<'_>) -> Result<Self, ConfigError> {
        let include = regex(s, "include", None)?;
        let exclude = regex(s, "exclude", Some(defaults::EXCLUDE))?;
        let never_send_names = s.list("never_send");
        let mut never_send = Vec::new();
        for n in &never_send_names {
            never_send.push(
                DeviceState::from_str(n)
                    .map_err(|_| s.error("never_send", format!("{n:?} is not a device state")))?,
            );
        }
        let unknown_as = state(s, "unknown_as", defaults::UNKNOWN_AS)?;
        let down_state = state(s, "down_state", defaults::DOWN_STATE)?;
        let device_template = s
            .str("device_template")
            .unwrap_or(defaults::DEVICE_TEMPLATE)
            .to_owned();
        let origin_timeout = s.duration_or("origin_timeout", defaults::ORIGIN_TIMEOUT)?;
        let heartbeat_interval =
            s.duration_or("heartbeat_interval", defaults::HEARTBEAT_INTERVAL)?;
        if heartbeat_interval < Duration::from_millis(10) {
            return Err(s.error("heartbeat_interval", "must be at least 10ms"));
        }
        if origin_timeout <= heartbeat_interval * 2 {
            return Err(s.error(
                "origin_timeout",
                format!(
                    "must be more than twice heartbeat_interval ({})",
                    humantime::format_duration(heartbeat_interval)
                ),
            ));
        }
        Ok(Self {
            include,
            exclude,
            never_send_names,
            never_send,
            unknown_as,
            down_state,
            device_template,
            origin_timeout,
            heartbeat_interval,
        })
    }

    /// The core policy for these keys, validated (errors name the key in section `s`).
    pub fn policy(
        &self,
        s: &Section<'_>,
        device_state: bool,
        presence: bool,
    ) -> Result<PolicyConfig, ConfigError> {
        let policy = PolicyConfig {
            device_state,
            presence,
            include: self.include.iter().cloned().collect(),
            exclude: self.exclude.iter().cloned().collect(),
            never_send: self.never_send.clone(),
            unknown_substitute: self.unknown_as,
            device_template: self.device_template.clone(),
            down_state: self.down_state,
        };
        Policy::new(policy.clone()).map_err(|e| match e {
            PolicyError::Template(_) => s.error("device_template", e.to_string()),
            PolicyError::Unwritable("down_state") => s.error(
                "down_state",
                "cannot be UNKNOWN (Asterisk refuses to write it)",
            ),
            PolicyError::Unwritable(_) => s.error(
                "unknown_as",
                "cannot be UNKNOWN (Asterisk refuses to write it)",
            ),
            PolicyError::Regex { .. } => s.error("include", e.to_string()),
        })?;
        Ok(policy)
    }
}

fn state(s: &Section<'_>, key: &str, default: &str) -> Result<DeviceState, ConfigError> {
    let v = s.str(key).unwrap_or(default);
    DeviceState::from_str(v).map_err(|_| {
        s.error(
            key,
            format!("{v:?} is not a device state (NOT_INUSE, INUSE, BUSY, UNAVAILABLE, RINGING, RINGINUSE, ONHOLD, INVALID, UNKNOWN)"),
        )
    })
}

fn regex(s: &Section<'_>, key: &str, default: Option<&str>) -> Result<Option<String>, ConfigError> {
    let v = s.string(key).or(default.map(str::to_owned));
    if let Some(p) = &v {
        Regex::new(p).map_err(|e| {
            let first = e.to_string();
            let first = first.lines().last().unwrap_or("").trim().to_owned();
            s.error(
                key,
                format!("{p:?} is not a valid regular expression: {first}"),
            )
        })?;
    }
    Ok(v)
}

fn federation(file: &ConfigFile, general: &GeneralConfig) -> Result<FederationConfig, ConfigError> {
    let s = file.section("federation");
    s.reject_unknown_keys(FEDERATION)?;
    let transport = match s.one_of("transport", &["zmq", "kafka"])? {
        None | Some("zmq") => "zmq",
        Some(_) => "kafka",
    };
    let servers = s.list("servers");
    if servers.is_empty() && transport == "zmq" {
        return Err(s.error(
            "servers",
            "missing (required): at least one tcp://host:port hub",
        ));
    }
    for ep in &servers {
        let (_, port) =
            parse_tcp_endpoint(ep).map_err(|e| s.error("servers", format!("{ep:?}: {e}")))?;
        if port == u16::MAX {
            return Err(s.error(
                "servers",
                format!("{ep:?}: the hub also uses port P+1, so P must be below 65535"),
            ));
        }
    }
    let shared_keys: Vec<Secret> = match (s.str("shared_key"), s.str("shared_keys")) {
        (Some(_), Some(_)) => {
            return Err(s.error(
                "shared_keys",
                "set either shared_key or shared_keys, not both",
            ));
        }
        (Some(k), None) => vec![Secret::new(k)],
        (None, Some(_)) => s.list("shared_keys").into_iter().map(Secret::new).collect(),
        (None, None) => Vec::new(),
    };
    if shared_keys.is_empty() {
        file.warn(s.error(
            "shared_key",
            "not set: federation messages are neither signed nor authenticated",
        ));
    }
    let keys = PolicyKeys::read(&s)?;
    let policy = keys.policy(&s, general.device_state, general.presence)?;
    let PolicyKeys {
        include,
        exclude,
        never_send_names,
        unknown_as,
        down_state,
        device_template,
        origin_timeout,
        heartbeat_interval,
        ..
    } = keys;
    Ok(FederationConfig {
        transport,
        servers,
        shared_keys,
        include,
        exclude,
        never_send: never_send_names,
        unknown_as: unknown_as.as_str().to_owned(),
        device_template,
        origin_timeout,
        heartbeat_interval,
        down_state: down_state.as_str().to_owned(),
        policy,
    })
}

fn kafka(
    file: &ConfigFile,
    federation: &FederationConfig,
    asterisk: &mut AsteriskConfig,
    general: &GeneralConfig,
) -> Result<Option<KafkaSection>, ConfigError> {
    let s = file.section("kafka");
    // Every key with a dot is a librdkafka property; the others must be known.
    let unknown: Vec<String> = s
        .entries()
        .iter()
        .filter(|e| !e.key.contains('.') && !KAFKA.contains(&e.key.as_str()))
        .map(|e| e.key.clone())
        .collect();
    if let Some(k) = unknown.first() {
        return Err(s.error(
            k,
            format!(
                "unknown key (known: {}; librdkafka properties contain a dot)",
                KAFKA.join(", ")
            ),
        ));
    }
    let source_kafka = asterisk.source == Via::Kafka;
    if asterisk.apply == Via::Kafka {
        return Err(file.error("asterisk", "apply", "Kafka is one-way: use ami or zmq"));
    }
    let transport_kafka = federation.transport == "kafka";
    if !transport_kafka && !source_kafka {
        if s.exists() {
            file.warn(s.error(
                "brokers",
                "[kafka] is ignored: neither transport nor source is kafka",
            ));
        }
        return Ok(None);
    }
    let brokers = s.list("brokers").join(",");
    if transport_kafka && brokers.is_empty() {
        return Err(s.error(
            "brokers",
            "missing (required with [federation] transport = kafka)",
        ));
    }
    if source_kafka {
        if asterisk.kafka_brokers.is_none() {
            if brokers.is_empty() {
                return Err(file.error(
                    "asterisk",
                    "kafka_brokers",
                    "missing (required with source = kafka unless [kafka] brokers is set)",
                ));
            }
            asterisk.kafka_brokers = Some(brokers.clone());
        }
        if asterisk.kafka_system_name.is_none() && asterisk.kafka_entity_id.is_none() {
            asterisk.kafka_system_name = Some(general.name.clone());
        }
    }
    let topic = s.str("topic").unwrap_or(defaults::KAFKA_TOPIC).to_owned();
    let heartbeat_topic = s
        .str("heartbeat_topic")
        .unwrap_or(defaults::KAFKA_HEARTBEAT_TOPIC)
        .to_owned();
    if transport_kafka && topic == heartbeat_topic {
        return Err(s.error("heartbeat_topic", "must differ from topic"));
    }
    let properties = s
        .entries()
        .iter()
        .filter(|e| e.key.contains('.'))
        .map(|e| (e.key.clone(), Secret::new(e.value.clone())))
        .collect();
    Ok(Some(KafkaSection {
        brokers,
        topic,
        heartbeat_topic,
        properties,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
[general]
name = pbx-a
[asterisk]
username = hintfed
secret = s3cret
[federation]
servers = tcp://127.0.0.1:5560, tcp://127.0.0.1:5570
shared_key = k1
";

    fn load(text: &str) -> Result<AgentConfig, ConfigError> {
        let file = ConfigFile::parse("agent.ini", text, Vec::<(String, String)>::new(), SECTIONS)?;
        AgentConfig::from_file(&file)
    }

    fn err(text: &str) -> String {
        load(text).expect_err("should be refused").to_string()
    }

    #[test]
    fn name_defaults_to_the_host_name_with_one_warning() {
        let text = GOOD.replace("name = pbx-a\n", "");
        let file = ConfigFile::parse("agent.ini", &text, Vec::<(String, String)>::new(), SECTIONS)
            .expect("parse");
        let c = AgentConfig::from_file(&file).expect("valid without a name");
        let host = host_name().expect("this machine has a host name");
        assert_eq!(c.general.name, host);
        let w: Vec<String> = file.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(
            w,
            vec![format!(
                "config error: agent.ini: [general] name: not set; using the host name {host:?} as the origin name"
            )]
        );
        // An explicit name: no warning.
        let file = ConfigFile::parse("agent.ini", GOOD, Vec::<(String, String)>::new(), SECTIONS)
            .expect("parse");
        AgentConfig::from_file(&file).expect("valid");
        assert!(file.warnings().is_empty());
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = load(GOOD).expect("valid");
        assert_eq!(c.general.name, "pbx-a");
        assert_eq!(c.asterisk.source, Via::Ami);
        assert_eq!(c.asterisk.port, 5038);
        assert_eq!(c.asterisk.host, "127.0.0.1");
        assert_eq!(c.asterisk.request_timeout, Duration::from_millis(1000));
        assert_eq!(c.federation.servers.len(), 2);
        assert_eq!(c.federation.exclude.as_deref(), Some("^Custom:"));
        assert_eq!(c.federation.origin_timeout, Duration::from_secs(15));
        assert_eq!(c.federation.down_state, "UNAVAILABLE");
        assert_eq!(c.federation.keyring().len(), 1);
        let f = c.federation.device_filter();
        assert!(f.allows("PJSIP/100"));
        assert!(!f.allows("Custom:PJSIP/100"));
    }

    #[test]
    fn event_filters_follow_the_source_and_exclude() {
        let both = [FILTER_EXTENSION_STATUS, FILTER_CUSTOM_DEVICES];
        assert_eq!(load(GOOD).expect("valid").asterisk.event_filters, both);
        let with = |asterisk: &str, federation: &str| {
            let text = GOOD
                .replace("[asterisk]\n", &format!("[asterisk]\n{asterisk}"))
                .replace("[federation]\n", &format!("[federation]\n{federation}"));
            load(&text).expect("valid").asterisk.event_filters
        };
        assert_eq!(with("", "exclude = ^Custom:.*|^Local/\n"), both);
        assert!(with("filter_events = no\n", "").is_empty());
        // Custom: devices federated (or maybe): their events must keep coming.
        for exclude in ["^Local/", "^Custom:foo", "(^Custom:)", "^custom:"] {
            assert_eq!(
                with("", &format!("exclude = {exclude}\n")),
                [FILTER_EXTENSION_STATUS],
                "{exclude}"
            );
        }
        // Events that do not come over AMI are not filtered there.
        let zmq = "source = zmq\nzmq_evt = tcp://127.0.0.1:1\nzmq_cmd = tcp://127.0.0.1:2\n";
        assert!(with(zmq, "").is_empty());
        assert!(
            err(&GOOD.replace("[asterisk]\n", "[asterisk]\nfilter_events = maybe\n"))
                .contains("[asterisk] filter_events")
        );
    }

    #[test]
    fn drops_every_custom_is_sure_or_says_no() {
        for yes in [
            "^Custom:",
            "^Custom:.*",
            "^Custom:.+",
            "^Local/|^Custom:",
            "^Custom:|x",
        ] {
            assert!(drops_every_custom(yes), "{yes}");
        }
        for no in [
            "",
            " ^Custom:",
            "Custom:",
            "^Custom",
            "^Custom:a",
            "^(Custom:)",
            "[^]Custom:",
            "^Custom:\\d",
        ] {
            assert!(!drops_every_custom(no), "{no}");
        }
    }

    #[test]
    fn zmq_needs_no_ami_credentials() {
        let c = load(
            "[general]\nname = a\n[asterisk]\nsource = zmq\napply = zmq\nzmq_evt = tcp://127.0.0.1:1\nzmq_cmd = tcp://127.0.0.1:2\n[federation]\nservers = tcp://h:5560\n",
        )
        .expect("valid");
        assert_eq!(c.asterisk.source, Via::Zmq);
        assert!(!c.asterisk.uses_ami());
    }

    #[test]
    fn one_line_errors_name_file_section_key_problem() {
        let cases: &[(&str, &str)] = &[
            (
                "[general]\nname =\n[asterisk]\nusername=u\nsecret=s\n[federation]\nservers=tcp://h:1\nshared_key=k\n",
                "config error: agent.ini: [general] name: empty: give the origin name, or remove the key to use the host name",
            ),
            (
                &GOOD.replace("username = hintfed\n", "username = hintfed\nport = abc\n"),
                "config error: agent.ini: [asterisk] port: \"abc\" is not a port number (1-65535)",
            ),
            (
                &GOOD.replace(
                    "username = hintfed\n",
                    "username = hintfed\nsource = kafka\n",
                ),
                "config error: agent.ini: [asterisk] kafka_brokers: missing (required with source = kafka unless [kafka] brokers is set)",
            ),
            (
                &GOOD.replace("shared_key = k1\n", "transport = kafka\n"),
                "config error: agent.ini: [kafka] brokers: missing (required with [federation] transport = kafka)",
            ),
            (
                &GOOD.replace("servers = tcp://127.0.0.1:5560, tcp://127.0.0.1:5570\n", ""),
                "config error: agent.ini: [federation] servers: missing (required)",
            ),
            (
                &GOOD.replace("tcp://127.0.0.1:5570", "udp://x"),
                "config error: agent.ini: [federation] servers: \"udp://x\"",
            ),
            (
                &format!("{GOOD}include = ^PJSIP/(\n"),
                "config error: agent.ini: [federation] include: \"^PJSIP/(\" is not a valid regular expression",
            ),
            (
                &format!("{GOOD}down_state = SLEEPY\n"),
                "config error: agent.ini: [federation] down_state: \"SLEEPY\" is not a device state",
            ),
            (
                &format!("{GOOD}down_state = UNKNOWN\n"),
                "config error: agent.ini: [federation] down_state: cannot be UNKNOWN",
            ),
            (
                &format!("{GOOD}device_template = Foo:{{device}}\n"),
                "config error: agent.ini: [federation] device_template: invalid device_template",
            ),
            (
                &format!("{GOOD}origin_timeout = 15\n"),
                "config error: agent.ini: [federation] origin_timeout: \"15\" has no unit",
            ),
            (
                &format!("{GOOD}origin_timeout = 1s\n"),
                "config error: agent.ini: [federation] origin_timeout: must be more than twice",
            ),
            (
                &format!("{GOOD}shared_keys = a, b\n"),
                "config error: agent.ini: [federation] shared_keys: set either shared_key or shared_keys",
            ),
            (
                &format!("{GOOD}colour = blue\n"),
                "config error: agent.ini: [federation] colour: unknown key",
            ),
            (
                &GOOD.replace("secret = s3cret\n", ""),
                "config error: agent.ini: [asterisk] secret: missing (required for AMI",
            ),
            (
                &GOOD.replace("secret = s3cret\n", "secret = s\nzmq_cmd = nope\n"),
                "config error: agent.ini: [asterisk] zmq_cmd: \"nope\"",
            ),
            (
                &GOOD.replace(
                    "secret = s3cret\n",
                    "secret = s\ntls_ca_file = /nonexistent/ca.pem\n",
                ),
                "config error: agent.ini: [asterisk] tls_ca_file: /nonexistent/ca.pem is not a readable file",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "got {got:?}, want prefix {want:?}");
            assert!(!got.contains('\n'), "one line: {got:?}");
            assert!(
                !got.contains("s3cret") && !got.contains("k1,"),
                "no secret: {got}"
            );
        }
    }

    #[test]
    fn env_overrides_and_masking() {
        let file = ConfigFile::parse(
            "agent.ini",
            &GOOD.replace("secret = s3cret\n", ""),
            vec![
                ("HINTFED_ASTERISK_SECRET".to_owned(), "from-env".to_owned()),
                (
                    "HINTFED_FEDERATION_ORIGIN_TIMEOUT".to_owned(),
                    "3s".to_owned(),
                ),
            ],
            SECTIONS,
        )
        .expect("parse");
        let c = AgentConfig::from_file(&file).expect("valid");
        assert_eq!(
            c.asterisk.secret.as_ref().map(Secret::expose),
            Some("from-env")
        );
        assert_eq!(c.federation.origin_timeout, Duration::from_secs(3));
        let rendered = hintfed_daemon::config::render_ini(&c).expect("render");
        assert!(!rendered.contains("from-env"), "{rendered}");
        assert!(!rendered.contains("k1"), "{rendered}");
        assert!(rendered.contains("origin_timeout = 3s"), "{rendered}");
        assert!(!format!("{c:?}").contains("from-env"));
    }
}
