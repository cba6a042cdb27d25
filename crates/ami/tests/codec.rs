//! Codec tests over the real Asterisk captures in `../shared/fixtures/asterisk/`, plus limits,
//! split reads and property tests.

use std::path::PathBuf;

use bytes::BytesMut;
use hintfed_ami::{AmiCodec, CodecError, Frame, Limits, Message};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/asterisk")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Splits a transcript into (SEND bytes, RECV bytes), each the concatenation of its chunks.
fn transcript(name: &str) -> (Vec<u8>, Vec<u8>) {
    let bytes = fixture(name);
    let (mut send, mut recv) = (Vec::new(), Vec::new());
    let mut side: Option<bool> = None; // Some(true) = SEND
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        match line {
            b">>> SEND\n" => side = Some(true),
            b"<<< RECV\n" => side = Some(false),
            _ => match side {
                Some(true) => send.extend_from_slice(line),
                Some(false) => recv.extend_from_slice(line),
                None => panic!("{name}: bytes before the first marker"),
            },
        }
    }
    (send, recv)
}

/// Decodes `bytes` fed as one buffer, then calls `decode_eof`, which must find nothing left.
fn decode_whole(mut codec: AmiCodec, bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = codec.decode(&mut buf).expect("decode") {
        out.push(f);
    }
    assert!(codec.decode_eof(&mut buf).expect("clean eof").is_none());
    out
}

/// Decodes `bytes` fed in the given chunks, as a `FramedRead` would (append, decode until None).
fn decode_chunks<'a>(
    mut codec: AmiCodec,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(f) = codec.decode(&mut buf).expect("decode") {
            out.push(f);
        }
    }
    while let Some(f) = codec.decode_eof(&mut buf).expect("clean eof") {
        out.push(f);
    }
    out
}

/// Same frames fed whole, at every single split offset and one byte at a time.
fn assert_split_invariant(make: fn() -> AmiCodec, bytes: &[u8]) -> Vec<Frame> {
    let whole = decode_whole(make(), bytes);
    for at in 0..=bytes.len() {
        let (a, b) = bytes.split_at(at);
        assert_eq!(decode_chunks(make(), [a, b]), whole, "split at {at}");
    }
    assert_eq!(
        decode_chunks(make(), bytes.chunks(1)),
        whole,
        "byte by byte"
    );
    assert_eq!(
        decode_chunks(make(), bytes.chunks(7)),
        whole,
        "7-byte chunks"
    );
    whole
}

/// Every byte offset of a large capture, in linear time: the decoder holds no state across a
/// message boundary, so a split inside message `i` is checked on the window of messages `i` and
/// `i + 1` (the banner with the first message) decoded by a fresh codec, against the frames the
/// whole-capture decode produced for that window.
fn assert_every_offset_windowed(bytes: &[u8], whole: &[Frame]) {
    let banner_end = bytes.iter().position(|&b| b == b'\n').expect("banner") + 1;
    let mut bounds = vec![0, banner_end];
    bounds.extend(
        bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"\r\n\r\n")
            .map(|(i, _)| i + 4),
    );
    assert_eq!(
        *bounds.last().expect("bounds"),
        bytes.len(),
        "capture ends a message"
    );
    assert_eq!(bounds.len() - 1, whole.len(), "one frame per window");
    for i in 0..bounds.len() - 1 {
        let (start, end) = (bounds[i], bounds[(i + 2).min(bounds.len() - 1)]);
        let window = &bytes[start..end];
        let expected = &whole[i..(i + 2).min(whole.len())];
        let make = if i == 0 {
            AmiCodec::client
        } else {
            AmiCodec::server
        };
        for at in 0..=(bounds[i + 1] - start) {
            let (a, b) = window.split_at(at);
            assert_eq!(
                decode_chunks(make(), [a, b]),
                expected,
                "split at {}",
                start + at
            );
        }
    }
}

fn messages(frames: &[Frame]) -> Vec<&Message> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Message(m) => Some(m),
            Frame::Banner(_) => None,
        })
        .collect()
}

fn count_events(msgs: &[&Message], name: &str) -> usize {
    msgs.iter().filter(|m| m.is_event(name)).count()
}

fn count_responses(msgs: &[&Message], kind: &str) -> usize {
    // `OriginateResponse` events carry a `Response:` header too: an event is never a response.
    msgs.iter()
        .filter(|m| m.event().is_none() && m.response() == Some(kind))
        .count()
}

fn banner(frames: &[Frame]) -> &str {
    match &frames[0] {
        Frame::Banner(b) => b,
        other => panic!("first frame is not a banner: {other:?}"),
    }
}

