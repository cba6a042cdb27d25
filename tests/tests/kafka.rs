//! End to end over Kafka: three simulated Asterisk servers and three agents (the agent's relay
//! with the Kafka transport) federating over Kafka only — against a real Kafka-protocol broker
//! (tansu, a separate process with SQLite storage) and, always, against librdkafka's
//! in-process mock cluster.
//!
//! - pbx-a's agent reads its events from app_ami_kafka's topic in the JSON format, pbx-b's in
//!   the AMI text format (both simulators publish there like the real module), pbx-c's over
//!   AMI; every agent writes over AMI;
//! - pbx-c's agent starts last and converges from the compacted topic alone;
//! - killing pbx-a's agent turns its devices to `down_state` on the others.
//!
//! tansu is found through `HINTFED_TANSU` or `PATH`; without it that test is skipped with the
//! reason printed (`.ci/run` installs it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use hintfed_agent::relay::{DeviceFilter, Relay, RelayConfig, RelayHandle, RelayHooks, now_millis};
use hintfed_ami::ClientConfig;
use hintfed_asterisk::kafka::{KafkaSourceConfig, OwnServer};
use hintfed_asterisk::{ActionsVia, EventsVia, Pbx, PbxConfig};
use hintfed_core::{Epoch, KeyRing, Node, NodeConfig};
use hintfed_sim::kafka::{KafkaFormat, KafkaPublisher, KafkaSimConfig, entity_id_for};
use hintfed_sim::{DeviceState as SimState, SimConfig, SimHandle, SimServer};
use hintfed_testkit::wait::eventually_within;
use hintfed_transport::kafka::{KafkaConfig, KafkaTransport};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);
const ORIGIN_TIMEOUT: Duration = Duration::from_secs(2);
const EVENTS_TOPIC: &str = "asterisk_ami";

/// The tansu binary, or why there is none.
fn tansu() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("HINTFED_TANSU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("HINTFED_TANSU={} is not a file", p.display()))
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "tansu not found (set HINTFED_TANSU or put it on PATH; install with \
             `cargo install tansu --locked --features libsql --version 0.6.0`, as .ci/run does)"
                .to_owned()
        })
}

