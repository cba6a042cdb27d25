//! hintfed-agent binary: parse the command line and hand over to `hintfed_daemon::run`.
#![forbid(unsafe_code)]

use clap::Parser;
use hintfed_agent::config::{AgentConfig, SECTIONS};
use hintfed_daemon::cli::{CommonArgs, after_help};
use hintfed_daemon::run::{self, DaemonSpec};

const ABOUT: &str = "Relays device and presence state between one Asterisk and the hintfed \
federation hubs (hintfed-server) or a Kafka cluster ([federation] transport = kafka). Reads \
events over AMI, res_zmq_manager or app_ami_kafka's topic ([asterisk] source = kafka), \
publishes them, and applies every other server's states as Custom: devices and \
CustomPresence: presence.";

#[derive(Debug, Parser)]
#[command(
    name = "hintfed-agent",
    version,
    about = ABOUT,
    after_help = after_help("hintfed-agent", &[
        ("hintfed-agent --config /etc/hintfed/agent.ini", "run beside the local Asterisk"),
        ("hintfed-agent --config agent.ini --log-format json -v", "JSON logs at debug level"),
        ("HINTFED_FEDERATION_SHARED_KEY=... hintfed-agent -c agent.ini", "take the shared key from the environment"),
    ]),
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let spec = DaemonSpec {
        name: "hintfed-agent",
        version: env!("CARGO_PKG_VERSION"),
        env_sections: SECTIONS,
        // One Asterisk, one relay loop: one thread, no hand-over between threads per event.
        worker_threads: 1,
    };
    run::main(
        spec,
        &cli.common,
        None,
        AgentConfig::from_file,
        hintfed_agent::agent::run,
    )
}
