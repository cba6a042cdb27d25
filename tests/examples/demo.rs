//! The hintfed demo (`scripts/demo`): a whole federation on loopback, with a live log of
//! propagations and their latency.
//!
//! It starts one `hintfed-sim` per simulated Asterisk (each with its own phones under random
//! load: pbx-a has PJSIP/1000.., pbx-b PJSIP/2000.., ...; every server carries the hints
//! `exten => N,hint,PJSIP/N&Custom:PJSIP/N` of all phones), `--hubs` `hintfed-server` hubs and
//! one `hintfed-agent` per Asterisk, with generated INI files and a fresh shared key in a
//! temporary folder. Every few seconds one presentity (`CustomPresence:alice`, ...) changes.
//!
//! The live log is measured from outside, end to end: an AMI observer connected to every
//! simulated Asterisk stamps each phone's `DeviceStateChange` on its home server and the
//! matching `Custom:` lamp change on each other server (same clock, one process), and prints
//! one line per change once every other server shows it. Ctrl-C (SIGINT), SIGTERM or SIGHUP
//! stop the agents, then the hubs, then the simulators, and remove the temporary folder.
//!
//! ```text
//! scripts/demo [--pbx N] [--devices N] [--rate R] [--hubs N] [--seed S] [--duration SECS] [--keep]
//! ```
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use hintfed_ami::{AmiClient, ClientConfig, ClientEvent, Message, actions};
use hintfed_e2e::fed::{AMI_SECRET, AMI_USER, http_get};
use hintfed_e2e::{bin_path, free_port, free_port_pair, wait_until};
use std::os::unix::process::CommandExt;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "\
usage: scripts/demo [--pbx N] [--devices N] [--rate R] [--hubs N] [--seed S] [--duration SECS] [--keep]

  --pbx N          simulated Asterisk servers, one agent each (2..=9, default 3)
  --devices N      phones per server under random load (1..=200, default 6)
  --rate R         phone changes per second per server (default 0.5)
  --hubs N         hintfed-server hubs (1..=5, default 2)
  --seed S         random load seed (default: from the clock)
  --duration SECS  stop by itself after SECS seconds (default: run until Ctrl-C)
  --keep           keep the temporary folder (configs and daemon logs) on exit";

/// Presentities toggled by the demo, one per server.
const PEOPLE: [&str; 9] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
];

/// A change not seen everywhere after this long is reported as missing.
const MISSING_AFTER: Duration = Duration::from_secs(3);

struct Args {
    pbx: usize,
    devices: usize,
    rate: f64,
    hubs: usize,
    seed: u64,
    duration: Option<Duration>,
    keep: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        pbx: 3,
        devices: 6,
        rate: 0.5,
        hubs: 2,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        duration: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--keep" {
            a.keep = true;
            continue;
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("{flag}: bad value {value:?}\n{USAGE}");
        match flag.as_str() {
            "--pbx" => a.pbx = value.parse().with_context(bad)?,
            "--devices" => a.devices = value.parse().with_context(bad)?,
            "--rate" => a.rate = value.parse().with_context(bad)?,
            "--hubs" => a.hubs = value.parse().with_context(bad)?,
            "--seed" => a.seed = value.parse().with_context(bad)?,
            "--duration" => {
                let s: f64 = value.parse().with_context(bad)?;
                a.duration = Some(Duration::try_from_secs_f64(s).with_context(bad)?);
            }
            _ => bail!("unknown option {flag}\n{USAGE}"),
        }
    }
    if !(2..=9).contains(&a.pbx) {
        bail!("--pbx must be 2..=9\n{USAGE}");
    }
    if !(1..=200).contains(&a.devices) {
        bail!("--devices must be 1..=200\n{USAGE}");
    }
    if !(1..=5).contains(&a.hubs) {
        bail!("--hubs must be 1..=5\n{USAGE}");
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        bail!("--rate must be a positive number\n{USAGE}");
    }
    Ok(a)
}

