//! Manager events as the simulator broadcasts them: a [`Message`] plus the event class
//! (`EVENT_FLAG_*` of Asterisk's `manager.h`) sessions filter on, and the `Events` mask parser.

use std::sync::OnceLock;

use hintfed_ami::Message;
use hintfed_ami::codec::encode_headers;
use tokio_util::bytes::{Bytes, BytesMut};

/// `EVENT_FLAG_SYSTEM`.
pub const SYSTEM: u32 = 1;
/// `EVENT_FLAG_CALL`.
pub const CALL: u32 = 2;
/// `EVENT_FLAG_COMMAND`.
pub const COMMAND: u32 = 16;
/// `EVENT_FLAG_REPORTING`.
pub const REPORTING: u32 = 512;
/// `EVENT_FLAG_DIALPLAN`.
pub const DIALPLAN: u32 = 2048;
/// `EVENT_FLAG_ORIGINATE`.
pub const ORIGINATE: u32 = 4096;
/// `EVENT_FLAG_SECURITY`.
pub const SECURITY: u32 = 131_072;
/// Every class (`all`).
pub const ALL: u32 = i32::MAX as u32;

/// Asterisk's `perms[]` table: label and flag, in the order `authority_to_str` prints them.
const PERMS: &[(&str, u32)] = &[
    ("system", 1),
    ("call", 2),
    ("log", 4),
    ("verbose", 8),
    ("command", 16),
    ("agent", 32),
    ("user", 64),
    ("config", 128),
    ("dtmf", 256),
    ("reporting", 512),
    ("cdr", 1024),
    ("dialplan", 2048),
    ("originate", 4096),
    ("agi", 8192),
    ("cc", 16_384),
    ("aoc", 32_768),
    ("test", 65_536),
    ("security", 131_072),
    ("message", 262_144),
    ("all", ALL),
];

/// [`privilege`] without a new `String` for the classes events are sent with.
fn privilege_cached(category: u32) -> std::borrow::Cow<'static, str> {
    static ONE_CLASS: OnceLock<Vec<String>> = OnceLock::new();
    if category.is_power_of_two() && category < (1 << 19) {
        let table =
            ONE_CLASS.get_or_init(|| (0..19).map(|bit| privilege(1 << bit)).collect::<Vec<_>>());
        if let Some(p) = table.get(category.trailing_zeros() as usize) {
            return std::borrow::Cow::Borrowed(p.as_str());
        }
    }
    std::borrow::Cow::Owned(privilege(category))
}

/// The `Privilege:` value of an event of class `category`, e.g. `call,all`.
pub fn privilege(category: u32) -> String {
    let labels: Vec<&str> = PERMS
        .iter()
        .filter(|(_, flag)| category & flag != 0)
        .map(|(label, _)| *label)
        .collect();
    if labels.is_empty() {
        "<none>".to_owned()
    } else {
        labels.join(",")
    }
}

/// Parses an `Events`/`EventMask` value like Asterisk's `strings_to_mask`: `None` when empty
/// (invalid), a number as is, `off`/`no`/`false`/`0` → 0, `on`/`yes`/`true`/... → all,
/// else the OR of the listed class names (unknown names count for nothing).
pub fn parse_mask(value: &str) -> Option<u32> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(v.parse::<u32>().unwrap_or(0));
    }
    let lower = v.to_ascii_lowercase();
    if matches!(lower.as_str(), "no" | "false" | "n" | "f" | "0" | "off") {
        return Some(0);
    }
    if matches!(lower.as_str(), "yes" | "true" | "y" | "t" | "1" | "on") {
        return Some(PERMS.iter().fold(0, |acc, (_, f)| acc | f));
    }
    let words: Vec<&str> = lower.split(',').map(str::trim).collect();
    Some(
        PERMS
            .iter()
            .filter(|(label, _)| words.contains(label))
            .fold(0, |acc, (_, f)| acc | f),
    )
}

/// An event's headers as made: every key and value one after the other in one string, and
/// their lengths (inline for up to [`Parts::FEW`] headers): one allocation, nothing checked
/// or formatted until the wire bytes or the message are asked for.
#[derive(Clone)]
struct Parts {
    text: String,
    lens: Lens,
}

/// Key and value lengths of [`Parts`], in header order.
#[derive(Clone)]
enum Lens {
    /// Up to [`Parts::FEW`] headers: how many, and their lengths.
    Few(usize, [u32; 2 * Parts::FEW]),
    Many(Vec<u32>),
}

impl Parts {
    const FEW: usize = 8;

