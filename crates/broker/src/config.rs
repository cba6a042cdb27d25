//! [`BrokerConfig`]: the `hintfed-broker` configuration. It reads the original
//! zmq-ami-broker format unchanged (its `example_config.ini` loads as is) plus hintfed's
//! additions, each in its own key. Every problem is one [`ConfigError`] line naming file,
//! `[section] key` and what is wrong (exit status 64); unknown keys and sections are warned
//! about, never silently ignored and never fatal (the original ignored them).
//!
//! ```ini
//! [general]
//! ; --- the original keys ---
//! device_state = yes        ; federate device states
//! presence = no             ; federate presence (CustomPresence:)
//! log_level = info          ; debug, info, warning, error
//! request_timeout = 1000    ; ms: one res_zmq_manager request (AMI actions get at least 5 s)
//! count_messages = no       ; log message counts every count_interval
//! verbose_messages = no     ; log every event and every update crossing the broker
//! ; --- hintfed additions ---
//! count_interval = 60s      ; period of the count_messages log lines
//! down_state = UNAVAILABLE  ; what a lost server's devices show on the others
//! origin_timeout = 15s      ; a relay silent this long counts as lost
//! include =                 ; one regex: devices to federate (default: every device)
//! exclude = ^Custom:        ; one regex: devices never federated
//! device_template = Custom:{device}
//! unknown_as = NOT_INUSE    ; written instead of UNKNOWN (Asterisk refuses it)
//! shutdown_grace = 5s
//!
//! [servers]
//! sections = server-1, server-2
//!
//! [server-1]                ; reached through res_zmq_manager
//! name = Console 1          ; origin name (default: the section name); unique
//! addr = 192.168.56.101
//! cmd_port = 33333          ; res_zmq_manager command (REP) port
//! evt_port = 44444          ; res_zmq_manager event (PUB) port
//! ami_trace = no            ; log this server's events and writes (like verbose_messages)
//!
//! [server-2]                ; reached over AMI TCP
//! name = Console 2
//! addr = 192.168.56.102
//! ami_port = 5038
//! username = hintfed
//! secret = ...              ; or HINTFED_SERVER_2_SECRET
//! tls = no                  ; + tls_ca_file, tls_server_name, tls_insecure
//! ; A section giving both kinds mixes them: events from res_zmq_manager, actions over AMI
//! ; by default; `events = ami|zmq` and `actions = ami|zmq` choose explicitly.
//!
//! [http]
//! listen = 127.0.0.1:9480
//! ```
//!
//! Each server section becomes a [`hintfed_agent::config::AsteriskConfig`], so the broker
//! reaches Asterisk with exactly the agent's code ([`hintfed_agent::agent::pbx_config`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use hintfed_agent::config::{AsteriskConfig, PolicyKeys, Via, event_filters};
use hintfed_agent::relay::DeviceFilter;
use hintfed_core::{Policy, PolicyConfig};
use hintfed_daemon::config::{ConfigError, ConfigFile, Section, ser};
use hintfed_daemon::run::{GENERAL_KEYS, HTTP_KEYS};
use serde::Serialize;

/// Every default of the broker configuration. The federation policy keys (down_state,
/// unknown_as, include/exclude, device_template, origin_timeout, heartbeat_interval) are read
/// by [`PolicyKeys`] with the agent's defaults (`hintfed_agent::config::defaults`).
pub mod defaults {
    use std::time::Duration;

    /// `[general] request_timeout` (the original's default).
    pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
    /// `[general] count_interval`.
    pub const COUNT_INTERVAL: Duration = Duration::from_secs(60);
    /// `[general] bus_capacity`.
    pub const BUS_CAPACITY: usize = 8192;
    /// AMI port when `tls = yes` and `ami_port` is not given.
    pub const TLS_PORT: u16 = 5039;
}

/// Sections an environment variable may create (server sections exist in the file).
pub const ENV_SECTIONS: &[&str] = &["general", "servers", "http"];

