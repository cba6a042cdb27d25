//! The built `hintfed-broker` binary: the original zmq-ami-broker `example_config.ini` loads
//! as is, a bad file exits 64 with one line naming file, section, key and problem, and a run
//! with the positional FILE propagates between two simulated Asterisks, logs message counts
//! and every message when asked, serves the status API and stops cleanly on SIGTERM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hintfed_sim::DeviceState as S;
use hintfed_testkit::http;
use hintfed_testkit::process::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_hintfed-broker");
const WITHIN: Duration = Duration::from_secs(10);
/// Byte for byte `shared/fixtures/zmq-ami-broker/example_config.ini`.
const ORIGINAL: &str = include_str!("data/example_config.ini");

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn the_original_example_config_loads_as_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "example_config.ini", ORIGINAL);
    for args in [
        vec![file.as_str(), "--check-config"],
        vec!["--config", &file, "--check-config"],
    ] {
        let out = Command::new(BIN).args(&args).output().expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.contains("configuration OK"), "{stderr}");
        assert!(
            !stderr.contains("warning"),
            "no warnings for the original: {stderr}"
        );
        for want in [
            "[server-1]",
            "name = Console 1",
            "cmd_port = 33333",
            "evt_port = 44444",
            "[server-2]",
            "name = Console 2",
            "sections = server-1, server-2",
            "request_timeout = 1s",
        ] {
            assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
        }
    }
}

#[test]
fn a_bad_file_exits_64_naming_file_section_key_and_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            ORIGINAL.replace("cmd_port = 44444", "cmd_port = 70000"),
            "[server-2] cmd_port: \"70000\" is not a port number",
        ),
        (
            ORIGINAL.replace(
                "sections = server-1, server-2",
                "sections = server-1, server-9",
            ),
            "[servers] sections: \"server-9\" is listed but the file has no [server-9] section",
        ),
        (
            ORIGINAL.replace("log_level = info", "log_level = chatty"),
            "[general] log_level:",
        ),
        (
            ORIGINAL.replace(
                "name = Console 2\naddr = 192.168.56.101\n",
                "name = Console 2\n",
            ),
            "[server-2] addr: missing",
        ),
    ];
    for (text, want) in cases {
        let file = write(&dir, "broken.ini", &text);
        let out = Command::new(BIN).arg(&file).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        let line = stderr.trim_end();
        assert!(!line.contains('\n'), "one line: {stderr:?}");
        assert!(
            line.starts_with(&format!("config error: {file}: ")),
            "{line}"
        );
        assert!(line.contains(want), "want {want:?} in {line:?}");
    }
    let out = Command::new(BIN)
        .arg(dir.path().join("missing.ini"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    for want in [
        "[FILE]",
        "--config",
        "--check-config",
        "--log-format",
        "-v",
        "-q",
        "Examples:",
        "hintfed-broker /etc/hintfed/broker.ini",
    ] {
        assert!(help.contains(want), "missing {want:?} in help:\n{help}");
    }
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hintfed-broker "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_the_positional_file_counts_and_stops_on_sigterm() {
    let a = sim("pbx-a").await;
    let b = sim("pbx-b").await;
    let http = free_port();
    let text = format!(
        "{}\n[http]\nlisten = 127.0.0.1:{http}\n",
        config(
            "count_messages = yes\ncount_interval = 200ms\nverbose_messages = yes\n",
            &[
                ami_section("server-1", "Console 1", &a),
                ami_section("server-2", "Console 2", &b)
            ],
        )
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "broker.ini", &text);
    // Set before the broker connects: its full sync (DeviceStateList) picks it up.
    a.set_device_state("PJSIP/100", S::Inuse).expect("set");
    let mut cmd = Command::new(BIN);
    cmd.arg(&file).env_remove("RUST_LOG");
    let mut p = Proc::spawn_command("broker", cmd);
    eventually("propagation", || custom(&b, "PJSIP/100") == "INUSE").await;
    // And a change while it runs.
    a.set_device_state("PJSIP/200", S::Busy).expect("set");
    eventually("live change", || custom(&b, "PJSIP/200") == "BUSY").await;
    eventually("count and verbose log lines", || {
        p.has("message counts") && p.has("event DeviceStateChange") && p.has("PJSIP/100")
    })
    .await;
    let http = ("127.0.0.1", http);
    let ready = http::get_until(http, "/readyz", WITHIN, |r| r.status == 200).await;
    assert!(ready.is_some(), "no /readyz 200");
    // The origin rows are the relays' status, refreshed on their tick, and the bus gauges
    // are set by the count loop after its log lines: neither is ordered with what was
    // awaited above, so each is polled for (with a deadline), not read once.
    let origins = http::get_until(http, "/api/origins", WITHIN, |r| {
        r.status == 200 && r.body.contains("Console 1") && r.body.contains("Console 2")
    })
    .await;
    if origins.is_none() {
        panic!(
            "no origin row of each server: {:?}",
            http::get(http, "/api/origins").await
        );
    }
    let metrics = http::get_until(http, "/metrics", WITHIN, |r| {
        r.status == 200
            && r.body.contains("Console 1")
            && r.body.contains("queue=\"bus Console 2\"")
    })
    .await;
    if metrics.is_none() {
        panic!(
            "no per-server labels and bus queue gauge: {:?}",
            http::get(http, "/metrics").await
        );
    }

    // SIGHUP reloads (log_level, include/exclude; the file is unchanged) and keeps running.
    p.signal("HUP");
    eventually("reload logged", || {
        p.has("reload: include and exclude unchanged")
    })
    .await;
    assert_eq!(p.exit_code(), None, "still running");

    p.signal("TERM");
    assert_eq!(p.wait_exit(WITHIN).await, Some(0), "exit after SIGTERM");
}
