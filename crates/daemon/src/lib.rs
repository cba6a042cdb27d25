//! Shared plumbing of the three hintfed daemons (`hintfed-agent`, `hintfed-server`,
//! `hintfed-broker`); it knows nothing of the transports, and of the federation core only
//! the table it shows ([`views`]).
//!
//! - [`cli`]: the clap arguments every daemon flattens in (`--config`, `--check-config`,
//!   `--log-format`, `-v`/`-q`).
//! - [`config`]: the INI file (read through the `config` crate) plus `HINTFED_<SECTION>_<KEY>`
//!   environment overrides, typed getters, one-line [`config::ConfigError`]s (exit 64),
//!   [`config::Secret`].
//! - [`logging`]: tracing-subscriber in text or JSON, level from `log_level`, `-v`/`-q`,
//!   `RUST_LOG`, reloadable on SIGHUP.
//! - [`signals`]: SIGINT/SIGTERM → a cancellation token, SIGHUP → reload notifications, and a
//!   drain-with-grace helper.
//! - [`metrics`]: the Prometheus registry with the typed metric handles daemons increment.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, `/api/state`, `/api/origins`, `/events` (SSE)
//!   and the embedded status page, fed by the daemon through [`http::StatusSource`], a
//!   readiness `watch` and a broadcast of [`http::StatusEvent`]s.
//! - [`views`]: the core's table as the JSON views of [`http`], built on request.
//! - [`ratelimit`]: [`ratelimit::WarnLimiter`], the budget of the warnings about hostile
//!   peers (each names the peer address).
//! - [`run`]: wires it together for a binary: args → runtime → config (exit 64) → logging →
//!   HTTP → the daemon future until a signal → drain → exit status.
//!
//! Flow: `run` loads a [`config::ConfigFile`], asks the daemon's loader for its typed config,
//! builds a [`run::Context`] (shutdown token, reload receiver, metrics, readiness, events,
//! status slot) and hands it to the daemon; the HTTP server reads the same context.

pub mod cli;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod run;
pub mod signals;
pub mod views;

// Outside the library: `examples/status_demo.rs` serves the status page with made-up, changing
// data; `tests/browser/status_page.py` (the repository's one DevTools client) can drive it in
// headless Chromium (live update without reload, no JavaScript exception, screenshot).
