//! The server's typed configuration, read from the INI file through `hintfed-daemon`.
//!
//! ```ini
//! [general]
//! log_level = info
//!
//! [federation]
//! shared_key = ...          ; or shared_keys = k1, k2 (the first signs; any verifies)
//! origin_timeout = 15s      ; an origin silent this long is announced down
//! down_state = UNAVAILABLE  ; what legacy agents are told a down origin's devices are
//!
//! [server]
//! name = hub-1                         ; this hub's name on the wire, unique among hubs and
//!                                      ; agents (default hub@<host>:<port>)
//! listen = tcp://0.0.0.0:5560          ; ROUTER on P, PUB on P+1
//! snapshot_chunk = 1000                ; most entries per snapshot chunk
//! max_message_bytes = 65536            ; largest accepted federation message
//! heartbeat_interval = 1s              ; hub heartbeats on the PUB
//! fanout_linger = 1ms                  ; writes to a subscriber getting > 5,000 msg/s are
//!                                      ; this far apart (0ms: every message at once)
//! legacy_pull = tcp://0.0.0.0:55556    ; zmq-ami-broker compatibility (both or neither)
//! legacy_pub = tcp://0.0.0.0:55555
//! legacy_timeout = 60s                 ; optional: a silent legacy agent goes down
//!
//! [http]
//! listen = 127.0.0.1:9481
//! ```
//!
//! Unknown-key policy: `[server]` belongs to the server alone, so an unknown key there is an
//! error. `[general]` and `[federation]` may be shared with an agent's file: the agent's keys
//! named in issue 4 are accepted (and ignored); any other key there is a warning, logged at
//! start and printed by `--check-config`. `[http]` is strict. Other sections (`[asterisk]`,
//! ...) are ignored. Every value is validated before anything is bound.

use std::time::Duration;

use hintfed_core::{DeviceState, Key, KeyRing};
use hintfed_daemon::config::{ConfigError, ConfigFile, Secret, ser};
use hintfed_daemon::run::{GENERAL_KEYS, HTTP_KEYS};
use hintfed_transport::link::parse_tcp_endpoint;
use serde::Serialize;

/// Sections the server reads; `HINTFED_<SECTION>_<KEY>` may create them.
pub const ENV_SECTIONS: &[&str] = &["general", "federation", "server", "http"];

/// Keys of `[general]` the server reads (beside the common ones).
const SERVER_GENERAL_KEYS: &[&str] = &[];
/// Agent keys of `[general]` accepted and ignored in a shared file.
const AGENT_GENERAL_KEYS: &[&str] = &["name", "device_state", "presence"];
/// Keys of `[federation]` the server reads.
const SERVER_FEDERATION_KEYS: &[&str] =
    &["shared_key", "shared_keys", "origin_timeout", "down_state"];
/// Agent keys of `[federation]` accepted and ignored in a shared file.
const AGENT_FEDERATION_KEYS: &[&str] = &[
    "transport",
    "servers",
    "include",
    "exclude",
    "device_template",
    "presence_include",
    "presence_exclude",
    "never_send",
    "unknown_as",
    "heartbeat_interval",
];
/// Keys of `[server]`.
const SERVER_KEYS: &[&str] = &[
    "name",
    "listen",
    "snapshot_chunk",
    "max_message_bytes",
    "heartbeat_interval",
    "fanout_linger",
    "legacy_pull",
    "legacy_pub",
    "legacy_timeout",
];

/// Default `[server] listen`.
pub const DEFAULT_LISTEN: &str = "tcp://0.0.0.0:5560";
/// Default `[federation] origin_timeout`.
pub const DEFAULT_ORIGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Default `[server] fanout_linger`.
pub const DEFAULT_FANOUT_LINGER: Duration = hintfed_transport::hub::DEFAULT_FANOUT_LINGER;
/// Largest `[server] fanout_linger`.
const MAX_FANOUT_LINGER: Duration = Duration::from_millis(100);
/// Default `[server] heartbeat_interval`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Default `[server] snapshot_chunk`.
pub const DEFAULT_SNAPSHOT_CHUNK: usize = 1000;
/// Default `[server] max_message_bytes` (the core's default limit).
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

/// `[general]` as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeneralConfig {
    /// The hub's name: the origin of its heartbeats and notices. Must differ from every
    /// agent's origin name and from every other hub's (default `hub@<hostname>:<port>`).
    pub name: String,
}

/// `[federation]` as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationConfig {
    /// Shared keys; the first signs, any verifies. Empty: authentication off (warned).
    pub shared_keys: Vec<Secret>,
    /// An origin silent this long is announced down.
    #[serde(serialize_with = "ser::duration")]
    pub origin_timeout: Duration,
    /// State legacy agents are told for the devices of a down origin.
    #[serde(serialize_with = "ser_state")]
    pub down_state: DeviceState,
}

