//! The core's state table as the JSON views of [`crate::http`] (`/api/state`,
//! `/api/origins`, `/events`), built when asked: hub and agent keep no copy of their table
//! for the status page.

use std::collections::BTreeMap;

use crate::http::{DeviceView, OriginView, PresenceView, StateView};
use hintfed_core::table::Table;
use hintfed_core::{DeviceState, DownReason, Millis, Origins};

/// The row of device `key`: per-origin states (a down origin shows as `down_state`, except
/// `local`, the agent's own Asterisk, shown as reported) and the aggregate; `changed_ms` is
/// the latest arrival among its reports. `None` when no origin reports it.
pub fn device_view(
    table: &Table,
    origins: &Origins,
    down_state: DeviceState,
    key: &str,
    local: Option<&str>,
) -> Option<DeviceView> {
    let per_origin = table.device(key)?;
    let aggregate = table.aggregate(key, origins, down_state, None)?;
    let mut changed = Millis(0);
    let mut states = BTreeMap::new();
    for (origin, e) in per_origin.iter() {
        changed = changed.max(e.updated);
        let shown = if origins.is_down(origin) && Some(origin) != local {
            down_state
        } else {
            e.value
        };
        states.insert(origin.to_owned(), shown.as_str().to_owned());
    }
    Some(DeviceView {
        key: key.to_owned(),
        aggregate: aggregate.as_str().to_owned(),
        changed_ms: changed.0,
        origins: states,
    })
}

/// The row of presence `key`.
pub fn presence_view(table: &Table, key: &str) -> Option<PresenceView> {
    let e = table.presence(key)?;
    Some(PresenceView {
        key: key.to_owned(),
        status: e.value.status.as_str().to_owned(),
        subtype: e.value.subtype.clone(),
        message: e.value.message.clone(),
        origin: e.origin.clone(),
        changed_ms: e.updated.0,
    })
}

fn reason_text(r: DownReason) -> &'static str {
    match r {
        DownReason::SelfAnnounced => "lost its Asterisk",
        DownReason::Silent => "silent for longer than origin_timeout",
        DownReason::Notified => "reported silent by another hub",
    }
}

/// The view of origin `name`, `None` when unknown.
pub fn origin_view(origins: &Origins, name: &str, now: Millis) -> Option<OriginView> {
    let info = origins.get(name)?;
    Some(OriginView {
        name: name.to_owned(),
        up: info.down.is_none(),
        epoch: info.epoch.0,
        last_seq: info.last_seq,
        last_seen_ms_ago: Some(now.since(info.last_seen)),
        lag_ms: info.lag_ms,
        detail: info.down.map(|d| reason_text(d.reason).to_owned()),
    })
}

/// Every device and presence row.
pub fn state_view(
    table: &Table,
    origins: &Origins,
    down_state: DeviceState,
    local: Option<&str>,
) -> StateView {
    StateView {
        devices: table
            .device_keys()
            .filter_map(|k| device_view(table, origins, down_state, k, local))
            .collect(),
        presence: table
            .presence_entries()
            .filter_map(|(k, _)| presence_view(table, k))
            .collect(),
    }
}

/// Every origin.
pub fn origins_view(origins: &Origins, now: Millis) -> Vec<OriginView> {
    origins
        .iter()
        .filter_map(|(name, _)| origin_view(origins, name, now))
        .collect()
}
