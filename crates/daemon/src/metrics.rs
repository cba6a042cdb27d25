//! Prometheus metrics: one [`Metrics`] per process holding a prometheus-client `Registry`
//! (prefix `hintfed_`) and typed handles the daemons increment. Handles are cheap clones
//! (shared atomics), so a daemon may clone the ones it needs into its tasks.
//!
//! Families (OpenMetrics names; counters get `_total`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `hintfed_events_in_total` | counter | `source` (connection or origin name), `kind` |
//! | `hintfed_updates_published_total` | counter | `kind` |
//! | `hintfed_updates_received_total` | counter | `kind` |
//! | `hintfed_applies_total` | counter | `result` (`applied`, `unchanged`, `failed`) |
//! | `hintfed_apply_latency_seconds` | histogram | — |
//! | `hintfed_echoes_suppressed_total` | counter | `kind` |
//! | `hintfed_rejects_total` | counter | `reason` (free text, keep it a small fixed set) |
//! | `hintfed_queue_depth` | gauge | `queue` |
//! | `hintfed_reconnects_total` | counter | `link` |
//! | `hintfed_origins_up` / `hintfed_origins_down` | gauge | — |
//! | `hintfed_snapshot_entries` | histogram | — |
//! | `hintfed_process_start_time_seconds` | gauge | — |
//! | `hintfed_build_info` | info | `daemon`, `version` |
//!
//! `kind` is `device`, `presence` or `other`. A labelled family appears in the exposition
//! once it has a sample (prometheus-client omits empty families). Daemon-specific families can be added with
//! [`Metrics::registry_mut`] before the `Metrics` is shared.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What an event or update is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Kind {
    /// Device state.
    Device,
    /// Presence state.
    Presence,
    /// Anything else (FullyBooted, heartbeats...).
    Other,
}

/// Outcome of one apply (Setvar) on an Asterisk.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ApplyResult {
    /// Written.
    Applied,
    /// Skipped: the server already held the value.
    Unchanged,
    /// The action failed or timed out.
    Failed,
}

impl Kind {
    /// The label value: `device`, `presence`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Presence => "presence",
            Kind::Other => "other",
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl ApplyResult {
    /// The label value: `applied`, `unchanged`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyResult::Applied => "applied",
            ApplyResult::Unchanged => "unchanged",
            ApplyResult::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for ApplyResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Labels of `hintfed_events_in_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// Where the event came from (connection or origin name).
    pub source: String,
    /// What it is about.
    pub kind: Kind,
}

/// Labels with only a kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What it is about.
    pub kind: Kind,
}

/// Labels of `hintfed_applies_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    /// Outcome.
    pub result: ApplyResult,
}

/// Labels of `hintfed_rejects_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Why, e.g. `bad_signature`, `replay`, `malformed`, `oversize`.
    pub reason: String,
}

/// Labels of `hintfed_queue_depth`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Which queue, e.g. the apply queue of one Asterisk.
    pub queue: String,
}

/// Labels of `hintfed_reconnects_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// Which link, e.g. `asterisk`, `hub tcp://hub-1:5560`.
    pub link: String,
}

