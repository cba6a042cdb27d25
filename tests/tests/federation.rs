//! End-to-end: the agent/server topology over AMI with the real binaries — one `hintfed-sim`
//! serving three Asterisks (pbx-a, pbx-b, pbx-c), two `hintfed-server` hubs, three
//! `hintfed-agent`s. Each test builds its own federation (own ports, own processes).
//!
//! Needs the binaries: `cargo build -p hintfed-sim -p hintfed-server -p hintfed-agent`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hintfed_e2e::fed::{Federation, Via, http_get, metric, setvar_delta};
use hintfed_testkit::http;
use zeromq::{Socket, SocketSend};

const ALL: [&str; 3] = ["pbx-a", "pbx-b", "pbx-c"];
const WITHIN: Duration = Duration::from_secs(10);

async fn full() -> Federation {
    let mut f = Federation::start(&ALL, Via::Ami).await;
    f.add_hub().await;
    f.add_hub().await;
    for n in ALL {
        f.add_agent(n).await;
    }
    f
}

const ALICE: &str = "CustomPresence:alice";

/// Asserts that alice's presence on each of `on` becomes (status, subtype, message).
async fn wait_presence(f: &Federation, on: &[&str], status: &str, subtype: &str, message: &str) {
    for n in on {
        assert!(
            f.wait_presence(ALICE, (status, subtype, message), &[n], WITHIN)
                .await,
            "presence on {n}: {:?}",
            f.ami(n).presence(ALICE).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_presence_propagate_once_without_loop() {
    let f = full().await;

    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "Custom:PJSIP/100 INUSE on pbx-b and pbx-c"
    );
    // Never mirrored back onto its own origin.
    assert_ne!(f.ami("pbx-a").custom("PJSIP/100").await, "INUSE");

    f.ami("pbx-c")
        .set_presence(ALICE, "dnd", "lunch", "back at 2, maybe")
        .await;
    wait_presence(&f, &["pbx-a", "pbx-b"], "dnd", "lunch", "back at 2, maybe").await;

    // No loop: once settled, one phone change costs exactly one Setvar on each other
    // Asterisk and none on its own, although the simulator emits it twice (as Asterisk does).
    let before = f.settled_setvars().await;
    // Counted from a quiet start: the hubs' republish requests of the start are answered.
    let m0 = f.settled_agent_metrics("pbx-a").await;
    f.ami("pbx-a").set_device("PJSIP/100", "BUSY").await;
    assert!(
        f.wait_custom("PJSIP/100", "BUSY", &["pbx-b", "pbx-c"], WITHIN)
            .await
    );
    let after = f.settled_setvars().await;
    assert_eq!(
        setvar_delta(&before, &after),
        BTreeMap::from([("pbx-a", 0), ("pbx-b", 1), ("pbx-c", 1)]),
        "one Setvar on each other Asterisk, none on the origin: {before:?} -> {after:?}"
    );
    // The duplicate event was read twice and forwarded once.
    let m1 = f.agent_metrics("pbx-a").await;
    let events = |m: &str| {
        metric(
            m,
            "hintfed_events_in_total",
            &["source=\"pbx-a\"", "kind=\"device\""],
        )
    };
    let published = |m: &str| metric(m, "hintfed_updates_published_total", &["kind=\"device\""]);
    assert_eq!(events(&m1) - events(&m0), 2, "events in:\n{m1}");
    assert_eq!(published(&m1) - published(&m0), 1, "published:\n{m1}");

    // The status API shows the device with each origin's report.
    let state = http_get(&f.agents["pbx-b"].http, "/api/state").await;
    let v: serde_json::Value = serde_json::from_str(&state).expect("state JSON");
    let dev = v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["key"] == "PJSIP/100")
        .expect("PJSIP/100 listed");
    assert_eq!(dev["origins"]["pbx-a"], "BUSY", "{dev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_loses_nothing_and_a_restarted_hub_rebuilds_its_table() {
    let mut f = full().await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await
    );

    // A burst of changes with hub-1 killed in the middle of it: nothing is lost.
    let states = ["RINGING", "INUSE", "ONHOLD", "BUSY", "NOT_INUSE"];
    for i in 0..19 {
        if i == 10 {
            f.kill_hub(0);
        }
        f.ami("pbx-c")
            .set_device("PJSIP/300", states[i % states.len()])
            .await;
    }
    assert!(
        f.wait_custom(
            "PJSIP/300",
            states[18 % states.len()],
            &["pbx-a", "pbx-b"],
            WITHIN
        )
        .await,
        "the last of the burst arrives everywhere"
    );
    f.ami("pbx-b").set_device("PJSIP/200", "RINGING").await;
    assert!(
        f.wait_custom("PJSIP/200", "RINGING", &["pbx-a", "pbx-c"], WITHIN)
            .await,
        "propagates through the remaining hub"
    );

    // hub-1 comes back empty and rebuilds its table from the agents.
    f.start_hub(0).await;
    let http = f.hubs[0].http.clone();
    assert!(
        hintfed_e2e::wait_until(WITHIN, || {
            let http = http.clone();
            async move {
                let s = http_get(&http, "/api/state").await;
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) else {
                    return false;
                };
                let find = |k: &str| {
                    v["devices"]
                        .as_array()
                        .and_then(|a| a.iter().find(|d| d["key"] == k).cloned())
                };
                find("PJSIP/100").is_some_and(|d| d["origins"]["pbx-a"] == "INUSE")
                    && find("PJSIP/200").is_some_and(|d| d["origins"]["pbx-b"] == "RINGING")
            }
        })
        .await,
        "restarted hub rebuilt its table: {}",
        http_get(&f.hubs[0].http, "/api/state").await
    );

    // Now only the restarted hub carries the federation.
    f.kill_hub(1);
    f.ami("pbx-c").set_device("PJSIP/300", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/300", "INUSE", &["pbx-a", "pbx-b"], WITHIN)
            .await,
        "propagates through the restarted hub"
    );
    assert_eq!(f.ami("pbx-b").custom("PJSIP/100").await, "INUSE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_last_receives_the_full_state() {
    let mut f = Federation::start(&ALL, Via::Ami).await;
    f.add_hub().await;
    f.add_hub().await;
    f.add_agent("pbx-a").await;
    f.add_agent("pbx-b").await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    f.ami("pbx-b").set_device("PJSIP/200", "BUSY").await;
    f.ami("pbx-b")
        .set_presence(ALICE, "away", "meeting", "until 3, then free")
        .await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b"], WITHIN)
            .await
    );
    assert!(f.wait_custom("PJSIP/200", "BUSY", &["pbx-a"], WITHIN).await);

    f.add_agent("pbx-c").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-c"], WITHIN)
            .await
    );
    assert!(f.wait_custom("PJSIP/200", "BUSY", &["pbx-c"], WITHIN).await);
    wait_presence(
        &f,
        &["pbx-c", "pbx-a"],
        "away",
        "meeting",
        "until 3, then free",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_asterisk_gets_every_remote_state_back() {
    let f = full().await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    f.ami("pbx-c").set_device("PJSIP/300", "RINGING").await;
    f.ami("pbx-a")
        .set_presence(ALICE, "xa", "trip", "back monday, maybe")
        .await;
    // What pbx-b must show of the others' state, before and after its restart.
    let remote_state_on_b = || async {
        assert!(
            f.wait_custom("PJSIP/100", "INUSE", &["pbx-b"], WITHIN)
                .await
        );
        assert!(
            f.wait_custom("PJSIP/300", "RINGING", &["pbx-b"], WITHIN)
                .await
        );
        wait_presence(&f, &["pbx-b"], "xa", "trip", "back monday, maybe").await;
    };
    remote_state_on_b().await;

    let writes_before = f.ami("pbx-b").stat("SetvarTotal").await;
    f.ami("pbx-b").restart().await;
    assert!(
        hintfed_e2e::wait_until(WITHIN, || async {
            f.ami("pbx-b").stat("Restarts").await == 1
        })
        .await
    );
    remote_state_on_b().await;
    assert!(
        f.ami("pbx-b").stat("SetvarTotal").await >= writes_before + 3,
        "states were written again after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_turns_its_phones_unavailable_elsewhere_and_restores_them() {
    let mut f = full().await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await
    );
    let killed = Instant::now();
    f.kill_agent("pbx-a");
    assert!(
        f.wait_custom("PJSIP/100", "UNAVAILABLE", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "down_state applied after origin_timeout"
    );
    // origin_timeout is 3 s; allow one more timeout for detection and the write.
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "UNAVAILABLE after {took:?}, origin_timeout 3s"
    );

    f.start_agent("pbx-a").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "restored when the agent returns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_are_rejected() {
    let mut f = Federation::start(&ALL, Via::Ami).await;
    f.add_hub().await;
    f.add_agent("pbx-a").await;
    f.add_agent("pbx-b").await;
    // pbx-c's agent signs with the wrong key: nothing it says is believed.
    let http = format!("127.0.0.1:{}", hintfed_e2e::free_port());
    let cfg = f.write_agent_config("pbx-c", "not-the-shared-key", &http);
    let evil = hintfed_e2e::Proc::spawn_with_env(
        "agent-evil",
        &hintfed_e2e::bin_path("hintfed-agent"),
        &["--config".to_owned(), cfg.display().to_string()],
        &[("HINTFED_ASTERISK_SECRET", hintfed_e2e::fed::AMI_SECRET)],
    );
    // A raw DEALER peer sends garbage and an unsigned envelope to the hub.
    let mut dealer = zeromq::DealerSocket::new();
    dealer
        .connect(&format!("tcp://127.0.0.1:{}", f.hubs[0].port))
        .await
        .expect("dealer connect");
    let unsigned = r#"{"env":{"v":1,"origin":"pbx-x","epoch":1,"seq":1,"body":{"type":"update","key":"PJSIP/100","value":{"device":"BUSY"},"ts":{"wall":1,"logical":0}}}}"#;
    for payload in [&b"not json at all"[..], unsigned.as_bytes()] {
        let msg: zeromq::ZmqMessage = vec![
            Bytes::from_static(b"state.device"),
            Bytes::copy_from_slice(payload),
        ]
        .try_into()
        .expect("frames");
        dealer.send(msg).await.expect("dealer send");
    }
    f.ami("pbx-c").set_device("PJSIP/300", "BUSY").await;

    // Whether a `/metrics` reply counts rejects for each of `reasons`.
    let rejected = |r: &http::Reply, reasons: &[&str]| {
        reasons
            .iter()
            .all(|why| metric(&r.body, "hintfed_rejects_total", &[why]) >= 1)
    };
    let hub_http = f.hubs[0].http.as_str();
    assert!(
        http::get_until(hub_http, "/metrics", WITHIN, |r| {
            rejected(r, &["bad_mac", "malformed", "unsigned"])
        })
        .await
        .is_some(),
        "hub counted the rejects: {}",
        http_get(hub_http, "/metrics").await
    );
    // A legitimate change made after the forged one arrives; the forged one never does.
    f.ami("pbx-b").set_device("PJSIP/200", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/200", "INUSE", &["pbx-a"], WITHIN)
            .await
    );
    assert_ne!(f.ami("pbx-a").custom("PJSIP/300").await, "BUSY");
    assert_ne!(f.ami("pbx-b").custom("PJSIP/300").await, "BUSY");
    // The impostor, in turn, rejects the hub's messages.
    assert!(
        http::get_until(http.as_str(), "/metrics", WITHIN, |r| rejected(
            r,
            &["bad_mac"]
        ))
        .await
        .is_some(),
        "the impostor counted bad_mac rejects"
    );
    drop(evil);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_keep_their_state_while_every_hub_is_gone_and_resync_on_return() {
    let mut f = full().await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b"], WITHIN)
            .await
    );
    f.kill_hub(0);
    f.kill_hub(1);
    // Changed while no hub is reachable: not lost, sent when a hub is back.
    f.ami("pbx-a").set_device("PJSIP/100", "RINGING").await;
    assert_eq!(f.ami("pbx-b").custom("PJSIP/100").await, "INUSE");
    f.start_hub(1).await;
    assert!(
        f.wait_custom("PJSIP/100", "RINGING", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "resynced through the returning hub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_asterisk_is_announced_down_and_recovers_with_a_full_sync() {
    let f = full().await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await
    );
    // pbx-a's Asterisk restarts and stays unreachable for a while: its agent says so at once
    // (before any origin_timeout), and its phones show down_state elsewhere.
    f.ami("pbx-a").restart_down(3.0).await;
    assert!(
        f.wait_custom("PJSIP/100", "UNAVAILABLE", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "down_state while pbx-a's Asterisk is unreachable"
    );
    let ready = http_get(&f.agents["pbx-a"].http, "/readyz").await;
    assert!(
        !ready.starts_with("ready"),
        "agent not ready without Asterisk: {ready}"
    );
    // Back (idle after its restart): the agent's full sync replaces the old INUSE.
    assert!(
        f.wait_custom("PJSIP/100", "NOT_INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "pbx-a's full sync after recovery"
    );
    f.ami("pbx-a").set_device("PJSIP/100", "BUSY").await;
    assert!(
        f.wait_custom("PJSIP/100", "BUSY", &["pbx-b", "pbx-c"], WITHIN)
            .await
    );
}
