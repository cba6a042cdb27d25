//! CPU time an [`AmiClient`] spends per pipelined `Setvar` of its [`SetvarWriter`].
//!
//! A minimal AMI server on a plain OS thread (blocking I/O) answers every action it reads with
//! `Response: Success` (the answers to one read in one write, as Asterisk and the simulator
//! coalesce them); a second OS thread runs a current-thread Tokio runtime holding only the
//! client and a caller that starts `RATE/1000` writes every millisecond (as a relay does for
//! a hub's fan-out batch) and takes their completions. That thread's CPU time
//! (`/proc/thread-self/schedstat`, nanoseconds) divided by the writes answered is the
//! client's cost per `Setvar` (writing it, reading and matching its answer, reporting it).
//!
//! Usage: `setvar_cpu [N=200000] [RATE per second=20000]`. Linux only (schedstat).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use hintfed_ami::{AmiClient, Auth, ClientConfig};

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Answers every action read with `Response: Success` (and its `ActionID`), one write per read.
fn serve(listener: TcpListener) {
    let Ok((mut s, _)) = listener.accept() else {
        return;
    };
    let _ = s.set_nodelay(true);
    if s.write_all(b"Asterisk Call Manager/6.0.0\r\n").is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some(end) = buf[at..].windows(4).position(|w| w == b"\r\n\r\n") {
            let msg = &buf[at..at + end];
            let id = msg
                .split(|&b| b == b'\n')
                .find_map(|l| l.strip_prefix(b"ActionID: "))
                .map(|v| v.strip_suffix(b"\r").unwrap_or(v));
            out.extend_from_slice(b"Response: Success\r\n");
            if let Some(id) = id {
                out.extend_from_slice(b"ActionID: ");
                out.extend_from_slice(id);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"Message: Variable Set\r\n\r\n");
            at += end + 4;
        }
        buf.drain(..at);
        if !out.is_empty() {
            if s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

fn main() {
    let n = arg(1, 200_000);
    let rate = arg(2, 20_000).max(1000);
    let batch = rate / 1000;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || serve(listener));
    let client_thread = std::thread::Builder::new()
        .name("ami-client".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut config = ClientConfig::new(addr, "bench", "bench");
                config.auth = Auth::Plain;
                config.events = "off".to_owned();
                let client = AmiClient::start(config);
                assert!(client.wait_connected(Duration::from_secs(10)).await);
                let writer = client.setvar_writer();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let mut done = Vec::new();
                let (mut sent, mut finished, mut failed) = (0u64, 0u64, 0u64);
                let cpu0 = thread_cpu_ns();
                let wall0 = std::time::Instant::now();
                while finished < n {
                    tokio::select! {
                        _ = tick.tick(), if sent < n => {
                            let at = tokio::time::Instant::now();
                            for _ in 0..batch.min(n - sent) {
                                let device = format!("DEVICE_STATE(Custom:phone-{})", sent % 10_000);
                                writer.setvar(sent, &device, "INUSE", at);
                                sent += 1;
                            }
                        }
                        () = writer.completed() => {
                            finished += writer.take(&mut done) as u64;
                            failed += done.iter().filter(|d| d.result.is_err()).count() as u64;
                            done.clear();
                        }
                    }
                }
                let cpu = thread_cpu_ns() - cpu0;
                (finished, failed, cpu, wall0.elapsed())
            })
        })
        .expect("thread");
    let (finished, failed, cpu, wall) = client_thread.join().expect("client thread");
    println!(
        "setvars {finished} ({failed} failed) at {rate}/s: client thread CPU {:.3} s over {:.3} s wall, {} ns/setvar",
        cpu as f64 / 1e9,
        wall.as_secs_f64(),
        cpu / finished.max(1)
    );
}
