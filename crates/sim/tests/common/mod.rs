//! Helpers for the simulator's integration tests: a raw AMI client over TCP, transcript
//! parsing, and the comparison rules against the real captures.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use hintfed_ami::{AmiCodec, Frame, Message};
use hintfed_sim::{SimConfig, SimHandle, SimServer, extensions};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Framed};

/// Generous per-message deadline: only a broken simulator gets near it.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/asterisk")
        .join(name)
}

/// A simulator configured like the capture's server.
pub fn capture_config(name: &str) -> SimConfig {
    SimConfig {
        name: Some(name.to_owned()),
        dialplan: extensions::load(&fixture("extensions.conf")).expect("fixture extensions.conf"),
        ..SimConfig::default()
    }
}

pub async fn spawn(cfg: SimConfig) -> SimHandle {
    SimServer::spawn(cfg).await.expect("spawn simulator")
}

pub struct Client {
    framed: Framed<TcpStream, AmiCodec>,
    pub banner: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut framed = Framed::new(stream, AmiCodec::client());
        let banner = match tokio::time::timeout(DEADLINE, framed.next()).await {
            Ok(Some(Ok(Frame::Banner(b)))) => b,
            other => panic!("expected a banner, got {other:?}"),
        };
        Self { framed, banner }
    }

    /// Connects and logs in with the plain secret (`extra` headers appended to the Login).
    pub async fn login(addr: SocketAddr, extra: &[(&str, &str)]) -> Self {
        let mut c = Self::connect(addr).await;
        let mut login = Message::action("Login")
            .with("ActionID", "login")
            .with("Username", "admin")
            .with("Secret", "adminsecret");
        for (k, v) in extra {
            login.push(*k, *v);
        }
        c.send(login).await;
        let r = c.recv().await;
        assert_eq!(r.get("Message"), Some("Authentication accepted"), "{r:?}");
        c
    }

    pub async fn send(&mut self, m: Message) {
        self.framed.send(m).await.expect("send");
    }

    /// Sends every message in one flush (pipelined).
    pub async fn send_all(&mut self, ms: impl IntoIterator<Item = Message>) {
        for m in ms {
            self.framed.feed(m).await.expect("send");
        }
        SinkExt::<Message>::flush(&mut self.framed)
            .await
            .expect("flush");
    }

    /// The next message, or `None` at EOF; panics after [`DEADLINE`].
    pub async fn next(&mut self) -> Option<Message> {
        match tokio::time::timeout(DEADLINE, self.framed.next()).await {
            Ok(Some(Ok(Frame::Message(m)))) => Some(m),
            Ok(Some(Ok(Frame::Banner(b)))) => panic!("unexpected banner {b}"),
            Ok(Some(Err(e))) => panic!("decode error {e}"),
            Ok(None) => None,
            Err(_) => panic!("no message within {DEADLINE:?}"),
        }
    }

    pub async fn recv(&mut self) -> Message {
        self.next().await.expect("connection closed")
    }

    /// Reads until a message matching `pred`, returning everything read (including it).
    pub async fn until(&mut self, pred: impl Fn(&Message) -> bool) -> Vec<Message> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = pred(&m);
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Sends `action` with ActionID `id` and reads until its response, returning what came
    /// before it (events) and the response.
    pub async fn action(&mut self, action: Message, id: &str) -> (Vec<Message>, Message) {
        self.send(action.with("ActionID", id)).await;
        let mut all = self
            .until(|m| m.response().is_some() && m.action_id() == Some(id))
            .await;
        let resp = all.pop().expect("response");
        (all, resp)
    }

    /// A Ping round trip: returns every event that arrived before the Pong. Events queued
    /// before the Ping are delivered before its answer, so this is how tests check that
    /// nothing (more) was sent.
    pub async fn events_before_ping(&mut self, id: &str) -> Vec<Message> {
        let (before, pong) = self.action(Message::action("Ping"), id).await;
        assert_eq!(pong.get("Ping"), Some("Pong"));
        before
    }

    /// Waits for EOF, asserting nothing else arrives.
    pub async fn expect_eof(&mut self) {
        if let Some(m) = self.next().await {
            panic!("expected the connection to close, got {m:?}");
        }
    }
}

/// One chunk of a transcript.
pub enum Chunk {
    Send(Vec<u8>),
    Recv(Vec<u8>),
}

/// Splits a `.transcript` into its `>>> SEND` / `<<< RECV` chunks (bytes as captured).
pub fn read_transcript(name: &str) -> Vec<Chunk> {
    let data = std::fs::read(fixture(name)).expect("transcript");
    let mut chunks = Vec::new();
    let mut cur: Option<(bool, Vec<u8>)> = None;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let marker = if line.starts_with(b">>> SEND") {
            Some(true)
        } else if line.starts_with(b"<<< RECV") {
            Some(false)
        } else {
            None
        };
        match marker {
            Some(send) => {
                if let Some((s, b)) = cur.take() {
                    chunks.push(if s { Chunk::Send(b) } else { Chunk::Recv(b) });
                }
                cur = Some((send, Vec::new()));
            }
            None => {
                if let Some((_, b)) = cur.as_mut() {
                    b.extend_from_slice(line);
                }
            }
        }
    }
    if let Some((s, b)) = cur {
        chunks.push(if s { Chunk::Send(b) } else { Chunk::Recv(b) });
    }
    chunks
}

