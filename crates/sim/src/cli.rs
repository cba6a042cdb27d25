//! The `hintfed-sim` command line: [`Args`] (clap) and its translation into one [`SimConfig`]
//! per `--listen`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::extensions::{self, Dialplan};
use crate::load::{self, RandomLoad};
use crate::server::SimConfig;

/// hintfed-sim: an Asterisk (AMI 13.0.0) simulator for tests, demos and load.
///
/// Each --listen starts one independent simulated Asterisk; --name values pair with --listen
/// values in order. For every server one line `listening name=<name> addr=<ip:port>` is printed
/// to stdout once it is bound (use --listen 127.0.0.1:0 and read the port from it).
///
/// Besides standard AMI actions it answers simulator-only admin actions on the same port:
/// SimSetDeviceState (Device, State), SimRestart (optional DownSeconds), SimStats,
/// SimBlackhole (optional Seconds; Scope: server or connection).
///
/// Examples:
///
///   hintfed-sim --listen 127.0.0.1:5038 --name pbx-a --username admin --secret adminsecret
///   --extensions extensions.conf
///
///   hintfed-sim --listen 127.0.0.1:0 --name pbx-a --listen 127.0.0.1:0 --name pbx-b
///   --extensions extensions.conf --random-devices 50 --rate 20 --seed 7
///
///   hintfed-sim --listen 127.0.0.1:5038 --script phones.txt   (lines: `<secs> <device> <STATE>`)
/// (No `Debug`: it holds the secret.)
#[derive(Parser)]
#[command(name = "hintfed-sim", version, verbatim_doc_comment)]
pub struct Args {
    /// Address to serve AMI on; repeat for several servers. Port 0 picks a free port.
    #[arg(short, long, value_name = "ADDR", default_value = "127.0.0.1:5038")]
    pub listen: Vec<SocketAddr>,

    /// System name of the server (SystemName on events, unique ids); repeat, paired with
    /// --listen in order. Without it events carry no SystemName.
    #[arg(short, long, value_name = "NAME")]
    pub name: Vec<String>,

    /// AMI user name (manager.conf section).
    #[arg(long, default_value = "admin")]
    pub username: String,

    /// AMI secret, for plain (`Secret:`) and MD5 challenge (`Key:`) login.
    #[arg(
        long,
        env = "HINTFED_SIM_SECRET",
        default_value = "adminsecret",
        hide_env_values = true
    )]
    pub secret: String,

    /// An Asterisk extensions.conf; its `exten => N,hint,DEV1&DEV2[,PresenceProvider]` lines
    /// define the hints (`[globals]` become global variables).
    #[arg(long, value_name = "FILE")]
    pub extensions: Option<PathBuf>,

    /// Timed changes, one per line: `<seconds> <device> <STATE>`,
    /// `<seconds> presence <CustomPresence:x> <status,subtype,message[,e]>` or
    /// `<seconds> restart`; `#` starts a comment. Times count from the server's start.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,

    /// Random load: this many phones change state (named device-prefix + number, from
    /// first-device on, e.g. PJSIP/1000).
    #[arg(long, value_name = "N")]
    pub random_devices: Option<usize>,

    /// Random load: changes per second (per server).
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    pub rate: f64,

    /// Random load: seed; server i (0-based) uses seed + i. Same seed, same sequence.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,

    /// Random load: device name prefix.
    #[arg(long, default_value = "PJSIP/")]
    pub device_prefix: String,

    /// Random load: number of the first device.
    #[arg(long, default_value_t = 1000)]
    pub first_device: u64,

    /// Start the script and random load at the first successful AMI login instead of at
    /// start-up.
    #[arg(long)]
    pub load_after_login: bool,

    /// Preload N cached device states Custom:bench0, Custom:bench1, ... (like the
    /// devicestatelist-500 capture).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preload_custom: usize,

    /// Phones emit each DeviceStateChange once instead of twice (Local/ devices always emit
    /// twice, as real Asterisk does).
    #[arg(long)]
    pub no_duplicate_events: bool,

    /// The AMI user's `write =` permissions (manager.conf), e.g. `call` (then `Filter`,
    /// which needs `system`, is refused with `Permission denied`).
    #[arg(long, value_name = "PERMS", default_value = "all", value_parser = parse_perms)]
    pub write: u32,

    /// An `eventfilter =` line of the AMI user (manager.conf), repeatable: a regex run on each
    /// event's whole text; `!` first drops the events it matches (e.g. `!Device: Custom:`).
    #[arg(long = "eventfilter", value_name = "FILTER", value_parser = parse_filter)]
    pub event_filters: Vec<String>,

    /// Asterisk's writetimeout: a client whose socket blocks a write this long is dropped.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub write_timeout_ms: u64,

    /// Write the responses and events that are ready together in one write (default: each on
    /// its own, as Asterisk does). Less CPU for the simulator on a machine it shares with what
    /// is measured.
    #[arg(long)]
    pub coalesce_writes: bool,

    /// Delay before answering a refused login (Asterisk sleeps 1 s), then the connection closes.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub auth_fail_delay_ms: u64,

    /// Events a client may lag behind before it is dropped as a slow reader.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub event_buffer: usize,

    /// Write a timing line per phone change and per accepted Setvar (every server of this
    /// process) to FILE: `<unix-ns> <name> dev <device> <STATE>` / `<unix-ns> <name> set <var>
    /// <value>` (used by hintfed-bench for propagation latency).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: crate::kafka::KafkaArgs,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, default_value = "info")]
    pub log: String,

    /// Runtime threads serving every server of the process (0: one per CPU; 1: a single
    /// thread, which spends less CPU on waking threads when the simulator shares a small
    /// machine with what it is measured against).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub worker_threads: usize,
}

