//! hintfed-server binary: CLI, configuration and life cycle through `hintfed-daemon`, the
//! hub itself from the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use hintfed_daemon::cli::{CommonArgs, after_help};
use hintfed_daemon::run::{self, DaemonSpec};
use hintfed_server::{Hooks, Server, config};

#[derive(Parser)]
#[command(
    name = "hintfed-server",
    version,
    about = "The hub of a hintfed federation: ingress, fan-out, snapshots and liveness over ZeroMQ",
    after_help = after_help("hintfed-server", &[
        ("hintfed-server --config /etc/hintfed/server.ini", "run the hub (ROUTER on [server] listen port P, PUB on P+1)"),
        ("HINTFED_SERVER_LISTEN=tcp://0.0.0.0:6000 hintfed-server -c server.ini", "override the listen endpoint from the environment"),
    ])
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let spec = DaemonSpec {
        name: "hintfed-server",
        version: env!("CARGO_PKG_VERSION"),
        env_sections: config::ENV_SECTIONS,
        worker_threads: 0,
    };
    run::main(
        spec,
        &cli.common,
        None,
        config::load,
        |cfg, mut ctx| async move {
            let hooks = Hooks {
                metrics: ctx.metrics.clone(),
                readiness: ctx.readiness.clone(),
                events: ctx.events.clone(),
                status: ctx.status.clone(),
            };
            let server = Server::bind(cfg, hooks).await?;
            let handle = server.handle();
            let shutdown = ctx.shutdown.clone();
            tokio::spawn(async move {
                while ctx.reload.recv().await.is_some() {
                    match ctx.reload_config().and_then(|f| config::load(&f)) {
                        Ok(new) => {
                            if !handle.set_keys(new.key_ring()).await {
                                break;
                            }
                            tracing::info!(
                                "reload: shared keys applied; other [server] keys need a restart"
                            );
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reload failed; configuration unchanged")
                        }
                    }
                }
            });
            server.run(shutdown).await?;
            Ok(())
        },
    )
}
