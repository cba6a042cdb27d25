//! [`Proc`]: one child process (a daemon under test) whose stdout and stderr lines are
//! collected (and echoed to the test's stderr under its name, so a failing test shows what the
//! daemon said), signalled with kill(1), and killed when dropped so a failing test leaves
//! nothing behind. Also: [`send_signal`] / [`signal_self`], [`rss_kib`] of any process, and
//! [`pyzmq_available`] for the tests that need pyzmq.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wait::wait_until;

/// One child process whose output lines are collected; killed (SIGKILL) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `program` with `args`.
    pub fn spawn(name: &str, program: &Path, args: &[String]) -> Self {
        Self::spawn_with_env(name, program, args, &[])
    }

    /// As [`Proc::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_command(name, cmd)
    }

    /// Starts a prepared command (arguments and environment set by the caller); stdin is
    /// closed, stdout and stderr are collected.
    pub fn spawn_command(name: &str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", cmd.get_program().display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        for stream in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            let lines = Arc::clone(&lines);
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[{name}] {line}");
                    lines.lock().expect("lines lock").push(line);
                }
            });
        }
        Self {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far (stdout and stderr interleaved as read).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// Whether a line printed so far contains `needle`.
    pub fn has(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .expect("lines lock")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits up to `timeout` for a line containing `needle`; returns it.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let find = || self.lines().into_iter().find(|l| l.contains(needle));
        if wait_until(timeout, || async { find().is_some() }).await {
            find()
        } else {
            None
        }
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`, `HUP`, `USR1`) with kill(1).
    pub fn signal(&self, sig: &str) {
        assert!(
            send_signal(self.child.id(), sig),
            "kill -{sig} {} failed",
            self.name
        );
    }

    /// The exit code (-1 when killed by a signal) if the process has exited; `None` while it
    /// runs.
    pub fn exit_code(&mut self) -> Option<i32> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// Waits for the process to exit (up to `timeout`); returns its [`Proc::exit_code`].
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut code = None;
        wait_until(timeout, || {
            code = self.exit_code();
            let done = code.is_some();
            async move { done }
        })
        .await;
        code
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The resident set size (`VmRSS`) of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sends signal `sig` by name (`TERM`, `HUP`, ...) to process `pid` with kill(1) (also to
/// the test process itself, `std::process::id()`); whether kill succeeded.
pub fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends signal `sig` to the test process itself (for tests of signal handling); panics when
/// kill fails.
pub fn signal_self(sig: &str) {
    assert!(
        send_signal(std::process::id(), sig),
        "kill -{sig} (self) failed"
    );
}

/// Whether `python3` with pyzmq (the libzmq peers and stand-ins of the tests) is available;
/// when not, says `SKIPPED: ...` on stderr for the caller to return early.
pub fn pyzmq_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import zmq"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: python3 with pyzmq is not available (pip install -r tests/requirements.txt)"
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collects_lines_and_reports_the_exit_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let mut p = Proc::spawn_command("sh", cmd);
        assert_eq!(p.wait_exit(Duration::from_secs(10)).await, Some(3));
        assert!(
            p.wait_for_line("err", Duration::from_secs(10))
                .await
                .is_some()
        );
        assert!(
            p.wait_for_line("out", Duration::from_secs(10))
                .await
                .is_some()
        );
        assert!(p.has("out") && !p.has("nothing"));
    }

    #[test]
    fn reads_its_own_resident_set() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        assert_eq!(rss_kib(u32::MAX), None);
    }

    #[tokio::test]
    async fn a_signal_ends_a_sleeping_child() {
        let mut p = Proc::spawn("sleep", Path::new("sleep"), &["30".to_owned()]);
        assert_eq!(p.exit_code(), None);
        p.signal("TERM");
        assert_eq!(p.wait_exit(Duration::from_secs(10)).await, Some(-1));
    }
}
