//! The client: call any service of the mesh by name.
//!
//! A call resolves the service in the registry, lets the selector pick a node (filters,
//! strategy, pinned peer), connects, and exchanges frames of the RPC transport. Every outcome
//! and latency goes back to the selector. Retries go to another node and happen only when they
//! are safe by default: the connection could not be made, the request could not be sent, or
//! the node answered 503. Errors say which phase failed and which peer was tried.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use micromesh::{Context, Status, client::CallOptions, testing::{Cluster, wait_until}};
//!
//! async fn echo(_: Context, text: String) -> Result<String, Status> {
//!     Ok(text)
//! }
//!
//! // Member 1 serves `Echo.Say` and registers itself (as `member-1`).
//! let cluster = Cluster::builder()
//!     .size(2)
//!     .configure(|i, b| if i == 1 { b.register(true).handle("Echo.Say", echo) } else { b })
//!     .build()
//!     .await?;
//! let registry = cluster.service(0).registry().clone();
//! wait_until(Duration::from_secs(10), || async { registry.get_service("member-1").await.is_ok() }).await?;
//!
//! let client = cluster.service(0).client();
//! let options = CallOptions::default().timeout(Duration::from_secs(5));
//! let reply: String = client.call_with("member-1", "Echo.Say", &"hi", options).await?;
//! assert_eq!(reply, "hi");
//! cluster.shutdown().await?;
//! # Ok(()) }
//! ```

mod call;
mod pool;
mod stream;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

pub use self::stream::CallStream;
use crate::{
    Metadata, PeerId, Status,
    codec::ContentType,
    node::Node,
    registry::{self, Registry},
    selector::{self, Filter, SelectOptions, Selector, Strategy},
    status::Code,
    transport,
};

/// The phase of a call in which an error arose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Encoding the request.
    Encode,
    /// Looking the service up in the registry.
    Resolve,
    /// Picking a node.
    Select,
    /// Connecting to the node and opening the call's stream.
    Dial,
    /// Sending the request.
    Send,
    /// Receiving the response.
    Receive,
    /// The node answered with an error status.
    Remote,
}

/// Errors of a call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request could not be encoded, or is larger than the transport allows.
    #[error("cannot send the request: {0}")]
    Encode(String),
    /// The service could not be found.
    #[error("cannot resolve service {service:?}: {source}")]
    Resolve {
        /// The service.
        service: String,
        /// The registry's error.
        source: registry::Error,
    },
    /// No node could be picked.
    #[error("cannot pick a node: {0}")]
    Select(#[from] selector::Error),
    /// Connecting to the peer or opening the stream failed.
    #[error("cannot reach {peer}: {reason}")]
    Dial {
        /// The peer tried.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Sending the request failed (it may not have arrived).
    #[error("sending to {peer} failed: {reason}")]
    Send {
        /// The peer tried.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Receiving the response failed (the request may have been handled).
    #[error("receiving from {peer} failed: {reason}")]
    Receive {
        /// The peer tried.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The node answered with an error status.
    #[error("{peer} answered {status}")]
    Remote {
        /// The peer that answered.
        peer: PeerId,
        /// Its status (boxed: it keeps every `Result` of a call small).
        status: Box<Status>,
    },
    /// The deadline passed.
    #[error("the call timed out after {after:?}{}", peer.map(|p| format!(" (last tried {p})")).unwrap_or_default())]
    Timeout {
        /// The last peer tried, if any.
        peer: Option<PeerId>,
        /// The call's time budget.
        after: Duration,
    },
}

impl Error {
    /// The phase in which the call failed.
    pub fn phase(&self) -> Phase {
        match self {
            Self::Encode(_) => Phase::Encode,
            Self::Resolve { .. } => Phase::Resolve,
            Self::Select(_) => Phase::Select,
            Self::Dial { .. } => Phase::Dial,
            Self::Send { .. } => Phase::Send,
            Self::Receive { .. } | Self::Timeout { .. } => Phase::Receive,
            Self::Remote { .. } => Phase::Remote,
        }
    }

    /// The peer tried, if the call got that far.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            Self::Dial { peer, .. }
            | Self::Send { peer, .. }
            | Self::Receive { peer, .. }
            | Self::Remote { peer, .. } => Some(*peer),
            Self::Timeout { peer, .. } => *peer,
            _ => None,
        }
    }

    /// The error as a status: the remote one, or the closest code for a local failure.
    pub fn status(&self) -> Status {
        let local = match self {
            Self::Remote { status, .. } => return (**status).clone(),
            Self::Encode(detail) => Status::bad_request(detail.clone()),
            Self::Resolve { .. } | Self::Select(_) => Status::not_found(self.to_string()),
            Self::Timeout { .. } => Status::timeout(self.to_string()),
            Self::Dial { .. } | Self::Send { .. } | Self::Receive { .. } => {
                Status::unavailable(self.to_string())
            }
        };
        local.with_id("micromesh.client")
    }

    /// The default retry rule: only what cannot have run twice on a server, or was refused
    /// by it: no connection, a request that was not sent, a 503 or 429 answer.
    pub fn is_safe_to_retry(&self) -> bool {
        match self {
            Self::Dial { .. } | Self::Send { .. } => true,
            Self::Remote { status, .. } => {
                matches!(status.code(), Code::Unavailable | Code::TooManyRequests)
            }
            _ => false,
        }
    }
}

type RetryRule = Arc<dyn Fn(&Error) -> bool + Send + Sync>;

/// Options of one call. Every setter's default is given in its doc.
#[derive(Clone)]
pub struct CallOptions {
    pub(crate) timeout: Duration,
    pub(crate) deadline: Option<Instant>,
    pub(crate) connect_timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) retry: RetryRule,
    pub(crate) content_type: ContentType,
    pub(crate) metadata: Metadata,
    pub(crate) peer: Option<PeerId>,
    pub(crate) select: SelectOptions,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            deadline: None,
            connect_timeout: Duration::from_secs(5),
            retries: 2,
            backoff: Duration::from_millis(20),
            retry: Arc::new(Error::is_safe_to_retry),
            content_type: ContentType::Cbor,
            metadata: Metadata::new(),
            peer: None,
            select: SelectOptions::default(),
        }
    }
}