/// One output stream of a child.
type Reader = Box<dyn std::io::Read + Send>;

/// One child process: its output goes to a log file; WARN/ERROR lines are echoed until the
/// demo stops; killed on drop.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        dir: &Path,
        quiet: &Arc<AtomicBool>,
        stdout_lines: Option<mpsc::Sender<String>>,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = Arc::new(Mutex::new(
            File::create(&log).with_context(|| format!("create {}", log.display()))?,
        ));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a Ctrl-C in the terminal reaches the demo only, which then
            // stops everything in order.
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let streams: [(Reader, Option<mpsc::Sender<String>>); 2] = [
            (
                Box::new(child.stdout.take().context("stdout is piped")?),
                stdout_lines,
            ),
            (
                Box::new(child.stderr.take().context("stderr is piped")?),
                None,
            ),
        ];
        for (stream, tx) in streams {
            let file = Arc::clone(&file);
            let quiet = Arc::clone(quiet);
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut f) = file.lock() {
                        let _ = writeln!(f, "{line}");
                    }
                    if !quiet.load(Ordering::Relaxed)
                        && (line.contains(" WARN ") || line.contains(" ERROR "))
                    {
                        eprintln!("  [{name}] {line}");
                    }
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM (with kill(1)); false when it could not be sent.
    fn term(&mut self) -> bool {
        !self.exited()
            && Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    /// Waits up to `until` for the exit, then SIGKILL. True when it exited by itself.
    async fn wait_or_kill(&mut self, until: Instant) -> bool {
        loop {
            if self.exited() {
                return true;
            }
            if Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wall-clock time of day, UTC, `HH:MM:SS.mmm`.
fn clock() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn pbx_name(i: usize) -> String {
    format!("pbx-{}", char::from(b'a' + u8::try_from(i).unwrap_or(0)))
}

/// One change seen on its home server, waiting to show on the others.
struct Pending {
    origin: usize,
    /// Wall-clock time it was seen on its home server.
    wall: String,
    what: String,
    value: String,
    at: Instant,
    seen: BTreeMap<usize, Duration>,
}

#[derive(Default)]
struct Stats {
    changes: u64,
    complete: u64,
    superseded: u64,
    missing: u64,
    latencies_us: Vec<u64>,
}

struct Observer {
    names: Vec<String>,
    /// `PJSIP/1003` or `CustomPresence:alice` → the change in flight.
    pending: HashMap<String, Pending>,
    /// Arrivals read before the origin's own event (the observer's sessions are separate
    /// connections; when the observer itself is starved of CPU their order is lost):
    /// (key, server) → (value, when).
    early: HashMap<(String, usize), (String, Instant)>,
    /// The last value each key took on its home server.
    last_started: HashMap<String, (usize, String)>,
    stats: Stats,
}

impl Observer {
    fn home_of_phone(&self, device: &str) -> Option<usize> {
        let n: usize = device.strip_prefix("PJSIP/")?.parse().ok()?;
        let i = n / 1000;
        (1..=self.names.len()).contains(&i).then(|| i - 1)
    }

    fn started(&mut self, key: &str, origin: usize, value: String, at: Instant) {
        // Asterisk repeats events (also after the change has been seen everywhere).
        let last = (origin, value.clone());
        if self.last_started.get(key) == Some(&last) {
            return;
        }
        self.last_started.insert(key.to_owned(), last);
        if self.pending.remove(key).is_some() {
            self.stats.superseded += 1;
        }
        self.stats.changes += 1;
        let early: Vec<(usize, Instant)> = (0..self.names.len())
            .filter_map(|i| {
                let (v, t) = self.early.remove(&(key.to_owned(), i))?;
                (v == value && at.saturating_duration_since(t) < Duration::from_millis(200))
                    .then_some((i, t))
            })
            .collect();
        self.pending.insert(
            key.to_owned(),
            Pending {
                origin,
                wall: clock(),
                what: key.to_owned(),
                value: value.clone(),
                at,
                seen: BTreeMap::new(),
            },
        );
        for (i, t) in early {
            self.arrived(key, i, &value, t);
        }
    }

    fn arrived(&mut self, key: &str, on: usize, value: &str, at: Instant) {
        let Some(p) = self.pending.get_mut(key).filter(|p| p.value == value) else {
            self.early
                .insert((key.to_owned(), on), (value.to_owned(), at));
            return;
        };
        if p.origin == on || p.seen.contains_key(&on) {
            return;
        }
        p.seen.insert(on, at.saturating_duration_since(p.at));
        if p.seen.len() + 1 == self.names.len()
            && let Some(p) = self.pending.remove(key)
        {
            self.stats.complete += 1;
            for d in p.seen.values() {
                self.stats
                    .latencies_us
                    .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            }
            self.print(&p, "");
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let late: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.at) > MISSING_AFTER)
            .map(|(k, _)| k.clone())
            .collect();
        for k in late {
            if let Some(p) = self.pending.remove(&k) {
                self.stats.missing += 1;
                let missing: Vec<&str> = (0..self.names.len())
                    .filter(|i| *i != p.origin && !p.seen.contains_key(i))
                    .map(|i| self.names[i].as_str())
                    .collect();
                self.print(
                    &p,
                    &format!("   NOT SEEN within 3 s on {}", missing.join(", ")),
                );
            }
        }
    }

    fn print(&self, p: &Pending, suffix: &str) {
        let arrivals: Vec<String> = p
            .seen
            .iter()
            .map(|(i, d)| {
                let ms = d.as_secs_f64() * 1000.0;
                if ms < 0.1 {
                    format!("{} <0.1 ms", self.names[*i])
                } else {
                    format!("{} {ms:.1} ms", self.names[*i])
                }
            })
            .collect();
        println!(
            "{}  {:<6} {:<22} {:<22} → {}{suffix}",
            p.wall,
            self.names[p.origin],
            p.what,
            p.value,
            arrivals.join(", ")
        );
    }

    fn on_event(&mut self, server: usize, msg: &Message, at: Instant) {
        match msg.event() {
            Some("DeviceStateChange") => {
                let (Some(dev), Some(state)) = (msg.get("Device"), msg.get("State")) else {
                    return;
                };
                if let Some(phone) = dev.strip_prefix("Custom:") {
                    self.arrived(phone, server, state, at);
                } else if self.home_of_phone(dev) == Some(server) {
                    self.started(dev, server, state.to_owned(), at);
                }
            }
            Some("PresenceStateChange") => {
                let Some(who) = msg.get("Presentity") else {
                    return;
                };
                let value = format!(
                    "{} {}",
                    msg.get("Status").unwrap_or(""),
                    msg.get("Message").unwrap_or("")
                )
                .trim()
                .to_owned();
                let home = PEOPLE
                    .iter()
                    .position(|p| who.strip_prefix("CustomPresence:") == Some(*p));
                if home == Some(server) {
                    self.started(who, server, value, at);
                } else {
                    self.arrived(who, server, &value, at);
                }
            }
            _ => {}
        }
    }

    fn summary(&mut self) -> String {
        let l = &mut self.stats.latencies_us;
        l.sort_unstable();
        let pct = |q: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() - 1) as f64 * q).round() as usize;
            l[i.min(l.len() - 1)] as f64 / 1000.0
        };
        format!(
            "{} changes seen on their home server; {} reached every other server \
             (latency p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms); {} superseded by a newer value \
             in flight; {} not seen everywhere within 3 s; {} still in flight at the stop",
            self.stats.changes,
            self.stats.complete,
            pct(0.5),
            pct(0.95),
            pct(1.0),
            self.stats.superseded,
            self.stats.missing,
            self.pending.len(),
        )
    }
}

