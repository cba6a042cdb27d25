//! The `hintfed-agent` daemon: builds the [`Pbx`], the [`MultiHub`] and the [`Node`] from an
//! [`AgentConfig`], runs the [`Relay`] until shutdown, and applies SIGHUP reloads (log level
//! through [`Context::reload_config`], then include/exclude and keys).

use std::time::Duration;

use anyhow::Context as _;
use hintfed_ami::{ClientConfig, TlsConfig};
use hintfed_asterisk::kafka::{KafkaSourceConfig, OwnServer};
use hintfed_asterisk::{ActionsVia, EventsVia, Pbx, PbxConfig};
use hintfed_core::{Epoch, Node, NodeConfig};
use hintfed_daemon::run::Context;
use hintfed_transport::kafka::{KafkaConfig, KafkaKeys, KafkaTransport};
use hintfed_transport::{FederationTransport, MultiHub, MultiHubConfig, ReqClientConfig};
use tracing::{info, warn};

use crate::config::{AgentConfig, AsteriskConfig, KafkaSection, Via};
use crate::relay::{Relay, RelayConfig, RelayHooks, now_millis};

/// Shortest timeout given to AMI actions: list actions on a large Asterisk take longer than
/// the 1 s `request_timeout` meant for single res_zmq_manager requests.
pub const MIN_AMI_ACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// `Setvar`s the agent keeps in flight towards its Asterisk (the apply queue's window; the
/// core default of 8 held an agent to 8 per round trip, far below what one AMI connection
/// takes pipelined; 512 is the window the bench's Setvar ceiling is measured with). Writes
/// of one target are still never reordered.
pub const APPLY_WINDOW: usize = 512;

/// AMI events buffered for the relay beside the Asterisk event channel (the client's default
/// is 4,096, ~0.3 s of a busy origin at 15,000 events/s: a relay busy for longer lost events
/// and had to list everything again). Memory only while events wait: an event leaves the
/// client's queue when the relay takes it.
pub const AMI_EVENT_BUFFER: usize = 16_384;

/// The AMI client settings of `[asterisk]`.
pub fn ami_client_config(a: &AsteriskConfig) -> ClientConfig {
    let mut c = ClientConfig::new(
        format!("{}:{}", a.host, a.port),
        a.username.clone().unwrap_or_default(),
        a.secret
            .as_ref()
            .map(|s| s.expose().to_owned())
            .unwrap_or_default(),
    );
    if a.tls {
        c.tls = Some(TlsConfig {
            server_name: a.tls_server_name.clone().unwrap_or_else(|| a.host.clone()),
            ca_file: a.tls_ca_file.clone(),
            insecure_skip_verify: a.tls_insecure,
        });
    }
    c.event_filters = a.event_filters.clone();
    c.action_timeout = a.request_timeout.max(MIN_AMI_ACTION_TIMEOUT);
    c.event_buffer = AMI_EVENT_BUFFER;
    c.connect_timeout = Duration::from_secs(5);
    c.backoff_max = Duration::from_secs(5);
    c
}

/// The [`PbxConfig`] of `[asterisk]`.
pub fn pbx_config(a: &AsteriskConfig) -> PbxConfig {
    pbx_config_with(a, None)
}

