//! The zmq-ami-broker wire format (sans-IO), for the compatibility sockets.
//!
//! A message is two frames: `[target]` (`[*]` for everyone, `[<name>]` for one agent) and a
//! JSON object `{"msg_type": ..., "uuid": ..., "origin": ..., "x_data": {...}}` (its util.py).
//! [`parse`] checks a received message and [`LegacyMessage::device_change`] extracts a
//! `DeviceStateChange` as the original agents replicated it (never `Custom:` devices, never
//! `UNKNOWN`); [`device_event`] builds the `AsteriskEvent` legacy agents apply.

use bytes::Bytes;
use hintfed_core::DeviceState;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Largest legacy message accepted (both frames), bytes.
pub const MAX_LEGACY_BYTES: usize = 16 * 1024;
/// Longest legacy target frame, bytes.
const MAX_TARGET: usize = 256;

/// Why a legacy message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyError {
    /// Not exactly two frames.
    #[error("expected 2 frames, got {0}")]
    Frames(usize),
    /// Larger than [`MAX_LEGACY_BYTES`].
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// The target frame is not `[...]` text.
    #[error("bad target frame")]
    Target,
    /// The body is not a JSON object with string `msg_type` and `origin`.
    #[error("bad body: {0}")]
    Body(String),
}

impl LegacyError {
    /// Counter label: `legacy_too_large` or `legacy_malformed`.
    pub fn reason(&self) -> &'static str {
        match self {
            LegacyError::TooLarge(_) => "legacy_too_large",
            _ => "legacy_malformed",
        }
    }
}

#[derive(Deserialize)]
struct Body {
    msg_type: String,
    origin: String,
    #[serde(default)]
    x_data: Option<Value>,
}

/// A well-formed legacy message.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyMessage {
    /// The target frame without brackets (`*` or an agent name).
    pub target: String,
    /// `AsteriskEvent`, `AsteriskAction`, `AgentPing`, ...
    pub msg_type: String,
    /// The sending agent's name (its Asterisk system name).
    pub origin: String,
    /// The payload object, if any.
    pub x_data: Option<Value>,
}

/// What a legacy message means for the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// A device state to federate.
    State {
        /// Device name, e.g. `SIP/100`.
        device: String,
        /// Its state.
        state: DeviceState,
    },
    /// A device state the original agents never replicated (`Custom:` device or `UNKNOWN`).
    Skipped,
    /// A `DeviceStateChange` whose state is not an Asterisk device state.
    BadState,
    /// Not a device state change.
    NotDevice,
}

/// Checks one received legacy message (frames as received on the PULL).
pub fn parse(frames: &[Bytes]) -> Result<LegacyMessage, LegacyError> {
    let size: usize = frames.iter().map(Bytes::len).sum();
    if size > MAX_LEGACY_BYTES {
        return Err(LegacyError::TooLarge(size));
    }
    let [target, body] = frames else {
        return Err(LegacyError::Frames(frames.len()));
    };
    let target = std::str::from_utf8(target).map_err(|_| LegacyError::Target)?;
    let target = target
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .filter(|t| !t.is_empty() && t.len() <= MAX_TARGET && !t.chars().any(char::is_control))
        .ok_or(LegacyError::Target)?;
    let body: Body = serde_json::from_slice(body).map_err(|e| LegacyError::Body(e.to_string()))?;
    if body.origin.is_empty() {
        return Err(LegacyError::Body("empty origin".into()));
    }
    Ok(LegacyMessage {
        target: target.to_owned(),
        msg_type: body.msg_type,
        origin: body.origin,
        x_data: body.x_data,
    })
}

impl LegacyMessage {
    /// The device state change it carries, by the original agents' rules.
    pub fn device_change(&self) -> DeviceChange {
        if self.msg_type != "AsteriskEvent" {
            return DeviceChange::NotDevice;
        }
        let Some(x) = self.x_data.as_ref().and_then(Value::as_object) else {
            return DeviceChange::NotDevice;
        };
        if x.get("Event").and_then(Value::as_str) != Some("DeviceStateChange") {
            return DeviceChange::NotDevice;
        }
        let (Some(device), Some(state)) = (
            x.get("Device").and_then(Value::as_str),
            x.get("State").and_then(Value::as_str),
        ) else {
            return DeviceChange::BadState;
        };
        if device.is_empty() {
            return DeviceChange::BadState;
        }
        if device.starts_with("Custom:") {
            return DeviceChange::Skipped;
        }
        match state.parse::<DeviceState>() {
            Ok(DeviceState::Unknown) => DeviceChange::Skipped,
            Ok(state) => DeviceChange::State {
                device: device.to_owned(),
                state,
            },
            Err(_) => DeviceChange::BadState,
        }
    }
}

