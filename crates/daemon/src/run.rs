//! The life cycle of a daemon binary, so each `main.rs` stays thin: parse args (the binary)
//! → [`main`]: build the tokio runtime → [`run`]: load the config (one line and exit 64 on
//! error) → `--check-config` prints the effective config and exits 0 → init logging → install
//! signals → start HTTP if `[http] listen` is set → run the daemon future with a [`Context`] →
//! on SIGINT/SIGTERM mark not ready, wait for the daemon to drain for at most
//! `[general] shutdown_grace` → stop HTTP → exit status.
//!
//! ```no_run
//! use hintfed_daemon::{cli::CommonArgs, config::{ConfigError, ConfigFile}, run};
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! #[command(name = "hintfed-agent", version)]
//! struct Cli { #[command(flatten)] common: CommonArgs }
//!
//! #[derive(serde::Serialize)]
//! struct AgentConfig { /* typed sections */ }
//!
//! fn load(file: &ConfigFile) -> Result<AgentConfig, ConfigError> { Ok(AgentConfig {}) }
//!
//! fn main() -> std::process::ExitCode {
//!     let cli = Cli::parse();
//!     let spec = run::DaemonSpec {
//!         name: "hintfed-agent",
//!         version: env!("CARGO_PKG_VERSION"),
//!         env_sections: &["general", "asterisk", "federation", "http"],
//!         worker_threads: 1,
//!     };
//!     // The runtime, then `run::run` on it (embedders with their own runtime call `run`).
//!     run::main(spec, &cli.common, None, load, |cfg, ctx| async move {
//!         ctx.readiness.set("asterisk", Err("connecting".into()));
//!         ctx.shutdown.cancelled().await; // the real work goes here
//!         Ok(())
//!     })
//! }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cli::CommonArgs;
use crate::config::{self, ConfigError, ConfigFile, EXIT_CONFIG};
use crate::http::{
    HttpContext, HttpLimits, HttpServer, InfoView, Readiness, StatusEvents, StatusSlot,
};
use crate::logging::{self, LogHandle};
use crate::metrics::Metrics;
use crate::signals::{self, ReloadReceiver, Signals};

/// Exit status of a run that failed at run time (not a configuration problem).
pub const EXIT_FAILURE: u8 = 1;

/// Keys of `[general]` read by this crate (add them to the daemon's known keys).
pub const GENERAL_KEYS: &[&str] = &["log_level", "shutdown_grace", "worker_threads"];
/// Keys of `[http]` read by this crate.
pub const HTTP_KEYS: &[&str] = &[
    "listen",
    "max_connections",
    "max_event_clients",
    "head_timeout",
];
/// Largest `[general] worker_threads`.
pub const MAX_WORKER_THREADS: usize = 256;
/// Default `[general] shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Who is running.
#[derive(Debug, Clone, Copy)]
pub struct DaemonSpec {
    /// Binary name, e.g. `hintfed-agent`.
    pub name: &'static str,
    /// Version, usually `env!("CARGO_PKG_VERSION")`.
    pub version: &'static str,
    /// Sections an environment variable may create (see [`ConfigFile::load`]).
    pub env_sections: &'static [&'static str],
    /// Default `[general] worker_threads`: runtime threads doing the daemon's work (`1`: one
    /// thread runs every task, no hand-over between threads; `0`: one per CPU).
    pub worker_threads: usize,
}

/// The settings this crate reads: `[general] log_level`, `shutdown_grace`, `worker_threads`,
/// `[http] listen`, `max_connections`, `max_event_clients`, `head_timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommonConfig {
    /// `[general] log_level` as written (validated).
    pub log_level: Option<String>,
    /// `[general] shutdown_grace` (default 5s).
    #[serde(serialize_with = "config::ser::duration")]
    pub shutdown_grace: Duration,
    /// `[general] worker_threads` as written (`None`: the daemon's default; `0`: one per CPU).
    /// Read when the runtime starts: a reload does not change it.
    pub worker_threads: Option<usize>,
    /// `[http] listen`; `None` = no HTTP listener.
    pub http_listen: Option<SocketAddr>,
    /// `[http] max_connections`, `max_event_clients`, `head_timeout`.
    #[serde(skip)]
    pub http_limits: HttpLimits,
}

