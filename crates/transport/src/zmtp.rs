//! ZMTP 3.0 (RFC 23, NULL mechanism) spoken directly, shared by the hub's listeners
//! (`fanout`, `router`: the server side of the handshake and a frame reader) and by the
//! client connection [`Conn`] (the SUB side of [`crate::SubClient`], the SUB and DEALER sides
//! of [`crate::HubLink`]).
//!
//! Wire pieces: the 64-byte greeting, commands (`READY` with its properties, read in place
//! by [`properties`], among them our application property [`ORIGIN_PROPERTY`], `PING`/`PONG`),
//! frame headers (short: flags + 1-byte length; long: flags + 8-byte length). Sizes are
//! checked on the header, before a body is buffered.
//!
//! [`Conn`]: connects (TCP connect bounded by the caller's attempt timeout, greeting and
//! READY bounded by [`client_handshake_timeout`]) as a SUB ([`Conn::subscriber`]: the peer
//! must be a publisher, Socket-Type `PUB` or `XPUB`; each subscription is sent as a ZMTP 3.0
//! message `\x01prefix`, accepted by libzmq 4.x publishers and by `fanout`) or as a DEALER
//! ([`Conn::dealer`]: the peer must be a `ROUTER` or `DEALER`), then yields whole multipart
//! messages: every complete message one read returns, at once (or at most as many as the
//! caller has room for). A message beyond the [`Limits`] (too many frames, too many bytes) is
//! skipped as its bytes arrive, never buffered, and reported for counting; `PING` commands
//! are answered with `PONG`; anything that is not ZMTP (a bad greeting, reserved flag bits,
//! an oversize command, an `ERROR` command) ends the connection with a [`ZmtpError`].
//! Outgoing messages ([`Conn::push`]) are encoded into one buffer, written (with the pending
//! `PONG`s) by [`Conn::flush`] in as few writes as the socket takes.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::link::{Frames, Limits, parse_tcp_endpoint};

/// Largest ZMTP command body accepted from a peer.
pub(crate) const MAX_COMMAND: usize = 64 * 1024;
/// Least room made in a client connection's read buffer before each read (and its first
/// size).
const READ_MIN: usize = 8 * 1024;
/// Most room made in a client connection's read buffer before each read.
const READ_MAX: usize = 64 * 1024;

/// Our greeting: ZMTP 3.0, NULL mechanism, `as_server` as given (the padding is zero, as the
/// `zeromq` crate writes it).
pub(crate) fn greeting(as_server: bool) -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g[32] = u8::from(as_server);
    g
}

/// Checks a peer's greeting: the signature, version 3 or later, mechanism NULL.
pub(crate) fn check_greeting(peer: &[u8; 64]) -> Result<(), &'static str> {
    if peer[0] != 0xff || peer[9] & 0x01 == 0 {
        return Err("no ZMTP signature");
    }
    if peer[10] < 3 {
        return Err("ZMTP version older than 3.0");
    }
    let mechanism = &peer[12..32];
    if !mechanism.starts_with(b"NULL") || mechanism[4..].iter().any(|&b| b != 0) {
        return Err("security mechanism is not NULL");
    }
    Ok(())
}

/// A command frame `name` + `body`.
pub(crate) fn command(name: &[u8], body: &[u8]) -> Vec<u8> {
    let len = 1 + name.len() + body.len();
    let mut out = Vec::with_capacity(len + 9);
    match u8::try_from(len) {
        Ok(n) => out.extend_from_slice(&[0x04, n]),
        Err(_) => {
            out.push(0x06);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(body);
    out
}

/// The application property (ZMTP metadata, `X-` prefixed as RFC 37 and libzmq's
/// `ZMQ_METADATA` have application properties) by which a hub link's SUB announces the origin
/// its owner publishes as: a hub's fan-out then sends it none of that origin's messages.
pub(crate) const ORIGIN_PROPERTY: &[u8] = b"X-Hintfed-Origin";

/// Longest origin a SUB announces, and a fan-out takes from a READY (longer: none; an
/// envelope's origin is at most 128 bytes by default).
pub(crate) const MAX_ORIGIN: usize = 255;

/// Appends one READY property; a name longer than 255 bytes or a value longer than
/// `u32::MAX` bytes (which the format cannot carry) is left out.
fn put_property(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let (Ok(n), Ok(len)) = (u8::try_from(name.len()), u32::try_from(value.len())) else {
        return;
    };
    out.push(n);
    out.extend_from_slice(name);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
}

/// Our READY command, announcing `socket_type` (`PUB`, `ROUTER`, `SUB`) and the `extra`
/// properties, in order.
pub(crate) fn ready(socket_type: &[u8], extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut props = Vec::new();
    put_property(&mut props, b"Socket-Type", socket_type);
    for (name, value) in extra {
        put_property(&mut props, name, value);
    }
    command(b"READY", &props)
}

/// A READY command body whose properties do not follow the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// The properties of a READY command body (after its name), in order, read in place (nothing
/// is allocated, whatever the body): `(name, value)` pairs, then one `Err` (and nothing more)
/// where the rest is malformed.
pub(crate) fn properties(body: &[u8]) -> Properties<'_> {
    Properties { rest: Some(body) }
}

/// The first property of `body` (name, value) and what follows it, if it is whole.
fn split_property(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let n = usize::from(*body.first()?);
    let name = body.get(1..1 + n)?;
    let len_bytes: [u8; 4] = body.get(1 + n..5 + n)?.try_into().ok()?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).ok()?;
    let end = (5 + n).checked_add(len)?;
    let value = body.get(5 + n..end)?;
    Some((name, value, &body[end..]))
}

