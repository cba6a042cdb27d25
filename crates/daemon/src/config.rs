//! INI configuration: loading, environment overrides, typed getters, one-line errors, secrets.
//!
//! # Format
//! The files are INI as written by operators of Asterisk and of the original zmq-ami-broker
//! (whose `example_config.ini` loads unchanged):
//! - `[section]` headers; `key = value` or `key: value` (the first `=` or `:` splits);
//! - full-line comments starting with `;` or `#` (after optional blanks), and inline comments:
//!   a `;` or `#` preceded by a blank ends the value (`port = 5038 ; AMI`). A value that must
//!   hold ` ;` or ` #` cannot be written in the file; set it through the environment instead;
//! - keys are case-insensitive (stored lower-case, like Python's configparser); section names
//!   are case-sensitive; values are taken literally (no quotes, no backslash escapes, so
//!   regular expressions such as `^PJSIP/\d+$` survive); an empty value means "unset";
//! - a duplicate section or a duplicate key in one section is an error (configparser's strict
//!   mode), as are keys before the first section and continuation lines (a line indented
//!   deeper than the key above it); keys indented alike are fine.
//!
//! # Environment overrides
//! `HINTFED_<SECTION>_<KEY>` overrides `[section] key` (e.g. `HINTFED_ASTERISK_SECRET`). The
//! section part is the section name upper-cased with every character other than a letter or a
//! digit replaced by `_` (`[server-1]` → `HINTFED_SERVER_1_...`); the longest matching section
//! wins. The sections considered are those of the file plus the `env_sections` the daemon
//! names (so `HINTFED_HTTP_LISTEN` works without an `[http]` section in the file). Variables
//! that match no section are kept in [`ConfigFile::ignored_env`] so the binary can warn.
//!
//! # Workaround for the `config` crate
//! The values are parsed by the `config` crate (`FileFormat::Ini`, backed by `rust-ini`), but
//! that parser, used as is, would break our format: it keeps inline comments in the value
//! (`info ; c`), eats backslashes (`\d` → `d`), strips quotes, and lets a second `[general]`
//! silently replace the first. So [`ConfigFile::parse`] first scans the text line by line
//! (comments, strictness, line numbers for errors, key order), then hands the `config` crate a
//! normalised INI text in which every value is backslash-escaped so it comes back literally, and
//! the environment overrides as a second INI source layered on top (the `config` crate's own
//! `Environment` source would split `REQUEST_TIMEOUT` at the underscore). The result is read
//! back from the `config` crate and checked against the scan.
//!
//! # Typed access
//! [`ConfigFile::section`] gives a [`Section`] whose getters (`bool`, `port`, `duration`,
//! `duration_ms`, `list`, `secret`, `one_of`, `socket_addr`, `number`, `parse_with`) return
//! `Ok(None)` when the key is absent or empty and a [`ConfigError`] naming file, section, key
//! and problem when the value is bad. [`ConfigError`] prints as one line; [`exit_with`] prints
//! it to stderr and exits with status [`EXIT_CONFIG`] (64).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// Exit status for an invalid configuration or command line (64, `EX_USAGE` in sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// Largest configuration file accepted (4 MiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "HINTFED";

/// A configuration problem: which file, section and key, and what is wrong, printed as one
/// line, e.g. `config error: /etc/hintfed/agent.ini: [asterisk] port: "abc" is not a port
/// number (1-65535)`. Never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (as given on the command line).
    pub file: String,
    /// The section, when the problem is in one.
    pub section: Option<String>,
    /// The key, when the problem is about one.
    pub key: Option<String>,
    /// The environment variable the bad value came from, if it did not come from the file.
    pub env_var: Option<String>,
    /// What is wrong, e.g. `"abc" is not a port number (1-65535)`.
    pub problem: String,
}

impl ConfigError {
    /// A problem with the file as a whole (unreadable, syntax).
    pub fn file(file: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            section: None,
            key: None,
            env_var: None,
            problem: problem.into(),
        }
    }

    /// A problem with one key of one section.
    pub fn key(
        file: impl Into<String>,
        section: impl Into<String>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            section: Some(section.into()),
            key: Some(key.into()),
            env_var: None,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error: {}: ", self.file)?;
        match (&self.section, &self.key) {
            (Some(s), Some(k)) => write!(f, "[{s}] {k}")?,
            (Some(s), None) => write!(f, "[{s}]")?,
            (None, Some(k)) => write!(f, "{k}")?,
            (None, None) => {}
        }
        if let Some(var) = &self.env_var {
            write!(f, " (from {var})")?;
        }
        if self.section.is_some() || self.key.is_some() {
            write!(f, ": ")?;
        }
        // One line, whatever the problem text holds.
        let problem = self.problem.replace(['\n', '\r'], " ");
        write!(f, "{problem}")
    }
}

