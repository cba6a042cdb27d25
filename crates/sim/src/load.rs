//! Load drivers: phones changing state under the simulator's control.
//!
//! - A script ([`parse_script`]): one change per line, at a time relative to the server's
//!   start. Format (blank lines and `#` comments ignored):
//!   ```text
//!   # <seconds> <device> <STATE>
//!   0.5  PJSIP/1000  RINGING
//!   1    PJSIP/1000  INUSE
//!   2.5  Custom:dnd300  BUSY
//!   # <seconds> presence <provider> <status,subtype,message[,e]>
//!   3    presence CustomPresence:alice away,lunch,back at 2
//!   # <seconds> restart       (a simulated Asterisk restart)
//!   10   restart
//!   ```
//!   Lines need not be sorted; they run in time order (file order for equal times).
//! - Random load ([`RandomLoad`]): `count` phones `<prefix><first>..`, each step picks a phone
//!   and a new state from a seeded generator, so the same seed gives the same sequence.

use std::time::Duration;

use crate::state::DeviceState;

/// What one script line does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptStep {
    /// Set a device's state (any device; `Custom:` ones as `DEVICE_STATE` would).
    Device {
        /// The device.
        device: String,
        /// Its new state.
        state: DeviceState,
    },
    /// Set a `CustomPresence:` provider.
    Presence {
        /// The provider, e.g. `CustomPresence:alice`.
        provider: String,
        /// `status,subtype,message[,e]`.
        value: String,
    },
    /// A simulated restart.
    Restart,
}

/// One timed script step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptLine {
    /// When, after the server started.
    pub at: Duration,
    /// What.
    pub step: ScriptStep,
}

/// Errors in a script.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// A line that does not follow the format.
    #[error("script line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read script {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Parses a script (see the module docs).
pub fn parse_script(text: &str) -> Result<Vec<ScriptLine>, ScriptError> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| ScriptError::Syntax {
            line: n + 1,
            reason: reason.to_owned(),
        };
        let mut words = line.splitn(2, char::is_whitespace);
        let secs: f64 = words
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .ok_or_else(|| err("expected a time in seconds first"))?;
        let rest = words.next().unwrap_or("").trim();
        let step = if rest.eq_ignore_ascii_case("restart") {
            ScriptStep::Restart
        } else if let Some(p) = rest
            .strip_prefix("presence")
            .filter(|p| p.starts_with(char::is_whitespace))
        {
            let mut it = p.trim().splitn(2, char::is_whitespace);
            let provider = it.next().unwrap_or("").to_owned();
            let value = it.next().unwrap_or("").trim().to_owned();
            if provider.is_empty() || value.is_empty() {
                return Err(err("expected: <seconds> presence <provider> <value>"));
            }
            ScriptStep::Presence { provider, value }
        } else {
            let mut it = rest.split_whitespace();
            let (Some(device), Some(state), None) = (it.next(), it.next(), it.next()) else {
                return Err(err("expected: <seconds> <device> <STATE>"));
            };
            let state = DeviceState::parse(state).ok_or_else(|| err("unknown device state"))?;
            ScriptStep::Device {
                device: device.to_owned(),
                state,
            }
        };
        out.push(ScriptLine {
            at: Duration::from_secs_f64(secs),
            step,
        });
    }
    out.sort_by_key(|l| l.at);
    Ok(out)
}

/// Reads and parses a script file.
pub fn load_script(path: &std::path::Path) -> Result<Vec<ScriptLine>, ScriptError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_script(&text)
}

/// SplitMix64: tiny, seedable, good enough to pick phones and states.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        // n is small; the modulo bias is irrelevant for load generation.
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The states random load moves phones through.
const LOAD_STATES: [DeviceState; 6] = [
    DeviceState::NotInuse,
    DeviceState::Ringing,
    DeviceState::Inuse,
    DeviceState::Busy,
    DeviceState::Onhold,
    DeviceState::Unavailable,
];

/// A seeded generator of phone state changes.
#[derive(Debug, Clone)]
pub struct RandomLoad {
    devices: Vec<String>,
    last: Vec<DeviceState>,
    rng: SplitMix64,
}

impl RandomLoad {
    /// `count` devices named `<prefix><first + i>` (e.g. `PJSIP/` and 1000), seeded by `seed`.
    pub fn new(count: usize, prefix: &str, first: u64, seed: u64) -> Self {
        let count = count.max(1);
        Self {
            devices: (0..count as u64)
                .map(|i| format!("{prefix}{}", first + i))
                .collect(),
            last: vec![DeviceState::NotInuse; count],
            rng: SplitMix64(seed),
        }
    }

    /// The devices it drives.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// The next change: a device and a state different from the last one it was given.
    pub fn next_change(&mut self) -> (String, DeviceState) {
        let i = self.rng.below(self.devices.len());
        let mut s = LOAD_STATES[self.rng.below(LOAD_STATES.len())];
        if s == self.last[i] {
            let pos = LOAD_STATES.iter().position(|x| *x == s).unwrap_or(0);
            s = LOAD_STATES[(pos + 1) % LOAD_STATES.len()];
        }
        self.last[i] = s;
        (self.devices[i].clone(), s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_lines() {
        let s = parse_script(
            "# comment\n2 PJSIP/1 inuse\n0.5 PJSIP/1 RINGING\n\n3 presence CustomPresence:a away,x,y z\n4 restart\n",
        )
        .expect("parse");
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].at, Duration::from_millis(500));
        assert_eq!(
            s[1].step,
            ScriptStep::Device {
                device: "PJSIP/1".into(),
                state: DeviceState::Inuse
            }
        );
        assert_eq!(
            s[2].step,
            ScriptStep::Presence {
                provider: "CustomPresence:a".into(),
                value: "away,x,y z".into()
            }
        );
        assert_eq!(s[3].step, ScriptStep::Restart);
    }

    #[test]
    fn script_errors_name_the_line() {
        let e = parse_script("1 PJSIP/1 INUSE\nsoon PJSIP/1 INUSE").expect_err("bad");
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse_script("1 PJSIP/1 HAPPY").is_err());
        assert!(parse_script("1 PJSIP/1").is_err());
    }

    #[test]
    fn random_load_is_reproducible_and_changes_state() {
        let mut a = RandomLoad::new(5, "PJSIP/", 1000, 42);
        let mut b = RandomLoad::new(5, "PJSIP/", 1000, 42);
        let mut c = RandomLoad::new(5, "PJSIP/", 1000, 43);
        let sa: Vec<_> = (0..100).map(|_| a.next_change()).collect();
        let sb: Vec<_> = (0..100).map(|_| b.next_change()).collect();
        let sc: Vec<_> = (0..100).map(|_| c.next_change()).collect();
        assert_eq!(sa, sb);
        assert_ne!(sa, sc);
        assert!(sa.iter().all(|(d, _)| a.devices().contains(d)));
        // Every step is a real change for its device.
        let mut last = std::collections::HashMap::new();
        for (d, s) in &sa {
            assert_ne!(last.insert(d.clone(), *s), Some(*s));
        }
    }
}
