//! hintfed-broker binary: parse the command line and hand over to `hintfed_daemon::run`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use hintfed_broker::config::{BrokerConfig, ENV_SECTIONS};
use hintfed_daemon::cli::{CommonArgs, after_help};
use hintfed_daemon::run::{self, DaemonSpec};

const ABOUT: &str = "The central broker: connects to every Asterisk (AMI over TCP, or the \
res_zmq_manager module's sockets) and cross-applies device states (as Custom:<device>) and \
presence (as CustomPresence:<name>) between them. A drop-in for zmq-ami-broker's broker.py: \
reads its configuration file unchanged.";

#[derive(Debug, Parser)]
#[command(
    name = "hintfed-broker",
    version,
    about = ABOUT,
    after_help = after_help("hintfed-broker", &[
        ("hintfed-broker /etc/hintfed/broker.ini", "run with the original broker's file (positional, as broker.py took it)"),
        ("hintfed-broker --config broker.ini --check-config", "validate the file (also the original example_config.ini) and print what is in force"),
        ("HINTFED_SERVER_1_SECRET=... hintfed-broker -c broker.ini -v", "take [server-1] secret from the environment, debug logs"),
    ]),
)]
struct Cli {
    /// Configuration file (the original zmq-ami-broker format); same as --config.
    #[arg(value_name = "FILE", conflicts_with = "config")]
    file: Option<PathBuf>,

    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let spec = DaemonSpec {
        name: "hintfed-broker",
        version: env!("CARGO_PKG_VERSION"),
        env_sections: ENV_SECTIONS,
        worker_threads: 0,
    };
    run::main(
        spec,
        &cli.common,
        cli.file.as_deref(),
        BrokerConfig::from_file,
        hintfed_broker::broker::run,
    )
}
