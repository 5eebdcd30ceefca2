//! The node: one libp2p swarm, owned by one task, driven through a cloneable handle.
//!
//! [`Node`] is the mesh underneath every component. A single tokio task (the event loop) owns
//! the libp2p `Swarm` with all its protocols: identify, ping, Kademlia, gossipsub, streams,
//! AutoNAT, relay (client and server), DCUtR, UPnP, mDNS and connection limits. Everything
//! else talks to that task through a [`Node`] handle, which sends commands over a bounded
//! channel and awaits the replies. When the event loop ends, for whatever reason, every handle
//! reports the same cause ([`Error::Stopped`]).
//!
//! Most programs never touch a `Node` directly: [`Service`](crate::Service) builds one and
//! its components use it. It is public for programs that want the mesh itself: peers,
//! addresses, raw gossip and the DHT's provider records.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), micromesh::node::Error> {
//! use micromesh::node::{Node, Preset};
//!
//! let a = Node::builder().preset(Preset::Local).build().await?;
//! let b = Node::builder().preset(Preset::Local).build().await?;
//! let addr = a.listen_addrs().await?.remove(0);
//! assert_eq!(b.dial(addr).await?, a.peer_id());
//! assert!(b.peers().await?.iter().any(|p| p.peer_id == a.peer_id()));
//! a.shutdown().await;
//! b.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Across NATs
//!
//! With [`Preset::Production`] a node finds out by itself whether peers can dial it (AutoNAT,
//! asking connected peers to dial it back) and acts on the answer, with no server to configure:
//!
//! - a node found publicly reachable offers circuit-relay service to the others
//!   ([`Builder::relay_server`]) and serves the DHT;
//! - a node not found reachable reserves a slot on up to two connected peers that offer relay
//!   service ([`Builder::auto_relays`]) and listens on their `/p2p-circuit` addresses, which
//!   its registry announcements carry; a relay that leaves is replaced;
//! - a peer that reaches it through a relay is upgraded to a direct connection by hole
//!   punching (DCUtR) when the two NATs allow it, and calls move to the direct connection as
//!   soon as it exists.
//!
//! The repository's NAT lab (`simulations`, `nat-lab`) measures this across Linux network
//! namespaces with NAT routers of several kinds; the README has its matrix.

mod behaviour;
mod config;
mod dial_error;
mod event_loop;
pub(crate) mod frame;
pub mod gossip;
mod keep_alive;
mod metrics;
pub(crate) mod records;
mod relay_service;
mod relays;
mod scoring;
pub(crate) mod streams;
mod tasks;
mod validation;

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use libp2p::{StreamProtocol, swarm::ConnectionId};
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::Instrument as _;

pub use self::{
    config::{Builder, DEFAULT_NETWORK, DhtMode, MAX_NETWORK_LEN, PreSharedKey, Preset},
    gossip::{Message, Subscription},
    tasks::TaskPanic,
};
use crate::{Identity, Multiaddr, PeerId, identity};

