//! `hintfed-bench run`: the whole measurement.
//!
//! 1. One `hintfed-sim` serves `--servers` simulated Asterisks plus one spare (`ceiling`),
//!    with `--trace` on.
//! 2. Ceilings: pipelined Setvar/s on the spare (or on `--asterisk`), raw ZeroMQ PUB/SUB
//!    messages/s between two processes.
//! 3. `--hubs` `hintfed-server` and one `hintfed-agent` per Asterisk (AMI source and apply,
//!    HMAC on), each ready (`/readyz`).
//! 4. Load: one pipelined AMI connection per origin sends `SimSetDeviceState` at
//!    `--rate`/servers per second, over `--devices` phones per server (`PJSIP/b<s>n<j>`, in
//!    turn, states cycling INUSE, NOT_INUSE, RINGING, BUSY): first the prefill (every phone
//!    once, then until every server holds them all; `--prefill false` skips it), then the
//!    measured load for `--duration`.
//! 5. Drain: until no server's `SetvarTotal` moves for a second.
//! 6. Convergence: `DeviceStateList` of every server holds, for every other origin's phone,
//!    `Custom:<phone>` equal to the last state driven on its origin.
//! 7. CPU seconds over the load window and peak RSS (VmHWM) of every daemon; latency and
//!    Setvar rates from the trace ([`crate::analyze`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::ami::{self, Conn};
use crate::ceiling;
use crate::procs::{self, Daemon, Usage};
use hintfed_transport::{SubClient, SubClientConfig};

/// Options of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Simulated Asterisk servers (one agent each).
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Hubs (`hintfed-server`); every agent talks to all of them.
    #[arg(long, default_value_t = 1)]
    pub hubs: usize,
    /// Phones per server.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Phone changes per second, in total over all servers.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unanswered actions allowed per load connection.
    #[arg(long, default_value_t = 512)]
    pub window: u64,
    /// Setvar sent for the Setvar ceiling (0: skip).
    #[arg(long, default_value_t = 100_000)]
    pub setvar_count: u64,
    /// Messages sent for the ZeroMQ PUB/SUB ceiling (0: skip).
    #[arg(long, default_value_t = 500_000)]
    pub zmq_count: u64,
    /// Payload bytes per ZeroMQ ceiling message (about one signed envelope).
    #[arg(long, default_value_t = 200)]
    pub zmq_size: usize,
    /// Measure the Setvar ceiling on this real Asterisk (host:port) instead of the simulator.
    #[arg(long)]
    pub asterisk: Option<String>,
    /// AMI user (simulator and --asterisk).
    #[arg(long, default_value = "admin")]
    pub ami_user: String,
    /// AMI secret (simulator and --asterisk).
    #[arg(
        long,
        env = "HINTFED_BENCH_SECRET",
        default_value = "adminsecret",
        hide_env_values = true
    )]
    pub ami_secret: String,
    /// Write the JSON report here as well.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep configs, logs and the trace in this folder (default: a temporary folder).
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// `origin_timeout` of agents and hubs.
    #[arg(long, default_value = "15s")]
    pub origin_timeout: String,
    /// Longest wait (s) after the load for every server to converge (and its Setvar count to
    /// stand still for a second).
    #[arg(long, default_value_t = 120.0)]
    pub drain_timeout: f64,
    /// Record when each update leaves the first hub (a SUB on its PUB in this process) to
    /// split the latency at the hub.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tap: bool,
    /// The simulator writes the responses and events that are ready together in one write
    /// (`hintfed-sim --coalesce-writes`): it stands in for `--servers` Asterisk machines, and
    /// this keeps its own CPU off the 2 cores it shares with what is measured. `false`: one
    /// write per response and per event, as Asterisk does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sim_coalesce: bool,
    /// Runtime threads of the simulator (`hintfed-sim --worker-threads`; 0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub sim_threads: usize,
    /// The hubs' `[general] worker_threads` (0: the hub's default, one per CPU).
    #[arg(long, default_value_t = 0)]
    pub hub_threads: usize,
    /// Log level of the daemons.
    #[arg(long, default_value = "warn")]
    pub log: String,
    /// When each origin's phones change: `poisson` (each origin on its own, at random
    /// exponential intervals, as independent callers do) or `lockstep` (every origin at the
    /// same instants, `--servers` changes at once each `servers / rate` s: the worst case,
    /// and what every run before session 8 measured).
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    pub arrivals: Arrivals,
    /// Seed of the `poisson` arrival times (the same seed, the same schedule).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Before the measured load, every phone is set once (its first state, at `--rate`, with
    /// the same arrivals) and the run waits until every server holds every phone: the
    /// figures are then of phones that exist everywhere (the steady state of a running
    /// federation), and the prefill's own latency is reported apart as the cost of new
    /// keys. `false`: the load starts on phones nobody has seen (its first pass is new keys
    /// everywhere), as every run before session 11 measured.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefill: bool,
    /// The hubs' `[server] fanout_linger` (e.g. `2ms`; default: the hub's own default).
    #[arg(long)]
    pub fanout_linger: Option<String>,
}

/// When the load's phone changes happen (see [`RunArgs::arrivals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    /// Independent per origin, exponential gaps (a Poisson process of the total rate).
    Poisson,
    /// Every origin at the same instants, evenly spaced.
    Lockstep,
}

impl Arrivals {
    fn name(self) -> &'static str {
        match self {
            Self::Poisson => "poisson",
            Self::Lockstep => "lockstep",
        }
    }
}

/// The times (s after the start) of one origin's changes, at `rate` per second.
struct Schedule {
    arrivals: Arrivals,
    rate: f64,
    next: f64,
    k: u64,
    rng: u64,
}

impl Schedule {
    fn new(arrivals: Arrivals, rate: f64, seed: u64, origin: usize) -> Self {
        let mut s = Self {
            arrivals,
            rate,
            next: 0.0,
            k: 0,
            // Each origin's stream starts at a mixed, unrelated point: streams a few steps
            // apart (`seed ^ origin * GAMMA`) were near copies, all high or all low.
            rng: mix64(seed ^ mix64(origin as u64 + 1)),
        };
        s.advance();
        s
    }

