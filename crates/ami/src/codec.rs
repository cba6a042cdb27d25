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

    fn take_message(&mut self) -> Message {
        self.current_size = 0;
        self.follows = false;
        // The next message is likely of the same shape (events of one kind come in runs):
        // room for as much text and as many headers, so it grows without reallocating.
        let next = Message::with_capacity(self.current.text_len(), self.current.len());
        std::mem::replace(&mut self.current, next)
    }
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
        loop {
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

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if let Some(frame) = self.decode(buf)? {
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
    for (k, v) in msg.headers() {
        check_header(k, v)?;
    }
    dst.reserve(msg.text_len() + 4 * msg.len() + 2);
    for (k, v) in msg.headers() {
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