impl std::error::Error for ConfigError {}

/// Print the error on stderr as its one line and exit with status 64.
pub fn exit_with(err: &ConfigError) -> ! {
    eprintln!("{err}");
    std::process::exit(i32::from(EXIT_CONFIG))
}

/// A secret (AMI password, shared key). `Debug`, `Display` and `Serialize` print `****`; only
/// [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the code that needs it (login, HMAC). Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("****")
    }
}

/// Whether a key name denotes a secret, for masking: `secret`, `password`, `*_secret`,
/// `*password*`, `*_key`, `*_keys`, `key`, `keys`, `token`, `*_token`.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k == "secret"
        || k == "key"
        || k == "keys"
        || k == "token"
        || k.ends_with("secret")
        || k.contains("password")
        || k.ends_with("_key")
        || k.ends_with("_keys")
        || k.ends_with("_token")
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// The file, at this line (1-based).
    File {
        /// Line number, 1-based.
        line: usize,
    },
    /// An environment variable.
    Env {
        /// The variable's name.
        var: String,
    },
}

/// One `key = value` of a section.
#[derive(Clone)]
pub struct Entry {
    /// The key, lower-case.
    pub key: String,
    /// The value, literal, trimmed, without its inline comment.
    pub value: String,
    /// Where it came from.
    pub source: ValueSource,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if is_secret_key(&self.key) {
            &"****"
        } else {
            &self.value
        };
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("value", value)
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Debug, Clone)]
struct SectionData {
    name: String,
    entries: Vec<Entry>,
}

/// A loaded configuration: the file's sections and keys in file order, with the environment
/// overrides applied. `Debug` masks secret-looking keys.
#[derive(Debug)]
pub struct ConfigFile {
    file: String,
    sections: Vec<SectionData>,
    ignored_env: Vec<String>,
    /// Problems worth a warning but not fatal (unknown keys in the broker), recorded while
    /// the daemon's loader runs, before logging exists; `run` logs them.
    warnings: std::sync::Mutex<Vec<ConfigError>>,
}

impl Clone for ConfigFile {
    fn clone(&self) -> Self {
        Self {
            file: self.file.clone(),
            sections: self.sections.clone(),
            ignored_env: self.ignored_env.clone(),
            warnings: std::sync::Mutex::new(self.warnings()),
        }
    }
}

impl ConfigFile {
    /// Read `path` and apply the `HINTFED_*` variables of the process environment.
    /// `env_sections` names the sections an environment variable may create even when the file
    /// lacks them (e.g. `["general", "asterisk", "http"]`).
    pub fn load(path: &Path, env_sections: &[&str]) -> Result<Self, ConfigError> {
        let label = path.display().to_string();
        let len = std::fs::metadata(path)
            .map_err(|e| ConfigError::file(label.clone(), format!("cannot read: {e}")))?
            .len();
        if len > MAX_FILE_BYTES {
            return Err(ConfigError::file(
                label,
                format!(
                    "{len} bytes is too large for a configuration file (limit {MAX_FILE_BYTES})"
                ),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(label.clone(), format!("cannot read: {e}")))?;
        Self::parse(&label, &text, std::env::vars(), env_sections)
    }

    /// Parse `text` (named `file` in errors) with the given environment (only variables
    /// starting with `HINTFED_` are looked at).
    pub fn parse(
        file: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        env_sections: &[&str],
    ) -> Result<Self, ConfigError> {
        let mut sections = scan(file, text)?;
        let ignored_env = apply_env(&mut sections, env, env_sections);
        cross_check_with_config_crate(file, &sections)?;
        Ok(Self {
            file: file.to_owned(),
            sections,
            ignored_env,
            warnings: std::sync::Mutex::default(),
        })
    }

    /// Record a non-fatal problem (shown by `run` as a warning once logging is up, and on
    /// stderr by `--check-config`).
    pub fn warn(&self, problem: ConfigError) {
        self.warnings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(problem);
    }

    /// The warnings recorded so far.
    pub fn warnings(&self) -> Vec<ConfigError> {
        self.warnings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The file name as given, for messages.
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// Section names in file order (environment-created sections last).
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|s| s.name.as_str())
    }

    /// Whether the section exists (in the file or created by the environment).
    pub fn has_section(&self, name: &str) -> bool {
        self.sections.iter().any(|s| s.name == name)
    }

    /// A section; an absent section behaves as an empty one (every getter gives `None`).
    pub fn section(&self, name: &str) -> Section<'_> {
        let data = self.sections.iter().find(|s| s.name == name);
        Section {
            file: self,
            name: match data {
                Some(d) => Cow::Borrowed(d.name.as_str()),
                None => Cow::Owned(name.to_owned()),
            },
            data,
        }
    }

