//! CPU time a [`HubLink`] spends per fan-out message it receives.
//!
//! A [`HubBind`] on the main thread publishes `N` messages (topic + 300-byte payload) at a
//! paced rate, in batches every millisecond; a second OS thread runs a current-thread Tokio
//! runtime holding only the link and a consumer that counts what arrives. That thread's CPU
//! time (`/proc/thread-self/schedstat`, nanoseconds) between the first and the last message,
//! divided by the messages received, is the link's receive cost (plus the consumer's
//! `recv`, which the agent pays too).
//!
//! The same for the hub's side (the publisher and the hub's threads: encoding, queueing and
//! writing the fan-out to its one subscriber): every other thread's CPU time while publishing,
//! divided by the messages published.
//!
//! Usage: `link_cpu [N=200000] [RATE per second=20000] [BATCH per ms tick, default RATE/1000]`
//! Linux only (schedstat).

use std::time::Duration;

use bytes::Bytes;
use hintfed_transport::{Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Publication};

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time of every thread of this process but the link's (nanoseconds).
fn hub_side_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok().map(|t| t.path()))
        .filter(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() != "hub-link"))
        .filter_map(|t| std::fs::read_to_string(t.join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = arg(1, 200_000);
    let rate = arg(2, 20_000).max(1000);
    let batch = arg(3, rate / 1000).max(1);
    let hub_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (hub, _hub_rx) = hub_rt
        .block_on(HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0")))
        .expect("bind");
    let endpoint = hub.router_endpoint().to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let link_thread = std::thread::Builder::new()
        .name("hub-link".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (link, mut rx) = HubLink::connect(HubLinkConfig::new(endpoint)).expect("link");
                assert!(link.wait_connected(Duration::from_secs(10)).await);
                ready_tx.send(()).expect("main waits");
                let mut got = 0u64;
                let mut start = None;
                let deadline = tokio::time::Instant::now()
                    + Duration::from_secs(n / rate + 30)
                    + Duration::from_secs(5);
                while got < n {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(m)) if m.channel == Channel::Fanout => {
                            if start.is_none() {
                                start = Some((thread_cpu_ns(), std::time::Instant::now()));
                            }
                            got += 1;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                let (cpu0, wall0) = start.unwrap_or((thread_cpu_ns(), std::time::Instant::now()));
                let cpu = thread_cpu_ns() - cpu0;
                let wall = wall0.elapsed();
                let stats = link.stats();
                (got, cpu, wall, stats)
            })
        });
    ready_rx.recv().expect("link connected");
    let hub0 = hub_side_cpu_ns();
    hub_rt.block_on(async {
        let payload = Bytes::from(vec![b'x'; 300]);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut sent = 0u64;
        while sent < n {
            tick.tick().await;
            let k = batch.min(n - sent);
            let msgs: Vec<_> = (sent..sent + k)
                .map(|i| {
                    Publication::new(vec![
                        Bytes::from(format!("state.dev.{:06}", i % 1000)),
                        payload.clone(),
                    ])
                })
                .collect();
            hub.publish_batch(&msgs).await.expect("publish");
            sent += k;
        }
    });
    // The hub's side: every thread but the link's, while publishing.
    let hub_cpu = hub_side_cpu_ns() - hub0;
    let (got, cpu, wall, stats) = link_thread
        .expect("spawn the link thread")
        .join()
        .expect("link thread");
    println!(
        "messages {got} of {n} at {rate}/s (batch {batch}): link thread CPU {:.3} s over {:.3} s wall, {:.0} ns/message; dropped_inbound_full {}",
        cpu as f64 / 1e9,
        wall.as_secs_f64(),
        cpu as f64 / got.max(1) as f64,
        stats.dropped_inbound_full
    );
    println!(
        "hub side (publisher and hub threads) CPU {:.3} s, {:.0} ns/message",
        hub_cpu as f64 / 1e9,
        hub_cpu as f64 / n.max(1) as f64
    );
    hub_rt.block_on(hub.shutdown());
}
