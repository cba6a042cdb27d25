//! Trust: the signed wire form of an [`Envelope`], the [`KeyRing`] that signs and checks it,
//! and the [`Verifier`] that turns untrusted bytes into envelopes (size limit, MAC, version,
//! structure, replay guard) and counts every rejection by reason.
//!
//! # Wire form
//! One JSON object per message:
//! ```text
//! {"kid":"k1","mac":"<base64 HMAC-SHA256>","env":{"v":1,"origin":"pbx-a",...}}
//! ```
//! The MAC is HMAC-SHA256 over the exact bytes of the `env` value as they appear in the
//! message (the receiver never re-encodes before checking). `kid` is present only when the
//! signing key has an id; it selects the key to try first, otherwise every key of the ring is
//! tried. Without any configured key, messages are sent as `{"env":{...}}` and accepted
//! unsigned. With a key configured, a message without `mac` is rejected as unsigned.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::envelope::{
    Envelope, Limits, WIRE_VERSION, decode_device_update_into, encode_device_update,
};
use crate::time::Epoch;

type HmacSha256 = Hmac<Sha256>;

/// One shared secret, optionally named. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct Key {
    id: Option<String>,
    /// HMAC state after absorbing the key (cloned per message instead of re-keying).
    keyed: HmacSha256,
}

impl Key {
    /// A key with an optional id (sent as `kid` when signing with it).
    pub fn new(id: Option<String>, secret: impl Into<Vec<u8>>) -> Self {
        let secret: Vec<u8> = secret.into();
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let keyed = <HmacSha256 as Mac>::new_from_slice(&secret)
            .expect("HMAC-SHA256 accepts keys of every length");
        Key { id, keyed }
    }

    /// The key's id, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The configured shared keys: sign with the first, accept any (for rotation). An empty ring
/// means "no authentication": messages go out unsigned and unsigned messages are accepted.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Vec<Key>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .field("ids", &self.keys.iter().map(Key::id).collect::<Vec<_>>())
            .finish()
    }
}

/// Why an envelope could not be encoded for sending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message would exceed the receivers' limit.
    #[error("encoded message is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Serialization failed (not expected for these types).
    #[error("cannot serialize envelope: {0}")]
    Json(String),
}

impl KeyRing {
    /// A ring of the given keys (the first signs).
    pub fn new(keys: Vec<Key>) -> Self {
        KeyRing { keys }
    }

    /// A ring of unnamed keys from configured secrets, e.g. `shared_keys = k1, k2`. Empty
    /// secrets are skipped.
    pub fn from_secrets<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        KeyRing {
            keys: secrets
                .into_iter()
                .filter(|s| !s.as_ref().is_empty())
                .map(|s| Key::new(None, s.as_ref().as_bytes()))
                .collect(),
        }
    }

    /// Whether no key is configured (authentication off).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Encodes `env` in the wire form, signed with the first key (unsigned if the ring is
    /// empty), and checks the result against `limits.max_message_bytes`.
    pub fn seal(&self, env: &Envelope, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        // A device update (what an agent seals for every change) without serde: same bytes.
        let mut inner = Vec::with_capacity(256);
        if !encode_device_update(env, &mut inner) {
            inner = serde_json::to_vec(env).map_err(|e| EncodeError::Json(e.to_string()))?;
        }
        let mut out = Vec::with_capacity(inner.len() + 80);
        out.push(b'{');
        if let Some(key) = self.keys.first() {
            if let Some(id) = key.id() {
                let id = serde_json::to_string(id).map_err(|e| EncodeError::Json(e.to_string()))?;
                out.extend_from_slice(b"\"kid\":");
                out.extend_from_slice(id.as_bytes());
                out.push(b',');
            }
            let mut mac = key.mac();
            mac.update(&inner);
            let tag = B64.encode(mac.finalize().into_bytes());
            out.extend_from_slice(b"\"mac\":\"");
            out.extend_from_slice(tag.as_bytes());
            out.extend_from_slice(b"\",");
        }
        out.extend_from_slice(b"\"env\":");
        out.extend_from_slice(&inner);
        out.push(b'}');
        if out.len() > limits.max_message_bytes {
            return Err(EncodeError::TooLarge {
                len: out.len(),
                max: limits.max_message_bytes,
            });
        }
        Ok(out)
    }

    fn check(&self, kid: Option<&str>, mac_b64: &[u8], data: &[u8]) -> bool {
        // Decoded on the stack: a tag of any other length than 32 bytes fails below anyway,
        // and one too long for the buffer fails to decode.
        let mut buf = [0u8; 48];
        let Ok(n) = B64.decode_slice(mac_b64, &mut buf) else {
            return false;
        };
        let tag = &buf[..n];
        let try_key = |k: &Key| {
            let mut m = k.mac();
            m.update(data);
            m.verify_slice(tag).is_ok()
        };
        if let Some(kid) = kid
            && let Some(k) = self.keys.iter().find(|k| k.id() == Some(kid))
            && try_key(k)
        {
            return true;
        }
        self.keys.iter().any(try_key)
    }
}

