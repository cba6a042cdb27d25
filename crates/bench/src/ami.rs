//! A minimal raw AMI connection for load: log in, then pipeline actions (no ActionID
//! correlation, a bounded window of unanswered actions) while a reader task counts responses.
//! Also one-shot requests whose answer is a list (`DeviceStateList`) or one message
//! (`SimStats`). Works against the simulator and a real Asterisk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// One AMI message as header pairs.
pub type Msg = Vec<(String, String)>;

/// Value of header `key` in `m`.
pub fn get<'a>(m: &'a Msg, key: &str) -> Option<&'a str> {
    m.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// A logged-in AMI connection.
pub struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
}

impl Conn {
    /// Connects to `addr` and logs in with `Events: off`.
    pub async fn login(addr: &str, user: &str, secret: &str) -> anyhow::Result<Self> {
        Self::login_with(addr, user, secret, false).await
    }

    /// Connects to `addr` and logs in, with events on (as an agent's session, which must see
    /// its own writes come back) or off.
    pub async fn login_with(
        addr: &str,
        user: &str,
        secret: &str,
        events: bool,
    ) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Self {
            rd: BufReader::with_capacity(1 << 16, r),
            wr: BufWriter::with_capacity(1 << 16, w),
        };
        let mut banner = String::new();
        c.rd.read_line(&mut banner).await?;
        if !banner.starts_with("Asterisk Call Manager") {
            bail!("{addr}: not AMI: {banner:?}");
        }
        c.send(&[
            ("Action", "Login"),
            ("Username", user),
            ("Secret", secret),
            ("Events", if events { "on" } else { "off" }),
        ])
        .await?;
        c.flush().await?;
        loop {
            let m = c.read_msg().await?;
            if let Some(r) = get(&m, "Response") {
                if r.eq_ignore_ascii_case("Success") {
                    return Ok(c);
                }
                bail!("{addr}: login refused: {m:?}");
            }
        }
    }

    /// Buffers one action (call [`Conn::flush`] to send).
    pub async fn send(&mut self, headers: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(128);
        encode(&mut buf, headers);
        self.wr.write_all(&buf).await?;
        Ok(())
    }

    /// Sends what is buffered.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.wr.flush().await?;
        Ok(())
    }

    /// Reads one message (lines up to an empty line).
    pub async fn read_msg(&mut self) -> anyhow::Result<Msg> {
        read_msg(&mut self.rd).await
    }

    /// Sends one action and returns the first message that answers it (a `Response:`).
    pub async fn request(&mut self, headers: &[(&str, &str)]) -> anyhow::Result<Msg> {
        self.send(headers).await?;
        self.flush().await?;
        loop {
            let m = self.read_msg().await?;
            if get(&m, "Response").is_some() {
                return Ok(m);
            }
        }
    }

    /// The simulator's `SetvarTotal` (Setvar received, `Action: SimStats`); 0 when absent.
    pub async fn setvar_total(&mut self) -> anyhow::Result<u64> {
        let m = self.request(&[("Action", "SimStats")]).await?;
        Ok(get(&m, "SetvarTotal")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Sends a list action; calls `item` for every list item (the events before
    /// `EventList: Complete`) with the value of each of `keys` in it (as [`get`] finds them).
    pub async fn list_each<const N: usize>(
        &mut self,
        headers: &[(&str, &str)],
        keys: [&str; N],
        item: impl FnMut([Option<&str>; N]),
    ) -> anyhow::Result<()> {
        let first = self.request(headers).await?;
        if !get(&first, "Response").is_some_and(|r| r.eq_ignore_ascii_case("Success")) {
            bail!("list refused: {first:?}");
        }
        read_list(&mut self.rd, keys, item).await
    }

    /// Splits into a pipelining sender whose responses are counted by a background task.
    pub fn into_pipe(self) -> Pipe {
        let answered = Arc::new(AtomicU64::new(0));
        let success = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let (a, s, n) = (answered.clone(), success.clone(), notify.clone());
        let mut rd = self.rd;
        tokio::spawn(async move {
            let mut counter = Responses::default();
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                match rd.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(ok) = counter.line(&line) {
                    if ok {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                    a.fetch_add(1, Ordering::Release);
                    n.notify_one();
                }
            }
            // Connection gone: wake a waiting sender so it notices.
            a.store(u64::MAX / 2, Ordering::Release);
            n.notify_one();
        });
        // Nothing is left buffered by `Conn` (each of its calls flushes); kept if it were.
        let buffered = self.wr.buffer().to_vec();
        let wr = self.wr.into_inner();
        Pipe {
            wr,
            buf: buffered,
            sent: 0,
            answered,
            success,
            notify,
        }
    }
}

async fn read_msg<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> anyhow::Result<Msg> {
    let mut m = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if m.is_empty() {
                continue;
            }
            return Ok(m);
        }
        if let Some((k, v)) = header(l) {
            m.push((k.to_owned(), v.to_owned()));
        }
    }
}

