//! Loopback ports for tests that must name a port before the listener exists (a daemon's
//! config file). Free when returned; the caller binds them soon after.

use std::io;
use std::net::TcpListener;

/// A free TCP port on 127.0.0.1.
pub fn try_free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port P such that P and P+1 are both free on 127.0.0.1 (a hub binds both).
pub fn try_free_port_pair() -> io::Result<u16> {
    for _ in 0..200 {
        let p = try_free_port()?;
        if p < u16::MAX
            && let (Ok(a), Ok(b)) = (
                TcpListener::bind(("127.0.0.1", p)),
                TcpListener::bind(("127.0.0.1", p + 1)),
            )
        {
            drop((a, b));
            return Ok(p);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "no free pair of ports found",
    ))
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
}
