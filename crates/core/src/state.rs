//! The state model: Asterisk device states and their aggregation, presence values and their
//! `PRESENCE_STATE` encoding, and the [`Kind`]/[`Value`] pair carried in envelopes.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use serde::{Deserialize, Serialize};

/// Why a state string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseStateError {
    /// Not one of the nine device states Asterisk knows.
    #[error(
        "unknown device state {0:?} (expected one of UNKNOWN, NOT_INUSE, INUSE, BUSY, INVALID, UNAVAILABLE, RINGING, RINGINUSE, ONHOLD)"
    )]
    DeviceState(String),
    /// Not one of the presence statuses Asterisk accepts for `CustomPresence:`.
    #[error(
        "unknown presence status {0:?} (expected one of not_set, unavailable, available, away, xa, chat, dnd)"
    )]
    PresenceStatus(String),
    /// A `PRESENCE_STATE` value without a status.
    #[error("empty presence value")]
    EmptyPresence,
    /// A `PRESENCE_STATE` value whose options field is not `e`.
    #[error("invalid presence options {0:?} (only \"e\" is understood)")]
    PresenceOptions(String),
    /// A base64 field of an `e`-encoded `PRESENCE_STATE` value does not decode.
    #[error("invalid base64 in presence value")]
    PresenceBase64,
}

/// An Asterisk device state, spelled exactly as Asterisk spells it (`ast_devstate_str`).
///
/// The variants are declared in Asterisk's aggregation order (`state_order` in
/// `ast_devstate_aggregate_add`, main/devicestate.c), so the derived `Ord` is that order:
/// INVALID < UNKNOWN < UNAVAILABLE < NOT_INUSE < ONHOLD < RINGING < INUSE < BUSY < RINGINUSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DeviceState {
    /// `INVALID`: the device does not exist.
    #[serde(rename = "INVALID")]
    Invalid,
    /// `UNKNOWN`: the device exists but its state is not known. Asterisk refuses to write it to
    /// a `Custom:` device.
    #[serde(rename = "UNKNOWN")]
    Unknown,
    /// `UNAVAILABLE`: e.g. the phone is not registered.
    #[serde(rename = "UNAVAILABLE")]
    Unavailable,
    /// `NOT_INUSE`: idle.
    #[serde(rename = "NOT_INUSE")]
    NotInuse,
    /// `ONHOLD`.
    #[serde(rename = "ONHOLD")]
    Onhold,
    /// `RINGING`.
    #[serde(rename = "RINGING")]
    Ringing,
    /// `INUSE`.
    #[serde(rename = "INUSE")]
    Inuse,
    /// `BUSY`.
    #[serde(rename = "BUSY")]
    Busy,
    /// `RINGINUSE`: ringing while in use.
    #[serde(rename = "RINGINUSE")]
    Ringinuse,
}

impl DeviceState {
    /// Every state, in aggregation order.
    pub const ALL: [DeviceState; 9] = [
        DeviceState::Invalid,
        DeviceState::Unknown,
        DeviceState::Unavailable,
        DeviceState::NotInuse,
        DeviceState::Onhold,
        DeviceState::Ringing,
        DeviceState::Inuse,
        DeviceState::Busy,
        DeviceState::Ringinuse,
    ];

    /// The Asterisk spelling, e.g. `NOT_INUSE`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Invalid => "INVALID",
            DeviceState::Unknown => "UNKNOWN",
            DeviceState::Unavailable => "UNAVAILABLE",
            DeviceState::NotInuse => "NOT_INUSE",
            DeviceState::Onhold => "ONHOLD",
            DeviceState::Ringing => "RINGING",
            DeviceState::Inuse => "INUSE",
            DeviceState::Busy => "BUSY",
            DeviceState::Ringinuse => "RINGINUSE",
        }
    }

    /// Whether `Setvar DEVICE_STATE(Custom:x)=<state>` is accepted by Asterisk (everything but
    /// `UNKNOWN`, see the captures in `shared/fixtures/asterisk`).
    pub fn is_writable(self) -> bool {
        self != DeviceState::Unknown
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = ParseStateError;

    /// Parses the Asterisk spelling. Like Asterisk's `ast_devstate_val` the comparison ignores
    /// ASCII case; anything that is not one of the nine names is an error (Asterisk itself
    /// would silently map it to UNKNOWN).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseStateError::DeviceState(s.to_owned()))
    }
}

