//! The Asterisk Manager Interface (AMI), as hintfed speaks it.
//!
//! - [`message`]: [`Message`], an ordered list of `Key: Value` headers with case-insensitive
//!   lookup, the unit everything else exchanges.
//! - [`codec`]: [`AmiCodec`], the sans-IO framing (`tokio_util::codec`) that turns bytes into
//!   [`Frame`]s (the login banner, then messages) and messages back into bytes, with hard limits
//!   on line length, header count and message size.
//!
//! Bytes flow socket → [`AmiCodec`] → [`Message`]; typed views and the async client are built
//! on top of these.
#![forbid(unsafe_code)]

pub mod codec;
pub mod message;

pub use codec::{AmiCodec, CodecError, Frame, Limits};
pub use message::Message;
