//! Policies: which local devices are federated, which states are never sent, how a value
//! Asterisk cannot write is substituted, how a remote device is named locally, which presence
//! keys are shared, and what a down origin's devices count as.
//!
//! # The `/` warning
//! The default name template `Custom:{device}` turns `PJSIP/100` into `Custom:PJSIP/100`.
//! Asterisk stores `Custom:` states in its database keyed by the part after `Custom:`, and a
//! `/` there does not survive a restart: `Custom:Local/100@phones` comes back as
//! `Custom:100@phones` (see `shared/fixtures/asterisk/README.md`). hintfed therefore applies
//! every remote state again whenever the local Asterisk restarts or reconnects. If something
//! else reads these devices across restarts, choose a template or device names without `/`.

use std::collections::BTreeSet;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::state::DeviceState;

/// The policy settings as configured (plain data; [`Policy::new`] validates and compiles).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// Federate device states at all (`device_state = yes`).
    pub device_state: bool,
    /// Federate presence at all (`presence = yes`).
    pub presence: bool,
    /// Regexes: a local device is federated only if one matches. Empty: every device.
    pub include: Vec<String>,
    /// Regexes: a local device matching any is not federated. Default `^Custom:` (remote
    /// states land on `Custom:` devices; federating them would loop them back).
    pub exclude: Vec<String>,
    /// States never sent (e.g. UNKNOWN, INVALID). Default: none.
    pub never_send: Vec<DeviceState>,
    /// What to write instead of UNKNOWN, which Asterisk refuses for `Custom:` devices.
    /// Default NOT_INUSE (UNKNOWN counts as idle in a hint, `ast_devstate_to_extenstate`).
    pub unknown_substitute: DeviceState,
    /// Local name of a remote device; must contain `{device}` and produce a `Custom:` name.
    /// Default `Custom:{device}`. See the module docs about `/`.
    pub device_template: String,
    /// What the devices of a down origin count as in the aggregate. Default UNAVAILABLE.
    pub down_state: DeviceState,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            device_state: true,
            presence: true,
            include: Vec::new(),
            exclude: vec!["^Custom:".to_owned()],
            never_send: Vec::new(),
            unknown_substitute: DeviceState::NotInuse,
            device_template: "Custom:{device}".to_owned(),
            down_state: DeviceState::Unavailable,
        }
    }
}

/// Why a policy configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An include/exclude pattern does not compile.
    #[error("invalid regular expression {pattern:?}: {reason}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The compiler's message.
        reason: String,
    },
    /// The device template lacks `{device}`, holds another placeholder, or does not produce a
    /// `Custom:` name.
    #[error(
        "invalid device_template {0:?}: must contain {{device}}, no other {{...}}, and start with Custom:"
    )]
    Template(String),
    /// A substitute or down state is itself unwritable (UNKNOWN).
    #[error("{0} cannot be UNKNOWN (Asterisk refuses to write it)")]
    Unwritable(&'static str),
}

/// A validated, compiled policy.
#[derive(Clone, Debug)]
pub struct Policy {
    config: PolicyConfig,
    include: Vec<Regex>,
    exclude: Vec<Regex>,
    never_send: BTreeSet<DeviceState>,
    /// `device_template` split at each `{device}` (at least two parts).
    template: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(PolicyConfig::default()).expect("the default policy is valid")
    }
}

/// Prefix of shared presence keys (the only presence Asterisk lets hintfed write).
pub const PRESENCE_PREFIX: &str = "CustomPresence:";

/// Whether `device` is a `Custom:` device (any case), where remote device states are written.
pub fn is_custom_device(device: &str) -> bool {
    device
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("Custom:"))
}

