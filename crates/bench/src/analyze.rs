//! Reads the simulator's timing trace (`hintfed-sim --trace`, see `hintfed_sim::trace`) and
//! turns it into propagation latencies and per-server Setvar counts.
//!
//! A phone change `dev` of device D on origin S at t0 is delivered to server R by the first
//! `set` of `DEVICE_STATE(Custom:D)` on R with the same value at or after t0, provided it
//! comes before the next change of D to that same value (which it could also belong to). A
//! change with no such Setvar was conflated away (a newer value overtook it in the apply
//! queue, which is allowed) or lost; the two are not told apart here, the final convergence
//! check is what proves nothing was lost for good.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;

/// What the trace says about one run.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Phone changes seen on the origins within the span.
    pub changes: u64,
    /// Deliveries expected: changes × (servers − 1).
    pub expected: u64,
    /// Sorted latencies of matched deliveries, in microseconds.
    pub latencies_us: Vec<f64>,
    /// Setvar lines per server (from the span's start on).
    pub sets: HashMap<String, u64>,
    /// First and last Setvar time (ns) per server.
    pub set_span: HashMap<String, (u128, u128)>,
    /// Time (ns) of the last Setvar of any server.
    pub last_set_ns: u128,
    /// Time (ns) of the last change on any origin.
    pub last_change_ns: u128,
    /// With a hub tap: sorted latencies (µs) from the change on the origin to its update
    /// leaving the hub's PUB (sim → agent → hub → fan-out), one per change seen by the tap.
    pub to_hub_us: Vec<f64>,
    /// With a hub tap: sorted latencies (µs) from the update leaving the hub's PUB to the
    /// `Setvar` on a receiving server (fan-out → agent → apply → Setvar), one per delivery.
    pub from_hub_us: Vec<f64>,
}

/// The `q` quantile (0..=1) of sorted microsecond samples, in milliseconds.
pub fn quantile_ms(sorted_us: &[f64], q: f64) -> Option<f64> {
    let n = sorted_us.len();
    if n == 0 {
        return None;
    }
    let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
    Some(sorted_us[i] / 1000.0)
}

impl Analysis {
    /// The `q` quantile (0..=1) of the latencies in milliseconds; `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        quantile_ms(&self.latencies_us, q)
    }
}

