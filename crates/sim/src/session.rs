//! One AMI connection: the banner, then actions in and responses and events out.
//!
//! The session task owns the socket. It reads actions through [`AmiCodec`] (bounded by
//! [`SimConfig::limits`](crate::SimConfig)), answers them through [`crate::actions`], and
//! forwards broadcast events that pass its `Events` mask. Every write is bounded by the
//! configured `writetimeout`; a session that cannot keep up with the event stream is closed.
//! A decoding error (garbage, oversize input) closes only this connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hintfed_ami::{AmiCodec, Frame, Message};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::codec::Framed;

use crate::event::{self, SimEvent};
use crate::server::Shared;

/// The login banner (AMI version 13.0.0, what Asterisk 13 to 23 announce).
pub const BANNER: &str = "Asterisk Call Manager/13.0.0\r\n";

/// Per-connection state the actions read and change.
pub(crate) struct SessionCtx {
    pub(crate) id: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) authenticated: bool,
    pub(crate) challenge: Option<String>,
    /// `send_events`: the classes this session wants.
    pub(crate) mask: u32,
    /// Blackhole of this connection only (`SimBlackhole` with `Scope: connection`).
    pub(crate) blackhole_until: Option<Instant>,
    pub(crate) rx: Option<broadcast::Receiver<Arc<SimEvent>>>,
}

/// What an action asks the session to do.
pub(crate) struct Outcome {
    pub(crate) replies: Vec<Message>,
    pub(crate) close: bool,
}

impl Outcome {
    pub(crate) fn reply(m: Message) -> Self {
        Self {
            replies: vec![m],
            close: false,
        }
    }
    pub(crate) fn many(replies: Vec<Message>) -> Self {
        Self {
            replies,
            close: false,
        }
    }
    pub(crate) fn closing(self) -> Self {
        Self {
            close: true,
            ..self
        }
    }
}

async fn recv_event(
    rx: &mut Option<broadcast::Receiver<Arc<SimEvent>>>,
) -> Result<Arc<SimEvent>, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

type Sink = futures::stream::SplitSink<Framed<TcpStream, AmiCodec>, Message>;

/// Sends `msgs`, each write bounded by `wt`. `false` when the connection must go.
async fn send_all(sink: &mut Sink, msgs: Vec<Message>, wt: Duration, id: u64) -> bool {
    for m in msgs {
        match tokio::time::timeout(wt, sink.feed(m)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(session = id, error = %e, "write failed");
                return false;
            }
            Err(_) => {
                tracing::warn!(session = id, "write timed out: dropping slow reader");
                return false;
            }
        }
    }
    match tokio::time::timeout(wt, sink.flush()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(session = id, error = %e, "write failed");
            false
        }
        Err(_) => {
            tracing::warn!(session = id, "write timed out: dropping slow reader");
            false
        }
    }
}

impl SessionCtx {
    fn blackholed(&self, shared: &Shared) -> bool {
        self.blackhole_until.is_some_and(|t| Instant::now() < t)
            || shared.blackholed(&shared.lock())
    }
}

/// Serves one connection until it ends.
#[tracing::instrument(skip(shared, stream), fields(server = ?shared.cfg.name))]
pub(crate) async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let id = {
        let mut inner = shared.lock();
        inner.session_seq += 1;
        inner.stats.connections += 1;
        inner.stats.connections_total += 1;
        inner.session_seq
    };
    serve(&shared, stream, peer, id).await;
    shared.lock().stats.connections -= 1;
    tracing::debug!(session = id, "connection closed");
}

async fn serve(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, id: u64) {
    let wt = shared.cfg.write_timeout;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(shared.local_addr);
    let mut gen_rx = shared.generation.subscribe();
    gen_rx.borrow_and_update();
    // A blackholed (hung) server accepts TCP but sends nothing, not even the banner, until
    // the blackhole ends.
    while shared.blackholed(&shared.lock()) {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    match tokio::time::timeout(wt, stream.write_all(BANNER.as_bytes())).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let framed = Framed::new(stream, AmiCodec::with_limits(false, shared.cfg.limits));
    let (mut sink, mut source) = framed.split();
    let mut ctx = SessionCtx {
        id,
        peer,
        local,
        authenticated: false,
        challenge: None,
        mask: event::ALL,
        blackhole_until: None,
        rx: None,
    };
    loop {
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
            _ = gen_rx.changed() => {
                // Restart: deliver what was already broadcast (the Shutdown event), then go.
                let mut last = Vec::new();
                if let Some(rx) = ctx.rx.as_mut() {
                    while let Ok(ev) = rx.try_recv() {
                        if ctx.authenticated && ev.passes(ctx.mask) {
                            last.push(ev.message.clone());
                        }
                    }
                }
                send_all(&mut sink, last, wt, id).await;
                break;
            }
            ev = recv_event(&mut ctx.rx) => match ev {
                Ok(ev) => {
                    if !ctx.authenticated || !ev.passes(ctx.mask) || ctx.blackholed(shared) {
                        continue;
                    }
                    if !send_all(&mut sink, vec![ev.message.clone()], wt, id).await {
                        shared.lock().stats.slow_readers_dropped += 1;
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(session = id, missed = n, "slow reader: closing connection");
                    shared.lock().stats.slow_readers_dropped += 1;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => ctx.rx = None,
            },
            frame = source.next() => match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(session = id, error = %e, "bad input: closing connection");
                    break;
                }
                Some(Ok(Frame::Banner(_))) => {}
                Some(Ok(Frame::Message(m))) => {
                    if ctx.blackholed(shared) && !crate::actions::ends_blackhole(&m) {
                        shared.lock().stats.blackholed_actions += 1;
                        continue;
                    }
                    let out = crate::actions::handle(shared, &mut ctx, &m).await;
                    if !send_all(&mut sink, out.replies, wt, id).await || out.close {
                        break;
                    }
                }
            },
        }
    }
    let _ = tokio::time::timeout(wt, sink.close()).await;
}