/// The iterator of [`properties`].
pub(crate) struct Properties<'a> {
    /// What is left to read; `None` once a malformed property was reported.
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for Properties<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        let body = self.rest.take()?;
        if body.is_empty() {
            return None;
        }
        let parsed = split_property(body);
        Some(match parsed {
            Some((name, value, rest)) => {
                self.rest = Some(rest);
                Ok((name, value))
            }
            None => Err(Malformed),
        })
    }
}

/// The PONG answering a PING command body (after the name: a 2-byte TTL, then a context
/// echoed back).
pub(crate) fn pong_for(ping_rest: &[u8]) -> Vec<u8> {
    command(b"PONG", ping_rest.get(2..).unwrap_or_default())
}

/// Appends one message frame header for `len` body bytes (short below 256 bytes, else long).
fn put_frame_header(out: &mut impl BufMut, more: bool, len: usize) {
    let more = u8::from(more);
    match u8::try_from(len) {
        Ok(n) => out.put_slice(&[more, n]),
        Err(_) => {
            out.put_u8(more | 0x02);
            out.put_u64(len as u64);
        }
    }
}

/// Appends the ZMTP encoding of one message (`frames`; MORE on all but the last) to `out`.
pub(crate) fn encode_message(out: &mut impl BufMut, frames: &[Bytes]) {
    let last = frames.len().saturating_sub(1);
    for (i, f) in frames.iter().enumerate() {
        put_frame_header(out, i < last, f.len());
        out.put_slice(f);
    }
}

/// A frame header: flags, header length, announced body length.
#[derive(Debug, Clone, Copy)]
struct Header {
    command: bool,
    more: bool,
    head: usize,
    len: u64,
}

/// The header at the start of `buf`, if buffered whole.
fn header(buf: &[u8]) -> Option<Header> {
    let &flags = buf.first()?;
    let long = flags & 0x02 != 0;
    let head = if long { 9 } else { 2 };
    if buf.len() < head {
        return None;
    }
    let len = if long {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[1..9]);
        u64::from_be_bytes(b)
    } else {
        u64::from(buf[1])
    };
    Some(Header {
        command: flags & 0x04 != 0,
        more: flags & 0x01 != 0,
        head,
        len,
    })
}

/// One frame read from a peer.
pub(crate) struct Frame {
    pub(crate) command: bool,
    pub(crate) more: bool,
    pub(crate) body: Bytes,
}

/// Why a peer connection (of a listener) ends.
pub(crate) enum End {
    Closed,
    Oversize,
}

/// Incremental reader of a peer's frames with the size limits checked on the header.
pub(crate) struct Reader {
    pub(crate) read: OwnedReadHalf,
    pub(crate) buf: BytesMut,
    pub(crate) limits: Limits,
}

impl Reader {
    /// The next complete frame, reading as needed.
    pub(crate) async fn frame(&mut self) -> Result<Frame, End> {
        loop {
            if let Some(f) = self.parse(self.limits.max_message_bytes)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes (at least 4 KiB of room); cancel-safe.
    pub(crate) async fn fill(&mut self) -> Result<(), End> {
        self.buf.reserve(4096);
        match self.read.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Err(End::Closed),
            Ok(_) => Ok(()),
        }
    }

    /// The next frame if it is buffered whole; a message frame announcing more than
    /// `max_data` bytes (a command more than [`MAX_COMMAND`]) is refused on its header.
    pub(crate) fn parse(&mut self, max_data: usize) -> Result<Option<Frame>, End> {
        let Some(h) = header(&self.buf) else {
            return Ok(None);
        };
        let max = if h.command { MAX_COMMAND } else { max_data };
        if h.len > max as u64 {
            return Err(End::Oversize);
        }
        let len = h.len as usize;
        if self.buf.len() < h.head + len {
            return Ok(None);
        }
        self.buf.advance(h.head);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(Frame {
            command: h.command,
            more: h.more,
            body,
        }))
    }
}

