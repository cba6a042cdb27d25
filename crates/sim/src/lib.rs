//! hintfed-sim: an Asterisk you can run anywhere — an AMI server that answers like the real
//! captures in `shared/fixtures/asterisk/`, with phones driven by a script, seeded random load
//! or admin actions, and several independent servers in one process.
//!
//! Modules and what flows between them:
//! - [`extensions`] reads the hints (and `[globals]`) of an `extensions.conf` into a
//!   [`Dialplan`];
//! - [`state`] is the sans-IO PBX model ([`Pbx`]): device states, presence, hints and their
//!   aggregate extension state; each change returns the [`SimEvent`]s it causes; its astdb
//!   keys are numbered once for every server of the process (`keys`);
//! - [`event`] formats manager events (`Privilege`, `SystemName`) and parses `Events` masks;
//! - [`server`] owns one simulated Asterisk ([`SimServer::spawn`] → [`SimHandle`]): listener,
//!   shared state, per-session event queues (filtered as events are made), load tasks;
//! - `session` serves one TCP connection (banner, actions in, responses and events out) and
//!   `actions` answers each action (with the user's `write` permissions);
//! - [`filter`] holds a session's event filters (`eventfilter` lines, the `Filter` action);
//! - [`kafka`] (the app_ami_kafka mode) publishes every event of a server to a Kafka topic,
//!   laid out like the real module's records (JSON or AMI text bodies);
//! - [`load`] parses scripts and generates seeded random phone changes;
//! - [`cli`] turns the command line into [`SimConfig`]s for the thin `hintfed-sim` binary;
//! - [`trace`] optionally writes a timestamped line per phone change and per accepted `Setvar`
//!   (all servers of the process, one clock) for `hintfed-bench`'s latency figures.
#![forbid(unsafe_code)]

mod actions;
pub mod cli;
pub mod event;
pub mod extensions;
pub mod filter;
pub mod kafka;
mod keys;
pub mod load;
pub mod server;
mod session;
pub mod state;
pub mod trace;

pub use event::SimEvent;
pub use extensions::{Dialplan, Hint};
pub use load::{RandomLoad, ScriptLine, ScriptStep};
pub use server::{SimConfig, SimError, SimHandle, SimServer, SimStats};
pub use session::BANNER;
pub use state::{DeviceState, Pbx, PresenceState, SetvarError};