    /// The raw value of `[section] key`, if present (possibly empty).
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.section(section).get(key)
    }

    /// `HINTFED_*` variables that matched no section (so the binary can warn about them).
    pub fn ignored_env(&self) -> &[String] {
        &self.ignored_env
    }

    /// One error per section not in `known` (problem `unknown section`).
    pub fn unknown_sections(&self, known: &[&str]) -> Vec<ConfigError> {
        self.sections
            .iter()
            .filter(|s| !known.contains(&s.name.as_str()))
            .map(|s| ConfigError {
                file: self.file.clone(),
                section: Some(s.name.clone()),
                key: None,
                env_var: None,
                problem: "unknown section".into(),
            })
            .collect()
    }

    /// An error about `[section] key`, naming the environment variable if the value came
    /// from one.
    pub fn error(&self, section: &str, key: &str, problem: impl Into<String>) -> ConfigError {
        self.section(section).error(key, problem)
    }

    /// The configuration as INI text, secrets (per `is_secret`, given section and key)
    /// replaced by `****`, values from the environment annotated with their variable.
    pub fn render_masked(&self, is_secret: impl Fn(&str, &str) -> bool) -> String {
        let mut out = String::new();
        for s in &self.sections {
            out.push_str(&format!("[{}]\n", s.name));
            for e in &s.entries {
                let v = if is_secret(&s.name, &e.key) {
                    "****"
                } else {
                    e.value.as_str()
                };
                match &e.source {
                    ValueSource::File { .. } => out.push_str(&format!("{} = {v}\n", e.key)),
                    ValueSource::Env { var } => {
                        out.push_str(&format!("{} = {v}  ; from {var}\n", e.key))
                    }
                }
            }
            out.push('\n');
        }
        out
    }
}

/// One section of a [`ConfigFile`], with typed getters. Getters return `Ok(None)` when the
/// key is absent or its value is empty.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    file: &'a ConfigFile,
    name: Cow<'a, str>,
    data: Option<&'a SectionData>,
}

impl<'a> Section<'a> {
    /// The section's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the section exists.
    pub fn exists(&self) -> bool {
        self.data.is_some()
    }