/// Why a received message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Larger than the configured limit (checked before parsing).
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Received size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Not the wire form, not JSON, wrong field types, or invalid content.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A wire version this build does not speak.
    #[error("unsupported wire version {0}")]
    WrongVersion(u64),
    /// A key is configured but the message carries no MAC.
    #[error("unsigned message")]
    Unsigned,
    /// The MAC does not match any configured key.
    #[error("bad MAC")]
    BadMac,
    /// A stream message older than the replay window, or from an older epoch.
    #[error("replayed or stale message")]
    Replay,
    /// A stream message already accepted (normal with several hubs).
    #[error("duplicate message")]
    Duplicate,
}

/// The rejection reasons, as counter labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// See [`Reject::TooLarge`].
    TooLarge,
    /// See [`Reject::Malformed`].
    Malformed,
    /// See [`Reject::WrongVersion`].
    WrongVersion,
    /// See [`Reject::Unsigned`].
    Unsigned,
    /// See [`Reject::BadMac`].
    BadMac,
    /// See [`Reject::Replay`].
    Replay,
    /// See [`Reject::Duplicate`].
    Duplicate,
}

impl RejectReason {
    /// Every reason.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::TooLarge,
        RejectReason::Malformed,
        RejectReason::WrongVersion,
        RejectReason::Unsigned,
        RejectReason::BadMac,
        RejectReason::Replay,
        RejectReason::Duplicate,
    ];

    /// snake_case label, e.g. `bad_mac`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::WrongVersion => "wrong_version",
            RejectReason::Unsigned => "unsigned",
            RejectReason::BadMac => "bad_mac",
            RejectReason::Replay => "replay",
            RejectReason::Duplicate => "duplicate",
        }
    }
}

impl Reject {
    /// The counter label of this rejection.
    pub fn reason(&self) -> RejectReason {
        match self {
            Reject::TooLarge { .. } => RejectReason::TooLarge,
            Reject::Malformed(_) => RejectReason::Malformed,
            Reject::WrongVersion(_) => RejectReason::WrongVersion,
            Reject::Unsigned => RejectReason::Unsigned,
            Reject::BadMac => RejectReason::BadMac,
            Reject::Replay => RejectReason::Replay,
            Reject::Duplicate => RejectReason::Duplicate,
        }
    }
}

#[derive(Deserialize)]
struct WireIn<'a> {
    #[serde(default, borrow)]
    kid: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    mac: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    env: &'a RawValue,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u64,
}

/// Splits `{"mac":"<44 base64 chars>","env":<env>}` (what [`KeyRing::seal`] writes with a key
/// without id) into the MAC text and the raw `env` bytes; `None` for any other shape.
fn split_sealed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    const HEAD: &[u8] = b"{\"mac\":\"";
    const MID: &[u8] = b"\",\"env\":";
    const TAG: usize = 44;
    let rest = bytes.strip_prefix(HEAD)?;
    let tag = rest.get(..TAG)?;
    let rest = rest[TAG..].strip_prefix(MID)?;
    let raw = rest.strip_suffix(b"}")?;
    // Exactly one object, no surrounding whitespace (the general path would MAC without it).
    if !(raw.starts_with(b"{") && raw.ends_with(b"}")) {
        return None;
    }
    // Not checked for the base64 alphabet (nor UTF-8) here: a tag holding anything else,
    // `"` or `\` included, fails to decode, so the MAC check fails and `open` takes the
    // general path.
    Some((tag, raw))
}

