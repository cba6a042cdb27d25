//! The one versioned message type on the wire: [`Envelope`] (`v`, `origin`, `epoch`, `seq`,
//! `body`), its [`Body`] variants, and structural validation against [`Limits`]. Signing and
//! the replay guard live in [`crate::auth`].
//!
//! Two classes of bodies exist:
//! - **stream** bodies ([`Body::is_stream`]: update, full-sync begin/end, heartbeat,
//!   origin-down) form an origin's sequenced stream: each consumes the next `seq` of
//!   `(origin, epoch)` (starting at 1), hubs forward them unchanged to every subscriber, and
//!   replays are rejected by `(origin, epoch, seq)`;
//! - **control** bodies (hello, snapshot request/chunk/end, resync request) are point-to-point
//!   requests and answers. They carry the sender's current last stream `seq` without consuming
//!   one, are not replay-checked by sequence, and answers are matched by `request_id`.

use serde::{Deserialize, Serialize};

use crate::hlc::HlcTimestamp;
use crate::liveness::DownReason;
use crate::state::{DeviceState, Kind, Value};
use crate::time::Epoch;

/// The wire version this crate speaks.
pub const WIRE_VERSION: u32 = 1;

/// Size limits enforced on every decoded message (and checked before sending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted wire message in bytes (the whole signed frame). Default 64 KiB.
    pub max_message_bytes: usize,
    /// Longest origin name in bytes. Default 128.
    pub max_origin_len: usize,
    /// Longest state key (device or presentity name) in bytes. Default 512.
    pub max_key_len: usize,
    /// Longest free text (presence subtype/message, reasons) in bytes. Default 1024.
    pub max_text_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_origin_len: 128,
            max_key_len: 512,
            max_text_len: 1024,
        }
    }
}

/// One update of one key by the envelope's origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Device name as the origin knows it (e.g. `PJSIP/100`), or the presentity
    /// (`CustomPresence:alice`, shared by every server).
    pub key: String,
    /// The new value; its variant gives the kind.
    pub value: Value,
    /// Hybrid logical clock timestamp of the change (orders presence writes).
    pub ts: HlcTimestamp,
}

impl Update {
    /// The kind of the updated key.
    pub fn kind(&self) -> Kind {
        self.value.kind()
    }
}

/// One entry of a snapshot: the latest update the hub holds for `(origin, key)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Origin that published it.
    pub origin: String,
    /// That origin's epoch at the time.
    pub epoch: Epoch,
    /// Stream sequence of the update.
    pub seq: u64,
    /// The key.
    pub key: String,
    /// The value.
    pub value: Value,
    /// The update's timestamp.
    pub ts: HlcTimestamp,
}

/// What a hub knows about one origin, sent with a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginSummary {
    /// Origin name.
    pub origin: String,
    /// Its current epoch.
    pub epoch: Epoch,
    /// Highest stream sequence seen in that epoch (the snapshot covers everything up to it).
    pub last_seq: u64,
    /// Why the origin is down, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<DownReason>,
    /// Where the origin's last full sync in `epoch` began: its device entries older than
    /// that are gone (a receiver that missed part of that full sync drops them only now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<u64>,
}

/// The role of a peer announcing itself with [`Body::Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// hintfed-agent beside one Asterisk.
    Agent,
    /// hintfed-server.
    Hub,
    /// hintfed-broker relay.
    Broker,
    /// A read-only consumer (monitoring, tests).
    Observer,
}