fn decode_all(codec: &mut AmiCodec, buf: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = codec.decode(buf).expect("decode capture") {
        out.push(f);
    }
    out
}

/// One step of a session: an action and the messages the real server sent after it (until
/// the next action).
pub struct Step {
    pub action: Message,
    pub expected: Vec<Message>,
}

/// The banner and the steps of a transcript.
pub fn steps(name: &str) -> (String, Vec<Step>) {
    let mut recv_codec = AmiCodec::client();
    let mut send_codec = AmiCodec::server();
    let mut rbuf = BytesMut::new();
    let mut sbuf = BytesMut::new();
    let mut banner = String::new();
    let mut steps: Vec<Step> = Vec::new();
    for c in read_transcript(name) {
        match c {
            Chunk::Send(b) => {
                sbuf.extend_from_slice(&b);
                for f in decode_all(&mut send_codec, &mut sbuf) {
                    if let Frame::Message(action) = f {
                        steps.push(Step {
                            action,
                            expected: Vec::new(),
                        });
                    }
                }
            }
            Chunk::Recv(b) => {
                rbuf.extend_from_slice(&b);
                for f in decode_all(&mut recv_codec, &mut rbuf) {
                    match f {
                        Frame::Banner(b) => banner = b,
                        Frame::Message(m) => steps
                            .last_mut()
                            .expect("a response follows an action")
                            .expected
                            .push(m),
                    }
                }
            }
        }
    }
    (banner, steps)
}

/// All messages of a `.recv.raw` capture (after the banner).
pub fn raw_messages(name: &str) -> (String, Vec<Message>) {
    let data = std::fs::read(fixture(name)).expect("capture");
    let mut codec = AmiCodec::client();
    let mut buf = BytesMut::from(&data[..]);
    let mut banner = String::new();
    let mut out = Vec::new();
    for f in decode_all(&mut codec, &mut buf) {
        match f {
            Frame::Banner(b) => banner = b,
            Frame::Message(m) => out.push(m),
        }
    }
    (banner, out)
}

/// Channel events of an Originate, which the simulator does not produce (the issue only asks
/// for the DeviceStateChange/ExtensionStatus/OriginateResponse subset).
pub const CHANNEL_EVENTS: &[&str] = &[
    "Newchannel",
    "Newexten",
    "VarSet",
    "LocalBridge",
    "DialBegin",
    "DialEnd",
    "Newstate",
    "HangupRequest",
    "SoftHangupRequest",
    "Hangup",
];

pub fn is_channel_event(m: &Message) -> bool {
    m.event().is_some_and(|e| CHANNEL_EVENTS.contains(&e))
}

/// Headers whose values change from run to run; their names and positions must still match.
pub const VARYING: &[&str] = &[
    "Challenge",
    "Uptime",
    "LastReload",
    "Timestamp",
    "EventTV",
    "SessionTV",
    "SessionID",
    "LocalAddress",
    "RemoteAddress",
    "Uniqueid",
    "Linkedid",
];

/// A message as compared: every header name in order, values blanked where they vary.
pub fn canonical(m: &Message) -> String {
    let mut s = String::new();
    for (k, v) in m.headers() {
        let v = if VARYING.iter().any(|x| x.eq_ignore_ascii_case(k)) {
            "*"
        } else {
            v
        };
        s.push_str(&format!("{k}: {v}\n"));
    }
    s
}

/// State events Asterisk publishes from different threads: their relative order varies from
/// run to run (the captures themselves show both orders), so runs of them compare as multisets.
const STATE_EVENTS: &[&str] = &[
    "DeviceStateChange",
    "ExtensionStatus",
    "PresenceStateChange",
    "PresenceStatus",
];

/// What a run of messages is compared as.
#[derive(Debug, PartialEq, Eq)]
pub enum Token {
    /// A message that must be at exactly this position.
    One(String),
    /// A run whose order does not matter: unsolicited state events, or the items of one list
    /// (Asterisk iterates hash containers).
    Unordered(&'static str, Vec<String>),
}

fn run_kind(m: &Message) -> Option<&'static str> {
    let ev = m.event()?;
    let list_item =
        m.action_id().is_some() && !ev.ends_with("Complete") && ev != "OriginateResponse";
    if list_item {
        return Some("list items");
    }
    if STATE_EVENTS.contains(&ev) {
        return Some("state events");
    }
    None
}

pub fn tokens(msgs: &[Message]) -> Vec<Token> {
    let mut out: Vec<Token> = Vec::new();
    for m in msgs {
        let c = canonical(m);
        match run_kind(m) {
            Some(kind) => match out.last_mut() {
                Some(Token::Unordered(k, v)) if *k == kind => v.push(c),
                _ => out.push(Token::Unordered(kind, vec![c])),
            },
            None => out.push(Token::One(c)),
        }
    }
    for t in &mut out {
        if let Token::Unordered(_, v) = t {
            v.sort();
        }
    }
    out
}

/// Asserts `actual` matches `expected` under the rules above, with a readable diff.
pub fn assert_same(step: &str, expected: &[Message], actual: &[Message]) {
    let e = tokens(expected);
    let a = tokens(actual);
    if e != a {
        let show = |ms: &[Message]| ms.iter().map(canonical).collect::<Vec<_>>().join("\n");
        panic!(
            "step {step}: messages differ\n--- expected (capture) ---\n{}\n--- actual (simulator) ---\n{}",
            show(expected),
            show(actual)
        );
    }
}