/// Whether `bytes` are a message in the layout [`KeyRing::seal`] writes with a key without id
/// (`{"mac":"<44 chars>","env":{"v":1,"origin":"<origin>",...`) that names `origin` as its
/// sender; nothing is verified. A node drops its own messages that the hubs send back, so it
/// can tell them by this before paying for their check: a message that names the node's
/// origin is dropped whether it would verify or not. False for any other layout, and for an
/// origin holding `"`, `\` or a control character (whose JSON text differs from its bytes).
pub fn sealed_by(bytes: &[u8], origin: &str) -> bool {
    const HEAD: &[u8] = b"{\"mac\":\"";
    const MID: &[u8] = b"\",\"env\":{\"v\":1,\"origin\":\"";
    const TAG: usize = 44;
    if origin.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        return false;
    }
    bytes
        .strip_prefix(HEAD)
        .and_then(|rest| rest.get(TAG..))
        .and_then(|rest| rest.strip_prefix(MID))
        .and_then(|rest| rest.strip_prefix(origin.as_bytes()))
        .is_some_and(|rest| rest.starts_with(b"\""))
}

/// Decodes and authenticates one wire message without replay checking: size limit, wire
/// form, MAC (when `keys` is non-empty), version, envelope structure and [`Limits`]. Never
/// panics on any input.
pub fn open(bytes: &[u8], keys: &KeyRing, limits: &Limits) -> Result<Envelope, Reject> {
    let mut env = Envelope::empty();
    open_into(bytes, keys, limits, &mut env).map(|()| env)
}

/// [`open`] into `env`: a device update reuses the room of the origin and key `env` holds
/// (no allocation per message for a caller that keeps one envelope). On an error `env` holds
/// any envelope.
pub fn open_into(
    bytes: &[u8],
    keys: &KeyRing,
    limits: &Limits,
    env: &mut Envelope,
) -> Result<(), Reject> {
    if bytes.len() > limits.max_message_bytes {
        return Err(Reject::TooLarge {
            len: bytes.len(),
            max: limits.max_message_bytes,
        });
    }
    // The form `seal` writes without a key id, `{"mac":"<44 base64 chars>","env":{...}}`, is
    // split without a JSON pass over the whole message: base64 holds no `"` or `\`, so such
    // a message is valid JSON exactly when its `env` object is, which decoding checks. Any
    // failure there takes the general path, so both accept exactly the same messages.
    if let Some((mac, raw)) = split_sealed(bytes)
        && open_parts(None, Some(mac), raw, keys, limits, env).is_ok()
    {
        return Ok(());
    }
    let wire: WireIn<'_> =
        serde_json::from_slice(bytes).map_err(|e| Reject::Malformed(e.to_string()))?;
    open_parts(
        wire.kid.as_deref(),
        wire.mac.as_deref().map(str::as_bytes),
        wire.env.get().as_bytes(),
        keys,
        limits,
        env,
    )
}

/// MAC check, version and envelope decoding of the `env` bytes of a message, into `env`.
fn open_parts(
    kid: Option<&str>,
    mac: Option<&[u8]>,
    raw: &[u8],
    keys: &KeyRing,
    limits: &Limits,
    env: &mut Envelope,
) -> Result<(), Reject> {
    if !keys.is_empty() {
        let Some(mac) = mac else {
            return Err(Reject::Unsigned);
        };
        if !keys.check(kid, mac, raw) {
            return Err(Reject::BadMac);
        }
    }
    // Decode first; only a failure needs the version alone (a newer version may have another
    // structure: report it as such rather than as malformed). A device update as `seal`
    // writes it is read without serde (same result, see `decode_device_update_into`).
    if !decode_device_update_into(raw, env) {
        match serde_json::from_slice(raw) {
            Ok(decoded) => *env = decoded,
            Err(e) => {
                return match serde_json::from_slice::<VersionOnly>(raw) {
                    Ok(version) if version.v != u64::from(WIRE_VERSION) => {
                        Err(Reject::WrongVersion(version.v))
                    }
                    _ => Err(Reject::Malformed(e.to_string())),
                };
            }
        }
    }
    if env.v != WIRE_VERSION {
        return Err(Reject::WrongVersion(u64::from(env.v)));
    }
    env.validate(limits)
        .map_err(|e| Reject::Malformed(e.to_string()))?;
    Ok(())
}