/// The server side of a ZMTP 3.0 NULL handshake: sends our greeting and `ready`, checks the
/// peer's greeting (version 3 or later, mechanism NULL) and returns the peer's first frame,
/// a command (its READY), for the caller to check. `buf` is the reader's initial capacity.
pub(crate) async fn handshake(
    stream: TcpStream,
    limits: Limits,
    ready: &[u8],
    buf: usize,
) -> Result<(Reader, OwnedWriteHalf, Frame), End> {
    let (mut read, mut write) = stream.into_split();
    let mut out = greeting(true).to_vec();
    out.extend(ready);
    write.write_all(&out).await.map_err(|_| End::Closed)?;
    let mut peer = [0u8; 64];
    read.read_exact(&mut peer).await.map_err(|_| End::Closed)?;
    if check_greeting(&peer).is_err() {
        return Err(End::Closed);
    }
    let mut reader = Reader {
        read,
        buf: BytesMut::with_capacity(buf),
        limits,
    };
    let first = reader.frame().await?;
    if !first.command {
        return Err(End::Closed);
    }
    Ok((reader, write, first))
}

/// Why a client connection ([`Conn`]) failed or ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ZmtpError {
    /// The endpoint is not `tcp://host:port`.
    #[error("invalid endpoint")]
    Endpoint,
    /// The TCP connection could not be made.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// The TCP connection was not made within the attempt timeout.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The peer did not complete the greeting and READY exchange in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The peer closed the connection (or reading/writing it failed).
    #[error("connection closed")]
    Closed,
    /// The peer's greeting is not a ZMTP 3.x NULL greeting.
    #[error("bad greeting: {0}")]
    Greeting(&'static str),
    /// The peer's READY is malformed or names a socket type ours cannot talk to.
    #[error("bad READY: {0}")]
    Ready(String),
    /// The peer sent bytes that are not ZMTP.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The peer sent an ERROR command.
    #[error("peer sent ERROR: {0}")]
    PeerError(String),
    /// A write to the peer did not complete in time.
    #[error("write timed out")]
    WriteTimeout,
}

/// Bound on the greeting and READY exchange of a [`Conn`] whose TCP connect is bounded by
/// `attempt`: at least 1 s, so a loaded but healthy peer is not refused.
pub(crate) fn client_handshake_timeout(attempt: Duration) -> Duration {
    attempt.max(Duration::from_secs(1))
}

/// The multipart message being reassembled, or skipped for its size.
#[derive(Debug, Default)]
struct Assembly {
    frames: Frames,
    bytes: usize,
    /// The current message exceeds the limits: its frames are discarded until its last one.
    dropping: bool,
    /// Body bytes of an oversize frame still to discard.
    skip: u64,
    /// Whether the frame being discarded is the last of its message.
    skip_last: bool,
}

/// What parsing the buffer gave besides whole messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// Messages skipped because they exceed the limits.
    pub(crate) oversize: usize,
}

/// The reassembly of a client connection's incoming bytes into messages (no I/O: [`Conn`]
/// feeds it; unit-tested byte by byte).
#[derive(Debug)]
pub(crate) struct Parser {
    limits: Limits,
    msg: Assembly,
    /// Commands to write back (PONGs).
    pending: Vec<u8>,
}

