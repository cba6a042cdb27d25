//! hintfed transports: supervised ZeroMQ sockets (bytes-level, multipart frames as
//! `Vec<Bytes>`) and the [`FederationTransport`] interface the agent is written against.
//!
//! Modules and what flows between them:
//! - [`link`]: what every supervisor shares: [`LinkStatus`] (published on a `watch`),
//!   [`LinkStats`] counters, capped jittered [`Backoff`], size [`Limits`], endpoint parsing.
//! - [`hub`]: the agent/server federation sockets. [`HubLink`] (agent side, one per hub
//!   `tcp://host:P`: DEALER to P + SUB to P+1) sends updates/requests and yields
//!   [`Incoming`] replies and fan-out; [`HubBind`] (server side: ROUTER on P, PUB on P+1)
//!   yields [`RouterMessage`]s and sends replies and publications.
//! - [`multi`]: [`MultiHub`], every configured hub at once: send to all, one merged inbound
//!   stream tagged by hub index, requests to one live hub with fallback. Implements
//!   [`FederationTransport`].
//! - [`req`] / [`sub`]: [`ReqClient`] (lazy-pirate REQ) and [`SubClient`] (SUB, prefix `{`)
//!   for res_zmq_manager's command and event sockets.
//! - [`legacy`]: [`PullBind`] and [`PubBind`], the original zmq-ami-broker server's sockets.
//! - `kafka` (feature `kafka`, on by default): `kafka::KafkaTransport`, the federation over a
//!   Kafka cluster (compacted state topic as the snapshot, heartbeat topic; librdkafka via
//!   `rdkafka`). Implements [`FederationTransport`] and uses `hintfed-core` to verify records
//!   and answer snapshots.
//! - [`error`]: [`TransportError`], [`SendError`], [`RequestError`].
//! - `guard` (private): the ZMTP size guard in front of the bound zeromq sockets (the legacy
//!   PULL and PUB), and the bounded accept loop every listener shares.
//! - `fanout` (private): the hub's PUB, ZMTP 3.0 spoken directly (encode once, queue the
//!   same bytes to every subscriber), with the same limits as the guard.
//! - `router` (private): the hub's ROUTER, ZMTP 3.0 spoken directly (each peer's reader hands
//!   whole messages to the application's channel, a writer per peer takes its replies), with
//!   the same limits as the guard and a handshake deadline.
//! - `zmtp` (private): the ZMTP 3.0 wire pieces `fanout` and `router` share (greeting, READY,
//!   commands, the frame reader), and `Conn`, our own SUB and DEALER client (the hub link's
//!   fan-out and request sides, the [`SubClient`]: every complete message of one read at
//!   once, limits checked on each frame header; what is queued to send, in one write).
//!
//! Each supervisor is one Tokio task that owns its sockets; the public handles are cheap
//! clones talking to it over bounded channels (each type documents its full/closed policy),
//! and the task stops when the last handle is dropped.
//!
//! # Why a supervisor: gaps of the `zeromq` crate (0.7), verified by experiment
//! - DEALER/REQ/PUSH never reconnect after the peer restarts; sends then succeed into a dead
//!   queue and are lost. SUB does reconnect, but with a backoff growing to 30 s.
//! - `send` with no connected peer fails (`ReturnToSender`); `connect` to a closed port retries
//!   for up to 30 s (the default connect timeout); `recv` has no timeout and blocks forever
//!   with no peer; there is no CURVE; there is no maximum message size (the whole message is
//!   buffered at whatever length the peer announces).
//!
//! The supervisors therefore: connect with one bounded attempt (`connect_attempt_timeout`,
//! default 250 ms) and retry with capped jittered backoff (50 ms doubling to 500 ms, ±20 %);
//! recreate the socket when the connection closes (socket monitor `Disconnected`, or the end
//! of our own connection's stream), when a send does not complete (for the hub link's own
//! connections: makes no progress) within `send_timeout`, when a request gets no reply within
//! `request_timeout`, or when a hub is silent past `silence_timeout` (hub links ping on the
//! DEALER and the hub heartbeats on the PUB). Recovery after a peer comes back therefore takes
//! at most about one backoff step plus one connect attempt (< 1 s with the defaults), well
//! within the 2 s requirement. Oversize incoming messages are dropped and counted (see
//! [`Limits`]). Because the crate reserves memory for whatever frame length a peer announces
//! (a single TCP client announcing a 1 TiB frame aborts the process — verified), every *bound*
//! zeromq socket ([`PullBind`], [`PubBind`]) listens through a ZMTP-aware TCP guard that
//! forwards to the real socket on loopback and closes any connection announcing an oversize
//! frame or message before it is buffered; it also caps simultaneous connections. The hub's
//! sockets ([`HubBind`]: ROUTER on P, PUB on P+1) are not zeromq sockets at all: the private
//! `router` and `fanout` modules speak ZMTP 3.0 (NULL mechanism, as the crate) on the
//! listeners themselves with the same limits and connection cap (the proxy's byte copies, its
//! loopback hop and the crate's per-subscriber re-encoding cost more than half of the hub's
//! CPU and several task wake-ups per message). Both sides of a [`HubLink`] (SUB and DEALER)
//! and the [`SubClient`] are our own ZMTP client too (`zmtp`): the limits are checked on each
//! frame header, so an oversize message is skipped without being buffered; the link writes
//! every message queued when its task runs in one write (the crate's DEALER wrote, and woke
//! the hub, once per message). The [`ReqClient`] is a zeromq socket and trusts its peer (the
//! local Asterisk). Confidentiality/authentication is left to the envelope HMAC (no CURVE).
//!
//! # The federation transport interface
//! [`FederationTransport`] is what the agent needs from any transport (ZeroMQ hubs now, Kafka
//! later): publish an update, receive everyone's updates and the replies to its requests,
//! request a snapshot from one source with fallback, and know how many sources are reachable.
//! Payloads are opaque bytes (the signed envelope of `hintfed-core`); a topic travels beside
//! each payload so subscribers can filter by prefix.
//!
//! ZeroMQ wire convention (implemented by [`MultiHub`], expected by the hub):
//! - agent → hub (DEALER → ROUTER): `[topic, payload]` for updates;
//!   `[`[`SNAPSHOT_TOPIC`]`, payload]` for snapshot requests; the one-frame [`hub::PING`]
//!   (answered by [`HubBind`] itself, never delivered).
//! - hub → agent replies (ROUTER → DEALER): any frames, delivered as [`Channel::Reply`].
//! - hub fan-out (PUB → SUB): `[topic, ...]`, delivered as [`Channel::Fanout`]; the one-frame
//!   [`hub::HEARTBEAT_TOPIC`] is swallowed by the link. A link given its owner's origin
//!   ([`HubLinkConfig::origin`]) announces it in its SUB's ZMTP READY as the application
//!   property `X-Hintfed-Origin`; [`HubBind`] then writes it none of the messages published
//!   as that origin's ([`hub::Publication::origin`]). Any other SUB (libzmq, an older link)
//!   gets everything, and an older hub or a libzmq PUB ignores the property.
#![forbid(unsafe_code)]

