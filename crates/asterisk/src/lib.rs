//! The Asterisk a relay talks to, as a source of state events and a sink for writes.
//!
//! - [`event`] — [`PbxEvent`] (connection up/down, device and presence changes, "resync now")
//!   and the list items ([`PresenceItem`], [`HintItem`]) read from AMI messages.
//! - [`zmq`] — the res_zmq_manager JSON mapping: an action [`Message`](hintfed_ami::Message)
//!   to one JSON object, a reply array back to messages, an event frame to a message.
//! - [`kafka`] — app_ami_kafka records (JSON or AMI text bodies) read back as messages, and
//!   (feature `kafka`, on by default) `kafka::KafkaSource`, the reader of that topic.
//! - [`pbx`] — [`Pbx`], the handle the agent and the broker use. Events come from one
//!   endpoint (AMI TCP, or the module's PUB socket), actions go to one endpoint (AMI TCP, or
//!   the module's REP socket); both may be the same AMI connection.
//!
//! Messages flow Asterisk → ([`hintfed_ami::AmiClient`] | [`hintfed_transport::SubClient`]) →
//! [`PbxEvent`] on a bounded channel → the relay; writes flow relay → [`Pbx::setvar`] →
//! ([`hintfed_ami::AmiClient`] | [`hintfed_transport::ReqClient`]) → Asterisk.
//!
//! `Getvar` is never sent through res_zmq_manager: it crashes Asterisk (see the captures'
//! README); [`Pbx::device_state`] answers [`PbxError::Unsupported`] there instead.
#![forbid(unsafe_code)]

pub mod event;
pub mod kafka;
pub mod pbx;
pub mod zmq;

pub use event::{HintItem, PbxEvent, PresenceItem};
pub use pbx::{ActionsVia, EventsVia, Pbx, PbxConfig, PbxError};
