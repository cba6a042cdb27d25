//! What a [`Pbx`](crate::Pbx) reports, and the list items it reads.

use hintfed_ami::{DeviceStateChange, ExtensionStatus, Message, PresenceStateChange};

/// One thing that happened on the Asterisk side, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PbxEvent {
    /// Actions are served (again). Whatever the relay knew about this Asterisk may be stale:
    /// it must list local state again and re-apply every remote state (Asterisk may have
    /// restarted, which renames `Custom:` devices whose name holds `/`).
    Up {
        /// Counts `Up` events since start, from 1.
        generation: u64,
    },
    /// The Asterisk is unreachable; writes fail until the next [`PbxEvent::Up`].
    Down {
        /// Why, for logs and the status page.
        reason: String,
    },
    /// Events may have been missed (a slow consumer, the event link reconnected, Asterisk
    /// announced `FullyBooted`): list local state again.
    Resync {
        /// Why, for logs.
        reason: String,
    },
    /// A `DeviceStateChange`.
    Device(DeviceStateChange),
    /// A `PresenceStateChange`.
    Presence(PresenceStateChange),
}

/// One presence state from `PresenceStateList` (the same fields as the event).
pub type PresenceItem = PresenceStateChange;

/// One hint from `ExtensionStateList`.
pub type HintItem = ExtensionStatus;

/// Reads the events a relay cares about out of one AMI message; `None` for the rest.
pub fn classify(msg: &Message) -> Option<PbxEvent> {
    if let Some(d) = DeviceStateChange::from_message(msg) {
        return Some(PbxEvent::Device(d));
    }
    if let Some(p) = PresenceStateChange::from_message(msg) {
        return Some(PbxEvent::Presence(p));
    }
    None
}

/// The devices named in a hint: `Local/100@phones&Custom:Local/100@phones` gives both; the
/// presence part after `,` is not a device.
pub fn hint_devices(hint: &str) -> impl Iterator<Item = &str> {
    hint.split(',')
        .next()
        .unwrap_or("")
        .split('&')
        .map(str::trim)
        .filter(|d| !d.is_empty())
}

/// The device state a hint's extension state stands for, when the hint holds one device:
/// Asterisk's extension state bits mapped back (0 idle → NOT_INUSE, 1 → INUSE, 2 → BUSY,
/// 4 → UNAVAILABLE, 8 → RINGING, 9 → RINGINUSE, 16 → ONHOLD, 17 → INUSE).
pub fn extension_status_to_device_state(status: i32) -> Option<&'static str> {
    Some(match status {
        0 => "NOT_INUSE",
        1 | 17 => "INUSE",
        2 => "BUSY",
        4 => "UNAVAILABLE",
        8 => "RINGING",
        9 => "RINGINUSE",
        16 => "ONHOLD",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_devices_skip_presence() {
        let d: Vec<_> = hint_devices("Custom:shared400,CustomPresence:alice").collect();
        assert_eq!(d, vec!["Custom:shared400"]);
        let d: Vec<_> = hint_devices("Local/100@phones&Custom:Local/100@phones").collect();
        assert_eq!(d, vec!["Local/100@phones", "Custom:Local/100@phones"]);
    }

    #[test]
    fn classify_reads_state_events_only() {
        let m = Message::new()
            .with("Event", "DeviceStateChange")
            .with("Device", "PJSIP/100")
            .with("State", "INUSE");
        assert!(matches!(classify(&m), Some(PbxEvent::Device(d)) if d.state == "INUSE"));
        let m = Message::new().with("Event", "Newchannel");
        assert_eq!(classify(&m), None);
    }

    #[test]
    fn extension_states_map_back() {
        assert_eq!(extension_status_to_device_state(0), Some("NOT_INUSE"));
        assert_eq!(extension_status_to_device_state(9), Some("RINGINUSE"));
        assert_eq!(extension_status_to_device_state(-1), None);
    }
}