impl CommonConfig {
    /// Read and validate the common keys.
    pub fn from_file(file: &ConfigFile) -> Result<Self, ConfigError> {
        let general = file.section("general");
        let log_level = general.string("log_level");
        if let Some(l) = &log_level {
            logging::parse_level(l).map_err(|e| general.error("log_level", e.to_string()))?;
        }
        let shutdown_grace = general.duration_or("shutdown_grace", DEFAULT_SHUTDOWN_GRACE)?;
        let worker_threads = match general.number::<usize>("worker_threads")? {
            Some(n) if n > MAX_WORKER_THREADS => {
                return Err(general.error(
                    "worker_threads",
                    format!("must be at most {MAX_WORKER_THREADS}"),
                ));
            }
            n => n,
        };
        let http = file.section("http");
        let defaults = HttpLimits::default();
        let positive = |key: &str, default: usize| -> Result<usize, ConfigError> {
            match http.number::<usize>(key)? {
                None => Ok(default),
                Some(0) => Err(http.error(key, "must be at least 1")),
                Some(n) => Ok(n),
            }
        };
        Ok(Self {
            log_level,
            shutdown_grace,
            worker_threads,
            http_listen: http.socket_addr("listen")?,
            http_limits: HttpLimits {
                max_connections: positive("max_connections", defaults.max_connections)?,
                max_event_clients: positive("max_event_clients", defaults.max_event_clients)?,
                head_timeout: match http.duration_or("head_timeout", defaults.head_timeout)? {
                    d if d.is_zero() => {
                        return Err(http.error("head_timeout", "must be greater than 0"));
                    }
                    d => d,
                },
                ..defaults
            },
        })
    }
}

/// Everything the daemon future gets.
#[derive(Debug)]
pub struct Context {
    /// Who is running.
    pub spec: DaemonSpec,
    /// The configuration file path.
    pub config_path: PathBuf,
    /// The common settings as loaded at start (or last reload).
    pub common: CommonConfig,
    /// Cancelled on SIGINT/SIGTERM: stop taking work, drain, return.
    pub shutdown: CancellationToken,
    /// SIGHUP notifications.
    pub reload: ReloadReceiver,
    /// Log level control (`None` when a subscriber was already installed, e.g. in tests).
    pub log: Option<LogHandle>,
    /// Metrics to increment.
    pub metrics: Arc<Metrics>,
    /// Readiness conditions for `/readyz`.
    pub readiness: Readiness,
    /// Live events for `/events` and the status page.
    pub events: StatusEvents,
    /// Install the daemon's [`crate::http::StatusSource`] here.
    pub status: StatusSlot,
    /// Where the HTTP server listens, if it does (the real port when `listen` used port 0).
    pub http_addr: Option<SocketAddr>,
}

impl Context {
    /// On SIGHUP: read the file again (with the environment), apply the new `log_level`
    /// (logging what changed) and return the file for the daemon to apply its own reloadable
    /// keys. On error nothing changes; log it and keep running.
    pub fn reload_config(&mut self) -> Result<ConfigFile, ConfigError> {
        let file = ConfigFile::load(&self.config_path, self.spec.env_sections)?;
        let common = CommonConfig::from_file(&file)?;
        if common.log_level != self.common.log_level
            && let Some(log) = &self.log
        {
            match log.set_level(common.log_level.as_deref()) {
                Ok(effective) => tracing::info!(
                    from = ?self.common.log_level,
                    to = ?common.log_level,
                    %effective,
                    "reload: log level changed"
                ),
                Err(e) => tracing::warn!(error = %e, "reload: log level not changed"),
            }
        }
        if common.http_listen != self.common.http_listen {
            tracing::warn!("reload: [http] listen changed; it takes effect after a restart");
        }
        self.common = CommonConfig {
            http_listen: self.common.http_listen,
            http_limits: self.common.http_limits,
            ..common
        };
        Ok(file)
    }
}

