//! The `hintfed-agent` binary: configuration errors exit 64 with one line, `--check-config`
//! masks secrets, `--help` has examples, SIGHUP reloads (and says what changed), SIGTERM
//! exits 0. The daemon runs here without any Asterisk or hub reachable.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hintfed_testkit::net::free_port;
use hintfed_testkit::process::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_hintfed-agent");
const WITHIN: Duration = Duration::from_secs(10);

fn config(dir: &Path, body: &str) -> String {
    let p = dir.join("agent.ini");
    std::fs::write(&p, body).expect("write");
    p.display().to_string()
}

fn good(extra_federation: &str) -> String {
    format!(
        "[general]\nname = pbx-a\n\n[asterisk]\nhost = 127.0.0.1\nport = {}\nusername = hintfed\nsecret = very-secret-ami\n\n[federation]\nservers = tcp://127.0.0.1:{}\nshared_key = very-secret-key\norigin_timeout = 3s\n{extra_federation}",
        free_port(),
        free_port()
    )
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configurations_exit_64_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            good("").replace("name = pbx-a\n", "name =\n"),
            "[general] name: empty",
        ),
        (
            good("").replace("port = ", "port = x"),
            "[asterisk] port: \"x",
        ),
        (
            good("").replace("host = 127.0.0.1\n", "source = kafka\n"),
            "[asterisk] kafka_brokers: missing (required with source = kafka unless [kafka] brokers is set)",
        ),
        (
            good("transport = kafka\n"),
            "[kafka] brokers: missing (required with [federation] transport = kafka)",
        ),
        (
            good("exclude = ([\n"),
            "[federation] exclude: \"([\" is not a valid regular expression",
        ),
    ];
    for (text, want) in cases {
        let path = config(dir.path(), &text);
        let (code, _out, err) = run(&["--config", &path]);
        assert_eq!(code, 64, "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err:?}");
        assert!(
            lines[0].starts_with(&format!("config error: {path}: {want}")),
            "{err}"
        );
        assert!(!err.contains("very-secret"), "{err}");
    }
    let (code, _, err) = run(&["--config", "/nonexistent/agent.ini"]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn check_config_without_a_name_uses_the_host_name_and_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path(), &good("").replace("name = pbx-a\n", ""));
    let out = Command::new(BIN)
        .args(["--config", &path, "--check-config"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let host = hintfed_agent::config::host_name().expect("host name");
    assert!(stdout.contains(&format!("name = {host}\n")), "{stdout}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("[general] name: not set; using the host name"),
        "{stderr}"
    );
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path(), &good(""));
    let out = Command::new(BIN)
        .args(["--config", &path, "--check-config"])
        .env("HINTFED_FEDERATION_DOWN_STATE", "BUSY")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("name = pbx-a"), "{stdout}");
    assert!(stdout.contains("down_state = BUSY"), "{stdout}");
    assert!(stdout.contains("HINTFED_FEDERATION_DOWN_STATE"), "{stdout}");
    assert!(stdout.contains("origin_timeout = 3s"), "{stdout}");
    assert!(stdout.contains("****"), "{stdout}");
    assert!(!stdout.contains("very-secret"), "{stdout}");
    assert!(!stderr.contains("very-secret"), "{stderr}");
}

#[test]
fn help_has_examples_and_mentions_kafka() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("hintfed-agent --config /etc/hintfed/agent.ini"),
        "{out}"
    );
    assert!(out.contains("kafka"), "{out}");
    assert!(out.contains("SIGHUP"), "{out}");
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("hintfed-agent "), "{out}");
}

/// The line of `p` containing `needle`, within [`WITHIN`].
async fn wait_line(p: &Proc, needle: &str) -> String {
    p.wait_for_line(needle, WITHIN)
        .await
        .unwrap_or_else(|| panic!("no line with {needle:?} in {:?}", p.lines()))
}

