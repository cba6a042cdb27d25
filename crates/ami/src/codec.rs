//! [`AmiCodec`]: sans-IO AMI framing.
//!
//! Input is `Key: Value` lines ended by CRLF (a bare LF is accepted too), a message ended by an
//! empty line. A client-side codec first yields the one-line login banner
//! (`Asterisk Call Manager/13.0.0`). `Response: Follows` output of older Asterisk versions, ended
//! by `--END COMMAND--`, is folded into `Output` headers, as newer versions send it.
//!
//! Every length read from the network is bounded by [`Limits`]; exceeding one is a
//! [`CodecError`] and the connection should be dropped (the decoder never buffers more than
//! `max_message` bytes of one message, nor more than `max_line` bytes without a line end).

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::message::Message;

/// The marker that ends `Response: Follows` command output on older Asterisk versions.
const END_COMMAND: &str = "--END COMMAND--";

/// Hard limits on what one peer may make the decoder hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, in bytes, without its line end.
    pub max_line: usize,
    /// Most headers in one message.
    pub max_headers: usize,
    /// Largest message, in bytes, counting line ends.
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: 16 * 1024,
            max_headers: 16 * 1024,
            max_message: 4 * 1024 * 1024,
        }
    }
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The greeting line a server sends first, e.g. `Asterisk Call Manager/13.0.0`.
    Banner(String),
    /// One complete message.
    Message(Message),
}

