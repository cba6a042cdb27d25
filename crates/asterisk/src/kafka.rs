//! app_ami_kafka as an event source: the records that module writes to a Kafka topic, read
//! back as AMI [`Message`]s, filtered to this agent's own Asterisk, and turned into
//! [`PbxEvent`](crate::PbxEvent)s.
//!
//! What a record looks like (see `shared/fixtures/app_ami_kafka/`): key = the AMI event name;
//! headers `entity_id`, `system_name` (when set in asterisk.conf), `format` (`json` or `ami`),
//! and others; body either one JSON object whose values are all strings (`Event` first, then
//! `EntityID` and `SystemName`), or AMI text (`Key: Value` lines, CRLF, a trailing empty
//! line) where `EntityID` and `SystemName` come **before** `Event:` and `SystemName` appears
//! twice. [`parse_record`] takes the format from the `format` header, else from the body's
//! first byte, and never assumes the first line is `Event:`.
//!
//! Several servers publish to one topic; [`OwnServer`] keeps the records of this agent's
//! Asterisk, by `SystemName` or `EntityID` (from the body, else from the headers).
//!
//! The reader itself ([`source`], feature `kafka`, on by default; the parser here needs no
//! librdkafka, so the fuzz target builds without it) turns them into events.

use hintfed_ami::Message;

#[cfg(test)]
use crate::event::{PbxEvent, classify};
use crate::zmq::event_from_json;

#[cfg(feature = "kafka")]
#[path = "kafka/source.rs"]
pub mod source;
#[cfg(feature = "kafka")]
pub use source::{KafkaSource, KafkaSourceConfig, KafkaSourceError};

/// The body layout app_ami_kafka was configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `format = json`: one JSON object.
    Json,
    /// `format = ami`: AMI text lines.
    Ami,
}

impl BodyFormat {
    /// The value of the `format` header.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyFormat::Json => "json",
            BodyFormat::Ami => "ami",
        }
    }

    /// Reads a `format` header value.
    pub fn from_header(v: &[u8]) -> Option<Self> {
        match v.trim_ascii() {
            b"json" | b"JSON" => Some(BodyFormat::Json),
            b"ami" | b"AMI" => Some(BodyFormat::Ami),
            _ => None,
        }
    }
}

/// Why a record body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the limit.
    #[error("record body of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not UTF-8 (AMI format).
    #[error("AMI body is not UTF-8")]
    NotUtf8,
    /// The JSON body is not a JSON object.
    #[error("JSON body unreadable: {0}")]
    Json(String),
    /// An AMI line has no `:`.
    #[error("AMI line without a colon: {0:?}")]
    NoColon(String),
    /// The body names no `Event`.
    #[error("no Event header")]
    NoEvent,
}

/// One record of app_ami_kafka, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaEvent {
    /// The AMI event, headers in body order (so `SystemName` may appear twice).
    pub message: Message,
    /// `EntityID` from the body, else the `entity_id` header.
    pub entity_id: Option<String>,
    /// `SystemName` from the body, else the `system_name` header.
    pub system_name: Option<String>,
    /// The body layout.
    pub format: BodyFormat,
}

/// Largest record body read by default (64 KiB); larger ones are dropped and counted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Parses an AMI-format body: `Key: Value` lines (CRLF or LF), blank lines ignored, header
/// order kept, `Event` anywhere.
pub fn parse_ami_body(body: &[u8]) -> Result<Message, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let mut msg = Message::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(BodyError::NoColon(line.chars().take(80).collect()));
        };
        msg.push(k.trim(), v.strip_prefix(' ').unwrap_or(v));
    }
    Ok(msg)
}

