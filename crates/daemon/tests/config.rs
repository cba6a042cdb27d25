//! Configuration loading: the original zmq-ami-broker file, the issue's annotated agent file,
//! exact one-line errors, environment overrides, masking, and `run`'s exit statuses for bad
//! configurations and `--check-config`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use hintfed_daemon::cli::CommonArgs;
use hintfed_daemon::config::{ConfigError, ConfigFile, Secret, render_ini};
use hintfed_daemon::run::{self, CommonConfig, DaemonSpec};

/// Byte-for-byte copy of `shared/fixtures/zmq-ami-broker/example_config.ini` (no final
/// newline, `count_messages  = no` with two blanks, a full-line `;` comment).
const ORIGINAL: &str = include_str!("data/zmq-ami-broker-example_config.ini");

const AGENT_INI: &str = r#"[general]
name = pbx-a            ; origin name, unique per Asterisk (default: the SystemName Asterisk reports)
device_state = yes
presence = yes
log_level = info        ; also -v/-q and RUST_LOG

[asterisk]
source = ami            ; ami | zmq | kafka
apply = ami             ; ami | zmq
host = 127.0.0.1
port = 5038
username = hintfed
secret = hunter2
tls = no
zmq_evt = tcp://127.0.0.1:33333
zmq_cmd = tcp://127.0.0.1:44444
request_timeout = 1000  ; ms, as in the original broker config

[federation]
transport = zmq         ; zmq | kafka
servers = tcp://hub-1:5560, tcp://hub-2:5560
shared_key = k-one      ; or shared_keys = k1, k2
include = ^(PJSIP|SIP)/\d+$
exclude = ^Custom:
device_template = Custom:{device}
origin_timeout = 15s
down_state = UNAVAILABLE

[server]                ; hintfed-server only
listen = tcp://0.0.0.0:5560

[http]
listen = 127.0.0.1:9480 ; see the operability issue
"#;

fn temp_ini(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".ini")
        .tempfile()
        .expect("tempfile");
    f.write_all(text.as_bytes()).expect("write");
    f
}

#[test]
fn original_broker_example_loads_unchanged() {
    assert!(
        !ORIGINAL.ends_with('\n'),
        "fixture copy must stay byte-exact"
    );
    let f = temp_ini(ORIGINAL);
    let cfg = ConfigFile::load(f.path(), &[]).expect("original example must load");
    assert_eq!(
        cfg.section_names().collect::<Vec<_>>(),
        ["general", "servers", "server-1", "server-2"]
    );
    let g = cfg.section("general");
    assert_eq!(g.bool("device_state"), Ok(Some(true)));
    assert_eq!(g.bool("presence"), Ok(Some(false)));
    assert_eq!(g.str("log_level"), Some("info"));
    assert_eq!(
        g.duration_ms("request_timeout"),
        Ok(Some(Duration::from_millis(1000)))
    );
    assert_eq!(g.bool("count_messages"), Ok(Some(false)));
    assert_eq!(g.bool("verbose_messages"), Ok(Some(false)));
    assert_eq!(
        cfg.section("servers").list("sections"),
        ["server-1", "server-2"]
    );
    let s1 = cfg.section("server-1");
    assert_eq!(s1.str("name"), Some("Console 1"));
    assert_eq!(s1.str("addr"), Some("192.168.56.101"));
    assert_eq!(s1.port("cmd_port"), Ok(Some(33333)));
    assert_eq!(s1.port("evt_port"), Ok(Some(44444)));
    assert_eq!(s1.bool("ami_trace"), Ok(Some(false)));
    let s2 = cfg.section("server-2");
    assert_eq!(s2.port("cmd_port"), Ok(Some(44444)));
    assert_eq!(
        s2.bool("ami_trace"),
        Ok(Some(false)),
        "last line without newline"
    );
    assert!(
        s1.unknown_keys(&["name", "addr", "cmd_port", "evt_port", "ami_trace"])
            .is_empty()
    );
    // The common keys this crate reads are valid in it too.
    let common = CommonConfig::from_file(&cfg).expect("common");
    assert_eq!(common.log_level.as_deref(), Some("info"));
    assert_eq!(common.http_listen, None);
}

