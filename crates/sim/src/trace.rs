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
//! server. Lines are appended to one shared buffer (the hot path formats in place, without a
//! new `String` per line); a writer thread takes the buffer and writes it out every 50 ms.
//! Whitespace in names becomes `_` and newlines in values become spaces. Not installed:
//! recording costs one atomic load.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

/// What was recorded since the writer thread last took it.
struct Pending {
    lines: Vec<u8>,
    /// The file failed: tracing silently stops.
    stopped: bool,
}

static TRACE: OnceLock<Mutex<Pending>> = OnceLock::new();

/// How often the writer thread writes out what was recorded.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

fn pending() -> Option<std::sync::MutexGuard<'static, Pending>> {
    TRACE
        .get()
        .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Starts tracing to `path` (created or truncated). A second call is refused.
pub fn install(path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let fresh = Mutex::new(Pending {
        lines: Vec::with_capacity(1 << 20),
        stopped: false,
    });
    if TRACE.set(fresh).is_err() {
        return Err(std::io::Error::other("trace already installed"));
    }
    std::thread::Builder::new()
        .name("sim-trace".to_owned())
        .spawn(move || {
            // Wakes on its own clock rather than per line: a line recorded while this thread
            // sleeps costs the recorder no wake-up.
            let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
            loop {
                std::thread::sleep(FLUSH_EVERY);
                let Some(mut p) = pending() else { return };
                std::mem::swap(&mut p.lines, &mut out);
                drop(p);
                let ok = out.is_empty() || (file.write_all(&out).is_ok() && file.flush().is_ok());
                out.clear();
                if !ok {
                    if let Some(mut p) = pending() {
                        p.stopped = true;
                        p.lines = Vec::new();
                    }
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

/// Appends `s` with CR, LF and (when `space` too) spaces replaced by `to` (all ASCII, so
/// bytewise is charwise).
fn push_replaced(out: &mut Vec<u8>, s: &str, space: bool, to: u8) {
    let start = out.len();
    out.extend_from_slice(s.as_bytes());
    for b in &mut out[start..] {
        if *b == b'\n' || *b == b'\r' || (space && *b == b' ') {
            *b = to;
        }
    }
}

/// Records one line (`kind` is `dev` or `set`); a no-op without [`install`].
pub(crate) fn record(server: Option<&str>, kind: &str, key: &str, value: &str) {
    if TRACE.get().is_none() {
        return;
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    // u64 holds nanoseconds since 1970 until 2554, and formats faster than u128.
    let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
    let Some(mut p) = pending() else { return };
    if p.stopped {
        return;
    }
    push_line(&mut p.lines, nanos, server, kind, key, value);
}

/// Appends one trace line.
fn push_line(
    out: &mut Vec<u8>,
    nanos: u64,
    server: Option<&str>,
    kind: &str,
    key: &str,
    value: &str,
) {
    out.extend_from_slice(itoa::Buffer::new().format(nanos).as_bytes());
    out.push(b' ');
    push_replaced(out, server.unwrap_or("-"), true, b'_');
    out.push(b' ');
    out.extend_from_slice(kind.as_bytes());
    out.push(b' ');
    push_replaced(out, key, true, b'_');
    out.push(b' ');
    push_replaced(out, value, false, b' ');
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_time_server_kind_key_value() {
        let mut out = Vec::new();
        for (nanos, server) in [
            (0, Some("pbx-0")),
            (u64::MAX, None),
            (1_764_000_000_123_456_789, Some("pbx 1")),
        ] {
            push_line(
                &mut out,
                nanos,
                server,
                "set",
                "DEVICE_STATE(Custom:a b)",
                "IN\nUSE",
            );
        }
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            format!(
                "0 pbx-0 set DEVICE_STATE(Custom:a_b) IN USE\n{} - set DEVICE_STATE(Custom:a_b) IN USE\n\
                 1764000000123456789 pbx_1 set DEVICE_STATE(Custom:a_b) IN USE\n",
                u64::MAX
            )
        );
    }

    #[test]
    fn names_lose_whitespace_and_values_lose_newlines() {
        let mut out = Vec::new();
        push_replaced(&mut out, "pbx a\r\nb", true, b'_');
        out.push(b'|');
        push_replaced(&mut out, "IN USE\r\nx", false, b' ');
        out.push(b'|');
        push_replaced(&mut out, "é ü", true, b'_');
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "pbx_a__b|IN USE  x|é_ü"
        );
    }
}