    /// The entries in file order.
    pub fn entries(&self) -> &'a [Entry] {
        self.data.map(|d| d.entries.as_slice()).unwrap_or(&[])
    }

    /// The entry for `key` (case-insensitive).
    pub fn entry(&self, key: &str) -> Option<&'a Entry> {
        let key = key.to_ascii_lowercase();
        self.entries().iter().find(|e| e.key == key)
    }

    /// The raw value, possibly empty.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.entry(key).map(|e| e.value.as_str())
    }

    /// The value, `None` when absent or empty.
    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    /// The value as a `String`, `None` when absent or empty.
    pub fn string(&self, key: &str) -> Option<String> {
        self.str(key).map(str::to_owned)
    }

    /// The value, or an error `missing (required)` when absent or empty.
    pub fn required(&self, key: &str) -> Result<&'a str, ConfigError> {
        self.str(key)
            .ok_or_else(|| self.error(key, "missing (required)"))
    }

    /// An error about `key` of this section (naming the environment variable if its value
    /// came from one).
    pub fn error(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        let env_var = match self.entry(key).map(|e| &e.source) {
            Some(ValueSource::Env { var }) => Some(var.clone()),
            _ => None,
        };
        ConfigError {
            file: self.file.file.clone(),
            section: Some(self.name.to_string()),
            key: Some(key.to_ascii_lowercase()),
            env_var,
            problem: problem.into(),
        }
    }

    /// Parse the value with `f`, whose error text is the problem. The problem should quote
    /// the value (never do that for secrets).
    pub fn parse_with<T>(
        &self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).map_err(|p| self.error(key, p)),
        }
    }

    /// A boolean: yes/no, true/false, on/off, 1/0 (any case).
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.parse_with(key, |v| {
            parse_bool(v)
                .ok_or_else(|| format!("{v:?} is not a boolean (yes/no, true/false, on/off, 1/0)"))
        })
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self.bool(key)?.unwrap_or(default))
    }

    /// A TCP/UDP port, 1-65535.
    pub fn port(&self, key: &str) -> Result<Option<u16>, ConfigError> {
        self.parse_with(key, |v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("{v:?} is not a port number (1-65535)")),
        })
    }

    /// A number of type `T` (integer or float), problem `"x" is not a number`.
    pub fn number<T: FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.parse_with(key, |v| {
            v.parse::<T>()
                .map_err(|_| format!("{v:?} is not a valid number"))
        })
    }

    /// A duration with a unit, humantime syntax: `15s`, `500ms`, `2m`, `1h 30m`. A bare
    /// number is refused (ambiguous); use [`Section::duration_ms`] for keys in milliseconds.
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.parse_with(key, parse_duration)
    }

    /// A duration with a default.
    pub fn duration_or(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(self.duration(key)?.unwrap_or(default))
    }

    /// A duration in milliseconds as the original broker wrote them (`request_timeout =
    /// 1000`): a bare number is milliseconds; a value with a unit (`1s`) is accepted too.
    pub fn duration_ms(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.parse_with(key, parse_duration_ms)
    }

    /// A millisecond duration with a default.
    pub fn duration_ms_or(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(self.duration_ms(key)?.unwrap_or(default))
    }

    /// A comma-separated list `a, b, c`: items trimmed, empty items dropped; absent → empty.
    pub fn list(&self, key: &str) -> Vec<String> {
        self.str(key).map(split_list).unwrap_or_default()
    }

    /// A secret; its value never appears in errors.
    pub fn secret(&self, key: &str) -> Option<Secret> {
        self.str(key).map(Secret::new)
    }

    /// One of the allowed words (case-sensitive), returned as written in `allowed`.
    pub fn one_of(
        &self,
        key: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, ConfigError> {
        self.parse_with(key, |v| {
            allowed
                .iter()
                .find(|a| **a == v)
                .copied()
                .ok_or_else(|| format!("{v:?} is not one of: {}", allowed.join(", ")))
        })
    }

    /// A socket address `host:port` with a literal IP (`127.0.0.1:9480`, `[::1]:9480`).
    pub fn socket_addr(&self, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
        self.parse_with(key, |v| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("{v:?} is not an address (IP:port, e.g. 127.0.0.1:9480)"))
        })
    }

    /// Fail on the first key not in `known` (for daemons that refuse unknown keys).
    pub fn reject_unknown_keys(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.unknown_keys(known).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Record a warning per key not in `known` (the broker's policy: warned about, not
    /// ignored silently); see [`ConfigFile::warn`].
    pub fn warn_unknown_keys(&self, known: &[&str]) {
        for e in self.unknown_keys(known) {
            self.file.warn(e);
        }
    }

    /// One error per key not in `known` (problem `unknown key`): the broker warns about them,
    /// the agent and server may refuse them.
    pub fn unknown_keys(&self, known: &[&str]) -> Vec<ConfigError> {
        self.entries()
            .iter()
            .filter(|e| !known.iter().any(|k| k.eq_ignore_ascii_case(&e.key)))
            .map(|e| self.error(&e.key, "unknown key"))
            .collect()
    }
}

/// Parse yes/no, true/false, on/off, 1/0 (any case).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" | "1" => Some(true),
        "no" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Parse a humantime duration with a unit; the error is the problem text.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    if v.trim().chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{v:?} has no unit (write e.g. 15s or 500ms)"));
    }
    humantime::parse_duration(v.trim())
        .map_err(|_| format!("{v:?} is not a duration (e.g. 15s, 500ms, 2m)"))
}

/// Parse a duration where a bare number means milliseconds; the error is the problem text.
pub fn parse_duration_ms(v: &str) -> Result<Duration, String> {
    let t = v.trim();
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(t)
        .map_err(|_| format!("{v:?} is not a duration in milliseconds (e.g. 1000, 500ms, 2s)"))
}

/// Split `a, b, c` into trimmed, non-empty items.
pub fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Serde helpers so typed configs print durations the way they are written (`15s`).
pub mod ser {
    use std::time::Duration;

    use serde::Serializer;

