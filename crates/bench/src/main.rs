//! `hintfed-bench`: a load tool that stands up a hintfed federation on one machine from the
//! real binaries (`hintfed-sim`, `hintfed-server`, `hintfed-agent`, taken from the folder of
//! this executable), drives phone activity, and prints figures as a table and as JSON next to
//! ceilings measured in the same run.
//!
//! Modules: `hubbench` (the hub alone: a signing publisher and N subscribers around one
//! `hintfed-server`), `snapshot` (a new agent's time to hold a full hub table) and `memory`
//! (the hub's RSS with many keys and agent-equivalent peers), both built on `fill`
//! (in-process origins and snapshot clients), `run` (topology, load, drain, convergence, report) uses `procs` (child daemons,
//! ports, /proc CPU and RSS), `ami` (a raw pipelined AMI connection), `ceiling` (raw ZeroMQ
//! PUB/SUB between two processes, pipelined Setvar/s of an Asterisk) and `analyze` (latency
//! from the simulator's `--trace` file).
#![forbid(unsafe_code)]

mod ami;
mod analyze;
mod ceiling;
mod fill;
mod hubbench;
mod hubproc;
mod memory;
mod procs;
mod run;
mod snapshot;

use clap::Parser as _;

/// hintfed-bench: measure a hintfed federation against ceilings measured in the same run.
///
/// Build everything in one profile first:
///   cargo build --release -p hintfed-sim -p hintfed-server -p hintfed-agent -p hintfed-bench
/// then e.g.:
///   target/release/hintfed-bench run --servers 10 --rate 1000 --duration 10
///   target/release/hintfed-bench setvar-ceiling --asterisk 10.0.0.5:5038 --ami-secret ...
#[derive(clap::Parser)]
#[command(name = "hintfed-bench", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Stand up a topology, drive load, print the figures (table on stdout, JSON last).
    Run(run::RunArgs),
    /// The hub alone: one hintfed-server, a publisher process and a subscribers process, next to
    /// the raw ZeroMQ PUB/SUB ceiling with the same fan-out and message size.
    Hub(hubbench::HubArgs),
    /// A new agent's time to hold every key of a full hub (and to write them to its Asterisk).
    Snapshot(snapshot::SnapshotArgs),
    /// The hub's RSS with many keys and many agent-equivalent peers.
    Memory(memory::MemoryArgs),
    /// Only the pipelined Setvar/s ceiling of one Asterisk (simulator or real).
    SetvarCeiling {
        /// host:port of the AMI.
        #[arg(long)]
        asterisk: String,
        /// AMI user.
        #[arg(long, default_value = "admin")]
        ami_user: String,
        /// AMI secret.
        #[arg(
            long,
            env = "HINTFED_BENCH_SECRET",
            default_value = "adminsecret",
            hide_env_values = true
        )]
        ami_secret: String,
        /// Setvar to send.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Unanswered actions allowed.
        #[arg(long, default_value_t = 512)]
        window: u64,
        /// Log in with events on (each write then comes back as an event).
        #[arg(long)]
        events: bool,
        /// Log in with events on and add the filters an agent adds (each write's event is
        /// then dropped by them): the session an agent writes over.
        #[arg(long, conflicts_with = "events")]
        agent_filters: bool,
    },
    /// Only the raw ZeroMQ PUB/SUB ceiling between two processes.
    ZmqCeiling {
        /// Messages.
        #[arg(long, default_value_t = 500_000)]
        count: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 200)]
        size: usize,
    },
    /// (helper) The subscribers process of `hub`: raw SUB connections counting messages.
    #[command(hide = true)]
    HubSub {
        /// PUB endpoint to connect to.
        #[arg(long)]
        endpoint: String,
        /// Connections.
        #[arg(long)]
        subs: usize,
        /// Count messages whose first frame starts with this.
        #[arg(long)]
        prefix: String,
        /// Stop once every connection counted this many.
        #[arg(long)]
        expect: u64,
    },
    /// (helper) The publisher process of `hub`: pre-signed updates over a raw DEALER.
    #[command(hide = true)]
    HubPub {
        /// The hub's ROUTER endpoint.
        #[arg(long)]
        endpoint: String,
        /// Updates.
        #[arg(long)]
        updates: u64,
        /// Distinct device keys.
        #[arg(long)]
        keys: usize,
    },
    /// (helper) The publisher process of the ZeroMQ ceiling.
    #[command(hide = true)]
    ZmqPub {
        /// Endpoint to bind.
        #[arg(long)]
        endpoint: String,
        /// Messages.
        #[arg(long)]
        count: u64,
        /// Payload bytes.
        #[arg(long)]
        size: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cmd = Cli::parse().cmd;
    let runtime = match cmd {
        // The load tool shares the cores with what it measures: its load, hub tap and probes
        // run on one thread (no wake-ups across threads; its ceilings get a runtime of their
        // own, see `run`).
        Cmd::Run(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Runtime::new()?,
    };
    runtime.block_on(dispatch(cmd))
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(args) => {
            let json_path = args.json.clone();
            let report = run::run(args).await?;
            let text = serde_json::to_string_pretty(&report)?;
            println!("{text}");
            if let Some(p) = json_path {
                std::fs::write(&p, text + "\n")?;
            }
        }
        Cmd::Snapshot(args) => {
            let json_path = args.json.clone();
            let report = snapshot::run(args).await?;
            emit(&report, json_path.as_deref())?;
        }
        Cmd::Memory(args) => {
            let json_path = args.json.clone();
            let report = memory::run(args).await?;
            emit(&report, json_path.as_deref())?;
        }
        Cmd::Hub(args) => {
            let report = hubbench::run(args).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::HubSub {
            endpoint,
            subs,
            prefix,
            expect,
        } => {
            hubproc::sub_main(
                &endpoint,
                subs,
                &prefix,
                expect,
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(120),
            )
            .await?;
        }
        Cmd::HubPub {
            endpoint,
            updates,
            keys,
        } => hubproc::pub_main(&endpoint, updates, keys, hubbench::KEY).await?,
        Cmd::SetvarCeiling {
            asterisk,
            ami_user,
            ami_secret,
            count,
            window,
            events,
            agent_filters,
        } => {
            let session = match (events, agent_filters) {
                (_, true) => ceiling::Session::AgentFilters,
                (true, false) => ceiling::Session::EventsOn,
                (false, false) => ceiling::Session::EventsOff,
            };
            let c = ceiling::setvar(
                &asterisk,
                &ami_user,
                &ami_secret,
                count,
                window,
                1000,
                session,
                0,
            )
            .await?;
            println!(
                "{}",
                serde_json::json!({"setvar_per_sec": c.per_sec, "sent": c.sent, "accepted": c.accepted, "window": c.window})
            );
        }
        Cmd::ZmqCeiling { count, size } => {
            let c = ceiling::zmq_pubsub(count, size).await?;
            println!(
                "{}",
                serde_json::json!({"msgs_per_sec": c.msgs_per_sec, "sent": c.sent, "received": c.received, "size": c.size})
            );
        }
        Cmd::ZmqPub {
            endpoint,
            count,
            size,
        } => ceiling::zmq_pub(&endpoint, count, size).await?,
    }
    Ok(())
}

/// Prints the JSON report and writes it to `path` when given.
fn emit(report: &serde_json::Value, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    println!("{text}");
    if let Some(p) = path {
        std::fs::write(p, text + "\n")?;
    }
    Ok(())
}
