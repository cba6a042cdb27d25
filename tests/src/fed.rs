//! A federation of real processes for the end-to-end tests: one `hintfed-sim` serving several
//! simulated Asterisks, `hintfed-server` hubs, one `hintfed-agent` per Asterisk (over AMI, or
//! over res_zmq_manager through the pyzmq stand-in), and an AMI test client per Asterisk.
//!
//! Every piece has its own loopback ports and temporary config files, so tests are
//! independent; every process is a [`Proc`] killed on drop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use hintfed_ami::{AmiClient, ClientConfig, Message, actions};
use hintfed_testkit::http;

use crate::{Proc, bin_path, free_port, free_port_pair, wait_until, workspace_root};

/// The hints every simulated Asterisk carries: local phones and the mirrors of the others'.
pub const EXTENSIONS: &str = "\
[phones]
exten => 100,hint,PJSIP/100&Custom:PJSIP/100
exten => 200,hint,PJSIP/200&Custom:PJSIP/200
exten => 300,hint,PJSIP/300&Custom:PJSIP/300
exten => 101,hint,PJSIP/101
exten => 700,hint,Local/700@phones
";

/// The phones of [`EXTENSIONS`]; phone `i` is registered on Asterisk `i` (modulo their
/// number) and UNAVAILABLE on the others.
pub const PHONES: [&str; 3] = ["PJSIP/100", "PJSIP/200", "PJSIP/300"];

/// How long a daemon may take to come up (healthy, or ready for an agent).
const STARTUP: Duration = Duration::from_secs(10);

/// AMI user and secret of the simulators.
pub const AMI_USER: &str = "admin";
/// See [`AMI_USER`].
pub const AMI_SECRET: &str = "adminsecret";

/// How the agents reach their Asterisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// AMI over TCP.
    Ami,
    /// res_zmq_manager (the pyzmq stand-in), events and actions.
    Zmq,
}

/// An AMI test client to one simulated Asterisk.
pub struct Ami {
    client: AmiClient,
}

impl Ami {
    /// Connects (and keeps reconnecting) to `addr`.
    pub async fn connect(addr: &str) -> Self {
        let mut cfg = ClientConfig::new(addr, AMI_USER, AMI_SECRET);
        cfg.events = "off".to_owned();
        cfg.backoff_initial = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(200);
        cfg.action_timeout = Duration::from_secs(3);
        let client = AmiClient::start(cfg);
        assert!(
            client.wait_connected(Duration::from_secs(5)).await,
            "test AMI client cannot log in to {addr}"
        );
        Self { client }
    }

    async fn send(&self, msg: Message) -> Option<Message> {
        for _ in 0..50 {
            match self.client.send(msg.clone()).await {
                Ok(m) => return Some(m),
                Err(_) => {
                    self.client.wait_connected(Duration::from_millis(200)).await;
                }
            }
        }
        None
    }

    /// `Getvar` (empty string when it failed).
    pub async fn getvar(&self, variable: &str) -> String {
        self.send(actions::getvar(variable))
            .await
            .and_then(|m| m.get("Value").map(str::to_owned))
            .unwrap_or_default()
    }

    /// `DEVICE_STATE(Custom:<device>)`.
    pub async fn custom(&self, device: &str) -> String {
        self.getvar(&format!("DEVICE_STATE(Custom:{device})")).await
    }

    /// `Setvar`; panics when refused.
    pub async fn setvar(&self, variable: &str, value: &str) {
        let r = self.send(actions::setvar(variable, value)).await;
        assert_eq!(
            r.as_ref().and_then(|m| m.get("Response")),
            Some("Success"),
            "Setvar {variable}={value}: {r:?}"
        );
    }

    /// The simulator's `SimSetDeviceState` (a phone changes state).
    pub async fn set_device(&self, device: &str, state: &str) {
        let r = self
            .send(
                Message::action("SimSetDeviceState")
                    .with("Device", device)
                    .with("State", state),
            )
            .await;
        assert_eq!(
            r.as_ref().and_then(|m| m.get("Response")),
            Some("Success"),
            "SimSetDeviceState {device} {state}: {r:?}"
        );
    }