/// Aggregates the states of one device reported by several origins, exactly as
/// `ast_devstate_aggregate_add`/`_result` in main/devicestate.c do:
///
/// - RINGING together with any of INUSE, BUSY or ONHOLD gives RINGINUSE;
/// - otherwise the highest state in the order INVALID < UNKNOWN < UNAVAILABLE < NOT_INUSE <
///   ONHOLD < RINGING < INUSE < BUSY < RINGINUSE wins. Consequences worth knowing:
///   NOT_INUSE + UNAVAILABLE is NOT_INUSE (one idle registration makes the device idle),
///   all UNAVAILABLE stays UNAVAILABLE, UNKNOWN + UNAVAILABLE is UNAVAILABLE;
/// - the aggregate of no states at all is INVALID (the initial value in Asterisk).
///
/// The result does not depend on the order of the input.
pub fn aggregate<I: IntoIterator<Item = DeviceState>>(states: I) -> DeviceState {
    let mut ringing = false;
    let mut inuse = false;
    let mut result = DeviceState::Invalid;
    for state in states {
        match state {
            DeviceState::Ringing => ringing = true,
            DeviceState::Inuse | DeviceState::Onhold | DeviceState::Busy => inuse = true,
            _ => {}
        }
        if ringing && inuse {
            result = DeviceState::Ringinuse;
        } else if state > result {
            result = state;
        }
    }
    result
}

/// A presence status as Asterisk names it (`ast_presence_state2str`). `invalid` is not a value
/// that can be set and is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// `not_set`.
    NotSet,
    /// `unavailable`.
    Unavailable,
    /// `available`.
    Available,
    /// `away`.
    Away,
    /// `xa` (extended away).
    Xa,
    /// `chat`.
    Chat,
    /// `dnd` (do not disturb).
    Dnd,
}

impl PresenceStatus {
    /// Every status.
    pub const ALL: [PresenceStatus; 7] = [
        PresenceStatus::NotSet,
        PresenceStatus::Unavailable,
        PresenceStatus::Available,
        PresenceStatus::Away,
        PresenceStatus::Xa,
        PresenceStatus::Chat,
        PresenceStatus::Dnd,
    ];

    /// The Asterisk spelling, e.g. `not_set`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::NotSet => "not_set",
            PresenceStatus::Unavailable => "unavailable",
            PresenceStatus::Available => "available",
            PresenceStatus::Away => "away",
            PresenceStatus::Xa => "xa",
            PresenceStatus::Chat => "chat",
            PresenceStatus::Dnd => "dnd",
        }
    }
}

impl fmt::Display for PresenceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PresenceStatus {
    type Err = ParseStateError;

    /// Parses the Asterisk spelling, ignoring ASCII case as `ast_presence_state_val` does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PresenceStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseStateError::PresenceStatus(s.to_owned()))
    }
}

/// A presence state: status, subtype and message (the latter two free text, possibly empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Presence {
    /// The status.
    pub status: PresenceStatus,
    /// Free-text subtype, e.g. `lunch`.
    #[serde(default)]
    pub subtype: String,
    /// Free-text message, e.g. `back at 2`.
    #[serde(default)]
    pub message: String,
}

/// Lenient standard base64 (padding optional), like Asterisk's `ast_base64decode`.
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Whether a subtype/message can be written unencoded in a `PRESENCE_STATE` value: printable
/// ASCII only, without the field separator `,`, without characters that dialplan or AMI
/// layers treat specially (`\ " ' $ { } ; |`), and without leading or trailing blanks (AMI
/// strips them). Anything else is written in the `e` (base64) form.
fn plain_safe(s: &str) -> bool {
    s.bytes().all(|b| {
        (0x20..0x7f).contains(&b)
            && !matches!(
                b,
                b',' | b'\\' | b'"' | b'\'' | b'$' | b'{' | b'}' | b';' | b'|'
            )
    }) && !s.starts_with(' ')
        && !s.ends_with(' ')
}