/// The zmq-ami-broker compatibility sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LegacyConfig {
    /// The PULL legacy agents PUSH to.
    #[serde(rename = "legacy_pull")]
    pub pull: String,
    /// The PUB legacy agents subscribe to.
    #[serde(rename = "legacy_pub")]
    pub publish: String,
    /// A legacy agent silent this long stops being heartbeated (its devices go down
    /// everywhere); `None`: heartbeated for as long as the hub runs (legacy agents only speak
    /// on changes).
    #[serde(rename = "legacy_timeout", serialize_with = "ser::opt_duration")]
    pub timeout: Option<Duration>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenConfig {
    /// `tcp://host:P`: ROUTER on P, PUB on P+1 (port 0: any free pair, for tests).
    pub listen: String,
    /// Most entries plus origin summaries in one snapshot chunk.
    pub snapshot_chunk: usize,
    /// Largest accepted (and sent) federation message, bytes.
    pub max_message_bytes: usize,
    /// Period of the hub's heartbeats.
    #[serde(serialize_with = "ser::duration")]
    pub heartbeat_interval: Duration,
    /// The least time between two writes to a subscriber whose fan-out comes faster than
    /// 5,000 messages a second (zero: every message written at once); see
    /// `hintfed_transport::HubBindConfig::fanout_linger`.
    #[serde(serialize_with = "ser::duration")]
    pub fanout_linger: Duration,
    /// Legacy sockets, when both `legacy_pull` and `legacy_pub` are set.
    #[serde(flatten)]
    pub legacy: Option<LegacyConfig>,
}

/// The whole typed configuration of `hintfed-server`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerConfig {
    /// `[general]`.
    pub general: GeneralConfig,
    /// `[federation]`.
    pub federation: FederationConfig,
    /// `[server]`.
    pub server: ListenConfig,
}

fn ser_state<S: serde::Serializer>(s: &DeviceState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str())
}

impl ServerConfig {
    /// Defaults for an in-process server named `name` listening on `listen` (tests, tools).
    pub fn new(name: impl Into<String>, listen: impl Into<String>) -> Self {
        ServerConfig {
            general: GeneralConfig { name: name.into() },
            federation: FederationConfig {
                shared_keys: Vec::new(),
                origin_timeout: DEFAULT_ORIGIN_TIMEOUT,
                down_state: DeviceState::Unavailable,
            },
            server: ListenConfig {
                listen: listen.into(),
                snapshot_chunk: DEFAULT_SNAPSHOT_CHUNK,
                max_message_bytes: DEFAULT_MAX_MESSAGE,
                heartbeat_interval: DEFAULT_HEARTBEAT,
                fanout_linger: DEFAULT_FANOUT_LINGER,
                legacy: None,
            },
        }
    }

    /// The key ring built from `shared_keys`.
    pub fn key_ring(&self) -> KeyRing {
        KeyRing::new(
            self.federation
                .shared_keys
                .iter()
                .map(|s| Key::new(None, s.expose().as_bytes()))
                .collect(),
        )
    }
}

/// `hub@<hostname>:<port>` (the port keeps two hubs on one host apart), `hub` without a
/// hostname.
fn default_name(port: u16) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.len() <= 100 && !h.chars().any(char::is_control));
    match (host, port) {
        (Some(h), 0) => format!("hub@{h}"),
        (Some(h), p) => format!("hub@{h}:{p}"),
        (None, 0) => "hub".to_owned(),
        (None, p) => format!("hub:{p}"),
    }
}

fn check_endpoint(v: &str, need_next_port: bool) -> Result<String, String> {
    let (_, port) = parse_tcp_endpoint(v).map_err(|e| e.to_string())?;
    if need_next_port && port == u16::MAX {
        return Err(format!(
            "{v:?}: port {port} leaves no room for the PUB on port P+1"
        ));
    }
    Ok(v.to_owned())
}

fn endpoint_port(v: &str) -> Option<u16> {
    parse_tcp_endpoint(v).ok().map(|(_, p)| p)
}