/// Errors of the node and of the operations on its handle.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event loop has ended; every handle of this node now returns this error.
    #[error("the node has stopped: {0}")]
    Stopped(ExitReason),
    /// A setting is invalid.
    #[error("invalid node configuration: {0}")]
    InvalidConfig(String),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(Arc<identity::Error>),
    /// This node's record store refused a record it was asked to publish.
    #[error("this node's record store refused the record: {0}")]
    RecordRefused(String),
    /// A DHT write reached fewer peers than its quorum.
    #[error("the record reached {reached} of the {quorum} peers it needed")]
    Quorum {
        /// Peers that acknowledged the record.
        reached: usize,
        /// Peers needed.
        quorum: usize,
    },
    /// The auth configuration is not usable (a grant for another peer, too many grants).
    #[error("invalid auth configuration: {0}")]
    Auth(#[from] crate::auth::Error),
    /// The transports or a protocol could not be set up.
    #[error("cannot set up {what}")]
    Transport {
        /// What could not be set up: "the TCP transport", "mDNS", ….
        what: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// An address could not be listened on; the source says why.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        #[source]
        source: Cause,
    },
    /// A dial failed.
    #[error("cannot connect to {addr}: {reason}")]
    Dial {
        /// The address dialled.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A dial did not complete within the dial timeout.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    DialTimeout {
        /// The address dialled.
        addr: Multiaddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The node is connected to no peer of its network, so the mesh cannot be asked; says why
    /// (no bootstrap peer given, or why the bootstrap peers could not be reached).
    #[error("this node knows no peers of its network: {0}")]
    NoKnownPeers(String),
    /// A peer could not be found in the DHT.
    #[error("peer {0} was not found in the DHT")]
    PeerNotFound(PeerId),
    /// A DHT operation failed.
    #[error("the DHT {operation} failed")]
    Dht {
        /// The operation: "bootstrap", "provider announcement", "provider lookup".
        operation: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// A topic name is invalid.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The event loop dropped a request without answering it (a bug in micromesh): the
    /// request failed, the node goes on.
    #[error("the node dropped the request without answering it")]
    NoReply,
    /// A gossip message could not be published.
    #[error("cannot publish on {topic:?}: {reason}")]
    Publish {
        /// The topic.
        topic: String,
        /// Why.
        reason: PublishError,
    },
}

/// The cause of an error, from below micromesh (libp2p, the operating system) or a plain
/// explanation: the [`source`](std::error::Error::source) of the node's errors that have one.
/// Shared, since every handle waiting on an operation gets the same error; it dereferences to
/// the error itself, which is what `source()` returns, so it can be downcast.
///
/// ```
/// use micromesh::node;
///
/// let error = node::Error::Listen {
///     addr: "/ip4/127.0.0.1/tcp/4001".parse()?,
///     source: node::Cause::new(std::io::Error::from(std::io::ErrorKind::AddrInUse)),
/// };
/// let in_use = std::error::Error::source(&error)
///     .and_then(|cause| cause.downcast_ref::<std::io::Error>())
///     .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse);
/// assert!(in_use);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    /// Wraps an error, or explains in words.
    ///
    /// ```
    /// let cause = micromesh::node::Cause::new("no address reported in time");
    /// assert_eq!(cause.to_string(), "no address reported in time");
    /// ```
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(Arc::from(error.into()))
    }
}

impl std::ops::Deref for Cause {
    type Target = dyn std::error::Error + Send + Sync + 'static;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// Why a gossip publish failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No connected peer is subscribed to the topic: the message would reach nobody.
    #[error("no connected peer is subscribed to the topic")]
    NoSubscribers,
    /// The message is larger than the network allows.
    #[error("the message is {size} bytes, the limit is {max} bytes")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The same message was published moments ago.
    #[error("an identical message was already published")]
    Duplicate,
    /// Every connection's send queue is full.
    #[error("every peer's send queue is full; try again later")]
    QueuesFull,
    /// Anything else gossipsub reported.
    #[error("{0}")]
    Other(String),
}

/// Why a node's event loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// [`Node::shutdown`] was called.
    Shutdown,
    /// Every handle was dropped.
    HandlesDropped,
    /// The event loop panicked: a bug in micromesh or libp2p.
    Panicked(String),
    /// The event loop task was aborted (its runtime shut down, or a test killed the node).
    Aborted,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown => f.write_str("it was shut down"),
            Self::HandlesDropped => f.write_str("every handle to it was dropped"),
            Self::Panicked(msg) => write!(f, "its event loop panicked: {msg}"),
            Self::Aborted => f.write_str("its event loop was aborted"),
        }
    }
}

/// Something that happened to the node, from [`Node::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The first connection to a peer was established.
    PeerConnected {
        /// The peer.
        peer_id: PeerId,
        /// The remote address of the connection.
        address: Multiaddr,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer_id: PeerId,
    },
    /// A peer told us who it is (identify). `same_network` says whether it speaks this node's
    /// network protocols.
    PeerIdentified {
        /// The peer.
        peer_id: PeerId,
        /// Whether it belongs to this node's network.
        same_network: bool,
    },
    /// The node listens on a new address (with its `/p2p/<peer id>` suffix).
    ListenAddr {
        /// The address.
        address: Multiaddr,
    },
    /// A ping measured the round trip to a peer.
    PeerRtt {
        /// The peer.
        peer_id: PeerId,
        /// The round-trip time.
        rtt: Duration,
    },
    /// The node stopped listening on an address.
    ListenAddrExpired {
        /// The address.
        address: Multiaddr,
    },
    /// An address was confirmed to reach this node from outside (see
    /// [`Node::external_addrs`]), or one such stopped being confirmed.
    ExternalAddrsChanged,
    /// A connected peer told this node it subscribes to a gossip topic of the network (as
    /// gossipsub learns it, on connect and on every change). Topics starting with `_` are
    /// micromesh's own (the registry, queue-group membership).
    PeerSubscribed {
        /// The peer.
        peer_id: PeerId,
        /// The topic, without the network prefix.
        topic: String,
    },
    /// A peer said it is leaving the mesh (it stops gracefully): it is out of the DHT routing
    /// table and its provider records are gone. Its connections close next.
    PeerLeft {
        /// The peer.
        peer_id: PeerId,
    },
    /// A connected peer unsubscribed from a gossip topic of the network.
    PeerUnsubscribed {
        /// The peer.
        peer_id: PeerId,
        /// The topic, without the network prefix.
        topic: String,
    },
}