/// Parses one record body. `format` comes from the `format` header when present; without
/// it a body starting with `{` (after whitespace) is JSON, anything else AMI text.
pub fn parse_body(
    body: &[u8],
    format: Option<BodyFormat>,
    max_bytes: usize,
) -> Result<(Message, BodyFormat), BodyError> {
    if body.len() > max_bytes {
        return Err(BodyError::TooLarge {
            len: body.len(),
            max: max_bytes,
        });
    }
    let format = format.unwrap_or_else(|| {
        if body.trim_ascii_start().first() == Some(&b'{') {
            BodyFormat::Json
        } else {
            BodyFormat::Ami
        }
    });
    let msg = match format {
        BodyFormat::Json => event_from_json(body).map_err(|e| BodyError::Json(e.to_string()))?,
        BodyFormat::Ami => parse_ami_body(body)?,
    };
    if msg.event().is_none_or(str::is_empty) {
        return Err(BodyError::NoEvent);
    }
    Ok((msg, format))
}

fn header_str<'a>(headers: &'a [(&str, &[u8])], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Reads one record: its headers (name, value) and body. The record key (the event name) is
/// not needed: the body names the event.
pub fn parse_record(
    headers: &[(&str, &[u8])],
    body: &[u8],
    max_bytes: usize,
) -> Result<KafkaEvent, BodyError> {
    let hinted = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("format"))
        .and_then(|(_, v)| BodyFormat::from_header(v));
    let (message, format) = parse_body(body, hinted, max_bytes)?;
    let pick = |body_key: &str, header: &str| {
        message
            .get(body_key)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .or_else(|| header_str(headers, header))
            .map(str::to_owned)
    };
    Ok(KafkaEvent {
        entity_id: pick("EntityID", "entity_id"),
        system_name: pick("SystemName", "system_name"),
        message,
        format,
    })
}

/// Which server's records are this agent's: by `SystemName`, by `EntityID`, or both (either
/// matching is enough).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnServer {
    /// `systemname` of asterisk.conf.
    pub system_name: Option<String>,
    /// `entityid` of asterisk.conf (a MAC address; compared ignoring case).
    pub entity_id: Option<String>,
}