impl Presence {
    /// A presence with the given status and texts.
    pub fn new(
        status: PresenceStatus,
        subtype: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Presence {
            status,
            subtype: subtype.into(),
            message: message.into(),
        }
    }

    /// Builds a presence from the `Status`, `Subtype` and `Message` fields of a
    /// `PresenceStateChange` event (Asterisk emits them decoded, so they may hold commas).
    pub fn from_event(status: &str, subtype: &str, message: &str) -> Result<Self, ParseStateError> {
        Ok(Presence::new(status.parse()?, subtype, message))
    }

    /// The value for `Setvar PRESENCE_STATE(CustomPresence:x)`: `status,subtype,message`, or
    /// `status,<base64 subtype>,<base64 message>,e` whenever either text is not
    /// [plain-safe](#method.to_setvar_value) (holds a comma, non-ASCII, control characters,
    /// quotes, `$`, braces, `;`, `|`, a backslash, or leading/trailing blanks).
    pub fn to_setvar_value(&self) -> String {
        if plain_safe(&self.subtype) && plain_safe(&self.message) {
            format!("{},{},{}", self.status, self.subtype, self.message)
        } else {
            let e = &general_purpose::STANDARD;
            format!(
                "{},{},{},e",
                self.status,
                e.encode(self.subtype.as_bytes()),
                e.encode(self.message.as_bytes())
            )
        }
    }

    /// Parses a `PRESENCE_STATE` value the way `func_presencestate.c` (`parse_data`) does:
    /// `status[,subtype[,message[,options]]]`, each field ending at the next comma; with an
    /// option containing `e` the subtype and message are base64 and decoded here. Text that is
    /// not UTF-8 after decoding is converted lossily.
    pub fn parse_setvar_value(value: &str) -> Result<Self, ParseStateError> {
        let mut fields = value.split(',');
        let status = fields.next().unwrap_or_default();
        if status.is_empty() {
            return Err(ParseStateError::EmptyPresence);
        }
        let status: PresenceStatus = status.parse()?;
        let subtype = fields.next().unwrap_or_default();
        let message = fields.next().unwrap_or_default();
        let options = fields.next().unwrap_or_default();
        if options.is_empty() {
            return Ok(Presence::new(status, subtype, message));
        }
        if !options.contains('e') {
            return Err(ParseStateError::PresenceOptions(options.to_owned()));
        }
        let decode = |s: &str| -> Result<String, ParseStateError> {
            let bytes = B64_LENIENT
                .decode(s.trim())
                .map_err(|_| ParseStateError::PresenceBase64)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        Ok(Presence::new(status, decode(subtype)?, decode(message)?))
    }
}

/// The two kinds of state hintfed federates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Device state (`DEVICE_STATE`, `DeviceStateChange`).
    Device,
    /// Presence state (`PRESENCE_STATE`, `PresenceStateChange`).
    Presence,
}

impl Kind {
    /// `device` or `presence` (also the topic prefix transports may use).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Presence => "presence",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state value of either kind. On the wire: `{"device":"INUSE"}` or
/// `{"presence":{"status":"dnd","subtype":"","message":""}}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Value {
    /// A device state.
    Device(DeviceState),
    /// A presence state.
    Presence(Presence),
}

impl Value {
    /// The kind of this value.
    pub fn kind(&self) -> Kind {
        match self {
            Value::Device(_) => Kind::Device,
            Value::Presence(_) => Kind::Presence,
        }
    }