    /// Moves past the next change.
    fn advance(&mut self) {
        self.k += 1;
        self.next = match self.arrivals {
            Arrivals::Lockstep => self.k as f64 / self.rate,
            Arrivals::Poisson => self.next - (1.0 - self.uniform()).ln() / self.rate,
        };
    }

    /// The time of the next change.
    fn peek(&self) -> f64 {
        self.next
    }

    /// Uniform in [0, 1) (SplitMix64).
    fn uniform(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (mix64(self.rng) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One origin's load connection and the number of changes it drove so far (its phones
/// change in turn: change `k` sets phone `k % devices` to `STATES[(k / devices) % 4]`).
struct Driver {
    server: usize,
    pipe: ami::Pipe,
    k: u64,
}

/// A stretch of load: every origin drives changes at `per_server`/s (`arrivals`, from the
/// phase's start) until `until` seconds or `count` changes, whichever comes first, then
/// waits until they are answered.
struct Phase {
    arrivals: Arrivals,
    per_server: f64,
    seed: u64,
    until: f64,
    count: u64,
    devices: usize,
    window: u64,
}

impl Phase {
    /// Runs the phase on every driver at once; gives them back, moved on.
    async fn drive(&self, drivers: Vec<Driver>) -> anyhow::Result<Vec<Driver>> {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for mut d in drivers {
            let mut schedule = Schedule::new(self.arrivals, self.per_server, self.seed, d.server);
            let (until, devices, window) = (self.until, self.devices as u64, self.window);
            let end = d.k.saturating_add(self.count);
            tasks.push(tokio::spawn(async move {
                let mut dev = String::new();
                let due = |s: &Schedule, k: u64| s.peek() < until && k < end;
                while due(&schedule, d.k) {
                    tokio::time::sleep_until(
                        (t0 + Duration::from_secs_f64(schedule.peek())).into(),
                    )
                    .await;
                    // Every change due by now (the timer's resolution is 1 ms), then one flush.
                    let el = t0.elapsed().as_secs_f64();
                    while schedule.peek() <= el && due(&schedule, d.k) {
                        schedule.advance();
                        dev.clear();
                        write_device(&mut dev, d.server, (d.k % devices) as usize);
                        let state = STATES[((d.k / devices) % 4) as usize];
                        d.pipe
                            .send(
                                &[
                                    ("Action", "SimSetDeviceState"),
                                    ("Device", &dev),
                                    ("State", state),
                                ],
                                window,
                            )
                            .await?;
                        d.k += 1;
                    }
                    d.pipe.flush().await?;
                }
                d.pipe.drain(Duration::from_secs(30)).await?;
                anyhow::Ok(d)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        Ok(out)
    }
}

/// Waits until every server holds the last state driven of every phone and the Setvar
/// counts stood still for a second, or `timeout` seconds; the last comparison, and how long
/// after the call it first found no mismatch.
async fn settle(
    probes: &mut [Conn],
    driven: &[u64],
    names: &[String],
    devices: usize,
    timeout: f64,
) -> anyhow::Result<(Convergence, Option<f64>)> {
    let t0 = Instant::now();
    let mut last: Vec<u64> = Vec::new();
    let mut stable_since = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(timeout);
    let mut converged_after = None;
    loop {
        let mut now = Vec::new();
        for p in probes.iter_mut() {
            now.push(p.setvar_total().await?);
        }
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        if stable_since.elapsed() >= Duration::from_secs(1) || Instant::now() >= deadline {
            let c = convergence(probes, driven, names, devices).await?;
            if c.mismatches == 0 {
                converged_after.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            }
            if c.mismatches == 0 || Instant::now() >= deadline {
                return Ok((c, converged_after));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const STATES: [&str; 4] = ["INUSE", "NOT_INUSE", "RINGING", "BUSY"];
const SHARED_KEY: &str = "bench-shared-key";

fn now_ns() -> u128 {
    u128::from(crate::hubproc::unix_ns())
}

/// A subscriber on a hub's PUB (the project's own ZMTP SUB, [`SubClient`]) that writes
/// `<unix-ns> <device> <value>` for every device update it sees (the time the update left the
/// hub, on the trace's clock: taken when the tap reads it), until `stop`.
async fn hub_tap(
    pub_endpoint: &str,
    path: PathBuf,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::io::Write as _;
    let mut config = SubClientConfig::new(pub_endpoint);
    config.subscriptions = vec![hintfed_core::envelope::topics::DEVICE.to_owned()];
    // Room for seconds of the load, should this task fall behind (drops are reported).
    config.inbound_capacity = 1 << 17;
    let (sub, rx) = SubClient::connect(config)?;
    anyhow::ensure!(
        sub.wait_connected(Duration::from_secs(10)).await,
        "hub tap: no connection to {pub_endpoint}"
    );
    let file = std::io::BufWriter::with_capacity(1 << 16, std::fs::File::create(&path)?);
    Ok(tokio::spawn(async move {
        let mut w = tap_lines(rx, stop, file, TAP_KEEP).await;
        let _ = w.flush();
        let lost = sub.stats().dropped_inbound_full;
        if lost > 0 {
            eprintln!("hub tap: {lost} updates dropped (the tap fell behind)");
        }
    }))
}

/// Messages the hub tap keeps before it decodes and writes them (about 300 B each).
const TAP_KEEP: usize = 1 << 19;

/// Writes the tap's line of every device update received on `rx` to `out` until `stop` or
/// the end of `rx`; gives `out` back. Each message is stamped when read and kept as it came;
/// they are decoded and written at the end (or whenever `keep` wait), not while the load
/// runs on the cores the tool measures.
async fn tap_lines<W: std::io::Write>(
    mut rx: tokio::sync::mpsc::Receiver<hintfed_transport::Frames>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    mut out: W,
    keep: usize,
) -> W {
    let tap = Tap::default();
    let mut batch = Vec::with_capacity(1024);
    let mut pending: Vec<(u128, bytes::Bytes)> = Vec::with_capacity(1 << 16);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            n = rx.recv_many(&mut batch, 1024) => if n == 0 { break },
        }
        // What one read of the SUB delivered arrived together: one time for all of it.
        let t = now_ns();
        for frames in batch.drain(..) {
            // `[topic, signed envelope]`: the envelope.
            if let Some(payload) = frames.into_iter().nth(1) {
                pending.push((t, payload));
            }
        }
        if pending.len() >= keep {
            for (t, payload) in pending.drain(..) {
                tap.write(&mut out, t, &payload);
            }
        }
    }
    for (t, payload) in pending {
        tap.write(&mut out, t, &payload);
    }
    out
}

/// What the hub tap makes of one message of a hub's PUB.
#[derive(Default)]
struct Tap {
    /// Empty: the tap reads, it does not verify (the agents check every MAC).
    keys: hintfed_core::KeyRing,
    limits: hintfed_core::envelope::Limits,
}

impl Tap {
    /// Writes `<t> <device> <value>` when `payload` (a signed envelope, the second frame of
    /// what a hub publishes) holds a device update; whether it did.
    fn write(&self, out: &mut impl std::io::Write, t: u128, payload: &[u8]) -> bool {
        if let Ok(env) = hintfed_core::open(payload, &self.keys, &self.limits)
            && let hintfed_core::Body::Update(u) = &env.body
            && let hintfed_core::Value::Device(d) = u.value
        {
            return writeln!(out, "{t} {} {}", u.key, d.as_str()).is_ok();
        }
        false
    }
}

/// Runs `task` on a new runtime with one thread per CPU (what `#[tokio::main]` gives), from
/// a blocking thread (the tasks of `run`'s own runtime go on meanwhile).
async fn on_threads<T: Send + 'static>(
    task: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || tokio::runtime::Runtime::new()?.block_on(task)).await?
}

/// Phone `j` of server `s`.
fn device(s: usize, j: usize) -> String {
    let mut d = String::new();
    write_device(&mut d, s, j);
    d
}

/// Appends phone `j` of server `s` (`PJSIP/b<s>n<j>`) to `out`.
fn write_device(out: &mut String, s: usize, j: usize) {
    use std::fmt::Write as _;
    let _ = write!(out, "PJSIP/b{s}n{j}");
}

/// Runs the benchmark; returns the JSON report (also printed with a table).
pub async fn run(a: RunArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(a.servers >= 2, "--servers must be at least 2");
    anyhow::ensure!(a.hubs >= 1, "--hubs must be at least 1");
    anyhow::ensure!(a.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(
        a.rate > 0.0 && a.duration > 0.0,
        "--rate and --duration must be > 0"
    );
    let machine_before = procs::machine();
    let (tmp, dir) = procs::work_dir(a.keep.as_deref())?;
    let tck = procs::clk_tck();
    let names: Vec<String> = (0..a.servers).map(|i| format!("pbx-{i}")).collect();

    // 1. Simulators.
    let trace = dir.join("trace.log");
    let mut addrs = BTreeMap::new();
    let mut sim_args = Vec::new();
    for n in names.iter().chain(std::iter::once(&"ceiling".to_owned())) {
        let addr = format!("127.0.0.1:{}", procs::free_port()?);
        sim_args.extend(["--listen".into(), addr.clone(), "--name".into(), n.clone()]);
        addrs.insert(n.clone(), addr);
    }
    sim_args.extend([
        "--trace".into(),
        trace.display().to_string(),
        "--log".into(),
        a.log.clone(),
        "--username".into(),
        a.ami_user.clone(),
        "--event-buffer".into(),
        "65536".into(),
    ]);
    if a.sim_coalesce {
        sim_args.push("--coalesce-writes".into());
    }
    sim_args.extend(["--worker-threads".into(), a.sim_threads.to_string()]);
    let secret_env = [("HINTFED_SIM_SECRET", a.ami_secret.as_str())];
    let mut sim = Daemon::spawn(
        "sim",
        &procs::sibling("hintfed-sim")?,
        &sim_args,
        &secret_env,
        &dir,
    )?;
    for (n, addr) in &addrs {
        let ok = procs::wait_until(Duration::from_secs(15), || async {
            Conn::login(addr, &a.ami_user, &a.ami_secret).await.is_ok()
        })
        .await;
        anyhow::ensure!(
            ok,
            "simulated Asterisk {n} did not come up (see {})",
            sim.log.display()
        );
    }

    // 2. Ceilings, on a runtime with one thread per CPU as before `run` moved to one thread
    // (their figures stay comparable with earlier runs').
    eprintln!("measuring ceilings ...");
    let setvar_ceiling = if a.setvar_count > 0 {
        let target = a
            .asterisk
            .clone()
            .unwrap_or_else(|| addrs["ceiling"].clone());
        let (user, secret, count, window) = (
            a.ami_user.clone(),
            a.ami_secret.clone(),
            a.setvar_count,
            a.window,
        );
        Some(
            on_threads(async move {
                let session = ceiling::Session::EventsOff;
                ceiling::setvar(&target, &user, &secret, count, window, 1000, session, 0).await
            })
            .await
            .context("Setvar ceiling")?,
        )
    } else {
        None
    };
    let zmq_ceiling = if a.zmq_count > 0 {
        let (count, size) = (a.zmq_count, a.zmq_size);
        Some(
            on_threads(ceiling::zmq_pubsub(count, size))
                .await
                .context("ZeroMQ ceiling")?,
        )
    } else {
        None
    };

    // 3. Hubs and agents.
    eprintln!("starting {} hub(s) and {} agent(s) ...", a.hubs, a.servers);
    let mut hubs = Vec::new();
    let mut hub_eps = Vec::new();
    for i in 0..a.hubs {
        let name = format!("hub-{i}");
        let port = procs::free_port_pair()?;
        let http = format!("127.0.0.1:{}", procs::free_port()?);
        let cfg = dir.join(format!("{name}.ini"));
        std::fs::write(
            &cfg,
            format!(
                "[general]\nname = {name}\nlog_level = {log}\n{threads}\n[federation]\nshared_key = {SHARED_KEY}\norigin_timeout = {ot}\n\n[server]\nlisten = tcp://127.0.0.1:{port}\n{linger}\n[http]\nlisten = {http}\n",
                log = a.log,
                ot = a.origin_timeout,
                threads = match a.hub_threads {
                    0 => String::new(),
                    n => format!("worker_threads = {n}\n"),
                },
                linger = a
                    .fanout_linger
                    .as_ref()
                    .map(|l| format!("fanout_linger = {l}\n"))
                    .unwrap_or_default(),
            ),
        )?;
        let d = Daemon::spawn(
            &name,
            &procs::sibling("hintfed-server")?,
            &["--config".into(), cfg.display().to_string()],
            &[],
            &dir,
        )?;
        hub_eps.push(format!("tcp://127.0.0.1:{port}"));
        hubs.push((d, http));
    }
    for (d, http) in &hubs {
        let ok = procs::wait_until(Duration::from_secs(15), || async {
            procs::http_get(http, "/healthz").await.contains("ok")
        })
        .await;
        anyhow::ensure!(ok, "{} did not come up (see {})", d.name, d.log.display());
    }
    let mut agents = Vec::new();
    for n in &names {
        let (host, port) = addrs[n].rsplit_once(':').context("host:port")?;
        let http = format!("127.0.0.1:{}", procs::free_port()?);
        let cfg = dir.join(format!("agent-{n}.ini"));
        std::fs::write(
            &cfg,
            format!(
                "[general]\nname = {n}\nlog_level = {log}\n\n[asterisk]\nsource = ami\napply = ami\nhost = {host}\nport = {port}\nusername = {user}\n\n[federation]\nservers = {servers}\nshared_key = {SHARED_KEY}\norigin_timeout = {ot}\n\n[http]\nlisten = {http}\n",
                log = a.log,
                user = a.ami_user,
                servers = hub_eps.join(", "),
                ot = a.origin_timeout,
            ),
        )?;
        let d = Daemon::spawn(
            &format!("agent-{n}"),
            &procs::sibling("hintfed-agent")?,
            &["--config".into(), cfg.display().to_string()],
            &[("HINTFED_ASTERISK_SECRET", a.ami_secret.as_str())],
            &dir,
        )?;
        agents.push((d, http));
    }
    for (d, http) in &agents {
        let ok = procs::wait_until(Duration::from_secs(20), || async {
            procs::http_get(http, "/readyz").await.starts_with("ready")
        })
        .await;
        anyhow::ensure!(ok, "{} not ready (see {})", d.name, d.log.display());
    }
    // A `ready` may come from another daemon holding the port of one that could not bind it.
    sim.ensure_running()?;
    for (d, _) in hubs.iter_mut().chain(agents.iter_mut()) {
        d.ensure_running()?;
    }

    // A tap on the first hub's PUB splits the latency at the hub.
    let tap_path = dir.join("hubtap.log");
    let (tap_stop, tap_rx) = tokio::sync::oneshot::channel();
    let tap = if a.tap {
        let (host, port) = hub_eps[0]
            .rsplit_once(':')
            .context("hub endpoint host:port")?;
        let pub_ep = format!("{host}:{}", port.parse::<u16>()? + 1);
        Some(hub_tap(&pub_ep, tap_path.clone(), tap_rx).await?)
    } else {
        None
    };

    // 4. Prefill (steady state), then the load.
    let mut daemons: Vec<(&str, u32)> = vec![("sim (all servers)", sim.pid())];
    daemons.extend(hubs.iter().map(|(d, _)| (d.name.as_str(), d.pid())));
    daemons.extend(agents.iter().map(|(d, _)| (d.name.as_str(), d.pid())));
    let per_server = a.rate / a.servers as f64;
    let mut drivers = Vec::new();
    for (s, n) in names.iter().enumerate() {
        let conn = Conn::login(&addrs[n], &a.ami_user, &a.ami_secret).await?;
        drivers.push(Driver {
            server: s,
            pipe: conn.into_pipe(),
            k: 0,
        });
    }
    let mut probes = Vec::new();
    for n in &names {
        probes.push(Conn::login(&addrs[n], &a.ami_user, &a.ami_secret).await?);
    }
    let prefill = if a.prefill {
        eprintln!(
            "prefill: every phone once at {} changes/s, then until every server holds them ...",
            a.rate
        );
        let start_ns = now_ns();
        let phase = Phase {
            arrivals: a.arrivals,
            per_server,
            seed: a.seed,
            until: f64::INFINITY,
            count: a.devices as u64,
            devices: a.devices,
            window: a.window,
        };
        drivers = phase.drive(drivers).await?;
        let secs = (now_ns() - start_ns) as f64 / 1e9;
        let end_ns = now_ns();
        let driven: Vec<u64> = drivers.iter().map(|d| d.k).collect();
        let (conv, after) =
            settle(&mut probes, &driven, &names, a.devices, a.drain_timeout).await?;
        anyhow::ensure!(
            conv.mismatches == 0,
            "the prefill did not converge within {} s: {} of {} states wrong (e.g. {})",
            a.drain_timeout,
            conv.mismatches,
            conv.checked,
            conv.example.unwrap_or_default()
        );
        Some((start_ns, end_ns, secs, after))
    } else {
        None
    };
    let prefilled: Vec<(u64, u64)> = drivers.iter().map(|d| d.pipe.counts()).collect();

    let before: Vec<Usage> = daemons
        .iter()
        .map(|(_, p)| procs::usage(*p, tck).unwrap_or_default())
        .collect();
    let tool_before = procs::usage(std::process::id(), tck).unwrap_or_default();
    eprintln!(
        "driving {} changes/s over {} servers x {} phones for {} s ...",
        a.rate, a.servers, a.devices, a.duration
    );
    let start_ns = now_ns();
    let t0 = Instant::now();
    let phase = Phase {
        arrivals: a.arrivals,
        per_server,
        seed: a.seed,
        until: a.duration,
        count: u64::MAX,
        devices: a.devices,
        window: a.window,
    };
    let drivers = phase.drive(drivers).await?;
    let load_secs = t0.elapsed().as_secs_f64();
    let load_end_ns = now_ns();

    // 5. Drain and convergence: every server's states are compared with the origins' last
    // ones until they all match and the Setvar counts stood still for a second (repairs of
    // lost messages wait for a gap's grace and a snapshot, seconds after the load), or the
    // drain timeout.
    let driven: Vec<u64> = drivers.iter().map(|d| d.k).collect();
    let (conv, converged_after) =
        settle(&mut probes, &driven, &names, a.devices, a.drain_timeout).await?;
    if let Some((server, origin, phone)) = &conv.first {
        // What the daemons' tables say of the first mismatch (`/api/state` rows).
        let mut views = vec![
            (names[*server].clone(), agents[*server].1.clone()),
            (names[*origin].clone(), agents[*origin].1.clone()),
        ];
        views.extend(
            hubs.iter()
                .enumerate()
                .map(|(i, (_, h))| (format!("hub-{i}"), h.clone())),
        );
        for (who, http) in views {
            let body = procs::http_get(&http, "/api/state").await;
            let row = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v["devices"]
                        .as_array()?
                        .iter()
                        .find(|d| d["key"].as_str() == Some(phone.as_str()))
                        .cloned()
                });
            eprintln!(
                "mismatch {phone}: {who}'s table: {}",
                row.unwrap_or_default()
            );
        }
    }
    let after: Vec<Usage> = daemons
        .iter()
        .map(|(_, p)| procs::usage(*p, tck).unwrap_or_default())
        .collect();
    let tool_cpu = procs::usage(std::process::id(), tck)
        .unwrap_or_default()
        .cpu_secs
        - tool_before.cpu_secs;

    // 7. Figures.
    tokio::time::sleep(Duration::from_millis(400)).await; // the trace is written every 50 ms
    let tap_file = match tap {
        Some(h) => {
            let _ = tap_stop.send(());
            let _ = h.await;
            Some(tap_path.as_path())
        }
        None => None,
    };
    let an = crate::analyze::analyze(&trace, start_ns..u128::MAX, "PJSIP/b", &names, tap_file)?;
    let prefill_json = match prefill {
        Some((from, to, secs, after)) => {
            let p = crate::analyze::analyze(&trace, from..to, "PJSIP/b", &names, None)?;
            json!({"changes": p.changes, "secs": secs,
                   "expected_deliveries": p.expected, "matched_deliveries": p.latencies_us.len(),
                   "p50_ms": p.quantile_ms(0.5), "p99_ms": p.quantile_ms(0.99),
                   "max_ms": p.quantile_ms(1.0), "converged_after_s": after})
        }
        None => serde_json::Value::Null,
    };
    let offered: u64 = drivers.iter().zip(&prefilled).map(|(d, p)| d.k - p.0).sum();
    let accepted: u64 = drivers
        .iter()
        .zip(&prefilled)
        .map(|(d, p)| d.pipe.counts().1 - p.1)
        .sum();
    let drain_ms = an.last_set_ns.saturating_sub(load_end_ns) as f64 / 1e6;
    let setvar_rates: BTreeMap<String, f64> = names
        .iter()
        .map(|n| {
            let c = an.sets.get(n).copied().unwrap_or(0);
            (n.clone(), c as f64 / load_secs)
        })
        .collect();
    let updates_per_sec = an.changes as f64 / load_secs;
    let delivered = an.latencies_us.len() as u64;
    // CPU per delivery (one update written to one other server): a figure of work done,
    // less moved by the host's speed than the latency is.
    let per_delivery = |cpu_secs: f64| 1e6 * cpu_secs / (delivered.max(1) as f64);
    let cpu_total: f64 = before
        .iter()
        .zip(&after)
        .map(|(b, e)| e.cpu_secs - b.cpu_secs)
        .sum();
    let daemon_json: Vec<serde_json::Value> = daemons
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, pid), (b, e))| {
            json!({
                "name": name, "pid": pid,
                "cpu_percent": 100.0 * (e.cpu_secs - b.cpu_secs) / load_secs.max(1e-9),
                "cpu_us_per_delivery": per_delivery(e.cpu_secs - b.cpu_secs),
                "peak_rss_mib": e.peak_rss_kib as f64 / 1024.0,
                "rss_mib": e.rss_kib as f64 / 1024.0,
            })
        })
        .collect();
    let max_setvar_rate = setvar_rates.values().copied().fold(0.0, f64::max);
    let report = json!({
        "machine_before": machine_before,
        "machine_after": procs::machine(),
        "topology": {"servers": a.servers, "hubs": a.hubs, "devices_per_server": a.devices,
                      "rate_offered": a.rate, "duration_s": a.duration,
                      "sim_coalesce_writes": a.sim_coalesce, "arrivals": a.arrivals.name(),
                      "seed": a.seed, "fanout_linger": a.fanout_linger, "hub_threads": a.hub_threads,
                      "sim_threads": a.sim_threads,
                      "prefill": a.prefill},
        "prefill": prefill_json,
        "ceilings": {
            "setvar_per_sec": setvar_ceiling.map(|c| c.per_sec),
            "setvar_target": a.asterisk.clone().unwrap_or_else(|| "simulator".into()),
            "zmq_pubsub_msgs_per_sec": zmq_ceiling.map(|c| c.msgs_per_sec),
            "zmq_msg_bytes": a.zmq_size,
            "zmq_received_of_sent": zmq_ceiling.map(|c| format!("{}/{}", c.received, c.sent)),
        },
        "load": {"changes_sent": offered, "changes_accepted": accepted,
                 "changes_traced": an.changes, "load_secs": load_secs,
                 "updates_per_sec": updates_per_sec},
        "propagation": {
            "expected_deliveries": an.expected, "matched_deliveries": delivered,
            "unmatched_conflated_or_lost": an.expected.saturating_sub(delivered),
            "p50_ms": an.quantile_ms(0.5), "p99_ms": an.quantile_ms(0.99),
            "p999_ms": an.quantile_ms(0.999), "max_ms": an.quantile_ms(1.0),
            "drain_after_load_ms": drain_ms,
            "hub_split": tap_file.map(|_| json!({
                "origin_to_hub_out": {"samples": an.to_hub_us.len(),
                    "p50_ms": crate::analyze::quantile_ms(&an.to_hub_us, 0.5),
                    "p99_ms": crate::analyze::quantile_ms(&an.to_hub_us, 0.99),
                    "max_ms": crate::analyze::quantile_ms(&an.to_hub_us, 1.0)},
                "hub_out_to_setvar": {"samples": an.from_hub_us.len(),
                    "p50_ms": crate::analyze::quantile_ms(&an.from_hub_us, 0.5),
                    "p99_ms": crate::analyze::quantile_ms(&an.from_hub_us, 0.99),
                    "max_ms": crate::analyze::quantile_ms(&an.from_hub_us, 1.0)},
            })),
        },
        "setvar_per_sec_per_server": setvar_rates,
        "ratios": {
            "max_setvar_rate_to_setvar_ceiling": setvar_ceiling.map(|c| max_setvar_rate / c.per_sec),
            "fanout_msgs_to_zmq_ceiling": zmq_ceiling.map(|c| updates_per_sec * a.servers as f64 / c.msgs_per_sec),
        },
        "daemons": daemon_json,
        // This process (load, hub tap, probes) shares the cores; not in the daemons' total.
        "load_tool": {"cpu_percent": 100.0 * tool_cpu / load_secs.max(1e-9),
                      "cpu_us_per_delivery": per_delivery(tool_cpu)},
        "cpu_us_per_delivery": per_delivery(cpu_total),
        "convergence": {"checked": conv.checked, "mismatches": conv.mismatches,
                        "converged": conv.mismatches == 0, "example": conv.example,
                        "by_server_and_origin": conv.by_pair,
                        "after_load_s": converged_after},
        "logs": dir.display().to_string(),
    });
    print_table(&report);
    // Daemons stop here (dropped); keep the temp dir alive until then.
    drop(probes);
    for (mut d, _) in agents.into_iter().chain(hubs) {
        d.stop(Duration::from_secs(2));
    }
    drop(sim);
    drop(tmp);
    Ok(report)
}

fn f(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
        None if v.is_null() => "n/a".to_owned(),
        None => v.to_string(),
    }
}

fn print_table(r: &serde_json::Value) {
    let t = &r["topology"];
    println!(
        "topology: {} servers, {} hub(s), {} phones/server, offered {} changes/s ({} arrivals) \
         for {} s; simulator writes {}",
        t["servers"],
        t["hubs"],
        t["devices_per_server"],
        t["rate_offered"],
        t["arrivals"].as_str().unwrap_or("lockstep"),
        t["duration_s"],
        if t["sim_coalesce_writes"] == true {
            "what is ready together"
        } else {
            "each message on its own"
        }
    );
    let c = &r["ceilings"];
    println!(
        "ceilings: Setvar {} /s ({}), ZeroMQ PUB/SUB {} msg/s of {} B (received {})",
        f(&c["setvar_per_sec"]),
        c["setvar_target"].as_str().unwrap_or("?"),
        f(&c["zmq_pubsub_msgs_per_sec"]),
        c["zmq_msg_bytes"],
        c["zmq_received_of_sent"].as_str().unwrap_or("n/a")
    );
    let pf = &r["prefill"];
    if pf.is_null() {
        println!("prefill: none (the load's first pass sets phones nobody has seen)");
    } else {
        println!(
            "prefill (new phones, not in the figures below): {} changes in {} s, p50 {} ms, p99 {} ms, max {} ms; converged {} s after",
            pf["changes"],
            f(&pf["secs"]),
            f(&pf["p50_ms"]),
            f(&pf["p99_ms"]),
            f(&pf["max_ms"]),
            f(&pf["converged_after_s"])
        );
    }
    let l = &r["load"];
    println!(
        "load: {} sent, {} traced, {} updates/s sustained over {} s",
        l["changes_sent"],
        l["changes_traced"],
        f(&l["updates_per_sec"]),
        f(&l["load_secs"])
    );
    let p = &r["propagation"];
    println!(
        "propagation: p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms; {}/{} deliveries matched ({} conflated or lost); drain {} ms",
        f(&p["p50_ms"]),
        f(&p["p99_ms"]),
        f(&p["p999_ms"]),
        f(&p["max_ms"]),
        p["matched_deliveries"],
        p["expected_deliveries"],
        p["unmatched_conflated_or_lost"],
        f(&p["drain_after_load_ms"])
    );
    let h = &p["hub_split"];
    if !h.is_null() {
        let (i, o) = (&h["origin_to_hub_out"], &h["hub_out_to_setvar"]);
        println!(
            "  split at hub-0's PUB: origin -> hub out p50 {} / p99 {} / max {} ms ({} changes); hub out -> Setvar p50 {} / p99 {} / max {} ms",
            f(&i["p50_ms"]),
            f(&i["p99_ms"]),
            f(&i["max_ms"]),
            i["samples"],
            f(&o["p50_ms"]),
            f(&o["p99_ms"]),
            f(&o["max_ms"])
        );
    }
    if let Some(m) = r["setvar_per_sec_per_server"].as_object() {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {}", f(v))).collect();
        println!("setvar/s per server: {}", parts.join(", "));
    }
    let q = &r["ratios"];
    println!(
        "ratios: busiest server Setvar/s / Setvar ceiling = {}; fan-out msg/s / ZeroMQ ceiling = {}",
        f(&q["max_setvar_rate_to_setvar_ceiling"]),
        f(&q["fanout_msgs_to_zmq_ceiling"])
    );
    println!(
        "{:<22} {:>8} {:>16} {:>14}",
        "daemon", "cpu %", "cpu us/delivery", "peak RSS MiB"
    );
    if let Some(ds) = r["daemons"].as_array() {
        for d in ds {
            println!(
                "{:<22} {:>8} {:>16} {:>14}",
                d["name"].as_str().unwrap_or("?"),
                f(&d["cpu_percent"]),
                f(&d["cpu_us_per_delivery"]),
                f(&d["peak_rss_mib"])
            );
        }
    }
    println!(
        "all daemons: {} us of CPU per delivery (the load tool itself: {} %, {} us)",
        f(&r["cpu_us_per_delivery"]),
        f(&r["load_tool"]["cpu_percent"]),
        f(&r["load_tool"]["cpu_us_per_delivery"])
    );
    let v = &r["convergence"];
    println!(
        "convergence: {} ({} checked, {} mismatches{})",
        match v["after_load_s"].as_f64() {
            Some(t) => format!("CONVERGED {t:.1} s after the load"),
            None => "NOT CONVERGED".to_owned(),
        },
        v["checked"],
        v["mismatches"],
        v["example"]
            .as_str()
            .map(|e| format!("; e.g. {e}"))
            .unwrap_or_default()
    );
}

/// Servers' states against the origins' last ones.
struct Convergence {
    checked: u64,
    mismatches: u64,
    /// One mismatch, for the report.
    example: Option<String>,
    /// Mismatches by server and origin (`pbx-0 <- pbx-8`).
    by_pair: BTreeMap<String, u64>,
    /// The first mismatch: server, origin (indexes) and phone.
    first: Option<(usize, usize, String)>,
}

/// Lists every server's device states (`probes`, by server) and compares each phone's
/// `Custom:` copy, and on its own server the phone itself, with the last state driven.
/// `driven` holds, per server, the number of changes driven.
async fn convergence(
    probes: &mut [Conn],
    driven: &[u64],
    names: &[String],
    devices: usize,
) -> anyhow::Result<Convergence> {
    let mut c = Convergence {
        checked: 0,
        mismatches: 0,
        example: None,
        by_pair: BTreeMap::new(),
        first: None,
    };
    let servers = driven.len();
    let mut key = String::new();
    for (r, p) in probes.iter_mut().enumerate() {
        // have[s * devices + j]: what server r lists of origin s's phone j (as itself on its
        // own server, as `Custom:` elsewhere); the last listing wins.
        let mut have: Vec<Option<Listed>> = vec![None; servers * devices];
        p.list_each(
            &[("Action", "DeviceStateList")],
            ["Device", "State"],
            |[d, st]| {
                if let (Some(d), Some(st)) = (d, st)
                    && let Some((s, j)) = listed_phone(d, r, servers, devices, &mut key)
                {
                    have[s * devices + j] = Some(match STATES.iter().position(|w| *w == st) {
                        Some(i) => Listed::State(i),
                        None => Listed::Other(st.to_owned()),
                    });
                }
            },
        )
        .await?;
        for (s, k) in driven.iter().enumerate() {
            for j in 0..devices.min(*k as usize) {
                // The last change of phone j was number k' = the largest k' < k with
                // k' % devices == j.
                let dn = devices as u64;
                let last_k = j as u64 + dn * ((*k - 1 - j as u64) / dn);
                let want_i = ((last_k / dn) as usize) % 4;
                let want = STATES[want_i];
                c.checked += 1;
                let got = &have[s * devices + j];
                let ok = match got {
                    Some(Listed::State(i)) => *i == want_i,
                    Some(Listed::Other(st)) => st.eq_ignore_ascii_case(want),
                    None => false,
                };
                if ok {
                    continue;
                }
                let got = match got {
                    Some(Listed::State(i)) => STATES[*i],
                    Some(Listed::Other(st)) => st.as_str(),
                    None => "(absent)",
                };
                key.clear();
                if s != r {
                    key.push_str("Custom:");
                }
                write_device(&mut key, s, j);
                c.mismatches += 1;
                *c.by_pair
                    .entry(format!("{} <- {}", names[r], names[s]))
                    .or_insert(0) += 1;
                c.example
                    .get_or_insert_with(|| format!("{} {key}: {got}, want {want}", names[r]));
                c.first.get_or_insert_with(|| (r, s, device(s, j)));
            }
        }
    }
    Ok(c)
}

/// A phone's state as a server lists it: one of [`STATES`] (its index) or another text.
#[derive(Debug, Clone, PartialEq)]
enum Listed {
    State(usize),
    Other(String),
}

/// `(s, j)` when `d` is exactly the name under which server `r` lists origin `s`'s phone `j`
/// (`PJSIP/b<s>n<j>` on its own server, `Custom:PJSIP/b<s>n<j>` on the others), with `s` and
/// `j` below `servers` and `devices`; `None` for any other name. `buf` is scratch space.
fn listed_phone(
    d: &str,
    r: usize,
    servers: usize,
    devices: usize,
    buf: &mut String,
) -> Option<(usize, usize)> {
    let (custom, phone) = match d.strip_prefix("Custom:") {
        Some(phone) => (true, phone),
        None => (false, d),
    };
    let (s, j) = phone.strip_prefix("PJSIP/b")?.split_once('n')?;
    let (s, j) = (s.parse::<usize>().ok()?, j.parse::<usize>().ok()?);
    if s >= servers || j >= devices || custom == (s == r) {
        return None;
    }
    // Exactly the name written (no sign, no leading zeros).
    buf.clear();
    write_device(buf, s, j);
    (buf == phone).then_some((s, j))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hintfed_core::{Body, DeviceState, Envelope, Epoch, HlcTimestamp, KeyRing, Value};

    /// `[topic, signed envelope]` of origin `o`'s update of `key` to `value`, as a hub
    /// publishes it.
    fn published(o: &str, seq: u64, key: &str, value: Value) -> hintfed_transport::Frames {
        let body = Body::Update(hintfed_core::envelope::Update {
            key: key.to_owned(),
            value,
            ts: HlcTimestamp {
                wall: 1_700_000_000_000 + seq,
                counter: 0,
            },
        });
        let env = Envelope::new(o, Epoch(1), seq, body);
        let sealed = KeyRing::from_secrets([SHARED_KEY])
            .seal(&env, &Default::default())
            .expect("seal");
        vec![env.topic().into(), sealed.into()]
    }

    #[test]
    fn listed_phones_are_exactly_the_names_the_check_compares() {
        let mut buf = String::new();
        let (servers, devices) = (3, 12);
        for r in 0..servers {
            for s in 0..servers {
                for j in 0..devices {
                    let own = device(s, j);
                    let custom = format!("Custom:{own}");
                    let (want, other) = if s == r { (own, custom) } else { (custom, own) };
                    assert_eq!(
                        listed_phone(&want, r, servers, devices, &mut buf),
                        Some((s, j))
                    );
                    assert_eq!(listed_phone(&other, r, servers, devices, &mut buf), None);
                }
            }
        }
        for d in [
            "Custom:PJSIP/b1n02",
            "Custom:PJSIP/b01n2",
            "Custom:PJSIP/b+1n2",
            "Custom:PJSIP/b1n2x",
            "Custom:PJSIP/b1n12",
            "Custom:PJSIP/b3n0",
            "Custom:PJSIP/b1n",
            "Custom:PJSIP/bn1",
            "custom:PJSIP/b1n2",
            "Custom:SIP/b1n2",
            "Custom:Custom:PJSIP/b1n2",
            "",
        ] {
            assert_eq!(listed_phone(d, 0, servers, devices, &mut buf), None, "{d}");
        }
    }

    #[test]
    fn the_tap_writes_one_line_per_device_update() {
        let tap = Tap::default();
        let mut out = Vec::new();
        let up = published(
            "pbx-1",
            7,
            "PJSIP/b1n2",
            Value::Device(DeviceState::Ringing),
        );
        assert!(tap.write(&mut out, 1_234_567_890_123, &up[1]));
        assert_eq!(out, b"1234567890123 PJSIP/b1n2 RINGING\n");
        // Not device updates: nothing written.
        let hb = Envelope::new("pbx-1", Epoch(1), 8, Body::FullSyncBegin);
        let hb = KeyRing::from_secrets([SHARED_KEY])
            .seal(&hb, &Default::default())
            .expect("seal");
        for payload in [&b"{not json"[..], b"", &hb] {
            let mut none = Vec::new();
            assert!(!tap.write(&mut none, 1, payload));
            assert!(none.is_empty());
        }
    }

    #[tokio::test]
    async fn the_tap_stamps_what_it_reads_with_the_time_it_read_it() {
        // Written at the end, or as soon as 2 wait.
        for keep in [TAP_KEEP, 2] {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let (_stop_tx, stop) = tokio::sync::oneshot::channel();
            let states = [DeviceState::Inuse, DeviceState::NotInuse, DeviceState::Busy];
            let before = now_ns();
            let task = tokio::spawn(tap_lines(rx, stop, Vec::new(), keep));
            for (i, st) in states.into_iter().enumerate() {
                let key = format!("PJSIP/b0n{i}");
                tx.send(published("pbx-0", i as u64 + 1, &key, Value::Device(st)))
                    .await
                    .expect("send");
                // The tap reads each message on its own.
                tokio::task::yield_now().await;
            }
            tx.send(vec!["state.device".into()]).await.expect("send");
            drop(tx);
            let out = String::from_utf8(task.await.expect("tap")).expect("utf-8");
            let after = now_ns();
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 3, "{out}");
            let mut last = before;
            for (line, want) in lines.iter().zip([
                "PJSIP/b0n0 INUSE",
                "PJSIP/b0n1 NOT_INUSE",
                "PJSIP/b0n2 BUSY",
            ]) {
                let (t, rest) = line.split_once(' ').expect("time");
                let t: u128 = t.parse().expect("ns");
                assert!((last..=after).contains(&t), "{t} not in {last}..={after}");
                assert_eq!(rest, want);
                last = t;
            }
        }
    }

    #[tokio::test]
    async fn the_tap_stops_when_told() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<hintfed_transport::Frames>(1);
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(tap_lines(rx, stop, Vec::new(), TAP_KEEP));
        stop_tx.send(()).expect("stop");
        assert!(task.await.expect("tap").is_empty());
    }

