//! hintfed transports.
#![forbid(unsafe_code)]

pub mod error;
pub mod hub;
pub mod link;

pub use error::{RequestError, SendError, TransportError};
pub use hub::{Channel, HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, RouterMessage};
pub use link::{Backoff, BackoffConfig, Frames, Limits, LinkStats, LinkStatus, StatsSnapshot};
pub mod req;
pub mod sub;
pub use req::{ReqClient, ReqClientConfig};
pub use sub::{SubClient, SubClientConfig};
