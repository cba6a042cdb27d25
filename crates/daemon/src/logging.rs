//! tracing-subscriber set-up: text or JSON lines on stderr, the level from the configuration's
//! `log_level` (the broker's `debug, info, warning, error`, plus `trace`, `warn`, `off`),
//! shifted by `-v`/`-q`, and `RUST_LOG` (full filter syntax) over everything. The filter sits
//! in a `tracing_subscriber::reload` layer so SIGHUP can change the level: [`LogHandle`].

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::cli::LogFormat;

/// Logging set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A `log_level` value that is not a level.
    #[error("{0:?} is not a log level (trace, debug, info, warning, error, off)")]
    BadLevel(String),
    /// `RUST_LOG` could not be parsed.
    #[error("RUST_LOG: {0}")]
    BadRustLog(String),
    /// A global subscriber was already installed (e.g. by a test).
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    /// The reload handle is gone (the subscriber was dropped).
    #[error("log filter reload failed: {0}")]
    Reload(String),
}

/// Parse a `log_level` value: `trace`, `debug`, `info`, `warning`/`warn`, `error`, `off`
/// (any case; also `critical` → error, as Python's logging has it).
pub fn parse_level(s: &str) -> Result<LevelFilter, LogError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "trace" => Ok(LevelFilter::TRACE),
        "debug" => Ok(LevelFilter::DEBUG),
        "info" => Ok(LevelFilter::INFO),
        "warning" | "warn" => Ok(LevelFilter::WARN),
        "error" | "critical" => Ok(LevelFilter::ERROR),
        "off" | "none" => Ok(LevelFilter::OFF),
        _ => Err(LogError::BadLevel(s.to_owned())),
    }
}

/// `base` made more verbose by `verbose` steps and quieter by `quiet` steps.
pub fn adjust_level(base: LevelFilter, verbose: u8, quiet: u8) -> LevelFilter {
    const ORDER: [LevelFilter; 6] = [
        LevelFilter::OFF,
        LevelFilter::ERROR,
        LevelFilter::WARN,
        LevelFilter::INFO,
        LevelFilter::DEBUG,
        LevelFilter::TRACE,
    ];
    let idx = ORDER.iter().position(|l| *l == base).unwrap_or(3) as i32;
    let idx = (idx + i32::from(verbose) - i32::from(quiet)).clamp(0, 5) as usize;
    ORDER[idx]
}

/// Handle on the installed subscriber, to change the level at run time.
#[derive(Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    verbose: u8,
    quiet: u8,
    rust_log: Option<String>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle")
            .field("verbose", &self.verbose)
            .field("quiet", &self.quiet)
            .field("rust_log", &self.rust_log)
            .finish()
    }
}

/// The filter for a configured level, `-v`/`-q` and an optional `RUST_LOG`.
fn build_filter(
    config_level: Option<&str>,
    verbose: u8,
    quiet: u8,
    rust_log: Option<&str>,
) -> Result<(EnvFilter, String), LogError> {
    if let Some(directives) = rust_log.filter(|s| !s.trim().is_empty()) {
        let f = EnvFilter::builder()
            .parse(directives)
            .map_err(|e| LogError::BadRustLog(e.to_string()))?;
        return Ok((f, format!("RUST_LOG={directives}")));
    }
    let base = match config_level {
        Some(l) if !l.trim().is_empty() => parse_level(l)?,
        _ => LevelFilter::INFO,
    };
    let level = adjust_level(base, verbose, quiet);
    Ok((EnvFilter::new(level.to_string()), level.to_string()))
}

/// Install the global subscriber (stderr, `format`), the level from `config_level` shifted
/// by `verbose`/`quiet`, `RUST_LOG` winning when set. Returns the reload handle.
pub fn init(
    format: LogFormat,
    config_level: Option<&str>,
    verbose: u8,
    quiet: u8,
) -> Result<LogHandle, LogError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, _) = build_filter(config_level, verbose, quiet, rust_log.as_deref())?;
    let (filter_layer, reload) = reload::Layer::new(filter);
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|_| LogError::AlreadyInstalled)?;
    Ok(LogHandle {
        reload,
        verbose,
        quiet,
        rust_log,
    })
}

impl LogHandle {
    /// Apply a new configured level (on SIGHUP). `-v`/`-q` still shift it; when `RUST_LOG`
    /// was set at start it keeps priority and nothing changes. Returns a description of the
    /// effective filter, for the reload log line.
    pub fn set_level(&self, config_level: Option<&str>) -> Result<String, LogError> {
        // Validate even when RUST_LOG pins the filter, so a bad value is reported.
        if let Some(l) = config_level.filter(|l| !l.trim().is_empty()) {
            parse_level(l)?;
        }
        let (filter, desc) = build_filter(
            config_level,
            self.verbose,
            self.quiet,
            self.rust_log.as_deref(),
        )?;
        self.reload
            .reload(filter)
            .map_err(|e| LogError::Reload(e.to_string()))?;
        Ok(desc)
    }

    /// The effective filter, as text.
    pub fn current(&self) -> String {
        self.reload
            .with_current(|f| f.to_string())
            .unwrap_or_else(|e| format!("unavailable: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(parse_level("warning").expect("lvl"), LevelFilter::WARN);
        assert_eq!(parse_level("DEBUG").expect("lvl"), LevelFilter::DEBUG);
        assert!(matches!(parse_level("loud"), Err(LogError::BadLevel(_))));
        assert_eq!(adjust_level(LevelFilter::INFO, 1, 0), LevelFilter::DEBUG);
        assert_eq!(adjust_level(LevelFilter::INFO, 9, 0), LevelFilter::TRACE);
        assert_eq!(adjust_level(LevelFilter::INFO, 0, 2), LevelFilter::ERROR);
        assert_eq!(adjust_level(LevelFilter::ERROR, 0, 9), LevelFilter::OFF);
    }

    #[test]
    fn precedence() {
        let (_, d) = build_filter(Some("warning"), 0, 0, None).expect("f");
        assert_eq!(d, "warn");
        let (_, d) = build_filter(Some("warning"), 2, 0, None).expect("f");
        assert_eq!(d, "debug");
        let (_, d) = build_filter(Some("warning"), 2, 0, Some("hintfed=trace")).expect("f");
        assert_eq!(d, "RUST_LOG=hintfed=trace");
        let (_, d) = build_filter(None, 0, 0, Some("  ")).expect("f");
        assert_eq!(d, "info");
        assert!(build_filter(Some("shout"), 0, 0, None).is_err());
    }
}
