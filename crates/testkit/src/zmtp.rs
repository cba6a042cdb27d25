//! The bytes of a raw ZMTP 3.0 peer (RFC 23, NULL mechanism), for tests that must behave in
//! ways a ZeroMQ library never would: subscribe and then never read, or announce a frame far
//! larger than any limit.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// A subscription to every topic as ZMTP 3.0 sends it: a one-byte message frame `\x01`.
pub const SUBSCRIBE_ALL: [u8; 3] = [0x00, 0x01, 0x01];

/// The 64-byte greeting: signature, version 3.0, mechanism `NULL`, as-server 0, filler. The
/// signature's padding is a 64-bit 1 as libzmq writes it (libzmq 4.3 closes a connection whose
/// padding is all zero; the zeromq crate and the hub accept both).
pub fn greeting() -> Vec<u8> {
    let mut g = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    let mut mech = b"NULL".to_vec();
    mech.resize(20, 0);
    g.extend(mech);
    g.push(0);
    g.extend([0u8; 31]);
    g
}

/// A READY command (short command frame) announcing `socket_type`, e.g. `SUB`.
pub fn ready(socket_type: &str) -> Vec<u8> {
    ready_with(socket_type, &[])
}

/// A READY command announcing `socket_type`, then the properties `props` in order (any
/// size: a long command frame when it needs one).
pub fn ready_with(socket_type: &str, props: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = b"\x05READY".to_vec();
    let socket_type: &[u8] = socket_type.as_bytes();
    for (name, value) in
        std::iter::once((&b"Socket-Type"[..], socket_type)).chain(props.iter().copied())
    {
        body.push(u8::try_from(name.len()).expect("short name"));
        body.extend_from_slice(name);
        body.extend(
            u32::try_from(value.len())
                .expect("value under 4 GiB")
                .to_be_bytes(),
        );
        body.extend_from_slice(value);
    }
    match u8::try_from(body.len()) {
        Ok(n) => {
            let mut c = vec![0x04, n];
            c.extend(body);
            c
        }
        Err(_) => {
            let mut c = vec![0x06];
            c.extend((body.len() as u64).to_be_bytes());
            c.extend(body);
            c
        }
    }
}

/// Reads one frame of a peer: (flags, body).
pub async fn read_frame(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let flags = s.read_u8().await?;
    let len = if flags & 0x02 != 0 {
        usize::try_from(s.read_u64().await?).map_err(|_| io::ErrorKind::InvalidData)?
    } else {
        usize::from(s.read_u8().await?)
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((flags, body))
}

/// Reads up to a peer's next message, skipping commands (its READY, PINGs); returns its
/// frames.
pub async fn read_message(s: &mut TcpStream) -> io::Result<Vec<Vec<u8>>> {
    let mut frames = Vec::new();
    loop {
        let (flags, body) = read_frame(s).await?;
        if flags & 0x04 != 0 {
            continue;
        }
        frames.push(body);
        if flags & 0x01 == 0 {
            return Ok(frames);
        }
    }
}

/// A short command frame: `name` (short) and `body`, at most 255 bytes in all.
pub fn command(name: &[u8], body: &[u8]) -> Vec<u8> {
    let mut c = vec![
        0x04,
        u8::try_from(1 + name.len() + body.len()).expect("short command"),
    ];
    c.push(u8::try_from(name.len()).expect("short name"));
    c.extend_from_slice(name);
    c.extend_from_slice(body);
    c
}

/// One ZMTP message as frames on the wire: `frames` in order, MORE on all but the last, each
/// a short or a long frame by its size.
pub fn message(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let more = u8::from(i + 1 < frames.len());
        match u8::try_from(f.len()) {
            Ok(n) => out.extend([more, n]),
            Err(_) => {
                out.push(more | 2);
                out.extend((f.len() as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(f);
    }
    out
}

/// A whole SUB handshake subscribing to everything: greeting, READY, [`SUBSCRIBE_ALL`].
pub fn sub_handshake() -> Vec<u8> {
    let mut b = greeting();
    b.extend(ready("SUB"));
    b.extend(SUBSCRIBE_ALL);
    b
}

/// The header of a long message frame announcing `len` bytes (flags 0x02, 8-byte length),
/// without the bytes.
pub fn long_frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x02];
    h.extend(len.to_be_bytes());
    h
}

/// Connects to `addr` as a raw ZMTP peer: writes our greeting, `ready` and `then` (e.g.
/// [`SUBSCRIBE_ALL`]), and reads the peer's 64-byte greeting (an error unless it starts as
/// one does, with 0xff).
pub async fn connect(addr: impl ToSocketAddrs, ready: &[u8], then: &[u8]) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let mut hs = greeting();
    hs.extend_from_slice(ready);
    hs.extend_from_slice(then);
    s.write_all(&hs).await?;
    let mut peer = [0u8; 64];
    s.read_exact(&mut peer).await?;
    if peer[0] != 0xff {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a ZMTP greeting",
        ));
    }
    Ok(s)
}

/// Connects to `addr`, sends [`sub_handshake`] and returns the connection, which the caller
/// then never reads: a subscriber whose receive window fills up.
pub async fn deaf_subscriber(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&sub_handshake()).await?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_has_the_rfc_23_layout() {
        let g = greeting();
        assert_eq!(g.len(), 64);
        assert_eq!((g[0], g[8], g[9], g[10], g[11]), (0xff, 1, 0x7f, 3, 0));
        assert_eq!(&g[12..16], b"NULL");
        let r = ready("SUB");
        assert_eq!(&r[..2], &[0x04, 25]);
        assert_eq!(r.len(), 27);
        assert!(r.ends_with(b"Socket-Type\x00\x00\x00\x03SUB"));
        assert!(sub_handshake().ends_with(&SUBSCRIBE_ALL));
        assert_eq!(long_frame_header(1 << 40), [2, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(ready_with("SUB", &[]), r);
        let big = vec![b'v'; 300];
        let r = ready_with("SUB", &[(b"X-A", &big)]);
        assert_eq!(r[0], 0x06);
        assert_eq!(&r[1..9], &(r.len() as u64 - 9).to_be_bytes());
        assert!(r.ends_with(&[&b"\x03X-A\x00\x00\x01\x2c"[..], &big].concat()));
    }
}
