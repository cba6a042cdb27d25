//! The `hintfed-server` binary: CLI, configuration errors, HTTP, signals.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FakeAgent, WITHIN};
use hintfed_core::{DeviceState, KeyRing, LocalEvent};

const BIN: &str = env!("CARGO_BIN_EXE_hintfed-server");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = a.local_addr().expect("addr").port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("server.ini");
    std::fs::write(&path, text).expect("write config");
    path
}

/// One HTTP/1.1 GET; (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn wait_http(port: u16, path: &str, mut pred: impl FnMut(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some((status, body)) = get(port, path)
            && pred(status, &body)
        {
            return body;
        }
        assert!(Instant::now() < deadline, "GET {path} never satisfied");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("-q")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut child = Child(child);
    tokio::task::spawn_blocking(move || {
        wait_http(http, "/readyz", |s, _| s == 200);
    })
    .await
    .expect("ready");
    let eps = vec![format!("tcp://127.0.0.1:{port}")];
    let mut a = FakeAgent::connect("pbx-a", &eps, KeyRing::from_secrets(["s3cret"])).await;
    a.full_sync(vec![LocalEvent::device("PJSIP/100", DeviceState::Inuse)]);
    let state = tokio::task::spawn_blocking(move || {
        wait_http(http, "/api/state", |s, b| {
            s == 200 && b.contains("PJSIP/100")
        })
    });
    // Keep the agent alive (heartbeats) while polling.
    let state = loop {
        if state.is_finished() {
            break state.await.expect("state");
        }
        a.pump(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&state).expect("json");
    assert_eq!(v["devices"][0]["aggregate"], "INUSE");
    assert_eq!(v["devices"][0]["origins"]["pbx-a"], "INUSE");
    let (metrics, origins) = tokio::task::spawn_blocking(move || {
        (
            wait_http(http, "/metrics", |s, b| {
                s == 200 && b.contains("hintfed_origins_up 1")
            }),
            wait_http(http, "/api/origins", |s, _| s == 200),
        )
    })
    .await
    .expect("metrics");
    assert!(
        metrics.contains("hintfed_build_info{daemon=\"hintfed-server\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("hintfed_updates_received_total{kind=\"device\"}"),
        "{metrics}"
    );
    assert!(origins.contains("\"pbx-a\""), "{origins}");

    let pid = child.0.id().to_string();
    // SIGHUP: the shared keys are re-read (rotation: a new key first, the old one kept).
    std::fs::write(
        &path,
        format!(
            "[federation]\nshared_keys = rotated, s3cret\n\
             [server]\nlisten = tcp://127.0.0.1:{port}\n[http]\nlisten = 127.0.0.1:{http}\n"
        ),
    )
    .expect("rewrite config");
    let hup = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(hup.success());
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
        let body = tokio::task::spawn_blocking(move || get(http, "/api/state"))
            .await
            .expect("get");
        if body.is_some_and(|(_, b)| b.contains("PJSIP/200")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new key never accepted after SIGHUP"
        );
    }
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 5 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
}
