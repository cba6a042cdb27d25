//! hintfed transports.
#![forbid(unsafe_code)]

pub mod error;
pub mod hub;
pub mod link;

pub use error::{RequestError, SendError, TransportError};
pub use hub::{Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, RouterMessage};
pub use link::{Backoff, BackoffConfig, Frames, Limits, LinkStats, LinkStatus, StatsSnapshot};