/// Keys of `[general]` in the original format.
pub const ORIGINAL_GENERAL: &[&str] = &[
    "device_state",
    "presence",
    "log_level",
    "request_timeout",
    "count_messages",
    "verbose_messages",
];
/// Keys of `[general]` added by hintfed.
pub const ADDED_GENERAL: &[&str] = &[
    "count_interval",
    "down_state",
    "origin_timeout",
    "heartbeat_interval",
    "include",
    "exclude",
    "device_template",
    "unknown_as",
    "never_send",
    "bus_capacity",
    "filter_events",
];
/// Keys of a server section in the original format.
pub const ORIGINAL_SERVER: &[&str] = &["name", "addr", "cmd_port", "evt_port", "ami_trace"];
/// Keys of a server section added by hintfed (AMI TCP and the explicit mix).
pub const ADDED_SERVER: &[&str] = &[
    "ami_port",
    "username",
    "secret",
    "tls",
    "tls_ca_file",
    "tls_server_name",
    "tls_insecure",
    "events",
    "actions",
];

/// `[general]`.
#[derive(Debug, Clone, Serialize)]
pub struct GeneralConfig {
    /// Federate device states.
    pub device_state: bool,
    /// Federate presence.
    pub presence: bool,
    /// Timeout of one res_zmq_manager request (and the base of AMI action timeouts).
    #[serde(serialize_with = "ser::duration")]
    pub request_timeout: Duration,
    /// Log message counts every `count_interval`.
    pub count_messages: bool,
    /// Log every event and every update crossing the broker.
    pub verbose_messages: bool,
    /// Period of the `count_messages` lines.
    #[serde(serialize_with = "ser::duration")]
    pub count_interval: Duration,
    /// What a lost server's devices show on the others.
    pub down_state: String,
    /// A relay silent this long counts as lost.
    #[serde(serialize_with = "ser::duration")]
    pub origin_timeout: Duration,
    /// Heartbeat period of the relays.
    #[serde(serialize_with = "ser::duration")]
    pub heartbeat_interval: Duration,
    /// Include regex.
    pub include: Option<String>,
    /// Exclude regex.
    pub exclude: Option<String>,
    /// Local name of a remote device.
    pub device_template: String,
    /// Written instead of UNKNOWN.
    pub unknown_as: String,
    /// States never sent.
    pub never_send: Vec<String>,
    /// Inbound queue of each relay on the in-process bus.
    pub bus_capacity: usize,
    /// Ask each Asterisk (AMI `Filter`) not to send the events the broker ignores, as the
    /// agent's `[asterisk] filter_events` does.
    pub filter_events: bool,
    #[serde(skip)]
    policy: PolicyConfig,
}

impl GeneralConfig {
    /// The node policy (include/exclude left to the relay's [`DeviceFilter`], as in the agent).
    pub fn node_policy(&self) -> Policy {
        Policy::new(PolicyConfig {
            include: Vec::new(),
            exclude: Vec::new(),
            ..self.policy.clone()
        })
        .expect("validated when the configuration was loaded")
    }

    /// The include/exclude filter of each server's devices.
    pub fn device_filter(&self) -> DeviceFilter {
        DeviceFilter::new(self.include.as_deref(), self.exclude.as_deref())
            .expect("validated when the configuration was loaded")
    }
}

/// One `[servers] sections` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// The section name.
    pub section: String,
    /// Origin name (`name`, default the section name).
    pub name: String,
    /// How it is reached (the agent's `[asterisk]` settings).
    pub asterisk: AsteriskConfig,
    /// Log this server's traffic.
    pub ami_trace: bool,
}

/// The whole broker configuration. Serializes (for `--check-config`) in the file's own
/// shape: `[general]`, `[servers] sections`, then one section per server, secrets masked.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `[general]`.
    pub general: GeneralConfig,
    /// The servers, in `[servers] sections` order.
    pub servers: Vec<ServerConfig>,
}

impl BrokerConfig {
    /// Reads and validates `file` (unknown keys and sections recorded as warnings).
    pub fn from_file(file: &ConfigFile) -> Result<Self, ConfigError> {
        let general = general(file)?;
        let list = file.section("servers");
        list.warn_unknown_keys(&["sections"]);
        let sections = list.list("sections");
        if sections.is_empty() {
            return Err(list.error(
                "sections",
                "missing (required): the comma-separated list of server sections",
            ));
        }
        let mut seen_sections = BTreeSet::new();
        let mut seen_names = BTreeSet::new();
        let mut servers = Vec::new();
        for name in &sections {
            if !seen_sections.insert(name.clone()) {
                return Err(list.error("sections", format!("{name:?} is listed twice")));
            }
            if !file.has_section(name) {
                return Err(list.error(
                    "sections",
                    format!("{name:?} is listed but the file has no [{name}] section"),
                ));
            }
            let s = server(file, name, &general)?;
            if !seen_names.insert(s.name.clone()) {
                return Err(file.error(
                    name,
                    "name",
                    format!("{:?} is already the name of another server", s.name),
                ));
            }
            servers.push(s);
        }
        let mut known: Vec<&str> = vec!["general", "servers", "http"];
        known.extend(sections.iter().map(String::as_str));
        for e in file.unknown_sections(&known) {
            file.warn(ConfigError {
                problem: "unknown section (not listed in [servers] sections); ignored".into(),
                ..e
            });
        }
        file.section("http").warn_unknown_keys(HTTP_KEYS);
        Ok(BrokerConfig { general, servers })
    }
}