use std::future::Future;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

pub mod error;
mod fanout;
mod guard;
pub mod hub;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod legacy;
pub mod link;
pub mod multi;
pub mod req;
mod router;
pub mod sub;
mod zmtp;

pub use error::{RequestError, SendError, TransportError};
pub use hub::{
    Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, Publication, RouterMessage,
};
pub use legacy::{PubBind, PullBind};
pub use link::{Backoff, BackoffConfig, Frames, Limits, LinkStats, LinkStatus, StatsSnapshot};
pub use multi::{MultiHub, MultiHubConfig};
pub use req::{ReqClient, ReqClientConfig};
pub use sub::{SubClient, SubClientConfig};

/// First frame of a snapshot request sent by [`FederationTransport::request_snapshot`] over
/// ZeroMQ (`[SNAPSHOT_TOPIC, payload]`).
pub const SNAPSHOT_TOPIC: &str = "hintfed.snapshot";

/// What the agent needs from a federation transport (ZeroMQ hubs, later Kafka).
///
/// Delivery is at most once and unordered across sources: the federation core detects gaps
/// by (origin, epoch, seq) and fetches a snapshot, and drops duplicates from several hubs.
pub trait FederationTransport: Send + Sync {
    /// Publishes one update under `topic` to every reachable source; returns how many took
    /// it, or [`TransportError::NotConnected`] when none did (the update is then dropped).
    fn publish(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<usize, TransportError>> + Send;

    /// Takes the single inbound stream: everyone's updates ([`Channel::Fanout`]) and replies to
    /// this node's requests ([`Channel::Reply`]), tagged by source index. Later calls get `None`.
    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>>;

    /// Sends a snapshot request to one reachable source not in `exclude` and returns its index;
    /// the snapshot arrives on the inbound stream as replies from that index. To fall back after
    /// a timeout, call again with that index in `exclude`.
    fn request_snapshot(
        &self,
        payload: Bytes,
        exclude: &[usize],
    ) -> impl Future<Output = Result<usize, TransportError>> + Send;

    /// The number of reachable sources, kept current.
    fn connected(&self) -> watch::Receiver<usize>;

    /// Total number of source (re)connections so far; it changes whenever any source link
    /// comes up, including a quick flap that leaves [`FederationTransport::connected`]
    /// unchanged (a hub restarted between two polls). Transports without such links keep the
    /// default: a channel that never changes.
    fn link_ups(&self) -> watch::Receiver<u64> {
        watch::channel(0).1
    }
}