    /// The text written with `Setvar` for this value: the device state name, or
    /// [`Presence::to_setvar_value`].
    pub fn to_setvar_value(&self) -> Cow<'static, str> {
        match self {
            Value::Device(s) => Cow::Borrowed(s.as_str()),
            Value::Presence(p) => Cow::Owned(p.to_setvar_value()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Device(s) => write!(f, "{s}"),
            Value::Presence(p) => write!(f, "{},{},{}", p.status, p.subtype, p.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceState::*;
    use super::*;

    #[test]
    fn device_state_round_trips_and_rejects_others() {
        for st in DeviceState::ALL {
            assert_eq!(st.to_string().parse::<DeviceState>(), Ok(st));
            assert_eq!(
                serde_json::to_string(&st).unwrap(),
                format!("\"{}\"", st.as_str())
            );
        }
        assert_eq!("not_inuse".parse::<DeviceState>(), Ok(NotInuse));
        for bad in ["", "IDLE", "IN_USE", "NOT INUSE", "INUSE ", "1"] {
            let err = bad.parse::<DeviceState>().unwrap_err();
            assert!(err.to_string().contains("unknown device state"), "{err}");
        }
        assert!(serde_json::from_str::<DeviceState>("\"inuse\"").is_err());
    }

    /// Expected aggregate of every pair, rows and columns in the order
    /// INVALID UNKNOWN UNAVAILABLE NOT_INUSE ONHOLD RINGING INUSE BUSY RINGINUSE,
    /// written out by hand from main/devicestate.c.
    const PAIRS: [[&str; 9]; 9] = [
        // INVALID
        [
            "INVALID",
            "UNKNOWN",
            "UNAVAILABLE",
            "NOT_INUSE",
            "ONHOLD",
            "RINGING",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ],
        // UNKNOWN
        [
            "UNKNOWN",
            "UNKNOWN",
            "UNAVAILABLE",
            "NOT_INUSE",
            "ONHOLD",
            "RINGING",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ],
        // UNAVAILABLE
        [
            "UNAVAILABLE",
            "UNAVAILABLE",
            "UNAVAILABLE",
            "NOT_INUSE",
            "ONHOLD",
            "RINGING",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ],
        // NOT_INUSE
        [
            "NOT_INUSE",
            "NOT_INUSE",
            "NOT_INUSE",
            "NOT_INUSE",
            "ONHOLD",
            "RINGING",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ],
        // ONHOLD
        [
            "ONHOLD",
            "ONHOLD",
            "ONHOLD",
            "ONHOLD",
            "ONHOLD",
            "RINGINUSE",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ],
        // RINGING
        [
            "RINGING",
            "RINGING",
            "RINGING",
            "RINGING",
            "RINGINUSE",
            "RINGING",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
        ],
        // INUSE
        [
            "INUSE",
            "INUSE",
            "INUSE",
            "INUSE",
            "INUSE",
            "RINGINUSE",
            "INUSE",
            "BUSY",
            "RINGINUSE",
        ],
        // BUSY
        [
            "BUSY",
            "BUSY",
            "BUSY",
            "BUSY",
            "BUSY",
            "RINGINUSE",
            "BUSY",
            "BUSY",
            "RINGINUSE",
        ],
        // RINGINUSE
        [
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
            "RINGINUSE",
        ],
    ];

    #[test]
    fn aggregate_every_pair_matches_table() {
        for (i, a) in DeviceState::ALL.into_iter().enumerate() {
            for (j, b) in DeviceState::ALL.into_iter().enumerate() {
                let want: DeviceState = PAIRS[i][j].parse().unwrap();
                assert_eq!(aggregate([a, b]), want, "{a} + {b}");
                assert_eq!(aggregate([b, a]), want, "{b} + {a}");
            }
        }
    }

    #[test]
    fn aggregate_edge_cases() {
        assert_eq!(aggregate([]), Invalid);
        assert_eq!(
            aggregate([Unavailable, Unavailable, Unavailable]),
            Unavailable
        );
        assert_eq!(aggregate([NotInuse, Unavailable]), NotInuse);
        assert_eq!(aggregate([Ringing, NotInuse, Onhold]), Ringinuse);
        assert_eq!(aggregate([Ringinuse, Ringing]), Ringinuse);
    }

    #[test]
    fn aggregate_is_order_independent() {
        use proptest::prelude::*;
        let states =
            proptest::collection::vec(proptest::sample::select(DeviceState::ALL.to_vec()), 0..8);
        proptest!(ProptestConfig::with_cases(200), |(v in states)| {
            let mut r = v.clone();
            r.reverse();
            prop_assert_eq!(aggregate(v.clone()), aggregate(r));
        });
    }

    #[test]
    fn presence_plain_and_encoded_forms() {
        let p = Presence::new(PresenceStatus::Away, "lunch", "back at 2");
        assert_eq!(p.to_setvar_value(), "away,lunch,back at 2");
        // The exact value from the captures.
        let p = Presence::new(
            PresenceStatus::Dnd,
            "meeting, room 4",
            "in a meeting, sorry",
        );
        assert_eq!(
            p.to_setvar_value(),
            "dnd,bWVldGluZywgcm9vbSA0,aW4gYSBtZWV0aW5nLCBzb3JyeQ==,e"
        );
        let p = Presence::new(PresenceStatus::Available, "", "");
        assert_eq!(p.to_setvar_value(), "available,,");
        for text in [
            "café",
            "a\r\nAction: Originate",
            " lead",
            "trail ",
            "$x",
            "a;b",
        ] {
            let p = Presence::new(PresenceStatus::Chat, text, "ok");
            let v = p.to_setvar_value();
            assert!(v.ends_with(",e"), "{v}");
            assert!(!v.contains('\n'));
            assert_eq!(Presence::parse_setvar_value(&v).unwrap(), p);
        }
    }

    #[test]
    fn presence_parses_what_asterisk_takes() {
        assert_eq!(
            Presence::parse_setvar_value("away,lunch,back at 2").unwrap(),
            Presence::new(PresenceStatus::Away, "lunch", "back at 2")
        );
        assert_eq!(
            Presence::parse_setvar_value("dnd,bWVldGluZywgcm9vbSA0,aW4gYSBtZWV0aW5nLCBzb3JyeQ==,e")
                .unwrap(),
            Presence::new(
                PresenceStatus::Dnd,
                "meeting, room 4",
                "in a meeting, sorry"
            )
        );
        assert_eq!(
            Presence::parse_setvar_value("DND").unwrap(),
            Presence::new(PresenceStatus::Dnd, "", "")
        );
        assert_eq!(
            Presence::parse_setvar_value("xa,sub").unwrap(),
            Presence::new(PresenceStatus::Xa, "sub", "")
        );
        assert!(matches!(
            Presence::parse_setvar_value(""),
            Err(ParseStateError::EmptyPresence)
        ));
        assert!(matches!(
            Presence::parse_setvar_value("invalid,a,b"),
            Err(ParseStateError::PresenceStatus(_))
        ));
        assert!(matches!(
            Presence::parse_setvar_value("away,a,b,x"),
            Err(ParseStateError::PresenceOptions(_))
        ));
        assert!(matches!(
            Presence::parse_setvar_value("away,@@@,b,e"),
            Err(ParseStateError::PresenceBase64)
        ));
        // Event fields come decoded.
        assert_eq!(
            Presence::from_event("dnd", "meeting, room 4", "in a meeting, sorry").unwrap(),
            Presence::new(
                PresenceStatus::Dnd,
                "meeting, room 4",
                "in a meeting, sorry"
            )
        );
        assert!(Presence::from_event("busy", "", "").is_err());
    }

    #[test]
    fn presence_round_trips_any_text() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(300), |(s in ".{0,40}", m in ".{0,40}", i in 0usize..7)| {
            let p = Presence::new(PresenceStatus::ALL[i], s, m);
            let v = p.to_setvar_value();
            prop_assert!(!v.contains('\r') && !v.contains('\n'));
            prop_assert_eq!(Presence::parse_setvar_value(&v).unwrap(), p);
        });
    }

    #[test]
    fn value_wire_form() {
        assert_eq!(
            serde_json::to_string(&Value::Device(NotInuse)).unwrap(),
            r#"{"device":"NOT_INUSE"}"#
        );
        let v = Value::Presence(Presence::new(PresenceStatus::NotSet, "", ""));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"presence":{"status":"not_set","subtype":"","message":""}}"#
        );
        assert_eq!(v.kind(), Kind::Presence);
    }
}