/// The key and value of one header line (without its line end): the key ends at the first
/// ": " (the value is the rest as it is), or else at the first ':' (the value trimmed);
/// `None` for a line without ':'.
fn header(l: &str) -> Option<(&str, &str)> {
    match l.split_once(": ") {
        Some(kv) => Some(kv),
        None => l.split_once(':').map(|(k, v)| (k, v.trim())),
    }
}

/// Reads the items of a list (messages up to the one holding `EventList: Complete`) as
/// [`read_msg`] and [`get`] would, calling `item` with the values of `keys` in each, without
/// keeping the messages.
async fn read_list<R: tokio::io::AsyncBufRead + Unpin, const N: usize>(
    rd: &mut R,
    keys: [&str; N],
    mut item: impl FnMut([Option<&str>; N]),
) -> anyhow::Result<()> {
    let mut line = String::new();
    let mut values: [String; N] = std::array::from_fn(|_| String::new());
    let mut found = [false; N];
    // Lines with a header seen in this message; its first `EventList` header, if any.
    let mut in_msg = false;
    let mut event_list: Option<bool> = None;
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if !in_msg {
                continue;
            }
            if event_list == Some(true) {
                return Ok(());
            }
            item(std::array::from_fn(|i| {
                found[i].then_some(values[i].as_str())
            }));
            found = [false; N];
            in_msg = false;
            event_list = None;
            continue;
        }
        let Some((k, v)) = header(l) else {
            continue;
        };
        in_msg = true;
        if event_list.is_none() && k.eq_ignore_ascii_case("EventList") {
            event_list = Some(v.eq_ignore_ascii_case("Complete"));
        }
        for (i, key) in keys.iter().enumerate() {
            if !found[i] && k.eq_ignore_ascii_case(key) {
                values[i].clear();
                values[i].push_str(v);
                found[i] = true;
            }
        }
    }
}