fn random_key() -> String {
    let mut bytes = [0u8; 24];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    if bytes.iter().all(|b| *b == 0) {
        // No /dev/urandom: still a per-run key, from the clock and the process id.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        bytes[..16].copy_from_slice(&seed.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Federation {
    dir: Option<tempfile::TempDir>,
    sims: Vec<Daemon>,
    hubs: Vec<Daemon>,
    agents: Vec<Daemon>,
    observers: Vec<AmiClient>,
    quiet: Arc<AtomicBool>,
}

impl Federation {
    async fn stop(&mut self) -> (usize, usize) {
        self.quiet.store(true, Ordering::Relaxed);
        for o in &self.observers {
            o.shutdown().await;
        }
        let (mut clean, mut total) = (0, 0);
        // Agents first (they drain and leave), then hubs, then the simulated Asterisks.
        for group in [&mut self.agents, &mut self.hubs, &mut self.sims] {
            for d in group.iter_mut() {
                d.term();
            }
            let until = Instant::now() + Duration::from_secs(5);
            for d in group.iter_mut() {
                total += 1;
                clean += usize::from(d.wait_or_kill(until).await);
            }
        }
        (clean, total)
    }
}

async fn start(args: &Args, quiet: &Arc<AtomicBool>) -> anyhow::Result<Federation> {
    let dir = tempfile::Builder::new()
        .prefix("hintfed-demo-")
        .tempdir()
        .context("create a temporary folder")?;
    let path = dir.path().to_path_buf();
    let names: Vec<String> = (0..args.pbx).map(pbx_name).collect();
    let mut fed = Federation {
        dir: Some(dir),
        sims: Vec::new(),
        hubs: Vec::new(),
        agents: Vec::new(),
        observers: Vec::new(),
        quiet: Arc::clone(quiet),
    };

    // Hints: every server shows every phone (its own directly, the others' through Custom:).
    let mut ext = String::from("; generated by the hintfed demo\n[phones]\n");
    for i in 0..args.pbx {
        for k in 0..args.devices {
            let n = (i + 1) * 1000 + k;
            ext.push_str(&format!("exten => {n},hint,PJSIP/{n}&Custom:PJSIP/{n}\n"));
        }
    }
    let ext_path = path.join("extensions.conf");
    std::fs::write(&ext_path, ext).context("write extensions.conf")?;

    let mut amis = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let sim_args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--extensions",
            &ext_path.display().to_string(),
            "--random-devices",
            &args.devices.to_string(),
            "--first-device",
            &((i + 1) * 1000).to_string(),
            "--rate",
            &args.rate.to_string(),
            "--seed",
            &args.seed.wrapping_add(i as u64 * 7919).to_string(),
            "--log",
            "warn",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let sim = Daemon::spawn(
            &format!("sim-{name}"),
            &bin_path("hintfed-sim"),
            &sim_args,
            &[],
            &path,
            quiet,
            Some(tx),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("listening ") => {
                    if let Some(a) = line.split("addr=").nth(1) {
                        break a.trim().to_owned();
                    }
                }
                Ok(_) => {}
                Err(_) => bail!("{} did not start:\n{}", sim.name, sim.tail()),
            }
        };
        fed.sims.push(sim);
        amis.push(addr);
    }

    // The observer's AMI sessions (events on), one per server; also used to set up the phones.
    for addr in &amis {
        let mut cfg = ClientConfig::new(addr.as_str(), AMI_USER, AMI_SECRET);
        cfg.events = "on".to_owned();
        cfg.backoff_initial = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_secs(1);
        let c = AmiClient::start(cfg);
        if !c.wait_connected(Duration::from_secs(5)).await {
            bail!("the observer cannot log in to {addr}");
        }
        fed.observers.push(c);
    }
    // A phone is registered on its home server only: elsewhere it reads UNAVAILABLE, as an
    // unregistered PJSIP endpoint does (the simulator starts every hinted phone idle).
    for (i, c) in fed.observers.iter().enumerate() {
        for j in (0..args.pbx).filter(|j| *j != i) {
            for k in 0..args.devices {
                let device = format!("PJSIP/{}", (j + 1) * 1000 + k);
                let set = Message::action("SimSetDeviceState")
                    .with("Device", device.as_str())
                    .with("State", "UNAVAILABLE");
                let r = c
                    .send(set)
                    .await
                    .with_context(|| format!("set up {device}"))?;
                if r.response() != Some("Success") {
                    bail!("SimSetDeviceState {device}: {r:?}");
                }
            }
        }
    }

    let key = random_key();
    let mut hub_ports = Vec::new();
    let mut hub_http = Vec::new();
    for h in 1..=args.hubs {
        let name = format!("hub-{h}");
        let port = free_port_pair();
        let http = format!("127.0.0.1:{}", free_port());
        let config = path.join(format!("{name}.ini"));
        std::fs::write(
            &config,
            format!(
                "[general]\nlog_level = info\n\n[federation]\nshared_key = {key}\n\n\
                 [server]\nname = {name}\nlisten = tcp://127.0.0.1:{port}\n\n[http]\nlisten = {http}\n"
            ),
        )
        .context("write hub config")?;
        let hub = Daemon::spawn(
            &name,
            &bin_path("hintfed-server"),
            &["--config".to_owned(), config.display().to_string()],
            &[],
            &path,
            quiet,
            None,
        )?;
        fed.hubs.push(hub);
        hub_ports.push(port);
        hub_http.push(http);
    }
    for (h, http) in fed.hubs.iter_mut().zip(&hub_http) {
        let up = wait_until(Duration::from_secs(15), || async {
            http_get(http, "/healthz").await.starts_with("ok")
        })
        .await;
        if !up || h.exited() {
            bail!("{} did not start:\n{}", h.name, h.tail());
        }
    }

    let servers: Vec<String> = hub_ports
        .iter()
        .map(|p| format!("tcp://127.0.0.1:{p}"))
        .collect();
    let mut agent_http = Vec::new();
    for (name, addr) in names.iter().zip(&amis) {
        let (host, port) = addr.rsplit_once(':').context("sim address is host:port")?;
        let http = format!("127.0.0.1:{}", free_port());
        let config = path.join(format!("agent-{name}.ini"));
        std::fs::write(
            &config,
            format!(
                "[general]\nname = {name}\nlog_level = info\n\n\
                 [asterisk]\nsource = ami\napply = ami\nhost = {host}\nport = {port}\nusername = {AMI_USER}\n\
                 ; secret: from HINTFED_ASTERISK_SECRET\n\n\
                 [federation]\nservers = {servers}\nshared_key = {key}\n\n[http]\nlisten = {http}\n",
                servers = servers.join(", "),
            ),
        )
        .context("write agent config")?;
        let agent = Daemon::spawn(
            &format!("agent-{name}"),
            &bin_path("hintfed-agent"),
            &["--config".to_owned(), config.display().to_string()],
            &[("HINTFED_ASTERISK_SECRET", AMI_SECRET)],
            &path,
            quiet,
            None,
        )?;
        fed.agents.push(agent);
        agent_http.push(http);
    }
    for (a, http) in fed.agents.iter_mut().zip(&agent_http) {
        let ready = wait_until(Duration::from_secs(15), || async {
            http_get(http, "/readyz").await.starts_with("ready")
        })
        .await;
        if !ready || a.exited() {
            bail!(
                "{} did not become ready ({}):\n{}",
                a.name,
                http_get(http, "/readyz").await.trim(),
                a.tail()
            );
        }
    }

    println!(
        "hintfed demo: {} simulated Asterisk servers, {} hubs, {} agents on 127.0.0.1 (seed {})",
        args.pbx, args.hubs, args.pbx, args.seed
    );
    println!("  status pages (one per agent; the hubs have one too):");
    for (name, http) in names.iter().zip(&agent_http) {
        println!("    {name:<7} http://{http}/");
    }
    for (h, http) in hub_http.iter().enumerate() {
        println!("    hub-{:<3} http://{http}/", h + 1);
    }
    println!(
        "  phones under random load ({} changes/s per server):",
        args.rate
    );
    for (i, (name, addr)) in names.iter().zip(&amis).enumerate() {
        let first = (i + 1) * 1000;
        println!(
            "    {name:<7} PJSIP/{first}..PJSIP/{} + CustomPresence:{}   AMI {addr} ({AMI_USER}/{AMI_SECRET})",
            first + args.devices - 1,
            PEOPLE[i]
        );
    }
    println!("  every server has the hints exten => N,hint,PJSIP/N&Custom:PJSIP/N of all phones");
    println!(
        "  configs and daemon logs: {}{}",
        path.display(),
        if args.keep {
            " (kept)"
        } else {
            " (removed on exit)"
        }
    );
    println!(
        "  change a phone by hand: AMI action SimSetDeviceState (Device: PJSIP/1000, State: RINGING) on {}",
        amis[0]
    );
    println!();
    println!(
        "live: time (UTC), home server, what changed, new value → when each other server's \
         Custom: lamp showed it (Ctrl-C stops)"
    );
    Ok(fed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let quiet = Arc::new(AtomicBool::new(false));

    let mut fed = tokio::select! {
        r = start(&args, &quiet) => r?,
        _ = sigint.recv() => return Ok(()),
        _ = sigterm.recv() => return Ok(()),
    };

    let names: Vec<String> = (0..args.pbx).map(pbx_name).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Message, Instant)>();
    for (i, o) in fed.observers.iter().enumerate() {
        let mut sub = o.subscribe();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match sub.recv().await {
                    Ok(ClientEvent::Event(m)) => {
                        if tx.send((i, m, Instant::now())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    let mut obs = Observer {
        names: names.clone(),
        pending: HashMap::new(),
        early: HashMap::new(),
        last_started: HashMap::new(),
        stats: Stats::default(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let presence_every = Duration::from_secs(7);
    let mut next_presence = Instant::now() + Duration::from_secs(2);
    let mut presence_turn = 0usize;
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let reason = loop {
        tokio::select! {
            Some((i, m, at)) = rx.recv() => obs.on_event(i, &m, at),
            _ = tick.tick() => {
                obs.sweep();
                let dead = fed
                    .sims
                    .iter_mut()
                    .chain(fed.hubs.iter_mut())
                    .chain(fed.agents.iter_mut())
                    .find_map(|d| d.exited().then(|| format!("{} exited unexpectedly:\n{}", d.name, d.tail())));
                if let Some(why) = dead {
                    break why;
                }
                if Instant::now() >= next_presence {
                    next_presence += presence_every;
                    let i = presence_turn % args.pbx;
                    let busy = (presence_turn / args.pbx).is_multiple_of(2);
                    presence_turn += 1;
                    let value = if busy { "dnd,,in a meeting" } else { "available,," };
                    let c = fed.observers[i].clone();
                    let var = format!("PRESENCE_STATE(CustomPresence:{})", PEOPLE[i]);
                    tokio::spawn(async move { let _ = c.send(actions::setvar(&var, value)).await; });
                }
            }
            _ = async { match until { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => break "duration reached".to_owned(),
            _ = sigint.recv() => break "SIGINT".to_owned(),
            _ = sigterm.recv() => break "SIGTERM".to_owned(),
            _ = sighup.recv() => break "SIGHUP".to_owned(),
        }
    };
    println!();
    println!("stopping ({reason}) …");
    println!("summary: {}", obs.summary());
    let (clean, total) = fed.stop().await;
    let dir = fed.dir.take();
    let shown = dir
        .as_ref()
        .map(|d| d.path().display().to_string())
        .unwrap_or_default();
    if args.keep {
        if let Some(d) = dir {
            let kept = d.keep();
            println!(
                "stopped {total} processes ({clean} exited on SIGTERM); kept {}",
                kept.display()
            );
        }
    } else {
        drop(dir);
        println!("stopped {total} processes ({clean} exited on SIGTERM); removed {shown}");
    }
    Ok(())
}
