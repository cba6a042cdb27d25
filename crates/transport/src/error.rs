//! Error types of the transport layer.

use std::time::Duration;

/// Errors raised when setting up a transport (binding, parsing endpoints).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint string is not of the form `tcp://host:port`.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Binding a listening socket failed (typically: address already in use).
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint that could not be bound.
        endpoint: String,
        /// The underlying ZeroMQ error.
        #[source]
        source: zeromq::ZmqError,
    },
    /// A configuration value is out of range.
    #[error("invalid transport configuration: {0}")]
    Config(&'static str),
    /// No connected peer was available for the operation.
    #[error("not connected to any peer")]
    NotConnected,
    /// The supervisor task has stopped (the transport was shut down).
    #[error("transport closed")]
    Closed,
}

/// Why a message handed to a supervised socket was not accepted.
///
/// Every rejected message is also counted in the link's [`crate::LinkStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The link is not connected right now; the message was dropped.
    #[error("link not connected; message dropped")]
    NotConnected,
    /// The outbound queue is full; the message was dropped.
    #[error("outbound queue full; message dropped")]
    Full,
    /// The message is larger than the configured limits; it was dropped.
    #[error("message exceeds size limits; dropped")]
    Oversize,
    /// The message has no frames.
    #[error("message has no frames")]
    Empty,
    /// The supervisor task has stopped.
    #[error("link closed")]
    Closed,
}

/// Why a request on a [`crate::ReqClient`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Too many requests are already waiting; this one was not queued.
    #[error("request queue full")]
    QueueFull,
    /// No reply within `request_timeout`; the REQ socket was dropped and recreated.
    #[error("no reply within {0:?}; socket recreated")]
    Timeout(Duration),
    /// No connection to the peer could be made within `request_timeout`.
    #[error("not connected within {0:?}")]
    NotConnected(Duration),
    /// The peer went away while the request was in flight; the socket was recreated.
    #[error("peer disconnected during the request")]
    Disconnected,
    /// The request or its reply exceeds the configured size limits.
    #[error("request or reply exceeds size limits")]
    Oversize,
    /// The request has no frames.
    #[error("request has no frames")]
    Empty,
    /// The client task has stopped.
    #[error("client closed")]
    Closed,
}
