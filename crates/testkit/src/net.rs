//! Loopback ports for tests that must name a port before the listener exists (a daemon's
//! config file), and keep naming it when that daemon restarts. Free when returned; the caller
//! binds them soon after.
//!
//! A port is free when handed out, but nothing holds it until its daemon binds it, nor while
//! the daemon is down between a kill and a restart on the same port. Three things took such a
//! port before:
//!
//! - the next `bind(127.0.0.1:0)` in this process: about once in 200 `hintfed-bench run`s of
//!   10 agents the same HTTP port went to two agents (the second exited with `cannot bind
//!   [http] listen` while the first answered its `/readyz`). So one process never hands out
//!   the same port twice: every port handed out (both of a pair) is remembered and skipped.
//! - another test process (nextest runs each test in its own): ports come from a range no
//!   one else here hands out, and each is claimed by a lock on a file named after it
//!   (`flock`, held until the process exits, released by the kernel even after a crash), so
//!   no two processes that use this module hold the same port.
//! - any process's outgoing connection: its local port is the kernel's ephemeral range
//!   (`/proc/sys/net/ipv4/ip_local_port_range`), where `bind(0)` picks too; an agent that
//!   reconnects to a stopped stand-in every few milliseconds can even connect to itself (TCP
//!   simultaneous open) on that very port. Ports are therefore picked *below* the ephemeral
//!   range, which outgoing connections never use. (Seen in session 11: a restarted
//!   res_zmq_manager stand-in failed with `Address already in use` on its old port.)
//!
//! When the ephemeral range leaves no room below it (fewer than [`MIN_SPAN`] ports above
//! [`FLOOR`]), or the lock directory cannot be used, ports come from `bind(0)` as before.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::TcpListener;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// What this process handed out so far: the ports (never handed out again) and the locks
/// that claim them for as long as the process lives.
struct Claims {
    ports: HashSet<u16>,
    locks: Vec<File>,
}

static CLAIMS: Mutex<Option<Claims>> = Mutex::new(None);

/// Attempts at finding a port not handed out before.
const ATTEMPTS: usize = 1000;

/// Lowest port picked below the ephemeral range (above the registered ports most local
/// services use).
pub const FLOOR: u16 = 20_000;

/// Fewest ports below the ephemeral range worth picking from.
pub const MIN_SPAN: u16 = 2_000;

fn with_claims<T>(f: impl FnOnce(&mut Claims) -> T) -> T {
    let mut g = CLAIMS.lock().unwrap_or_else(PoisonError::into_inner);
    f(g.get_or_insert_with(|| Claims {
        ports: HashSet::new(),
        locks: Vec::new(),
    }))
}

/// The kernel's ephemeral port range, as `ip_local_port_range` states it.
fn ephemeral_range() -> Option<Range<u32>> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u32>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(lo..hi + 1)
}

/// Where ports are picked from: between [`FLOOR`] and the ephemeral range, or `None` when
/// that leaves fewer than [`MIN_SPAN`] ports.
pub fn pick_range() -> Option<Range<u16>> {
    let top = u16::try_from(ephemeral_range()?.start).ok()?;
    (top >= FLOOR + MIN_SPAN).then_some(FLOOR..top)
}

/// The directory of the port lock files (one per user, so users do not share locks they
/// cannot open).
fn lock_dir() -> PathBuf {
    let user = std::env::var("USER").unwrap_or_else(|_| "any".to_owned());
    std::env::temp_dir().join(format!("hintfed-test-ports-{user}"))
}

/// Locks `port`'s file for the rest of this process; `None` if another holder has it (or
/// the file cannot be made: the directory is made once, by [`lock_dir_usable`]).
fn lock_port(port: u16) -> Option<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_dir().join(port.to_string()))
        .ok()?;
    f.try_lock().ok()?;
    Some(f)
}

/// Claims `ports` for this process: none handed out by it before, each file lock taken
/// (when `lock`), each bindable now. All or nothing.
fn claim(ports: &[u16], lock: bool) -> bool {
    with_claims(|c| {
        if ports.iter().any(|p| c.ports.contains(p)) {
            return false;
        }
        let mut locks = Vec::new();
        if lock {
            for &p in ports {
                match lock_port(p) {
                    Some(f) => locks.push(f),
                    None => return false,
                }
            }
        }
        // Bound by something outside this scheme (or by a daemon of a process that exited
        // without releasing it yet): not free. Listeners dropped at once.
        if ports
            .iter()
            .any(|&p| TcpListener::bind(("127.0.0.1", p)).is_err())
        {
            return false;
        }
        c.ports.extend(ports);
        c.locks.extend(locks);
        true
    })
}

fn exhausted() -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "no free port left that this process did not hand out already",
    )
}

/// A starting point that differs between processes started at the same time.
fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    (u64::from(std::process::id()) << 32 ^ nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
}