/// Errors of [`AmiCodec`].
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A line grew past [`Limits::max_line`] before its line end arrived.
    #[error("AMI line longer than {limit} bytes")]
    LineTooLong {
        /// The limit in force.
        limit: usize,
    },
    /// A message had more than [`Limits::max_headers`] headers.
    #[error("AMI message with more than {limit} headers")]
    TooManyHeaders {
        /// The limit in force.
        limit: usize,
    },
    /// A message grew past [`Limits::max_message`] bytes.
    #[error("AMI message larger than {limit} bytes")]
    MessageTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("AMI connection closed in the middle of a message")]
    Truncated,
    /// A header to encode holds a CR or LF (which would inject headers), or its key is empty or
    /// holds a colon.
    #[error("AMI header {key:?} cannot be encoded: {reason}")]
    InvalidHeader {
        /// The offending header's key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The underlying transport failed.
    #[error("AMI I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Sans-IO AMI framing, see the module docs.
#[derive(Debug)]
pub struct AmiCodec {
    limits: Limits,
    expect_banner: bool,
    current: Message,
    current_size: usize,
    /// Inside `Response: Follows` raw output, waiting for `--END COMMAND--`.
    follows: bool,
    /// Bytes of the buffer already searched for a line end.
    scanned: usize,
    /// Scratch of [`AmiCodec::whole_message`]: each header line's start and length, kept to
    /// reuse its allocation.
    lines: Vec<(usize, usize)>,
}

impl AmiCodec {
    /// A codec for the client side: the first line received is the banner.
    pub fn client() -> Self {
        Self::with_limits(true, Limits::default())
    }

    /// A codec for the server side: every line is part of a message.
    pub fn server() -> Self {
        Self::with_limits(false, Limits::default())
    }

    /// A codec with explicit limits; `expect_banner` as for [`AmiCodec::client`].
    pub fn with_limits(expect_banner: bool, limits: Limits) -> Self {
        Self {
            limits,
            expect_banner,
            current: Message::new(),
            current_size: 0,
            follows: false,
            scanned: 0,
            lines: Vec::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Finds the next line in `buf`: `(length without its line end, length with it)`, or
    /// `None` if no line end yet. Counts the line towards the message size.
    fn next_line(&mut self, buf: &BytesMut) -> Result<Option<(usize, usize)>, CodecError> {
        // The caller may hand a different or shortened buffer: never index past its end.
        self.scanned = self.scanned.min(buf.len());
        let Some(pos) = buf[self.scanned..].iter().position(|&b| b == b'\n') else {
            self.scanned = buf.len();
            if buf.len() > self.limits.max_line + 1 {
                return Err(CodecError::LineTooLong {
                    limit: self.limits.max_line,
                });
            }
            return Ok(None);
        };
        let end = self.scanned + pos;
        self.scanned = 0;
        let mut line_len = end;
        if line_len > 0 && buf[line_len - 1] == b'\r' {
            line_len -= 1;
        }
        if line_len > self.limits.max_line {
            return Err(CodecError::LineTooLong {
                limit: self.limits.max_line,
            });
        }
        self.current_size += end + 1;
        Ok(Some((line_len, end + 1)))
    }

    /// Applies one line (without its line end); a frame when it completes one.
    fn handle_line(&mut self, line: &[u8]) -> Result<Option<Frame>, CodecError> {
        if self.expect_banner {
            self.expect_banner = false;
            self.current_size = 0;
            return Ok(Some(Frame::Banner(
                String::from_utf8_lossy(line).into_owned(),
            )));
        }
        if self.current_size > self.limits.max_message {
            return Err(CodecError::MessageTooLarge {
                limit: self.limits.max_message,
            });
        }
        if self.follows {
            if let Some(rest) = line.strip_suffix(END_COMMAND.as_bytes()) {
                if !rest.is_empty() {
                    self.push_header("Output", &String::from_utf8_lossy(rest))?;
                }
                self.follows = false;
                return Ok(None);
            }
            // Headers that precede the raw output keep their names; the rest is output.
            let (k, v) = split_header(line);
            let before_output = self.current.get("Output").is_none();
            if before_output
                && (k.eq_ignore_ascii_case("Privilege")
                    || k.eq_ignore_ascii_case("ActionID")
                    || k.eq_ignore_ascii_case("Message"))
            {
                self.push_header(&k, &v)?;
            } else {
                self.push_header("Output", &String::from_utf8_lossy(line))?;
            }
            return Ok(None);
        }
        if line.is_empty() {
            if self.current.is_empty() {
                self.current_size = 0;
                return Ok(None);
            }
            return Ok(Some(Frame::Message(self.take_message())));
        }
        let (k, v) = split_header(line);
        if k.eq_ignore_ascii_case("Response") && v.eq_ignore_ascii_case("Follows") {
            self.follows = true;
        }
        self.push_header(&k, &v)?;
        Ok(None)
    }

    fn push_header(&mut self, key: &str, value: &str) -> Result<(), CodecError> {
        if self.current.len() >= self.limits.max_headers {
            return Err(CodecError::TooManyHeaders {
                limit: self.limits.max_headers,
            });
        }
        self.current.push(key, value);
        Ok(())
    }

    /// True when the next byte decoded starts a message: no banner expected, no message
    /// under way (nor an error left in the middle of one).
    pub(crate) fn between_messages(&self) -> bool {
        let under_way = !self.current.is_empty() || self.current_size != 0 || self.scanned != 0;
        !(self.expect_banner || self.follows || under_way)
    }

    /// The message at the front of `buf`, read in one go when it is there whole (its empty
    /// line too) and plain: valid UTF-8 (checked once for the whole message), within every
    /// limit and not `Response: Follows`. Then the message is taken off `buf` and built with
    /// one allocation for its text and one for its headers. `None` (and `buf` untouched)
    /// otherwise, or when a message is already under way: the line by line path
    /// ([`AmiCodec::handle_line`]) then reads it, refuses it or waits for the rest, and is the
    /// reference this one is tested against (the same messages, errors and buffer).
    fn whole_message(&mut self, buf: &mut BytesMut) -> Option<Message> {
        if !self.between_messages() {
            return None;
        }
        let limits = self.limits;
        self.lines.clear();
        let mut start = 0;
        let mut line_ends = memchr::memchr_iter(b'\n', buf);
        let end = loop {
            let nl = line_ends.next()?;
            let mut len = nl - start;
            if len > 0 && buf[nl - 1] == b'\r' {
                len -= 1;
            }
            if len == 0 {
                break nl + 1;
            }
            if len > limits.max_line || self.lines.len() == limits.max_headers {
                return None;
            }
            self.lines.push((start, len));
            start = nl + 1;
            if start > limits.max_message {
                return None;
            }
        };
        if self.lines.is_empty() || end > limits.max_message {
            return None;
        }
        let text = std::str::from_utf8(&buf[..end]).ok()?;
        let mut msg = Message::from_text(text.to_owned(), self.lines.len());
        for &(start, len) in &self.lines {
            // Line starts and ends are next to ASCII bytes: char boundaries.
            let (k, v) = header_ranges(&text[start..start + len], start);
            if text[k.clone()].eq_ignore_ascii_case("Response")
                && text[v.clone()].eq_ignore_ascii_case("Follows")
            {
                return None;
            }
            msg.push_range(k, v);
        }
        buf.advance(end);
        Some(msg)
    }

    /// [`Decoder::decode`]; `whole` tries [`AmiCodec::whole_message`] at each message start
    /// (false only to test it against the line by line path).
    fn decode_from(
        &mut self,
        buf: &mut BytesMut,
        whole: bool,
    ) -> Result<Option<Frame>, CodecError> {
        loop {
            if whole && let Some(m) = self.whole_message(buf) {
                return Ok(Some(Frame::Message(m)));
            }
            let Some((line_len, consumed)) = self.next_line(buf)? else {
                return Ok(None);
            };
            let frame = self.handle_line(&buf[..line_len]);
            buf.advance(consumed);
            if let Some(frame) = frame? {
                return Ok(Some(frame));
            }
        }
    }

    /// [`Decoder::decode_eof`], `whole` as for [`AmiCodec::decode_from`].
    fn decode_eof_from(
        &mut self,
        buf: &mut BytesMut,
        whole: bool,
    ) -> Result<Option<Frame>, CodecError> {
        if let Some(frame) = self.decode_from(buf, whole)? {
            return Ok(Some(frame));
        }
        if buf.is_empty() && self.current.is_empty() {
            Ok(None)
        } else {
            buf.clear();
            self.scanned = 0;
            self.take_message();
            Err(CodecError::Truncated)
        }
    }

    fn take_message(&mut self) -> Message {
        self.current_size = 0;
        self.follows = false;
        // The next message is likely of the same shape (events of one kind come in runs):
        // room for as much text and as many headers, so it grows without reallocating.
        let next = Message::with_capacity(self.current.text_len(), self.current.len());
        std::mem::replace(&mut self.current, next)
    }
}

/// [`split_header`] of a line already known to be UTF-8, which starts at `at` of its message:
/// where its key (trimmed) and its value (without the one space after the colon) are.
fn header_ranges(line: &str, at: usize) -> (Range<usize>, Range<usize>) {
    // A key is a few bytes: a plain loop finds its end sooner than a vectorised search.
    let (key, value_start) = match line.bytes().position(|b| b == b':') {
        // The colon is ASCII: both sides are char boundaries.
        Some(i) => {
            let v = i + 1 + usize::from(line[i + 1..].starts_with(' '));
            (&line[..i], v)
        }
        None => (line, line.len()),
    };
    (trim(key, at), at + value_start..at + line.len())
}

/// Where `s` (at `at`) is once trimmed as `str::trim` does, without looking at its characters
/// when it starts and ends with a visible ASCII character (as keys do), never white space.
fn trim(s: &str, at: usize) -> Range<usize> {
    let visible = |b: Option<&u8>| b.is_some_and(u8::is_ascii_graphic);
    if visible(s.as_bytes().first()) && visible(s.as_bytes().last()) {
        return at..at + s.len();
    }
    let start = at + s.len() - s.trim_start().len();
    start..start + s.trim().len()
}

/// Splits `Key: Value` at the first colon; one space after the colon belongs to the separator.
/// Invalid UTF-8 is replaced (U+FFFD), never an error.
fn split_header(line: &[u8]) -> (Cow<'_, str>, Cow<'_, str>) {
    let (k, v) = match line.iter().position(|&b| b == b':') {
        Some(i) => {
            let v = &line[i + 1..];
            (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, &line[line.len()..]),
    };
    let key = match String::from_utf8_lossy(k) {
        Cow::Borrowed(k) => Cow::Borrowed(k.trim()),
        Cow::Owned(k) => Cow::Owned(k.trim().to_owned()),
    };
    (key, String::from_utf8_lossy(v))
}

impl Decoder for AmiCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        self.decode_from(buf, true)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        self.decode_eof_from(buf, true)
    }
}

fn check_header(key: &str, value: &str) -> Result<(), CodecError> {
    let bad = |reason| {
        Err(CodecError::InvalidHeader {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    // Bytewise: the three are ASCII, so no byte of a longer UTF-8 character matches them.
    if key.bytes().any(|b| matches!(b, b':' | b'\r' | b'\n')) {
        return bad("key holds ':', CR or LF");
    }
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n')) {
        return bad("value holds CR or LF");
    }
    Ok(())
}

/// Appends `msg` as AMI text (`Key: Value` lines, then an empty line) to `dst`: what
/// [`AmiCodec`]'s encoder writes. A header that would break the framing (an empty key, a key
/// holding `:`, CR or LF, a value holding CR or LF) is an error, and then nothing is appended.
pub fn encode_message(msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
    encode_headers(msg.headers(), dst)
}

/// [`encode_message`] of the message holding `headers` in order, without making the message
/// (an answer written straight from its parts).
pub fn encode_headers<'a, I>(headers: I, dst: &mut BytesMut) -> Result<(), CodecError>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
    I::IntoIter: Clone,
{
    let headers = headers.into_iter();
    let mut len = 2;
    for (k, v) in headers.clone() {
        check_header(k, v)?;
        len += k.len() + v.len() + 4;
    }
    dst.reserve(len);
    for (k, v) in headers {
        dst.put_slice(k.as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(v.as_bytes());
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
    Ok(())
}

impl Encoder<&Message> for AmiCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_message(msg, dst)
    }
}

impl Encoder<Message> for AmiCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_all(codec: &mut AmiCodec, bytes: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).expect("decode") {
            out.push(f);
        }
        out
    }

    #[test]
    fn banner_then_message() {
        let mut c = AmiCodec::client();
        let frames = decode_all(
            &mut c,
            b"Asterisk Call Manager/13.0.0\r\nResponse: Success\r\nAccountCode: \r\nMessage: a: b\r\n\r\n",
        );
        assert_eq!(
            frames[0],
            Frame::Banner("Asterisk Call Manager/13.0.0".into())
        );
        let Frame::Message(m) = &frames[1] else {
            panic!("expected a message")
        };
        assert_eq!(m.get("accountcode"), Some(""));
        assert_eq!(m.get("Message"), Some("a: b"));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_refused() {
        let mut c = AmiCodec::server();
        let frames = decode_all(
            &mut c,
            b"Event: X\r\nVal\xffue: a\xfe b\r\nPlain: \xc3\xa9t\xc3\xa9\r\n\r\n",
        );
        let Frame::Message(m) = &frames[0] else {
            panic!("expected a message")
        };
        assert_eq!(m.get("Val\u{fffd}ue"), Some("a\u{fffd} b"));
        assert_eq!(m.get("Plain"), Some("\u{e9}t\u{e9}"));
    }

    /// Text pieces AMI input is made of, the awkward ones included: invalid and partial
    /// UTF-8, bare CR, colons, blank lines, `Response: Follows` and its end marker.
    const PIECES: &[&[u8]] = &[
        b"Response: Success\r\n",
        b"ActionID: hf1a2b3c4d-w17\r\n",
        b"Message: Variable Set\r\n",
        b"Event: DeviceStateChange\r\n",
        b"Device: Custom:dev\xc3\xa9\r\n",
        b"State: INUSE\r\n",
        b"Action: Setvar\r\n",
        b"Response: Follows\r\n",
        b"Privilege: Command\r\n",
        b"--END COMMAND--",
        b"\r\n",
        b"\n",
        b"\r",
        b":",
        b": ",
        b" ",
        b"\t",
        b"Value",
        b"\xff",
        b"\xc3",
        b"\xe2\x80\x83",
        b"x",
    ];

    /// What may stand inside a line.
    const IN_LINE: &[&[u8]] = &[
        b"Response",
        b"Success",
        b"Follows",
        b"ActionID",
        b"hf1a2b3c4d-w17",
        b"Event",
        b"DeviceStateChange",
        b"Custom:dev",
        b"\xc3\xa9",
        b"\xe2\x80\x83",
        b"\xff",
        b":",
        b": ",
        b" ",
        b"\t",
        b"\r",
        b"x",
    ];

    /// Input as pieces anywhere, or as lines (each made of pieces, some empty) with either
    /// line end.
    fn pieces() -> impl Strategy<Value = Vec<u8>> {
        let soup = proptest::collection::vec(
            prop_oneof![
                3 => proptest::sample::select(PIECES).prop_map(<[u8]>::to_vec),
                1 => proptest::collection::vec(any::<u8>(), 0..4),
            ],
            0..60,
        )
        .prop_map(|p| p.concat());
        let line = (
            proptest::collection::vec(proptest::sample::select(IN_LINE), 0..5),
            any::<bool>(),
        )
            .prop_map(|(p, lf)| {
                [
                    p.concat(),
                    if lf { b"\n".to_vec() } else { b"\r\n".to_vec() },
                ]
                .concat()
            });
        let lines = proptest::collection::vec(line, 0..30).prop_map(|l| l.concat());
        prop_oneof![soup, lines]
    }

    fn limits() -> impl Strategy<Value = Limits> {
        prop_oneof![
            Just(Limits::default()),
            (1usize..48, 1usize..6, 1usize..160).prop_map(
                |(max_line, max_headers, max_message)| {
                    Limits {
                        max_line,
                        max_headers,
                        max_message,
                    }
                }
            ),
        ]
    }

    /// One step of decoding, comparable across codecs (errors by their text).
    fn step(r: Result<Option<Frame>, CodecError>) -> Result<Option<Frame>, String> {
        r.map_err(|e| e.to_string())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// [`AmiCodec::whole_message`] changes nothing but speed: fed the same reads, the
        /// decoder gives the same frames and errors, and leaves the same bytes buffered, as
        /// the line by line path alone.
        #[test]
        fn whole_message_path_matches_line_by_line(
            input in pieces(),
            banner in any::<bool>(),
            limits in limits(),
            chunk in 1usize..200,
        ) {
            let mut fast = AmiCodec::with_limits(banner, limits);
            let mut reference = AmiCodec::with_limits(banner, limits);
            let (mut fb, mut rb) = (BytesMut::new(), BytesMut::new());
            'feed: for piece in input.chunks(chunk) {
                fb.extend_from_slice(piece);
                rb.extend_from_slice(piece);
                loop {
                    let f = step(fast.decode_from(&mut fb, true));
                    let r = step(reference.decode_from(&mut rb, false));
                    prop_assert_eq!(&f, &r);
                    prop_assert_eq!(&fb[..], &rb[..]);
                    match f {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            loop {
                let f = step(fast.decode_eof_from(&mut fb, true));
                let r = step(reference.decode_eof_from(&mut rb, false));
                prop_assert_eq!(&f, &r);
                prop_assert_eq!(&fb[..], &rb[..]);
                if !matches!(f, Ok(Some(_))) {
                    break;
                }
            }
        }
    }

    #[test]
    fn bare_lf_is_accepted() {
        let mut c = AmiCodec::server();
        let frames = decode_all(&mut c, b"Action: Ping\nActionID: 1\n\n");
        assert_eq!(frames.len(), 1);
    }

    #[test]
    fn response_follows_is_folded_into_output() {
        let mut c = AmiCodec::server();
        let frames = decode_all(
            &mut c,
            b"Response: Follows\r\nPrivilege: Command\r\nActionID: 7\r\nline one\nkey: value\n\n--END COMMAND--\r\n\r\n",
        );
        let Frame::Message(m) = &frames[0] else {
            panic!("expected a message")
        };
        assert_eq!(m.action_id(), Some("7"));
        assert_eq!(
            m.get_all("Output").collect::<Vec<_>>(),
            vec!["line one", "key: value", ""]
        );
    }

    #[test]
    fn long_line_is_refused_without_buffering() {
        let mut c = AmiCodec::with_limits(
            false,
            Limits {
                max_line: 8,
                ..Limits::default()
            },
        );
        let mut buf = BytesMut::from(&b"Action: 0123456789"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::LineTooLong { limit: 8 })
        ));
    }

    #[test]
    fn encoder_refuses_injection() {
        let mut c = AmiCodec::client();
        let mut dst = BytesMut::new();
        let m = Message::action("Setvar").with("Value", "x\r\nAction: Originate");
        assert!(c.encode(&m, &mut dst).is_err());
        assert!(dst.is_empty());
        for (k, v, ok) in [
            ("", "x", false),
            ("a:b", "x", false),
            ("a\rb", "x", false),
            ("a\nb", "x", false),
            ("a", "x\ry", false),
            ("a", "x\ny", false),
            ("a", "", true),
            ("é", "ü: v", true),
        ] {
            let m = Message::new().with("Event", "X").with(k, v);
            let mut dst = BytesMut::from(&b"before"[..]);
            assert_eq!(encode_message(&m, &mut dst).is_ok(), ok, "{k:?}: {v:?}");
            if ok {
                assert_eq!(
                    &dst[..],
                    format!("beforeEvent: X\r\n{k}: {v}\r\n\r\n").as_bytes()
                );
            } else {
                assert_eq!(&dst[..], b"before", "nothing appended when refused");
            }
        }
    }
}
