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

/// How the AMI session of a Setvar ceiling is set up: what the Asterisk must do for each
/// write besides answering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// `Events: off`: the answers only.
    EventsOff,
    /// Events on, no filter: every write comes back as a `DeviceStateChange` to send.
    EventsOn,
    /// Events on with the filters an agent adds after its login
    /// ([`hintfed_agent::config::FILTER_CUSTOM_DEVICES`] and
    /// [`hintfed_agent::config::FILTER_EXTENSION_STATUS`]): each write's event is made and
    /// then dropped by the filter, as for an agent's own session.
    AgentFilters,
}

/// Sends `count` pipelined `Setvar DEVICE_STATE(Custom:hfbench<i>)` to `addr` over a session
/// set up as `session`, and times them until the last answer. The value of key `i` in the
/// n-th pass over the `keys` keys is state `n + round` of a cycle of four, so that runs on the
/// same keys with rounds 0, 1, 2, 3 each change every key.
#[allow(clippy::too_many_arguments)]
pub async fn setvar(
    addr: &str,
    user: &str,
    secret: &str,
    count: u64,
    window: u64,
    keys: u64,
    session: Session,
    round: usize,
) -> anyhow::Result<SetvarCeiling> {
    const STATES: [&str; 4] = ["INUSE", "NOT_INUSE", "RINGING", "BUSY"];
    let mut conn = Conn::login_with(addr, user, secret, session != Session::EventsOff).await?;
    if session == Session::AgentFilters {
        for filter in [
            hintfed_agent::config::FILTER_CUSTOM_DEVICES,
            hintfed_agent::config::FILTER_EXTENSION_STATUS,
        ] {
            let r = conn
                .request(&[
                    ("Action", "Filter"),
                    ("Operation", "Add"),
                    ("Filter", filter),
                ])
                .await?;
            anyhow::ensure!(
                crate::ami::get(&r, "Response").is_some_and(|v| v.eq_ignore_ascii_case("Success")),
                "{addr}: filter {filter:?} refused: {r:?}"
            );
        }
    }
    let mut pipe = conn.into_pipe();
    let t0 = Instant::now();
    for i in 0..count {
        let var = format!("DEVICE_STATE(Custom:hfbench{})", i % keys.max(1));
        let pass = (i / keys.max(1)) as usize;
        pipe.send(
            &[
                ("Action", "Setvar"),
                ("Variable", &var),
                ("Value", STATES[(pass + round) % 4]),
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