/// The [`PbxConfig`] of `[asterisk]`, with the librdkafka properties of `[kafka]` for the
/// app_ami_kafka source (`source = kafka`).
pub fn pbx_config_with(a: &AsteriskConfig, kafka: Option<&KafkaSection>) -> PbxConfig {
    let events = match a.source {
        Via::Kafka => {
            let own = OwnServer {
                system_name: a.kafka_system_name.clone(),
                entity_id: a.kafka_entity_id.clone(),
            };
            let mut k = KafkaSourceConfig::new(a.kafka_brokers.clone().unwrap_or_default(), own);
            k.topic = a.kafka_topic.clone();
            k.properties = kafka.map(KafkaSection::property_pairs).unwrap_or_default();
            EventsVia::Kafka(Box::new(k))
        }
        Via::Ami => EventsVia::Ami(Box::new(ami_client_config(a))),
        Via::Zmq => EventsVia::Zmq {
            endpoint: a.zmq_evt.clone(),
        },
    };
    let actions = match a.apply {
        // Kafka is refused for apply when the configuration is read.
        Via::Ami | Via::Kafka => ActionsVia::Ami(Box::new(ami_client_config(a))),
        Via::Zmq => {
            let mut r = ReqClientConfig::new(a.zmq_cmd.clone());
            r.request_timeout = a.request_timeout;
            ActionsVia::Zmq(r)
        }
    };
    let mut p = PbxConfig::new(events, actions);
    p.zmq_ping_interval = a
        .request_timeout
        .clamp(Duration::from_millis(200), Duration::from_secs(2));
    p
}

