//! The Asterisk Manager Interface (AMI), as hintfed speaks it.
//!
//! - [`message`]: [`Message`], an ordered list of `Key: Value` headers with case-insensitive
//!   lookup, the unit everything else exchanges.
//! - [`codec`]: [`AmiCodec`], the sans-IO framing (`tokio_util::codec`) that turns bytes into
//!   [`Frame`]s (the login banner, then messages) and messages back into bytes, with hard limits
//!   on line length, header count and message size.
//! - [`events`]: typed views ([`DeviceStateChange`], [`PresenceStateChange`],
//!   [`ExtensionStatus`], [`PresenceStatus`], [`FullyBooted`], [`ListComplete`], [`Response`])
//!   read from a [`Message`]; unknown events stay generic messages.
//! - [`actions`]: builders for the actions hintfed sends (login, challenge, setvar, getvar,
//!   the state lists, events mask, ping, logoff).
//!
//! Bytes flow socket → [`AmiCodec`] → [`Message`] → typed views; actions flow the other way.
#![forbid(unsafe_code)]

pub mod actions;
pub mod codec;
pub mod events;
pub mod message;

pub use codec::{AmiCodec, CodecError, Frame, Limits};
pub use events::{
    AnyEvent, DeviceStateChange, ExtensionStatus, FullyBooted, ListComplete, PresenceStateChange,
    PresenceStatus, Response, ResponseKind,
};
pub use message::Message;
