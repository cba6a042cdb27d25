//! hintfed-broker: the central broker (topology 2 of the design, the zmq-ami-broker model).
//! One process connects to every Asterisk — AMI over TCP/TLS or the res_zmq_manager sockets,
//! mixed per server — and cross-applies device and presence states between them.
//!
//! - [`config`]: [`config::BrokerConfig`], the original zmq-ami-broker `example_config.ini`
//!   format read unchanged, plus hintfed's additions in their own keys (documented there).
//! - [`bus`]: [`bus::InProcessBus`], the in-process [`hintfed_transport::FederationTransport`]
//!   the relays publish to and receive from (bounded, never blocking a publisher; its
//!   full-queue policy and repair are documented there).
//! - [`broker`]: wiring — per server, the agent's [`hintfed_agent::relay::Relay`] around a
//!   [`hintfed_core::Node`] (snapshots off) and a [`hintfed_asterisk::Pbx`] built by the
//!   agent's [`hintfed_agent::agent::pbx_config`]; message counts, verbose logging, status.
//!
//! Flow: Asterisk A event → `Pbx` → tap (counts, verbose log) → relay A → `Node` A →
//! envelope → bus → relays B, C → their `Node`s (echo suppression, aggregation, apply queue)
//! → `Setvar DEVICE_STATE(Custom:<device>)` / `PRESENCE_STATE(CustomPresence:<name>)` on B
//! and C. The broker shares the agent's code rather than copying it: what an agent does
//! beside one Asterisk, a broker relay does for each.
#![forbid(unsafe_code)]

pub mod broker;
pub mod bus;
pub mod config;
