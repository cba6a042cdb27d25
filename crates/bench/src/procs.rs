//! Child daemons of a run: spawning from the bench's own target directory (output to log
//! files), loopback ports, `/proc` CPU and peak-RSS readings, and a tiny HTTP GET for
//! `/readyz`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
// Loopback ports, the HTTP probe and polling with a deadline: the same as the tests', from
// `crates/testkit`.
pub use hintfed_testkit::http::get_body as http_get;
pub use hintfed_testkit::net::{try_free_port as free_port, try_free_port_pair as free_port_pair};
pub use hintfed_testkit::wait::wait_until;

/// Path of a sibling binary (same folder as this executable).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("executable has a folder")?;
    let p = dir.join(name);
    anyhow::ensure!(
        p.exists(),
        "{} not found: build it in the same profile (cargo build --release -p hintfed-sim -p hintfed-server -p hintfed-agent -p hintfed-bench)",
        p.display()
    );
    Ok(p)
}

/// One daemon; killed (SIGKILL) when dropped.
pub struct Daemon {
    /// Display name.
    pub name: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts `program args` with extra environment, output appended to `dir/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            log,
            child,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` naming the daemon and its log when it has exited. Check it after `/readyz` or
    /// `/healthz` answered: an answer on a port proves nothing about this daemon when another
    /// process holds that port (a daemon whose port was taken exits with "cannot bind").
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => anyhow::bail!(
                "{} exited ({status}) (see {})",
                self.name,
                self.log.display()
            ),
            Err(e) => Err(anyhow::Error::from(e).context(format!("status of {}", self.name))),
        }
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) and peak RSS of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU seconds used so far.
    pub cpu_secs: f64,
    /// Peak resident set size (VmHWM) in KiB.
    pub peak_rss_kib: u64,
    /// Current resident set size (VmRSS) in KiB.
    pub rss_kib: u64,
}

/// The folder for configs, logs and traces: `keep` (created) when given, else a temporary
/// folder removed when the returned guard drops.
pub fn work_dir(keep: Option<&Path>) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let dir = match keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_path_buf()
        }
        None => tmp.path().to_path_buf(),
    };
    Ok((tmp, dir))
}

/// Clock ticks per second for `/proc/<pid>/stat` (getconf CLK_TCK; 100 when unknown).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn usage(pid: u32, tck: f64) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Usage {
        cpu_secs: (utime + stime) / tck,
        peak_rss_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    })
}

/// A started `hintfed-server`: the daemon and its ROUTER endpoint.
pub struct Hub {
    /// The process.
    pub daemon: Daemon,
    /// `tcp://127.0.0.1:P` (ROUTER; the PUB is P+1).
    pub endpoint: String,
}

/// Starts one `hintfed-server` named `name` in `dir` (shared key [`crate::fill::KEY`]) and
/// waits for its `/healthz`.
pub async fn start_hub(
    dir: &Path,
    name: &str,
    origin_timeout: &str,
    log: &str,
) -> anyhow::Result<Hub> {
    let port = free_port_pair()?;
    let http = format!("127.0.0.1:{}", free_port()?);
    let cfg = dir.join(format!("{name}.ini"));
    std::fs::write(
        &cfg,
        format!(
            "[general]\nname = {name}\nlog_level = {log}\n\n[federation]\nshared_key = {key}\norigin_timeout = {origin_timeout}\n\n[server]\nlisten = tcp://127.0.0.1:{port}\n\n[http]\nlisten = {http}\n",
            key = crate::fill::KEY,
        ),
    )?;
    let mut daemon = Daemon::spawn(
        name,
        &sibling("hintfed-server")?,
        &["--config".into(), cfg.display().to_string()],
        &[],
        dir,
    )?;
    let up = wait_until(Duration::from_secs(15), || async {
        http_get(&http, "/healthz").await.contains("ok")
    })
    .await;
    anyhow::ensure!(up, "{name} did not come up (see {})", daemon.log.display());
    daemon.ensure_running()?;
    Ok(Hub {
        daemon,
        endpoint: format!("tcp://127.0.0.1:{port}"),
    })
}

/// The value of the first sample of `name` (exact metric name, any labels) in a Prometheus
/// or OpenMetrics text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = if let Some(r) = rest.strip_prefix('{') {
            r.split_once('}')?.1
        } else {
            rest
        };
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The machine: CPUs and the 1/5/15-minute load averages (from `/proc/loadavg`).
pub fn machine() -> serde_json::Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    serde_json::json!({"cpus": cpus, "loadavg": parse_loadavg(&load)})
}

/// The three load averages of a `/proc/loadavg` line.
pub fn parse_loadavg(line: &str) -> Vec<f64> {
    line.split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metric_samples() {
        let text = "# HELP hintfed_snapshot_entries x\n# TYPE hintfed_snapshot_entries histogram\nhintfed_snapshot_entries_sum 100000.0\nhintfed_snapshot_entries_count 210\nhintfed_queue_depth{queue=\"apply\"} 7\nhintfed_snapshot_entries_sum_x 3\n";
        assert_eq!(
            metric_value(text, "hintfed_snapshot_entries_sum"),
            Some(100_000.0)
        );
        assert_eq!(
            metric_value(text, "hintfed_snapshot_entries_count"),
            Some(210.0)
        );
        assert_eq!(metric_value(text, "hintfed_queue_depth"), Some(7.0));
        assert_eq!(metric_value(text, "hintfed_snapshot"), None);
    }

    #[test]
    fn reads_loadavg() {
        assert_eq!(
            parse_loadavg("15.20 17.01 12.00 3/900 1234\n"),
            vec![15.2, 17.01, 12.0]
        );
        assert!(parse_loadavg("").is_empty());
    }

    #[tokio::test]
    async fn a_daemon_that_exited_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon::spawn("quits", Path::new("true"), &[], &[], dir.path()).expect("spawn");
        let exited = wait_until(Duration::from_secs(10), || {
            let r = d.ensure_running();
            async move { r.is_err() }
        })
        .await;
        assert!(exited, "a daemon that exited must not count as running");
        let mut live = Daemon::spawn("stays", Path::new("sleep"), &["30".into()], &[], dir.path())
            .expect("spawn");
        live.ensure_running().expect("a live daemon is running");
    }

    #[test]
    fn reads_own_usage() {
        let u = usage(std::process::id(), clk_tck()).expect("own /proc");
        assert!(u.peak_rss_kib >= u.rss_kib && u.rss_kib > 0);
    }
}
