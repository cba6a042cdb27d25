//! The command-line arguments every daemon shares, to `#[command(flatten)]` into its own
//! clap parser. `--version` comes from the binary's `#[command(version)]`; examples go in its
//! `after_help`, built with [`after_help`].
//!
//! ```
//! use clap::Parser;
//! use hintfed_daemon::cli::{after_help, CommonArgs};
//!
//! #[derive(Parser)]
//! #[command(name = "hintfed-agent", version, about = "relays Asterisk state",
//!           after_help = after_help("hintfed-agent", &[
//!               ("hintfed-agent --config /etc/hintfed/agent.ini", "run"),
//!           ]))]
//! struct Cli {
//!     #[command(flatten)]
//!     common: CommonArgs,
//! }
//! let cli = Cli::parse_from(["hintfed-agent", "--config", "a.ini", "-vv"]);
//! assert_eq!(cli.common.verbose, 2);
//! ```

use std::path::{Path, PathBuf};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The shared arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (INI). `HINTFED_<SECTION>_<KEY>` environment variables override it.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print the effective configuration (secrets masked) and
    /// exit: 0 when valid, 64 when not.
    #[arg(long)]
    pub check_config: bool,

    /// Log format on stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More log output (repeat for more: -v debug, -vv trace). Overrides `log_level`;
    /// `RUST_LOG` overrides both.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Less log output (repeat for less: -q warnings, -qq errors, -qqq nothing).
    #[arg(short = 'q', long = "quiet", action = clap::ArgAction::Count)]
    pub quiet: u8,
}

impl CommonArgs {
    /// The configuration file: `--config`, else the positional `fallback` (the broker's
    /// `hintfed-broker FILE`).
    pub fn config_path<'a>(&'a self, fallback: Option<&'a Path>) -> Option<&'a Path> {
        self.config.as_deref().or(fallback)
    }
}

/// Help text placed after the options: the examples (command, what it does), then the
/// environment, signals and exit statuses every daemon shares.
pub fn after_help(bin: &str, examples: &[(&str, &str)]) -> String {
    let mut s = String::from("Examples:\n");
    for (cmd, what) in examples {
        s.push_str(&format!("  {cmd}\n      {what}\n"));
    }
    s.push_str(&format!(
        "  {bin} --config /etc/hintfed/{short}.ini --check-config\n      validate the file and print the effective configuration (secrets masked)\n  HINTFED_ASTERISK_SECRET=... {bin} --config FILE -v\n      take a secret from the environment, log at debug level\n\n\
Environment:\n  HINTFED_<SECTION>_<KEY>  overrides [section] key of the file\n  RUST_LOG                 overrides log_level, -v and -q (tracing filter syntax)\n\n\
Signals:\n  SIGTERM, SIGINT  drain in-flight work and exit 0 within the grace period\n  SIGHUP           reload what can change without a restart (log level, ...)\n\n\
Exit status:\n  0 success, 64 invalid configuration or usage, 1 runtime failure\n",
        short = bin.strip_prefix("hintfed-").unwrap_or(bin)
    ));
    s
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    #[command(name = "hintfed-test", version, after_help = after_help("hintfed-test", &[("hintfed-test -c x.ini", "run it")]))]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
        file: Option<PathBuf>,
    }

    #[test]
    fn parses_common_args() {
        let c = Cli::try_parse_from([
            "t",
            "--config",
            "a.ini",
            "--check-config",
            "--log-format",
            "json",
            "-vv",
            "-q",
        ])
        .expect("parse");
        assert_eq!(c.common.config.as_deref(), Some(Path::new("a.ini")));
        assert!(c.common.check_config);
        assert_eq!(c.common.log_format, LogFormat::Json);
        assert_eq!((c.common.verbose, c.common.quiet), (2, 1));
        let c = Cli::try_parse_from(["t", "b.ini"]).expect("parse");
        assert_eq!(
            c.common.config_path(c.file.as_deref()),
            Some(Path::new("b.ini"))
        );
        assert!(Cli::try_parse_from(["t", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn help_has_examples() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("hintfed-test -c x.ini"), "{help}");
        assert!(help.contains("HINTFED_<SECTION>_<KEY>"), "{help}");
        assert!(help.contains("--check-config"), "{help}");
    }
}