/// Replay protection for stream envelopes: per origin, the current epoch and a sliding window
/// of the last [`ReplayGuard::WINDOW`] sequence numbers.
///
/// Rules: a larger epoch than known is accepted and restarts the window; a smaller epoch is a
/// replay; within the epoch a sequence above everything seen is accepted, one already seen is
/// a duplicate, one not seen but inside the window is accepted (several hubs deliver the same
/// stream interleaved, so order across them is not guaranteed), one below the window is a
/// replay. (This is the anti-replay window of IPsec, RFC 4303 §3.4.3; the stricter "reject
/// anything not above the highest" would turn every cross-hub reordering into a loss.)
/// At most `max_origins` origins are tracked; beyond that the least recently active is
/// forgotten (its next message is then accepted as if first seen).
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    /// Hashed (foldhash, seeded per process) rather than ordered: a lookup compares one name,
    /// not the several a B-tree node's linear search does (every message looks up its origin).
    origins: HashMap<String, Window, foldhash::fast::RandomState>,
    max_origins: usize,
    clock: u64,
}

#[derive(Debug, Clone)]
struct Window {
    epoch: Epoch,
    top: u64,
    /// Which of the sequences `top - WINDOW + 1 ..= top` were seen: bit `seq % WINDOW`.
    seen: [u64; (ReplayGuard::WINDOW / 64) as usize],
    touched: u64,
}

impl Window {
    fn new(epoch: Epoch, touched: u64) -> Self {
        Window {
            epoch,
            top: 0,
            seen: [0; (ReplayGuard::WINDOW / 64) as usize],
            touched,
        }
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % ReplayGuard::WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::new(4096)
    }
}

impl ReplayGuard {
    /// Size of the per-origin window of sequence numbers.
    pub const WINDOW: u64 = 1024;

    /// A guard tracking at most `max_origins` origins.
    pub fn new(max_origins: usize) -> Self {
        ReplayGuard {
            origins: HashMap::default(),
            max_origins: max_origins.max(1),
            clock: 0,
        }
    }

    /// Checks `(origin, epoch, seq)` and records it if accepted.
    pub fn check(&mut self, origin: &str, epoch: Epoch, seq: u64) -> Result<(), Reject> {
        self.clock += 1;
        let clock = self.clock;
        // One lookup for a known origin (every message but the first of each).
        let w = match self.origins.get_mut(origin) {
            Some(w) => w,
            None => {
                if self.origins.len() >= self.max_origins {
                    let oldest = self
                        .origins
                        .iter()
                        .min_by_key(|(_, w)| w.touched)
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        self.origins.remove(&k);
                    }
                }
                self.origins
                    .entry(origin.to_owned())
                    .or_insert(Window::new(epoch, clock))
            }
        };
        if epoch < w.epoch {
            return Err(Reject::Replay);
        }
        if epoch > w.epoch {
            *w = Window::new(epoch, clock);
        }
        w.touched = clock;
        if seq + ReplayGuard::WINDOW <= w.top {
            return Err(Reject::Replay);
        }
        if seq > w.top {
            // Slide: the sequences leaving the window share their bits with top+1..=seq.
            if seq - w.top >= ReplayGuard::WINDOW {
                w.seen = [0; (ReplayGuard::WINDOW / 64) as usize];
            } else {
                for s in w.top + 1..=seq {
                    let (i, m) = Window::bit(s);
                    w.seen[i] &= !m;
                }
            }
            w.top = seq;
        } else {
            let (i, m) = Window::bit(seq);
            if w.seen[i] & m != 0 {
                return Err(Reject::Duplicate);
            }
        }
        let (i, m) = Window::bit(seq);
        w.seen[i] |= m;
        Ok(())
    }
}

/// Counters of accepted and rejected messages, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyStats {
    /// Messages accepted.
    pub accepted: u64,
    rejected: BTreeMap<RejectReason, u64>,
}

impl VerifyStats {
    /// Rejections counted for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.get(&reason).copied().unwrap_or(0)
    }

    /// All rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Turns untrusted bytes into envelopes: [`open`] plus the [`ReplayGuard`] for stream
/// envelopes, counting outcomes. One verifier per receiving process (shared by all of its
/// hub connections, so duplicates across hubs are recognised).
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: KeyRing,
    limits: Limits,
    guard: ReplayGuard,
    stats: VerifyStats,
}

impl Verifier {
    /// A verifier with the given keys (empty: authentication off) and limits.
    pub fn new(keys: KeyRing, limits: Limits) -> Self {
        Verifier {
            keys,
            limits,
            guard: ReplayGuard::default(),
            stats: VerifyStats::default(),
        }
    }

    /// Verifies one message. Stream envelopes are replay-checked after the MAC succeeded
    /// (forgeries never touch the replay state).
    pub fn verify(&mut self, bytes: &[u8]) -> Result<Envelope, Reject> {
        let mut env = Envelope::empty();
        self.verify_into(bytes, &mut env).map(|()| env)
    }

