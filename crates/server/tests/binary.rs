//! The `hintfed-server` binary: CLI, configuration errors, HTTP, signals.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{FakeAgent, WITHIN};
use hintfed_core::{DeviceState, KeyRing, LocalEvent};
use hintfed_testkit::http;
use hintfed_testkit::net::{free_port, free_port_pair};
use hintfed_testkit::process::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_hintfed-server");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("server.ini");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The body of `GET path` on the local `port` once `pred` holds for the reply.
async fn wait_http(port: u16, path: &str, pred: impl FnMut(&http::Reply) -> bool) -> String {
    http::get_until(("127.0.0.1", port), path, WITHIN, pred)
        .await
        .unwrap_or_else(|| panic!("GET {path} never satisfied"))
        .body
}

#[test]
fn a_bad_config_exits_64_with_one_line_naming_file_key_and_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, needle) in [
        ("[server]\nlisten = udp://0.0.0.0:1\n", "[server] listen"),
        (
            "[server]\nlistne = tcp://0.0.0.0:1\n",
            "[server] listne: unknown key",
        ),
        (
            "[federation]\norigin_timeout = 5 parsecs\n",
            "[federation] origin_timeout",
        ),
    ] {
        let path = write_config(&dir, text);
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("server.ini"), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/server.ini"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        "[federation]\nshared_key = hunter2\n[server]\nname = hub-1\nlisten = tcp://127.0.0.1:5560\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .env("HINTFED_SERVER_SNAPSHOT_CHUNK", "17")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("hub-1"), "{text}");
    assert!(text.contains("snapshot_chunk = 17"), "{text}");
    assert!(text.contains("HINTFED_SERVER_SNAPSHOT_CHUNK"), "{text}");
}

#[test]
fn help_has_examples_and_version_prints() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("hintfed-server --config /etc/hintfed/server.ini"),
        "{help}"
    );
    assert!(help.contains("--check-config"), "{help}");
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_agents_and_http_then_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port_pair();
    let http = free_port();
    let path = write_config(
        &dir,
        &format!(
            "[federation]\nshared_key = s3cret\n\
             [server]\nlisten = tcp://127.0.0.1:{port}\n[http]\nlisten = 127.0.0.1:{http}\n"
        ),
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&path).arg("-q");
    let mut p = Proc::spawn_command("server", cmd);
    wait_http(http, "/readyz", |r| r.status == 200).await;
    let eps = vec![format!("tcp://127.0.0.1:{port}")];
    let mut a = FakeAgent::connect("pbx-a", &eps, KeyRing::from_secrets(["s3cret"])).await;
    a.full_sync(vec![LocalEvent::device("PJSIP/100", DeviceState::Inuse)]);
    // Keep the agent alive (heartbeats) while polling.
    let deadline = Instant::now() + WITHIN;
    let state = loop {
        a.pump(Duration::from_millis(20)).await;
        if let Some(r) = http::get(("127.0.0.1", http), "/api/state").await
            && r.status == 200
            && r.body.contains("PJSIP/100")
        {
            break r.body;
        }
        assert!(Instant::now() < deadline, "GET /api/state never satisfied");
    };
    let v: serde_json::Value = serde_json::from_str(&state).expect("json");
    assert_eq!(v["devices"][0]["aggregate"], "INUSE");
    assert_eq!(v["devices"][0]["origins"]["pbx-a"], "INUSE");
    let metrics = wait_http(http, "/metrics", |r| {
        r.status == 200 && r.body.contains("hintfed_origins_up 1")
    })
    .await;
    let origins = wait_http(http, "/api/origins", |r| r.status == 200).await;
    assert!(
        metrics.contains("hintfed_build_info{daemon=\"hintfed-server\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("hintfed_updates_received_total{kind=\"device\"}"),
        "{metrics}"
    );
    assert!(origins.contains("\"pbx-a\""), "{origins}");

    // SIGHUP: the shared keys are re-read (rotation: a new key first, the old one kept).
    std::fs::write(
        &path,
        format!(
            "[federation]\nshared_keys = rotated, s3cret\n\
             [server]\nlisten = tcp://127.0.0.1:{port}\n[http]\nlisten = 127.0.0.1:{http}\n"
        ),
    )
    .expect("rewrite config");
    p.signal("HUP");
    let mut n = FakeAgent::connect("pbx-n", &eps, KeyRing::from_secrets(["rotated"])).await;
    n.full_sync(vec![]);
    let deadline = Instant::now() + WITHIN;
    let mut state = DeviceState::Ringing;
    loop {
        // Until the reload is applied the hub refuses the new key; keep changing state.
        n.event(LocalEvent::device("PJSIP/200", state));
        state = if state == DeviceState::Ringing {
            DeviceState::Busy
        } else {
            DeviceState::Ringing
        };
        n.pump(Duration::from_millis(50)).await;
        let body = http::get_body(("127.0.0.1", http), "/api/state").await;
        if body.contains("PJSIP/200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new key never accepted after SIGHUP"
        );
    }
    p.signal("TERM");
    assert_eq!(
        p.wait_exit(Duration::from_secs(5)).await,
        Some(0),
        "exit 0 within 5 s of SIGTERM"
    );
}