/// Analyses the changes of `path` made within `span` (unix ns; trace lines before it are
/// skipped) and their deliveries, for devices whose name starts with `prefix`, over the
/// servers `servers`. `tap`: a file of `<unix-ns> <device> <value>` lines, the updates a
/// subscriber on the hub's PUB saw, to split the latency at the hub.
pub fn analyze(
    path: &Path,
    span: std::ops::Range<u128>,
    prefix: &str,
    servers: &[String],
    tap: Option<&Path>,
) -> anyhow::Result<Analysis> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let tap_text = match tap {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
        None => String::new(),
    };
    // device -> [(t, value)] seen leaving the hub
    let mut taps: HashMap<&str, Vec<(u128, &str)>> = HashMap::new();
    for line in tap_text.lines() {
        let mut it = line.splitn(3, ' ');
        if let (Some(Ok(t)), Some(key), Some(value)) =
            (it.next().map(str::parse::<u128>), it.next(), it.next())
        {
            taps.entry(key).or_default().push((t, value));
        }
    }
    for list in taps.values_mut() {
        list.sort_by_key(|e| e.0);
    }
    // device -> [(t, origin, value)]
    let mut devs: HashMap<&str, Vec<(u128, &str, &str)>> = HashMap::new();
    // (server, device) -> [(t, value)]
    let mut sets: HashMap<(&str, &str), Vec<(u128, &str)>> = HashMap::new();
    let mut a = Analysis::default();
    for line in text.lines() {
        let mut it = line.splitn(5, ' ');
        let (Some(t), Some(server), Some(kind), Some(key), Some(value)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let Ok(t) = t.parse::<u128>() else { continue };
        if t < span.start {
            continue;
        }
        match kind {
            "dev" if key.starts_with(prefix) => {
                devs.entry(key).or_default().push((t, server, value));
                a.last_change_ns = a.last_change_ns.max(t);
            }
            "set" => {
                let Some(dev) = key
                    .strip_prefix("DEVICE_STATE(Custom:")
                    .and_then(|k| k.strip_suffix(')'))
                else {
                    continue;
                };
                if !dev.starts_with(prefix) {
                    continue;
                }
                sets.entry((server, dev)).or_default().push((t, value));
                *a.sets.entry(server.to_owned()).or_default() += 1;
                let span = a.set_span.entry(server.to_owned()).or_insert((t, t));
                span.0 = span.0.min(t);
                span.1 = span.1.max(t);
                a.last_set_ns = a.last_set_ns.max(t);
            }
            _ => {}
        }
    }
    for list in sets.values_mut() {
        list.sort_by_key(|e| e.0);
    }
    let same = |x: &str, y: &str| x.trim().eq_ignore_ascii_case(y.trim());
    for (dev, evs) in &devs {
        for (i, (t0, origin, value)) in evs.iter().enumerate() {
            // Later changes are still seen: they end the search for an earlier one's
            // deliveries (`limit`).
            if !span.contains(t0) {
                continue;
            }
            a.changes += 1;
            let limit = evs[i + 1..]
                .iter()
                .find(|(_, _, v)| same(v, value))
                .map_or(u128::MAX, |e| e.0);
            let hub_t = taps.get(dev).and_then(|list| {
                let from = list.partition_point(|(t, _)| *t < *t0);
                list[from..]
                    .iter()
                    .take_while(|(t, _)| *t < limit)
                    .find(|(_, v)| same(v, value))
                    .map(|e| e.0)
            });
            if let Some(th) = hub_t {
                a.to_hub_us.push((th - t0) as f64 / 1000.0);
            }
            for r in servers.iter().filter(|r| r.as_str() != *origin) {
                a.expected += 1;
                let Some(list) = sets.get(&(r.as_str(), *dev)) else {
                    continue;
                };
                let from = list.partition_point(|(t, _)| *t < *t0);
                if let Some((t, _)) = list[from..]
                    .iter()
                    .take_while(|(t, _)| *t < limit)
                    .find(|(_, v)| same(v, value))
                {
                    a.latencies_us.push((t - t0) as f64 / 1000.0);
                    if let Some(th) = hub_t {
                        a.from_hub_us.push(t.saturating_sub(th) as f64 / 1000.0);
                    }
                }
            }
        }
    }
    a.latencies_us.sort_by(f64::total_cmp);
    a.to_hub_us.sort_by(f64::total_cmp);
    a.from_hub_us.sort_by(f64::total_cmp);
    Ok(a)
}

/// The `set` lines of one server within one span of a trace.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SetRun {
    /// `set` lines.
    pub sets: u64,
    /// Time (unix ns) of the first and the last.
    pub first_ns: u128,
    pub last_ns: u128,
}

impl SetRun {
    /// Setvars per second from the first to the last, as the Asterisk took them (the
    /// simulator's clock: no client round trip at either end); `None` under two.
    pub fn per_sec(&self) -> Option<f64> {
        (self.sets >= 2 && self.last_ns > self.first_ns)
            .then(|| (self.sets - 1) as f64 * 1e9 / (self.last_ns - self.first_ns) as f64)
    }
}