    /// [`Verifier::verify`] into `env`, reusing its room ([`open_into`]): a receiver that keeps
    /// one envelope allocates nothing per device update. On an error `env` holds any envelope.
    pub fn verify_into(&mut self, bytes: &[u8], env: &mut Envelope) -> Result<(), Reject> {
        let mut res = open_into(bytes, &self.keys, &self.limits, env);
        if res.is_ok()
            && env.is_stream()
            && let Err(e) = self.guard.check(&env.origin, env.epoch, env.seq)
        {
            res = Err(e);
        }
        match &res {
            Ok(_) => self.stats.accepted += 1,
            Err(e) => *self.stats.rejected.entry(e.reason()).or_insert(0) += 1,
        }
        res
    }

    /// The counters so far.
    pub fn stats(&self) -> &VerifyStats {
        &self.stats
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Body, Update};
    use crate::hlc::HlcTimestamp;
    use crate::state::{DeviceState, Value};

    fn env(seq: u64) -> Envelope {
        Envelope::new(
            "pbx-a",
            Epoch(10),
            seq,
            Body::Update(Update {
                key: "PJSIP/100".into(),
                value: Value::Device(DeviceState::Busy),
                ts: HlcTimestamp {
                    wall: 1,
                    counter: 0,
                },
            }),
        )
    }

    fn ring() -> KeyRing {
        KeyRing::new(vec![Key::new(Some("k2".into()), "new-secret")])
    }

