//! Chaos: random phone and presence activity on five simulated Asterisks (one `hintfed-sim`),
//! two `hintfed-server` hubs and five `hintfed-agent`s (AMI), while seeded random faults hit
//! them: hubs and agents killed (SIGKILL) and restarted, simulated Asterisks restarted
//! (`SimRestart`, state lost, connections closed, down for a moment; their phones then
//! re-register with a fresh state, as real phones do), AMI connections cut off
//! (`SimBlackhole`: the Asterisk stops answering and sending while TCP stays open) and
//! processes paused (SIGSTOP, SIGCONT later).
//!
//! After the faults stop (everything running again) and the timeouts pass:
//! - every server's `Custom:<phone>` equals, for every other origin's phone, the aggregate of
//!   the origins' last states (each phone lives on one origin here, so the aggregate is its
//!   origin's last state);
//! - every presentity reads the same (its last written value) on every server;
//! - no daemon printed "panicked";
//! - no daemon's resident set (sampled through the run) went over [`RSS_CAP_KIB`].
//!
//! Short by default (about 20 s of faults); `HINTFED_CHAOS_SECS=600` for a long run,
//! `HINTFED_CHAOS_SEED=<n>` to replay a seed. A summary of the faults injected is printed.
//!
//! The default run (a fixed seed, about 15 s of faults) is part of the test suite. Earlier
//! runs exposed two convergence bugs, both fixed in `hintfed-core`: an origin that timed out
//! on a paused or disconnected agent and restarted meanwhile stayed down there (a hub's
//! snapshot saying it is up now revives it), and a restarted hub's snapshot closed stream
//! holes it could not fill.
//!
//! Needs the binaries: `cargo build -p hintfed-sim -p hintfed-server -p hintfed-agent`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hintfed_ami::{AmiClient, ClientConfig, Message};
use hintfed_e2e::fed::{AMI_SECRET, AMI_USER, Federation, Via};
use hintfed_e2e::{Proc, bin_path};
use hintfed_testkit::process::rss_kib;

const SERVERS: [&str; 5] = ["pbx-0", "pbx-1", "pbx-2", "pbx-3", "pbx-4"];
const PHONES_PER_SERVER: usize = 4;
const STATES: [&str; 5] = ["NOT_INUSE", "INUSE", "RINGING", "BUSY", "ONHOLD"];
const STATUSES: [&str; 4] = ["available", "away", "dnd", "xa"];
/// Most resident memory any daemon may hold at any sample (debug builds included).
const RSS_CAP_KIB: u64 = 192 * 1024;

/// xorshift64*: seeded, no dependency.
struct Rng(u64);

impl Rng {
    /// Seeds through splitmix64, so that nearby seeds give unrelated runs.
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn phone(s: usize, j: usize) -> String {
    format!("PJSIP/x{s}p{j}")
}

fn presentity(s: usize) -> String {
    format!("CustomPresence:user{s}")
}

/// What the test believes each origin holds.
struct Truth {
    /// Last state of each phone, by origin index.
    phones: Vec<Vec<&'static str>>,
    /// Last presence written per origin: (status, subtype, message).
    presence: Vec<(String, String, String)>,
    /// Every presence value ever written per origin.
    presence_history: Vec<Vec<(String, String, String)>>,
    writes: u64,
}

struct Chaos {
    f: Federation,
    rng: Rng,
    truth: Truth,
    /// Output of processes that were killed, kept for the panic scan.
    dead_output: Vec<String>,
    /// Faults injected, by kind.
    faults: BTreeMap<&'static str, u64>,
    /// Highest RSS seen per daemon name.
    rss_max: BTreeMap<String, u64>,
    /// Paused processes to resume: (kind, index).
    paused: Vec<(Target, Instant)>,
    /// Blackholed servers and when the blackhole ends.
    holes: Vec<(usize, Instant)>,
    /// Admin AMI client per server.
    admin: Vec<AmiClient>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Hub(usize),
    Agent(usize),
}

impl Chaos {
    async fn set_phone(&mut self, s: usize, j: usize) {
        let st = STATES[self.rng.below(STATES.len())];
        self.f.ami(SERVERS[s]).set_device(&phone(s, j), st).await;
        self.truth.phones[s][j] = st;
        self.truth.writes += 1;
    }

