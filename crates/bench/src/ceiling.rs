//! Ceilings measured in the same run as the figures they bound:
//! - raw ZeroMQ PUB/SUB throughput between two processes (this binary re-spawned as the
//!   publisher with the hidden `zmq-pub` subcommand; the same `zeromq` crate the transport
//!   uses; a stdin line tells it the subscriber is connected);
//! - pipelined `Setvar`/s an Asterisk (the simulator, or a real one by address) accepts over
//!   one AMI connection with a bounded window.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use zeromq::{PubSocket, Socket as _, SocketRecv as _, SocketSend as _, SubSocket, ZmqMessage};

use crate::ami::Conn;

/// Result of the ZeroMQ PUB/SUB ceiling.
#[derive(Debug, Clone, Copy)]
pub struct ZmqCeiling {
    /// Messages received per second.
    pub msgs_per_sec: f64,
    /// Messages sent.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Payload bytes per message.
    pub size: usize,
}

/// The publisher side (`hintfed-bench zmq-pub`): bind, send warm-up frames until a line on
/// stdin, then `count` data frames of `size` bytes, then end frames.
pub async fn zmq_pub(endpoint: &str, count: u64, size: usize) -> anyhow::Result<()> {
    let mut publ = PubSocket::new();
    publ.bind(endpoint).await.context("bind PUB")?;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    loop {
        publ.send(ZmqMessage::from(Bytes::from_static(b"w")))
            .await
            .context("send warm-up")?;
        tokio::select! {
            _ = &mut rx => break,
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let mut payload = vec![b'x'; size.max(1)];
    payload[0] = b'd';
    let data = Bytes::from(payload);
    for _ in 0..count {
        publ.send(ZmqMessage::from(data.clone()))
            .await
            .context("send data")?;
    }
    for _ in 0..100 {
        publ.send(ZmqMessage::from(Bytes::from_static(b"e")))
            .await
            .context("send end")?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Spawns the publisher and receives: messages per second between the first and the last
/// data frame.
pub async fn zmq_pubsub(count: u64, size: usize) -> anyhow::Result<ZmqCeiling> {
    let port = crate::procs::free_port()?;
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "zmq-pub",
            "--endpoint",
            &endpoint,
            "--count",
            &count.to_string(),
            "--size",
            &size.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("spawn zmq-pub helper")?;
    let result = async {
        let mut sub = SubSocket::new();
        sub.subscribe("").await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match sub.connect(&endpoint).await {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(anyhow::Error::from(e).context("connect SUB")),
            }
        }
        // Wait for a warm-up frame, then start the burst.
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
                .await
                .context("no warm-up frame")??;
            if m.get(0).is_some_and(|f| f.as_ref() == b"w") {
                break;
            }
        }
        let mut stdin = child.stdin.take().context("helper stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        let mut received = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
                .await
                .context("PUB/SUB stalled")??;
            match m.get(0).and_then(|f| f.first()) {
                Some(b'd') => {
                    received += 1;
                    last = Instant::now();
                    first.get_or_insert(last);
                }
                Some(b'e') => break,
                _ => {}
            }
        }
        let secs = first
            .map(|f| last.duration_since(f).as_secs_f64())
            .unwrap_or(0.0)
            .max(1e-9);
        Ok(ZmqCeiling {
            msgs_per_sec: received as f64 / secs,
            sent: count,
            received,
            size,
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Result of the pipelined Setvar ceiling.
#[derive(Debug, Clone, Copy)]
pub struct SetvarCeiling {
    /// Accepted Setvar per second.
    pub per_sec: f64,
    /// Setvar sent.
    pub sent: u64,
    /// Answered `Success`.
    pub accepted: u64,
    /// Window of unanswered actions.
    pub window: u64,
}

/// Sends `count` pipelined `Setvar DEVICE_STATE(Custom:hfbench<i>)` to `addr` (values cycling
/// so each one changes the state) and times them until the last answer. With `events`, the
/// session receives events as an agent's does (each write then comes back as a
/// `DeviceStateChange` the Asterisk must send), else it logs in with `Events: off`; the cycle
/// then starts one state later, so that it still changes every key after an events-off run on
/// the same keys.
pub async fn setvar(
    addr: &str,
    user: &str,
    secret: &str,
    count: u64,
    window: u64,
    keys: u64,
    events: bool,
) -> anyhow::Result<SetvarCeiling> {
    const STATES: [&str; 4] = ["INUSE", "NOT_INUSE", "RINGING", "BUSY"];
    let conn = Conn::login_with(addr, user, secret, events).await?;
    let mut pipe = conn.into_pipe();
    let t0 = Instant::now();
    for i in 0..count {
        let var = format!("DEVICE_STATE(Custom:hfbench{})", i % keys.max(1));
        let round = (i / keys.max(1)) as usize;
        pipe.send(
            &[
                ("Action", "Setvar"),
                ("Variable", &var),
                ("Value", STATES[(round + usize::from(events)) % 4]),
            ],
            window,
        )
        .await?;
    }
    let (answered, accepted) = pipe.drain(Duration::from_secs(60)).await?;
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    anyhow::ensure!(answered == count, "only {answered}/{count} Setvar answered");
    Ok(SetvarCeiling {
        per_sec: accepted as f64 / secs,
        sent: count,
        accepted,
        window,
    })
}
