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

/// One event: its class (for the mask) and the message as sent.
#[derive(Clone)]
pub struct SimEvent {
    /// The event class, one of the flags above.
    pub category: u32,
    /// The message as sent (what `AmiCodec` encodes), made with the event and shared by every
    /// session, or `None` when the codec refuses it (a CR or LF in a value): each session
    /// then hands the codec the message and fails the same way.
    wire: Option<Bytes>,
    /// The complete message, `Event:` first: kept as made when the codec refuses it, else
    /// read back from `wire` on first use (sessions write `wire` and filter on its text: only
    /// the app_ami_kafka mode and tests ask for the message).
    message: OnceLock<Message>,
    /// The text for filters when the message cannot be encoded.
    text: OnceLock<String>,
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
        self.category == other.category && self.message() == other.message()
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

    /// [`SimEvent::new`] with the body as `(key, value)` pairs, encoded straight from them
    /// (one allocation; the message itself is made only if asked for).
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
        let mut wire = BytesMut::new();
        if encode_headers(headers.clone(), &mut wire).is_ok() {
            return Self {
                category,
                wire: Some(wire.freeze()),
                message: OnceLock::new(),
                text: OnceLock::new(),
            };
        }
        let bytes = headers.clone().map(|(k, v)| k.len() + v.len()).sum();
        let mut message = Message::with_capacity(bytes, headers.clone().count());
        for (k, v) in headers {
            message.push(k, v);
        }
        Self {
            category,
            wire: None,
            message: OnceLock::from(message),
            text: OnceLock::new(),
        }
    }

    /// The complete message, `Event:` first.
    pub fn message(&self) -> &Message {
        self.message.get_or_init(|| {
            let mut m = Message::new();
            // `Key: Value` lines and an empty line, as the encoder wrote them from valid
            // headers: the key holds no colon, so the first ": " ends it, and no value holds
            // CR or LF.
            let lines = self
                .wire
                .as_deref()
                .and_then(|w| std::str::from_utf8(w).ok())
                .and_then(|t| t.strip_suffix("\r\n"))
                .unwrap_or_default();
            for line in lines.split_terminator("\r\n") {
                let (k, v) = line.split_once(": ").unwrap_or((line, ""));
                m.push(k, v);
            }
            m
        })
    }

    /// The message as `AmiCodec` writes it (shared by every session), or `None` when the
    /// codec refuses to encode it.
    pub fn wire(&self) -> Option<&Bytes> {
        self.wire.as_ref()
    }

    /// The event's text as Asterisk matches session filters against it: every line
    /// `Key: Value\r\n`, `Event:` first (made on first use, then kept).
    pub fn text(&self) -> &str {
        if let Some(wire) = self.wire()
            && let Some(lines) = wire.strip_suffix(b"\r\n")
            && let Ok(text) = std::str::from_utf8(lines)
        {
            // The encoded message is these lines and the empty line that ends it.
            return text;
        }
        self.text.get_or_init(|| {
            let message = self.message();
            let mut t = String::with_capacity(message.text_len() + 4 * message.len());
            for (k, v) in message.headers() {
                t.push_str(k);
                t.push_str(": ");
                t.push_str(v);
                t.push_str("\r\n");
            }
            t
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
            // The message is the same either way (kept, or read back from the wire).
            assert_eq!(ev.message(), &m, "{k:?}: {v:?}");
        }
        assert_eq!(
            ev.text(),
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
            bad.text(),
            "Event: PresenceStateChange\r\nPrivilege: call,all\r\nMessage: a\r\nb\r\n"
        );
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