/// The registry and the typed handles.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events read from Asterisk (or a Kafka source), by source and kind.
    pub events_in: Family<EventLabels, Counter>,
    /// Updates this process published to the federation.
    pub updates_published: Family<KindLabels, Counter>,
    /// Updates received from the federation.
    pub updates_received: Family<KindLabels, Counter>,
    /// Applies by result.
    pub applies: Family<ApplyLabels, Counter>,
    /// Time from receiving an update to its apply being acknowledged, seconds.
    pub apply_latency: Histogram,
    /// Echoes of our own writes swallowed.
    pub echoes_suppressed: Family<KindLabels, Counter>,
    /// Messages rejected, by reason.
    pub rejects: Family<RejectLabels, Counter>,
    /// Current depth of a queue.
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// Reconnections, by link.
    pub reconnects: Family<LinkLabels, Counter>,
    /// Origins currently alive.
    pub origins_up: Gauge,
    /// Origins currently down.
    pub origins_down: Gauge,
    /// Number of entries per snapshot sent or received.
    pub snapshot_entries: Histogram,
    /// Unix time the process started, seconds.
    pub process_start_time: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    /// Build the registry for `daemon` (e.g. `hintfed-agent`) at `version`.
    pub fn new(daemon: &str, version: &str) -> Self {
        let mut registry = Registry::with_prefix("hintfed");
        let m = Self {
            events_in: Family::default(),
            updates_published: Family::default(),
            updates_received: Family::default(),
            applies: Family::default(),
            // 0.25 ms .. ~4 s
            apply_latency: Histogram::new(exponential_buckets(0.00025, 2.0, 15)),
            echoes_suppressed: Family::default(),
            rejects: Family::default(),
            queue_depth: Family::default(),
            reconnects: Family::default(),
            origins_up: Gauge::default(),
            origins_down: Gauge::default(),
            // 1 .. 65536 entries
            snapshot_entries: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            process_start_time: Gauge::default(),
            registry: Registry::default(),
        };
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        m.process_start_time.set(start);
        registry.register(
            "events_in",
            "State events read from Asterisk or a source topic",
            m.events_in.clone(),
        );
        registry.register(
            "updates_published",
            "Updates published to the federation",
            m.updates_published.clone(),
        );
        registry.register(
            "updates_received",
            "Updates received from the federation",
            m.updates_received.clone(),
        );
        registry.register(
            "applies",
            "State applies (Setvar) on Asterisk, by result",
            m.applies.clone(),
        );
        registry.register(
            "apply_latency_seconds",
            "Time from receiving an update to its apply being acknowledged",
            m.apply_latency.clone(),
        );
        registry.register(
            "echoes_suppressed",
            "Echoes of our own writes that were not forwarded",
            m.echoes_suppressed.clone(),
        );
        registry.register(
            "rejects",
            "Messages rejected (authentication, replay, malformed, oversize), by reason",
            m.rejects.clone(),
        );
        registry.register(
            "queue_depth",
            "Current number of entries waiting in a queue",
            m.queue_depth.clone(),
        );
        registry.register("reconnects", "Reconnections, by link", m.reconnects.clone());
        registry.register(
            "origins_up",
            "Origins currently alive",
            m.origins_up.clone(),
        );
        registry.register(
            "origins_down",
            "Origins currently down (silent past their timeout or lost their Asterisk)",
            m.origins_down.clone(),
        );
        registry.register(
            "snapshot_entries",
            "Entries per state snapshot sent or received",
            m.snapshot_entries.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            m.process_start_time.clone(),
        );
        registry.register(
            "build",
            "Daemon name and version",
            Info::new(vec![
                ("daemon".to_owned(), daemon.to_owned()),
                ("version".to_owned(), version.to_owned()),
            ]),
        );
        Self { registry, ..m }
    }

    /// The registry, to add daemon-specific families before sharing the `Metrics`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Shorthand: count one event in.
    pub fn event_in(&self, source: &str, kind: Kind) {
        self.events_in
            .get_or_create(&EventLabels {
                source: source.to_owned(),
                kind,
            })
            .inc();
    }

    /// Shorthand: count one apply and, when given, its latency.
    pub fn apply(&self, result: ApplyResult, latency: Option<std::time::Duration>) {
        self.applies.get_or_create(&ApplyLabels { result }).inc();
        if let Some(l) = latency {
            self.apply_latency.observe(l.as_secs_f64());
        }
    }

    /// Shorthand: count one rejected message.
    pub fn reject(&self, reason: &str) {
        self.rejects
            .get_or_create(&RejectLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Shorthand: count one reconnection of `link`.
    pub fn reconnect(&self, link: &str) {
        self.reconnects
            .get_or_create(&LinkLabels {
                link: link.to_owned(),
            })
            .inc();
    }

    /// Shorthand: set the depth of `queue`.
    pub fn set_queue_depth(&self, queue: &str, depth: i64) {
        self.queue_depth
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .set(depth);
    }

    /// Handles for one of several components that each report `origins_up`/`origins_down`
    /// from their own point of view (the broker's relays): every family is shared with
    /// `self`, except those two gauges, which are private to the copy (never exported), so
    /// the owner computes the process-wide values itself instead of the last writer winning.
    pub fn with_own_origin_gauges(&self) -> Metrics {
        Metrics {
            registry: Registry::default(),
            events_in: self.events_in.clone(),
            updates_published: self.updates_published.clone(),
            updates_received: self.updates_received.clone(),
            applies: self.applies.clone(),
            apply_latency: self.apply_latency.clone(),
            echoes_suppressed: self.echoes_suppressed.clone(),
            rejects: self.rejects.clone(),
            queue_depth: self.queue_depth.clone(),
            reconnects: self.reconnects.clone(),
            origins_up: Gauge::default(),
            origins_down: Gauge::default(),
            snapshot_entries: self.snapshot_entries.clone(),
            process_start_time: self.process_start_time.clone(),
        }
    }

    /// The OpenMetrics text exposition (serve with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail; keep the partial output if it ever does.
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new("hintfed-test", "1.2.3");
        m.event_in("pbx-a", Kind::Device);
        m.updates_published
            .get_or_create(&KindLabels {
                kind: Kind::Presence,
            })
            .inc();
        m.updates_received
            .get_or_create(&KindLabels { kind: Kind::Device })
            .inc();
        m.echoes_suppressed
            .get_or_create(&KindLabels { kind: Kind::Device })
            .inc();
        m.apply(
            ApplyResult::Applied,
            Some(std::time::Duration::from_millis(3)),
        );
        m.reject("bad_signature");
        m.reconnect("asterisk");
        m.set_queue_depth("apply", 4);
        m.origins_up.set(2);
        m.snapshot_entries.observe(120.0);
        let text = m.encode();
        for needle in [
            "# HELP hintfed_events_in State events",
            "hintfed_events_in_total{source=\"pbx-a\",kind=\"device\"} 1",
            "hintfed_updates_published_total{kind=\"presence\"} 1",
            "hintfed_updates_received_total{kind=\"device\"} 1",
            "hintfed_applies_total{result=\"applied\"} 1",
            "# TYPE hintfed_apply_latency_seconds histogram",
            "hintfed_apply_latency_seconds_count 1",
            "hintfed_echoes_suppressed_total{kind=\"device\"} 1",
            "hintfed_rejects_total{reason=\"bad_signature\"} 1",
            "hintfed_queue_depth{queue=\"apply\"} 4",
            "hintfed_reconnects_total{link=\"asterisk\"} 1",
            "hintfed_origins_up 2",
            "hintfed_origins_down 0",
            "hintfed_snapshot_entries_count 1",
            "# TYPE hintfed_process_start_time_seconds gauge",
            "hintfed_build_info{daemon=\"hintfed-test\",version=\"1.2.3\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn own_origin_gauges_share_everything_else() {
        let m = Metrics::new("hintfed-test", "1.2.3");
        let part = m.with_own_origin_gauges();
        part.event_in("pbx-a", Kind::Device);
        part.origins_up.set(7);
        m.origins_up.set(3);
        let text = m.encode();
        assert!(text.contains("hintfed_events_in_total{source=\"pbx-a\",kind=\"device\"} 1"));
        assert!(text.contains("hintfed_origins_up 3"), "{text}");
        assert_eq!(part.origins_up.get(), 7);
    }
}
