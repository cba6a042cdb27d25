//! The helper processes of `hintfed-bench hub` (this binary re-invoked with hidden
//! subcommands), so that the hub, not the load generator, is what shares the cores:
//! - `hub-sub`: N raw ZMTP 3.0 SUB connections (subscribe to everything) in one process; each
//!   counts the messages whose first frame starts with a prefix and notes when the first and
//!   the last of them arrived. Used for the hub and for the raw PUB/SUB ceiling alike, so both
//!   figures are measured by the same receivers. Protocol on stdout: `ready` once every
//!   connection has received a message (a hub heartbeat or a ceiling warm-up frame), then one
//!   JSON line with the result.
//! - `hub-pub`: one origin made of the core `Node` (what an agent runs) signs every update
//!   before the clock starts, then writes them, already ZMTP-encoded, over one raw DEALER
//!   connection in large writes, so the publisher costs next to nothing while the hub works.
//!   Prints `start <unix-ns>` before the first write and `done <unix-ns> <messages> <bytes>`.

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::{Buf as _, BytesMut};
use hintfed_core::envelope::Limits as CoreLimits;
use hintfed_core::{
    Action, DeviceState, Envelope, Epoch, KeyRing, LocalEvent, Millis, Node, NodeConfig, Role,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Unix time in nanoseconds (one clock for every process on the machine).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn now_ms() -> Millis {
    Millis(unix_ns() / 1_000_000)
}

fn host_port(endpoint: &str) -> anyhow::Result<&str> {
    endpoint
        .strip_prefix("tcp://")
        .context("endpoint must be tcp://host:port")
}

/// Result of one subscriber connection.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct SubResult {
    /// Messages matching the prefix.
    pub count: u64,
    /// Unix ns of the first matching message (0: none).
    pub first_ns: u64,
    /// Unix ns of the last matching message (0: none).
    pub last_ns: u64,
}

/// Counts ZMTP messages in a byte stream (after the peer's 64-byte greeting).
struct Scanner {
    buf: BytesMut,
    greeted: bool,
    at_start: bool,
}

impl Scanner {
    /// Parses what is complete; calls `on_message(first_frame)` for each message start.
    fn scan(&mut self, mut on_message: impl FnMut(&[u8])) {
        if !self.greeted {
            if self.buf.len() < 64 {
                return;
            }
            self.buf.advance(64);
            self.greeted = true;
        }
        loop {
            let Some(&flags) = self.buf.first() else {
                return;
            };
            let long = flags & 0x02 != 0;
            let head = if long { 9 } else { 2 };
            if self.buf.len() < head {
                return;
            }
            let len = if long {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[1..9]);
                u64::from_be_bytes(b) as usize
            } else {
                usize::from(self.buf[1])
            };
            if self.buf.len() < head + len {
                return;
            }
            if flags & 0x04 == 0 {
                if self.at_start {
                    on_message(&self.buf[head..head + len]);
                }
                self.at_start = flags & 0x01 == 0;
            }
            self.buf.advance(head + len);
        }
    }
}

/// `hub-sub`: see the module docs. Ends when every connection counted `expect` messages, or
/// when no matching message arrived for `idle` after the first one (or for `timeout` before).
pub async fn sub_main(
    endpoint: &str,
    subs: usize,
    prefix: &str,
    expect: u64,
    idle: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let addr = host_port(endpoint)?.to_owned();
    let prefix = prefix.as_bytes().to_vec();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subs.max(1));
    let mut tasks = Vec::new();
    for _ in 0..subs {
        let mut s = TcpStream::connect(&addr).await.context("connect SUB")?;
        s.set_nodelay(true)?;
        // Greeting and READY first; the subscription only after the peer's greeting and
        // READY arrived (libzmq 4.3 drops a connection whose subscription comes sooner).
        let hs = hintfed_testkit::zmtp::sub_handshake();
        let sub = &hs[hs.len() - hintfed_testkit::zmtp::SUBSCRIBE_ALL.len()..];
        s.write_all(&hs[..hs.len() - sub.len()]).await?;
        let mut sc = Scanner {
            buf: BytesMut::with_capacity(256 * 1024),
            greeted: false,
            at_start: true,
        };
        while sc.buf.len() < 66 || sc.buf.len() < 66 + usize::from(sc.buf[65]) {
            let read = tokio::time::timeout(timeout, s.read_buf(&mut sc.buf)).await;
            anyhow::ensure!(
                matches!(read, Ok(Ok(n)) if n > 0),
                "PUB closed during the handshake"
            );
        }
        s.write_all(sub).await?;
        let prefix = prefix.clone();
        let ready_tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = SubResult::default();
            let mut announced = false;
            let mut last_seen = Instant::now();
            let started = Instant::now();
            loop {
                if r.count >= expect {
                    break;
                }
                sc.buf.reserve(128 * 1024);
                let wait = if r.count == 0 { timeout } else { idle };
                let left = wait.saturating_sub(last_seen.elapsed());
                if r.count == 0 && started.elapsed() > timeout {
                    break;
                }
                let n = match tokio::time::timeout(left, s.read_buf(&mut sc.buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(n)) => n,
                };
                let _ = n;
                let now = unix_ns();
                let mut got = 0u64;
                let mut any = false;
                sc.scan(|first| {
                    any = true;
                    if first.starts_with(&prefix) {
                        got += 1;
                    }
                });
                if any && !announced {
                    announced = true;
                    let _ = ready_tx.send(()).await;
                }
                if got > 0 {
                    if r.count == 0 {
                        r.first_ns = now;
                    }
                    r.count += got;
                    r.last_ns = now;
                    last_seen = Instant::now();
                }
            }
            r
        }));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < subs {
        if ready_rx.recv().await.is_none() {
            break;
        }
        ready += 1;
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {ready}")?;
        out.flush()?;
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap_or_default());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&results)?)?;
    out.flush()?;
    Ok(())
}