#[test]
fn session_recv_raw() {
    let bytes = fixture("session.recv.raw");
    let frames = decode_whole(AmiCodec::client(), &bytes);
    assert_every_offset_windowed(&bytes, &frames);
    assert_eq!(decode_chunks(AmiCodec::client(), bytes.chunks(1)), frames);
    for at in (0..=bytes.len()).step_by(61) {
        let (a, b) = bytes.split_at(at);
        assert_eq!(decode_chunks(AmiCodec::client(), [a, b]), frames, "at {at}");
    }
    assert_eq!(banner(&frames), "Asterisk Call Manager/13.0.0");
    assert!(frames[1..].iter().all(|f| matches!(f, Frame::Message(_))));
    let msgs = messages(&frames);
    assert_eq!(msgs.len(), 68);
    assert_eq!(count_responses(&msgs, "Success"), 19);
    assert_eq!(count_responses(&msgs, "Error"), 3);
    assert_eq!(count_responses(&msgs, "Goodbye"), 1);
    assert_eq!(count_events(&msgs, "DeviceStateChange"), 8);
    assert_eq!(count_events(&msgs, "ExtensionStatus"), 10);
    assert_eq!(count_events(&msgs, "PresenceStateChange"), 3);
    assert_eq!(count_events(&msgs, "PresenceStatus"), 2);
    assert_eq!(count_events(&msgs, "FullyBooted"), 1);
    let originate = msgs
        .iter()
        .find(|m| m.is_event("OriginateResponse"))
        .expect("OriginateResponse");
    assert_eq!(originate.action_id(), Some("or1"));
    assert_eq!(originate.response(), Some("Success"));

    // The MD5 challenge, the login and FullyBooted.
    assert_eq!(msgs[0].action_id(), Some("ch1"));
    assert_eq!(msgs[0].get("Challenge"), Some("105743880"));
    assert_eq!(msgs[1].get("message"), Some("Authentication accepted"));
    assert_eq!(msgs[2].event(), Some("FullyBooted"));
    assert_eq!(msgs[2].get("Status"), Some("Fully Booted"));

    // Ping answer split across three reads in the capture.
    let ping = msgs
        .iter()
        .find(|m| m.action_id() == Some("p1"))
        .expect("ping");
    assert_eq!(
        ping.headers().map(|(k, _)| k).collect::<Vec<_>>(),
        ["Response", "ActionID", "Ping", "Timestamp"]
    );
    assert_eq!(ping.get("Ping"), Some("Pong"));

    // Values with commas and ": " survive; empty values are kept.
    let dnd = msgs
        .iter()
        .find(|m| m.is_event("PresenceStateChange") && m.get("Status") == Some("dnd"))
        .expect("dnd presence");
    assert_eq!(dnd.get("Subtype"), Some("meeting, room 4"));
    assert_eq!(dnd.get("Message"), Some("in a meeting, sorry"));
    let newchannel = msgs.iter().find(|m| m.is_event("Newchannel")).expect("nc");
    assert_eq!(newchannel.get("AccountCode"), Some(""));

    // Lists.
    let dsl = msgs
        .iter()
        .find(|m| m.is_event("DeviceStateListComplete"))
        .expect("dsl complete");
    assert_eq!(dsl.get("ListItems"), Some("2"));
    assert_eq!(dsl.get("EventList"), Some("Complete"));
    let items: Vec<_> = msgs
        .iter()
        .filter(|m| m.action_id() == Some("el1") && m.is_event("ExtensionStatus"))
        .collect();
    assert_eq!(items.len(), 4);

    // Command output: Output lines kept in order, duplicates and an empty one included.
    let cmd = msgs
        .iter()
        .find(|m| m.action_id() == Some("cmd1"))
        .expect("cmd");
    let output: Vec<_> = cmd.get_all("Output").collect();
    assert_eq!(output.len(), 8);
    assert_eq!(output[0], "");
    assert_eq!(output[7], "- 4 hints registered");
    assert!(output[2].starts_with("100@test                      : Local/100@phones"));

    let unknown = msgs
        .iter()
        .find(|m| m.action_id() == Some("x1"))
        .expect("x1");
    assert_eq!(
        unknown.get("Message"),
        Some(
            "Invalid/unknown command: NoSuchAction. Use Action: ListCommands to show available commands."
        )
    );
    let last = msgs.last().expect("last");
    assert_eq!(last.response(), Some("Goodbye"));
    assert_eq!(last.get("Message"), Some("Thanks for all the fish."));
}