/// Reads and validates the server's sections of `file` (see the module docs).
pub fn load(file: &ConfigFile) -> Result<ServerConfig, ConfigError> {
    let general = file.section("general");
    let known_general: Vec<&str> = GENERAL_KEYS
        .iter()
        .chain(SERVER_GENERAL_KEYS)
        .chain(AGENT_GENERAL_KEYS)
        .copied()
        .collect();
    general.warn_unknown_keys(&known_general);
    let fed = file.section("federation");
    let known_fed: Vec<&str> = SERVER_FEDERATION_KEYS
        .iter()
        .chain(AGENT_FEDERATION_KEYS)
        .copied()
        .collect();
    fed.warn_unknown_keys(&known_fed);
    let shared_keys = match (fed.secret("shared_key"), fed.str("shared_keys")) {
        (Some(_), Some(_)) => {
            return Err(fed.error(
                "shared_keys",
                "set either shared_key or shared_keys, not both",
            ));
        }
        (Some(k), None) => vec![k],
        (None, Some(_)) => fed
            .list("shared_keys")
            .into_iter()
            .map(Secret::new)
            .collect(),
        (None, None) => Vec::new(),
    };
    let origin_timeout = fed.duration_or("origin_timeout", DEFAULT_ORIGIN_TIMEOUT)?;
    if origin_timeout < Duration::from_millis(100) {
        return Err(fed.error("origin_timeout", "must be at least 100ms"));
    }
    let down_state = fed
        .parse_with("down_state", |v| {
            v.parse::<DeviceState>()
                .map_err(|_| format!("{v:?} is not an Asterisk device state (e.g. UNAVAILABLE)"))
        })?
        .unwrap_or(DeviceState::Unavailable);

    let srv = file.section("server");
    srv.reject_unknown_keys(SERVER_KEYS)?;
    // The hub's name lives in [server]: in a file shared with an agent, [general] name is the
    // agent's origin name, and a hub must never take it.
    let name = match srv.str("name") {
        None => None,
        Some(n) => {
            if n.len() > 128 || n.chars().any(char::is_control) {
                return Err(srv.error(
                    "name",
                    "must be at most 128 bytes without control characters",
                ));
            }
            Some(n.to_owned())
        }
    };
    let listen = srv
        .parse_with("listen", |v| check_endpoint(v, true))?
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let snapshot_chunk = match srv.number::<usize>("snapshot_chunk")? {
        None => DEFAULT_SNAPSHOT_CHUNK,
        Some(n) if (1..=100_000).contains(&n) => n,
        Some(_) => return Err(srv.error("snapshot_chunk", "must be between 1 and 100000")),
    };
    let max_message_bytes = match srv.number::<usize>("max_message_bytes")? {
        None => DEFAULT_MAX_MESSAGE,
        Some(n) if (4096..=16 * 1024 * 1024).contains(&n) => n,
        Some(_) => {
            return Err(srv.error("max_message_bytes", "must be between 4096 and 16777216"));
        }
    };
    let heartbeat_interval = srv.duration_or("heartbeat_interval", DEFAULT_HEARTBEAT)?;
    if heartbeat_interval < Duration::from_millis(10) {
        return Err(srv.error("heartbeat_interval", "must be at least 10ms"));
    }
    if heartbeat_interval >= origin_timeout {
        return Err(srv.error(
            "heartbeat_interval",
            format!(
                "must be shorter than [federation] origin_timeout ({})",
                humantime::format_duration(origin_timeout)
            ),
        ));
    }
    let fanout_linger = srv.duration_or("fanout_linger", DEFAULT_FANOUT_LINGER)?;
    if fanout_linger > MAX_FANOUT_LINGER {
        return Err(srv.error("fanout_linger", "must be at most 100ms"));
    }
    let pull = srv.parse_with("legacy_pull", |v| check_endpoint(v, false))?;
    let publish = srv.parse_with("legacy_pub", |v| check_endpoint(v, false))?;
    let legacy_timeout = srv.duration("legacy_timeout")?;
    let legacy = match (pull, publish) {
        (Some(pull), Some(publish)) => {
            let base = endpoint_port(&listen).unwrap_or(0);
            let taken = |p: Option<u16>| {
                p.is_some_and(|p| p != 0 && base != 0 && (p == base || p == base.wrapping_add(1)))
            };
            if taken(endpoint_port(&pull)) {
                return Err(srv.error("legacy_pull", "uses the port of listen (P or P+1)"));
            }
            if taken(endpoint_port(&publish)) {
                return Err(srv.error("legacy_pub", "uses the port of listen (P or P+1)"));
            }
            if pull == publish && endpoint_port(&pull) != Some(0) {
                return Err(srv.error("legacy_pub", "is the same endpoint as legacy_pull"));
            }
            Some(LegacyConfig {
                pull,
                publish,
                timeout: legacy_timeout,
            })
        }
        (None, None) => {
            if legacy_timeout.is_some() {
                return Err(srv.error("legacy_timeout", "needs legacy_pull and legacy_pub"));
            }
            None
        }
        (Some(_), None) => {
            return Err(srv.error("legacy_pub", "missing (required when legacy_pull is set)"));
        }
        (None, Some(_)) => {
            return Err(srv.error("legacy_pull", "missing (required when legacy_pub is set)"));
        }
    };

    file.section("http").reject_unknown_keys(HTTP_KEYS)?;
    let name = name.unwrap_or_else(|| default_name(endpoint_port(&listen).unwrap_or(0)));

    Ok(ServerConfig {
        general: GeneralConfig { name },
        federation: FederationConfig {
            shared_keys,
            origin_timeout,
            down_state,
        },
        server: ListenConfig {
            listen,
            snapshot_chunk,
            max_message_bytes,
            heartbeat_interval,
            fanout_linger,
            legacy,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        let file = ConfigFile::parse("hub.ini", text, std::iter::empty(), ENV_SECTIONS)?;
        load(&file)
    }

    #[test]
    fn defaults_and_full_file() {
        let c = parse("[server]\nname = hub-1\n").expect("valid");
        assert_eq!(c.general.name, "hub-1");
        let d = parse("[server]\nlisten = tcp://127.0.0.1:7100\n").expect("valid");
        assert!(d.general.name.starts_with("hub"), "{}", d.general.name);
        assert!(d.general.name.ends_with(":7100"), "{}", d.general.name);
        assert_eq!(c.server.listen, DEFAULT_LISTEN);
        assert!(c.federation.shared_keys.is_empty());
        assert!(c.server.legacy.is_none());
        assert_eq!(c.server.fanout_linger, DEFAULT_FANOUT_LINGER);
        let off = parse("[server]\nfanout_linger = 0ms\n").expect("valid");
        assert_eq!(off.server.fanout_linger, Duration::ZERO);
        let c = parse(
            "[general]\nname = hub-2\ndevice_state = yes\n[asterisk]\nhost = x\n\
             [federation]\nservers = tcp://a:1\nshared_keys = k1, k2\norigin_timeout = 3s\n\
             down_state = UNKNOWN\n[server]\nlisten = tcp://127.0.0.1:7000\nsnapshot_chunk = 10\n\
             legacy_pull = tcp://127.0.0.1:55556\nlegacy_pub = tcp://127.0.0.1:55555\n",
        )
        .expect("valid");
        // In a file shared with an agent, [general] name is the agent's, never the hub's.
        assert_ne!(c.general.name, "hub-2");
        assert_eq!(c.federation.shared_keys.len(), 2);
        assert_eq!(c.key_ring().len(), 2);
        assert_eq!(c.federation.origin_timeout, Duration::from_secs(3));
        assert_eq!(c.federation.down_state, DeviceState::Unknown);
        assert_eq!(c.server.snapshot_chunk, 10);
        let legacy = c.server.legacy.expect("legacy");
        assert_eq!(legacy.pull, "tcp://127.0.0.1:55556");
        assert_eq!(legacy.timeout, None);
    }

    #[test]
    fn bad_values_name_section_and_key() {
        for (text, needle) in [
            ("[server]\nlisten = udp://x:1\n", "[server] listen"),
            ("[server]\nlisten = tcp://x:65535\n", "P+1"),
            ("[server]\nbogus = 1\n", "[server] bogus: unknown key"),
            ("[server]\nsnapshot_chunk = 0\n", "[server] snapshot_chunk"),
            ("[server]\nlegacy_pull = tcp://x:1\n", "[server] legacy_pub"),
            ("[server]\nlegacy_timeout = 5s\n", "[server] legacy_timeout"),
            (
                "[server]\nlisten = tcp://x:7000\nlegacy_pull = tcp://x:7001\nlegacy_pub = tcp://x:2\n",
                "[server] legacy_pull",
            ),
            (
                "[federation]\norigin_timeout = soon\n",
                "[federation] origin_timeout",
            ),
            (
                "[federation]\ndown_state = DARK\n",
                "[federation] down_state",
            ),
            (
                "[federation]\nshared_key = a\nshared_keys = b\n",
                "[federation] shared_keys",
            ),
            (
                "[federation]\norigin_timeout = 1s\n[server]\nheartbeat_interval = 2s\n",
                "[server] heartbeat_interval",
            ),
            ("[server]\nfanout_linger = 1s\n", "[server] fanout_linger"),
            ("[server]\nfanout_linger = 3\n", "[server] fanout_linger"),
            ("[http]\nport = 1\n", "[http] port: unknown key"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(e.contains("hub.ini"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn unknown_keys_in_shared_sections_are_warnings() {
        let file = ConfigFile::parse(
            "hub.ini",
            "[general]\nflavour = x\n[federation]\ncolour = y\n",
            std::iter::empty(),
            ENV_SECTIONS,
        )
        .expect("parse");
        load(&file).expect("valid");
        let w: Vec<String> = file.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("[general] flavour"), "{w:?}");
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let c = parse("[federation]\nshared_key = hunter2\n").expect("valid");
        let text = hintfed_daemon::config::render_ini(&c).expect("render");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