    fn new<'a, I>(headers: I) -> Self
    where
        I: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        let n = headers.clone().count();
        let bytes = headers.clone().map(|(k, v)| k.len() + v.len()).sum();
        let mut text = String::with_capacity(bytes);
        // Lengths past 4 GiB cannot occur (the codec's limits are far below).
        let len = |s: &str| u32::try_from(s.len()).unwrap_or(u32::MAX);
        let lens = if n <= Self::FEW {
            let mut few = [0; 2 * Self::FEW];
            for ((k, v), slot) in headers.zip(few.chunks_exact_mut(2)) {
                text.push_str(k);
                text.push_str(v);
                slot.copy_from_slice(&[len(k), len(v)]);
            }
            Lens::Few(n, few)
        } else {
            let mut many = Vec::with_capacity(2 * n);
            for (k, v) in headers {
                text.push_str(k);
                text.push_str(v);
                many.extend([len(k), len(v)]);
            }
            Lens::Many(many)
        };
        Self { text, lens }
    }

    /// The headers, in order.
    fn headers(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        let lens: &[u32] = match &self.lens {
            Lens::Few(n, few) => few.get(..2 * n).unwrap_or_default(),
            Lens::Many(many) => many,
        };
        lens.chunks_exact(2).scan(0usize, |at, kv| {
            let (k, v) = (kv[0] as usize, kv[1] as usize);
            let key = self.text.get(*at..*at + k).unwrap_or_default();
            let value = self.text.get(*at + k..*at + k + v).unwrap_or_default();
            *at += k + v;
            Some((key, value))
        })
    }

    fn len(&self) -> usize {
        match &self.lens {
            Lens::Few(n, _) => *n,
            Lens::Many(many) => many.len() / 2,
        }
    }
}

/// One event: its class (for the mask) and the message as sent.
#[derive(Clone)]
pub struct SimEvent {
    /// The event class, one of the flags above.
    pub category: u32,
    /// Its headers, as made.
    parts: Parts,
    /// The message as sent (what `AmiCodec` encodes), made on first use (a session's write)
    /// and then shared by every session, or `None` when the codec refuses it (a CR or LF in a
    /// value): each session then hands the codec the message and fails the same way.
    wire: OnceLock<Option<Bytes>>,
    /// The complete message, `Event:` first, made on first use (sessions write `wire` and
    /// filter on [`SimEvent::with_text`]: the app_ami_kafka mode, refused events and tests ask
    /// for it).
    message: OnceLock<Message>,
}

impl std::fmt::Debug for SimEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEvent")
            .field("category", &self.category)
            .field("message", self.message())
            .finish()
    }
}

impl PartialEq for SimEvent {
    fn eq(&self, other: &Self) -> bool {
        self.category == other.category && self.parts.headers().eq(other.parts.headers())
    }
}

impl Eq for SimEvent {}

impl SimEvent {
    /// A manager event as `manager_event()` formats it: `Event`, `Privilege`, `SystemName`
    /// (when the server has one), then `body`.
    pub fn new(name: &str, category: u32, system_name: Option<&str>, body: Message) -> Self {
        let body: Vec<(&str, &str)> = body.headers().collect();
        Self::with_body(name, category, system_name, &body)
    }

    /// [`SimEvent::new`] with the body as `(key, value)` pairs, copied straight into the
    /// event (one allocation; the wire bytes and the message are made only if asked for).
    pub fn with_body(
        name: &str,
        category: u32,
        system_name: Option<&str>,
        body: &[(&str, &str)],
    ) -> Self {
        let privilege = privilege_cached(category);
        let headers = [("Event", name), ("Privilege", &*privilege)]
            .into_iter()
            .chain(system_name.map(|s| ("SystemName", s)))
            .chain(body.iter().copied());
        Self {
            category,
            parts: Parts::new(headers),
            wire: OnceLock::new(),
            message: OnceLock::new(),
        }
    }

    /// The complete message, `Event:` first.
    pub fn message(&self) -> &Message {
        self.message.get_or_init(|| {
            let mut m = Message::with_capacity(self.parts.text.len(), self.parts.len());
            for (k, v) in self.parts.headers() {
                m.push(k, v);
            }
            m
        })
    }

    /// The message as `AmiCodec` writes it (made on first use, then shared by every
    /// session), or `None` when the codec refuses to encode it.
    pub fn wire(&self) -> Option<&Bytes> {
        self.wire
            .get_or_init(|| {
                let mut buf = BytesMut::new();
                encode_headers(self.parts.headers(), &mut buf)
                    .ok()
                    .map(|()| buf.freeze())
            })
            .as_ref()
    }

    /// Calls `f` with the event's text as Asterisk matches session filters against it: every
    /// line `Key: Value\r\n`, `Event:` first (what the wire holds before its empty line, and
    /// the same lines when the codec refuses the event). Made per call in a buffer of the
    /// thread's, not kept: most events a filter looks at are filtered out (an agent's
    /// session excludes the echo of its own writes), and those are then never encoded.
    /// `f` must not call `with_text` itself.
    pub fn with_text<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        thread_local! {
            static TEXT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        TEXT.with_borrow_mut(|t| {
            t.clear();
            for (k, v) in self.parts.headers() {
                t.push_str(k);
                t.push_str(": ");
                t.push_str(v);
                t.push_str("\r\n");
            }
            f(t)
        })
    }