/// `count` consecutive free ports (1 or 2), the first returned.
fn try_free_ports(count: u16) -> io::Result<u16> {
    if let Some(range) = pick_range()
        && lock_dir_usable()
    {
        let span = u64::from(range.end - range.start - count);
        let mut at = seed() % span;
        for _ in 0..ATTEMPTS {
            // `at < span`, so the ports stay inside the range.
            let p = range.start + u16::try_from(at).unwrap_or(0);
            let ports: Vec<u16> = (p..p + count).collect();
            if claim(&ports, true) {
                return Ok(p);
            }
            at = (at + 1 + seed() % 64) % span;
        }
        return Err(exhausted());
    }
    for _ in 0..ATTEMPTS {
        let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if let Some(last) = p.checked_add(count - 1) {
            let ports: Vec<u16> = (p..=last).collect();
            if claim(&ports, false) {
                return Ok(p);
            }
        }
    }
    Err(exhausted())
}

fn lock_dir_usable() -> bool {
    fs::create_dir_all(lock_dir()).is_ok()
}

/// A free TCP port on 127.0.0.1, never one this process (or another using this module) got
/// before, outside the kernel's ephemeral range when it can be.
pub fn try_free_port() -> io::Result<u16> {
    try_free_ports(1)
}

/// A port P such that P and P+1 are both free on 127.0.0.1 (a hub binds both), claimed as
/// [`try_free_port`] claims one.
pub fn try_free_port_pair() -> io::Result<u16> {
    try_free_ports(2)
}

/// [`try_free_port`]; panics when none is found.
pub fn free_port() -> u16 {
    try_free_port().expect("a free port on 127.0.0.1")
}

/// [`try_free_port_pair`]; panics when no pair is found.
pub fn free_port_pair() -> u16 {
    try_free_port_pair().expect("a free pair of ports on 127.0.0.1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_two_bindable_ports() {
        let p = free_port_pair();
        let a = TcpListener::bind(("127.0.0.1", p)).expect("P free");
        let b = TcpListener::bind(("127.0.0.1", p + 1)).expect("P+1 free");
        drop((a, b));
        assert_ne!(free_port(), 0);
    }

    /// Ports are handed out before anything binds them (a bench allocates every daemon's
    /// port, then starts the daemons): the kernel's `bind(0)` alone returns a port it gave
    /// before about once in 14,000 calls per earlier port still unbound, so 2,000 unbound
    /// ports would hold ~140 duplicates.
    #[test]
    fn ports_handed_out_unbound_are_never_handed_out_again() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let p = free_port();
            assert!(seen.insert(p), "port {p} handed out twice");
        }
        for _ in 0..500 {
            let p = free_port_pair();
            assert!(seen.insert(p), "port {p} handed out twice");
            assert!(seen.insert(p + 1), "port {} handed out twice", p + 1);
        }
    }

    /// Outgoing connections take their local port from the ephemeral range; a port handed
    /// out here must never be one of them (on this machine's usual range).
    #[test]
    fn ports_come_from_below_the_ephemeral_range() {
        let Some(range) = pick_range() else {
            // A kernel range starting below FLOOR + MIN_SPAN: bind(0) is all there is.
            return;
        };
        let eph = ephemeral_range().expect("range read once, readable again");
        for _ in 0..50 {
            let p = free_port();
            assert!(range.contains(&p), "{p} outside {range:?}");
            assert!(
                !eph.contains(&u32::from(p)),
                "{p} in the ephemeral range {eph:?}"
            );
            let q = free_port_pair();
            assert!(
                range.contains(&q) && range.contains(&(q + 1)),
                "{q} outside {range:?}"
            );
        }
    }

    /// A port handed out is held against every other holder until this process exits: its
    /// lock file cannot be locked again through another open file (as another process
    /// would), so another process skips it.
    #[test]
    fn a_port_handed_out_is_locked_against_other_processes() {
        if pick_range().is_none() {
            return;
        }
        let p = free_port();
        assert!(lock_port(p).is_none(), "port {p} locked twice");
        let q = free_port_pair();
        assert!(lock_port(q).is_none() && lock_port(q + 1).is_none());
    }

    /// A port some other program has bound (outside this scheme) is not claimed, and a
    /// failed claim keeps no lock.
    #[test]
    fn a_bound_port_is_not_claimed() {
        let Some(range) = pick_range() else {
            return;
        };
        assert!(lock_dir_usable(), "lock directory");
        let (p, held) = range
            .clone()
            .find_map(|p| {
                let taken = with_claims(|c| c.ports.contains(&p));
                let l = TcpListener::bind(("127.0.0.1", p)).ok()?;
                (!taken).then_some((p, l))
            })
            .expect("a bindable port in the range");
        assert!(!claim(&[p], true), "bound port {p} claimed");
        assert!(
            lock_port(p).is_some(),
            "a failed claim kept the lock of {p}"
        );
        drop(held);
        assert!(claim(&[p], true), "port {p} free again but not claimed");
    }
}
