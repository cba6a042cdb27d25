//! Typed views over [`Message`] for what hintfed reads: device and presence state events, hint
//! status, boot and list-completion events, and action responses.
//!
//! Each view is built with `X::from_message(&msg) -> Option<X>` (or `X::try_from(&msg)`), which
//! returns `None` when the message is not of that kind or lacks a required header. Views hold
//! plain strings (a device state word inline: [`CompactString`]) and integers, as Asterisk
//! sends them; unknown events stay generic [`Message`]s, untouched. Any header a view does not
//! name is still on the message.

use compact_str::CompactString;

use crate::message::Message;

/// Implements `TryFrom<&Message>` through `from_message`, with the message as the error.
macro_rules! try_from_message {
    ($ty:ident) => {
        impl<'a> TryFrom<&'a Message> for $ty {
            type Error = &'a Message;

            fn try_from(msg: &'a Message) -> Result<Self, Self::Error> {
                Self::from_message(msg).ok_or(msg)
            }
        }
    };
}

fn req(msg: &Message, key: &str) -> Option<String> {
    msg.get(key).map(str::to_owned)
}

fn opt(msg: &Message, key: &str) -> String {
    msg.get(key).unwrap_or_default().to_owned()
}

/// `Event: DeviceStateChange`: a device's state changed (or, with an `ActionID`, one item of a
/// `DeviceStateList`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStateChange {
    /// `Device`, e.g. `Custom:dnd300` or `PJSIP/100`.
    pub device: String,
    /// `State`, e.g. `INUSE`, `NOT_INUSE`, `RINGING`, `UNAVAILABLE`: a short word, held
    /// inline (no allocation for the event every state change brings).
    pub state: CompactString,
}

impl DeviceStateChange {
    /// The view, when `msg` is this event with its `Device` and `State` headers.
    pub fn from_message(msg: &Message) -> Option<Self> {
        if !msg.is_event("DeviceStateChange") {
            return None;
        }
        Some(Self {
            device: req(msg, "Device")?,
            state: msg.get("State")?.into(),
        })
    }
}
try_from_message!(DeviceStateChange);

/// `Event: PresenceStateChange`: a presence provider's state changed (or one item of a
/// `PresenceStateList`). Subtype and message are already decoded by Asterisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceStateChange {
    /// `Presentity`, e.g. `CustomPresence:alice`.
    pub presentity: String,
    /// `Status`, e.g. `available`, `away`, `dnd`, `not_set`.
    pub status: String,
    /// `Subtype`; empty when absent.
    pub subtype: String,
    /// `Message`; empty when absent.
    pub message: String,
}

impl PresenceStateChange {
    /// The view, when `msg` is this event with its `Presentity` and `Status` headers.
    pub fn from_message(msg: &Message) -> Option<Self> {
        if !msg.is_event("PresenceStateChange") {
            return None;
        }
        Some(Self {
            presentity: req(msg, "Presentity")?,
            status: req(msg, "Status")?,
            subtype: opt(msg, "Subtype"),
            message: opt(msg, "Message"),
        })
    }
}
try_from_message!(PresenceStateChange);

/// `Event: ExtensionStatus` (a hint's aggregate device state changed, or one item of an
/// `ExtensionStateList`), also the body of an `ExtensionState` action's response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionStatus {
    /// `Exten`.
    pub exten: String,
    /// `Context`.
    pub context: String,
    /// `Hint`, e.g. `Local/100@phones&Custom:Local/100@phones`; empty when absent.
    pub hint: String,
    /// `Status`, Asterisk's extension state bit set (0 idle, 1 in use, 2 busy, 4 unavailable,
    /// 8 ringing, 16 on hold, -1 removed, -2 deactivated).
    pub status: i32,
    /// `StatusText`, e.g. `Idle`, `InUse`, `Ringing`; empty when absent.
    pub status_text: String,
}

impl ExtensionStatus {
    /// The view, when `msg` is an `ExtensionStatus` event, or a successful `ExtensionState`
    /// response (it carries the same headers), with `Exten`, `Context` and a numeric `Status`.
    pub fn from_message(msg: &Message) -> Option<Self> {
        let is_response = msg.event().is_none()
            && msg
                .response()
                .is_some_and(|r| r.eq_ignore_ascii_case("Success"));
        if !msg.is_event("ExtensionStatus") && !is_response {
            return None;
        }
        Some(Self {
            exten: req(msg, "Exten")?,
            context: req(msg, "Context")?,
            hint: opt(msg, "Hint"),
            status: msg.get("Status")?.trim().parse().ok()?,
            status_text: opt(msg, "StatusText"),
        })
    }
}
try_from_message!(ExtensionStatus);

/// `Event: PresenceStatus`: the presence part of a hint changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceStatus {
    /// `Exten`.
    pub exten: String,
    /// `Context`.
    pub context: String,
    /// `Hint`, e.g. `Custom:shared400,CustomPresence:alice`; empty when absent.
    pub hint: String,
    /// `Status`, e.g. `away`, `dnd`.
    pub status: String,
    /// `Subtype`; empty when absent.
    pub subtype: String,
    /// `Message`; empty when absent.
    pub message: String,
}

