//! [`MultiHub`]: the agent's view of every configured hub at once, and its implementation of
//! [`crate::FederationTransport`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{SendError, TransportError};
use crate::hub::{HubLink, HubLinkConfig, Incoming};
use crate::link::{CancelOnDrop, Frames, LinkStatus};
use crate::{FederationTransport, SNAPSHOT_TOPIC};

/// Configuration of a [`MultiHub`].
#[derive(Debug, Clone)]
pub struct MultiHubConfig {
    /// One entry per hub, in configuration order (the order gives each hub its index).
    pub hubs: Vec<HubLinkConfig>,
    /// Capacity of the merged inbound channel (default 8192).
    pub inbound_capacity: usize,
}

impl MultiHubConfig {
    /// Default link settings for each of `endpoints` (`tcp://host:P`).
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            hubs: endpoints.into_iter().map(HubLinkConfig::new).collect(),
            inbound_capacity: 8192,
        }
    }
}

struct Inner {
    links: Vec<HubLink>,
    incoming: Mutex<Option<mpsc::Receiver<Incoming>>>,
    next: AtomicUsize,
    connected: watch::Receiver<usize>,
    link_ups: watch::Receiver<u64>,
    _cancel: CancelOnDrop,
}

/// Links to every configured hub, with one merged inbound stream tagged by hub index.
///
/// Cheap to clone; all links stop when the last clone is dropped. Sends follow each
/// [`HubLink`]'s policy (never block; refused while that hub is down). The merged inbound
/// channel is bounded (`inbound_capacity`); when full, newest messages are dropped and counted
/// in the receiving link's `dropped_inbound_full`.
#[derive(Clone)]
pub struct MultiHub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MultiHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiHub")
            .field("links", &self.inner.links)
            .finish_non_exhaustive()
    }
}

impl MultiHub {
    /// Spawns one supervised [`HubLink`] per hub (needs a Tokio runtime).
    pub fn connect(config: MultiHubConfig) -> Result<Self, TransportError> {
        if config.hubs.is_empty() {
            return Err(TransportError::Config("at least one hub is required"));
        }
        if config.inbound_capacity == 0 {
            return Err(TransportError::Config("inbound_capacity must be > 0"));
        }
        let (in_tx, in_rx) = mpsc::channel(config.inbound_capacity);
        let links = config
            .hubs
            .into_iter()
            .enumerate()
            .map(|(i, c)| HubLink::connect_with(c, i, in_tx.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let (count_tx, count_rx) = watch::channel(0usize);
        let (ups_tx, ups_rx) = watch::channel(0u64);
        let cancel = CancellationToken::new();
        tokio::spawn(count_connected(
            links.iter().map(HubLink::status).collect(),
            count_tx,
            ups_tx,
            cancel.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                links,
                incoming: Mutex::new(Some(in_rx)),
                next: AtomicUsize::new(0),
                connected: count_rx,
                link_ups: ups_rx,
                _cancel: CancelOnDrop(cancel),
            }),
        })
    }

    /// Queues `frames` to every connected hub; returns how many took it.
    pub fn send_all(&self, frames: &Frames) -> usize {
        self.inner
            .links
            .iter()
            .filter(|l| l.try_send(frames.clone()).is_ok())
            .count()
    }

    /// Queues `frames` to hub `hub` only.
    pub fn send_to(&self, hub: usize, frames: Frames) -> Result<(), SendError> {
        self.inner
            .links
            .get(hub)
            .ok_or(SendError::NotConnected)?
            .try_send(frames)
    }

    /// Queues `frames` (a request, e.g. for a snapshot) to one connected hub not in `exclude`,
    /// rotating the starting hub between calls; returns the chosen hub's index. Replies come
    /// back on the inbound stream as [`crate::Channel::Reply`] with that index. To fall back,
    /// call again with the failed hub added to `exclude`.
    pub fn request(&self, frames: Frames, exclude: &[usize]) -> Result<usize, SendError> {
        let n = self.inner.links.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut last = SendError::NotConnected;
        for k in 0..n {
            let i = (start + k) % n;
            let link = &self.inner.links[i];
            if exclude.contains(&i) || !link.is_connected() {
                continue;
            }
            match link.try_send(frames.clone()) {
                Ok(()) => return Ok(i),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Takes the merged inbound stream (only the first call returns it).
    pub fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        self.inner
            .incoming
            .lock()
            .map(|mut g| g.take())
            .unwrap_or(None)
    }

    /// The links, indexed like the configuration.
    pub fn links(&self) -> &[HubLink] {
        &self.inner.links
    }

    /// How many hubs are connected right now.
    pub fn connected_count(&self) -> usize {
        *self.inner.connected.borrow()
    }

    /// A receiver of the number of connected hubs.
    pub fn connected(&self) -> watch::Receiver<usize> {
        self.inner.connected.clone()
    }

    /// A receiver of the total number of link (re)connections so far: it changes on every
    /// hub link coming up, even when a quick flap leaves [`MultiHub::connected`] unchanged.
    /// Use it to say hello / republish to a hub that restarted.
    pub fn link_ups(&self) -> watch::Receiver<u64> {
        self.inner.link_ups.clone()
    }

    /// Waits until at least one hub is connected or `timeout` elapses.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn count_connected(
    mut statuses: Vec<watch::Receiver<LinkStatus>>,
    tx: watch::Sender<usize>,
    ups_tx: watch::Sender<u64>,
    cancel: CancellationToken,
) {
    loop {
        // Count ups before publishing the count, so an observer that sees n connected hubs
        // also sees every one of those connections in `link_ups`.
        for s in &mut statuses {
            if s.has_changed().unwrap_or(false) && *s.borrow_and_update() == LinkStatus::Connected {
                ups_tx.send_modify(|u| *u += 1);
            }
        }
        let n = statuses
            .iter()
            .filter(|s| *s.borrow() == LinkStatus::Connected)
            .count();
        tx.send_if_modified(|v| std::mem::replace(v, n) != n);
        if statuses.is_empty() {
            return;
        }
        let changed = futures::future::select_all(statuses.iter_mut().map(|s| s.changed().boxed()));
        let (result, index, _) = tokio::select! {
            r = changed => r,
            () = cancel.cancelled() => return,
        };
        if result.is_err() {
            statuses.swap_remove(index);
            continue;
        }
        // Every change that lands on Connected is a (re)connection, even when a quick
        // Connected → Connecting → Connected flap was coalesced by the watch channel.
        if *statuses[index].borrow_and_update() == LinkStatus::Connected {
            ups_tx.send_modify(|u| *u += 1);
        }
    }
}

impl FederationTransport for MultiHub {
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<usize, TransportError> {
        let frames = vec![Bytes::copy_from_slice(topic.as_bytes()), payload];
        match self.send_all(&frames) {
            0 => Err(TransportError::NotConnected),
            n => Ok(n),
        }
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        MultiHub::take_incoming(self)
    }

    async fn request_snapshot(
        &self,
        payload: Bytes,
        exclude: &[usize],
    ) -> Result<usize, TransportError> {
        self.request(
            vec![Bytes::from_static(SNAPSHOT_TOPIC.as_bytes()), payload],
            exclude,
        )
        .map_err(|_| TransportError::NotConnected)
    }

    fn connected(&self) -> watch::Receiver<usize> {
        MultiHub::connected(self)
    }

    fn link_ups(&self) -> watch::Receiver<u64> {
        MultiHub::link_ups(self)
    }
}