    #[test]
    fn seal_open_round_trip_and_wire_shape() {
        let l = Limits::default();
        let bytes = ring().seal(&env(1), &l).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(r#"{"kid":"k2","mac":""#), "{text}");
        assert!(text.contains(r#""env":{"v":1,"origin":"pbx-a""#), "{text}");
        assert_eq!(open(&bytes, &ring(), &l).unwrap(), env(1));
        // Unsigned mode.
        let bytes = KeyRing::default().seal(&env(1), &l).unwrap();
        assert!(bytes.starts_with(br#"{"env":"#));
        assert_eq!(open(&bytes, &KeyRing::default(), &l).unwrap(), env(1));
        assert_eq!(open(&bytes, &ring(), &l), Err(Reject::Unsigned));
    }

    #[test]
    fn rotation_accepts_any_key_and_rejects_forgeries() {
        let l = Limits::default();
        let old = KeyRing::from_secrets(["old-secret"]);
        let both = KeyRing::new(vec![
            Key::new(Some("k2".into()), "new-secret"),
            Key::new(None, "old-secret"),
        ]);
        let from_old = old.seal(&env(1), &l).unwrap();
        assert!(open(&from_old, &both, &l).is_ok());
        assert_eq!(open(&from_old, &ring(), &l), Err(Reject::BadMac));
        // Tampering with the envelope breaks the MAC, even a whitespace change.
        let sealed = ring().seal(&env(1), &l).unwrap();
        let tampered = String::from_utf8(sealed.clone())
            .unwrap()
            .replace("BUSY", "IDLE");
        assert_eq!(open(tampered.as_bytes(), &ring(), &l), Err(Reject::BadMac));
        let spaced = String::from_utf8(sealed)
            .unwrap()
            .replace("\"seq\":1", "\"seq\": 1");
        assert_eq!(open(spaced.as_bytes(), &ring(), &l), Err(Reject::BadMac));
        // A wrong kid still falls back to trying every key.
        let wrong_kid = String::from_utf8(ring().seal(&env(1), &l).unwrap())
            .unwrap()
            .replace("\"k2\"", "\"zz\"");
        assert!(open(wrong_kid.as_bytes(), &ring(), &l).is_ok());
    }

    #[test]
    fn hostile_messages_are_errors() {
        let l = Limits::default();
        let k = ring();
        let sign = |inner: &str| {
            let key = Key::new(None, "new-secret");
            let mut m = key.mac();
            m.update(inner.as_bytes());
            format!(
                r#"{{"mac":"{}","env":{}}}"#,
                B64.encode(m.finalize().into_bytes()),
                inner
            )
        };
        let big = vec![b' '; l.max_message_bytes + 1];
        assert!(matches!(open(&big, &k, &l), Err(Reject::TooLarge { .. })));
        for bad in [
            "",
            "{",
            "null",
            "[]",
            r#"{"env":}"#,
            r#"{"mac":5,"env":{}}"#,
        ] {
            assert!(
                matches!(open(bad.as_bytes(), &k, &l), Err(Reject::Malformed(_))),
                "{bad}"
            );
        }
        let good = String::from_utf8(k.seal(&env(1), &l).unwrap()).unwrap();
        for cut in 0..good.len() {
            assert!(open(&good.as_bytes()[..cut], &k, &l).is_err());
        }
        assert_eq!(
            open(sign(r#"{"v":2,"origin":"x"}"#).as_bytes(), &k, &l),
            Err(Reject::WrongVersion(2))
        );
        for inner in [
            r#"{"v":1,"origin":"x","epoch":1,"seq":"1","body":{"type":"heartbeat"}}"#,
            r#"{"v":1,"origin":"x","epoch":-1,"seq":1,"body":{"type":"heartbeat"}}"#,
            r#"{"v":1,"origin":"x","epoch":1,"seq":1,"body":{"type":"nope"}}"#,
            r#"{"v":1,"origin":"x","epoch":1,"seq":1,"body":{"type":"update","key":"k","value":{"device":"IDLE"},"ts":{"wall":1,"counter":0}}}"#,
            r#"{"v":1,"origin":"","epoch":1,"seq":1,"body":{"type":"heartbeat"}}"#,
            r#"{"v":1,"origin":"x","epoch":1,"seq":0,"body":{"type":"heartbeat"}}"#,
            r#"{"v":"1","origin":"x","epoch":1,"seq":1,"body":{"type":"heartbeat"}}"#,
        ] {
            assert!(
                matches!(
                    open(sign(inner).as_bytes(), &k, &l),
                    Err(Reject::Malformed(_))
                ),
                "{inner}"
            );
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(open(sign(&deep).as_bytes(), &k, &l).is_err());
        assert!(
            open(
                sign(r#"{"v":1,"origin":"x","epoch":1,"seq":1,"body":{"type":"heartbeat"}}"#)
                    .as_bytes(),
                &k,
                &l
            )
            .is_ok()
        );
    }

    #[test]
    fn verifier_counts_and_guards_replays() {
        let l = Limits::default();
        let k = ring();
        let mut v = Verifier::new(k.clone(), l.clone());
        let m1 = k.seal(&env(1), &l).unwrap();
        let m3 = k.seal(&env(3), &l).unwrap();
        let m2 = k.seal(&env(2), &l).unwrap();
        assert!(v.verify(&m1).is_ok());
        assert!(v.verify(&m3).is_ok());
        assert!(v.verify(&m2).is_ok(), "reordered but unseen is accepted");
        assert_eq!(v.verify(&m2), Err(Reject::Duplicate));
        let mut newer = env(1);
        newer.epoch = Epoch(11);
        assert!(v.verify(&k.seal(&newer, &l).unwrap()).is_ok());
        assert_eq!(v.verify(&m3), Err(Reject::Replay), "older epoch");
        assert!(matches!(v.verify(b"junk"), Err(Reject::Malformed(_))));
        assert_eq!(
            v.verify(&KeyRing::default().seal(&env(9), &l).unwrap()),
            Err(Reject::Unsigned)
        );
        assert_eq!(v.stats().accepted, 4);
        assert_eq!(v.stats().rejected(RejectReason::Duplicate), 1);
        assert_eq!(v.stats().rejected(RejectReason::Replay), 1);
        assert_eq!(v.stats().rejected(RejectReason::Malformed), 1);
        assert_eq!(v.stats().rejected(RejectReason::Unsigned), 1);
        assert_eq!(v.stats().rejected_total(), 4);
        // Control envelopes are not sequence-checked.
        let ctl = Envelope::new(
            "pbx-a",
            Epoch(11),
            1,
            Body::SnapshotRequest { request_id: 1 },
        );
        let c = k.seal(&ctl, &l).unwrap();
        assert!(v.verify(&c).is_ok() && v.verify(&c).is_ok());
    }

    #[test]
    fn replay_window_bounds() {
        let mut g = ReplayGuard::new(2);
        for s in 1..=2000 {
            g.check("a", Epoch(1), s).unwrap();
        }
        assert_eq!(
            g.check("a", Epoch(1), 2000 - ReplayGuard::WINDOW),
            Err(Reject::Replay)
        );
        assert_eq!(g.check("a", Epoch(1), 1999), Err(Reject::Duplicate));
        g.check("b", Epoch(1), 1).unwrap();
        g.check("c", Epoch(1), 1).unwrap(); // evicts "a" (least recently active)
        assert!(g.origins.len() <= 2);
    }

    #[test]
    fn window_slides_and_accepts_reordering_inside_it() {
        let mut g = ReplayGuard::new(4);
        for s in [1, 5, 3, 2, 4] {
            g.check("a", Epoch(1), s).unwrap();
        }
        for s in 1..=5 {
            assert_eq!(g.check("a", Epoch(1), s), Err(Reject::Duplicate));
        }
        // A jump of less than a window keeps what is still inside it.
        g.check("a", Epoch(1), 900).unwrap();
        assert_eq!(g.check("a", Epoch(1), 5), Err(Reject::Duplicate));
        g.check("a", Epoch(1), 6).unwrap();
        // Past a whole window: the old sequences are replays, the skipped ones in the window new.
        g.check("a", Epoch(1), 900 + ReplayGuard::WINDOW).unwrap();
        assert_eq!(g.check("a", Epoch(1), 900), Err(Reject::Replay));
        g.check("a", Epoch(1), 901).unwrap();
        assert_eq!(g.check("a", Epoch(1), 901), Err(Reject::Duplicate));
        // A slot reused by the slide holds the new sequence only.
        g.check("a", Epoch(1), 902 + ReplayGuard::WINDOW).unwrap();
        g.check("a", Epoch(1), 903).unwrap();
        // A newer epoch restarts, an older one is a replay.
        g.check("a", Epoch(2), 1).unwrap();
        assert_eq!(g.check("a", Epoch(1), 5000), Err(Reject::Replay));
    }

    #[test]
    fn the_split_fast_path_accepts_exactly_what_the_general_path_does() {
        let l = Limits::default();
        let ring = KeyRing::from_secrets(["s"]);
        let bytes = ring.seal(&env(1), &l).unwrap();
        assert!(bytes.starts_with(br#"{"mac":""#));
        assert!(split_sealed(&bytes).is_some());
        assert_eq!(open(&bytes, &ring, &l).unwrap(), env(1));
        let text = String::from_utf8(bytes.clone()).unwrap();
        let (head, env_text) = text.split_once(r#""env":"#).unwrap();
        let env_text = env_text.strip_suffix('}').unwrap();
        // Other layouts of the same JSON: whitespace, a field after env, env first.
        let variants = [
            format!("{head}\"env\": {env_text} }}"),
            format!("{head}\"env\":{env_text},\"x\":{{}}}}"),
            format!("{{\"env\":{env_text},{}}}", &head[1..head.len() - 1]),
        ];
        for v in &variants {
            assert_eq!(open(v.as_bytes(), &ring, &l).unwrap(), env(1), "{v}");
        }
        // Tampering anywhere fails either way.
        let forged = text.replace("PJSIP/100", "PJSIP/101");
        assert_eq!(open(forged.as_bytes(), &ring, &l), Err(Reject::BadMac));
        let truncated = &bytes[..bytes.len() - 2];
        assert!(matches!(
            open(truncated, &ring, &l),
            Err(Reject::Malformed(_))
        ));
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"x");
        assert!(matches!(
            open(&trailing, &ring, &l),
            Err(Reject::Malformed(_))
        ));
        // A newer version is reported as such on both paths.
        let v2 = r#"{"v":2,"origin":"pbx-a","what":"else"}"#;
        let mut m = ring.keys[0].mac();
        m.update(v2.as_bytes());
        let tag = B64.encode(m.finalize().into_bytes());
        let msg = format!("{{\"mac\":\"{tag}\",\"env\":{v2}}}");
        assert!(split_sealed(msg.as_bytes()).is_some());
        assert_eq!(
            open(msg.as_bytes(), &ring, &l),
            Err(Reject::WrongVersion(2))
        );
    }

    #[test]
    fn keys_never_in_debug() {
        let k = KeyRing::new(vec![Key::new(Some("k1".into()), "super-secret-value")]);
        let v = Verifier::new(k.clone(), Limits::default());
        for s in [
            format!("{k:?}"),
            format!("{v:?}"),
            format!("{:?}", Key::new(None, "super-secret-value")),
        ] {
            assert!(!s.contains("super-secret-value"), "{s}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        let k = ring();
        let l = Limits::default();
        proptest!(ProptestConfig::with_cases(500), |(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
            let _ = open(&bytes, &k, &l);
            let _ = open(&bytes, &KeyRing::default(), &l);
        });
        // Mutations of a valid unsigned message.
        let good = KeyRing::default().seal(&env(1), &l).unwrap();
        proptest!(ProptestConfig::with_cases(500), |(i in 0usize..200, b in any::<u8>())| {
            let mut m = good.clone();
            let i = i % m.len();
            m[i] = b;
            let _ = open(&m, &KeyRing::default(), &l);
        });
    }

    #[test]
    fn sealed_by_names_the_sender_of_the_keyless_id_layout_only() {
        let l = Limits::default();
        let keyed = KeyRing::from_secrets(["s"]);
        let bytes = keyed.seal(&env(1), &l).unwrap();
        assert!(sealed_by(&bytes, "pbx-a"));
        for other in ["pbx-b", "pbx-", "pbx-ab", "", "pbx-a\"", "pbx-a\\"] {
            assert!(!sealed_by(&bytes, other), "{other}");
        }
        // Other layouts: a key id, unsigned.
        assert!(!sealed_by(&ring().seal(&env(1), &l).unwrap(), "pbx-a"));
        assert!(!sealed_by(
            &KeyRing::default().seal(&env(1), &l).unwrap(),
            "pbx-a"
        ));
        // A name whose JSON text is escaped is never told by its bytes.
        let mut quoted = env(1);
        quoted.origin = "a\\b".into();
        assert!(!sealed_by(&keyed.seal(&quoted, &l).unwrap(), "a\\b"));
    }

    proptest::proptest! {
        /// Of a sealed message that opens, `sealed_by` says exactly whether its envelope names
        /// the origin asked (printable ASCII names, any of them a prefix of another).
        #[test]
        fn sealed_by_agrees_with_the_opened_origin(
            sender in "[ -~]{1,12}",
            asked in "[ -~]{0,12}",
            prefix in proptest::bool::ANY,
        ) {
            let l = Limits::default();
            let keyed = KeyRing::from_secrets(["s"]);
            let mut e = env(1);
            e.origin = sender.clone();
            let asked = if prefix { format!("{sender}{asked}") } else { asked };
            let bytes = keyed.seal(&e, &l).unwrap();
            let opened = open(&bytes, &keyed, &l).expect("opens");
            let plain = !asked.contains(['"', '\\']);
            proptest::prop_assert_eq!(sealed_by(&bytes, &asked), plain && opened.origin == asked);
        }
    }

    #[test]
    fn verify_into_a_reused_envelope_is_verify() {
        use crate::state::{DeviceState, Value};
        use proptest::prelude::*;
        let l = Limits::default();
        let keyed = KeyRing::from_secrets(["s"]);
        let update = |origin: &str, seq, key: &str, state| {
            Envelope::new(
                origin,
                Epoch(3),
                seq,
                Body::Update(Update {
                    key: key.into(),
                    value: Value::Device(state),
                    ts: HlcTimestamp {
                        wall: seq,
                        counter: 0,
                    },
                }),
            )
        };
        let mut pool: Vec<Vec<u8>> = Vec::new();
        for seq in 1..6 {
            let long = "a-much-longer-origin-name-than-the-others";
            for (o, k) in [
                ("pbx-a", "PJSIP/1"),
                (long, "PJSIP/a-long-device-name-0123456789"),
                ("b", "k"),
            ] {
                pool.push(
                    keyed
                        .seal(&update(o, seq, k, DeviceState::Busy), &l)
                        .unwrap(),
                );
            }
            let beat = Envelope::new(
                "pbx-a",
                Epoch(3),
                10 + seq,
                Body::Heartbeat { local_down: false },
            );
            pool.push(keyed.seal(&beat, &l).unwrap());
        }
        // Rejected ones: a forgery, garbage, an unsigned message.
        pool.push(
            ring()
                .seal(&update("pbx-a", 30, "k", DeviceState::NotInuse), &l)
                .unwrap(),
        );
        pool.push(b"not json".to_vec());
        pool.push(KeyRing::default().seal(&env(31), &l).unwrap());
        proptest!(ProptestConfig::with_cases(200), |(picks in proptest::collection::vec(0usize..pool.len(), 1..40))| {
            let mut fresh = Verifier::new(keyed.clone(), l.clone());
            let mut reusing = Verifier::new(keyed.clone(), l.clone());
            let mut env = Envelope::new(String::new(), Epoch(0), 0, Body::FullSyncBegin);
            for p in picks {
                let want = fresh.verify(&pool[p]);
                let got = reusing.verify_into(&pool[p], &mut env).map(|()| env.clone());
                prop_assert_eq!(got, want);
            }
            prop_assert_eq!(reusing.stats(), fresh.stats());
        });
    }
}
