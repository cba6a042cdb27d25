//! A reader for the parts of Asterisk's `extensions.conf` the simulator needs: `hint` priorities
//! (`exten => 100,hint,PJSIP/100&Custom:dnd100,CustomPresence:alice`) and `[globals]`.
//!
//! Everything else (dialplan priorities, `same =>` lines, `#include`) is accepted and ignored.

use std::path::Path;

/// One hint: an extension whose state aggregates some devices (and optionally a presence
/// provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// The extension, e.g. `100`.
    pub exten: String,
    /// The context it lives in, e.g. `test`.
    pub context: String,
    /// The hint's application data as written, e.g. `Custom:shared400,CustomPresence:alice`;
    /// this is what events carry in `Hint:`.
    pub app: String,
    /// The devices (the part before the first `,`, split on `&`).
    pub devices: Vec<String>,
    /// The presence provider (the part after the first `,`), if any.
    pub presence: Option<String>,
}

impl Hint {
    /// Builds a hint from its application data.
    pub fn new(exten: &str, context: &str, app: &str) -> Self {
        let (devs, presence) = match app.split_once(',') {
            Some((d, p)) => (d, Some(p.trim()).filter(|p| !p.is_empty())),
            None => (app, None),
        };
        Self {
            exten: exten.to_owned(),
            context: context.to_owned(),
            app: app.to_owned(),
            devices: devs
                .split('&')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect(),
            presence: presence.map(str::to_owned),
        }
    }

    /// Whether this hint watches `device` (compared ignoring ASCII case, as Asterisk does).
    pub fn has_device(&self, device: &str) -> bool {
        self.devices.iter().any(|d| d.eq_ignore_ascii_case(device))
    }
}

/// What the simulator takes from an `extensions.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dialplan {
    /// Every hint, in file order.
    pub hints: Vec<Hint>,
    /// `[globals]` variables, in file order.
    pub globals: Vec<(String, String)>,
}

/// Errors reading an `extensions.conf`.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A `hint` line outside any `[context]`.
    #[error("line {line}: hint outside of a [context]")]
    NoContext {
        /// 1-based line number.
        line: usize,
    },
}

/// Drops a `;` comment (an escaped `\;` is kept).
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b';' && (i == 0 || bytes[i - 1] != b'\\') {
            return &line[..i];
        }
    }
    line
}

/// Parses the text of an `extensions.conf`.
pub fn parse(text: &str) -> Result<Dialplan, ExtensionsError> {
    let mut plan = Dialplan::default();
    let mut context: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.split(']').next().unwrap_or("").trim();
            context = Some(name.to_owned());
            continue;
        }
        let Some((key, value)) = line.split_once("=>").or_else(|| line.split_once('=')) else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        if context.as_deref() == Some("globals") {
            plan.globals.push((key.to_owned(), value.to_owned()));
            continue;
        }
        if !key.eq_ignore_ascii_case("exten") {
            continue;
        }
        let mut parts = value.splitn(3, ',');
        let (Some(exten), Some(prio), Some(app)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !prio.trim().eq_ignore_ascii_case("hint") {
            continue;
        }
        let Some(ctx) = &context else {
            return Err(ExtensionsError::NoContext { line: n + 1 });
        };
        plan.hints.push(Hint::new(exten.trim(), ctx, app.trim()));
    }
    Ok(plan)
}

/// Reads and parses an `extensions.conf` file.
pub fn load(path: &Path) -> Result<Dialplan, ExtensionsError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExtensionsError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "[general]\nstatic=yes\n[globals]\nFOO=bar\n[test]\n\
exten => 100,hint,Local/100@phones&Custom:Local/100@phones\n\
exten => 400,hint,Custom:shared400,CustomPresence:alice ; comment\n\
[phones]\nexten => _X.,1,Answer()\n same => n,Hangup()\n";

    #[test]
    fn reads_hints_and_globals() {
        let plan = parse(FIXTURE).expect("parse");
        assert_eq!(plan.globals, vec![("FOO".to_owned(), "bar".to_owned())]);
        assert_eq!(plan.hints.len(), 2);
        let h = &plan.hints[0];
        assert_eq!((h.exten.as_str(), h.context.as_str()), ("100", "test"));
        assert_eq!(
            h.devices,
            vec!["Local/100@phones", "Custom:Local/100@phones"]
        );
        assert_eq!(h.presence, None);
        let h = &plan.hints[1];
        assert_eq!(h.app, "Custom:shared400,CustomPresence:alice");
        assert_eq!(h.devices, vec!["Custom:shared400"]);
        assert_eq!(h.presence.as_deref(), Some("CustomPresence:alice"));
        assert!(h.has_device("custom:SHARED400"));
    }

    #[test]
    fn the_fixture_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/asterisk/extensions.conf");
        let plan = load(&path).expect("fixture");
        let names: Vec<_> = plan.hints.iter().map(|h| h.exten.as_str()).collect();
        assert_eq!(names, ["100", "200", "300", "400"]);
    }

    #[test]
    fn hint_outside_context_is_an_error() {
        assert!(matches!(
            parse("exten => 1,hint,PJSIP/1"),
            Err(ExtensionsError::NoContext { line: 1 })
        ));
    }
}