    /// Whether a session with event mask `mask` receives this event (Asterisk checks read
    /// permission and the session's `send_events` the same way: every bit of the class).
    pub fn passes(&self, mask: u32) -> bool {
        mask & self.category == self.category
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hintfed_ami::AmiCodec;
    use tokio_util::codec::Encoder as _;

    #[test]
    fn privilege_strings_match_the_captures() {
        assert_eq!(privilege(CALL), "call,all");
        assert_eq!(privilege(SYSTEM), "system,all");
        assert_eq!(privilege(SECURITY), "security,all");
        assert_eq!(privilege(DIALPLAN), "dialplan,all");
    }

    #[test]
    fn masks() {
        assert_eq!(parse_mask(""), None);
        assert_eq!(parse_mask("off"), Some(0));
        assert_eq!(parse_mask("system,call"), Some(3));
        assert_eq!(parse_mask("nonsense"), Some(0));
        assert_eq!(parse_mask("6"), Some(6));
        let all = parse_mask("on").expect("on");
        let ev = SimEvent::new("X", SECURITY, None, Message::new());
        assert!(ev.passes(all));
        assert!(!ev.passes(3));
    }

    #[test]
    fn cached_privileges_equal_the_computed_ones() {
        for bit in 0..32 {
            assert_eq!(privilege_cached(1 << bit), privilege(1 << bit));
        }
        assert_eq!(privilege_cached(CALL | SYSTEM), privilege(CALL | SYSTEM));
        assert_eq!(privilege_cached(0), privilege(0));
    }

    /// `DeviceStateChange` of `Custom:a` to `INUSE` on `pbx-a`.
    fn custom_a_inuse() -> SimEvent {
        SimEvent::new(
            "DeviceStateChange",
            CALL,
            Some("pbx-a"),
            Message::new()
                .with("Device", "Custom:a")
                .with("State", "INUSE"),
        )
    }

    #[test]
    fn wire_and_text_are_what_the_codec_writes() {
        let ev = custom_a_inuse();
        let mut encoded = BytesMut::new();
        AmiCodec::server()
            .encode(ev.message(), &mut encoded)
            .expect("encodable");
        assert_eq!(ev.wire().map(|b| &b[..]), Some(&encoded[..]));
        // Refused exactly where the codec refuses.
        for (k, v) in [
            ("", "x"),
            ("a:b", "x"),
            ("a\rb", "x"),
            ("a\nb", "x"),
            ("a", "x\ry"),
            ("a", "x\ny"),
            ("a", ""),
            ("é", "ü: v"),
            ("a", " x"),
            ("a", "b: c:: d"),
        ] {
            let m = Message::new()
                .with("Event", "X")
                .with("Privilege", "call,all")
                .with(k, v);
            let codec = AmiCodec::server().encode(&m, &mut BytesMut::new()).is_ok();
            let ev = SimEvent::with_body("X", CALL, None, &[(k, v)]);
            assert_eq!(ev.wire().is_some(), codec, "{k:?}: {v:?}");
            // The message is the one made of the parts, encodable or not.
            assert_eq!(ev.message(), &m, "{k:?}: {v:?}");
        }
        // The text is the wire without its empty line.
        let wire = ev.wire().expect("encodable");
        assert_eq!(ev.with_text(|t| format!("{t}\r\n")).as_bytes(), &wire[..]);
        assert_eq!(
            ev.with_text(str::to_owned),
            "Event: DeviceStateChange\r\nPrivilege: call,all\r\nSystemName: pbx-a\r\n\
             Device: Custom:a\r\nState: INUSE\r\n"
        );
        let bad = SimEvent::new(
            "PresenceStateChange",
            CALL,
            None,
            Message::new().with("Message", "a\r\nb"),
        );
        assert!(bad.wire().is_none());
        assert_eq!(
            bad.with_text(str::to_owned),
            "Event: PresenceStateChange\r\nPrivilege: call,all\r\nMessage: a\r\nb\r\n"
        );
    }

    #[test]
    fn events_of_any_size_keep_their_headers_in_order() {
        for n in [0, 5, 6, 7, 20] {
            let body: Vec<(String, String)> =
                (0..n).map(|i| (format!("K{i}"), "é".repeat(i))).collect();
            let pairs: Vec<(&str, &str)> =
                body.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let ev = SimEvent::with_body("X", CALL, Some("pbx-a"), &pairs);
            let mut m = Message::new()
                .with("Event", "X")
                .with("Privilege", "call,all")
                .with("SystemName", "pbx-a");
            for (k, v) in &pairs {
                m.push(k, v);
            }
            assert_eq!(ev.message(), &m, "{n} headers");
            let mut encoded = BytesMut::new();
            AmiCodec::server()
                .encode(&m, &mut encoded)
                .expect("encodable");
            assert_eq!(ev.wire().map(|b| &b[..]), Some(&encoded[..]), "{n} headers");
            let mut body = Message::new();
            for (k, v) in &pairs {
                body.push(k, v);
            }
            assert_eq!(ev, SimEvent::new("X", CALL, Some("pbx-a"), body));
        }
    }

    #[test]
    fn header_order() {
        let ev = custom_a_inuse();
        let keys: Vec<&str> = ev.message().headers().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["Event", "Privilege", "SystemName", "Device", "State"]
        );
    }
}