    async fn set_presence(&mut self, s: usize) {
        let status = STATUSES[self.rng.below(STATUSES.len())].to_owned();
        let subtype = format!("sub{}", self.rng.below(100));
        let message = format!("msg{}", self.rng.next() % 100_000);
        self.f
            .ami(SERVERS[s])
            .setvar(
                &format!("PRESENCE_STATE({})", presentity(s)),
                &format!("{status},{subtype},{message}"),
            )
            .await;
        self.truth.presence_history[s].push((status.clone(), subtype.clone(), message.clone()));
        self.truth.presence[s] = (status, subtype, message);
        self.truth.writes += 1;
    }

    /// Every phone and the presentity of server `s` get a fresh value (phones re-register
    /// after an Asterisk restart).
    async fn reregister(&mut self, s: usize) {
        for j in 0..PHONES_PER_SERVER {
            self.set_phone(s, j).await;
        }
        self.set_presence(s).await;
    }

    fn sample_rss(&mut self) {
        let mut pids = vec![("sim".to_owned(), self.f.sim.pid())];
        for h in &self.f.hubs {
            if let Some(p) = &h.proc {
                pids.push((h.name.clone(), p.pid()));
            }
        }
        for (n, a) in &self.f.agents {
            if let Some(p) = &a.proc {
                pids.push((format!("agent-{n}"), p.pid()));
            }
        }
        for (name, pid) in pids {
            if let Some(kib) = rss_kib(pid) {
                let m = self.rss_max.entry(name).or_default();
                *m = (*m).max(kib);
            }
        }
    }

    fn is_paused(&self, t: Target) -> bool {
        self.paused.iter().any(|(p, _)| *p == t)
    }

    fn proc_of(&self, t: Target) -> Option<&Proc> {
        match t {
            Target::Hub(i) => self.f.hubs[i].proc.as_ref(),
            Target::Agent(s) => self.f.agents[SERVERS[s]].proc.as_ref(),
        }
    }

    fn kill(&mut self, t: Target) {
        let p = match t {
            Target::Hub(i) => self.f.hubs[i].proc.take(),
            Target::Agent(s) => self
                .f
                .agents
                .get_mut(SERVERS[s])
                .and_then(|a| a.proc.take()),
        };
        if let Some(mut p) = p {
            p.kill();
            self.dead_output.extend(p.lines());
        }
        self.paused.retain(|(p, _)| *p != t);
    }

    /// Starts a stopped hub or agent without waiting for it to be ready (a hub may be down).
    fn start(&mut self, t: Target) {
        match t {
            Target::Hub(i) => {
                let h = &mut self.f.hubs[i];
                let args = vec!["--config".to_owned(), h.config.display().to_string()];
                h.proc = Some(Proc::spawn(&h.name, &bin_path("hintfed-server"), &args));
            }
            Target::Agent(s) => {
                let a = self.f.agents.get_mut(SERVERS[s]).expect("agent");
                let args = vec!["--config".to_owned(), a.config.display().to_string()];
                a.proc = Some(Proc::spawn_with_env(
                    &format!("agent-{}", SERVERS[s]),
                    &bin_path("hintfed-agent"),
                    &args,
                    &[("HINTFED_ASTERISK_SECRET", AMI_SECRET)],
                ));
            }
        }
    }

    fn resume_due(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<Target> = self
            .paused
            .iter()
            .filter(|(_, at)| all || *at <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            if let Some(p) = self.proc_of(t) {
                p.signal("CONT");
            }
            self.paused.retain(|(p, _)| *p != t);
        }
    }

    /// Forgets blackholes that ended (they end on the simulator's clock).
    fn end_holes(&mut self) {
        let now = Instant::now();
        self.holes.retain(|(_, at)| *at > now);
    }