impl PresenceStatus {
    /// The view, when `msg` is this event with `Exten`, `Context` and `Status`.
    pub fn from_message(msg: &Message) -> Option<Self> {
        if !msg.is_event("PresenceStatus") {
            return None;
        }
        Some(Self {
            exten: req(msg, "Exten")?,
            context: req(msg, "Context")?,
            hint: opt(msg, "Hint"),
            status: req(msg, "Status")?,
            subtype: opt(msg, "Subtype"),
            message: opt(msg, "Message"),
        })
    }
}
try_from_message!(PresenceStatus);

/// `Event: FullyBooted`: sent after login (and at boot) once Asterisk is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullyBooted {
    /// `Uptime`, seconds since start, when present and numeric.
    pub uptime: Option<u64>,
    /// `LastReload`, seconds since the last reload, when present and numeric.
    pub last_reload: Option<u64>,
    /// `Status`, e.g. `Fully Booted`; empty when absent.
    pub status: String,
}

impl FullyBooted {
    /// The view, when `msg` is this event.
    pub fn from_message(msg: &Message) -> Option<Self> {
        if !msg.is_event("FullyBooted") {
            return None;
        }
        let num = |k| msg.get(k).and_then(|v| v.trim().parse().ok());
        Some(Self {
            uptime: num("Uptime"),
            last_reload: num("LastReload"),
            status: opt(msg, "Status"),
        })
    }
}
try_from_message!(FullyBooted);

/// A list-completion event, e.g. `DeviceStateListComplete` with `EventList: Complete` and
/// `ListItems: N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListComplete {
    /// The event name, e.g. `DeviceStateListComplete`.
    pub event: String,
    /// `ActionID` of the list action, when present.
    pub action_id: Option<String>,
    /// `ListItems`, when present and numeric.
    pub list_items: Option<usize>,
}

impl ListComplete {
    /// The view, when `msg` is an event that ends a list: `EventList: Complete`, or an event
    /// name ending in `Complete` (older versions omit `EventList`).
    pub fn from_message(msg: &Message) -> Option<Self> {
        let event = msg.event()?;
        let complete = msg
            .get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("Complete"))
            || event.ends_with("Complete");
        if !complete {
            return None;
        }
        Some(Self {
            event: event.to_owned(),
            action_id: msg.action_id().map(str::to_owned),
            list_items: msg.get("ListItems").and_then(|v| v.trim().parse().ok()),
        })
    }
}
try_from_message!(ListComplete);

/// The `Response:` value of an action's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseKind {
    /// `Success`.
    Success,
    /// `Error`.
    Error,
    /// `Goodbye` (answer to `Logoff`).
    Goodbye,
    /// `Follows` (raw command output on older versions).
    Follows,
    /// Any other value, as sent.
    Other(String),
}

impl ResponseKind {
    /// Classifies a `Response:` value (ASCII case-insensitive).
    pub fn parse(value: &str) -> Self {
        match value.to_ascii_lowercase().as_str() {
            "success" => Self::Success,
            "error" => Self::Error,
            "goodbye" => Self::Goodbye,
            "follows" => Self::Follows,
            _ => Self::Other(value.to_owned()),
        }
    }
}

/// An action's answer: `Response: ...` on a message that is not an event (`OriginateResponse`
/// events carry a `Response:` header too, and are not answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The `Response:` value.
    pub kind: ResponseKind,
    /// `Message`, when present.
    pub message: Option<String>,
    /// `ActionID`, when present.
    pub action_id: Option<String>,
}

impl Response {
    /// The view, when `msg` is a response.
    pub fn from_message(msg: &Message) -> Option<Self> {
        if msg.event().is_some() {
            return None;
        }
        Some(Self {
            kind: ResponseKind::parse(msg.response()?),
            message: msg.get("Message").map(str::to_owned),
            action_id: msg.action_id().map(str::to_owned),
        })
    }

    /// True for `Response: Success` (and `Follows`, which is a successful command answer).
    pub fn is_success(&self) -> bool {
        matches!(self.kind, ResponseKind::Success | ResponseKind::Follows)
    }
}
try_from_message!(Response);

/// True when `msg` is a response (not an event) saying `EventList: start`: list items follow.
pub fn starts_list(msg: &Message) -> bool {
    msg.event().is_none()
        && msg
            .get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("start"))
}

/// Any event hintfed has a typed view for; other messages are [`AnyEvent::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyEvent {
    /// See [`DeviceStateChange`].
    DeviceStateChange(DeviceStateChange),
    /// See [`PresenceStateChange`].
    PresenceStateChange(PresenceStateChange),
    /// See [`ExtensionStatus`].
    ExtensionStatus(ExtensionStatus),
    /// See [`PresenceStatus`].
    PresenceStatus(PresenceStatus),
    /// See [`FullyBooted`].
    FullyBooted(FullyBooted),
    /// See [`ListComplete`].
    ListComplete(ListComplete),
    /// Anything else (including events missing a required header), untouched.
    Other(Message),
}

