//! Serve the status page with made-up data, for looking at it in a browser or taking a
//! screenshot: `cargo run -p hintfed-daemon --example status_demo -- 127.0.0.1:9480`.
//! Devices change state every `--tick` (default 700 ms); Ctrl-C stops it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hintfed_daemon::http::{
    BoxFuture, DeviceView, HttpContext, HttpLimits, HttpServer, InfoView, OriginView, PresenceView,
    Readiness, StateView, StatusEvent, StatusEvents, StatusSlot, StatusSource,
};
use hintfed_daemon::metrics::Metrics;
use hintfed_daemon::signals::Signals;

const ORIGINS: [&str; 3] = ["pbx-a", "pbx-b", "pbx-c"];
const STATES: [&str; 8] = [
    "NOT_INUSE",
    "INUSE",
    "RINGING",
    "BUSY",
    "ONHOLD",
    "UNAVAILABLE",
    "RINGINUSE",
    "NOT_INUSE",
];

#[derive(Default)]
struct Demo {
    state: Mutex<StateView>,
    origins: Mutex<Vec<OriginView>>,
}

impl StatusSource for Demo {
    fn state(&self) -> BoxFuture<'_, StateView> {
        let view = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(std::future::ready(view))
    }
    fn origins(&self) -> Vec<OriginView> {
        self.origins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Asterisk's aggregation, enough for a demo.
fn aggregate(states: &BTreeMap<String, String>) -> String {
    let rank = |s: &str| {
        [
            "INVALID",
            "UNKNOWN",
            "UNAVAILABLE",
            "NOT_INUSE",
            "ONHOLD",
            "RINGING",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ]
        .iter()
        .position(|x| *x == s)
        .unwrap_or(0)
    };
    let ringing = states.values().any(|s| s == "RINGING");
    let inuse = states.values().any(|s| s == "INUSE");
    if ringing && inuse {
        return "RINGINUSE".into();
    }
    states
        .values()
        .max_by_key(|s| rank(s))
        .cloned()
        .unwrap_or_else(|| "UNKNOWN".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9480".into())
        .parse()?;
    let tick = Duration::from_millis(700);
    let signals = Signals::install()?;
    let demo = Arc::new(Demo::default());
    let now = now_ms();
    {
        let mut st = demo.state.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, n) in (100..112).enumerate() {
            let mut origins = BTreeMap::new();
            origins.insert(
                ORIGINS[i % 3].to_owned(),
                STATES[i % STATES.len()].to_owned(),
            );
            if i % 4 == 0 {
                origins.insert(ORIGINS[(i + 1) % 3].to_owned(), "INUSE".to_owned());
            }
            st.devices.push(DeviceView {
                key: format!("PJSIP/{n}"),
                aggregate: aggregate(&origins),
                changed_ms: now,
                origins,
            });
        }
        st.presence.push(PresenceView {
            key: "CustomPresence:alice".into(),
            status: "dnd".into(),
            subtype: "meeting".into(),
            message: "back at 2, promise".into(),
            origin: "pbx-c".into(),
            changed_ms: now - 65_000,
        });
        st.presence.push(PresenceView {
            key: "CustomPresence:bob".into(),
            status: "available".into(),
            subtype: String::new(),
            message: String::new(),
            origin: "pbx-a".into(),
            changed_ms: now - 4_000,
        });
        *demo.origins.lock().unwrap_or_else(PoisonError::into_inner) = ORIGINS
            .iter()
            .enumerate()
            .map(|(i, o)| OriginView {
                name: (*o).to_owned(),
                up: i != 2,
                epoch: 1_763_900_000 + i as u64,
                last_seq: 1000 + i as u64 * 17,
                last_seen_ms_ago: Some(if i == 2 { 31_000 } else { 200 + i as u64 * 90 }),
                lag_ms: Some(2 + i as u64),
                detail: (i == 2).then(|| "silent past origin_timeout (15s)".to_owned()),
            })
            .collect();
    }
    let readiness = Readiness::new();
    readiness.set("demo", Ok(()));
    let events = StatusEvents::default();
    let status = StatusSlot::default();
    status.set(demo.clone());
    let ctx = HttpContext {
        info: InfoView {
            daemon: "hintfed-demo".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_ms: now,
        },
        metrics: Arc::new(Metrics::new("hintfed-demo", env!("CARGO_PKG_VERSION"))),
        status,
        readiness,
        events: events.clone(),
        limits: HttpLimits::default(),
        shutdown: signals.shutdown.clone(),
    };
    let server = HttpServer::bind(listen, ctx).await?;
    println!("status page: http://{}/", server.local_addr()?);
    let http = tokio::spawn(server.run());
    let mut step: usize = 0;
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            () = signals.shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        step += 1;
        let ev = {
            let mut st = demo.state.lock().unwrap_or_else(PoisonError::into_inner);
            let n = st.devices.len();
            let d = &mut st.devices[step.wrapping_mul(7) % n];
            let origin = ORIGINS[step % 2]; // pbx-c is down in the demo
            d.origins
                .insert(origin.to_owned(), STATES[step % STATES.len()].to_owned());
            d.aggregate = aggregate(&d.origins);
            d.changed_ms = now_ms();
            StatusEvent::Device(d.clone())
        };
        events.publish(ev);
    }
    http.await??;
    Ok(())
}