    /// `#[serde(serialize_with = "hintfed_daemon::config::ser::duration")]`
    pub fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Same for `Option<Duration>` (`None` serialises as null).
    pub fn opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// Render a serialisable typed configuration as INI text (keys in alphabetical order): top-level scalars first, then each
/// object field as a `[section]`, an array of objects as `[field.0]`, `[field.1]`..., arrays
/// of scalars as `a, b, c`, `null` as an empty value. Secrets are masked by [`Secret`]'s
/// `Serialize`, and also by key name ([`is_secret_key`]) as a second guard.
pub fn render_ini<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    use serde_json::Value;
    let v = serde_json::to_value(value)?;
    let mut out = String::new();
    let mut sections: Vec<(String, &serde_json::Map<String, Value>)> = Vec::new();
    if let Value::Object(top) = &v {
        for (k, val) in top {
            match val {
                Value::Object(m) => sections.push((k.clone(), m)),
                Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object) => {
                    for (i, item) in a.iter().enumerate() {
                        if let Value::Object(m) = item {
                            sections.push((format!("{k}.{i}"), m));
                        }
                    }
                }
                other => out.push_str(&format!("{k} = {}\n", scalar(k, other))),
            }
        }
    } else {
        out.push_str(&scalar("", &v));
        out.push('\n');
    }
    for (name, m) in sections {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("[{name}]\n"));
        for (k, val) in m {
            out.push_str(&format!("{k} = {}\n", scalar(k, val)));
        }
    }
    Ok(out)
}

fn scalar(key: &str, v: &serde_json::Value) -> String {
    use serde_json::Value;
    if is_secret_key(key) && !v.is_null() {
        return "****".into();
    }
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| scalar("", x))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Scanning, environment, config-crate round trip.

fn scan(file: &str, text: &str) -> Result<Vec<SectionData>, ConfigError> {
    let mut sections: Vec<SectionData> = Vec::new();
    let mut last_key_indent: Option<usize> = None;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let at = |problem: String| ConfigError::file(file, format!("line {line_no}: {problem}"));
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        // Like configparser: a line indented deeper than the key above it continues that
        // key's value. We refuse those rather than guess; equally indented keys are fine.
        let indent = raw.len() - raw.trim_start().len();
        if last_key_indent.is_some_and(|k| indent > k) {
            return Err(at(
                "indented continuation lines are not supported (write the value on one line)"
                    .into(),
            ));
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            last_key_indent = None;
            let rest = strip_inline_comment(rest);
            let Some(name) = rest.strip_suffix(']') else {
                return Err(at(format!("{trimmed:?} is not a [section] header")));
            };
            let name = name.trim();
            if name.is_empty() || name.contains(['[', ']', '.', '"', '\'', '\\']) {
                return Err(at(format!(
                    "{name:?} is not a valid section name (no dots, brackets, quotes or backslashes)"
                )));
            }
            if sections.iter().any(|s| s.name == name) {
                return Err(ConfigError {
                    file: file.to_owned(),
                    section: Some(name.to_owned()),
                    key: None,
                    env_var: None,
                    problem: format!("line {line_no}: duplicate section"),
                });
            }
            sections.push(SectionData {
                name: name.to_owned(),
                entries: Vec::new(),
            });
            continue;
        }
        let Some(split) = trimmed.find(['=', ':']) else {
            return Err(at(format!(
                "{:?} is neither a [section], a key = value nor a comment",
                shorten(trimmed)
            )));
        };
        let key = trimmed[..split].trim().to_ascii_lowercase();
        let value = strip_inline_comment(trimmed[split + 1..].trim()).to_owned();
        let Some(section) = sections.last_mut() else {
            return Err(at(format!("key {key:?} before the first [section]")));
        };
        if key.is_empty() || key.contains(['[', ']', '"', '\'', '\\', ';', '#']) {
            return Err(at(format!("{key:?} is not a valid key name")));
        }
        if section.entries.iter().any(|e| e.key == key) {
            return Err(ConfigError {
                file: file.to_owned(),
                section: Some(section.name.clone()),
                key: Some(key),
                env_var: None,
                problem: format!("line {line_no}: duplicate key"),
            });
        }
        last_key_indent = Some(indent);
        section.entries.push(Entry {
            key,
            value,
            source: ValueSource::File { line: line_no },
        });
    }
    Ok(sections)
}

