//! `hintfed-sim`: parse the command line, start one simulator per `--listen`, print where each
//! listens, run until SIGINT/SIGTERM.
#![forbid(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use hintfed_sim::SimServer;
use hintfed_sim::cli::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let configs = match args.into_configs() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hintfed-sim: invalid configuration: {e}");
            std::process::exit(64);
        }
    };
    let mut handles = Vec::new();
    for cfg in configs {
        let name = cfg.name.clone().unwrap_or_else(|| "-".to_owned());
        let handle = SimServer::spawn(cfg)
            .await
            .with_context(|| format!("starting simulator {name}"))?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening name={name} addr={}", handle.local_addr())?;
        out.flush()?;
        handles.push(handle);
    }
    wait_for_signal().await?;
    tracing::info!("signal received: shutting down");
    for h in handles {
        h.shutdown().await;
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