#[test]
fn devicestatelist_500_recv_raw() {
    let bytes = fixture("devicestatelist-500.recv.raw");
    let frames = decode_whole(AmiCodec::client(), &bytes);
    assert_every_offset_windowed(&bytes, &frames);
    // Whole-capture splits at a spread of offsets, plus small reads.
    for at in (0..=bytes.len()).step_by(1009).chain([bytes.len() - 1]) {
        let (a, b) = bytes.split_at(at);
        assert_eq!(decode_chunks(AmiCodec::client(), [a, b]), frames, "at {at}");
    }
    assert_eq!(decode_chunks(AmiCodec::client(), bytes.chunks(3)), frames);
    assert_eq!(banner(&frames), "Asterisk Call Manager/13.0.0");
    let msgs = messages(&frames);
    assert_eq!(msgs.len(), 568);
    let list: Vec<_> = msgs
        .iter()
        .filter(|m| m.action_id() == Some("dl1"))
        .collect();
    assert_eq!(list[0].get("EventList"), Some("start"));
    let items = list
        .iter()
        .filter(|m| m.is_event("DeviceStateChange"))
        .count();
    assert_eq!(items, 502);
    let complete = list.last().expect("complete");
    assert!(complete.is_event("DeviceStateListComplete"));
    assert_eq!(complete.get("ListItems"), Some("502"));
    assert_eq!(list.len(), 504);
}

#[test]
fn bad_login_recv_raw() {
    let frames = assert_split_invariant(AmiCodec::client, &fixture("bad-login.recv.raw"));
    assert_eq!(frames.len(), 2);
    let msgs = messages(&frames);
    assert_eq!(msgs[0].response(), Some("Error"));
    assert_eq!(msgs[0].action_id(), Some("bad1"));
    assert_eq!(msgs[0].get("Message"), Some("Authentication failed"));
}

#[test]
fn after_restart_recv_raw() {
    let frames = assert_split_invariant(AmiCodec::client, &fixture("after-restart.recv.raw"));
    let msgs = messages(&frames);
    assert_eq!(msgs.len(), 5);
    let devices: Vec<_> = msgs
        .iter()
        .filter(|m| m.is_event("DeviceStateChange"))
        .filter_map(|m| m.get("Device"))
        .collect();
    assert_eq!(devices, ["Custom:dnd300", "Custom:100@phones"]);
}

#[test]
fn transcripts_both_sides() {
    for (name, recv_raw, sends, recvs) in [
        ("session.transcript", "session.recv.raw", 23, 68),
        (
            "devicestatelist-500.transcript",
            "devicestatelist-500.recv.raw",
            23,
            568,
        ),
        ("bad-login.transcript", "bad-login.recv.raw", 1, 1),
    ] {
        let (send, recv) = transcript(name);
        assert_eq!(
            recv,
            fixture(recv_raw),
            "{name}: RECV side is the raw capture"
        );

        // SEND side: actions as a server decodes them, chunk by chunk as they were written.
        let actions = decode_whole(AmiCodec::server(), &send);
        let actions = messages(&actions);
        assert_eq!(actions.len(), sends, "{name}");
        assert!(actions.iter().all(|m| m.action_name().is_some()));
        assert!(actions.iter().all(|m| m.action_id().is_some()));

        // RECV side with the client codec, fed as the reads of the capture returned it.
        let chunks = chunks_of(name, false);
        let frames = decode_chunks(AmiCodec::client(), chunks.iter().map(Vec::as_slice));
        assert_eq!(frames, decode_whole(AmiCodec::client(), &recv));
        assert_eq!(messages(&frames).len(), recvs, "{name}");

        // Every action ID sent is answered by exactly one response.
        for a in &actions {
            let id = a.action_id().expect("id");
            let answers = messages(&frames)
                .into_iter()
                .filter(|m| {
                    m.event().is_none() && m.response().is_some() && m.action_id() == Some(id)
                })
                .count();
            assert_eq!(answers, 1, "{name}: responses to {id}");
        }
    }
    let (send, _) = transcript("session.transcript");
    let actions = decode_whole(AmiCodec::server(), &send);
    let actions = messages(&actions);
    assert_eq!(actions[0].action_name(), Some("Challenge"));
    assert_eq!(actions[0].get("AuthType"), Some("MD5"));
    assert_eq!(
        actions[1].get("Key"),
        Some("ef683e4af96d9f87785ec39a45d56399")
    );
    let presence = actions
        .iter()
        .find(|m| m.action_id() == Some("sv6"))
        .expect("sv6");
    assert_eq!(
        presence.get("Value"),
        Some("dnd,bWVldGluZywgcm9vbSA0,aW4gYSBtZWV0aW5nLCBzb3JyeQ==,e")
    );
}

