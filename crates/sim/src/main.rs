//! `hintfed-sim`: parse the command line, start one simulator per `--listen`, print where each
//! listens, run until SIGINT/SIGTERM.
#![forbid(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use hintfed_sim::SimServer;
use hintfed_sim::cli::Args;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = match args.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("starting the runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Some(path) = &args.trace {
        hintfed_sim::trace::install(path).with_context(|| format!("--trace {}", path.display()))?;
    }
    let kafka = args.kafka.clone();
    let configs = match args.into_configs() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hintfed-sim: invalid configuration: {e}");
            std::process::exit(64);
        }
    };
    // Handlers first: a signal right after the "listening" lines must not kill us uncleanly.
    let signals = Signals::install()?;
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
    // The app_ami_kafka mode (--kafka-brokers): every server's events to a topic too.
    let publishers = kafka
        .start(&handles)
        .await
        .context("starting the app_ami_kafka publishers")?;
    signals.wait().await?;
    drop(publishers);
    tracing::info!("signal received: shutting down");
    for h in handles {
        h.shutdown().await;
    }
    Ok(())
}

/// SIGINT/SIGTERM, installed up front.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok(())
    }
}