    async fn fault(&mut self) {
        let hubs = self.f.hubs.len();
        match self.rng.below(7) {
            0 => {
                let i = self.rng.below(hubs);
                if self.f.hubs[i].proc.is_some() {
                    self.kill(Target::Hub(i));
                    *self.faults.entry("hub killed").or_default() += 1;
                } else {
                    self.start(Target::Hub(i));
                    *self.faults.entry("hub restarted").or_default() += 1;
                }
            }
            1 | 2 => {
                let s = self.rng.below(SERVERS.len());
                if self.f.agents[SERVERS[s]].proc.is_some() {
                    self.kill(Target::Agent(s));
                    *self.faults.entry("agent killed").or_default() += 1;
                } else {
                    self.start(Target::Agent(s));
                    *self.faults.entry("agent restarted").or_default() += 1;
                }
            }
            3 => {
                let s = self.rng.below(SERVERS.len());
                if self.holes.iter().any(|(x, _)| *x == s) {
                    return;
                }
                self.f.ami(SERVERS[s]).restart_down(0.3).await;
                *self.faults.entry("asterisk restarted").or_default() += 1;
                self.reregister(s).await;
            }
            4 => {
                let s = self.rng.below(SERVERS.len());
                if self.holes.iter().any(|(x, _)| *x == s) {
                    return;
                }
                let secs = 0.5 + self.rng.below(25) as f64 / 10.0;
                // Answered before the blackhole starts; it ends by itself.
                let _ = self.admin[s]
                    .send(Message::action("SimBlackhole").with("Seconds", secs.to_string()))
                    .await;
                self.holes
                    .push((s, Instant::now() + Duration::from_secs_f64(secs)));
                *self
                    .faults
                    .entry("asterisk connections cut (blackhole)")
                    .or_default() += 1;
            }
            _ => {
                let t = if self.rng.below(2) == 0 {
                    Target::Hub(self.rng.below(hubs))
                } else {
                    Target::Agent(self.rng.below(SERVERS.len()))
                };
                if self.is_paused(t) {
                    return;
                }
                if let Some(p) = self.proc_of(t) {
                    p.signal("STOP");
                    let ms = 300 + self.rng.below(2500) as u64;
                    self.paused
                        .push((t, Instant::now() + Duration::from_millis(ms)));
                    *self
                        .faults
                        .entry("process paused (SIGSTOP/SIGCONT)")
                        .or_default() += 1;
                }
            }
        }
    }

    /// Differences between what every server reads and the truth (empty when converged).
    async fn diffs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (r, rn) in SERVERS.iter().enumerate() {
            let a = self.f.ami(rn);
            for (s, phones) in self.truth.phones.iter().enumerate() {
                if s == r {
                    continue;
                }
                for (j, want) in phones.iter().enumerate() {
                    let got = a.custom(&phone(s, j)).await;
                    if got != *want {
                        out.push(format!(
                            "{rn} Custom:{} = {got:?}, want {want}",
                            phone(s, j)
                        ));
                    }
                }
            }
        }
        for (s, history) in self.truth.presence_history.iter().enumerate() {
            let p = presentity(s);
            let mut seen = Vec::new();
            for rn in SERVERS {
                let a = self.f.ami(rn);
                seen.push((
                    a.presence_field(&p, "value").await,
                    a.presence_field(&p, "subtype").await,
                    a.presence_field(&p, "message").await,
                ));
            }
            if seen.windows(2).any(|w| w[0] != w[1]) {
                out.push(format!("{p} differs between servers: {seen:?}"));
            } else if !history.contains(&seen[0]) {
                out.push(format!("{p} = {:?}, a value never written", seen[0]));
            }
        }
        out
    }

    /// Presentities whose agreed value is not the last one written on their origin: reported,
    /// not asserted (the issue asks for presence identical everywhere). Two documented limits
    /// of listing presence (`hintfed_core::node`) produce them under these faults: a write made
    /// while the origin's agent was away can lose to a value written elsewhere meanwhile, and
    /// a restarted agent whose snapshot came from hubs that know nothing of a presentity yet
    /// (both just restarted) republishes the copy it applied earlier as a new write. Publishing
    /// such listings with the oldest timestamp instead was tried (seed 77, 150 s): servers then
    /// diverged, so it was reverted.
    async fn stale_presence(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (s, want) in self.truth.presence.iter().enumerate() {
            let p = presentity(s);
            let a = self.f.ami(SERVERS[s]);
            let got = (
                a.presence_field(&p, "value").await,
                a.presence_field(&p, "subtype").await,
                a.presence_field(&p, "message").await,
            );
            if got != *want {
                out.push(format!("{p}: {got:?}, last written {want:?}"));
            }
        }
        out
    }
}