#[test]
fn issue_agent_example_with_inline_comments() {
    let cfg = ConfigFile::parse("agent.ini", AGENT_INI, Vec::new(), &[]).expect("parse");
    let g = cfg.section("general");
    assert_eq!(g.str("name"), Some("pbx-a"));
    assert_eq!(g.str("log_level"), Some("info"));
    let a = cfg.section("asterisk");
    assert_eq!(
        a.one_of("source", &["ami", "zmq", "kafka"]),
        Ok(Some("ami"))
    );
    assert_eq!(a.port("port"), Ok(Some(5038)));
    assert_eq!(a.bool("tls"), Ok(Some(false)));
    assert_eq!(a.str("zmq_evt"), Some("tcp://127.0.0.1:33333"));
    assert_eq!(
        a.duration_ms("request_timeout"),
        Ok(Some(Duration::from_millis(1000)))
    );
    assert_eq!(
        a.secret("secret").map(|s| s.expose().to_owned()),
        Some("hunter2".into())
    );
    let f = cfg.section("federation");
    assert_eq!(f.list("servers"), ["tcp://hub-1:5560", "tcp://hub-2:5560"]);
    assert_eq!(f.str("shared_key"), Some("k-one"));
    assert_eq!(f.str("include"), Some(r"^(PJSIP|SIP)/\d+$"));
    assert_eq!(f.str("exclude"), Some("^Custom:"));
    assert_eq!(f.str("device_template"), Some("Custom:{device}"));
    assert_eq!(
        f.duration("origin_timeout"),
        Ok(Some(Duration::from_secs(15)))
    );
    assert_eq!(
        cfg.section("server").str("listen"),
        Some("tcp://0.0.0.0:5560")
    );
    let common = CommonConfig::from_file(&cfg).expect("common");
    assert_eq!(
        common.http_listen,
        Some("127.0.0.1:9480".parse().expect("addr"))
    );
}

#[test]
fn bad_values_give_one_line_errors() {
    let f = temp_ini(&AGENT_INI.replace("port = 5038", "port = abc"));
    let file = f.path().display().to_string();
    let cfg = ConfigFile::load(f.path(), &[]).expect("syntax is fine");
    let err = cfg.section("asterisk").port("port").expect_err("abc");
    assert_eq!(
        err.to_string(),
        format!("config error: {file}: [asterisk] port: \"abc\" is not a port number (1-65535)")
    );
    assert_eq!(
        err,
        ConfigError {
            file: file.clone(),
            section: Some("asterisk".into()),
            key: Some("port".into()),
            env_var: None,
            problem: "\"abc\" is not a port number (1-65535)".into(),
        }
    );

    let cfg = ConfigFile::parse(
        "a.ini",
        &AGENT_INI
            .replace("origin_timeout = 15s", "origin_timeout = soon")
            .replace("log_level = info ", "log_level = loud "),
        Vec::new(),
        &[],
    )
    .expect("parse");
    assert_eq!(
        cfg.section("federation")
            .duration("origin_timeout")
            .expect_err("soon")
            .to_string(),
        "config error: a.ini: [federation] origin_timeout: \"soon\" is not a duration (e.g. 15s, 500ms, 2m)"
    );
    assert_eq!(
        CommonConfig::from_file(&cfg).expect_err("loud").to_string(),
        "config error: a.ini: [general] log_level: \"loud\" is not a log level (trace, debug, info, warning, error, off)"
    );

    let threads = |v: &str| {
        let text = AGENT_INI.replace("[general]\n", &format!("[general]\nworker_threads = {v}\n"));
        let cfg = ConfigFile::parse("a.ini", &text, Vec::new(), &[]).expect("parse");
        CommonConfig::from_file(&cfg).map(|c| c.worker_threads)
    };
    assert_eq!(threads("1"), Ok(Some(1)));
    assert_eq!(threads("0"), Ok(Some(0)));
    assert_eq!(
        threads("-2").expect_err("negative").to_string(),
        "config error: a.ini: [general] worker_threads: \"-2\" is not a valid number"
    );
    assert_eq!(
        threads("1000").expect_err("too many").to_string(),
        "config error: a.ini: [general] worker_threads: must be at most 256"
    );

    let missing = ConfigFile::load(std::path::Path::new("/nonexistent/hintfed.ini"), &[])
        .expect_err("missing file");
    assert!(
        missing
            .to_string()
            .starts_with("config error: /nonexistent/hintfed.ini: cannot read: "),
        "{missing}"
    );
    assert!(!missing.to_string().contains('\n'));
}

#[test]
fn environment_overrides_the_file() {
    let env = vec![
        ("HINTFED_ASTERISK_SECRET".to_owned(), "from-env".to_owned()),
        (
            "HINTFED_ASTERISK_REQUEST_TIMEOUT".to_owned(),
            "2500".to_owned(),
        ),
        ("HINTFED_GENERAL_LOG_LEVEL".to_owned(), "debug".to_owned()),
        ("HINTFED_KAFKA_BROKERS".to_owned(), "k:9092".to_owned()),
        ("PATH".to_owned(), "/bin".to_owned()),
    ];
    let cfg = ConfigFile::parse("agent.ini", AGENT_INI, env, &["kafka"]).expect("parse");
    let a = cfg.section("asterisk");
    assert_eq!(
        a.secret("secret").map(|s| s.expose().to_owned()),
        Some("from-env".into())
    );
    assert_eq!(
        a.duration_ms("request_timeout"),
        Ok(Some(Duration::from_millis(2500)))
    );
    assert_eq!(cfg.get("general", "log_level"), Some("debug"));
    assert_eq!(
        cfg.get("kafka", "brokers"),
        Some("k:9092"),
        "env may create a named section"
    );
    assert!(cfg.ignored_env().is_empty());
    let masked = cfg.render_masked(|_, k| hintfed_daemon::config::is_secret_key(k));
    assert!(
        masked.contains("secret = ****  ; from HINTFED_ASTERISK_SECRET"),
        "{masked}"
    );
    assert!(
        !masked.contains("from-env") && !masked.contains("k-one"),
        "{masked}"
    );
}

