//! hintfed's federation core: pure logic with no sockets and no clock of its own (every
//! function that needs time takes a [`Millis`] `now`).
//!
//! How the modules fit together:
//! - [`state`]: the values — [`DeviceState`] (Asterisk spelling, [`aggregate`] by
//!   main/devicestate.c rules), [`Presence`] (with its `PRESENCE_STATE` encoding), [`Kind`]
//!   and [`Value`].
//! - [`hlc`]: hybrid logical clock timestamps that order presence writes across servers.
//! - [`envelope`]: the one versioned wire message, [`Envelope`] with its [`Body`] variants
//!   (updates, full-sync markers, heartbeats, origin-down, hello, snapshot, resync);
//!   [`auth`] seals it (HMAC-SHA256 with a [`KeyRing`]) and its [`Verifier`] turns untrusted
//!   bytes back into envelopes (size limit, MAC, version, structure, replay window).
//! - [`policy`]: what is federated, what is never sent, unwritable-value substitution, local
//!   naming of remote devices, shared presence keys, `down_state`.
//! - [`change`]: change suppression (a repeated event is not sent again).
//! - [`seq`], [`liveness`], [`table`] and [`replica`]: per-origin sequence tracking (dedupe
//!   and gaps), origin liveness (down/revive rules), the table of known state (per key, per
//!   origin; presence last-writer-wins), combined as a [`Replica`].
//! - [`apply`]: the conflating, windowed [`ApplyQueue`] towards one Asterisk.
//! - [`node`] and [`hub`]: the two sans-IO state machines the daemons wrap. A [`Node`] (one
//!   origin: agent, or one broker relay) takes local events, verified remote envelopes and
//!   ticks, and emits [`Action`]s (publish, request snapshot, apply, query local). A [`Hub`]
//!   (hintfed-server) takes verified envelopes and ticks, says which to forward, and emits
//!   [`HubAction`]s (own heartbeats and origin-down notices, snapshot chunks, resync
//!   requests).
//!
//! Data flow on an agent: Asterisk event → [`Node::on_local_event`] → [`Action::Publish`] →
//! [`KeyRing::seal`] → hubs → [`Verifier::verify`] → [`Hub::on_envelope`] → forwarded to every
//! agent → [`Verifier::verify`] → [`Node::on_remote`] → [`Action::Apply`] → `Setvar` →
//! [`Node::on_apply_result`].
#![forbid(unsafe_code)]

pub mod apply;
pub mod auth;
pub mod change;
pub mod envelope;
pub mod hlc;
pub mod hub;
pub mod liveness;
pub mod node;
pub mod policy;
pub mod replica;
pub mod seq;
pub mod state;
pub mod table;
pub mod time;

pub use apply::{ApplyConfig, ApplyQueue, Push, Write, WriteId};
pub use auth::{Key, KeyRing, Reject, RejectReason, Verifier, open, open_into, sealed_by};
pub use change::ChangeSuppressor;
pub use envelope::{
    Body, Envelope, Limits, OriginSummary, Role, SnapshotEntry, Update, WIRE_VERSION,
};
pub use hlc::{Hlc, HlcTimestamp};
pub use hub::{Hub, HubAction, HubConfig, Ingest};
pub use liveness::{DownReason, Origins};
pub use node::{Action, ApplyCmd, LocalEvent, Node, NodeConfig};
pub use policy::{Policy, PolicyConfig, PolicyError, is_custom_device};
pub use replica::Replica;
pub use state::{DeviceState, Kind, Presence, PresenceStatus, Value, aggregate};
pub use table::{NO_TAG, Settled, Table};
pub use time::{Epoch, Millis};
