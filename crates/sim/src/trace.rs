//! An optional, process-wide timing trace for load measurements (`hintfed-sim --trace FILE`).
//!
//! When installed, every phone state change (`SimSetDeviceState`, script, random load) and every
//! accepted `Setvar` of every simulated server in the process is written as one line:
//!
//! ```text
//! <unix-nanoseconds> <server-name> dev <device> <STATE>
//! <unix-nanoseconds> <server-name> set <variable> <value>
//! ```
//!
//! The time is taken while the server's state lock is held, so lines of one server are in
//! state order; all servers of the process share one clock. `hintfed-bench` reads the file to
//! measure propagation latency from the change on the origin to the `Setvar` on every other
//! server. Lines go through an unbounded channel to a writer thread (the hot path only formats
//! and sends), which writes them out every 50 ms. Whitespace in names becomes `_` and
//! newlines in values become spaces. Not installed: recording costs one atomic load.

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, TryRecvError, channel};
use std::time::{Duration, SystemTime};

static TRACE: OnceLock<Sender<String>> = OnceLock::new();

/// How often the writer thread writes out what was recorded.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Starts tracing to `path` (created or truncated). A second call is refused.
pub fn install(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let (tx, rx) = channel::<String>();
    if TRACE.set(tx).is_err() {
        return Err(std::io::Error::other("trace already installed"));
    }
    std::thread::Builder::new()
        .name("sim-trace".to_owned())
        .spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            // Wakes on its own clock rather than per line: a line sent while this thread
            // sleeps costs the sender no wake-up (at 100,000 lines/s that was a futex wake
            // and a write(2) per line).
            loop {
                std::thread::sleep(FLUSH_EVERY);
                loop {
                    match rx.try_recv() {
                        Ok(line) => {
                            if out.write_all(line.as_bytes()).is_err() {
                                return;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            let _ = out.flush();
                            return;
                        }
                    }
                }
                if out.flush().is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Whether a trace is being written.
pub fn enabled() -> bool {
    TRACE.get().is_some()
}

/// Records one line (`kind` is `dev` or `set`); a no-op without [`install`].
pub(crate) fn record(server: Option<&str>, kind: &str, key: &str, value: &str) {
    let Some(tx) = TRACE.get() else { return };
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let clean = |s: &str| s.replace(['\n', '\r', ' '], "_");
    let line = format!(
        "{nanos} {} {kind} {} {}\n",
        clean(server.unwrap_or("-")),
        clean(key),
        value.replace(['\n', '\r'], " ")
    );
    // The writer thread only ends when the file fails; then tracing silently stops.
    let _ = tx.send(line);
}
