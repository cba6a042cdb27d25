//! res_zmq_manager's JSON forms (see `shared/fixtures/res_zmq_manager/`).
//!
//! Requests are one JSON object per action; replies are a JSON array of AMI messages without
//! `ActionID`; events are one compact JSON object per frame, every value a string.

use hintfed_ami::Message;
use serde_json::{Map, Value};

/// Why a frame from the module could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not JSON, or not the expected shape.
    #[error("res_zmq_manager sent {what}: {detail}")]
    Malformed {
        /// What was expected.
        what: &'static str,
        /// What went wrong.
        detail: String,
    },
}

/// One action as the JSON object the module takes (`ActionID` left out: replies carry none).
pub fn action_to_json(action: &Message) -> Vec<u8> {
    let mut obj = Map::new();
    for (k, v) in action.headers() {
        if k.eq_ignore_ascii_case("ActionID") {
            continue;
        }
        obj.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Value::Object(obj).to_string().into_bytes()
}

fn object_to_message(obj: &Map<String, Value>) -> Message {
    obj.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// One event frame (a JSON object) as a message.
pub fn event_from_json(frame: &[u8]) -> Result<Message, JsonError> {
    match serde_json::from_slice::<Value>(frame) {
        Ok(Value::Object(obj)) => Ok(object_to_message(&obj)),
        Ok(_) => Err(JsonError::Malformed {
            what: "an event that is not a JSON object",
            detail: String::new(),
        }),
        Err(e) => Err(JsonError::Malformed {
            what: "an event that is not JSON",
            detail: e.to_string(),
        }),
    }
}

/// A reply (a JSON array of objects) as messages, in order.
///
/// The module's error form `[{"Response":"Error"},{"Message":"Internal error."}]` is folded
/// into one `Response: Error` message with its `Message`.
pub fn reply_from_json(frame: &[u8]) -> Result<Vec<Message>, JsonError> {
    let value: Value = serde_json::from_slice(frame).map_err(|e| JsonError::Malformed {
        what: "a reply that is not JSON",
        detail: e.to_string(),
    })?;
    let Value::Array(items) = value else {
        return Err(JsonError::Malformed {
            what: "a reply that is not a JSON array",
            detail: String::new(),
        });
    };
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        let Value::Object(obj) = item else {
            return Err(JsonError::Malformed {
                what: "a reply item that is not an object",
                detail: item.to_string(),
            });
        };
        out.push(object_to_message(obj));
    }
    if out.len() == 2
        && out[0].response() == Some("Error")
        && out[0].len() == 1
        && out[1].len() == 1
        && let Some(text) = out[1].get("Message")
    {
        let merged = Message::new()
            .with("Response", "Error")
            .with("Message", text);
        return Ok(vec![merged]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/res_zmq_manager"
    );

    #[test]
    fn every_captured_reply_and_event_parses() {
        let cmd = std::fs::read_to_string(format!("{FIXTURES}/cmd-socket.txt")).unwrap();
        let mut replies = 0;
        for line in cmd.lines() {
            if let Some(reply) = line.strip_prefix("REPLY    ") {
                let msgs = reply_from_json(reply.as_bytes()).unwrap();
                assert!(msgs[0].response().is_some(), "{reply}");
                assert!(msgs.iter().all(|m| m.action_id().is_none()));
                replies += 1;
            }
        }
        assert!(replies >= 10, "only {replies} replies found");
        let evt = std::fs::read_to_string(format!("{FIXTURES}/evt-socket.txt")).unwrap();
        for line in evt.lines().filter(|l| !l.is_empty()) {
            let m = event_from_json(line.as_bytes()).unwrap();
            assert_eq!(m.header(0).map(|h| h.0), Some("Event"), "{line}");
        }
    }

    #[test]
    fn internal_error_folds_into_one_response() {
        let m =
            reply_from_json(br#"[{"Response":"Error"},{"Message":"Internal error."}]"#).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].get("Message"), Some("Internal error."));
    }

    #[test]
    fn hostile_frames_are_errors() {
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[1,2]",
            b"\"x\"",
            b"[",
            &[0xff, 0xfe],
        ] {
            assert!(reply_from_json(bad).is_err(), "{bad:?}");
        }
        assert!(event_from_json(b"[]").is_err());
        assert!(event_from_json(b"\xff").is_err());
    }

    #[test]
    fn action_json_has_no_action_id() {
        let a = Message::action("Setvar")
            .with("ActionID", "x")
            .with("Variable", "DEVICE_STATE(Custom:a)")
            .with("Value", "INUSE");
        let v: Value = serde_json::from_slice(&action_to_json(&a)).unwrap();
        assert_eq!(v["Action"], "Setvar");
        assert!(v.get("ActionID").is_none());
    }
}