#[tokio::test]
async fn sighup_reloads_filter_and_keys_and_sigterm_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = good("");
    let path = config(dir.path(), &text);
    let mut d = Proc::spawn(
        "agent",
        Path::new(BIN),
        &["--config".to_owned(), path.clone()],
    );
    wait_line(&d, "agent starting").await;

    std::fs::write(
        &path,
        text.replace(
            "shared_key = very-secret-key",
            "shared_keys = new-secret-key, very-secret-key",
        ) + "include = ^PJSIP/\n",
    )
    .expect("rewrite");
    d.signal("HUP");
    let line = wait_line(&d, "reload: applying").await;
    assert!(line.contains("include"), "{line}");
    assert!(line.contains("shared keys replaced (1 -> 2)"), "{line}");
    assert!(!line.contains("secret-key"), "{line}");

    // An invalid file on reload changes nothing and keeps the daemon running.
    std::fs::write(&path, text.replace("port = ", "port = x")).expect("rewrite");
    d.signal("HUP");
    wait_line(&d, "reload: configuration invalid").await;

    d.signal("TERM");
    assert_eq!(d.wait_exit(WITHIN).await, Some(0));
    assert!(!d.has("very-secret"), "secrets never logged");
}

#[test]
fn the_annotated_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../example_config.ini");
    let out = Command::new(BIN)
        .args(["--config", &path.display().to_string(), "--check-config"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("name = pbx-a"));
}

/// An agent of `exclude` (none: the default) on a simulated Asterisk whose AMI user has
/// `write` permissions, with no hub reachable.
async fn agent_on_sim(
    dir: &Path,
    write: u32,
    exclude: Option<&str>,
) -> (hintfed_sim::SimHandle, Proc, String) {
    let sim = hintfed_sim::SimServer::spawn(hintfed_sim::SimConfig {
        write,
        ..hintfed_sim::SimConfig::default()
    })
    .await
    .expect("sim");
    let mut text = good(
        &exclude
            .map(|e| format!("exclude = {e}\n"))
            .unwrap_or_default(),
    );
    text = text
        .replace(
            &text[text.find("port = ").expect("port")..text.find("\nusername").expect("user")],
            &format!("port = {}", sim.local_addr().port()),
        )
        .replace("username = hintfed", "username = admin")
        .replace("secret = very-secret-ami", "secret = adminsecret");
    let path = config(dir, &text);
    let d = Proc::spawn("agent", Path::new(BIN), &["--config".to_owned(), path]);
    (sim, d, text)
}

/// Whether the agent asked for both filters and then listed the devices.
fn filtered_then_listed(sim: &hintfed_sim::SimHandle) -> bool {
    let asked = |action: &str| sim.stats().actions.get(action).copied().unwrap_or(0);
    asked("Filter") == 2 && asked("DeviceStateList") >= 1
}

#[tokio::test]
async fn asterisk_is_asked_not_to_send_the_events_the_agent_ignores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sim, mut d, text) = agent_on_sim(dir.path(), hintfed_sim::event::ALL, None).await;
    hintfed_testkit::wait::eventually("both filters asked, then the listing", || {
        filtered_then_listed(&sim)
    })
    .await;
    assert!(!d.has("did not take the event filter"), "{:?}", d.lines());
    // An exclude that lets Custom: devices through changes the filters, but Asterisk keeps a
    // session's filters: the reload says so.
    std::fs::write(dir.path().join("agent.ini"), text + "exclude = ^Local/\n").expect("rewrite");
    d.signal("HUP");
    wait_line(&d, "changes the AMI event filters").await;
    d.signal("TERM");
    assert_eq!(d.wait_exit(WITHIN).await, Some(0));

    // A user without write = system: refused with a warning, and the agent works on.
    let dir = tempfile::tempdir().expect("tempdir");
    let (sim, mut d, _) = agent_on_sim(dir.path(), hintfed_sim::event::CALL, None).await;
    wait_line(&d, "did not take the event filter").await;
    hintfed_testkit::wait::eventually("the listing after the refusals", || {
        filtered_then_listed(&sim)
    })
    .await;
    d.signal("TERM");
    assert_eq!(d.wait_exit(WITHIN).await, Some(0));
}