struct Broker {
    child: tokio::process::Child,
    bootstrap: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    async fn start(bin: &PathBuf) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = hintfed_testkit::net::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).expect("log file");
        let child = tokio::process::Command::new(bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // tansu reads the URL's path relative to its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("tansu starts");
        let bootstrap = format!("127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(&bootstrap).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tansu did not listen on {bootstrap}; log: {}",
                std::fs::read_to_string(dir.path().join("tansu.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Broker {
            child,
            bootstrap,
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

const EXTENSIONS: &str = "\
[phones]
exten => 100,hint,PJSIP/100
exten => 200,hint,PJSIP/200
exten => 300,hint,PJSIP/300
exten => 1100,hint,Custom:PJSIP/100
exten => 1200,hint,Custom:PJSIP/200
exten => 1300,hint,Custom:PJSIP/300
";

/// How an agent reads its Asterisk's events.
#[derive(Clone, Copy)]
enum Source {
    Ami,
    Kafka(KafkaFormat),
}

struct Member {
    sim: SimHandle,
    handle: RelayHandle,
    task: tokio::task::JoinHandle<()>,
    _publisher: Option<KafkaPublisher>,
}

async fn member(bootstrap: &str, name: &str, source: Source) -> Member {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sim = SimServer::spawn(SimConfig {
        name: Some(name.to_owned()),
        dialplan: hintfed_sim::extensions::parse(EXTENSIONS).expect("dialplan"),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let mut ami = ClientConfig::new(sim.local_addr().to_string(), "admin", "adminsecret");
    ami.backoff_initial = Duration::from_millis(50);
    ami.backoff_max = Duration::from_millis(200);
    let (events, publisher) = match source {
        Source::Ami => (EventsVia::Ami(Box::new(ami.clone())), None),
        Source::Kafka(format) => {
            let publisher = KafkaPublisher::start(
                KafkaSimConfig {
                    brokers: bootstrap.to_owned(),
                    topic: EVENTS_TOPIC.to_owned(),
                    format,
                    entity_id: entity_id_for(name),
                    system_name: Some(name.to_owned()),
                },
                sim.subscribe_events(),
            )
            .await
            .expect("app_ami_kafka publisher");
            let mut own = OwnServer::default();
            // One agent picks its records by system name, the other by entity id.
            if matches!(format, KafkaFormat::Json) {
                own.system_name = Some(name.to_owned());
            } else {
                own.entity_id = Some(entity_id_for(name).to_uppercase());
            }
            let mut src = KafkaSourceConfig::new(bootstrap.to_owned(), own);
            src.topic = EVENTS_TOPIC.to_owned();
            (EventsVia::Kafka(Box::new(src)), Some(publisher))
        }
    };
    let (pbx, pbx_events) =
        Pbx::start(PbxConfig::new(events, ActionsVia::Ami(Box::new(ami)))).expect("pbx");

    let mut kc = KafkaConfig::new(bootstrap.to_owned(), name);
    kc.keys = KeyRing::from_secrets(["e2e-secret"]);
    kc.origin_timeout = ORIGIN_TIMEOUT;
    kc.heartbeat_lookback = ORIGIN_TIMEOUT * 2;
    let transport = KafkaTransport::start(kc).await.expect("kafka transport");

    let mut nc = NodeConfig::new(name);
    nc.origin_timeout_ms = u64::try_from(ORIGIN_TIMEOUT.as_millis()).expect("ms");
    nc.heartbeat_interval_ms = 200;
    let now = now_millis();
    let node = Node::new(nc, Epoch(now.0), now);
    let mut rc = RelayConfig::new(name);
    rc.keys = KeyRing::from_secrets(["e2e-secret"]);
    rc.filter = DeviceFilter::new(None, Some("^Custom:")).expect("filter");
    rc.tick = Duration::from_millis(20);
    let relay = Relay::new(
        node,
        (pbx, pbx_events),
        transport,
        rc,
        RelayHooks::default(),
    )
    .expect("relay");
    let handle = relay.handle();
    let task = tokio::spawn(async move {
        relay
            .run(CancellationToken::new())
            .await
            .expect("relay run");
    });
    Member {
        sim,
        handle,
        task,
        _publisher: publisher,
    }
}

async fn ready(m: &Member) {
    let h = m.handle.clone();
    eventually_within("full sync and snapshot", DEADLINE, || {
        let c = h.status().counters();
        c.full_syncs >= 1 && c.snapshot_done
    })
    .await;
}

/// Sets `device` on `from` until `to` shows `state` on its `Custom:` mirror (a change made
/// before a Kafka event source finished its assignment is not seen: it is made again).
async fn propagate(from: &Member, device: &str, state: SimState, word: &str, to: &[&Member]) {
    let mirror = format!("DEVICE_STATE(Custom:{device})");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            from.sim
                .set_device_state(device, SimState::NotInuse)
                .expect("reset");
        }
        from.sim.set_device_state(device, state).expect("set");
        attempt += 1;
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < until {
            if to.iter().all(|m| m.sim.getvar(&mirror) == word) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device} {word} did not reach every other server: {:?}",
            to.iter().map(|m| m.sim.getvar(&mirror)).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_over_a_real_broker() {
    let bin = match tansu() {
        Ok(b) => b,
        Err(reason) => {
            eprintln!("SKIPPED three_agents_over_a_real_broker: {reason}");
            return;
        }
    };
    let broker = Broker::start(&bin).await;
    three_agents(&broker.bootstrap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_over_the_mock_cluster() {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    // The mock answers no CreateTopics: the topics exist beforehand.
    for t in ["hintfed.state", "hintfed.heartbeat", EVENTS_TOPIC] {
        mock.create_topic(t, 1, 1).expect("topic");
    }
    three_agents(&mock.bootstrap_servers()).await;
}

/// The scenario of the module docs against the cluster at `bootstrap`.
async fn three_agents(bootstrap: &str) {
    let a = member(bootstrap, "pbx-a", Source::Kafka(KafkaFormat::Json)).await;
    let b = member(bootstrap, "pbx-b", Source::Kafka(KafkaFormat::Ami)).await;
    ready(&a).await;
    ready(&b).await;

    // app_ami_kafka JSON source on a, AMI text source on b: each change crosses over.
    propagate(&a, "PJSIP/100", SimState::Inuse, "INUSE", &[&b]).await;
    propagate(&b, "PJSIP/200", SimState::Ringing, "RINGING", &[&a]).await;
    // A presence set on b (AMI text body with commas) reaches a.
    b.sim
        .setvar(
            "PRESENCE_STATE(CustomPresence:alice)",
            &hintfed_core::Presence::new(
                hintfed_core::PresenceStatus::Dnd,
                "lunch",
                "back at 2, maybe",
            )
            .to_setvar_value(),
        )
        .expect("presence");
    eventually_within("presence on a", DEADLINE, || {
        a.sim.getvar("PRESENCE_STATE(CustomPresence:alice,value)") == "dnd"
    })
    .await;

    // c starts last: everything so far comes from the compacted topic alone.
    let c = member(bootstrap, "pbx-c", Source::Ami).await;
    ready(&c).await;
    eventually_within("c converged from the topic", DEADLINE, || {
        c.sim.getvar("DEVICE_STATE(Custom:PJSIP/100)") == "INUSE"
            && c.sim.getvar("DEVICE_STATE(Custom:PJSIP/200)") == "RINGING"
            && c.sim.getvar("PRESENCE_STATE(CustomPresence:alice,value)") == "dnd"
    })
    .await;
    // And c's own changes reach the others.
    propagate(&c, "PJSIP/300", SimState::Busy, "BUSY", &[&a, &b]).await;

    // A phone only pbx-a knows (in no hint elsewhere, so no other origin reports it).
    propagate(&a, "PJSIP/900", SimState::Inuse, "INUSE", &[&b, &c]).await;
    // Kill a's agent (no goodbye): that device turns to down_state on b and c.
    a.task.abort();
    let _ = a.task.await;
    eventually_within("a's device down on b and c", DEADLINE, || {
        b.sim.getvar("DEVICE_STATE(Custom:PJSIP/900)") == "UNAVAILABLE"
            && c.sim.getvar("DEVICE_STATE(Custom:PJSIP/900)") == "UNAVAILABLE"
    })
    .await;
    // The others keep federating.
    assert_eq!(c.sim.getvar("DEVICE_STATE(Custom:PJSIP/200)"), "RINGING");
    let rejects = b.handle.status().counters().rejects;
    assert!(
        rejects.keys().all(|r| r == "duplicate"),
        "unexpected rejects: {rejects:?}"
    );
}

/// The real binaries: `hintfed-sim` (two Asterisks) and two `hintfed-agent` processes with
/// `[federation] transport = kafka`, against the mock cluster (it listens on loopback TCP).
/// Needs the binaries (`cargo build --bins`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binaries_federate_over_kafka() {
    use hintfed_e2e::fed::{AMI_SECRET, AMI_USER, Federation, Via, http_get};
    use hintfed_e2e::{Proc, bin_path, free_port};
    use hintfed_testkit::http;

    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    for t in ["hintfed.state", "hintfed.heartbeat"] {
        mock.create_topic(t, 1, 1).expect("topic");
    }
    let bootstrap = mock.bootstrap_servers();
    let f = Federation::start(&["pbx-a", "pbx-b"], Via::Ami).await;
    let mut agents = Vec::new();
    for n in ["pbx-a", "pbx-b"] {
        let http = format!("127.0.0.1:{}", free_port());
        let (host, port) = f.addrs[n].rsplit_once(':').expect("host:port");
        let config = f.dir.path().join(format!("kafka-agent-{n}.ini"));
        std::fs::write(
            &config,
            format!(
                "[general]\nname = {n}\n\n[asterisk]\nhost = {host}\nport = {port}\n\
                 username = {AMI_USER}\n\n[federation]\ntransport = kafka\n\
                 shared_key = kafka-e2e-key\norigin_timeout = 3s\nheartbeat_interval = 500ms\n\n\
                 [kafka]\nbrokers = {bootstrap}\nsocket.keepalive.enable = true\n\n\
                 [http]\nlisten = {http}\n"
            ),
        )
        .expect("write config");
        let proc = Proc::spawn_with_env(
            &format!("agent-{n}"),
            &bin_path("hintfed-agent"),
            &["--config".to_owned(), config.display().to_string()],
            &[("HINTFED_ASTERISK_SECRET", AMI_SECRET)],
        );
        let ready = http::get_until(http.as_str(), "/readyz", DEADLINE, |r| {
            r.body.starts_with("ready")
        });
        assert!(
            ready.await.is_some(),
            "agent {n} not ready: {}",
            http_get(&http, "/readyz").await
        );
        agents.push(proc);
    }
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b"], DEADLINE)
            .await,
        "Custom:PJSIP/100 INUSE on pbx-b"
    );
    f.ami("pbx-b").set_device("PJSIP/200", "RINGING").await;
    assert!(
        f.wait_custom("PJSIP/200", "RINGING", &["pbx-a"], DEADLINE)
            .await,
        "Custom:PJSIP/200 RINGING on pbx-a"
    );
    // SIGKILL pbx-a's agent: its phone turns to down_state on pbx-b.
    agents[0].kill();
    assert!(
        f.wait_custom("PJSIP/100", "UNAVAILABLE", &["pbx-b"], DEADLINE)
            .await,
        "Custom:PJSIP/100 UNAVAILABLE on pbx-b after the agent died"
    );
}