/// Appends one ZMTP frame.
fn frame(out: &mut Vec<u8>, body: &[u8], more: bool) {
    let m = u8::from(more);
    match u8::try_from(body.len()) {
        Ok(n) => out.extend_from_slice(&[m, n]),
        Err(_) => {
            out.push(m | 0x02);
            out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(body);
}

/// The signed updates of `hub-pub`, ZMTP-encoded as `[topic, signed envelope]` messages, and
/// the size of one update message (topic + payload bytes).
pub fn presigned(updates: u64, keys: usize, key: &str) -> anyhow::Result<(Vec<u8>, usize)> {
    let ring = KeyRing::from_secrets([key]);
    let limits = CoreLimits::default();
    let t = now_ms();
    let mut node = Node::new(NodeConfig::new("bench-origin"), Epoch(t.0), t);
    let mut out = Vec::new();
    let mut size = 0usize;
    let push = |env: &Envelope, out: &mut Vec<u8>| -> anyhow::Result<usize> {
        let bytes = ring.seal(env, &limits)?;
        frame(out, env.topic().as_bytes(), true);
        frame(out, &bytes, false);
        Ok(env.topic().len() + bytes.len())
    };
    let hello = node.hello(Role::Agent, "hintfed-bench");
    push(&hello, &mut out)?;
    node.on_local_full_sync(now_ms(), Vec::new());
    for act in node.take_actions() {
        if let Action::Publish(env) = act {
            push(&env, &mut out)?;
        }
    }
    const STATES: [DeviceState; 4] = [
        DeviceState::Inuse,
        DeviceState::NotInuse,
        DeviceState::Ringing,
        DeviceState::Busy,
    ];
    let keys = keys.max(1) as u64;
    let mut sent = 0u64;
    let mut i = 0u64;
    while sent < updates {
        let dev = format!("PJSIP/h{}", i % keys);
        let st = STATES[((i / keys) % 4) as usize];
        i += 1;
        node.on_local_event(now_ms(), LocalEvent::device(dev, st));
        for act in node.take_actions() {
            if let Action::Publish(env) = act {
                size = push(&env, &mut out)?;
                sent += 1;
            }
        }
    }
    Ok((out, size))
}

/// `hub-pub`: see the module docs. Stays connected until stdin closes (the parent ends it).
pub async fn pub_main(endpoint: &str, updates: u64, keys: usize, key: &str) -> anyhow::Result<()> {
    let (data, _) = presigned(updates, keys, key)?;
    let mut s = TcpStream::connect(host_port(endpoint)?)
        .await
        .context("connect DEALER")?;
    s.set_nodelay(true)?;
    let mut hs = hintfed_testkit::zmtp::greeting();
    hs.extend(hintfed_testkit::zmtp::ready("DEALER"));
    s.write_all(&hs).await?;
    let (mut rd, mut wr) = s.into_split();
    // Drain whatever the hub answers (acks, pongs) so its replies never block.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let start = unix_ns();
    println!("start {start}");
    for chunk in data.chunks(256 * 1024) {
        wr.write_all(chunk).await?;
    }
    wr.flush().await?;
    println!("done {} {} {}", unix_ns(), updates, data.len());
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_counts_messages_by_first_frame() {
        let mut bytes = vec![0u8; 64];
        // A READY command, a two-frame message, a one-frame message, a long frame.
        bytes.extend([0x04, 3, 1, 2, 3]);
        frame(&mut bytes, b"state.device", true);
        frame(&mut bytes, b"payload", false);
        frame(&mut bytes, b"\x00hb", false);
        frame(&mut bytes, &vec![b's'; 300], false);
        let mut sc = Scanner {
            buf: BytesMut::new(),
            greeted: false,
            at_start: true,
        };
        let mut firsts = Vec::new();
        // Fed in two pieces, split inside a frame.
        sc.buf.extend_from_slice(&bytes[..70]);
        sc.scan(|f| firsts.push(f.to_vec()));
        sc.buf.extend_from_slice(&bytes[70..]);
        sc.scan(|f| firsts.push(f.to_vec()));
        assert_eq!(firsts.len(), 3);
        assert_eq!(firsts[0], b"state.device");
        assert_eq!(firsts[1], b"\x00hb");
        assert_eq!(firsts[2].len(), 300);
        assert!(sc.buf.is_empty());
    }

    #[test]
    fn presigned_updates_open_with_the_key() {
        let (data, size) = presigned(3, 2, "k").expect("sign");
        assert!(size > 50 && data.len() > 3 * size);
    }
}