fn compile(patterns: &[String]) -> Result<Vec<Regex>, PolicyError> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|e| PolicyError::Regex {
                pattern: p.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

impl Policy {
    /// Validates and compiles `config`.
    pub fn new(config: PolicyConfig) -> Result<Self, PolicyError> {
        let include = compile(&config.include)?;
        let exclude = compile(&config.exclude)?;
        let t = &config.device_template;
        let rest = t.replacen("{device}", "", usize::MAX);
        if !t.contains("{device}")
            || rest.contains('{')
            || rest.contains('}')
            || !is_custom_device(t)
            || t.len() <= 7
        {
            return Err(PolicyError::Template(t.clone()));
        }
        if !config.unknown_substitute.is_writable() {
            return Err(PolicyError::Unwritable("unknown_substitute"));
        }
        if !config.down_state.is_writable() {
            return Err(PolicyError::Unwritable("down_state"));
        }
        let never_send = config.never_send.iter().copied().collect();
        let template = t.split("{device}").map(str::to_owned).collect();
        Ok(Policy {
            template,
            config,
            include,
            exclude,
            never_send,
        })
    }

    /// The configuration this policy was built from.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Whether the local device `device` is federated (device states enabled, included, not
    /// excluded).
    pub fn federates_device(&self, device: &str) -> bool {
        self.config.device_state
            && (self.include.is_empty() || self.include.iter().any(|r| r.is_match(device)))
            && !self.exclude.iter().any(|r| r.is_match(device))
    }

    /// Whether `state` may be sent at all.
    pub fn sends_state(&self, state: DeviceState) -> bool {
        !self.never_send.contains(&state)
    }

    /// The value actually written for `state` (UNKNOWN becomes the configured substitute).
    pub fn writable(&self, state: DeviceState) -> DeviceState {
        if state.is_writable() {
            state
        } else {
            self.config.unknown_substitute
        }
    }

    /// The local `Custom:` name of the remote device `device`.
    pub fn target_name(&self, device: &str) -> String {
        let mut out = String::new();
        self.target_name_into(device, &mut out);
        out
    }

    /// [`Policy::target_name`] written into `out` (cleared first), reusing its buffer.
    pub fn target_name_into(&self, device: &str, out: &mut String) {
        out.clear();
        for (i, part) in self.template.iter().enumerate() {
            if i > 0 {
                out.push_str(device);
            }
            out.push_str(part);
        }
    }

    /// What a down origin's devices count as.
    pub fn down_state(&self) -> DeviceState {
        self.config.down_state
    }

    /// Whether the presence key `key` is shared: presence enabled and a `CustomPresence:` key
    /// (the same name on every server; prefix compared without case, as Asterisk does).
    pub fn federates_presence(&self, key: &str) -> bool {
        self.config.presence
            && key
                .get(..PRESENCE_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(PRESENCE_PREFIX))
            && key.len() > PRESENCE_PREFIX.len()
    }

    /// Whether remote device states are applied at all.
    pub fn applies_devices(&self) -> bool {
        self.config.device_state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_federates_everything_but_custom() {
        let p = Policy::default();
        assert!(p.federates_device("PJSIP/100"));
        assert!(p.federates_device("Local/100@phones"));
        assert!(!p.federates_device("Custom:PJSIP/100"));
        assert!(
            is_custom_device("custom:x")
                && !is_custom_device("PJSIP/1")
                && !is_custom_device("Cust")
        );
        assert!(p.sends_state(DeviceState::Unknown));
        assert_eq!(p.writable(DeviceState::Unknown), DeviceState::NotInuse);
        assert_eq!(p.writable(DeviceState::Invalid), DeviceState::Invalid);
        assert_eq!(p.target_name("PJSIP/100"), "Custom:PJSIP/100");
        assert_eq!(p.down_state(), DeviceState::Unavailable);
        assert!(p.federates_presence("CustomPresence:alice"));
        assert!(p.federates_presence("custompresence:alice"));
        assert!(!p.federates_presence("CustomPresence:"));
        assert!(!p.federates_presence("XMPP/alice"));
    }

    #[test]
    fn include_exclude_never_send_and_substitute() {
        let p = Policy::new(PolicyConfig {
            include: vec!["^PJSIP/".into(), "^SIP/".into()],
            exclude: vec!["^Custom:".into(), "/9\\d\\d$".into()],
            never_send: vec![DeviceState::Unknown, DeviceState::Invalid],
            unknown_substitute: DeviceState::Unavailable,
            device_template: "Custom:remote-{device}".into(),
            ..PolicyConfig::default()
        })
        .unwrap();
        assert!(p.federates_device("PJSIP/100"));
        assert!(p.federates_device("SIP/200"));
        assert!(!p.federates_device("PJSIP/900"));
        assert!(!p.federates_device("IAX2/100"));
        assert!(!p.sends_state(DeviceState::Unknown));
        assert!(!p.sends_state(DeviceState::Invalid));
        assert!(p.sends_state(DeviceState::Inuse));
        assert_eq!(p.writable(DeviceState::Unknown), DeviceState::Unavailable);
        assert_eq!(p.target_name("PJSIP/100"), "Custom:remote-PJSIP/100");
        let twice = Policy::new(PolicyConfig {
            device_template: "Custom:{device}-{device}".into(),
            ..PolicyConfig::default()
        })
        .unwrap();
        assert_eq!(twice.target_name("a"), "Custom:a-a");
    }

    #[test]
    fn disabled_kinds() {
        let p = Policy::new(PolicyConfig {
            device_state: false,
            presence: false,
            ..PolicyConfig::default()
        })
        .unwrap();
        assert!(!p.federates_device("PJSIP/100"));
        assert!(!p.federates_presence("CustomPresence:a"));
        assert!(!p.applies_devices());
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |c: PolicyConfig| Policy::new(c).unwrap_err();
        assert!(matches!(
            bad(PolicyConfig {
                include: vec!["(".into()],
                ..Default::default()
            }),
            PolicyError::Regex { .. }
        ));
        for t in [
            "Custom:x",
            "PJSIP/{device}",
            "Custom:{device}{origin}",
            "{device}",
            "Custom:{dev}",
        ] {
            assert!(
                matches!(
                    bad(PolicyConfig {
                        device_template: t.into(),
                        ..Default::default()
                    }),
                    PolicyError::Template(_)
                ),
                "{t}"
            );
        }
        assert!(matches!(
            bad(PolicyConfig {
                unknown_substitute: DeviceState::Unknown,
                ..Default::default()
            }),
            PolicyError::Unwritable(_)
        ));
    }
}
