//! Helpers shared by the broker tests.
#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use hintfed_broker::broker::{self, BrokerHooks, RunningBroker};
use hintfed_broker::config::{BrokerConfig, ENV_SECTIONS};
use hintfed_daemon::config::ConfigFile;
use hintfed_sim::{SimConfig, SimHandle, SimServer};
pub use hintfed_testkit::net::free_port;
use hintfed_testkit::process::Proc;
pub use hintfed_testkit::wait::eventually;
use tokio_util::sync::CancellationToken;

pub const EXTENSIONS: &str = "\
[phones]
exten => 100,hint,PJSIP/100
exten => 200,hint,PJSIP/200
exten => 300,hint,PJSIP/300
exten => 1100,hint,Custom:PJSIP/100
";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub async fn sim(name: &str) -> SimHandle {
    init_tracing();
    let dialplan = hintfed_sim::extensions::parse(EXTENSIONS).expect("dialplan");
    SimServer::spawn(SimConfig {
        name: Some(name.to_owned()),
        dialplan,
        ..SimConfig::default()
    })
    .await
    .expect("sim")
}

/// One `[s<i>]` AMI section per simulator, named `pbx <i>`.
pub fn sections(sims: &[SimHandle]) -> Vec<String> {
    sims.iter()
        .enumerate()
        .map(|(i, s)| ami_section(&format!("s{i}"), &format!("pbx {i}"), s))
        .collect()
}

/// A server section reaching `s` over AMI.
pub fn ami_section(section: &str, name: &str, s: &SimHandle) -> String {
    format!(
        "[{section}]\nname = {name}\naddr = 127.0.0.1\nami_port = {}\nusername = admin\nsecret = adminsecret\n",
        s.local_addr().port()
    )
}

/// A whole file: `[general]` with `general` added, `[servers]`, the sections.
pub fn config(general: &str, sections: &[String]) -> String {
    let names: Vec<String> = sections
        .iter()
        .map(|s| {
            s.lines()
                .next()
                .unwrap_or("")
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned()
        })
        .collect();
    format!(
        "[general]\ndevice_state = yes\nlog_level = info\nrequest_timeout = 1000\nheartbeat_interval = 100ms\norigin_timeout = 3s\n{general}\n[servers]\nsections = {}\n\n{}",
        names.join(", "),
        sections.join("\n")
    )
}

pub fn custom(s: &SimHandle, device: &str) -> String {
    s.getvar(&format!("DEVICE_STATE(Custom:{device})"))
}

/// Waits until no simulator received a `Setvar` for 300 ms (initial syncs done).
pub async fn quiescent(sims: &[SimHandle]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let total = || sims.iter().map(|s| s.stats().setvar_total).sum::<u64>();
    let mut last = total();
    let mut stable_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = total();
        if now != last {
            last = now;
            stable_since = tokio::time::Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(300) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Setvars never stopped"
        );
    }
}

pub struct Broker {
    pub running: Option<RunningBroker>,
    pub stop: CancellationToken,
}

impl Broker {
    pub async fn start(text: &str) -> Broker {
        Self::start_with(text, BrokerHooks::default()).await
    }

    /// The file as parsed (for its warnings) and the broker configuration it gives.
    fn parse(text: &str) -> (ConfigFile, BrokerConfig) {
        let file = ConfigFile::parse(
            "broker.ini",
            text,
            Vec::<(String, String)>::new(),
            ENV_SECTIONS,
        )
        .expect("config parses");
        let cfg = BrokerConfig::from_file(&file).expect("config valid");
        (file, cfg)
    }

    pub fn config(text: &str) -> BrokerConfig {
        Self::parse(text).1
    }

    pub async fn start_with(text: &str, hooks: BrokerHooks) -> Broker {
        let (file, cfg) = Self::parse(text);
        assert!(file.warnings().is_empty(), "{:?}", file.warnings());
        let stop = CancellationToken::new();
        let running = broker::start(&cfg, hooks, stop.clone()).expect("start");
        Broker {
            running: Some(running),
            stop,
        }
    }

    pub fn relays(&self) -> &[broker::RelayInfo] {
        &self.running.as_ref().expect("running").relays
    }

    pub fn full_syncs(&self, i: usize) -> u64 {
        self.relays()[i].status.counters().full_syncs
    }

    /// Waits until every relay completed a full sync.
    pub async fn synced(&self) {
        let n = self.relays().len();
        eventually("every relay synced", || {
            (0..n).all(|i| self.full_syncs(i) >= 1)
        })
        .await;
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(5), r.wait())
                .await
                .expect("stops in time")
                .expect("clean stop");
        }
    }
}

/// The res_zmq_manager stand-in fronting one simulator.
pub struct Standin {
    proc: Proc,
    pub cmd: u16,
    pub evt: u16,
}

impl Standin {
    pub async fn start(s: &SimHandle) -> Standin {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/py/zmq_manager_standin.py");
        let (cmd, evt) = (free_port(), free_port());
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args(["--ami", &s.local_addr().to_string()])
            .args(["--username", "admin", "--secret", "adminsecret"])
            .args(["--evt", &format!("tcp://127.0.0.1:{evt}")])
            .args(["--cmd", &format!("tcp://127.0.0.1:{cmd}")]);
        let proc = Proc::spawn_command("standin", command);
        assert!(
            proc.wait_for_line("ready", Duration::from_secs(10))
                .await
                .is_some(),
            "stand-in did not get ready: {:?}",
            proc.lines()
        );
        Standin { proc, cmd, evt }
    }

    /// SIGUSR1: toggle blackhole.
    pub fn blackhole(&self) {
        self.proc.signal("USR1");
    }

    pub fn assert_alive(&mut self) {
        let status = self.proc.exit_code();
        assert!(
            status.is_none(),
            "stand-in exited {status:?}: {:?}",
            self.proc.lines()
        );
        assert!(
            !self.proc.has("CRASH"),
            "Getvar sent through res_zmq_manager"
        );
    }
}