/// The chunks of one side of a transcript, as the TCP reads returned them.
fn chunks_of(name: &str, send_side: bool) -> Vec<Vec<u8>> {
    let bytes = fixture(name);
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut side = None;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        match line {
            b">>> SEND\n" => {
                side = Some(true);
                chunks.push(Vec::new());
            }
            b"<<< RECV\n" => {
                side = Some(false);
                chunks.push(Vec::new());
            }
            _ if side == Some(send_side) => {
                chunks.last_mut().expect("a chunk").extend_from_slice(line)
            }
            _ => {}
        }
    }
    chunks.retain(|c| !c.is_empty());
    chunks
}

#[test]
fn trailing_partial_message_waits_then_is_truncated_at_eof() {
    let mut codec = AmiCodec::server();
    let mut buf = BytesMut::from(&b"Action: Ping\r\nActionID: 1\r\n\r\nAction: Log"[..]);
    let Some(Frame::Message(m)) = codec.decode(&mut buf).expect("decode") else {
        panic!("expected a message");
    };
    assert_eq!(m.action_name(), Some("Ping"));
    // The rest is incomplete: not an error, just nothing yet, and the bytes are kept.
    assert!(codec.decode(&mut buf).expect("incomplete").is_none());
    assert_eq!(&buf[..], b"Action: Log");
    buf.extend_from_slice(b"off\r\n");
    assert!(codec.decode(&mut buf).expect("incomplete").is_none());
    // The peer closes with a message still open.
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(CodecError::Truncated)
    ));
}

#[test]
fn extra_blank_lines_between_messages_are_ignored() {
    let frames = decode_whole(
        AmiCodec::server(),
        b"\r\n\r\nAction: Ping\r\n\r\n\r\n\nAction: Logoff\r\n\r\n",
    );
    assert_eq!(frames.len(), 2);
}

#[test]
fn bare_lf_and_mixed_line_ends() {
    let crlf = decode_whole(
        AmiCodec::client(),
        b"Asterisk Call Manager/13.0.0\r\nResponse: Success\r\nActionID: 1\r\n\r\n",
    );
    let lf = decode_whole(
        AmiCodec::client(),
        b"Asterisk Call Manager/13.0.0\nResponse: Success\nActionID: 1\n\n",
    );
    let mixed = decode_whole(
        AmiCodec::client(),
        b"Asterisk Call Manager/13.0.0\nResponse: Success\r\nActionID: 1\n\r\n",
    );
    assert_eq!(crlf.len(), 2);
    assert_eq!(crlf, lf);
    assert_eq!(crlf, mixed);
}

#[test]
fn oversize_line_is_an_error_even_without_line_end() {
    let limits = Limits {
        max_line: 32,
        ..Limits::default()
    };
    // Complete line too long.
    let mut codec = AmiCodec::with_limits(false, limits);
    let mut buf = BytesMut::from(&b"Action: 0123456789012345678901234567890123456789\r\n"[..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CodecError::LineTooLong { limit: 32 })
    ));
    // Exactly at the limit is fine (CR not counted).
    let mut codec = AmiCodec::with_limits(false, limits);
    let line = format!("Action: {}\r\n\r\n", "x".repeat(32 - 8));
    let mut buf = BytesMut::from(line.as_bytes());
    assert!(codec.decode(&mut buf).expect("at limit").is_some());
    // Endless line fed in small pieces: refused once past the limit, buffer stays bounded.
    let mut codec = AmiCodec::with_limits(false, limits);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let err = loop {
        buf.extend_from_slice(b"xxxx");
        fed += 4;
        match codec.decode(&mut buf) {
            Ok(None) => assert!(fed <= 64, "buffered {fed} bytes without an error"),
            Ok(Some(f)) => panic!("unexpected frame {f:?}"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, CodecError::LineTooLong { limit: 32 }));
    assert!(buf.len() <= 32 + 4);
}

#[test]
fn too_many_headers_is_an_error() {
    let limits = Limits {
        max_headers: 3,
        ..Limits::default()
    };
    let mut codec = AmiCodec::with_limits(false, limits);
    let mut buf = BytesMut::from(&b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n"[..]);
    assert!(codec.decode(&mut buf).expect("3 headers").is_some());
    let mut buf = BytesMut::from(&b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n"[..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CodecError::TooManyHeaders { limit: 3 })
    ));
}