impl OwnServer {
    /// Whether `ev` comes from this server.
    pub fn matches(&self, ev: &KafkaEvent) -> bool {
        let by_name = matches!((&self.system_name, &ev.system_name), (Some(a), Some(b)) if a == b);
        let by_id = matches!((&self.entity_id, &ev.entity_id),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b));
        by_name || by_id
    }

    /// Whether anything identifies the server.
    pub fn is_set(&self) -> bool {
        self.system_name.is_some() || self.entity_id.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hintfed_ami::{DeviceStateChange, PresenceStateChange};

    const JSON: &str = include_str!("../../../../shared/fixtures/app_ami_kafka/json-format.jsonl");
    const AMI: &str = include_str!("../../../../shared/fixtures/app_ami_kafka/ami-format.jsonl");

    struct Rec {
        key: String,
        headers: Vec<(String, String)>,
        value: String,
    }

    fn records(text: &str) -> Vec<Rec> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("capture line");
                Rec {
                    key: v["key"].as_str().expect("key").to_owned(),
                    headers: v["headers"]
                        .as_object()
                        .expect("headers")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().expect("str").to_owned()))
                        .collect(),
                    value: v["value"].as_str().expect("value").to_owned(),
                }
            })
            .collect()
    }

    fn parse(r: &Rec) -> KafkaEvent {
        let h: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        parse_record(&h, r.value.as_bytes(), MAX_BODY_BYTES).expect("record parses")
    }

    #[test]
    fn every_captured_record_parses_in_both_formats() {
        for (text, fmt) in [(JSON, BodyFormat::Json), (AMI, BodyFormat::Ami)] {
            let recs = records(text);
            assert!(!recs.is_empty());
            for r in &recs {
                let ev = parse(r);
                assert_eq!(ev.format, fmt);
                // The record key is the event name.
                assert_eq!(ev.message.event(), Some(r.key.as_str()));
                assert_eq!(ev.system_name.as_deref(), Some("pbx-k"));
                assert_eq!(ev.entity_id.as_deref(), Some("00:11:22:33:44:d4"));
                // Same answer without the format header (sniffed from the body).
                let h: Vec<(&str, &[u8])> = r
                    .headers
                    .iter()
                    .filter(|(k, _)| k != "format")
                    .map(|(k, v)| (k.as_str(), v.as_bytes()))
                    .collect();
                let sniffed = parse_record(&h, r.value.as_bytes(), MAX_BODY_BYTES).expect("sniff");
                assert_eq!(sniffed, ev);
            }
        }
    }

    #[test]
    fn ami_format_keeps_identity_before_event_and_both_system_names() {
        let recs = records(AMI);
        let r = recs
            .iter()
            .find(|r| r.key == "DeviceStateChange")
            .expect("a device record");
        assert!(r.value.starts_with("EntityID: "));
        let ev = parse(r);
        assert_eq!(ev.message.header(0).map(|h| h.0), Some("EntityID"));
        assert_eq!(ev.message.get_all("SystemName").count(), 2);
        let d = DeviceStateChange::from_message(&ev.message).expect("device event");
        assert_eq!(d.device, "Local/100@phones");
    }

    #[test]
    fn device_and_presence_events_match_between_formats() {
        let pick = |text: &str| -> (Vec<PbxEvent>, Vec<PresenceStateChange>) {
            let mut dev = Vec::new();
            let mut pres = Vec::new();
            for r in records(text) {
                match classify(&parse(&r).message) {
                    Some(e @ PbxEvent::Device(_)) => dev.push(e),
                    Some(PbxEvent::Presence(p)) => pres.push(p),
                    _ => {}
                }
            }
            (dev, pres)
        };
        let (jd, jp) = pick(JSON);
        let (ad, ap) = pick(AMI);
        assert_eq!(jd.len(), 29);
        assert_eq!(ad.len(), 4);
        assert_eq!(jp.len(), 2);
        assert_eq!(ap.len(), 1);
        // Commas inside presence values survive both layouts.
        assert_eq!(ap[0].subtype, "meeting, room 4");
        assert_eq!(ap[0].message, "in a meeting, sorry");
        assert!(jp.iter().any(|p| p.subtype == "meeting, room 4"));
        assert!(
            matches!(&jd[0], PbxEvent::Device(d) if d.device == "Custom:dnd300" || d.device.starts_with("Local/"))
        );
    }

    #[test]
    fn own_server_filter() {
        let recs = records(JSON);
        let ev = parse(&recs[0]);
        let by_name = OwnServer {
            system_name: Some("pbx-k".into()),
            entity_id: None,
        };
        let by_id = OwnServer {
            system_name: None,
            entity_id: Some("00:11:22:33:44:D4".into()),
        };
        let other = OwnServer {
            system_name: Some("pbx-z".into()),
            entity_id: Some("00:00:00:00:00:01".into()),
        };
        assert!(by_name.matches(&ev));
        assert!(by_id.matches(&ev));
        assert!(!other.matches(&ev));
        assert!(!OwnServer::default().is_set());
    }

    #[test]
    fn identity_falls_back_to_headers() {
        let body = b"Event: DeviceStateChange\r\nDevice: PJSIP/1\r\nState: INUSE\r\n\r\n";
        let h: Vec<(&str, &[u8])> = vec![("system_name", b"pbx-q"), ("entity_id", b"aa")];
        let ev = parse_record(&h, body, MAX_BODY_BYTES).expect("parses");
        assert_eq!(ev.system_name.as_deref(), Some("pbx-q"));
        assert_eq!(ev.entity_id.as_deref(), Some("aa"));
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"no colon here",
            b"\xff\xfe: x",
            b"Device: x\r\n",
            b"{\"Device\":\"x\"}",
        ] {
            assert!(parse_record(&[], body, MAX_BODY_BYTES).is_err(), "{body:?}");
        }
        let big = vec![b'a'; 100];
        assert!(matches!(
            parse_record(&[], &big, 10),
            Err(BodyError::TooLarge { .. })
        ));
    }
}