    fn times(mut s: Schedule, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let t = s.peek();
                s.advance();
                t
            })
            .collect()
    }

    #[test]
    fn lockstep_origins_change_together_at_even_intervals() {
        let a = times(Schedule::new(Arrivals::Lockstep, 100.0, 1, 0), 5);
        let b = times(Schedule::new(Arrivals::Lockstep, 100.0, 1, 7), 5);
        assert_eq!(a, b);
        assert_eq!(a, vec![0.01, 0.02, 0.03, 0.04, 0.05]);
    }

    #[test]
    fn poisson_origins_are_independent_at_the_asked_rate() {
        let n = 100_000;
        let a = times(Schedule::new(Arrivals::Poisson, 100.0, 1, 0), n);
        let b = times(Schedule::new(Arrivals::Poisson, 100.0, 1, 1), n);
        assert_eq!(a, times(Schedule::new(Arrivals::Poisson, 100.0, 1, 0), n));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        // n exponential gaps of mean 10 ms: the mean within 3% (its deviation is 0.3%).
        let mean = a[n - 1] / n as f64;
        assert!((mean - 0.01).abs() < 0.0003, "mean gap {mean}");
        // Exponential, not even: about 1 - 1/e of the gaps are shorter than the mean.
        let short = a.windows(2).filter(|w| w[1] - w[0] < 0.01).count() as f64 / n as f64;
        assert!((short - 0.632).abs() < 0.02, "short gaps {short}");
        // The two origins do not change together.
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert_eq!(same, 0);
    }

    #[test]
    fn poisson_origins_together_keep_the_total_rate() {
        // 20 origins at 100/s for 10 s: 20,000 changes, deviation 141. Correlated streams
        // (each origin's a few steps from the next) gave +5.4% with seed 1.
        for seed in [1, 2, 3, 12_345] {
            let total: usize = (0..20)
                .map(|o| {
                    let mut s = Schedule::new(Arrivals::Poisson, 100.0, seed, o);
                    let mut n = 0;
                    while s.peek() < 10.0 {
                        s.advance();
                        n += 1;
                    }
                    n
                })
                .sum();
            assert!(total.abs_diff(20_000) < 600, "seed {seed}: {total} changes");
        }
    }
}
