//! Shared by the transport's integration tests that read a hub link's inbound messages.
// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use hintfed_transport::{Channel, Incoming};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Generous bound for set-up and for conditions polled with a deadline.
pub const SETUP: Duration = Duration::from_secs(10);

/// The frames of the next message a link hands over on `channel` (others skipped), within
/// [`SETUP`].
pub async fn next_on(rx: &mut mpsc::Receiver<Incoming>, channel: Channel) -> Vec<Bytes> {
    loop {
        let m = timeout(SETUP, rx.recv())
            .await
            .expect("a message in time")
            .expect("inbound open");
        if m.channel == channel {
            return m.frames;
        }
    }
}

/// [`next_on`] the fan-out.
pub async fn next_fanout(rx: &mut mpsc::Receiver<Incoming>) -> Vec<Bytes> {
    next_on(rx, Channel::Fanout).await
}

/// The next `n` messages of the fan-out ([`next_fanout`] each).
pub async fn next_fanouts(rx: &mut mpsc::Receiver<Incoming>, n: usize) -> Vec<Vec<Bytes>> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(next_fanout(rx).await);
    }
    got
}