impl fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallOptions")
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .field("retries", &self.retries)
            .field("content_type", &self.content_type)
            .field("metadata", &self.metadata)
            .field("peer", &self.peer)
            .field("select", &self.select)
            .finish_non_exhaustive()
    }
}

impl CallOptions {
    /// The whole call's time budget, retries included. Default is 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// An absolute deadline; the earlier of it and the timeout wins. Default is none.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// How long connecting and opening the stream may take per attempt (a slower one counts
    /// as a dial failure, which is retried). Default is 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times to retry, each on another node when there is one. Default is 2.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait before the first retry; it doubles for each further one. Default is 20 ms.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Which errors to retry. Default is [`Error::is_safe_to_retry`].
    pub fn retry_if(mut self, rule: impl Fn(&Error) -> bool + Send + Sync + 'static) -> Self {
        self.retry = Arc::new(rule);
        self
    }

    /// The codec of the request (and so of the response). Default is CBOR.
    pub fn content_type(mut self, content_type: ContentType) -> Self {
        self.content_type = content_type;
        self
    }

    /// Adds a metadata entry sent with the call.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Calls this peer, whatever the selector would pick. Default is none.
    pub fn peer(mut self, peer: PeerId) -> Self {
        self.peer = Some(peer);
        self
    }

    /// The selector strategy. Default is [`Strategy::LatencyWeighted`].
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.select.strategy = strategy;
        self
    }

    /// Adds a selector filter.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.select.filters.push(filter);
        self
    }

    pub(crate) fn deadline_from(&self, now: Instant) -> Instant {
        let by_timeout = now + self.timeout;
        self.deadline.map_or(by_timeout, |d| d.min(by_timeout))
    }
}

pub(crate) struct Inner {
    pub(crate) node: Node,
    pub(crate) registry: Registry,
    pub(crate) selector: Selector,
    pub(crate) config: transport::Config,
    pub(crate) pool: Arc<pool::Pool>,
    /// Latency and calls in flight by service, endpoint and status (`rpc_client_*`).
    pub(crate) calls: transport::metrics::CallMetrics,
    /// Peer ids as text, for the `peer` of call spans: base58 costs a microsecond each time.
    peer_texts: std::sync::Mutex<std::collections::HashMap<PeerId, Arc<str>>>,
}

/// The most peer ids a client keeps as text.
const PEER_TEXTS: usize = 4096;

impl Inner {
    /// `peer` as text, from the cache when it is there.
    pub(crate) fn peer_text(&self, peer: PeerId) -> Arc<str> {
        let mut texts = self
            .peer_texts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(text) = texts.get(&peer) {
            return text.clone();
        }
        if texts.len() >= PEER_TEXTS {
            texts.clear();
        }
        let text: Arc<str> = peer.to_string().into();
        texts.insert(peer, text.clone());
        text
    }
}

/// Calls services of the mesh. Cheap to clone. From `service.client()`.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer_id", &self.inner.node.peer_id())
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn new(
        node: Node,
        registry: Registry,
        selector: Selector,
        config: transport::Config,
    ) -> Self {
        let calls = {
            let registry = node.metrics_registry();
            let mut registry = registry.lock().unwrap_or_else(|e| e.into_inner());
            transport::metrics::CallMetrics::register(
                &mut registry,
                transport::metrics::Side::Client,
                config.call_metrics,
            )
        };
        Self {
            inner: Arc::new(Inner {
                calls,
                pool: pool::Pool::new(config.idle_timeout, &node),
                node,
                registry,
                selector,
                config,
                peer_texts: Default::default(),
            }),
        }
    }
}
