//! Test support shared by the integration tests of the hintfed crates, the end-to-end tests
//! (`tests/`) and the load tool (`crates/bench`); never a dependency of a shipped daemon.
//!
//! - [`net`]: free loopback ports (a single port, or P and P+1 for a hub).
//! - [`wait`]: polling a condition with a deadline instead of sleeping ([`wait::wait_until`]
//!   returns whether it held, [`wait::eventually`] panics naming what never happened).
//! - [`process`]: [`process::Proc`], a child process whose output lines are collected and
//!   which is killed when dropped.
//! - [`http`]: a one-shot HTTP GET against a daemon's status listener and the sum of a
//!   Prometheus metric family in its `/metrics` text.
//! - [`zmtp`]: the bytes of a raw ZMTP 3.0 peer (greeting, READY, subscribe-all, an oversize
//!   frame header) for tests that must misbehave below what a ZeroMQ library allows.
//!
//! The modules are independent; [`wait`] is what [`process`] and the callers poll with.
#![forbid(unsafe_code)]

pub mod http;
pub mod net;
pub mod process;
pub mod wait;
pub mod zmtp;