    /// One counter of `SimStats`, e.g. `SetvarTotal`, `Action-Getvar`.
    pub async fn stat(&self, name: &str) -> u64 {
        self.send(Message::action("SimStats"))
            .await
            .and_then(|m| m.get(name).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    /// `SimRestart`: the simulated Asterisk restarts (state lost, connections closed).
    pub async fn restart(&self) {
        let _ = self.send(Message::action("SimRestart")).await;
    }

    /// `SimRestart` with `DownSeconds`: the Asterisk stays unreachable that long.
    pub async fn restart_down(&self, seconds: f64) {
        let _ = self
            .client
            .send(Message::action("SimRestart").with("DownSeconds", seconds.to_string()))
            .await;
    }

    /// `PRESENCE_STATE(<presentity>,<field>)`.
    pub async fn presence_field(&self, presentity: &str, field: &str) -> String {
        self.getvar(&format!("PRESENCE_STATE({presentity},{field})"))
            .await
    }

    /// The `value`, `subtype` and `message` fields of `PRESENCE_STATE(<presentity>)`.
    pub async fn presence(&self, presentity: &str) -> (String, String, String) {
        (
            self.presence_field(presentity, "value").await,
            self.presence_field(presentity, "subtype").await,
            self.presence_field(presentity, "message").await,
        )
    }

    /// Sets `PRESENCE_STATE(<presentity>)` as a dialplan would, in the `e` form (subtype and
    /// message base64-encoded, so a comma in the message survives).
    pub async fn set_presence(&self, presentity: &str, status: &str, subtype: &str, message: &str) {
        let e = base64::engine::general_purpose::STANDARD;
        let value = format!("{status},{},{},e", e.encode(subtype), e.encode(message));
        self.setvar(&format!("PRESENCE_STATE({presentity})"), &value)
            .await;
    }
}

/// How many `Setvar`s each Asterisk received between two [`Federation::settled_setvars`].
pub fn setvar_delta<'a>(
    before: &'a BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<&'a str, u64> {
    before
        .iter()
        .map(|(n, b)| (n.as_str(), after.get(n).map_or(0, |a| a.saturating_sub(*b))))
        .collect()
}

/// `GET path` on `addr`; the body (empty on error). Also [`metric`], the sum of a Prometheus
/// family in a `/metrics` text.
pub use hintfed_testkit::http::{get_body as http_get, metric};

/// One hub.
pub struct Hub {
    /// Its name.
    pub name: String,
    /// Base port P.
    pub port: u16,
    /// Its HTTP address.
    pub http: String,
    /// Its config file.
    pub config: PathBuf,
    /// The process (None while stopped).
    pub proc: Option<Proc>,
}

/// One agent.
pub struct Agent {
    /// Origin name.
    pub name: String,
    /// Its HTTP address.
    pub http: String,
    /// Its config file.
    pub config: PathBuf,
    /// The process (None while stopped).
    pub proc: Option<Proc>,
}

/// A res_zmq_manager stand-in in front of one simulated Asterisk.
pub struct Standin {
    /// Event (PUB) endpoint.
    pub evt: String,
    /// Command (REP) endpoint.
    pub cmd: String,
    /// The process (None while stopped).
    pub proc: Option<Proc>,
}

/// The whole federation.
pub struct Federation {
    /// Temporary folder of the config files.
    pub dir: tempfile::TempDir,
    /// The simulator process (all Asterisks).
    pub sim: Proc,
    /// AMI address of each Asterisk, by name.
    pub addrs: BTreeMap<String, String>,
    /// A test AMI client per Asterisk.
    pub ami: BTreeMap<String, Ami>,
    /// Hubs.
    pub hubs: Vec<Hub>,
    /// Agents by origin name.
    pub agents: BTreeMap<String, Agent>,
    /// Stand-ins by origin name (zmq mode).
    pub standins: BTreeMap<String, Standin>,
    /// The shared key.
    pub key: String,
    /// `[federation] origin_timeout` of agents and hubs.
    pub origin_timeout: &'static str,
    /// How agents reach Asterisk.
    pub via: Via,
}

impl Federation {
    /// Starts one simulator serving `names` (nothing else yet).
    pub async fn start(names: &[&str], via: Via) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ext = dir.path().join("extensions.conf");
        std::fs::write(&ext, EXTENSIONS).expect("write extensions");
        let mut args = Vec::new();
        for n in names {
            args.extend([
                "--listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--name".to_owned(),
                (*n).to_owned(),
            ]);
        }
        args.extend([
            "--extensions".to_owned(),
            ext.display().to_string(),
            "--log".to_owned(),
            "warn".to_owned(),
        ]);
        let sim = Proc::spawn("sim", &bin_path("hintfed-sim"), &args);
        let mut addrs = BTreeMap::new();
        for n in names {
            let line = sim
                .wait_for_line(&format!("listening name={n} "), Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("sim did not serve {n}"));
            let addr = line.split("addr=").nth(1).expect("addr=").trim().to_owned();
            addrs.insert((*n).to_owned(), addr);
        }
        let mut ami = BTreeMap::new();
        for (n, a) in &addrs {
            ami.insert(n.clone(), Ami::connect(a).await);
        }
        // A phone is registered on one Asterisk only: elsewhere it reads UNAVAILABLE, as an
        // unregistered PJSIP endpoint does.
        for (i, phone) in PHONES.iter().enumerate() {
            let home = names[i % names.len()];
            for n in names.iter().filter(|n| **n != home) {
                ami[*n].set_device(phone, "UNAVAILABLE").await;
            }
        }
        Self {
            dir,
            sim,
            addrs,
            ami,
            hubs: Vec::new(),
            agents: BTreeMap::new(),
            standins: BTreeMap::new(),
            key: "e2e-shared-key".to_owned(),
            origin_timeout: "3s",
            via,
        }
    }

    /// The test AMI client of `name`.
    pub fn ami(&self, name: &str) -> &Ami {
        self.ami.get(name).expect("known Asterisk")
    }

    /// Adds and starts a hub.
    pub async fn add_hub(&mut self) -> usize {
        let i = self.hubs.len();
        let name = format!("hub-{}", i + 1);
        let port = free_port_pair();
        let http = format!("127.0.0.1:{}", free_port());
        let config = self.dir.path().join(format!("{name}.ini"));
        std::fs::write(
            &config,
            format!(
                "[general]\nlog_level = info\n\n[federation]\nshared_key = {key}\norigin_timeout = {ot}\n\n[server]\nname = {name}\nlisten = tcp://127.0.0.1:{port}\nheartbeat_interval = 500ms\n\n[http]\nlisten = {http}\n",
                key = self.key,
                ot = self.origin_timeout,
            ),
        )
        .expect("write hub config");
        self.hubs.push(Hub {
            name,
            port,
            http,
            config,
            proc: None,
        });
        self.start_hub(i).await;
        i
    }

    /// (Re)starts hub `i` and waits until it answers `/healthz`.
    pub async fn start_hub(&mut self, i: usize) {
        let hub = &mut self.hubs[i];
        let args = vec!["--config".to_owned(), hub.config.display().to_string()];
        hub.proc = Some(Proc::spawn(&hub.name, &bin_path("hintfed-server"), &args));
        let up = http::get_until(hub.http.as_str(), "/healthz", STARTUP, |r| {
            r.body.contains("ok")
        });
        assert!(up.await.is_some(), "hub {i} did not come up");
    }

    /// Kills hub `i` (SIGKILL).
    pub fn kill_hub(&mut self, i: usize) {
        if let Some(mut p) = self.hubs[i].proc.take() {
            p.kill();
        }
    }

    /// Writes the config of agent `name` with `key` (the federation key unless overridden).
    pub fn write_agent_config(&self, name: &str, key: &str, http: &str) -> PathBuf {
        let servers: Vec<String> = self
            .hubs
            .iter()
            .map(|h| format!("tcp://127.0.0.1:{}", h.port))
            .collect();
        let addr = &self.addrs[name];
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let asterisk = match self.via {
            Via::Ami => format!(
                "source = ami\napply = ami\nhost = {host}\nport = {port}\nusername = {AMI_USER}\n"
            ),
            Via::Zmq => {
                let s = &self.standins[name];
                format!(
                    "source = zmq\napply = zmq\nzmq_evt = {}\nzmq_cmd = {}\nrequest_timeout = 500\n",
                    s.evt, s.cmd
                )
            }
        };
        let config = self.dir.path().join(format!("agent-{name}.ini"));
        std::fs::write(
            &config,
            format!(
                "[general]\nname = {name}\nlog_level = info\n\n[asterisk]\n{asterisk}\n[federation]\nservers = {servers}\nshared_key = {key}\norigin_timeout = {ot}\nheartbeat_interval = 500ms\n\n[http]\nlisten = {http}\n",
                servers = servers.join(", "),
                ot = self.origin_timeout,
            ),
        )
        .expect("write agent config");
        config
    }

    /// Adds and starts the agent of Asterisk `name`.
    pub async fn add_agent(&mut self, name: &str) {
        let key = self.key.clone();
        self.add_agent_with_key(name, &key).await;
    }

    /// Adds and starts the agent of Asterisk `name`, signing with `key`.
    pub async fn add_agent_with_key(&mut self, name: &str, key: &str) {
        let http = format!("127.0.0.1:{}", free_port());
        let config = self.write_agent_config(name, key, &http);
        self.agents.insert(
            name.to_owned(),
            Agent {
                name: name.to_owned(),
                http,
                config,
                proc: None,
            },
        );
        self.start_agent(name).await;
    }

    /// (Re)starts the agent of `name` and waits until it is ready (Asterisk and a hub).
    pub async fn start_agent(&mut self, name: &str) {
        let secret_env = [("HINTFED_ASTERISK_SECRET", AMI_SECRET)];
        let agent = self.agents.get_mut(name).expect("known agent");
        let args = vec!["--config".to_owned(), agent.config.display().to_string()];
        agent.proc = Some(Proc::spawn_with_env(
            &format!("agent-{name}"),
            &bin_path("hintfed-agent"),
            &args,
            &secret_env,
        ));
        let http = agent.http.as_str();
        let ready = http::get_until(http, "/readyz", STARTUP, |r| r.body.starts_with("ready"));
        assert!(
            ready.await.is_some(),
            "agent {name} did not become ready: {}",
            http_get(http, "/readyz").await
        );
    }

    /// Kills the agent of `name` (SIGKILL).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(mut p) = self.agents.get_mut(name).and_then(|a| a.proc.take()) {
            p.kill();
        }
    }

    /// The agent's `/metrics` text.
    pub async fn agent_metrics(&self, name: &str) -> String {
        http_get(&self.agents[name].http, "/metrics").await
    }

    /// Agent `name`'s `/metrics` once its count of published updates has stood still for
    /// 1.5 s (longer than the 1 s a hub's republish request may be deferred: hubs ask a new
    /// origin to republish), or after 10 s.
    pub async fn settled_agent_metrics(&self, name: &str) -> String {
        let published = |m: &str| metric(m, "hintfed_updates_published_total", &[]);
        let mut last = self.agent_metrics(name).await;
        let mut still = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while still < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.agent_metrics(name).await;
            still = if published(&now) == published(&last) {
                still + 1
            } else {
                0
            };
            last = now;
        }
        last
    }

    /// Starts a res_zmq_manager stand-in in front of Asterisk `name` (zmq mode).
    pub async fn add_standin(&mut self, name: &str) {
        let evt = format!("tcp://127.0.0.1:{}", free_port());
        let cmd = format!("tcp://127.0.0.1:{}", free_port());
        self.standins.insert(
            name.to_owned(),
            Standin {
                evt,
                cmd,
                proc: None,
            },
        );
        self.start_standin(name).await;
    }

    /// (Re)starts the stand-in of `name` on its endpoints; waits for `ready`.
    pub async fn start_standin(&mut self, name: &str) {
        let script = workspace_root().join("tests/py/zmq_manager_standin.py");
        let addr = self.addrs[name].clone();
        let s = self.standins.get_mut(name).expect("known stand-in");
        let args = vec![
            script.display().to_string(),
            "--ami".to_owned(),
            addr,
            "--username".to_owned(),
            AMI_USER.to_owned(),
            "--secret".to_owned(),
            AMI_SECRET.to_owned(),
            "--evt".to_owned(),
            s.evt.clone(),
            "--cmd".to_owned(),
            s.cmd.clone(),
        ];
        let p = Proc::spawn(
            &format!("standin-{name}"),
            std::path::Path::new("python3"),
            &args,
        );
        assert!(
            p.wait_for_line("ready", Duration::from_secs(10))
                .await
                .is_some(),
            "stand-in {name} not ready"
        );
        s.proc = Some(p);
    }

    /// Whether any stand-in ever printed `CRASH` (somebody sent it `Getvar`).
    pub fn standin_crashed(&self) -> bool {
        self.standins.values().any(|s| {
            s.proc
                .as_ref()
                .is_some_and(|p| p.lines().iter().any(|l| l.contains("CRASH")))
        })
    }

    /// Waits until `Custom:<device>` on each of `on` reads `state`.
    pub async fn wait_custom(
        &self,
        device: &str,
        state: &str,
        on: &[&str],
        within: Duration,
    ) -> bool {
        wait_until(within, || async {
            for n in on {
                if self.ami(n).custom(device).await != state {
                    return false;
                }
            }
            true
        })
        .await
    }

    /// Waits until `PRESENCE_STATE(<presentity>)` on each of `on` reads `want` (status,
    /// subtype, message).
    pub async fn wait_presence(
        &self,
        presentity: &str,
        want: (&str, &str, &str),
        on: &[&str],
        within: Duration,
    ) -> bool {
        wait_until(within, || async {
            for n in on {
                let (v, s, m) = self.ami(n).presence(presentity).await;
                if (v.as_str(), s.as_str(), m.as_str()) != want {
                    return false;
                }
            }
            true
        })
        .await
    }

    /// Setvar totals of every Asterisk once they stop moving (two equal reads 400 ms apart,
    /// within 10 s).
    pub async fn settled_setvars(&self) -> BTreeMap<String, u64> {
        let read = || async {
            let mut m = BTreeMap::new();
            for (n, a) in &self.ami {
                m.insert(n.clone(), a.stat("SetvarTotal").await);
            }
            m
        };
        let mut last = read().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let now = read().await;
            if now == last || tokio::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }
}