/// Defines [`Body`] (serialised by derive) and `BodyDef`, the derived internally tagged
/// decoding of the same variants (serde's `remote` form: it builds a `Body`), from one list.
macro_rules! define_body {
    (
        $(#[$meta:meta])*
        pub enum Body {
            $(
                $(#[$vmeta:meta])*
                $variant:ident $( ( $($tuple:tt)* ) )? $( { $($named:tt)* } )?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum Body {
            $(
                $(#[$vmeta])*
                $variant $( ( $($tuple)* ) )? $( { $($named)* } )?
            ),*
        }

        /// [`Body`] as the derived internally tagged decoding sees it (the general path of
        /// its `Deserialize`).
        #[derive(Deserialize)]
        #[serde(remote = "Body", tag = "type", rename_all = "snake_case")]
        enum BodyDef {
            $(
                $(#[$vmeta])*
                $variant $( ( $($tuple)* ) )? $( { $($named)* } )?
            ),*
        }
    };
}

define_body! {
/// The payload of an envelope. JSON form: an object with `"type"` (snake_case variant name)
/// and the variant's fields, e.g. `{"type":"full_sync_end","begin_seq":7}`.
///
/// Decoding an update or a snapshot chunk whose `"type"` comes first (as this crate writes
/// it) reads the fields straight into the variant; everything else is buffered and decoded as the derived
/// internally tagged form (`BodyDef`, serde's `remote` derive of the same variants, made from
/// the same list by `define_body!`), which is what serde does for every internally tagged enum.
    pub enum Body {
    /// Stream: a key changed at the origin.
    Update(Update),
    /// Stream: the origin's complete state follows (its seq is the `begin_seq` of the end).
    FullSyncBegin,
    /// Stream: the full sync that began at `begin_seq` is complete: every device key of this
    /// origin not updated since `begin_seq` no longer exists and is dropped.
    FullSyncEnd {
        /// Sequence of the matching [`Body::FullSyncBegin`].
        begin_seq: u64,
    },
    /// Stream: the origin is alive (its envelope seq is its last seq).
    Heartbeat {
        /// True while the origin has lost its Asterisk (its devices count as down).
        #[serde(default)]
        local_down: bool,
    },
    /// Stream: `origin` is down. Sent by an origin about itself (lost its Asterisk), or by a
    /// hub about an origin that fell silent.
    OriginDown {
        /// The origin that is down.
        origin: String,
        /// Its epoch as last seen.
        epoch: Epoch,
        /// Its last stream sequence seen by the sender.
        last_seq: u64,
        /// Human-readable reason.
        reason: String,
    },
    /// Control: a peer introduces itself to a hub.
    Hello {
        /// What the peer is.
        role: Role,
        /// Software name and version, informational.
        #[serde(default)]
        software: String,
    },
    /// Control: ask a hub for its whole table.
    SnapshotRequest {
        /// Correlates the answer.
        request_id: u64,
    },
    /// Control: part of a snapshot answer (bounded in size by construction).
    SnapshotChunk {
        /// The request answered.
        request_id: u64,
        /// Position of this chunk in the answer, from 0 (duplicates are recognised by it).
        #[serde(default)]
        index: u32,
        /// Table entries.
        #[serde(default)]
        entries: Vec<SnapshotEntry>,
        /// Origin summaries (applied only once the whole snapshot arrived).
        #[serde(default)]
        origins: Vec<OriginSummary>,
    },
    /// Control: the snapshot is complete.
    SnapshotEnd {
        /// The request answered.
        request_id: u64,
        /// Number of chunks sent before this end (lets the receiver detect a lost chunk).
        chunks: u32,
    },
    /// Control: a hub asks `origin` to republish its full state (it missed part of its stream
    /// or restarted).
    ResyncRequest {
        /// The origin asked.
        origin: String,
    },
    }
}

/// A map key or tag value: the one this decoder looks for, or any other text.
enum Word {
    Wanted,
    Other(String),
}

struct WordSeed(&'static str);

impl<'de> serde::de::DeserializeSeed<'de> for WordSeed {
    type Value = Word;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Word, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for WordSeed {
    type Value = Word;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Word, E> {
        Ok(if v == self.0 {
            Word::Wanted
        } else {
            Word::Other(v.to_owned())
        })
    }
}

/// The fields of [`Body::SnapshotChunk`] after its `"type"`, decoded straight from the
/// message (the buffered general path copies every entry twice, into a `serde_json::Value`
/// and then into serde's content buffer: most of a snapshot's decoding time). Same fields,
/// defaults and unknown-field tolerance as the derived variant.
#[derive(Deserialize)]
struct ChunkFields {
    request_id: u64,
    #[serde(default)]
    index: u32,
    #[serde(default)]
    entries: Vec<SnapshotEntry>,
    #[serde(default)]
    origins: Vec<OriginSummary>,
    /// A second `"type"`, refused as the general path refuses a duplicate field.
    #[serde(default, rename = "type")]
    again: Present,
}

/// Whether a field was present (whatever its value).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

struct BodyVisitor;

impl<'de> serde::de::Visitor<'de> for BodyVisitor {
    type Value = Body;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an envelope body (an object with \"type\")")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
        use serde::de::Error as _;
        let mut buffered = serde_json::Map::new();
        match map.next_key_seed(WordSeed("type"))? {
            Some(Word::Wanted) => match map.next_value_seed(WordSeed("update"))? {
                Word::Wanted => {
                    let d = serde::de::value::MapAccessDeserializer::new(map);
                    return Update::deserialize(d).map(Body::Update);
                }
                Word::Other(tag) if tag == "snapshot_chunk" => {
                    let d = serde::de::value::MapAccessDeserializer::new(map);
                    let c = ChunkFields::deserialize(d)?;
                    if c.again.0 {
                        return Err(A::Error::custom("duplicate field `type`"));
                    }
                    return Ok(Body::SnapshotChunk {
                        request_id: c.request_id,
                        index: c.index,
                        entries: c.entries,
                        origins: c.origins,
                    });
                }
                Word::Other(tag) => {
                    buffered.insert("type".to_owned(), serde_json::Value::String(tag));
                }
            },
            Some(Word::Other(key)) => {
                let v: serde_json::Value = map.next_value()?;
                buffered.insert(key, v);
            }
            None => {}
        }
        while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
            if buffered.contains_key(&k) {
                return Err(A::Error::custom(format_args!("duplicate field `{k}`")));
            }
            buffered.insert(k, v);
        }
        BodyDef::deserialize(serde_json::Value::Object(buffered)).map_err(A::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(BodyVisitor)
    }
}

impl Body {
    /// Whether this body belongs to the origin's sequenced stream (see the module docs).
    pub fn is_stream(&self) -> bool {
        matches!(
            self,
            Body::Update(_)
                | Body::FullSyncBegin
                | Body::FullSyncEnd { .. }
                | Body::Heartbeat { .. }
                | Body::OriginDown { .. }
        )
    }

    /// A short name for logs and metrics labels (the JSON `type`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Body::Update(_) => "update",
            Body::FullSyncBegin => "full_sync_begin",
            Body::FullSyncEnd { .. } => "full_sync_end",
            Body::Heartbeat { .. } => "heartbeat",
            Body::OriginDown { .. } => "origin_down",
            Body::Hello { .. } => "hello",
            Body::SnapshotRequest { .. } => "snapshot_request",
            Body::SnapshotChunk { .. } => "snapshot_chunk",
            Body::SnapshotEnd { .. } => "snapshot_end",
            Body::ResyncRequest { .. } => "resync_request",
        }
    }
}

/// The federation message. JSON form:
/// `{"v":1,"origin":"pbx-a","epoch":1763880000000,"seq":5,"body":{"type":"update",...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Wire version, [`WIRE_VERSION`].
    pub v: u32,
    /// Sender (an Asterisk server's origin name, or a hub's name).
    pub origin: String,
    /// Sender's epoch.
    pub epoch: Epoch,
    /// Stream sequence (consumed by stream bodies, current last seq for control bodies).
    pub seq: u64,
    /// Payload.
    pub body: Body,
}

/// Reads the one layout [`crate::auth::KeyRing::seal`] writes for a device update (what
/// agents send by the tens of thousands per second), without serde:
///
/// `{"v":1,"origin":"<s>","epoch":<n>,"seq":<n>,"body":{"type":"update","key":"<s>",
/// "value":{"device":"<STATE>"},"ts":{"wall":<n>,"counter":<n>}}}`
///
/// Strings without escapes or control characters (valid UTF-8), numbers without sign,
/// fraction, exponent or leading zero that fit their field. That is valid JSON which the
/// derived decoding reads to the same envelope, so accepting it here changes nothing; any
/// other message (another body, field order, spacing, escapes, a number out of range) gives
/// `None` and is left to serde, which accepts or rejects it as before.
///
/// Read into `env`, reusing the room of its origin and (when it holds an update) key: no
/// allocation per message once they are long enough. False, leaving `env` as it was, for
/// any other message.
pub(crate) fn decode_device_update_into(raw: &[u8], env: &mut Envelope) -> bool {
    let Some((origin, epoch, seq, key, state, ts)) = parse_device_update(raw) else {
        return false;
    };
    env.v = WIRE_VERSION;
    env.origin.clear();
    env.origin.push_str(origin);
    env.epoch = Epoch(epoch);
    env.seq = seq;
    let value = Value::Device(state);
    match &mut env.body {
        Body::Update(u) => {
            u.key.clear();
            u.key.push_str(key);
            u.value = value;
            u.ts = ts;
        }
        body => {
            *body = Body::Update(Update {
                key: key.to_owned(),
                value,
                ts,
            })
        }
    }
    true
}

/// The fields of a device update in the layout of [`decode_device_update_into`].
fn parse_device_update(raw: &[u8]) -> Option<(&str, u64, u64, &str, DeviceState, HlcTimestamp)> {
    let mut c = Canonical(raw);
    c.lit(br#"{"v":1,"origin":""#)?;
    let origin = c.text()?;
    c.lit(br#","epoch":"#)?;
    let epoch = c.number()?;
    c.lit(br#","seq":"#)?;
    let seq = c.number()?;
    c.lit(br#","body":{"type":"update","key":""#)?;
    let key = c.text()?;
    c.lit(br#","value":{"device":""#)?;
    let state = exact_device_state(c.bytes()?)?;
    c.lit(br#"},"ts":{"wall":"#)?;
    let wall = c.number()?;
    c.lit(br#","counter":"#)?;
    let counter = u32::try_from(c.number()?).ok()?;
    c.lit(b"}}}")?;
    if !c.0.is_empty() {
        return None;
    }
    Some((
        origin,
        epoch,
        seq,
        key,
        state,
        HlcTimestamp { wall, counter },
    ))
}

/// Writes a device update in the layout [`decode_device_update_into`] reads, the bytes
/// `serde_json::to_vec` writes for it, without serde (what an agent seals for every change
/// of its Asterisk); false, writing nothing, for any other envelope and for an origin or key
/// that JSON escapes (`"`, `\`, control characters), left to serde.
pub(crate) fn encode_device_update(env: &Envelope, out: &mut Vec<u8>) -> bool {
    let Body::Update(Update {
        key,
        value: Value::Device(state),
        ts,
    }) = &env.body
    else {
        return false;
    };
    let plain = |s: &str| !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
    if !(plain(&env.origin) && plain(key)) {
        return false;
    }
    out.extend_from_slice(br#"{"v":"#);
    push_number(out, u64::from(env.v));
    out.extend_from_slice(br#","origin":""#);
    out.extend_from_slice(env.origin.as_bytes());
    out.extend_from_slice(br#"","epoch":"#);
    push_number(out, env.epoch.0);
    out.extend_from_slice(br#","seq":"#);
    push_number(out, env.seq);
    out.extend_from_slice(br#","body":{"type":"update","key":""#);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(br#"","value":{"device":""#);
    out.extend_from_slice(state.as_str().as_bytes());
    out.extend_from_slice(br#""},"ts":{"wall":"#);
    push_number(out, ts.wall);
    out.extend_from_slice(br#","counter":"#);
    push_number(out, u64::from(ts.counter));
    out.extend_from_slice(b"}}}");
    true
}

/// Appends `n` in decimal.
fn push_number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// The device state spelled exactly `s` (the case `seal` writes), told apart by length and
/// first byte and then compared once: a search of [`DeviceState::ALL`] compared up to three
/// names per message.
fn exact_device_state(s: &[u8]) -> Option<DeviceState> {
    let state = match (s.len(), s.first()?) {
        (4, _) => DeviceState::Busy,
        (5, _) => DeviceState::Inuse,
        (6, _) => DeviceState::Onhold,
        (7, b'I') => DeviceState::Invalid,
        (7, b'R') => DeviceState::Ringing,
        (7, b'U') => DeviceState::Unknown,
        (9, b'N') => DeviceState::NotInuse,
        (9, b'R') => DeviceState::Ringinuse,
        (11, _) => DeviceState::Unavailable,
        _ => return None,
    };
    (state.as_str().as_bytes() == s).then_some(state)
}

/// The unread rest of a message, for [`decode_device_update_into`].
struct Canonical<'a>(&'a [u8]);

impl<'a> Canonical<'a> {
    /// Skips `s`, which must come next.
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        self.0 = self.0.strip_prefix(s)?;
        Some(())
    }

    /// The bytes up to the next `"` (which is skipped): no escape, no control character.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let end = self
            .0
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if self.0[end] != b'"' {
            return None;
        }
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(s)
    }

    /// [`Canonical::bytes`] that are valid UTF-8.
    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    /// An unsigned integer in JSON's form (no leading zero) that fits a `u64`, followed by
    /// something other than a digit.
    fn number(&mut self) -> Option<u64> {
        let len = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        let digits = &self.0[..len];
        if len == 0 || (len > 1 && digits[0] == b'0') {
            return None;
        }
        let mut n: u64 = 0;
        for d in digits {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.0 = &self.0[len..];
        Some(n)
    }
}

/// Why an envelope's content is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEnvelope {
    /// A name or key is empty.
    #[error("empty {0}")]
    Empty(&'static str),
    /// A field exceeds its limit.
    #[error("{field} too long ({len} > {max} bytes)")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A name or key holds a control character (would break AMI framing).
    #[error("control character in {0}")]
    ControlChar(&'static str),
    /// A stream envelope with sequence 0 (stream sequences start at 1).
    #[error("stream envelope with seq 0")]
    ZeroSeq,
}

fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), InvalidEnvelope> {
    if s.is_empty() {
        return Err(InvalidEnvelope::Empty(field));
    }
    check_text(field, s, max)?;
    // ASCII's control characters are its C0 range and DEL (what `char::is_control` says of
    // them), checked bytewise; other text char by char (C1 controls).
    let control = if s.is_ascii() {
        s.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        s.chars().any(char::is_control)
    };
    if control {
        return Err(InvalidEnvelope::ControlChar(field));
    }
    Ok(())
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), InvalidEnvelope> {
    if s.len() > max {
        return Err(InvalidEnvelope::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn check_value(v: &Value, limits: &Limits) -> Result<(), InvalidEnvelope> {
    if let Value::Presence(p) = v {
        check_text("presence subtype", &p.subtype, limits.max_text_len)?;
        check_text("presence message", &p.message, limits.max_text_len)?;
    }
    Ok(())
}

impl Envelope {
    /// An envelope of the current wire version.
    pub fn new(origin: impl Into<String>, epoch: Epoch, seq: u64, body: Body) -> Self {
        Envelope {
            v: WIRE_VERSION,
            origin: origin.into(),
            epoch,
            seq,
            body,
        }
    }

    /// An envelope to decode into ([`crate::open_into`], [`crate::Verifier::verify_into`]):
    /// empty strings, nothing allocated.
    pub fn empty() -> Self {
        Envelope::new(String::new(), Epoch(0), 0, Body::FullSyncBegin)
    }

    /// Whether this is a stream envelope ([`Body::is_stream`]).
    pub fn is_stream(&self) -> bool {
        self.body.is_stream()
    }

    /// Checks names, keys and texts against `limits` (non-empty, bounded, no control
    /// characters in names and keys). Decoding calls this; so should anyone building
    /// envelopes from untrusted input.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidEnvelope> {
        check_name("origin", &self.origin, limits.max_origin_len)?;
        if self.is_stream() && self.seq == 0 {
            return Err(InvalidEnvelope::ZeroSeq);
        }
        match &self.body {
            Body::Update(u) => {
                check_name("key", &u.key, limits.max_key_len)?;
                check_value(&u.value, limits)?;
            }
            Body::OriginDown { origin, reason, .. } => {
                check_name("origin", origin, limits.max_origin_len)?;
                check_text("reason", reason, limits.max_text_len)?;
            }
            Body::Hello { software, .. } => check_text("software", software, limits.max_text_len)?,
            Body::SnapshotChunk {
                entries, origins, ..
            } => {
                for e in entries {
                    check_name("origin", &e.origin, limits.max_origin_len)?;
                    check_name("key", &e.key, limits.max_key_len)?;
                    check_value(&e.value, limits)?;
                }
                for o in origins {
                    check_name("origin", &o.origin, limits.max_origin_len)?;
                }
            }
            Body::ResyncRequest { origin } => check_name("origin", origin, limits.max_origin_len)?,
            Body::FullSyncBegin
            | Body::FullSyncEnd { .. }
            | Body::Heartbeat { .. }
            | Body::SnapshotRequest { .. }
            | Body::SnapshotEnd { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DeviceState, Presence, PresenceStatus};

    /// [`decode_device_update_into`] into a new envelope.
    fn decode_device_update(raw: &[u8]) -> Option<Envelope> {
        let mut env = Envelope::new(String::new(), Epoch(0), 0, Body::FullSyncBegin);
        decode_device_update_into(raw, &mut env).then_some(env)
    }

    fn upd(key: &str) -> Envelope {
        Envelope::new(
            "pbx-a",
            Epoch(7),
            1,
            Body::Update(Update {
                key: key.into(),
                value: Value::Device(DeviceState::Inuse),
                ts: HlcTimestamp {
                    wall: 5,
                    counter: 0,
                },
            }),
        )
    }

    #[test]
    fn json_form_is_readable_and_round_trips() {
        let e = upd("PJSIP/100");
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"origin":"pbx-a","epoch":7,"seq":1,"body":{"type":"update","key":"PJSIP/100","value":{"device":"INUSE"},"ts":{"wall":5,"counter":0}}}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), e);
        for body in [
            Body::FullSyncBegin,
            Body::FullSyncEnd { begin_seq: 3 },
            Body::Heartbeat { local_down: true },
            Body::OriginDown {
                origin: "pbx-b".into(),
                epoch: Epoch(1),
                last_seq: 9,
                reason: "timeout".into(),
            },
            Body::Hello {
                role: Role::Agent,
                software: "hintfed".into(),
            },
            Body::SnapshotRequest { request_id: 4 },
            Body::SnapshotChunk {
                request_id: 4,
                index: 0,
                entries: vec![SnapshotEntry {
                    origin: "pbx-b".into(),
                    epoch: Epoch(2),
                    seq: 3,
                    key: "CustomPresence:alice".into(),
                    value: Value::Presence(Presence::new(PresenceStatus::Dnd, "a,b", "ü")),
                    ts: HlcTimestamp::ZERO,
                }],
                origins: vec![OriginSummary {
                    origin: "pbx-b".into(),
                    epoch: Epoch(2),
                    last_seq: 3,
                    down: Some(DownReason::Silent),
                    floor: Some(2),
                }],
            },
            Body::SnapshotEnd {
                request_id: 4,
                chunks: 1,
            },
            Body::ResyncRequest {
                origin: "pbx-a".into(),
            },
        ] {
            let e = Envelope::new("hub-1", Epoch(1), 2, body);
            let s = serde_json::to_string(&e).unwrap();
            assert!(s.contains(e.body.type_name()), "{s}");
            assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), e);
        }
    }

    #[test]
    fn body_decodes_in_any_field_order_and_rejects_what_the_derived_form_rejects() {
        let want = upd("PJSIP/1").body;
        for text in [
            r#"{"type":"update","key":"PJSIP/1","value":{"device":"INUSE"},"ts":{"wall":5,"counter":0}}"#,
            r#"{"key":"PJSIP/1","type":"update","value":{"device":"INUSE"},"ts":{"wall":5,"counter":0},"extra":[1]}"#,
            r#"{"value":{"device":"INUSE"},"ts":{"wall":5,"counter":0},"key":"PJSIP/1","type":"update"}"#,
        ] {
            assert_eq!(serde_json::from_str::<Body>(text).unwrap(), want, "{text}");
        }
        let end: Body = serde_json::from_str(r#"{"begin_seq":7,"type":"full_sync_end"}"#).unwrap();
        assert_eq!(end, Body::FullSyncEnd { begin_seq: 7 });
        let hb: Body = serde_json::from_str(r#"{"type":"heartbeat"}"#).unwrap();
        assert_eq!(hb, Body::Heartbeat { local_down: false });
        for bad in [
            r#"{"key":"PJSIP/1"}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"update","key":"PJSIP/1"}"#,
            r#"{"type":"full_sync_end"}"#,
            r#"{"type":7}"#,
            r#"["update"]"#,
            r#"{"begin_seq":1,"begin_seq":2,"type":"full_sync_end"}"#,
            "17",
        ] {
            assert!(serde_json::from_str::<Body>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_chunk_decodes_the_same_with_type_first_or_not() {
        let entry = r#"{"origin":"pbx-b","epoch":2,"seq":3,"key":"PJSIP/1","value":{"device":"INUSE"},"ts":{"wall":5,"counter":1}}"#;
        let sum = r#"{"origin":"pbx-b","epoch":2,"last_seq":3}"#;
        let want = Body::SnapshotChunk {
            request_id: 4,
            index: 2,
            entries: vec![SnapshotEntry {
                origin: "pbx-b".into(),
                epoch: Epoch(2),
                seq: 3,
                key: "PJSIP/1".into(),
                value: Value::Device(crate::state::DeviceState::Inuse),
                ts: HlcTimestamp {
                    wall: 5,
                    counter: 1,
                },
            }],
            origins: vec![OriginSummary {
                origin: "pbx-b".into(),
                epoch: Epoch(2),
                last_seq: 3,
                down: None,
                floor: None,
            }],
        };
        for text in [
            format!(
                r#"{{"type":"snapshot_chunk","request_id":4,"index":2,"entries":[{entry}],"origins":[{sum}]}}"#
            ),
            format!(
                r#"{{"request_id":4,"type":"snapshot_chunk","index":2,"entries":[{entry}],"origins":[{sum}],"x":null}}"#
            ),
            format!(
                r#"{{"type":"snapshot_chunk","origins":[{sum}],"x":{{"y":[]}},"entries":[{entry}],"index":2,"request_id":4}}"#
            ),
            serde_json::to_string(&want).unwrap(),
        ] {
            assert_eq!(serde_json::from_str::<Body>(&text).unwrap(), want, "{text}");
        }
        // Defaults, in both orders.
        let empty = Body::SnapshotChunk {
            request_id: 9,
            index: 0,
            entries: vec![],
            origins: vec![],
        };
        for text in [
            r#"{"type":"snapshot_chunk","request_id":9}"#,
            r#"{"request_id":9,"type":"snapshot_chunk"}"#,
        ] {
            assert_eq!(serde_json::from_str::<Body>(text).unwrap(), empty, "{text}");
        }
        for bad in [
            r#"{"type":"snapshot_chunk"}"#,
            r#"{"index":1,"type":"snapshot_chunk"}"#,
            r#"{"type":"snapshot_chunk","request_id":1,"type":"snapshot_chunk"}"#,
            r#"{"type":"snapshot_chunk","request_id":1,"type":null}"#,
            r#"{"type":"snapshot_chunk","request_id":1,"request_id":2}"#,
            r#"{"request_id":1,"request_id":2,"type":"snapshot_chunk"}"#,
            r#"{"type":"snapshot_chunk","request_id":-1}"#,
            r#"{"type":"snapshot_chunk","request_id":1,"index":4294967296}"#,
            r#"{"type":"snapshot_chunk","request_id":1,"entries":[{"origin":"a"}]}"#,
            r#"{"type":"snapshot_chunk","request_id":1,"entries":{}}"#,
        ] {
            assert!(serde_json::from_str::<Body>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_device_update_fast_path_reads_what_serde_reads_and_nothing_else() {
        let mut sealed = Vec::new();
        for (origin, key, state, wall, counter) in [
            ("pbx-a", "PJSIP/100", DeviceState::Inuse, 5, 0),
            (
                "ü-pbx",
                "SIP/ß 1",
                DeviceState::NotInuse,
                u64::MAX,
                u32::MAX,
            ),
            ("x", "Local/1@from-internal", DeviceState::Ringinuse, 0, 7),
        ] {
            for (epoch, seq) in [(7, 1), (0, 0), (u64::MAX, u64::MAX)] {
                let e = Envelope::new(
                    origin,
                    Epoch(epoch),
                    seq,
                    Body::Update(Update {
                        key: key.into(),
                        value: Value::Device(state),
                        ts: HlcTimestamp { wall, counter },
                    }),
                );
                let bytes = serde_json::to_vec(&e).unwrap();
                let mut fast = Vec::new();
                assert!(encode_device_update(&e, &mut fast));
                assert_eq!(fast, bytes);
                assert_eq!(decode_device_update(&bytes), Some(e), "{bytes:?}");
                sealed.push(bytes);
            }
        }
        // Not the canonical form: left to serde (whatever serde then says).
        for other in [
            r#"{"v":1,"origin":"a","epoch":1,"seq":1,"body":{"type":"update","key":"k\u0041","value":{"device":"INUSE"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"a","epoch":01,"seq":1,"body":{"type":"update","key":"k","value":{"device":"INUSE"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"a","epoch":1,"seq":1,"body":{"type":"update","key":"k","value":{"device":"inuse"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"a","epoch":1,"seq":1,"body":{"type":"update","key":"k","value":{"device":"INUSE"},"ts":{"wall":1,"counter":4294967296}}}"#,
            r#"{"v":1,"origin":"a","epoch":18446744073709551616,"seq":1,"body":{"type":"update","key":"k","value":{"device":"INUSE"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"a","epoch":1.0,"seq":1,"body":{"type":"update","key":"k","value":{"device":"INUSE"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"a","epoch":1,"seq":1,"body":{"type":"update","key":"k","value":{"device":"INUSE"},"ts":{"wall":1,"counter":0}}} "#,
            r#"{"v":2,"origin":"a","epoch":1,"seq":1,"body":{"type":"update","key":"k","value":{"device":"INUSE"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"a","epoch":1,"seq":1,"body":{"type":"heartbeat"}}"#,
            "{\"v\":1,\"origin\":\"a\tb\",\"epoch\":1,\"seq\":1,\"body\":{\"type\":\"update\",\"key\":\"k\",\"value\":{\"device\":\"INUSE\"},\"ts\":{\"wall\":1,\"counter\":0}}}",
        ] {
            assert_eq!(decode_device_update(other.as_bytes()), None, "{other}");
        }
        assert_eq!(
            decode_device_update(b"{\"v\":1,\"origin\":\"\xff\",\"epoch\":1,\"seq\":1,\"body\":{\"type\":\"update\",\"key\":\"k\",\"value\":{\"device\":\"INUSE\"},\"ts\":{\"wall\":1,\"counter\":0}}}"),
            None
        );
        // Any byte changed or cut: whatever the fast path still reads, serde reads the same.
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(2_000), |(pick in 0usize..9, i in 0usize..200, b in any::<u8>(), cut in any::<bool>())| {
            let mut m = sealed[pick].clone();
            let i = i % m.len();
            if cut {
                m.truncate(i);
            } else {
                m[i] = b;
            }
            if let Some(fast) = decode_device_update(&m) {
                prop_assert_eq!(serde_json::from_slice::<Envelope>(&m).ok(), Some(fast));
            }
        });
    }

    #[test]
    fn exact_device_states() {
        for st in DeviceState::ALL {
            assert_eq!(exact_device_state(st.as_str().as_bytes()), Some(st));
            let lower = st.as_str().to_ascii_lowercase();
            assert_eq!(exact_device_state(lower.as_bytes()), None, "{lower}");
        }
        for other in [
            "",
            "BUSZ",
            "XNUSE",
            "ONHOLDX",
            "RINGINF",
            "NOT_INUSF",
            "UNAVAILABLX",
        ] {
            assert_eq!(exact_device_state(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn validation_rejects_bad_names() {
        let l = Limits::default();
        assert!(upd("PJSIP/100").validate(&l).is_ok());
        assert_eq!(upd("").validate(&l), Err(InvalidEnvelope::Empty("key")));
        assert_eq!(
            upd("a\r\nAction: Originate").validate(&l),
            Err(InvalidEnvelope::ControlChar("key"))
        );
        assert!(matches!(
            upd(&"x".repeat(600)).validate(&l),
            Err(InvalidEnvelope::TooLong { .. })
        ));
        let mut e = upd("k");
        e.seq = 0;
        assert_eq!(e.validate(&l), Err(InvalidEnvelope::ZeroSeq));
        let mut e = upd("k");
        e.origin = String::new();
        assert_eq!(e.validate(&l), Err(InvalidEnvelope::Empty("origin")));
        // Every control character, ASCII (checked bytewise) or not, is refused in a key.
        for c in (0u32..0x200).filter_map(char::from_u32) {
            let key = format!("PJSIP/{c}1");
            assert_eq!(
                upd(&key).validate(&l).is_err(),
                c.is_control(),
                "U+{:04X}",
                c as u32
            );
        }
    }
    proptest::proptest! {
        /// The device update encoder writes serde's bytes, or leaves the envelope to serde
        /// (writing nothing) exactly when a name needs escaping or the body is another.
        #[test]
        fn device_updates_are_encoded_as_serde_encodes_them(
            origin in "\\PC{0,8}|[\"\\\\a\t\u{1}\u{7f}é]{0,4}",
            key in "\\PC{0,12}|[\"\\\\k\n\u{1f}]{0,4}",
            numbers in (proptest::num::u64::ANY, proptest::num::u64::ANY, proptest::num::u64::ANY, proptest::num::u32::ANY),
            state in 0usize..DeviceState::ALL.len(),
            v in proptest::num::u32::ANY,
            presence in proptest::bool::ANY,
        ) {
            let (epoch, seq, wall, counter) = numbers;
            let value = if presence {
                Value::Presence(Presence::new(PresenceStatus::Away, "", ""))
            } else {
                Value::Device(DeviceState::ALL[state])
            };
            let mut e = Envelope::new(
                origin.clone(),
                Epoch(epoch),
                seq,
                Body::Update(Update {
                    key: key.clone(),
                    value,
                    ts: HlcTimestamp { wall, counter },
                }),
            );
            e.v = v;
            let mut fast = Vec::new();
            let escaped = |s: &str| s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
            let wrote = encode_device_update(&e, &mut fast);
            proptest::prop_assert_eq!(wrote, !presence && !escaped(&origin) && !escaped(&key));
            if wrote {
                proptest::prop_assert_eq!(fast, serde_json::to_vec(&e).unwrap());
            } else {
                proptest::prop_assert!(fast.is_empty());
            }
        }
    }
}

/// Topic prefixes of the fan-out (the first frame on a hub's PUB socket), by body kind, so a
/// subscriber can filter by kind with a prefix subscription (`state.` for every update,
/// `control` for heartbeats, full-sync markers and origin-down notices).
pub mod topics {
    /// Device state updates.
    pub const DEVICE: &str = "state.device";
    /// Presence updates.
    pub const PRESENCE: &str = "state.presence";
    /// Everything that is not an update.
    pub const CONTROL: &str = "control";
}

impl Envelope {
    /// The fan-out topic of this envelope (see [`topics`]).
    pub fn topic(&self) -> &'static str {
        match &self.body {
            Body::Update(u) => match u.value.kind() {
                Kind::Device => topics::DEVICE,
                Kind::Presence => topics::PRESENCE,
            },
            _ => topics::CONTROL,
        }
    }
}