impl AnyEvent {
    /// Classifies an event message.
    pub fn classify(msg: &Message) -> Self {
        let Some(name) = msg.event() else {
            return Self::Other(msg.clone());
        };
        let typed = match name.to_ascii_lowercase().as_str() {
            "devicestatechange" => {
                DeviceStateChange::from_message(msg).map(Self::DeviceStateChange)
            }
            "presencestatechange" => {
                PresenceStateChange::from_message(msg).map(Self::PresenceStateChange)
            }
            "extensionstatus" => ExtensionStatus::from_message(msg).map(Self::ExtensionStatus),
            "presencestatus" => PresenceStatus::from_message(msg).map(Self::PresenceStatus),
            "fullybooted" => FullyBooted::from_message(msg).map(Self::FullyBooted),
            _ => ListComplete::from_message(msg).map(Self::ListComplete),
        };
        typed.unwrap_or_else(|| Self::Other(msg.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_change() {
        let m = Message::new()
            .with("Event", "DeviceStateChange")
            .with("Privilege", "call,all")
            .with("Device", "Custom:dnd300")
            .with("State", "INUSE");
        let v = DeviceStateChange::from_message(&m).expect("view");
        assert_eq!(v.device, "Custom:dnd300");
        assert_eq!(v.state, "INUSE");
        assert_eq!(DeviceStateChange::try_from(&m), Ok(v.clone()));
        assert_eq!(AnyEvent::classify(&m), AnyEvent::DeviceStateChange(v));
        let no_state = Message::new()
            .with("Event", "DeviceStateChange")
            .with("Device", "x");
        assert!(DeviceStateChange::from_message(&no_state).is_none());
        assert_eq!(
            AnyEvent::classify(&no_state),
            AnyEvent::Other(no_state.clone())
        );
        assert!(PresenceStateChange::from_message(&m).is_none());
    }

    #[test]
    fn extension_status_event_and_response() {
        let ev = Message::new()
            .with("Event", "ExtensionStatus")
            .with("Exten", "100")
            .with("Context", "test")
            .with("Hint", "Local/100@phones&Custom:Local/100@phones")
            .with("Status", "8")
            .with("StatusText", "Ringing");
        let v = ExtensionStatus::from_message(&ev).expect("event");
        assert_eq!(v.status, 8);
        assert_eq!(v.status_text, "Ringing");
        let resp = Message::new()
            .with("Response", "Success")
            .with("ActionID", "es1")
            .with("Message", "Extension Status")
            .with("Exten", "100")
            .with("Context", "test")
            .with("Hint", "Local/100@phones&Custom:Local/100@phones")
            .with("Status", "-1")
            .with("StatusText", "Unknown");
        assert_eq!(
            ExtensionStatus::from_message(&resp).expect("resp").status,
            -1
        );
        let bad = ev.clone().with("X", "y");
        let mut bad = bad;
        bad.set("Status", "ringing");
        assert!(ExtensionStatus::from_message(&bad).is_none());
    }

    #[test]
    fn responses_are_not_events() {
        let originate = Message::new()
            .with("Event", "OriginateResponse")
            .with("ActionID", "or1")
            .with("Response", "Success");
        assert!(Response::from_message(&originate).is_none());
        let err = Message::new()
            .with("Response", "Error")
            .with("ActionID", "li1")
            .with("Message", "Authentication failed");
        let r = Response::from_message(&err).expect("response");
        assert_eq!(r.kind, ResponseKind::Error);
        assert!(!r.is_success());
        assert_eq!(r.message.as_deref(), Some("Authentication failed"));
        assert_eq!(ResponseKind::parse("goodbye"), ResponseKind::Goodbye);
        assert_eq!(
            ResponseKind::parse("Weird"),
            ResponseKind::Other("Weird".into())
        );
    }

    #[test]
    fn list_complete_and_fully_booted() {
        let c = Message::new()
            .with("Event", "DeviceStateListComplete")
            .with("ActionID", "d")
            .with("EventList", "Complete")
            .with("ListItems", "502");
        let v = ListComplete::from_message(&c).expect("complete");
        assert_eq!(v.list_items, Some(502));
        assert_eq!(v.event, "DeviceStateListComplete");
        assert_eq!(AnyEvent::classify(&c), AnyEvent::ListComplete(v));
        let fb = Message::new()
            .with("Event", "FullyBooted")
            .with("Uptime", "21")
            .with("LastReload", "21")
            .with("Status", "Fully Booted");
        let v = FullyBooted::from_message(&fb).expect("fb");
        assert_eq!(v.uptime, Some(21));
        assert_eq!(v.status, "Fully Booted");
        let start = Message::new()
            .with("Response", "Success")
            .with("EventList", "start");
        assert!(starts_list(&start));
        assert!(!starts_list(&c));
    }
}