/// The `set` lines of `path` per asked `(server, span)` (unix ns), in one pass.
pub fn set_runs(
    path: &Path,
    asked: &[(&str, std::ops::Range<u128>)],
) -> anyhow::Result<Vec<SetRun>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut runs = vec![SetRun::default(); asked.len()];
    for line in text.lines() {
        let mut it = line.splitn(4, ' ');
        let (Some(t), Some(server), Some("set")) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(t) = t.parse::<u128>() else { continue };
        for (run, (name, span)) in runs.iter_mut().zip(asked) {
            if server == *name && span.contains(&t) {
                if run.sets == 0 {
                    run.first_ns = t;
                }
                run.sets += 1;
                run.first_ns = run.first_ns.min(t);
                run.last_ns = run.last_ns.max(t);
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace file holding `text` (in a folder removed with the returned guard).
    fn trace(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    #[test]
    fn matches_deliveries_and_skips_conflated_changes() {
        let (dir, p) = trace(
            "\
1000 a dev PJSIP/b0n0 INUSE
2000 a dev PJSIP/b0n0 NOT_INUSE
3000 a dev PJSIP/b0n0 BUSY
4000 b set DEVICE_STATE(Custom:PJSIP/b0n0) INUSE
9000 b set DEVICE_STATE(Custom:PJSIP/b0n0) BUSY
5000 c set DEVICE_STATE(Custom:PJSIP/b0n0) BUSY
500 b set DEVICE_STATE(Custom:PJSIP/b0n0) NOT_INUSE
",
        );
        let servers = ["a", "b", "c"].map(str::to_owned);
        let tap = dir.path().join("tap");
        std::fs::write(&tap, "1500 PJSIP/b0n0 INUSE\n3500 PJSIP/b0n0 BUSY\n").expect("write");
        let a = analyze(&p, 0..u128::MAX, "PJSIP/b", &servers, Some(&tap)).expect("analyze");
        assert_eq!(a.changes, 3);
        assert_eq!(a.expected, 6);
        // b: INUSE after 3 us, BUSY after 6 us (NOT_INUSE at 500 ns precedes the change);
        // c: BUSY after 2 us.
        assert_eq!(a.latencies_us, vec![2.0, 3.0, 6.0]);
        assert_eq!(a.quantile_ms(0.5), Some(0.003));
        assert_eq!(a.sets["b"], 3);
        // Hub split: INUSE left the hub 0.5 us after the change, BUSY 0.5 us.
        assert_eq!(a.to_hub_us, vec![0.5, 0.5]);
        assert_eq!(a.from_hub_us, vec![1.5, 2.5, 5.5]);
    }

    #[test]
    fn a_span_counts_only_its_changes_and_later_ones_still_end_a_search() {
        let (_dir, p) = trace(
            "\
1000 a dev PJSIP/b0n0 INUSE
2000 a dev PJSIP/b0n0 NOT_INUSE
3000 a dev PJSIP/b0n0 INUSE
3500 b set DEVICE_STATE(Custom:PJSIP/b0n0) INUSE
2500 b set DEVICE_STATE(Custom:PJSIP/b0n0) NOT_INUSE
",
        );
        let servers = ["a", "b"].map(str::to_owned);
        // The first INUSE (in the span) was never delivered: the INUSE at 3,500 ns belongs
        // to the change at 3,000 ns, after the span, which ends the first one's search.
        let first = analyze(&p, 0..1500, "PJSIP/b", &servers, None).expect("analyze");
        assert_eq!((first.changes, first.expected), (1, 1));
        assert!(first.latencies_us.is_empty());
        let two = analyze(&p, 0..2500, "PJSIP/b", &servers, None).expect("analyze");
        assert_eq!((two.changes, two.expected), (2, 2));
        assert_eq!(two.latencies_us, vec![0.5]);
        let rest = analyze(&p, 1500..u128::MAX, "PJSIP/b", &servers, None).expect("analyze");
        assert_eq!((rest.changes, rest.expected), (2, 2));
        assert_eq!(rest.latencies_us, vec![0.5, 0.5]);
    }

    #[test]
    fn set_runs_count_each_server_within_its_span_and_time_first_to_last() {
        let (_dir, p) = trace(
            "\
1000 ceiling set DEVICE_STATE(Custom:hfbench0) INUSE
500 ceiling set DEVICE_STATE(Custom:hfbench1) INUSE
2000 ceiling dev PJSIP/b0n0 INUSE
2500000500 ceiling set DEVICE_STATE(Custom:hfbench2) INUSE
3000 new set DEVICE_STATE(Custom:k0) BUSY
not a line
4000000000 ceiling set DEVICE_STATE(Custom:hfbench0) BUSY
",
        );
        let runs = set_runs(
            &p,
            &[
                ("ceiling", 0..3_000_000_000),
                ("new", 0..u128::MAX),
                ("ceiling", 3_000_000_000..u128::MAX),
                ("other", 0..u128::MAX),
            ],
        )
        .expect("runs");
        // Lines out of order still give the first and the last; `dev` lines are not Setvars.
        assert_eq!(
            runs[0],
            SetRun {
                sets: 3,
                first_ns: 500,
                last_ns: 2_500_000_500
            }
        );
        // 2 intervals between 3 Setvars over 2.5 s.
        assert_eq!(runs[0].per_sec(), Some(0.8));
        assert_eq!((runs[1].sets, runs[1].per_sec()), (1, None));
        assert_eq!(runs[2].sets, 1);
        assert_eq!(runs[3], SetRun::default());
    }
}
