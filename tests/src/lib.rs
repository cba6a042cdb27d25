//! Helpers for the end-to-end tests in `tests/tests/`: they start the real hintfed binaries.
//!
//! - [`bin_path`] finds a binary built by `cargo build --workspace --bins` in the same target
//!   directory as the running test.
//! - [`Proc`] runs one child process, collects its stdout and stderr lines, and kills it on
//!   drop, so a failing test leaves nothing behind; [`free_port`] / [`free_port_pair`] pick
//!   loopback ports; [`wait_until`] polls a condition with a deadline instead of sleeping
//!   (all three from `hintfed-testkit`, re-exported).
//! - [`fed`] starts a whole federation (simulated Asterisks, hubs, agents, res_zmq_manager
//!   stand-ins) with AMI test clients and HTTP/metrics probes.
#![forbid(unsafe_code)]

pub mod fed;

use std::path::PathBuf;

// Shared with the crates' tests and the bench (one place for each: `crates/testkit`).
pub use hintfed_testkit::net::{free_port, free_port_pair};
pub use hintfed_testkit::process::Proc;
pub use hintfed_testkit::wait::wait_until;

/// The workspace root (the folder holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The shared fixtures folder (`../shared/fixtures` beside the checkout).
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("../shared/fixtures")
}

/// Path of a workspace binary in the target directory of the running test.
///
/// Panics with a clear message when it was not built: run `cargo build --workspace --bins`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