/// The effective configuration text for `--check-config`: the daemon's typed config with
/// the common keys merged into its `[general]` and `[http]` sections, secrets masked.
pub fn effective_config<C: Serialize>(
    spec: &DaemonSpec,
    file: &ConfigFile,
    common: &CommonConfig,
    typed: &C,
) -> Result<String, serde_json::Error> {
    use serde_json::{Map, Value};
    let mut v = serde_json::to_value(typed)?;
    if !v.is_object() {
        v = Value::Object(Map::from_iter([("config".to_owned(), v)]));
    }
    if let Value::Object(top) = &mut v {
        let general = top
            .entry("general")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(g) = general {
            g.entry("log_level")
                .or_insert_with(|| common.log_level.clone().map_or(Value::Null, Value::String));
            g.entry("shutdown_grace").or_insert_with(|| {
                Value::String(humantime::format_duration(common.shutdown_grace).to_string())
            });
            g.entry("worker_threads")
                .or_insert_with(|| common.worker_threads.unwrap_or(spec.worker_threads).into());
        }
        if let Some(listen) = common.http_listen {
            let http = top
                .entry("http")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(h) = http {
                h.entry("listen")
                    .or_insert_with(|| Value::String(listen.to_string()));
                h.entry("max_connections")
                    .or_insert_with(|| common.http_limits.max_connections.into());
                h.entry("max_event_clients")
                    .or_insert_with(|| common.http_limits.max_event_clients.into());
                h.entry("head_timeout").or_insert_with(|| {
                    Value::String(
                        humantime::format_duration(common.http_limits.head_timeout).to_string(),
                    )
                });
            }
        }
    }
    let mut out = format!(
        "; effective configuration of {} {} (secrets masked)\n; file: {}\n",
        spec.name,
        spec.version,
        file.file_name()
    );
    for s in file.section_names() {
        for e in file.section(s).entries() {
            if let config::ValueSource::Env { var } = &e.source {
                out.push_str(&format!("; [{s}] {} from {var}\n", e.key));
            }
        }
    }
    out.push('\n');
    out.push_str(&config::render_ini(&v)?);
    Ok(out)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The whole `main` of a daemon binary after it parsed its command line: build the
/// multi-threaded tokio runtime and [`run`] the daemon on it. A runtime that cannot start is
/// one line on stderr and [`EXIT_FAILURE`].
///
/// ```no_run
/// # use hintfed_daemon::{cli::CommonArgs, config::{ConfigError, ConfigFile}, run};
/// # fn load(_: &ConfigFile) -> Result<(), ConfigError> { Ok(()) }
/// # let common = CommonArgs::default();
/// # let spec = run::DaemonSpec { name: "hintfed-x", version: "0", env_sections: &[], worker_threads: 0 };
/// let status = run::main(spec, &common, None, load, |_cfg, ctx| async move {
///     ctx.shutdown.cancelled().await;
///     Ok(())
/// });
/// ```
pub fn main<C, L, D, Fut>(
    spec: DaemonSpec,
    args: &CommonArgs,
    fallback_config: Option<&Path>,
    load: L,
    daemon: D,
) -> ExitCode
where
    C: Serialize,
    L: FnOnce(&ConfigFile) -> Result<C, ConfigError>,
    D: FnOnce(C, Context) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    // The thread count is needed before the runtime exists: read it from the file here;
    // `run` loads the file again and reports any problem in it.
    let threads = args
        .config_path(fallback_config)
        .and_then(|path| ConfigFile::load(path, spec.env_sections).ok())
        .and_then(|file| CommonConfig::from_file(&file).ok())
        .and_then(|c| c.worker_threads)
        .unwrap_or(spec.worker_threads);
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    let built = builder.enable_all().build();
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", spec.name);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    ExitCode::from(rt.block_on(run(spec, args, fallback_config, load, daemon)))
}