/// What the node knows about a connected peer, from [`Node::peers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: PeerId,
    /// The remote addresses of the open connections.
    pub addresses: Vec<Multiaddr>,
    /// The last round-trip time measured by ping.
    pub rtt: Option<Duration>,
    /// The peer's agent string (program and version), once identified.
    pub agent: Option<String>,
    /// Whether the peer speaks this node's network protocols (`None` until identified).
    pub same_network: Option<bool>,
}

/// A peer in the DHT routing table, from [`Node::dht_peers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DhtPeer {
    /// The peer.
    pub peer_id: PeerId,
    /// The addresses the routing table holds for it.
    pub addresses: Vec<Multiaddr>,
}

/// A copy of a DHT record and the peer that held it (`None`: this node).
#[derive(Debug, Clone)]
pub(crate) struct FoundRecord {
    pub(crate) peer: Option<PeerId>,
    pub(crate) value: Vec<u8>,
}

/// Commands from handles to the event loop.
pub(crate) enum Command {
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ExternalAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    },
    Probe {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    DhtPeers {
        reply: oneshot::Sender<Vec<DhtPeer>>,
    },
    FindPeer {
        peer: PeerId,
        reply: oneshot::Sender<Result<Vec<Multiaddr>, Error>>,
    },
    Bootstrap {
        reply: oneshot::Sender<Result<(), Error>>,
    },
    PutRecord {
        key: Vec<u8>,
        value: Vec<u8>,
        quorum: usize,
        /// `false`: send to the closest known peers without storing (or checking) locally;
        /// for fault injection in tests.
        checked: bool,
        reply: oneshot::Sender<Result<usize, Error>>,
    },
    GetRecord {
        key: Vec<u8>,
        want: usize,
        reply: oneshot::Sender<Result<Vec<FoundRecord>, Error>>,
    },
    /// Sends a record to these peers without storing it locally, answering nobody.
    PutRecordTo {
        key: Vec<u8>,
        value: Vec<u8>,
        peers: Vec<PeerId>,
    },
    Provide {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    StopProviding {
        key: Vec<u8>,
    },
    Providers {
        key: Vec<u8>,
        reply: ProvidersReply,
    },
    Subscribe {
        topic: String,
        subscriber: gossip::Subscriber,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        topic: String,
        id: u64,
    },
    Publish {
        topic: String,
        /// The signed frame.
        frame: Vec<u8>,
        /// The payload's size, for errors.
        size: usize,
        /// How many connected peers are subscribed to the topic.
        reply: oneshot::Sender<Result<usize, Error>>,
    },
    TopicPeers {
        topic: String,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    TopicsWithPrefix {
        prefix: String,
        reply: oneshot::Sender<Vec<(String, PeerId)>>,
    },
    SetValidator {
        topic: String,
        validator: Option<gossip::Validator>,
    },
    GossipScore {
        peer: PeerId,
        reply: oneshot::Sender<Option<f64>>,
    },
    KeepAlive {
        peer: PeerId,
        keep: bool,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// How a provider lookup answers.
pub(crate) enum ProvidersReply {
    /// Every provider, once the lookup ends.
    All(oneshot::Sender<Result<Vec<PeerId>, Error>>),
    /// Each provider as soon as the DHT names it; an error instead if the lookup cannot run.
    /// The channel closes when the lookup ends, and closing it ends the lookup.
    Each(mpsc::Sender<Result<PeerId, Error>>),
}

/// How long a request whose reply was dropped waits to learn whether the node is stopping.
const REPLY_GRACE: Duration = Duration::from_millis(100);

/// How many providers a streamed lookup queues for a reader that has not taken them yet.
const PROVIDERS_QUEUE: usize = 64;

pub(crate) struct Inner {
    pub(crate) commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    network: String,
    identity: Identity,
    /// Only the event loop holds the sender, so every receiver sees the channel close when the
    /// loop ends; new receivers are made from this one.
    events: broadcast::Receiver<Event>,
    exit: watch::Receiver<Option<ExitReason>>,
    metrics: Arc<Mutex<Registry>>,
    next_subscription: AtomicU64,
    /// The sequence number of this node's next gossip message.
    gossip_sequence: AtomicU64,
    subscription_queue: usize,
    abort: tokio::task::AbortHandle,
    opener: streams::Opener,
    acceptor: streams::Acceptor,
    /// The peers with an open connection, kept by the event loop, read without asking it.
    connected: Arc<std::sync::RwLock<std::collections::HashSet<PeerId>>>,
    auth: crate::auth::Auth,
    tasks: tasks::Tasks,
}

/// A handle to a running node. Cheap to clone; every clone drives the same node.
///
/// The node stops when [`Node::shutdown`] is called or when every handle has been dropped.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.inner.peer_id)
            .field("network", &self.inner.network)
            .finish_non_exhaustive()
    }
}

/// A handle that does not keep its node alive, for what the node itself holds (a component
/// attached to it): a strong [`Node`] there would be a cycle, and the node would never be freed.
#[derive(Clone)]
pub(crate) struct WeakNode(std::sync::Weak<Inner>);

impl WeakNode {
    /// The node, unless every strong handle is gone.
    pub(crate) fn upgrade(&self) -> Option<Node> {
        self.0.upgrade().map(|inner| Node { inner })
    }
}

impl Node {
    /// A handle that does not keep the node alive.
    pub(crate) fn downgrade(&self) -> WeakNode {
        WeakNode(Arc::downgrade(&self.inner))
    }

    /// A builder with the production preset; see [`Builder`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    async fn start(mut config: config::Config) -> Result<Self, Error> {
        config.validate()?;
        let identity = config.resolve_identity()?;
        let peer_id = identity.peer_id();
        let mut registry = Registry::default();
        let node_metrics =
            metrics::NodeMetrics::register(registry.sub_registry_with_prefix("micromesh"));
        let (streams, opener, acceptor) =
            streams::Behaviour::new(node_metrics.inbound_streams_dropped.clone());
        let leaves = acceptor
            .accept(behaviour::leave_protocol(&config.network))
            .expect("the node's own protocol is accepted first");
        let connected = Arc::new(std::sync::RwLock::new(std::collections::HashSet::new()));
        let auth = match config.auth_component.take() {
            Some(auth) => auth,
            None => crate::auth::Auth::new(peer_id, config.network.clone(), config.auth.clone())?,
        };
        auth.register_metrics(registry.sub_registry_with_prefix("micromesh_auth"));
        let records = config
            .take_records()
            .unwrap_or_else(|| Box::new(records::ProvidersOnly::new(peer_id)));
        let libp2p_registry = registry.sub_registry_with_prefix("libp2p");
        let swarm = behaviour::build_swarm(
            identity.keypair().clone(),
            &config,
            libp2p_registry,
            streams,
            records::Store(records),
        )?;
        let libp2p_metrics = libp2p::metrics::Metrics::new(libp2p_registry);

        let span =
            tracing::info_span!("node", peer = %short_id(&peer_id), network = %config.network);
        let tasks = tasks::Tasks::new(span.clone());
        let (commands, command_rx) = mpsc::channel(config.command_queue);
        let (events_tx, events) = broadcast::channel(config.event_queue);
        let (exit_tx, exit) = watch::channel(None);
        let metrics = Arc::new(Mutex::new(registry));

        let mut event_loop = event_loop::EventLoop::new(
            swarm,
            &config,
            event_loop::Wiring {
                commands: command_rx,
                events: events_tx,
                metrics: libp2p_metrics,
                metrics_local: node_metrics,
                connected: connected.clone(),
                opener: opener.clone(),
                leaves,
                tasks: tasks.clone(),
            },
        );
        event_loop.start(&config).await?;

        let task = tokio::spawn(event_loop.run().instrument(span));
        let abort = task.abort_handle();
        let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
        tokio::spawn(tasks.clone().supervise(async move {
            let _ = stopped_rx.await;
        }));
        tokio::spawn(async move {
            let reason = match task.await {
                Ok(reason) => reason,
                Err(e) if e.is_panic() => {
                    let msg = tasks::panic_message(e.into_panic());
                    tracing::error!(%peer_id, "node event loop panicked: {msg}");
                    ExitReason::Panicked(msg)
                }
                Err(_) => ExitReason::Aborted,
            };
            // Every component's task ends with the node.
            let _ = stopped_tx.send(());
            let _ = exit_tx.send(Some(reason));
        });

        Ok(Self {
            inner: Arc::new(Inner {
                commands,
                peer_id,
                network: config.network.clone(),
                identity,
                events,
                exit,
                metrics,
                next_subscription: AtomicU64::new(0),
                gossip_sequence: AtomicU64::new(first_gossip_sequence()),
                subscription_queue: config.subscription_queue,
                abort,
                opener,
                acceptor,
                connected,
                auth,
                tasks,
            }),
        })
    }

    /// Accepts inbound streams of a component's `protocol` from now on, and returns them as
    /// they arrive with the peer that opened each. Streams of a protocol nobody accepts are
    /// refused in negotiation.
    ///
    /// # Errors
    ///
    /// When the protocol is accepted already by a component that still reads its streams.
    pub(crate) fn accept(
        &self,
        protocol: StreamProtocol,
    ) -> Result<streams::Incoming, streams::AlreadyAccepted> {
        self.inner.acceptor.accept(protocol)
    }

    /// Runs `task` for `component` until it ends or the node stops, inside a span naming the
    /// node and the component. A panic is logged and remembered ([`Node::task_panics`]).
    pub(crate) fn spawn_task<F>(&self, component: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(component, task);
    }

    /// The background tasks of this node and its components that panicked: each is a bug,
    /// logged when it happens. `testing::Cluster` (feature `testing`) fails a test on any.
    pub fn task_panics(&self) -> Vec<TaskPanic> {
        self.inner.tasks.panics()
    }

    /// The peers with an open connection, without a round trip to the event loop.
    pub(crate) fn connected_peers(&self) -> Vec<PeerId> {
        self.inner
            .connected
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// The node's auth component: its policy, grants, and the revocations it knows.
    pub fn auth(&self) -> &crate::auth::Auth {
        &self.inner.auth
    }

    /// This node's peer id: its identity on the mesh.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The identity (key pair) of this node.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The network this node belongs to.
    pub fn network(&self) -> &str {
        &self.inner.network
    }

    /// Why the node stopped, or `None` while it runs.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.inner.exit.borrow().clone()
    }

    /// Waits until the node has stopped, and returns why.
    pub async fn stopped(&self) -> ExitReason {
        let mut exit = self.inner.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().expect("waited for Some"),
            // The supervisor always sends before it ends; a closed channel means it was dropped
            // with the runtime.
            Err(_) => ExitReason::Aborted,
        }
    }

    async fn stopped_error(&self) -> Error {
        Error::Stopped(self.stopped().await)
    }

    /// Sends a command built around a reply channel and awaits the reply.
    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        if self.inner.commands.send(command(reply)).await.is_err() {
            return Err(self.stopped_error().await);
        }
        match rx.await {
            Ok(value) => Ok(value),
            // The loop dropped the reply: it is stopping (then it says why within moments), or
            // it lost the request, which must fail now rather than when the node stops.
            Err(_) => match tokio::time::timeout(REPLY_GRACE, self.stopped()).await {
                Ok(reason) => Err(Error::Stopped(reason)),
                Err(_) => Err(Error::NoReply),
            },
        }
    }

    /// The addresses this node listens on, each ending in `/p2p/<peer id>`.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.request(|reply| Command::ListenAddrs { reply }).await
    }

    /// The addresses confirmed to reach this node from outside, each ending in
    /// `/p2p/<peer id>`: found reachable by AutoNAT, mapped by UPnP, or given with
    /// [`Builder::external_address`]. Behind a NAT that lets peers in (a port forward, a
    /// full-cone NAT) these are the router's addresses, not the ones the node listens on.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), micromesh::node::Error> {
    /// use micromesh::node::{Node, Preset};
    ///
    /// let advertised: micromesh::Multiaddr = "/memory/424242".parse().unwrap();
    /// let node = Node::builder()
    ///     .preset(Preset::Local)
    ///     .external_address(advertised.clone())
    ///     .build()
    ///     .await?;
    /// let external = node.external_addrs().await?;
    /// assert_eq!(external, [advertised.with_p2p(node.peer_id()).unwrap()]);
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn external_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.request(|reply| Command::ExternalAddrs { reply }).await
    }

    /// Connects to `addr` (or returns at once if already connected to the peer it names) and
    /// keeps the connection open while the node runs. Returns the peer reached.
    ///
    /// # Errors
    ///
    /// [`Error::Dial`] if the connection fails or reaches a different peer than the address
    /// names, [`Error::DialTimeout`] after the dial timeout.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, Error> {
        self.request(|reply| Command::Dial { addr, reply }).await?
    }

    /// Connects to `peer` (at `addrs`, or wherever the node already knows it to be) without
    /// keeping the connection: to check that a peer is alive. Returns at once when connected.
    pub(crate) async fn probe(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), Error> {
        self.request(|reply| Command::Probe { peer, addrs, reply })
            .await?
            .map(drop)
    }

    /// Whether the node has an open connection to `peer`, without a round trip to the event
    /// loop.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.inner
            .connected
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// How many peers the node has an open connection to, without a round trip to the event
    /// loop.
    pub fn connected_count(&self) -> usize {
        self.inner
            .connected
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Opens a stream of one of micromesh's protocols on the best connection to `peer` (direct
    /// before relayed, newest first). The node must be connected to the peer.
    pub(crate) async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, streams::OpenError> {
        Ok(self.inner.opener.open(peer, protocol).await?.0)
    }

    /// As [`Node::open_stream`], and says on which connection the stream was opened.
    pub(crate) async fn open_stream_on_best(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<(libp2p::Stream, ConnectionId), streams::OpenError> {
        self.inner.opener.open(peer, protocol).await
    }

    /// The connection to `peer` that [`Node::open_stream`] would use now, if any: streams
    /// kept open on another one are no longer on the best path.
    pub(crate) fn best_connection(&self, peer: &PeerId) -> Option<ConnectionId> {
        self.inner.opener.best(peer)
    }

    /// The connected peers, with their addresses and last ping round trip.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, Error> {
        self.request(|reply| Command::Peers { reply }).await
    }

    /// The peers in this node's DHT routing table, with the addresses the table holds for them.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn dht_peers(&self) -> Result<Vec<DhtPeer>, Error> {
        self.request(|reply| Command::DhtPeers { reply }).await
    }

    /// Looks `peer` up in the DHT and returns the addresses it can be reached at.
    ///
    /// # Errors
    ///
    /// [`Error::PeerNotFound`] if the lookup ends without finding it, [`Error::NoKnownPeers`]
    /// if the node knows nobody to ask.
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<Multiaddr>, Error> {
        self.request(|reply| Command::FindPeer { peer, reply })
            .await?
    }

    /// Runs a DHT bootstrap (a lookup of this node's own id, then of random ids per bucket)
    /// and waits for it to finish. The node also does this by itself after its first
    /// connection and periodically.
    ///
    /// # Errors
    ///
    /// [`Error::NoKnownPeers`] if the node has no peers to start from.
    pub async fn bootstrap(&self) -> Result<(), Error> {
        self.request(|reply| Command::Bootstrap { reply }).await?
    }

    /// Announces in the DHT that this node provides `key` (a provider record), and keeps
    /// re-announcing it while the node runs.
    ///
    /// # Errors
    ///
    /// [`Error::Dht`] if the local record store is full.
    pub async fn provide(&self, key: impl Into<Vec<u8>>) -> Result<(), Error> {
        let key = key.into();
        self.request(|reply| Command::Provide { key, reply })
            .await?
    }

    /// As [`Node::provide`], without waiting for the announcement to reach other peers: the
    /// event loop takes the command (and stores the record locally) before any command sent
    /// after this returns. Failures of the announcement are not reported; the DHT republishes
    /// provider records periodically.
    pub(crate) async fn start_providing(&self, key: Vec<u8>) -> Result<(), Error> {
        let (reply, _ignored) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Provide { key, reply })
            .await
            .is_err()
        {
            return Err(self.stopped_error().await);
        }
        Ok(())
    }

    /// Stores a record locally and on the closest peers to its key; succeeds once `quorum`
    /// of them (fewer if the routing table holds fewer peers) acknowledged it, and returns how
    /// many that was (0 when the node knows no peers: the record is then only local).
    pub(crate) async fn put_record(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        quorum: usize,
    ) -> Result<usize, Error> {
        self.put(key, value, quorum, true).await
    }

    /// Sends a record to the closest known peers without storing or checking it locally.
    #[cfg(feature = "testing")]
    pub(crate) async fn put_record_unchecked(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        quorum: usize,
    ) -> Result<usize, Error> {
        self.put(key, value, quorum, false).await
    }

    async fn put(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        quorum: usize,
        checked: bool,
    ) -> Result<usize, Error> {
        self.request(|reply| Command::PutRecord {
            key,
            value,
            quorum,
            checked,
            reply,
        })
        .await?
    }

    /// Looks a record up in the DHT and returns the copies found: the local one first, if
    /// any, and other peers' until `want` of those were found or the lookup ends.
    pub(crate) async fn get_records(
        &self,
        key: Vec<u8>,
        want: usize,
    ) -> Result<Vec<FoundRecord>, Error> {
        self.request(|reply| Command::GetRecord { key, want, reply })
            .await?
    }

    /// Sends a record to `peers` (read repair: they returned an older copy); does not wait.
    pub(crate) async fn put_record_to(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        peers: Vec<PeerId>,
    ) -> Result<(), Error> {
        self.inner
            .commands
            .send(Command::PutRecordTo { key, value, peers })
            .await
            .map_err(|_| Error::Stopped(self.exit_reason().unwrap_or(ExitReason::Aborted)))
    }

    /// Stops announcing `key`.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn stop_providing(&self, key: impl Into<Vec<u8>>) -> Result<(), Error> {
        let key = key.into();
        self.inner
            .commands
            .send(Command::StopProviding { key })
            .await
            .map_err(|_| Error::Stopped(self.exit_reason().unwrap_or(ExitReason::Aborted)))
    }

    /// Finds the peers that provide `key`.
    ///
    /// # Errors
    ///
    /// [`Error::NoKnownPeers`] if the node knows nobody to ask, [`Error::Dht`] if the query
    /// fails.
    pub async fn providers(&self, key: impl Into<Vec<u8>>) -> Result<Vec<PeerId>, Error> {
        let key = key.into();
        self.request(|reply| Command::Providers {
            key,
            reply: ProvidersReply::All(reply),
        })
        .await?
    }

    /// Finds the peers that provide `key`, handing each over as soon as the DHT names it
    /// (this node's own records first): a reader can act on the first provider without
    /// waiting for the lookup to end, which takes until every peer asked has answered or its
    /// dial has failed. The stream ends when the lookup does; dropping it ends the lookup.
    /// An item is an error (the last one) if the lookup cannot run.
    pub(crate) async fn providers_as_found(
        &self,
        key: Vec<u8>,
    ) -> Result<mpsc::Receiver<Result<PeerId, Error>>, Error> {
        let (found, providers) = mpsc::channel(PROVIDERS_QUEUE);
        let command = Command::Providers {
            key,
            reply: ProvidersReply::Each(found),
        };
        if self.inner.commands.send(command).await.is_err() {
            return Err(self.stopped_error().await);
        }
        Ok(providers)
    }

    /// Subscribes to a gossip topic of this node's network.
    ///
    /// Messages from every peer (this node's own publishes excluded) are queued on the returned
    /// [`Subscription`], whose queue is bounded; see [`Builder::subscription_queue`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopic`] for an empty, too long or reserved topic name.
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, Error> {
        gossip::check_user_topic(topic).map_err(|reason| Error::InvalidTopic {
            topic: topic.into(),
            reason,
        })?;
        self.subscribe_unchecked(topic).await
    }

    pub(crate) async fn subscribe_unchecked(&self, topic: &str) -> Result<Subscription, Error> {
        self.subscribe_with_capacity(topic, self.inner.subscription_queue)
            .await
    }

    /// Subscribes to any topic of the network with a queue of `capacity` messages.
    pub(crate) async fn subscribe_with_capacity(
        &self,
        topic: &str,
        capacity: usize,
    ) -> Result<Subscription, Error> {
        let (queue_tx, queue) = mpsc::channel(capacity.max(1));
        let id = self.inner.next_subscription.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        let subscriber = gossip::Subscriber {
            id,
            queue: queue_tx,
            dropped: dropped.clone(),
        };
        let topic = topic.to_owned();
        let subscription = Subscription {
            topic: topic.clone(),
            id,
            queue,
            dropped,
            node: self.clone(),
        };
        self.request(|reply| Command::Subscribe {
            topic,
            subscriber,
            reply,
        })
        .await??;
        Ok(subscription)
    }

    /// Publishes `data` on a gossip topic of this node's network, signed by this node. Returns
    /// how many connected peers subscribe to the topic: the subscribers the message was sent to
    /// directly (gossipsub's mesh carries it on to the others).
    ///
    /// # Errors
    ///
    /// [`Error::Publish`] with [`PublishError::NoSubscribers`] when no connected peer is
    /// subscribed (gossip meshes take a heartbeat or two to form after a subscription), with
    /// [`PublishError::TooLarge`] above the network's message size limit.
    pub async fn publish(&self, topic: &str, data: impl Into<Vec<u8>>) -> Result<usize, Error> {
        gossip::check_user_topic(topic).map_err(|reason| Error::InvalidTopic {
            topic: topic.into(),
            reason,
        })?;
        self.publish_unchecked(topic, data.into()).await
    }

    pub(crate) async fn publish_unchecked(
        &self,
        topic: &str,
        data: Vec<u8>,
    ) -> Result<usize, Error> {
        let sequence = self.inner.gossip_sequence.fetch_add(1, Ordering::Relaxed);
        let wire = gossip::wire_topic(&self.inner.network, topic);
        let frame = frame::seal(&self.inner.identity, &wire, sequence, &data);
        self.publish_frame(topic, frame, data.len()).await
    }

    /// Publishes a frame as it is: signed by anyone, or not a frame at all.
    pub(crate) async fn publish_frame(
        &self,
        topic: &str,
        frame: Vec<u8>,
        size: usize,
    ) -> Result<usize, Error> {
        let topic = topic.to_owned();
        self.request(|reply| Command::Publish {
            topic,
            frame,
            size,
            reply,
        })
        .await?
    }

    /// The connected peers that are subscribed to `topic`.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn topic_peers(&self, topic: &str) -> Result<Vec<PeerId>, Error> {
        let topic = topic.to_owned();
        self.request(|reply| Command::TopicPeers { topic, reply })
            .await
    }

    /// Stops providing `key` without waiting (from a `Drop`); if the command queue is full the
    /// record simply expires.
    pub(crate) fn stop_providing_now(&self, key: Vec<u8>) {
        let _ = self.inner.commands.try_send(Command::StopProviding { key });
    }

    /// Every (topic, peer) pair of connected peers subscribed to a topic starting with `prefix`
    /// (topic names without the network prefix).
    pub(crate) async fn topics_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, PeerId)>, Error> {
        let prefix = prefix.to_owned();
        self.request(|reply| Command::TopicsWithPrefix { prefix, reply })
            .await
    }

    /// Sets (or, with `None`, removes) the validation hook of `topic`. Messages of a topic
    /// without a hook are accepted.
    pub(crate) async fn set_validator(
        &self,
        topic: &str,
        validator: Option<gossip::Validator>,
    ) -> Result<(), Error> {
        let topic = topic.to_owned();
        if self
            .inner
            .commands
            .send(Command::SetValidator { topic, validator })
            .await
            .is_err()
        {
            return Err(self.stopped_error().await);
        }
        Ok(())
    }

    /// This node's gossipsub score of `peer` (see the node module's scoring parameters), or
    /// `None` when the peer is unknown to gossipsub.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn gossip_score(&self, peer: PeerId) -> Result<Option<f64>, Error> {
        self.request(|reply| Command::GossipScore { peer, reply })
            .await
    }

    /// Keeps the connections to `peer` open (`true`) even when idle, or lets them close after
    /// the idle timeout again (`false`). Bootstrap peers and dialled peers are kept already.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the node has stopped.
    pub async fn keep_alive(&self, peer: PeerId, keep: bool) -> Result<(), Error> {
        if self
            .inner
            .commands
            .send(Command::KeepAlive { peer, keep })
            .await
            .is_err()
        {
            return Err(self.stopped_error().await);
        }
        Ok(())
    }

    /// Subscribes to the node's events. Each receiver has its own bounded queue; one that falls
    /// behind loses the oldest events and is told how many.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.resubscribe()
    }

    /// The node's metrics registry: libp2p's own metrics (prefix `libp2p_`: connections,
    /// bandwidth, protocols) and micromesh's (prefix `micromesh_`). Components register their
    /// metrics here.
    pub fn metrics_registry(&self) -> Arc<Mutex<Registry>> {
        self.inner.metrics.clone()
    }

    /// Registers a component's metrics under `micromesh_<component>_` in the node's registry.
    pub(crate) fn register_metrics<R>(
        &self,
        component: &str,
        f: impl FnOnce(&mut Registry) -> R,
    ) -> R {
        let mut registry = self.inner.metrics.lock().unwrap_or_else(|e| e.into_inner());
        f(registry.sub_registry_with_prefix(format!("micromesh_{component}")))
    }

    /// All metrics in the OpenMetrics text format (what a Prometheus scrape returns).
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.metrics.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Stops the node: closes every connection, ends the event loop and waits for it. Gossip
    /// messages published in the last half second get until half a second after their publish
    /// to leave first. Calling it again, or on a stopped node, returns at once.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        self.stopped().await;
    }

    /// Ends the event loop at once, without closing connections gracefully: to the rest of the
    /// mesh this looks like a crash. For fault-injection in tests.
    pub(crate) fn kill(&self) {
        self.inner.abort.abort();
    }
}

#[cfg(feature = "testing")]
pub(crate) use self::event_loop::peer_of;

pub(crate) use self::streams::OpenError;

/// The last 6 characters of a peer id: enough to tell nodes apart in logs.
pub(crate) fn short_id(peer: &PeerId) -> String {
    let s = peer.to_base58();
    s[s.len().saturating_sub(6)..].to_owned()
}

/// Where a node's gossip sequence numbers start: the time in nanoseconds, so that a node that
/// restarts with the same identity goes on numbering above its earlier messages.
fn first_gossip_sequence() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX / 2))
}
