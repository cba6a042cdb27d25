//! Sockets of the original zmq-ami-broker server, for hintfed-server's compatibility mode:
//! [`PullBind`] (the PULL its agents PUSH to) and [`PubBind`] (the PUB they subscribe to with
//! `[*]` and `[<name>]`). Minimal wrappers: bound sockets need no reconnection; each is owned
//! by one task, listens through the size guard and reports bind errors with the endpoint.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, PullSocket, Socket, SocketRecv, SocketSend};

use crate::error::{SendError, TransportError};
use crate::guard::{self, Guard};
use crate::link::{
    CancelOnDrop, DEFAULT_MAX_CONNECTIONS, Frames, Limits, LinkStats, StatsSnapshot, to_message,
};

/// Binds `endpoint` through a size guard (see the crate docs: the zeromq crate has no message
/// size limit of its own).
async fn bind<S: Socket>(
    endpoint: &str,
    limits: Limits,
    stats: &Arc<LinkStats>,
) -> Result<(S, Guard, String), TransportError> {
    let (listener, host) = guard::listen_endpoint(endpoint).await?;
    let mut socket = S::new();
    let (guard, public) = guard::guard_socket(
        &mut socket,
        listener,
        &host,
        limits,
        DEFAULT_MAX_CONNECTIONS,
        stats.clone(),
    )
    .await?;
    Ok((socket, guard, public))
}

/// A bound PULL socket. Inbound policy: bounded channel; when full the newest message is
/// dropped and counted (`dropped_inbound_full`); oversize messages are dropped and counted.
#[derive(Debug, Clone)]
pub struct PullBind {
    endpoint: Arc<str>,
    stats: Arc<LinkStats>,
    stop: mpsc::Sender<oneshot::Sender<()>>,
    _cancel: Arc<CancelOnDrop>,
}

impl PullBind {
    /// Binds `endpoint` (e.g. `tcp://0.0.0.0:55556`); messages arrive on the receiver.
    pub async fn bind(
        endpoint: &str,
        limits: Limits,
        inbound_capacity: usize,
    ) -> Result<(Self, mpsc::Receiver<Frames>), TransportError> {
        if inbound_capacity == 0 {
            return Err(TransportError::Config("inbound_capacity must be > 0"));
        }
        let stats = Arc::new(LinkStats::default());
        let (mut socket, guard, bound) = bind::<PullSocket>(endpoint, limits, &stats).await?;
        let (tx, rx) = mpsc::channel(inbound_capacity);
        let (stop_tx, mut stop_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
        let cancel = CancellationToken::new();
        let (task_stats, task_cancel) = (stats.clone(), cancel.clone());
        tokio::spawn(async move {
            let ack = loop {
                tokio::select! {
                    () = task_cancel.cancelled() => break None,
                    ack = stop_rx.recv() => break ack,
                    r = socket.recv() => match r {
                        Ok(msg) => {
                            let frames = msg.into_vec();
                            if !limits.accepts(&frames) {
                                task_stats.dropped_oversize();
                                continue;
                            }
                            task_stats.messages_in();
                            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(frames) {
                                task_stats.dropped_inbound_full();
                            }
                        }
                        Err(error) => tracing::debug!(%error, "PULL receive error"),
                    },
                }
            };
            guard.shutdown().await;
            let _ = socket.close().await;
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
        });
        Ok((
            Self {
                endpoint: bound.into(),
                stats,
                stop: stop_tx,
                _cancel: Arc::new(CancelOnDrop(cancel)),
            },
            rx,
        ))
    }

    /// The bound endpoint (port resolved).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Closes the socket and waits until its port is released.
    pub async fn shutdown(self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.stop.send(ack_tx).await.is_ok() {
            let _ = ack_rx.await;
        }
    }
}

enum PubCmd {
    Publish(Frames),
    Stop(oneshot::Sender<()>),
}

/// A bound PUB socket. Outbound policy: bounded queue (`outbound_capacity`), callers wait for
/// space; the PUB drops messages for slow subscribers (zeromq crate policy).
#[derive(Debug, Clone)]
pub struct PubBind {
    endpoint: Arc<str>,
    stats: Arc<LinkStats>,
    tx: mpsc::Sender<PubCmd>,
    _cancel: Arc<CancelOnDrop>,
}

impl std::fmt::Debug for PubCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PubCmd")
    }
}

impl PubBind {
    /// Binds `endpoint` (e.g. `tcp://0.0.0.0:55555`).
    pub async fn bind(endpoint: &str, outbound_capacity: usize) -> Result<Self, TransportError> {
        if outbound_capacity == 0 {
            return Err(TransportError::Config("outbound_capacity must be > 0"));
        }
        let stats = Arc::new(LinkStats::default());
        let (mut socket, guard, bound) =
            bind::<PubSocket>(endpoint, Limits::default(), &stats).await?;
        let (tx, mut rx) = mpsc::channel(outbound_capacity);
        let cancel = CancellationToken::new();
        let (task_stats, task_cancel) = (stats.clone(), cancel.clone());
        tokio::spawn(async move {
            let ack = loop {
                tokio::select! {
                    () = task_cancel.cancelled() => break None,
                    cmd = rx.recv() => match cmd {
                        None => break None,
                        Some(PubCmd::Stop(ack)) => break Some(ack),
                        Some(PubCmd::Publish(frames)) => {
                            if let Some(msg) = to_message(frames) {
                                match socket.send(msg).await {
                                    Ok(()) => task_stats.messages_out(),
                                    Err(_) => task_stats.dropped_outbound(),
                                }
                            }
                        }
                    },
                }
            };
            guard.shutdown().await;
            let _ = socket.close().await;
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
        });
        Ok(Self {
            endpoint: bound.into(),
            stats,
            tx,
            _cancel: Arc::new(CancelOnDrop(cancel)),
        })
    }

    /// Queues one multipart message (first frame = topic, e.g. `[*]`); waits for queue space.
    pub async fn publish(&self, frames: Frames) -> Result<(), SendError> {
        if frames.is_empty() {
            return Err(SendError::Empty);
        }
        self.tx
            .send(PubCmd::Publish(frames))
            .await
            .map_err(|_| SendError::Closed)
    }

    /// The bound endpoint (port resolved).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Closes the socket and waits until its port is released.
    pub async fn shutdown(self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(PubCmd::Stop(ack_tx)).await.is_ok() {
            let _ = ack_rx.await;
        }
    }
}