/// Run a daemon (see the module docs). `fallback_config` is a positional config path for
/// binaries that accept one (the broker). `load` builds the daemon's typed config (it should
/// also check unknown keys with `Section::reject_unknown_keys` or `warn_unknown_keys`, with
/// [`GENERAL_KEYS`] and [`HTTP_KEYS`] among the known ones; warnings recorded on the file are
/// logged once logging is up); `daemon` is the work, which must return soon after `ctx.shutdown` is cancelled.
/// Returns the exit status: 0, 64 (configuration) or 1 (run-time failure).
pub async fn run<C, L, D, Fut>(
    spec: DaemonSpec,
    args: &CommonArgs,
    fallback_config: Option<&Path>,
    load: L,
    daemon: D,
) -> u8
where
    C: Serialize,
    L: FnOnce(&ConfigFile) -> Result<C, ConfigError>,
    D: FnOnce(C, Context) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let Some(path) = args.config_path(fallback_config) else {
        eprintln!(
            "{}: no configuration file given (use --config FILE)",
            spec.name
        );
        return EXIT_CONFIG;
    };
    let loaded = ConfigFile::load(path, spec.env_sections).and_then(|file| {
        let common = CommonConfig::from_file(&file)?;
        let typed = load(&file)?;
        Ok((file, common, typed))
    });
    let (file, common, typed) = match loaded {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    let warnings = file.warnings();
    if args.check_config {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        return match effective_config(&spec, &file, &common, &typed) {
            Ok(text) => {
                print!("{text}");
                eprintln!("{}: configuration OK", file.file_name());
                0
            }
            Err(e) => {
                eprintln!("{}: cannot print the configuration: {e}", spec.name);
                EXIT_FAILURE
            }
        };
    }

    let log = match logging::init(
        args.log_format,
        common.log_level.as_deref(),
        args.verbose,
        args.quiet,
    ) {
        Ok(h) => Some(h),
        Err(logging::LogError::AlreadyInstalled) => None,
        Err(e) => {
            eprintln!("{}: {e}", spec.name);
            return EXIT_CONFIG;
        }
    };
    for w in &warnings {
        tracing::warn!(problem = %w, "configuration warning");
    }
    for var in file.ignored_env() {
        tracing::warn!(%var, "environment variable matches no configuration section; ignored");
    }

    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return EXIT_FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::new(spec.name, spec.version));
    let readiness = Readiness::new();
    let events = StatusEvents::default();
    let status = StatusSlot::default();
    let http_stop = CancellationToken::new();

    let mut http_task = None;
    let mut http_addr = None;
    if let Some(listen) = common.http_listen {
        let ctx = HttpContext {
            info: InfoView {
                daemon: spec.name.to_owned(),
                version: spec.version.to_owned(),
                started_ms: now_ms(),
            },
            metrics: metrics.clone(),
            status: status.clone(),
            readiness: readiness.clone(),
            events: events.clone(),
            limits: common.http_limits,
            shutdown: http_stop.clone(),
        };
        match HttpServer::bind(listen, ctx).await {
            Ok(server) => {
                http_addr = server.local_addr().ok();
                tracing::info!(listen = ?http_addr, "HTTP status listener up");
                http_task = Some(tokio::spawn(server.run()));
            }
            Err(e) => {
                tracing::error!(%listen, error = %e, "cannot bind [http] listen");
                return EXIT_FAILURE;
            }
        }
    }

    let grace = common.shutdown_grace;
    let ctx = Context {
        spec,
        config_path: path.to_owned(),
        common,
        shutdown: signals.shutdown.clone(),
        reload: signals.reload_receiver(),
        log,
        metrics,
        readiness: readiness.clone(),
        events,
        status,
        http_addr,
    };
    tracing::info!(daemon = spec.name, version = spec.version, config = %path.display(), "started");
    let mut work = tokio::spawn(daemon(typed, ctx));
    let result = tokio::select! {
        r = &mut work => Some(r),
        () = signals.shutdown.cancelled() => None,
    };
    let result = match result {
        Some(r) => r,
        None => {
            readiness.set("shutdown", Err("shutting down".into()));
            tracing::info!(grace = %humantime::format_duration(grace), "draining");
            match signals::drain(grace, &mut work).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "drain incomplete; stopping anyway");
                    work.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    // Stop the HTTP server last, so /readyz said "shutting down" during the drain.
    http_stop.cancel();
    if let Some(t) = http_task
        && let Ok(Ok(Err(e))) = signals::drain(Duration::from_secs(2), t).await
    {
        tracing::warn!(error = %e, "HTTP server stopped with an error");
    }
    match result {
        Ok(Ok(())) => {
            tracing::info!("stopped");
            0
        }
        Ok(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "failed");
            EXIT_FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "daemon task panicked or was cancelled");
            EXIT_FAILURE
        }
    }
}