/// A separate AMI connection per Asterisk for `SimBlackhole` (the harness client has no
/// generic action call).
async fn admin_client(addr: &str) -> AmiClient {
    let mut cfg = ClientConfig::new(addr, AMI_USER, AMI_SECRET);
    cfg.events = "off".to_owned();
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.action_timeout = Duration::from_secs(3);
    let c = AmiClient::start(cfg);
    assert!(
        c.wait_connected(Duration::from_secs(5)).await,
        "admin AMI {addr}"
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_converges_after_random_faults() {
    let secs: u64 = std::env::var("HINTFED_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("HINTFED_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_c4a0_5000_0001);
    eprintln!("chaos: {secs} s of faults, seed {seed}");

    let mut f = Federation::start(&SERVERS, Via::Ami).await;
    f.origin_timeout = "2s";
    f.add_hub().await;
    f.add_hub().await;
    for n in SERVERS {
        f.add_agent(n).await;
    }
    let mut admin = Vec::new();
    for n in SERVERS {
        admin.push(admin_client(&f.addrs[n]).await);
    }
    let mut c = Chaos {
        f,
        admin,
        rng: Rng::new(seed),
        truth: Truth {
            phones: vec![vec!["NOT_INUSE"; PHONES_PER_SERVER]; SERVERS.len()],
            presence: vec![Default::default(); SERVERS.len()],
            presence_history: vec![Vec::new(); SERVERS.len()],
            writes: 0,
        },
        dead_output: Vec::new(),
        faults: BTreeMap::new(),
        rss_max: BTreeMap::new(),
        paused: Vec::new(),
        holes: Vec::new(),
    };
    for s in 0..SERVERS.len() {
        c.reregister(s).await;
    }

    // Faults and activity.
    let end = Instant::now() + Duration::from_secs(secs);
    let mut step = 0u64;
    while Instant::now() < end {
        step += 1;
        for _ in 0..3 {
            let s = c.rng.below(SERVERS.len());
            if c.holes.iter().any(|(x, _)| *x == s) {
                continue; // a blackholed Asterisk answers nothing: its phones wait
            }
            if c.rng.below(6) == 0 {
                c.set_presence(s).await;
            } else {
                let j = c.rng.below(PHONES_PER_SERVER);
                c.set_phone(s, j).await;
            }
        }
        if step.is_multiple_of(4) {
            c.fault().await;
        }
        c.resume_due(false);
        c.end_holes();
        c.sample_rss();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Faults stop: everything runs again.
    c.resume_due(true);
    for (s, _) in c.holes.clone() {
        // Answered even while blackholed: Seconds 0 ends it.
        let _ = c.admin[s]
            .send(Message::action("SimBlackhole").with("Seconds", "0"))
            .await;
    }
    c.holes.clear();
    for i in 0..c.f.hubs.len() {
        if c.f.hubs[i].proc.is_none() {
            c.start(Target::Hub(i));
        }
    }
    for (s, name) in SERVERS.iter().enumerate() {
        if c.f.agents[*name].proc.is_none() {
            c.start(Target::Agent(s));
        }
    }
    let faults_total: u64 = c.faults.values().sum();
    eprintln!(
        "chaos: {faults_total} faults injected {:?}; {} writes",
        c.faults, c.truth.writes
    );

    // Convergence, within origin_timeout and resync times.
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(40);
    let converged = loop {
        c.sample_rss();
        if c.diffs().await.is_empty() {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let left = c.diffs().await;
    assert!(
        converged,
        "not converged after {faults_total} faults ({:?}): {} differences, e.g. {:?}",
        c.faults,
        left.len(),
        &left[..left.len().min(10)]
    );
    eprintln!(
        "chaos: converged {} s after the faults stopped; {} phones x {} servers and {} presentities agree; peak RSS KiB {:?}",
        t0.elapsed().as_secs_f64(),
        SERVERS.len() * PHONES_PER_SERVER,
        SERVERS.len() - 1,
        SERVERS.len(),
        c.rss_max
    );

    eprintln!(
        "chaos: presence not at its last write: {:?}",
        c.stale_presence().await
    );

    // Nothing panicked; memory stayed bounded.
    let mut all = c.dead_output.clone();
    all.extend(c.f.sim.lines());
    for h in &c.f.hubs {
        all.extend(h.proc.as_ref().map(Proc::lines).unwrap_or_default());
    }
    for a in c.f.agents.values() {
        all.extend(a.proc.as_ref().map(Proc::lines).unwrap_or_default());
    }
    let panics: Vec<&String> = all.iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "a daemon panicked: {panics:?}");
    for (name, kib) in &c.rss_max {
        assert!(
            *kib <= RSS_CAP_KIB,
            "{name} reached {kib} KiB RSS (cap {RSS_CAP_KIB})"
        );
    }
    assert!(faults_total >= secs / 2, "too few faults: {:?}", c.faults);
}