/// The [`NodeConfig`] of the whole configuration.
pub fn node_config(cfg: &AgentConfig) -> NodeConfig {
    let f = &cfg.federation;
    let mut n = NodeConfig::new(cfg.general.name.clone());
    n.policy = f.node_policy();
    n.origin_timeout_ms = u64::try_from(f.origin_timeout.as_millis()).unwrap_or(u64::MAX);
    n.heartbeat_interval_ms = u64::try_from(f.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
    n.apply.in_flight = APPLY_WINDOW;
    n
}

/// The relay settings of the whole configuration.
pub fn relay_config(cfg: &AgentConfig) -> RelayConfig {
    let mut r = RelayConfig::new(cfg.general.name.clone());
    r.keys = cfg.federation.keyring();
    r.filter = cfg.federation.device_filter();
    r
}

/// The Kafka transport settings of the whole configuration (`transport = kafka`).
pub fn kafka_config(cfg: &AgentConfig, k: &KafkaSection) -> KafkaConfig {
    let mut c = KafkaConfig::new(k.brokers.clone(), cfg.general.name.clone());
    c.topic = k.topic.clone();
    c.heartbeat_topic = k.heartbeat_topic.clone();
    c.keys = cfg.federation.keyring();
    c.properties = k.property_pairs();
    c.origin_timeout = cfg.federation.origin_timeout;
    c.heartbeat_lookback = cfg.federation.origin_timeout * 2;
    c
}

/// Runs the agent until `ctx.shutdown` (the daemon future given to `hintfed_daemon::run`).
pub async fn run(cfg: AgentConfig, ctx: Context) -> anyhow::Result<()> {
    let (pbx, pbx_events) = Pbx::start(pbx_config_with(&cfg.asterisk, cfg.kafka.as_ref()))
        .context("cannot start the Asterisk connection")?;
    if cfg.federation.transport == "kafka" {
        let k = cfg
            .kafka
            .as_ref()
            .context("[kafka] is required with transport = kafka")?;
        let transport = KafkaTransport::start(kafka_config(&cfg, k))
            .await
            .context("cannot start the Kafka transport")?;
        let keys = transport.keys_handle();
        drive(cfg, ctx, (pbx, pbx_events), transport, Some(keys)).await
    } else {
        let mut links = MultiHubConfig::new(cfg.federation.servers.clone());
        // Each hub is told our origin, and sends us none of our own messages back.
        for hub in &mut links.hubs {
            hub.origin = Some(cfg.general.name.clone());
        }
        let hubs = MultiHub::connect(links).context("cannot start the hub links")?;
        drive(cfg, ctx, (pbx, pbx_events), hubs, None).await
    }
}

/// The relay over `transport` and the reload loop.
async fn drive<T: FederationTransport + 'static>(
    cfg: AgentConfig,
    mut ctx: Context,
    (pbx, pbx_events): (Pbx, tokio::sync::mpsc::Receiver<hintfed_asterisk::PbxEvent>),
    transport: T,
    kafka_keys: Option<KafkaKeys>,
) -> anyhow::Result<()> {
    let now = now_millis();
    let node = Node::new(node_config(&cfg), Epoch(now.0), now);
    let relay = Relay::new(
        node,
        (pbx, pbx_events),
        transport,
        relay_config(&cfg),
        RelayHooks {
            metrics: Some(ctx.metrics.clone()),
            events: Some(ctx.events.clone()),
            readiness: Some(ctx.readiness.clone()),
            readiness_prefix: String::new(),
        },
    )?;
    let handle = relay.handle();
    ctx.status.set(std::sync::Arc::new(handle.status()));
    info!(
        origin = %cfg.general.name,
        source = ?cfg.asterisk.source,
        transport = cfg.federation.transport,
        apply = ?cfg.asterisk.apply,
        hubs = cfg.federation.servers.len(),
        signed = !cfg.federation.shared_keys.is_empty(),
        "agent starting"
    );
    let shutdown = ctx.shutdown.clone();
    let mut task = tokio::spawn(relay.run(shutdown));
    let mut current = cfg.reloadable();
    let mut current_cfg = cfg.clone();
    let filters_in_force = cfg.asterisk.event_filters.clone();
    loop {
        tokio::select! {
            r = &mut task => {
                return match r {
                    Ok(r) => r.map_err(anyhow::Error::from),
                    Err(e) => Err(anyhow::anyhow!("relay task failed: {e}")),
                };
            }
            n = ctx.reload.recv() => {
                if n.is_none() {
                    // No more reloads possible; wait for the relay only.
                    let r = task.await;
                    return match r {
                        Ok(r) => r.map_err(anyhow::Error::from),
                        Err(e) => Err(anyhow::anyhow!("relay task failed: {e}")),
                    };
                }
                let file = match ctx.reload_config() {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(error = %e, "reload: configuration invalid; nothing changed");
                        continue;
                    }
                };
                let new = match AgentConfig::from_file(&file) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "reload: configuration invalid; nothing changed");
                        continue;
                    }
                };
                // The AMI event filters follow `exclude`, but Asterisk keeps a session's
                // filters until it ends.
                let filters = &new.asterisk.event_filters;
                let asterisk_changed = AsteriskConfig {
                    event_filters: filters.clone(),
                    ..current_cfg.asterisk.clone()
                } != new.asterisk;
                if new.general.name != current_cfg.general.name
                    || asterisk_changed
                    || new.federation.servers != current_cfg.federation.servers
                {
                    warn!("reload: [general] name, [asterisk] and servers take effect after a restart");
                }
                if *filters != filters_in_force {
                    warn!(
                        in_force = ?filters_in_force,
                        after_restart = ?filters,
                        "reload: the new exclude changes the AMI event filters, which take effect \
                         after a restart (until then Asterisk filters as before)"
                    );
                }
                let next = new.reloadable();
                let mut changed = Vec::new();
                if next.include != current.include {
                    changed.push(format!("include {:?} -> {:?}", current.include, next.include));
                }
                if next.exclude != current.exclude {
                    changed.push(format!("exclude {:?} -> {:?}", current.exclude, next.exclude));
                }
                if next.key_count != current.key_count || !same_keys(&current_cfg, &new) {
                    changed.push(format!("shared keys replaced ({} -> {})", current.key_count, next.key_count));
                }
                if changed.is_empty() {
                    info!("reload: include, exclude and keys unchanged");
                } else {
                    info!(changes = %changed.join("; "), "reload: applying");
                    if let Some(k) = &kafka_keys {
                        k.set(next.keys.clone());
                    }
                    handle.reload(next.filter.clone(), next.keys.clone()).await;
                }
                current = next;
                current_cfg = new;
            }
        }
    }
}

fn same_keys(a: &AgentConfig, b: &AgentConfig) -> bool {
    a.federation.shared_keys.iter().map(|s| s.expose()).eq(b
        .federation
        .shared_keys
        .iter()
        .map(|s| s.expose()))
}
