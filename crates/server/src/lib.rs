//! hintfed-server: the hub of the agent/server topology (issue 4). Agents DEALER to its
//! ROUTER on port P and SUB to its PUB on P+1; several servers may run side by side, none
//! assumes it is alone (agents drop duplicates by `(origin, epoch, seq)`).
//!
//! Modules and what flows between them:
//! - [`config`]: the typed [`ServerConfig`] read from the INI file through `hintfed-daemon`
//!   (one-line errors, exit 64), with its key list and unknown-key policy.
//! - [`server`]: the runtime. [`Server::bind`] binds the `hintfed-transport` sockets
//!   ([`hintfed_transport::HubBind`], and the legacy `PullBind`/`PubBind`); [`Server::run`]
//!   owns one loop: ROUTER frames → [`hintfed_core::Verifier`] (rejects counted by reason)
//!   → [`hintfed_core::Hub`] (dedupe, table, liveness) → forwarded unchanged on the PUB as
//!   `[env.topic(), original signed bytes]` (to every subscriber but those that announced the
//!   envelope's origin as theirs: an agent is not sent its own messages back, see
//!   [`hintfed_transport::Publication`]); the core's actions (heartbeats, origin-down
//!   notices, snapshot chunks, resync requests) are sealed with the hub's key and published
//!   or sent to the requester. A tick drives heartbeats, liveness and metrics.
//! - [`legacy`]: the zmq-ami-broker wire format (sans-IO). Legacy `DeviceStateChange`
//!   events enter the federation as a synthetic origin per legacy agent name (epoch and
//!   sequence made by the hub, signed with its key, heartbeated by it); federation device
//!   updates (and origin down/up) reach legacy agents as `AsteriskEvent`s to `[*]`.
//!
//! The hub's table is shown on `/api/state`, `/api/origins` and `/events` through
//! `hintfed_daemon::views`.
//!
//! # Wire convention (the agent side is `hintfed_transport::MultiHub`)
//! - in, on the ROUTER: `[topic, payload]` (or `[payload]`); the payload is the last frame,
//!   a signed envelope; the topic is not trusted. Snapshot requests come as
//!   `[hintfed.snapshot, payload]`, hellos with any topic.
//! - replies, on the ROUTER to the requester: `[topic, payload]` like the fan-out
//!   (`control` for snapshot chunks/ends and resync requests), signed with the hub's key.
//! - fan-out, on the PUB: `[topic, payload]`; topics `state.device`, `state.presence`,
//!   `control` ([`hintfed_core::envelope::topics`]).
//!
//! # In-process use
//! ```no_run
//! # async fn f() -> Result<(), hintfed_server::ServerError> {
//! use hintfed_server::{Hooks, Server, ServerConfig};
//! let cfg = ServerConfig::new("hub-1", "tcp://127.0.0.1:0");
//! let server = Server::bind(cfg, Hooks::standalone()).await?;
//! let handle = server.handle(); // endpoints, stats(), state_view(), set_keys()
//! println!("agents connect to {}", handle.router_endpoint());
//! let stop = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(server.run(stop.clone()));
//! # Ok(()) }
//! ```
//!
//! # Metrics (`hintfed-daemon`'s families)
//! `hintfed_updates_received_total{kind}` (accepted stream envelopes),
//! `hintfed_updates_published_total{kind}` (everything fanned out, the hub's own as
//! `other`), `hintfed_rejects_total{reason}` (see [`ServerStats::rejects`]),
//! `hintfed_origins_up` / `_down`, `hintfed_snapshot_entries` (per chunk),
//! `hintfed_events_in_total{source="legacy"}`, `hintfed_queue_depth{queue="router_inbound"}`
//! and `hintfed_queue_depth{queue="peers"}` (distinct peers heard within `origin_timeout`;
//! the shared metric set has no better family for it).
#![forbid(unsafe_code)]

pub mod config;
pub mod legacy;
pub mod server;

pub use config::ServerConfig;
pub use server::{Hooks, Server, ServerError, ServerHandle, ServerStats, serve};