#[derive(Serialize)]
struct ServersView {
    sections: String,
}

#[derive(Serialize)]
struct ServerView<'a> {
    name: &'a str,
    addr: &'a str,
    events: Via,
    actions: Via,
    #[serde(skip_serializing_if = "Option::is_none")]
    evt_port: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmd_port: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ami_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a hintfed_daemon::config::Secret>,
    tls: bool,
    ami_trace: bool,
}

fn port_of(endpoint: &str) -> Option<&str> {
    endpoint.rsplit(':').next().filter(|p| *p != "0")
}

impl Serialize for BrokerConfig {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = ser.serialize_map(Some(2 + self.servers.len()))?;
        m.serialize_entry("general", &self.general)?;
        m.serialize_entry(
            "servers",
            &ServersView {
                sections: self
                    .servers
                    .iter()
                    .map(|s| s.section.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            },
        )?;
        for s in &self.servers {
            let a = &s.asterisk;
            let uses_ami = a.uses_ami();
            m.serialize_entry(
                &s.section,
                &ServerView {
                    name: &s.name,
                    addr: &a.host,
                    events: a.source,
                    actions: a.apply,
                    evt_port: port_of(&a.zmq_evt),
                    cmd_port: port_of(&a.zmq_cmd),
                    ami_port: uses_ami.then_some(a.port),
                    username: a.username.as_deref(),
                    secret: a.secret.as_ref(),
                    tls: a.tls,
                    ami_trace: s.ami_trace,
                },
            )?;
        }
        m.end()
    }
}

fn general(file: &ConfigFile) -> Result<GeneralConfig, ConfigError> {
    let s = file.section("general");
    let known: Vec<&str> = ORIGINAL_GENERAL
        .iter()
        .chain(ADDED_GENERAL)
        .chain(GENERAL_KEYS)
        .copied()
        .collect();
    s.warn_unknown_keys(&known);
    let request_timeout = s.duration_ms_or("request_timeout", defaults::REQUEST_TIMEOUT)?;
    if request_timeout.is_zero() {
        return Err(s.error("request_timeout", "must be greater than 0"));
    }
    let count_interval = s.duration_or("count_interval", defaults::COUNT_INTERVAL)?;
    if count_interval < Duration::from_millis(100) {
        return Err(s.error("count_interval", "must be at least 100ms"));
    }
    let keys = PolicyKeys::read(&s)?;
    let bus_capacity = match s.number::<usize>("bus_capacity")? {
        None => defaults::BUS_CAPACITY,
        Some(n) if n < 16 => return Err(s.error("bus_capacity", "must be at least 16")),
        Some(n) => n,
    };
    let device_state = s.bool_or("device_state", true)?;
    let presence = s.bool_or("presence", false)?;
    let policy = keys.policy(&s, device_state, presence)?;
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
    Ok(GeneralConfig {
        device_state,
        presence,
        request_timeout,
        count_messages: s.bool_or("count_messages", false)?,
        verbose_messages: s.bool_or("verbose_messages", false)?,
        count_interval,
        down_state: down_state.as_str().to_owned(),
        origin_timeout,
        heartbeat_interval,
        include,
        exclude,
        device_template,
        unknown_as: unknown_as.as_str().to_owned(),
        never_send: never_send_names,
        bus_capacity,
        filter_events: s.bool_or("filter_events", true)?,
        policy,
    })
}

fn via(s: &Section<'_>, key: &str) -> Result<Option<Via>, ConfigError> {
    Ok(match s.one_of(key, &["ami", "zmq"])? {
        None => None,
        Some("zmq") => Some(Via::Zmq),
        Some(_) => Some(Via::Ami),
    })
}