#[test]
fn message_too_large_is_an_error() {
    let limits = Limits {
        max_message: 64,
        ..Limits::default()
    };
    let mut codec = AmiCodec::with_limits(false, limits);
    let mut buf = BytesMut::new();
    let mut err = None;
    for i in 0..100 {
        buf.extend_from_slice(format!("Variable: v{i:04}\r\n").as_bytes());
        match codec.decode(&mut buf) {
            Ok(None) => {}
            Ok(Some(f)) => panic!("unexpected frame {f:?}"),
            Err(e) => {
                err = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = err.expect("an error");
    assert!(matches!(e, CodecError::MessageTooLarge { limit: 64 }));
    assert!(i < 10, "error only after {i} lines");
    // A message under the limit, after a fresh start, is fine.
    let mut codec = AmiCodec::with_limits(false, limits);
    let mut buf = BytesMut::from(&b"Action: Ping\r\nActionID: 1\r\n\r\n"[..]);
    assert!(codec.decode(&mut buf).expect("small").is_some());
}

#[test]
fn response_follows_end_command_and_trailing_message() {
    let bytes = b"Response: Follows\r\nPrivilege: Command\r\nActionID: c1\r\n\
No such command 'x'\n--END COMMAND--\r\n\r\nEvent: Ping\r\n\r\n";
    let frames = assert_split_invariant(AmiCodec::server, bytes);
    let msgs = messages(&frames);
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].action_id(), Some("c1"));
    assert_eq!(
        msgs[0].get_all("Output").collect::<Vec<_>>(),
        ["No such command 'x'"]
    );
    assert!(msgs[1].is_event("Ping"));
}

#[test]
fn encoder_writes_crlf_and_refuses_bad_keys() {
    let mut codec = AmiCodec::client();
    let mut dst = BytesMut::new();
    let m = Message::action("Ping").with("ActionID", "a: b");
    codec.encode(&m, &mut dst).expect("encode");
    assert_eq!(&dst[..], b"Action: Ping\r\nActionID: a: b\r\n\r\n");
    for bad in [
        Message::new().with("", "x"),
        Message::new().with("A:B", "x"),
        Message::new().with("A\nB", "x"),
        Message::new().with("A", "x\ry"),
    ] {
        let mut dst = BytesMut::new();
        assert!(matches!(
            codec.encode(&bad, &mut dst),
            Err(CodecError::InvalidHeader { .. })
        ));
        assert!(dst.is_empty());
    }
}

fn arb_message() -> impl Strategy<Value = Message> {
    let key = "[A-Za-z][A-Za-z0-9_-]{0,15}";
    // Any printable text without CR/LF, including ": ", leading spaces and non-ASCII.
    let value = "[^\r\n]{0,40}";
    proptest::collection::vec((key, value), 1..12).prop_map(|hs| {
        hs.into_iter()
            // `Response: Follows` switches to raw command output: not a plain message.
            .filter(|(k, v): &(String, String)| {
                !(k.eq_ignore_ascii_case("Response") && v.eq_ignore_ascii_case("Follows"))
            })
            .collect::<Message>()
    })
}

proptest! {
    // Enough to cover the generators; keeps this binary quick on CI's 2 cores.
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn round_trip(msgs in proptest::collection::vec(arb_message(), 1..6), split in any::<prop::sample::Index>()) {
        let msgs: Vec<Message> = msgs.into_iter().filter(|m| !m.is_empty()).collect();
        let mut codec = AmiCodec::server();
        let mut wire = BytesMut::new();
        for m in &msgs {
            codec.encode(m, &mut wire).expect("valid message encodes");
        }
        let at = split.index(wire.len() + 1);
        let (a, b) = wire.split_at(at);
        let frames = decode_chunks(AmiCodec::server(), [a, b]);
        let decoded: Vec<Message> = frames
            .into_iter()
            .map(|f| match f {
                Frame::Message(m) => m,
                Frame::Banner(b) => panic!("banner {b:?} from a server codec"),
            })
            .collect();
        prop_assert_eq!(decoded, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), banner in any::<bool>(), chunk in 1usize..64) {
        let limits = Limits { max_line: 64, max_headers: 8, max_message: 512 };
        let mut codec = AmiCodec::with_limits(banner, limits);
        let mut buf = BytesMut::new();
        'feed: for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            // Nothing buffered beyond one over-long line plus one chunk.
            prop_assert!(buf.len() <= limits.max_line + 1 + chunk);
        }
        let _ = codec.decode_eof(&mut buf);
    }

    #[test]
    fn line_soup_never_panics(lines in proptest::collection::vec("[ -~]{0,20}", 0..40), lf in any::<bool>()) {
        let end = if lf { "\n" } else { "\r\n" };
        let text: String = lines.iter().map(|l| format!("{l}{end}")).collect();
        let mut codec = AmiCodec::server();
        let mut buf = BytesMut::from(text.as_bytes());
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }
}