/// A command line that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `--name` given a different number of times than `--listen`.
    #[error(
        "--name given {names} times but --listen {listens} times: give one name per --listen (or none)"
    )]
    NamesMismatch {
        /// Number of names.
        names: usize,
        /// Number of listen addresses.
        listens: usize,
    },
    /// A bad `--extensions` file.
    #[error("--extensions: {0}")]
    Extensions(#[from] extensions::ExtensionsError),
    /// A bad `--script` file.
    #[error("--script: {0}")]
    Script(#[from] load::ScriptError),
    /// A bad `--rate`.
    #[error("--rate must be a positive number, got {0}")]
    Rate(f64),
}

impl Args {
    /// One configuration per `--listen`, files read and validated.
    pub fn into_configs(self) -> Result<Vec<SimConfig>, CliError> {
        if !self.name.is_empty() && self.name.len() != self.listen.len() {
            return Err(CliError::NamesMismatch {
                names: self.name.len(),
                listens: self.listen.len(),
            });
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(CliError::Rate(self.rate));
        }
        let dialplan = match &self.extensions {
            Some(p) => extensions::load(p)?,
            None => Dialplan::default(),
        };
        let script = match &self.script {
            Some(p) => load::load_script(p)?,
            None => Vec::new(),
        };
        Ok(self
            .listen
            .iter()
            .enumerate()
            .map(|(i, addr)| SimConfig {
                listen: *addr,
                name: self.name.get(i).cloned(),
                username: self.username.clone(),
                secret: self.secret.clone(),
                write: self.write,
                event_filters: self.event_filters.clone(),
                dialplan: dialplan.clone(),
                phone_duplicates: !self.no_duplicate_events,
                write_timeout: Duration::from_millis(self.write_timeout_ms),
                coalesce_writes: self.coalesce_writes,
                auth_failure_delay: Duration::from_millis(self.auth_fail_delay_ms),
                event_buffer: self.event_buffer,
                preload_custom: self.preload_custom,
                script: script.clone(),
                random: self.random_devices.map(|n| {
                    RandomLoad::new(
                        n,
                        &self.device_prefix,
                        self.first_device,
                        self.seed.wrapping_add(i as u64),
                    )
                }),
                random_rate: self.rate,
                load_after_login: self.load_after_login,
                ..SimConfig::default()
            })
            .collect())
    }
}

/// `--write`: Asterisk's permission list (`call,system`, `all`, a number).
fn parse_perms(v: &str) -> Result<u32, String> {
    crate::event::parse_mask(v).ok_or_else(|| "empty permission list".to_owned())
}

/// `--eventfilter`: must compile.
fn parse_filter(v: &str) -> Result<String, String> {
    crate::filter::EventFilters::default()
        .add(v)
        .map(|()| v.to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_permissions_and_event_filters() {
        let cfgs = Args::parse_from([
            "hintfed-sim",
            "--write",
            "call",
            "--eventfilter",
            "!Device: Custom:",
            "--eventfilter",
            "Event: DeviceStateChange",
        ])
        .into_configs()
        .expect("configs");
        assert_eq!(cfgs[0].write, crate::event::CALL);
        assert_eq!(
            cfgs[0].event_filters,
            ["!Device: Custom:", "Event: DeviceStateChange"]
        );
        assert!(Args::try_parse_from(["hintfed-sim", "--eventfilter", "!(x"]).is_err());
        assert_eq!(
            Args::parse_from(["hintfed-sim"])
                .into_configs()
                .expect("configs")[0]
                .write,
            crate::event::ALL
        );
    }

    #[test]
    fn pairs_names_with_listens() {
        let args = Args::parse_from([
            "hintfed-sim",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "pbx-a",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "pbx-b",
            "--random-devices",
            "3",
            "--seed",
            "7",
        ]);
        let cfgs = args.into_configs().expect("configs");
        assert_eq!(cfgs.len(), 2);
        assert_eq!(cfgs[1].name.as_deref(), Some("pbx-b"));
        assert!(cfgs[0].random.is_some());
    }

    #[test]
    fn mismatched_names_are_refused() {
        let args = Args::parse_from(["hintfed-sim", "--name", "a", "--name", "b"]);
        assert!(matches!(
            args.into_configs(),
            Err(CliError::NamesMismatch { .. })
        ));
    }

    #[test]
    fn help_is_valid() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_secret() {
        let cfgs = Args::parse_from(["hintfed-sim", "--secret", "s3cr3t-value"])
            .into_configs()
            .expect("configs");
        let shown = format!("{:?}", cfgs[0]);
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
    }
}