/// Cut `value ; comment` / `value # comment` (the marker must follow a blank), then trim.
fn strip_inline_comment(v: &str) -> &str {
    let bytes = v.as_bytes();
    for i in 0..bytes.len() {
        if (bytes[i] == b';' || bytes[i] == b'#')
            && (i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t')
        {
            return v[..i].trim();
        }
    }
    v.trim()
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

fn env_name(section: &str) -> String {
    section
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn apply_env(
    sections: &mut Vec<SectionData>,
    env: impl IntoIterator<Item = (String, String)>,
    env_sections: &[&str],
) -> Vec<String> {
    let prefix = format!("{ENV_PREFIX}_");
    let mut candidates: Vec<String> = sections.iter().map(|s| s.name.clone()).collect();
    for s in env_sections {
        if !candidates.iter().any(|c| c == s) {
            candidates.push((*s).to_owned());
        }
    }
    // Sorted for determinism: environment iteration order is unspecified.
    let env: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    let mut ignored = Vec::new();
    for (var, value) in env {
        let rest = &var[prefix.len()..];
        let best = candidates
            .iter()
            .filter_map(|c| {
                let n = env_name(c);
                rest.strip_prefix(&n)
                    .and_then(|r| r.strip_prefix('_'))
                    .filter(|k| !k.is_empty())
                    .map(|k| (n.len(), c.clone(), k.to_ascii_lowercase()))
            })
            .max_by_key(|(len, _, _)| *len);
        let Some((_, section, key)) = best else {
            ignored.push(var);
            continue;
        };
        let idx = match sections.iter().position(|s| s.name == section) {
            Some(i) => i,
            None => {
                sections.push(SectionData {
                    name: section.clone(),
                    entries: Vec::new(),
                });
                sections.len() - 1
            }
        };
        let entries = &mut sections[idx].entries;
        let entry = Entry {
            key: key.clone(),
            value: value.trim().to_owned(),
            source: ValueSource::Env { var: var.clone() },
        };
        match entries.iter_mut().find(|e| e.key == key) {
            Some(e) => *e = entry,
            None => entries.push(entry),
        }
    }
    ignored
}

/// Escape a value so that rust-ini (escapes and quotes enabled, with or without its
/// `inline-comment` feature) returns it literally.
fn escape_for_rust_ini(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '\'' | ';' | '#' | '=' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Parse the scanned sections through the `config` crate (file layer, then environment
/// layer) and check that it returns exactly the scanned values.
fn cross_check_with_config_crate(file: &str, sections: &[SectionData]) -> Result<(), ConfigError> {
    let mut file_ini = String::new();
    let mut env_ini = String::new();
    for s in sections {
        file_ini.push_str(&format!("[{}]\n", s.name));
        env_ini.push_str(&format!("[{}]\n", s.name));
        for e in &s.entries {
            let line = format!("{} = {}\n", e.key, escape_for_rust_ini(&e.value));
            match e.source {
                ValueSource::File { .. } => file_ini.push_str(&line),
                ValueSource::Env { .. } => env_ini.push_str(&line),
            }
        }
    }
    let built = config::Config::builder()
        .add_source(config::File::from_str(&file_ini, config::FileFormat::Ini))
        .add_source(config::File::from_str(&env_ini, config::FileFormat::Ini))
        .build()
        .map_err(|e| ConfigError::file(file, format!("config crate: {e}")))?;
    let root: config::Map<String, config::Value> = built
        .try_deserialize()
        .map_err(|e| ConfigError::file(file, format!("config crate: {e}")))?;
    for s in sections {
        let table = match root.get(&s.name).map(|v| v.clone().into_table()) {
            Some(Ok(t)) => t,
            _ if s.entries.is_empty() => continue,
            _ => {
                return Err(ConfigError::file(
                    file,
                    format!("config crate lost section [{}]", s.name),
                ));
            }
        };
        for e in &s.entries {
            let got = table.get(&e.key).map(|v| v.clone().into_string());
            if !matches!(&got, Some(Ok(g)) if *g == e.value) {
                return Err(ConfigError::key(
                    file,
                    s.name.clone(),
                    e.key.clone(),
                    "the config crate read this value differently (please report)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse("t.ini", text, Vec::new(), &[])
    }

    #[test]
    fn literal_values_survive_the_config_crate() {
        let nasty = [
            r"^PJSIP/\d+$",
            r#"a "quoted" 'x' value"#,
            "tcp://127.0.0.1:33333",
            "a=b:c",
            "semi;colon#hash",
            r"C:\Windows\n",
            "ünïcödé",
            "[x]",
            r"ends with \",
            r#""fully quoted""#,
            "'single'",
            r"a\;b",
            "tab\there",
        ];
        for v in nasty {
            let cfg = parse(&format!("[s]\nk = {v}\n")).expect(v);
            assert_eq!(cfg.get("s", "k"), Some(v));
        }
    }

    proptest::proptest! {
        /// Whatever printable value is written (bar what the format reserves: leading or
        /// trailing blanks, a blank followed by `;`/`#`), the same text comes back, through
        /// the config crate.
        #[test]
        fn any_value_round_trips(v in "[ -~\u{a0}-\u{17f}]{0,40}") {
            let v = v.trim().to_owned();
            let reserved = v.starts_with([';', '#'])
                || v.contains(" ;")
                || v.contains(" #");
            proptest::prop_assume!(!reserved);
            let cfg = parse(&format!("[s]\nk = {v}\n")).expect("parse");
            proptest::prop_assert_eq!(cfg.get("s", "k"), Some(v.as_str()));
        }
    }

    #[test]
    fn inline_comments_need_a_blank_before() {
        let cfg = parse("[s]\na = 1 ; one\nb = x;y\nc = two # 2\nd = #\ne=\n").expect("parse");
        assert_eq!(cfg.get("s", "a"), Some("1"));
        assert_eq!(cfg.get("s", "b"), Some("x;y"));
        assert_eq!(cfg.get("s", "c"), Some("two"));
        assert_eq!(cfg.get("s", "d"), Some(""));
        assert_eq!(cfg.section("s").str("d"), None);
        assert_eq!(cfg.get("s", "e"), Some(""));
    }

    #[test]
    fn keys_are_case_insensitive_sections_are_not() {
        let cfg = parse("[General]\nLog_Level = debug\n").expect("parse");
        assert_eq!(cfg.section("General").get("log_level"), Some("debug"));
        assert_eq!(cfg.section("General").get("LOG_LEVEL"), Some("debug"));
        assert!(!cfg.has_section("general"));
    }

    #[test]
    fn strictness() {
        let e = parse("[a]\nx = 1\n[a]\n").expect_err("dup section");
        assert_eq!(
            e.to_string(),
            "config error: t.ini: [a]: line 3: duplicate section"
        );
        let e = parse("[a]\nx = 1\nX = 2\n").expect_err("dup key");
        assert_eq!(
            e.to_string(),
            "config error: t.ini: [a] x: line 3: duplicate key"
        );
        let e = parse("x = 1\n").expect_err("no section");
        assert_eq!(
            e.to_string(),
            "config error: t.ini: line 1: key \"x\" before the first [section]"
        );
        let e = parse("[a]\njunk\n").expect_err("junk");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = parse("[a]\nx = 1\n  y\n").expect_err("continuation");
        assert!(e.to_string().contains("continuation"), "{e}");
        let ok = parse("[a]\n  x = 1\n  y = 2\n[b]\n\tz = 3\n").expect("equal indentation");
        assert_eq!(ok.get("a", "y"), Some("2"));
        assert_eq!(ok.get("b", "z"), Some("3"));
        let e = parse("[a.b]\n").expect_err("dot");
        assert!(e.to_string().contains("section name"), "{e}");
    }

    #[test]
    fn env_overrides_longest_section_wins() {
        let env = vec![
            ("HINTFED_SERVER_1_SECRET".to_owned(), "s3cret".to_owned()),
            ("HINTFED_SERVER_LISTEN".to_owned(), "tcp://*:1".to_owned()),
            ("HINTFED_HTTP_LISTEN".to_owned(), "127.0.0.1:1".to_owned()),
            ("HINTFED_NOPE_X".to_owned(), "1".to_owned()),
            ("OTHER_X".to_owned(), "1".to_owned()),
        ];
        let cfg = ConfigFile::parse(
            "t.ini",
            "[server]\nlisten = a\n[server-1]\nsecret = file\n",
            env,
            &["http"],
        )
        .expect("parse");
        assert_eq!(cfg.get("server-1", "secret"), Some("s3cret"));
        assert_eq!(cfg.get("server", "listen"), Some("tcp://*:1"));
        assert_eq!(cfg.get("http", "listen"), Some("127.0.0.1:1"));
        assert_eq!(cfg.ignored_env(), ["HINTFED_NOPE_X".to_owned()]);
        let e = cfg.section("http").port("listen").expect_err("not a port");
        assert_eq!(
            e.to_string(),
            "config error: t.ini: [http] listen (from HINTFED_HTTP_LISTEN): \"127.0.0.1:1\" is not a port number (1-65535)"
        );
    }

    #[test]
    fn typed_getters() {
        let cfg = parse(
            "[g]\nb1 = Yes\nb2 = off\nb3 = maybe\np = 5038\np0 = 0\nd = 15s\nd2 = 1m 30s\ndn = 15\nms = 1000\nms2 = 2s\nl = a, b,, c ,\nsrc = zmq\naddr = [::1]:9480\nn = 12\n",
        )
        .expect("parse");
        let s = cfg.section("g");
        assert_eq!(s.bool("b1"), Ok(Some(true)));
        assert_eq!(s.bool("b2"), Ok(Some(false)));
        assert_eq!(s.bool_or("absent", true), Ok(true));
        assert_eq!(
            s.bool("b3").map_err(|e| e.to_string()),
            Err("config error: t.ini: [g] b3: \"maybe\" is not a boolean (yes/no, true/false, on/off, 1/0)".into())
        );
        assert_eq!(s.port("p"), Ok(Some(5038)));
        assert!(s.port("p0").is_err());
        assert_eq!(s.duration("d"), Ok(Some(Duration::from_secs(15))));
        assert_eq!(s.duration("d2"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(
            s.duration("dn").map_err(|e| e.problem),
            Err("\"15\" has no unit (write e.g. 15s or 500ms)".into())
        );
        assert_eq!(s.duration_ms("ms"), Ok(Some(Duration::from_millis(1000))));
        assert_eq!(s.duration_ms("ms2"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(s.list("l"), vec!["a", "b", "c"]);
        assert!(s.list("absent").is_empty());
        assert_eq!(s.one_of("src", &["ami", "zmq", "kafka"]), Ok(Some("zmq")));
        assert_eq!(
            s.one_of("p", &["ami", "zmq"]).map_err(|e| e.problem),
            Err("\"5038\" is not one of: ami, zmq".into())
        );
        assert_eq!(
            s.socket_addr("addr"),
            Ok(Some("[::1]:9480".parse().expect("addr")))
        );
        assert_eq!(s.number::<u32>("n"), Ok(Some(12)));
        assert!(s.number::<u32>("src").is_err());
        assert_eq!(
            s.required("absent").map_err(|e| e.to_string()),
            Err("config error: t.ini: [g] absent: missing (required)".into())
        );
    }

    #[test]
    fn unknown_keys_and_sections() {
        let cfg = parse("[a]\nx = 1\ny = 2\n[b]\n").expect("parse");
        let unknown = cfg.section("a").unknown_keys(&["x"]);
        assert_eq!(unknown.len(), 1);
        assert_eq!(
            unknown[0].to_string(),
            "config error: t.ini: [a] y: unknown key"
        );
        let us = cfg.unknown_sections(&["a"]);
        assert_eq!(us.len(), 1);
        assert_eq!(
            us[0].to_string(),
            "config error: t.ini: [b]: unknown section"
        );
    }

    #[test]
    fn warnings_and_strict_unknown_keys() {
        let cfg = parse("[a]\nx = 1\ny = 2\n").expect("parse");
        assert_eq!(
            cfg.section("a")
                .reject_unknown_keys(&["x"])
                .map_err(|e| e.to_string()),
            Err("config error: t.ini: [a] y: unknown key".into())
        );
        assert!(cfg.section("a").reject_unknown_keys(&["x", "y"]).is_ok());
        cfg.section("a").warn_unknown_keys(&["x"]);
        let w = cfg.warnings();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].key.as_deref(), Some("y"));
        assert_eq!(cfg.clone().warnings().len(), 1);
    }

    #[test]
    fn secrets_are_masked() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "**** ****");
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"****\"");
        assert_eq!(s.expose(), "hunter2");
        let cfg =
            parse("[asterisk]\nsecret = hunter2\nhost = h\n[federation]\nshared_keys = k1, k2\n")
                .expect("parse");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("k1"), "{dbg}");
        let text = cfg.render_masked(|_, k| is_secret_key(k));
        assert!(
            text.contains("secret = ****") && text.contains("shared_keys = ****"),
            "{text}"
        );
        assert!(text.contains("host = h"), "{text}");
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn render_ini_of_typed_config() {
        #[derive(Serialize)]
        struct Ast {
            host: String,
            secret: Secret,
            #[serde(serialize_with = "ser::duration")]
            request_timeout: Duration,
            servers: Vec<String>,
            tls: bool,
            include: Option<String>,
        }
        #[derive(Serialize)]
        struct Cfg {
            asterisk: Ast,
        }
        let text = render_ini(&Cfg {
            asterisk: Ast {
                host: "127.0.0.1".into(),
                secret: Secret::new("x"),
                request_timeout: Duration::from_millis(1500),
                servers: vec!["a".into(), "b".into()],
                tls: false,
                include: None,
            },
        })
        .expect("render");
        assert_eq!(
            text,
            "[asterisk]\nhost = 127.0.0.1\nsecret = ****\nrequest_timeout = 1s 500ms\nservers = a, b\ntls = false\ninclude = \n"
        );
    }
}
