//! Shared by the transport's integration tests that read a hub link's inbound messages.

use std::time::Duration;

use bytes::Bytes;
use hintfed_transport::{Channel, Incoming};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Generous bound for set-up and for conditions polled with a deadline.
pub const SETUP: Duration = Duration::from_secs(10);

/// The frames of the next fan-out message a link hands over (replies skipped), within
/// [`SETUP`].
pub async fn next_fanout(rx: &mut mpsc::Receiver<Incoming>) -> Vec<Bytes> {
    loop {
        let m = timeout(SETUP, rx.recv())
            .await
            .expect("a fan-out message in time")
            .expect("inbound open");
        if m.channel == Channel::Fanout {
            return m.frames;
        }
    }
}