#[derive(serde::Serialize)]
struct Asterisk {
    host: String,
    port: u16,
    secret: Secret,
    #[serde(serialize_with = "hintfed_daemon::config::ser::duration")]
    request_timeout: Duration,
}

#[derive(serde::Serialize)]
struct Typed {
    asterisk: Asterisk,
}

fn load_typed(file: &ConfigFile) -> Result<Typed, ConfigError> {
    let a = file.section("asterisk");
    Ok(Typed {
        asterisk: Asterisk {
            host: a.string("host").unwrap_or_else(|| "127.0.0.1".into()),
            port: a.port("port")?.unwrap_or(5038),
            secret: a
                .secret("secret")
                .ok_or_else(|| a.error("secret", "missing (required)"))?,
            request_timeout: a.duration_ms_or("request_timeout", Duration::from_secs(1))?,
        },
    })
}

const SPEC: DaemonSpec = DaemonSpec {
    name: "hintfed-test",
    version: "0.0.0",
    env_sections: &["general", "asterisk", "http"],
    worker_threads: 0,
};

#[test]
fn effective_config_masks_secrets_and_shows_defaults() {
    let cfg = ConfigFile::parse("agent.ini", AGENT_INI, Vec::new(), &[]).expect("parse");
    let common = CommonConfig::from_file(&cfg).expect("common");
    let typed = load_typed(&cfg).expect("typed");
    let text = run::effective_config(&SPEC, &cfg, &common, &typed).expect("render");
    assert!(
        text.contains(
            "[asterisk]\nhost = 127.0.0.1\nport = 5038\nsecret = ****\nrequest_timeout = 1s\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("[general]\nlog_level = info\nshutdown_grace = 5s\nworker_threads = 0\n"),
        "{text}"
    );
    assert!(text.contains("[http]\nlisten = 127.0.0.1:9480\n"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!format!("{cfg:?}").contains("hunter2"));
    let plain = render_ini(&typed).expect("render");
    assert!(plain.contains("secret = ****"));
}

fn args(path: PathBuf, check: bool) -> CommonArgs {
    CommonArgs {
        config: Some(path),
        check_config: check,
        ..CommonArgs::default()
    }
}

async fn never_runs(_: Typed, _: run::Context) -> anyhow::Result<()> {
    panic!("the daemon must not start on a bad or checked configuration");
}

#[tokio::test]
async fn run_exits_64_on_bad_config_and_0_on_check() {
    let bad = temp_ini(&AGENT_INI.replace("port = 5038", "port = 70000"));
    let code = run::run(
        SPEC,
        &args(bad.path().into(), false),
        None,
        load_typed,
        never_runs,
    )
    .await;
    assert_eq!(code, 64);
    let bad_common = temp_ini(&AGENT_INI.replace("listen = 127.0.0.1:9480", "listen = localhost"));
    let code = run::run(
        SPEC,
        &args(bad_common.path().into(), true),
        None,
        load_typed,
        never_runs,
    )
    .await;
    assert_eq!(code, 64);
    let no_file = run::run(SPEC, &CommonArgs::default(), None, load_typed, never_runs).await;
    assert_eq!(no_file, 64);
    let good = temp_ini(AGENT_INI);
    let code = run::run(
        SPEC,
        &args(good.path().into(), true),
        None,
        load_typed,
        never_runs,
    )
    .await;
    assert_eq!(code, 0);
    // The broker's positional FILE.
    let code = run::run(
        SPEC,
        &CommonArgs {
            check_config: true,
            ..CommonArgs::default()
        },
        Some(good.path()),
        load_typed,
        never_runs,
    )
    .await;
    assert_eq!(code, 0);
}

#[test]
fn worker_threads_chooses_the_runtime() {
    use tokio::runtime::{Handle, RuntimeFlavor};
    // No HTTP listener: nothing binds a fixed port.
    let no_http = AGENT_INI.replace("listen = 127.0.0.1:9480 ; see the operability issue\n", "");
    for (line, flavor, workers) in [
        ("worker_threads = 1", RuntimeFlavor::CurrentThread, 1),
        ("worker_threads = 2", RuntimeFlavor::MultiThread, 2),
    ] {
        let f = temp_ini(&no_http.replace("[general]\n", &format!("[general]\n{line}\n")));
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = run::main(
            SPEC,
            &args(f.path().into(), false),
            None,
            load_typed,
            move |_, _| async move {
                let h = Handle::current();
                tx.send((h.runtime_flavor(), h.metrics().num_workers()))?;
                Ok(())
            },
        );
        assert_eq!(rx.try_recv(), Ok((flavor, workers)), "{line}");
    }
}
