//! hintfed-agent: relays device and presence state between one Asterisk and the federation
//! hubs (topology 1 of the design).
//!
//! - [`config`]: [`config::AgentConfig`], the typed and validated INI configuration (defaults
//!   in [`config::defaults`], one-line errors, secrets masked).
//! - [`relay`]: [`relay::Relay`], the reusable driver of one [`hintfed_core::Node`] against
//!   one [`hintfed_asterisk::Pbx`] and any [`hintfed_transport::FederationTransport`]; the
//!   broker runs one per Asterisk over its in-process bus. Its [`relay::RelayStatus`] feeds
//!   the HTTP status API. Its [`intake::Intake`] orders what it learns of its own Asterisk
//!   (events, listings, query answers) so that an older fact never overwrites a newer one.
//! - [`agent`]: wiring for the binary: config → `Pbx` + `MultiHub` + `Node` → `Relay`, with
//!   SIGHUP reload and the status source installed.
//!
//! Flow: Asterisk events → `Pbx` → `Relay` → `Node` → sealed envelopes → `MultiHub` → hubs →
//! `MultiHub` → verified → `Node` → `Setvar` via `Pbx` → Asterisk.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod intake;
pub mod relay;