impl Parser {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            msg: Assembly::default(),
            pending: Vec::new(),
        }
    }

    /// Takes every complete message at the front of `buf` into `out`, at most `max` of them
    /// (and discards the bytes of oversize ones); what is left in `buf` is an incomplete
    /// frame, or the messages beyond `max`.
    pub(crate) fn parse(
        &mut self,
        buf: &mut BytesMut,
        out: &mut Vec<Frames>,
        max: usize,
    ) -> Result<Parsed, ZmtpError> {
        let mut parsed = Parsed::default();
        let start = out.len();
        loop {
            if out.len() - start >= max {
                return Ok(parsed);
            }
            if self.msg.skip > 0 {
                let n = usize::try_from(self.msg.skip)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                buf.advance(n);
                self.msg.skip -= n as u64;
                if self.msg.skip > 0 {
                    return Ok(parsed);
                }
                if self.msg.skip_last {
                    self.msg = Assembly::default();
                    parsed.oversize += 1;
                }
                continue;
            }
            let Some(h) = header(buf) else {
                return Ok(parsed);
            };
            if buf[0] & 0xf8 != 0 {
                return Err(ZmtpError::Protocol("reserved frame flag bits set"));
            }
            if h.command {
                if h.len > MAX_COMMAND as u64 {
                    return Err(ZmtpError::Protocol("oversize command"));
                }
                let len = h.len as usize;
                if buf.len() < h.head + len {
                    buf.reserve(h.head + len - buf.len());
                    return Ok(parsed);
                }
                buf.advance(h.head);
                let body = buf.split_to(len);
                self.command(&body)?;
                continue;
            }
            let fits = !self.msg.dropping
                && self.msg.frames.len() < self.limits.max_frames
                && h.len <= (self.limits.max_message_bytes - self.msg.bytes) as u64;
            if !fits {
                // Skipped as it arrives: the body is never buffered.
                buf.advance(h.head);
                self.msg.frames.clear();
                self.msg.dropping = true;
                self.msg.skip = h.len;
                self.msg.skip_last = !h.more;
                if h.len == 0 && !h.more {
                    self.msg = Assembly::default();
                    parsed.oversize += 1;
                }
                continue;
            }
            let len = h.len as usize;
            if buf.len() < h.head + len {
                buf.reserve(h.head + len - buf.len());
                return Ok(parsed);
            }
            buf.advance(h.head);
            let body = buf.split_to(len).freeze();
            self.msg.bytes += len;
            self.msg.frames.push(body);
            if !h.more {
                let msg = std::mem::take(&mut self.msg);
                out.push(msg.frames);
            }
        }
    }

    fn command(&mut self, body: &[u8]) -> Result<(), ZmtpError> {
        let Some(&n) = body.first() else {
            return Err(ZmtpError::Protocol("empty command"));
        };
        let n = usize::from(n);
        let (Some(name), Some(rest)) = (body.get(1..1 + n), body.get(1 + n..)) else {
            return Err(ZmtpError::Protocol("truncated command name"));
        };
        match name {
            b"PING" => self.pending.extend(pong_for(rest)),
            b"ERROR" => {
                let reason = rest.get(1..).unwrap_or_default();
                return Err(ZmtpError::PeerError(
                    String::from_utf8_lossy(reason).into_owned(),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a client connection is: its own socket type and the peer socket types it can talk to.
#[derive(Debug, Clone, Copy)]
struct Role {
    socket_type: &'static [u8],
    peers: &'static [&'static [u8]],
}

/// A SUB: fed by a publisher.
const SUB: Role = Role {
    socket_type: b"SUB",
    peers: &[b"PUB", b"XPUB"],
};

/// A DEALER: talks to a ROUTER (or another DEALER), as RFC 28 allows.
const DEALER: Role = Role {
    socket_type: b"DEALER",
    peers: &[b"ROUTER", b"DEALER"],
};

/// Checks the peer's READY command body: a Socket-Type `role` can talk to.
fn check_ready(body: &[u8], role: Role) -> Result<(), ZmtpError> {
    let rest = body
        .strip_prefix(b"\x05READY")
        .ok_or_else(|| ZmtpError::Ready("first command is not READY".into()))?;
    let mut socket_type = None;
    for p in properties(rest) {
        let (name, value) = p.map_err(|_| ZmtpError::Ready("malformed properties".into()))?;
        if socket_type.is_none() && name.eq_ignore_ascii_case(b"Socket-Type") {
            socket_type = Some(value);
        }
    }
    let socket_type = socket_type.ok_or_else(|| ZmtpError::Ready("no Socket-Type".into()))?;
    if role.peers.contains(&socket_type) {
        return Ok(());
    }
    Err(ZmtpError::Ready(format!(
        "Socket-Type {:?} cannot talk to a {}",
        String::from_utf8_lossy(socket_type),
        String::from_utf8_lossy(role.socket_type)
    )))
}

/// A subscription (`\x01prefix`) as a ZMTP 3.0 message frame.
fn subscription(prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + 10);
    put_frame_header(&mut out, false, prefix.len() + 1);
    out.push(1);
    out.extend_from_slice(prefix);
    out
}

/// A client connection to a ZMTP 3.x peer, as a SUB or a DEALER (see the module doc).
#[derive(Debug)]
pub(crate) struct Conn {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buf: BytesMut,
    parser: Parser,
    /// Bytes the last read returned.
    last_read: usize,
    /// Encoded messages (and answers to PINGs) waiting for [`Conn::flush`].
    out: Vec<u8>,
}

impl Conn {
    /// Connects to the publisher at `endpoint` (`tcp://host:port`; the TCP connect bounded by
    /// `attempt`, the handshake by [`client_handshake_timeout`]) and subscribes to
    /// `subscriptions`. `origin`: announced in our READY as [`ORIGIN_PROPERTY`] (left out
    /// when longer than [`MAX_ORIGIN`] bytes); a peer that does not know the property
    /// ignores it, as ZMTP has peers do with properties they do not use.
    pub(crate) async fn subscriber(
        endpoint: &str,
        attempt: Duration,
        subscriptions: &[String],
        origin: Option<&str>,
        limits: Limits,
    ) -> Result<Self, ZmtpError> {
        let mut first = Vec::new();
        for s in subscriptions {
            first.extend(subscription(s.as_bytes()));
        }
        let origin = origin.filter(|o| o.len() <= MAX_ORIGIN);
        let extra: &[(&[u8], &[u8])] = match &origin {
            Some(o) => &[(ORIGIN_PROPERTY, o.as_bytes())],
            None => &[],
        };
        let ready = ready(SUB.socket_type, extra);
        Self::connect(endpoint, attempt, &ready, SUB, &first, limits).await
    }

    /// Connects as a DEALER to the ROUTER at `endpoint` (bounds as [`Conn::subscriber`]).
    pub(crate) async fn dealer(
        endpoint: &str,
        attempt: Duration,
        limits: Limits,
    ) -> Result<Self, ZmtpError> {
        let ready = ready(DEALER.socket_type, &[]);
        Self::connect(endpoint, attempt, &ready, DEALER, &[], limits).await
    }

    /// Connects as `role`, our READY command being `ready`.
    async fn connect(
        endpoint: &str,
        attempt: Duration,
        ready: &[u8],
        role: Role,
        first: &[u8],
        limits: Limits,
    ) -> Result<Self, ZmtpError> {
        let (host, port) = parse_tcp_endpoint(endpoint).map_err(|_| ZmtpError::Endpoint)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::time::timeout(attempt, TcpStream::connect((host, port)))
            .await
            .map_err(|_| ZmtpError::ConnectTimeout)?
            .map_err(ZmtpError::Connect)?;
        let _ = stream.set_nodelay(true);
        tokio::time::timeout(
            client_handshake_timeout(attempt),
            Self::handshake(stream, ready, role, first, limits),
        )
        .await
        .map_err(|_| ZmtpError::HandshakeTimeout)?
    }

    /// Greeting and READY (`ready`) exchange as `role`, then `first` (the subscriptions)
    /// written.
    async fn handshake(
        stream: TcpStream,
        ready: &[u8],
        role: Role,
        first: &[u8],
        limits: Limits,
    ) -> Result<Self, ZmtpError> {
        let (mut read, mut write) = stream.into_split();
        let mut out = greeting(false).to_vec();
        out.extend_from_slice(ready);
        write.write_all(&out).await.map_err(|_| ZmtpError::Closed)?;
        let mut peer = [0u8; 64];
        read.read_exact(&mut peer)
            .await
            .map_err(|_| ZmtpError::Closed)?;
        check_greeting(&peer).map_err(ZmtpError::Greeting)?;
        let mut buf = BytesMut::with_capacity(READ_MIN);
        // The peer's READY: the first frame, a command.
        let ready_body = loop {
            if let Some(h) = header(&buf) {
                if !h.command {
                    return Err(ZmtpError::Ready("first frame is not a command".into()));
                }
                if h.len > MAX_COMMAND as u64 {
                    return Err(ZmtpError::Ready("oversize command".into()));
                }
                let len = h.len as usize;
                if buf.len() >= h.head + len {
                    buf.advance(h.head);
                    break buf.split_to(len);
                }
            }
            buf.reserve(4096);
            match read.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(ZmtpError::Closed),
                Ok(_) => {}
            }
        };
        check_ready(&ready_body, role)?;
        if !first.is_empty() {
            write
                .write_all(first)
                .await
                .map_err(|_| ZmtpError::Closed)?;
        }
        Ok(Self {
            read,
            write,
            buf,
            parser: Parser::new(limits),
            last_read: 0,
            out: Vec::new(),
        })
    }

    /// Waits for at least one complete message (or one skipped for its size, or a command to
    /// answer) and takes the complete messages buffered into `out`, at most `max` (at least
    /// one); the others stay buffered for the next call. Cancel-safe: it only waits while
    /// reading, with nothing taken.
    pub(crate) async fn recv(
        &mut self,
        out: &mut Vec<Frames>,
        max: usize,
    ) -> Result<Parsed, ZmtpError> {
        let max = max.max(1);
        loop {
            let parsed = self.parser.parse(&mut self.buf, out, max)?;
            if !out.is_empty() || parsed.oversize > 0 || !self.parser.pending.is_empty() {
                return Ok(parsed);
            }
            // The delivered frames point into the buffer: while any is alive, its allocation
            // is too, and a read needs a new one. Sized to what reads return (twice the last
            // one, within bounds), a slow trickle pins little memory per message and a busy
            // connection still reads many messages at once.
            self.buf
                .reserve((self.last_read * 2).clamp(READ_MIN, READ_MAX));
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ZmtpError::Closed),
                Ok(n) => self.last_read = n,
            }
        }
    }

    /// Encodes one message (`frames`, MORE on all but the last) for the next
    /// [`Conn::flush`].
    pub(crate) fn push(&mut self, frames: &[Bytes]) {
        encode_message(&mut self.out, frames);
    }

    /// Bytes pushed and not yet flushed.
    pub(crate) fn pushed(&self) -> usize {
        self.out.len()
    }

    /// Writes what was pushed, and the answers (PONGs) to the `PING`s read so far, if any;
    /// fails with [`ZmtpError::WriteTimeout`] when a write makes no progress within `within`
    /// (what is left unwritten is then discarded, with the connection).
    pub(crate) async fn flush(&mut self, within: Duration) -> Result<(), ZmtpError> {
        self.out.append(&mut self.parser.pending);
        let mut at = 0;
        let result = loop {
            if at == self.out.len() {
                break Ok(());
            }
            match tokio::time::timeout(within, self.write.write(&self.out[at..])).await {
                Ok(Ok(0) | Err(_)) => break Err(ZmtpError::Closed),
                Ok(Ok(n)) => at += n,
                Err(_) => break Err(ZmtpError::WriteTimeout),
            }
        };
        self.out.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            put_frame_header(&mut out, i + 1 < frames.len(), f.len());
            out.extend_from_slice(f);
        }
        out
    }

    fn limits(bytes: usize, frames: usize) -> Limits {
        Limits {
            max_message_bytes: bytes,
            max_frames: frames,
        }
    }

    /// Feeds `wire` to a parser in the given pieces; returns the messages, the oversize
    /// count and what is left buffered.
    fn feed(limits: Limits, pieces: &[&[u8]]) -> (Vec<Frames>, usize, Vec<u8>, Vec<u8>) {
        let mut p = Parser::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut oversize = 0;
        for piece in pieces {
            buf.extend_from_slice(piece);
            oversize += p
                .parse(&mut buf, &mut out, usize::MAX)
                .expect("valid ZMTP")
                .oversize;
        }
        (out, oversize, buf.to_vec(), p.pending)
    }

    fn frames(parts: &[&[u8]]) -> Frames {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    proptest::proptest! {
        /// Hostile bytes, cut anywhere: the parser never panics, and what it holds between
        /// reads never exceeds one frame header plus the largest frame or command the limits
        /// let it buffer (oversize frames are skipped as they arrive, never buffered).
        #[test]
        fn any_bytes_in_any_pieces_stay_bounded(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(0usize..4096, 0..8),
            max_bytes in 1usize..600,
            max_frames in 1usize..5,
        ) {
            let mut p = Parser::new(limits(max_bytes, max_frames));
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut cuts = cuts;
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut at = 0;
            for cut in cuts {
                let cut = cut.min(data.len());
                if cut < at {
                    continue;
                }
                buf.extend_from_slice(&data[at..cut]);
                at = cut;
                if p.parse(&mut buf, &mut out, usize::MAX).is_err() {
                    return Ok(());
                }
                let bound = 9 + max_bytes.max(MAX_COMMAND);
                proptest::prop_assert!(buf.len() <= bound, "{} buffered", buf.len());
            }
            for m in &out {
                proptest::prop_assert!(m.len() <= max_frames);
                proptest::prop_assert!(m.iter().map(Bytes::len).sum::<usize>() <= max_bytes);
            }
        }
    }

    #[test]
    fn greeting_layout_and_check() {
        let g = greeting(false);
        assert_eq!((g[0], g[9], g[10], g[11], g[32]), (0xff, 0x7f, 3, 0, 0));
        assert_eq!(&g[12..16], b"NULL");
        assert!(check_greeting(&g).is_ok());
        assert_eq!(greeting(true)[32], 1);
        let mut v31 = g;
        v31[11] = 1;
        v31[8] = 1;
        assert!(check_greeting(&v31).is_ok());
        let mut old = g;
        old[10] = 2;
        assert!(check_greeting(&old).is_err());
        let mut plain = g;
        plain[12..17].copy_from_slice(b"PLAIN");
        assert!(check_greeting(&plain).is_err());
        let mut nullx = g;
        nullx[16] = b'X';
        assert!(check_greeting(&nullx).is_err());
        assert!(check_greeting(&[b'G'; 64]).is_err());
    }

    #[test]
    fn ready_of_a_publisher() {
        assert!(check_ready(&ready(b"PUB", &[])[2..], SUB).is_ok());
        assert!(check_ready(&ready(b"XPUB", &[])[2..], SUB).is_ok());
        for bad in [&b"ROUTER"[..], b"SUB", b"DEALER", b""] {
            assert!(check_ready(&ready(bad, &[])[2..], SUB).is_err(), "{bad:?}");
        }
        assert!(check_ready(b"\x04PING\x00\x00", SUB).is_err());
        let mut truncated = ready(b"PUB", &[])[2..].to_vec();
        truncated.pop();
        assert!(check_ready(&truncated, SUB).is_err());
    }

    #[test]
    fn ready_with_properties_and_their_reading() {
        let r = ready(
            b"SUB",
            &[(ORIGIN_PROPERTY, b"pbx-a"), (b"X-Odd", b"\x00\"\xff")],
        );
        let body = r[2..].strip_prefix(b"\x05READY").expect("READY");
        let props: Vec<_> = properties(body).collect();
        assert_eq!(
            props,
            vec![
                Ok((&b"Socket-Type"[..], &b"SUB"[..])),
                Ok((ORIGIN_PROPERTY, &b"pbx-a"[..])),
                Ok((&b"X-Odd"[..], &b"\x00\"\xff"[..])),
            ]
        );
        // A publisher's READY with an extra property still passes.
        assert!(check_ready(&ready(b"PUB", &[(b"X-Any", b"v")])[2..], SUB).is_ok());
        assert_eq!(properties(b"").count(), 0);
        // Malformed: one error after the good properties, then nothing.
        let mut cut = body.to_vec();
        cut.pop();
        let props: Vec<_> = properties(&cut).collect();
        assert_eq!(props.len(), 3);
        assert_eq!(props[2], Err(Malformed));
        let mut huge = vec![3, b'X', b'-', b'a'];
        huge.extend(u32::MAX.to_be_bytes());
        huge.extend(b"short");
        assert_eq!(properties(&huge).collect::<Vec<_>>(), vec![Err(Malformed)]);
        assert_eq!(
            properties(&[9, b'X']).collect::<Vec<_>>(),
            vec![Err(Malformed)]
        );
    }

    proptest::proptest! {
        /// Any bytes as READY properties: reading them never panics, yields at most one
        /// property per 5 bytes (each takes at least that), and ends at the first error.
        #[test]
        fn any_properties_read_without_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let props: Vec<_> = properties(&body).collect();
            proptest::prop_assert!(props.len() <= body.len() / 5 + 1);
            if let Some(i) = props.iter().position(Result::is_err) {
                proptest::prop_assert_eq!(i, props.len() - 1);
            }
        }
    }

    #[test]
    fn ready_of_a_router() {
        assert!(check_ready(&ready(b"ROUTER", &[])[2..], DEALER).is_ok());
        assert!(check_ready(&ready(b"DEALER", &[])[2..], DEALER).is_ok());
        for bad in [&b"PUB"[..], b"XPUB", b"SUB", b"REQ", b"REP", b""] {
            match check_ready(&ready(bad, &[])[2..], DEALER) {
                Err(ZmtpError::Ready(why)) => assert!(why.contains("DEALER"), "{why}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn at_most_max_messages_per_parse_the_rest_stays_buffered() {
        let mut wire = Vec::new();
        for i in 0..5u8 {
            wire.extend(message(&[b"r", &[i]]));
        }
        let mut p = Parser::new(Limits::default());
        let mut buf = BytesMut::from(&wire[..]);
        let mut out = Vec::new();
        for want in [&[0u8, 1][..], &[2, 3], &[4]] {
            p.parse(&mut buf, &mut out, 2).expect("valid");
            let got: Vec<u8> = out.drain(..).map(|m| m[1][0]).collect();
            assert_eq!(got, want);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn subscription_is_a_zmtp_3_0_message() {
        assert_eq!(subscription(b""), vec![0x00, 1, 1]);
        assert_eq!(subscription(b"ab"), vec![0x00, 3, 1, b'a', b'b']);
        let long = vec![b'p'; 300];
        let s = subscription(&long);
        assert_eq!(s[0], 0x02);
        assert_eq!(&s[1..9], &301u64.to_be_bytes());
        assert_eq!(s[9], 1);
    }

    #[test]
    fn many_messages_in_one_read() {
        let mut wire = message(&[b"t1", b"a"]);
        wire.extend(message(&[b"t2"]));
        let big = vec![9u8; 300];
        wire.extend(message(&[b"t3", &big, b""]));
        let (out, oversize, left, _) = feed(Limits::default(), &[&wire]);
        assert_eq!(oversize, 0);
        assert!(left.is_empty());
        assert_eq!(
            out,
            vec![
                frames(&[b"t1", b"a"]),
                frames(&[b"t2"]),
                frames(&[b"t3", &big, b""])
            ]
        );
    }

    #[test]
    fn reassembly_across_reads_split_at_every_position() {
        let big = vec![7u8; 260];
        let mut wire = message(&[b"topic", b"x", &big]);
        wire.extend(command(b"PING", b"\x00\x10ctx"));
        wire.extend(message(&[b"second"]));
        // An oversize message between two good ones is skipped wherever it is cut.
        wire.extend(message(&[b"t", &[0u8; 600]]));
        wire.extend(message(&[b"third", b""]));
        let want = vec![
            frames(&[b"topic", b"x", &big]),
            frames(&[b"second"]),
            frames(&[b"third", b""]),
        ];
        let l = limits(512, 4);
        for i in 0..=wire.len() {
            let (out, oversize, left, pending) = feed(l, &[&wire[..i], &wire[i..]]);
            assert_eq!(out, want, "split at {i}");
            assert_eq!(oversize, 1, "split at {i}");
            assert!(left.is_empty(), "split at {i}");
            assert_eq!(pending, command(b"PONG", b"ctx"));
        }
        // Three pieces, the second cut every 37 bytes.
        for i in (0..wire.len()).step_by(37) {
            for j in (i..=wire.len()).step_by(5) {
                let (out, oversize, left, _) = feed(l, &[&wire[..i], &wire[i..j], &wire[j..]]);
                assert_eq!(
                    (out, oversize, left.len()),
                    (want.clone(), 1, 0),
                    "split at {i}, {j}"
                );
            }
        }
        // Byte by byte.
        let pieces: Vec<&[u8]> = wire.chunks(1).collect();
        let (out, oversize, left, _) = feed(l, &pieces);
        assert_eq!((out, oversize, left.len()), (want, 1, 0));
    }

    #[test]
    fn limits_are_checked_on_the_header() {
        // A 1 TiB frame announced: skipped without buffering, one oversize message once
        // its last frame is past; the header alone counts nothing yet.
        let mut p = Parser::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        buf.extend_from_slice(&[0x02]);
        buf.extend_from_slice(&(1u64 << 40).to_be_bytes());
        buf.extend_from_slice(&[0u8; 1000]);
        let parsed = p.parse(&mut buf, &mut out, usize::MAX).expect("valid");
        assert_eq!(parsed.oversize, 0);
        assert!(buf.is_empty() && out.is_empty());
        // Too many frames: the whole message is dropped, the next one delivered.
        let mut wire = message(&[b"a", b"b", b"c"]);
        wire.extend(message(&[b"ok", b"2"]));
        let (out, oversize, _, _) = feed(limits(1024, 2), &[&wire]);
        assert_eq!((out, oversize), (vec![frames(&[b"ok", b"2"])], 1));
        // Too many bytes over several frames.
        let mut wire = message(&[b"abcd", b"efgh", b"i"]);
        wire.extend(message(&[b"12345678"]));
        let (out, oversize, _, _) = feed(limits(8, 4), &[&wire]);
        assert_eq!((out, oversize), (vec![frames(&[b"12345678"])], 1));
    }

    #[test]
    fn garbage_and_errors_end_the_connection() {
        let mut p = Parser::new(Limits::default());
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            p.parse(&mut buf, &mut out, usize::MAX),
            Err(ZmtpError::Protocol(_))
        ));
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x06]);
        buf.extend_from_slice(&(1u64 << 20).to_be_bytes());
        assert!(matches!(
            Parser::new(Limits::default()).parse(&mut buf, &mut out, usize::MAX),
            Err(ZmtpError::Protocol(_))
        ));
        let mut buf = BytesMut::from(&command(b"ERROR", b"\x04gone")[..]);
        match Parser::new(Limits::default()).parse(&mut buf, &mut out, usize::MAX) {
            Err(ZmtpError::PeerError(reason)) => assert_eq!(reason, "gone"),
            other => panic!("{other:?}"),
        }
        // Unknown commands are ignored.
        let mut buf = BytesMut::from(&command(b"SUBSCRIBE", b"x")[..]);
        assert!(
            Parser::new(Limits::default())
                .parse(&mut buf, &mut out, usize::MAX)
                .is_ok()
        );
        assert!(out.is_empty());
    }
}
