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
        let mut buf = String::with_capacity(128);
        for (k, v) in headers {
            buf.push_str(k);
            buf.push_str(": ");
            buf.push_str(v);
            buf.push_str("\r\n");
        }
        buf.push_str("\r\n");
        self.wr.write_all(buf.as_bytes()).await?;
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

    /// Sends a list action; returns the list items (events before `EventList: Complete`).
    pub async fn list(&mut self, headers: &[(&str, &str)]) -> anyhow::Result<Vec<Msg>> {
        let first = self.request(headers).await?;
        if !get(&first, "Response").is_some_and(|r| r.eq_ignore_ascii_case("Success")) {
            bail!("list refused: {first:?}");
        }
        let mut items = Vec::new();
        loop {
            let m = self.read_msg().await?;
            if get(&m, "EventList").is_some_and(|v| v.eq_ignore_ascii_case("Complete")) {
                return Ok(items);
            }
            items.push(m);
        }
    }

    /// Splits into a pipelining sender whose responses are counted by a background task.
    pub fn into_pipe(self) -> Pipe {
        let answered = Arc::new(AtomicU64::new(0));
        let success = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let (a, s, n) = (answered.clone(), success.clone(), notify.clone());
        let mut rd = self.rd;
        tokio::spawn(async move {
            while let Ok(m) = read_msg(&mut rd).await {
                if let Some(r) = get(&m, "Response") {
                    if r.eq_ignore_ascii_case("Success") {
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
        Pipe {
            wr: self.wr,
            sent: 0,
            answered,
            success,
            notify,
        }
    }
}

async fn read_msg(rd: &mut BufReader<OwnedReadHalf>) -> anyhow::Result<Msg> {
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
        if let Some((k, v)) = l.split_once(": ") {
            m.push((k.to_owned(), v.to_owned()));
        } else if let Some((k, v)) = l.split_once(':') {
            m.push((k.to_owned(), v.trim().to_owned()));
        }
    }
}

/// A pipelining sender (see [`Conn::into_pipe`]).
pub struct Pipe {
    wr: BufWriter<OwnedWriteHalf>,
    sent: u64,
    answered: Arc<AtomicU64>,
    success: Arc<AtomicU64>,
    notify: Arc<tokio::sync::Notify>,
}

impl Pipe {
    /// Buffers one action, first waiting while more than `window` are unanswered.
    pub async fn send(&mut self, headers: &[(&str, &str)], window: u64) -> anyhow::Result<()> {
        while self
            .sent
            .saturating_sub(self.answered.load(Ordering::Acquire))
            >= window
        {
            self.wr.flush().await?;
            let _ = tokio::time::timeout(Duration::from_millis(50), self.notify.notified()).await;
        }
        let mut buf = String::with_capacity(128);
        for (k, v) in headers {
            buf.push_str(k);
            buf.push_str(": ");
            buf.push_str(v);
            buf.push_str("\r\n");
        }
        buf.push_str("\r\n");
        self.wr.write_all(buf.as_bytes()).await?;
        self.sent += 1;
        Ok(())
    }

    /// Sends what is buffered.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.wr.flush().await?;
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
        self.wr.flush().await?;
        let deadline = Instant::now() + timeout;
        while self.answered.load(Ordering::Acquire) < self.sent && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.notify.notified()).await;
        }
        Ok(self.counts())
    }
}
