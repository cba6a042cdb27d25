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
//! - [`client`]: [`AmiClient`], a cloneable handle to one task that owns the socket: it logs
//!   in, correlates answers by `ActionID`, collects list actions into a [`ListResult`], pings,
//!   reconnects with backoff, and broadcasts [`ClientEvent`]s to [`Subscription`]s.
//! - [`writer`]: [`SetvarWriter`], pipelined `Setvar`s encoded straight into a buffer the
//!   client's task writes, each answer reported as a [`WriteDone`] in a queue the caller
//!   drains in batches (no future, channel or message per write).
//!
//! Bytes flow socket → [`AmiCodec`] → [`Message`] → the [`AmiClient`] task, which answers
//! callers (responses, list results) and broadcasts events; typed views read those messages.
//! Actions built with [`actions`] flow the other way; a [`SetvarWriter`]'s bytes join them
//! in the task's write buffer, and the task matches their answers back to [`WriteDone`]s.
#![forbid(unsafe_code)]

pub mod actions;
pub mod client;
pub mod codec;
pub mod events;
pub mod message;
pub mod writer;

pub use client::{
    AmiClient, Auth, ClientConfig, ClientError, ClientEvent, ConnectionState, ListResult, Secret,
    Subscription, TlsConfig,
};
pub use codec::{AmiCodec, CodecError, Frame, Limits, encode_message};
pub use events::{
    AnyEvent, DeviceStateChange, ExtensionStatus, FullyBooted, ListComplete, PresenceStateChange,
    PresenceStatus, Response, ResponseKind,
};
pub use message::{Headers, Message};
pub use writer::{Completions, SetvarWriter, WriteDone, WriteError};
