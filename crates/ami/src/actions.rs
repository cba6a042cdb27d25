//! Builders for the actions hintfed sends. None sets an `ActionID`: the client adds its own
//! when sending (a caller-set one is kept, see [`crate::AmiClient::send`]).

use md5::{Digest, Md5};

use crate::message::Message;

/// `Action: Login` with a plain-text `Secret`, and `Events: <mask>` when given.
pub fn login_plain(username: &str, secret: &str, events: Option<&str>) -> Message {
    let msg = Message::action("Login")
        .with("Username", username)
        .with("Secret", secret);
    with_events(msg, events)
}

/// `Action: Challenge` with `AuthType: MD5`; the answer carries `Challenge: <nonce>`.
pub fn challenge() -> Message {
    Message::action("Challenge").with("AuthType", "MD5")
}

/// The MD5 login key: lowercase hex of `md5(challenge + secret)`.
pub fn md5_key(challenge: &str, secret: &str) -> String {
    let mut h = Md5::new();
    h.update(challenge.as_bytes());
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

/// `Action: Login` with `AuthType: MD5` and `Key: md5(challenge + secret)`, and
/// `Events: <mask>` when given.
pub fn login_md5(username: &str, challenge: &str, secret: &str, events: Option<&str>) -> Message {
    let msg = Message::action("Login")
        .with("AuthType", "MD5")
        .with("Username", username)
        .with("Key", md5_key(challenge, secret));
    with_events(msg, events)
}

fn with_events(msg: Message, events: Option<&str>) -> Message {
    match events {
        Some(mask) => msg.with("Events", mask),
        None => msg,
    }
}

/// `Action: Setvar` of a global variable or function, e.g.
/// `setvar("DEVICE_STATE(Custom:dnd300)", "INUSE")`.
pub fn setvar(variable: &str, value: &str) -> Message {
    Message::action("Setvar")
        .with("Variable", variable)
        .with("Value", value)
}

/// `Action: Getvar`, e.g. `getvar("PRESENCE_STATE(CustomPresence:alice,value)")`; the answer
/// carries `Variable` and `Value`.
pub fn getvar(variable: &str) -> Message {
    Message::action("Getvar").with("Variable", variable)
}

/// `Action: DeviceStateList`: a list of `DeviceStateChange` items, then
/// `DeviceStateListComplete`.
pub fn device_state_list() -> Message {
    Message::action("DeviceStateList")
}

/// `Action: PresenceStateList`: a list of `PresenceStateChange` items, then
/// `PresenceStateListComplete`.
pub fn presence_state_list() -> Message {
    Message::action("PresenceStateList")
}

/// `Action: ExtensionStateList`: a list of `ExtensionStatus` items, then
/// `ExtensionStateListComplete`.
pub fn extension_state_list() -> Message {
    Message::action("ExtensionStateList")
}

/// `Action: ExtensionState` for one hint; the answer carries `Exten`, `Context`, `Hint`,
/// `Status` and `StatusText` (see [`crate::events::ExtensionStatus`]).
pub fn extension_state(exten: &str, context: &str) -> Message {
    Message::action("ExtensionState")
        .with("Exten", exten)
        .with("Context", context)
}

/// `Action: Events` with `EventMask: <mask>` (`on`, `off`, or a class list such as
/// `system,call`).
pub fn events(mask: &str) -> Message {
    Message::action("Events").with("EventMask", mask)
}

/// `Action: Filter` with `Operation: Add`: a filter of this session's events (Asterisk 10
/// and later; the user needs `write = system`). `filter` is a regular expression matched
/// against the whole event text; a leading `!` makes it exclude the events it matches.
pub fn filter_add(filter: &str) -> Message {
    Message::action("Filter")
        .with("Operation", "Add")
        .with("Filter", filter)
}

/// `Action: Ping`; the answer is `Response: Success` with `Ping: Pong`.
pub fn ping() -> Message {
    Message::action("Ping")
}

/// `Action: Logoff`; the answer is `Response: Goodbye`, then the server closes.
pub fn logoff() -> Message {
    Message::action("Logoff")
}

/// `Action: Command` running a CLI command; the output comes as `Output` headers.
pub fn command(cli: &str) -> Message {
    Message::action("Command").with("Command", cli)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_key_matches_the_capture() {
        // session.transcript: Challenge 105743880, secret from manager.conf.
        assert_eq!(
            md5_key("105743880", "adminsecret"),
            "ef683e4af96d9f87785ec39a45d56399"
        );
        let login = login_md5("admin", "130395580", "adminsecret", Some("on"));
        assert_eq!(login.get("Key"), Some("da3c1cdbc2d32f5cfcefb2d645df99fb"));
        assert_eq!(login.get("AuthType"), Some("MD5"));
        assert_eq!(login.get("Events"), Some("on"));
        assert!(login.get("Secret").is_none());
    }

    #[test]
    fn builders_name_their_action() {
        assert_eq!(
            login_plain("admin", "wrong", None),
            Message::action("Login")
                .with("Username", "admin")
                .with("Secret", "wrong")
        );
        assert_eq!(setvar("V", "1").get("Value"), Some("1"));
        assert_eq!(getvar("V").action_name(), Some("Getvar"));
        assert_eq!(events("system,call").get("EventMask"), Some("system,call"));
        assert_eq!(extension_state("100", "test").get("Context"), Some("test"));
        for (m, name) in [
            (challenge(), "Challenge"),
            (device_state_list(), "DeviceStateList"),
            (presence_state_list(), "PresenceStateList"),
            (extension_state_list(), "ExtensionStateList"),
            (ping(), "Ping"),
            (logoff(), "Logoff"),
            (command("core show hints"), "Command"),
        ] {
            assert_eq!(m.action_name(), Some(name));
        }
    }
}