/// The `AsteriskEvent` telling every legacy agent (`[*]`) that `device` of `origin` is in
/// `state`.
pub fn device_event(origin: &str, device: &str, state: DeviceState) -> Vec<Bytes> {
    let mut x = Map::new();
    x.insert("Event".into(), "DeviceStateChange".into());
    x.insert("Device".into(), device.into());
    x.insert("State".into(), state.as_str().into());
    let mut m = Map::new();
    m.insert("msg_type".into(), "AsteriskEvent".into());
    m.insert(
        "uuid".into(),
        format!("{:032x}", rand::random::<u128>()).into(),
    );
    m.insert("origin".into(), origin.into());
    m.insert("x_data".into(), Value::Object(x));
    vec![
        Bytes::from_static(b"[*]"),
        Bytes::from(Value::Object(m).to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> Vec<Bytes> {
        vec![Bytes::from_static(b"[*]"), Bytes::from(body.to_owned())]
    }

    #[test]
    fn parses_the_util_py_format() {
        let m = parse(&msg(
            r#"{"msg_type": "AsteriskEvent", "uuid": "ab12", "origin": "Moscow", "x_data": {"Event": "DeviceStateChange", "Device": "SIP/100", "State": "INUSE"}}"#,
        ))
        .expect("valid");
        assert_eq!(m.target, "*");
        assert_eq!(m.origin, "Moscow");
        assert_eq!(
            m.device_change(),
            DeviceChange::State {
                device: "SIP/100".into(),
                state: DeviceState::Inuse
            }
        );
    }

    #[test]
    fn skips_what_the_original_agents_skipped() {
        let custom = r#"{"msg_type":"AsteriskEvent","uuid":"1","origin":"M","x_data":{"Event":"DeviceStateChange","Device":"Custom:SIP/1","State":"INUSE"}}"#;
        let unknown = r#"{"msg_type":"AsteriskEvent","uuid":"1","origin":"M","x_data":{"Event":"DeviceStateChange","Device":"SIP/1","State":"UNKNOWN"}}"#;
        let bad = r#"{"msg_type":"AsteriskEvent","uuid":"1","origin":"M","x_data":{"Event":"DeviceStateChange","Device":"SIP/1","State":"DARK"}}"#;
        let ping = r#"{"msg_type":"AgentPing","uuid":"1","origin":"M","x_data":{}}"#;
        let other = r#"{"msg_type":"AsteriskEvent","uuid":"1","origin":"M","x_data":{"Event":"Newchannel"}}"#;
        for (body, want) in [
            (custom, DeviceChange::Skipped),
            (unknown, DeviceChange::Skipped),
            (bad, DeviceChange::BadState),
            (ping, DeviceChange::NotDevice),
            (other, DeviceChange::NotDevice),
        ] {
            assert_eq!(
                parse(&msg(body)).expect(body).device_change(),
                want,
                "{body}"
            );
        }
    }

    #[test]
    fn rejects_malformed_messages() {
        assert_eq!(parse(&[]), Err(LegacyError::Frames(0)));
        assert_eq!(
            parse(&[Bytes::from_static(b"{}")]),
            Err(LegacyError::Frames(1))
        );
        assert_eq!(
            parse(&[Bytes::from_static(b"*"), Bytes::from_static(b"{}")]),
            Err(LegacyError::Target)
        );
        assert!(matches!(parse(&msg("not json")), Err(LegacyError::Body(_))));
        assert!(matches!(parse(&msg("[1,2]")), Err(LegacyError::Body(_))));
        assert!(matches!(
            parse(&msg(r#"{"msg_type":"AsteriskEvent","origin":""}"#)),
            Err(LegacyError::Body(_))
        ));
        let big = "x".repeat(MAX_LEGACY_BYTES + 1);
        assert!(matches!(parse(&msg(&big)), Err(LegacyError::TooLarge(_))));
        assert_eq!(parse(&msg(&big)).unwrap_err().reason(), "legacy_too_large");
        assert_eq!(
            parse(&[Bytes::from_static(b"\xff\xfe"), Bytes::new()]),
            Err(LegacyError::Target)
        );
    }

    #[test]
    fn builds_events_legacy_agents_apply() {
        let frames = device_event("pbx-a", "PJSIP/100", DeviceState::Busy);
        assert_eq!(frames[0].as_ref(), b"[*]");
        let m = parse(&frames).expect("round trip");
        assert_eq!(m.msg_type, "AsteriskEvent");
        assert_eq!(m.origin, "pbx-a");
        assert_eq!(
            m.device_change(),
            DeviceChange::State {
                device: "PJSIP/100".into(),
                state: DeviceState::Busy
            }
        );
        let v: Value = serde_json::from_slice(&frames[1]).expect("json");
        assert_eq!(v["uuid"].as_str().map(str::len), Some(32));
    }
}
