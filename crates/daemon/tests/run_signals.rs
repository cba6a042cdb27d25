//! The whole life cycle through `run::run` with real signals sent to this test process with
//! `kill`: HTTP comes up, SIGHUP reloads the log level and hands the daemon the new file,
//! SIGTERM makes /readyz report the drain, the daemon drains and `run` returns 0.
//! One test only in this file: signals reach the whole process.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use hintfed_daemon::cli::CommonArgs;
use hintfed_daemon::config::{ConfigError, ConfigFile};
use hintfed_daemon::run::{self, DaemonSpec};
use hintfed_testkit::http;
use hintfed_testkit::process::signal_self;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(serde::Serialize)]
struct Cfg {}

fn load(_: &ConfigFile) -> Result<Cfg, ConfigError> {
    Ok(Cfg {})
}

/// (status, body) of `GET path`.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http::get(addr, path).await.expect("HTTP reply");
    (r.status, r.body)
}

#[derive(Debug)]
enum Note {
    Up(Option<SocketAddr>),
    Reloaded(Option<String>, String),
    Draining,
}

async fn next(notes: &mut mpsc::UnboundedReceiver<Note>) -> Note {
    tokio::time::timeout(DEADLINE, notes.recv())
        .await
        .expect("note within deadline")
        .expect("daemon alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_with_real_signals() {
    let mut file = tempfile::Builder::new()
        .suffix(".ini")
        .tempfile()
        .expect("tempfile");
    write!(
        file,
        "[general]\nlog_level = info\nshutdown_grace = 5s\n[http]\nlisten = 127.0.0.1:0 ; any port\n"
    )
    .expect("write");
    let path = file.path().to_owned();
    let args = CommonArgs {
        config: Some(path.clone()),
        ..CommonArgs::default()
    };
    let spec = DaemonSpec {
        name: "hintfed-test",
        version: "0.0.0",
        env_sections: &["general", "http"],
        worker_threads: 0,
    };
    let (tx, mut notes) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        run::run(spec, &args, None, load, move |_cfg, mut ctx| async move {
            ctx.readiness.set("asterisk", Ok(()));
            let _ = tx.send(Note::Up(ctx.http_addr));
            loop {
                tokio::select! {
                    () = ctx.shutdown.cancelled() => break,
                    Some(_) = ctx.reload.recv() => {
                        let file = ctx.reload_config()?;
                        let level = file.get("general", "log_level").map(str::to_owned);
                        let effective = ctx.log.as_ref().map(|l| l.current()).unwrap_or_default();
                        let _ = tx.send(Note::Reloaded(level, effective));
                    }
                }
            }
            let _ = tx.send(Note::Draining);
            // Drain: in-flight work finishes when the test says so.
            let _ = release_rx.await;
            Ok(())
        })
        .await
    });

    let Note::Up(Some(addr)) = next(&mut notes).await else {
        panic!("expected the HTTP address");
    };
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(get(addr, "/healthz").await.0, 200);

    std::fs::write(
        &path,
        "[general]\nlog_level = debug\nshutdown_grace = 5s\n[http]\nlisten = 127.0.0.1:0\n",
    )
    .expect("rewrite config");
    signal_self("HUP");
    match next(&mut notes).await {
        Note::Reloaded(level, effective) => {
            assert_eq!(level.as_deref(), Some("debug"));
            // RUST_LOG, when the test runner sets it, pins the filter by design.
            if std::env::var_os("RUST_LOG").is_none() {
                assert_eq!(effective, "debug");
            }
        }
        other => panic!("expected a reload, got {other:?}"),
    }

    signal_self("TERM");
    assert!(matches!(next(&mut notes).await, Note::Draining));
    // During the drain the HTTP server still answers, and /readyz says why it is not ready.
    let drained = tokio::time::timeout(DEADLINE, async {
        loop {
            let r = get(addr, "/readyz").await;
            if r.0 == 503 {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("/readyz turns 503 during the drain");
    assert_eq!(drained, (503, "shutdown: shutting down\n".to_owned()));
    let _ = release_tx.send(());
    let code = tokio::time::timeout(DEADLINE, runner)
        .await
        .expect("run returns within the deadline")
        .expect("join");
    assert_eq!(code, 0);
    // The HTTP server is gone with the process's daemon.
    assert!(TcpStream::connect(addr).await.is_err());
}