/// Appends one action (`Key: value` lines and the empty line) to `out`.
pub fn encode(out: &mut Vec<u8>, headers: &[(&str, &str)]) {
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Counts answers in a stream of AMI lines without keeping the messages: what [`read_msg`]
/// and [`get`]`(m, "Response")` tell of each message, line by line.
#[derive(Debug, Default)]
struct Responses {
    /// The current message's first `Response` header: whether it says `Success`.
    response: Option<bool>,
}

impl Responses {
    /// Takes one line (with or without its line end); at the end of a message that holds a
    /// `Response` header, whether it is `Success`.
    fn line(&mut self, line: &[u8]) -> Option<bool> {
        let mut l = line;
        while let [rest @ .., b'\r' | b'\n'] = l {
            l = rest;
        }
        if l.is_empty() {
            return self.response.take();
        }
        // As `read_msg` (which reads only UTF-8).
        let (key, value) = std::str::from_utf8(l).ok().and_then(header)?;
        if self.response.is_none() && key.eq_ignore_ascii_case("Response") {
            self.response = Some(value.eq_ignore_ascii_case("Success"));
        }
        None
    }
}

/// A pipelining sender (see [`Conn::into_pipe`]): actions are encoded into one buffer and
/// sent together by [`Pipe::flush`] (one write).
pub struct Pipe {
    wr: OwnedWriteHalf,
    buf: Vec<u8>,
    sent: u64,
    answered: Arc<AtomicU64>,
    success: Arc<AtomicU64>,
    notify: Arc<tokio::sync::Notify>,
}

/// Buffered bytes past which [`Pipe::send`] writes them out before taking more.
const PIPE_FLUSH_AT: usize = 1 << 16;

impl Pipe {
    /// Buffers one action, first waiting while more than `window` are unanswered.
    pub async fn send(&mut self, headers: &[(&str, &str)], window: u64) -> anyhow::Result<()> {
        while self
            .sent
            .saturating_sub(self.answered.load(Ordering::Acquire))
            >= window
        {
            self.flush().await?;
            let _ = tokio::time::timeout(Duration::from_millis(50), self.notify.notified()).await;
        }
        if self.buf.len() >= PIPE_FLUSH_AT {
            self.flush().await?;
        }
        encode(&mut self.buf, headers);
        self.sent += 1;
        Ok(())
    }

    /// Sends what is buffered.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Actions answered so far, and of them successes.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Acquire).min(self.sent),
            self.success.load(Ordering::Relaxed),
        )
    }

    /// Flushes and waits (up to `timeout`) until every action is answered; `(answered,
    /// successes)`.
    pub async fn drain(&mut self, timeout: Duration) -> anyhow::Result<(u64, u64)> {
        self.flush().await?;
        let deadline = Instant::now() + timeout;
        while self.answered.load(Ordering::Acquire) < self.sent && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.notify.notified()).await;
        }
        Ok(self.counts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `read_msg` and `get(m, "Response")` make of `stream`: per message with a
    /// `Response` header, whether it is `Success`.
    async fn reference(mut stream: &[u8]) -> Vec<bool> {
        let mut out = Vec::new();
        while let Ok(m) = read_msg(&mut stream).await {
            if let Some(r) = get(&m, "Response") {
                out.push(r.eq_ignore_ascii_case("Success"));
            }
        }
        out
    }

    fn counted(stream: &[u8]) -> Vec<bool> {
        let mut c = Responses::default();
        stream
            .split_inclusive(|&b| b == b'\n')
            .filter_map(|l| c.line(l))
            .collect()
    }

    #[tokio::test]
    async fn responses_are_counted_as_read_msg_reads_them() {
        let cases: [&[u8]; 9] = [
            b"Response: Success\r\nMessage: Variable Set\r\n\r\n",
            b"Response: Error\r\nMessage: No such device\r\n\r\nResponse: success\r\n\r\n",
            // Events (no Response) are not answers; empty lines between messages are skipped.
            b"\r\n\r\nEvent: DeviceStateChange\r\nDevice: PJSIP/b0n1\r\n\r\nResponse: Success\r\n\r\n",
            // The first Response header counts; keys in any case; bare '\n' line ends.
            b"response: Success\nResponse: Error\n\nRESPONSE: Error\nResponse: Success\n\n",
            // `Key:value` is trimmed, `Key: value` is not.
            b"Response:Success \r\n\r\nResponse:  Success\r\n\r\nResponse:\tSuccess\r\n\r\n",
            // The key ends at the first ": ", else at the first ':'.
            b"Response:x: Success\r\n\r\nX: Response: Success\r\n\r\nResponse:a:b\r\n\r\n",
            // Lines without ':' are not headers: a message of only those is no message.
            b"Asterisk Call Manager/5.0\r\n\r\nnoise\r\nResponse: Success\r\n\r\n",
            // Several line ends, and a last message without its empty line (not complete).
            b"Response: Success\r\r\n\r\nResponse: Success\r\n",
            b"",
        ];
        for case in cases {
            assert_eq!(
                counted(case),
                reference(case).await,
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        assert_eq!(counted(cases[1]), vec![false, true]);
        assert_eq!(counted(cases[4]), vec![true, false, true]);
    }

    /// What `read_msg` and `get` make of the list items in `stream`: `keys` of every message
    /// before the one with `EventList: Complete`.
    async fn reference_list(mut stream: &[u8], keys: [&str; 2]) -> Vec<[Option<String>; 2]> {
        let mut out = Vec::new();
        while let Ok(m) = read_msg(&mut stream).await {
            if get(&m, "EventList").is_some_and(|v| v.eq_ignore_ascii_case("Complete")) {
                break;
            }
            out.push(keys.map(|k| get(&m, k).map(str::to_owned)));
        }
        out
    }

    async fn listed(mut stream: &[u8], keys: [&str; 2]) -> Vec<[Option<String>; 2]> {
        let mut out = Vec::new();
        read_list(&mut stream, keys, |v| {
            out.push(v.map(|v| v.map(str::to_owned)))
        })
        .await
        .expect("list");
        out
    }

    #[tokio::test]
    async fn list_items_are_read_as_read_msg_reads_them() {
        let stream: &[u8] = b"\r\nEvent: DeviceStateChange\r\nDevice: PJSIP/b0n1\r\nState: INUSE\r\n\r\n\
            Event: DeviceStateChange\r\nstate:NOT_INUSE \r\nDEVICE: Custom:PJSIP/b1n0\r\nState: BUSY\r\n\r\n\
            noise without colon\r\n\r\n\
            Event: DeviceStateChange\r\nDevice: PJSIP/b0n2\r\nEventList: start\r\n\r\n\
            Event: X\r\nEventList: complete\r\nDevice: d\r\nEventList: Complete\r\n\r\n\
            Event: DeviceStateListComplete\r\nEventList: Complete\r\nListItems: 4\r\n\r\n\
            Event: After\r\nDevice: never\r\n\r\n";
        let keys = ["Device", "State"];
        let got = listed(stream, keys).await;
        assert_eq!(got, reference_list(stream, keys).await);
        let some = |d: &str, s: Option<&str>| [Some(d.to_owned()), s.map(str::to_owned)];
        assert_eq!(
            got,
            vec![
                some("PJSIP/b0n1", Some("INUSE")),
                some("Custom:PJSIP/b1n0", Some("NOT_INUSE")),
                some("PJSIP/b0n2", None),
            ]
        );
        // A list cut short is an error, as for `read_msg`.
        let mut cut: &[u8] = b"Event: DeviceStateChange\r\nDevice: x\r\n\r\n";
        assert!(read_list(&mut cut, keys, |_| {}).await.is_err());
    }

    #[test]
    fn actions_are_encoded_as_header_lines_and_an_empty_line() {
        let mut out = b"x".to_vec();
        encode(&mut out, &[("Action", "Setvar"), ("Variable", "V")]);
        assert_eq!(out, b"xAction: Setvar\r\nVariable: V\r\n\r\n");
    }
}
