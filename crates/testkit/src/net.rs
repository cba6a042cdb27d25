//! Loopback ports for tests that must name a port before the listener exists (a daemon's
//! config file). Free when returned; the caller binds them soon after.
//!
//! A port is free when handed out, but nothing holds it until its daemon binds it: the kernel
//! may hand the same port to the next `bind(127.0.0.1:0)` in the meantime (about once in 200
//! `hintfed-bench run`s of 10 agents the same HTTP port went to two agents; the second one
//! exited with `cannot bind [http] listen` while its `/readyz` was answered by the first, and
//! the run silently went without that agent). So one process never gets the same port twice:
//! every port handed out (both of a pair) is remembered and skipped afterwards.

use std::collections::HashSet;
use std::io;
use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};

/// Ports handed out by this process so far (never handed out again).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Attempts at finding a port not handed out before.
const ATTEMPTS: usize = 1000;

/// Records `ports` as handed out if none of them was before; `false` otherwise.
fn claim(ports: &[u16]) -> bool {
    let mut g = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let set = g.get_or_insert_with(HashSet::new);
    if ports.iter().any(|p| set.contains(p)) {
        return false;
    }
    set.extend(ports);
    true
}

fn any_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn exhausted() -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "no free port left that this process did not hand out already",
    )
}

/// A free TCP port on 127.0.0.1, never one this process got before.
pub fn try_free_port() -> io::Result<u16> {
    for _ in 0..ATTEMPTS {
        let p = any_port()?;
        if claim(&[p]) {
            return Ok(p);
        }
    }
    Err(exhausted())
}

/// A port P such that P and P+1 are both free on 127.0.0.1 (a hub binds both), neither
/// handed out by this process before.
pub fn try_free_port_pair() -> io::Result<u16> {
    for _ in 0..ATTEMPTS {
        let p = any_port()?;
        if p < u16::MAX
            && let (Ok(a), Ok(b)) = (
                TcpListener::bind(("127.0.0.1", p)),
                TcpListener::bind(("127.0.0.1", p + 1)),
            )
        {
            drop((a, b));
            if claim(&[p, p + 1]) {
                return Ok(p);
            }
        }
    }
    Err(exhausted())
}

/// [`try_free_port`]; panics when 127.0.0.1 cannot be bound.
pub fn free_port() -> u16 {
    try_free_port().expect("bind 127.0.0.1:0")
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
}