fn server(
    file: &ConfigFile,
    section: &str,
    general: &GeneralConfig,
) -> Result<ServerConfig, ConfigError> {
    let s = file.section(section);
    let known: Vec<&str> = ORIGINAL_SERVER
        .iter()
        .chain(ADDED_SERVER)
        .copied()
        .collect();
    s.warn_unknown_keys(&known);
    let name = s.str("name").unwrap_or(section).trim().to_owned();
    if name.len() > 128 {
        return Err(s.error("name", "longer than 128 bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(s.error("name", "must not contain control characters"));
    }
    let addr = s.required("addr")?.trim().to_owned();
    if addr.is_empty() || addr.contains(char::is_whitespace) || addr.contains('/') {
        return Err(s.error("addr", format!("{addr:?} is not a host name or address")));
    }
    let cmd_port = s.port("cmd_port")?;
    let evt_port = s.port("evt_port")?;
    let tls = s.bool_or("tls", false)?;
    let ami_port = match s.port("ami_port")? {
        Some(p) => Some(p),
        // `tls = yes` or AMI credentials without a port: the default AMI port.
        None if tls || s.str("username").is_some() => {
            Some(if tls { defaults::TLS_PORT } else { 5038 })
        }
        None => None,
    };
    let has_zmq = cmd_port.is_some() || evt_port.is_some();
    let has_ami = ami_port.is_some();
    if !has_zmq && !has_ami {
        return Err(s.error(
            "cmd_port",
            "missing: give cmd_port and evt_port (res_zmq_manager), or ami_port, username and secret (AMI over TCP)",
        ));
    }
    // Defaults: what is configured; with both, events from res_zmq_manager and actions over
    // AMI (AMI answers Getvar, which crashes Asterisk through res_zmq_manager).
    let events = match via(&s, "events")? {
        Some(v) => v,
        None if evt_port.is_some() || !has_ami => Via::Zmq,
        None => Via::Ami,
    };
    let actions = match via(&s, "actions")? {
        Some(v) => v,
        None if has_ami => Via::Ami,
        None => Via::Zmq,
    };
    if events == Via::Zmq && evt_port.is_none() {
        return Err(s.error(
            "evt_port",
            "missing: events come from res_zmq_manager, whose event (PUB) port is required",
        ));
    }
    if actions == Via::Zmq && cmd_port.is_none() {
        return Err(s.error(
            "cmd_port",
            "missing: actions go to res_zmq_manager, whose command (REP) port is required",
        ));
    }
    let uses_ami = events == Via::Ami || actions == Via::Ami;
    let (username, secret) = if uses_ami {
        if ami_port.is_none() {
            return Err(s.error(
                "ami_port",
                "missing: required when events or actions use AMI",
            ));
        }
        let username = s.required("username")?.to_owned();
        let secret = s.secret("secret").ok_or_else(|| {
            let var = format!(
                "HINTFED_{}_SECRET",
                section
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    })
                    .collect::<String>()
            );
            s.error(
                "secret",
                format!("missing (required for AMI; may come from {var})"),
            )
        })?;
        (Some(username), Some(secret))
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
    let host_for_url = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.clone()
    };
    let asterisk = AsteriskConfig {
        source: events,
        apply: actions,
        host: addr.clone(),
        port: ami_port.unwrap_or(5038),
        username,
        secret,
        tls,
        tls_ca_file,
        tls_server_name: s.string("tls_server_name"),
        tls_insecure: s.bool_or("tls_insecure", false)?,
        zmq_evt: format!("tcp://{host_for_url}:{}", evt_port.unwrap_or(0)),
        zmq_cmd: format!("tcp://{host_for_url}:{}", cmd_port.unwrap_or(0)),
        request_timeout: general.request_timeout,
        filter_events: general.filter_events,
        event_filters: event_filters(events, general.filter_events, general.exclude.as_deref()),
        // The broker reaches its servers over AMI or res_zmq_manager only.
        kafka_topic: hintfed_agent::config::defaults::KAFKA_SOURCE_TOPIC.to_owned(),
        kafka_brokers: None,
        kafka_system_name: None,
        kafka_entity_id: None,
    };
    Ok(ServerConfig {
        section: section.to_owned(),
        name,
        asterisk,
        ami_trace: s.bool_or("ami_trace", false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte for byte the original zmq-ami-broker `example_config.ini` (no final newline).
    pub(crate) const ORIGINAL: &str = "[general]\ndevice_state = yes\npresence = no\n;debug, info, warning, error\nlog_level = info\nrequest_timeout = 1000\ncount_messages  = no\nverbose_messages = no\n\n[servers]\nsections = server-1, server-2\n\n[server-1]\nname = Console 1\naddr = 192.168.56.101\ncmd_port = 33333\nevt_port = 44444\nami_trace = no\n\n[server-2]\nname = Console 2\naddr = 192.168.56.101\ncmd_port = 44444\nevt_port = 33333\nami_trace = no";

    fn load(text: &str) -> Result<BrokerConfig, ConfigError> {
        let file = ConfigFile::parse(
            "broker.ini",
            text,
            Vec::<(String, String)>::new(),
            ENV_SECTIONS,
        )?;
        BrokerConfig::from_file(&file)
    }

    fn err(text: &str) -> String {
        load(text).expect_err("should be refused").to_string()
    }

    #[test]
    fn original_file_loads() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/zmq-ami-broker/example_config.ini");
        if let Ok(text) = std::fs::read_to_string(&fixture) {
            assert_eq!(text, ORIGINAL, "the embedded copy matches the fixture");
        }
        let file = ConfigFile::parse(
            "example_config.ini",
            ORIGINAL,
            Vec::<(String, String)>::new(),
            ENV_SECTIONS,
        )
        .expect("parse");
        let c = BrokerConfig::from_file(&file).expect("valid");
        assert!(file.warnings().is_empty(), "{:?}", file.warnings());
        assert!(c.general.device_state && !c.general.presence);
        assert_eq!(c.general.request_timeout, Duration::from_millis(1000));
        assert_eq!(c.servers.len(), 2);
        let s = &c.servers[0];
        assert_eq!(
            (s.section.as_str(), s.name.as_str()),
            ("server-1", "Console 1")
        );
        assert_eq!(s.asterisk.source, Via::Zmq);
        assert_eq!(s.asterisk.apply, Via::Zmq);
        assert_eq!(s.asterisk.zmq_cmd, "tcp://192.168.56.101:33333");
        assert_eq!(s.asterisk.zmq_evt, "tcp://192.168.56.101:44444");
        assert_eq!(c.servers[1].asterisk.zmq_cmd, "tcp://192.168.56.101:44444");
    }

    #[test]
    fn annotated_example_loads_without_warnings() {
        let file = ConfigFile::parse(
            "example_broker.ini",
            include_str!("../example_broker.ini"),
            Vec::<(String, String)>::new(),
            ENV_SECTIONS,
        )
        .expect("parse");
        let c = BrokerConfig::from_file(&file).expect("valid");
        assert!(file.warnings().is_empty(), "{:?}", file.warnings());
        assert_eq!(c.servers.len(), 3);
        assert_eq!(c.servers[2].asterisk.source, Via::Zmq);
        assert_eq!(c.servers[2].asterisk.apply, Via::Ami);
        assert!(c.general.presence);
    }

    #[test]
    fn ami_and_mixed_sections() {
        let c = load(
            "[servers]\nsections = a, b, c\n[a]\naddr = 10.0.0.1\nami_port = 5038\nusername = u\nsecret = s\n\
             [b]\nname = B\naddr = 10.0.0.2\nevt_port = 1\ncmd_port = 2\nami_port = 5038\nusername = u\nsecret = s\n\
             [c]\naddr = 10.0.0.3\nevt_port = 1\ncmd_port = 2\nami_port = 5038\nusername = u\nsecret = s\nevents = ami\nactions = zmq\n",
        )
        .expect("valid");
        let a = &c.servers[0].asterisk;
        assert_eq!((a.source, a.apply, a.port), (Via::Ami, Via::Ami, 5038));
        assert_eq!(c.servers[0].name, "a");
        let b = &c.servers[1].asterisk;
        assert_eq!((b.source, b.apply), (Via::Zmq, Via::Ami));
        let cc = &c.servers[2].asterisk;
        assert_eq!((cc.source, cc.apply), (Via::Ami, Via::Zmq));
        assert!(
            !c.general.presence,
            "presence off by default, as in the original"
        );
        // Events over AMI are filtered like the agent's (default exclude ^Custom:); over
        // res_zmq_manager there is nothing to ask.
        let both = [
            hintfed_agent::config::FILTER_EXTENSION_STATUS,
            hintfed_agent::config::FILTER_CUSTOM_DEVICES,
        ];
        assert_eq!(a.event_filters, both);
        assert!(b.event_filters.is_empty());
        assert_eq!(cc.event_filters, both);
        let off = load(
            "[general]\nfilter_events = no\n[servers]\nsections = a\n[a]\naddr = 10.0.0.1\nami_port = 5038\nusername = u\nsecret = s\n",
        )
        .expect("valid");
        assert!(off.servers[0].asterisk.event_filters.is_empty());
    }

    #[test]
    fn unknown_keys_and_sections_are_warned_about() {
        let file = ConfigFile::parse(
            "broker.ini",
            &format!("{ORIGINAL}\ncolour = blue\n[extra]\nx = 1\n"),
            Vec::<(String, String)>::new(),
            ENV_SECTIONS,
        )
        .expect("parse");
        BrokerConfig::from_file(&file).expect("still valid");
        let w: Vec<String> = file.warnings().iter().map(ToString::to_string).collect();
        assert!(
            w.iter()
                .any(|w| w.contains("[server-2] colour: unknown key")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w.contains("[extra]") && w.contains("unknown section")),
            "{w:?}"
        );
    }

    #[test]
    fn one_line_errors() {
        let cases: Vec<(String, &str)> = vec![
            (
                ORIGINAL.replace("request_timeout = 1000", "request_timeout = soon"),
                "config error: broker.ini: [general] request_timeout: \"soon\"",
            ),
            (
                ORIGINAL.replace("cmd_port = 33333", "cmd_port = 99999"),
                "config error: broker.ini: [server-1] cmd_port: \"99999\" is not a port number",
            ),
            (
                ORIGINAL.replace(
                    "sections = server-1, server-2",
                    "sections = server-1, server-3",
                ),
                "config error: broker.ini: [servers] sections: \"server-3\" is listed but the file has no [server-3] section",
            ),
            (
                ORIGINAL.replace("sections = server-1, server-2", ""),
                "config error: broker.ini: [servers] sections: missing",
            ),
            (
                ORIGINAL.replace("name = Console 2", "name = Console 1"),
                "config error: broker.ini: [server-2] name: \"Console 1\" is already",
            ),
            (
                ORIGINAL.replace(
                    "addr = 192.168.56.101\ncmd_port = 44444",
                    "cmd_port = 44444",
                ),
                "config error: broker.ini: [server-2] addr: missing",
            ),
            (
                ORIGINAL.replace("device_state = yes", "device_state = maybe"),
                "config error: broker.ini: [general] device_state: \"maybe\"",
            ),
            (ORIGINAL.replace("log_level = info", "log_level = loud"), ""),
            (
                format!("{ORIGINAL}\nami_port = 5038\nusername = u\n"),
                "config error: broker.ini: [server-2] secret: missing (required for AMI; may come from HINTFED_SERVER_2_SECRET)",
            ),
            (
                ORIGINAL.replace("presence = no", "presence = no\ndown_state = SLEEPY"),
                "config error: broker.ini: [general] down_state: \"SLEEPY\" is not a device state",
            ),
            (
                ORIGINAL.replace("cmd_port = 33333\nevt_port = 44444\n", ""),
                "config error: broker.ini: [server-1] cmd_port: missing: give cmd_port and evt_port",
            ),
            (
                ORIGINAL.replace("evt_port = 44444\n", ""),
                "config error: broker.ini: [server-1] evt_port: missing",
            ),
        ];
        for (text, want) in cases {
            if want.is_empty() {
                // log_level is checked by hintfed-daemon's common config, not here.
                continue;
            }
            let got = err(&text);
            assert!(got.starts_with(want), "got {got:?}, want prefix {want:?}");
            assert!(!got.contains('\n'));
        }
    }

    #[test]
    fn secrets_from_env_and_masked() {
        let file = ConfigFile::parse(
            "broker.ini",
            "[servers]\nsections = pbx-a\n[pbx-a]\naddr = 127.0.0.1\nami_port = 5038\nusername = u\n",
            vec![("HINTFED_PBX_A_SECRET".to_owned(), "from-env".to_owned())],
            ENV_SECTIONS,
        )
        .expect("parse");
        let c = BrokerConfig::from_file(&file).expect("valid");
        let rendered = hintfed_daemon::config::render_ini(&c).expect("render");
        assert!(!rendered.contains("from-env"), "{rendered}");
        assert!(!format!("{c:?}").contains("from-env"));
    }
}
