//! The registry: which services run where, across the whole mesh, with no registry server.
//!
//! Each node announces the services it runs on a gossip topic of its network, at once on every
//! change and then every [`Config::announce_interval`]. Announcements are signed by the node's
//! key and speak only for that node. A node that misses a name in its view (it just joined)
//! asks its connected peers, whose views hold the whole mesh, and the DHT, where each node
//! publishes a provider record per service name, at once ([`Registry::get_service`]).
//!
//! Liveness, quicker than go-micro's 90 s TTL:
//!
//! - entries expire after [`Config::ttl`] (default 30 s, three announce intervals) without a
//!   newer announcement;
//! - a graceful shutdown announces the leave, and every view drops the node at once;
//! - when a node loses its connection to a peer that runs services, it redials it; if that
//!   fails it drops the peer's entries and tells the mesh, and every other node checks for
//!   itself (one dial) before dropping them too. A killed node is gone from every view within
//!   roughly a connection close plus two probe dials, far below the TTL.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use micromesh::registry::{Endpoint, Registration};
//! use micromesh::testing::{Cluster, wait_until};
//! use std::time::Duration;
//!
//! let cluster = Cluster::new(3).await?;
//! cluster.service(1).registry().register(
//!     Registration::new("greeter")
//!         .version("1.0.0")
//!         .endpoint(Endpoint::new("Greeter.Hello").request("HelloRequest").response("HelloReply")),
//! ).await?;
//!
//! let registry = cluster.service(2).registry().clone();
//! wait_until(Duration::from_secs(10), || async {
//!     registry.get_service("greeter").await.is_ok()
//! }).await?;
//! let versions = registry.get_service("greeter").await?;
//! assert_eq!(versions[0].nodes[0].peer_id, cluster.node(1).peer_id());
//! cluster.shutdown().await?;
//! # Ok(()) }
//! ```

mod sync;

mod task;
mod view;
pub(crate) mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt as _, future::Shared};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{Metadata, Multiaddr, PeerId, node};

/// The gossip topic that carries announcements (inside the network's namespace).
pub(crate) const TOPIC: &str = "_registry";

/// A service as the registry knows it: one version of one name, with the nodes that run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Entry {
    /// The service name, e.g. `greeter`.
    pub name: String,
    /// The version.
    pub version: String,
    /// Metadata of the service.
    pub metadata: Metadata,
    /// The endpoints it serves.
    pub endpoints: Vec<Endpoint>,
    /// The nodes that run this version.
    pub nodes: Vec<Instance>,
}

impl Entry {
    /// Whether the service has an endpoint called `name`.
    pub fn has_endpoint(&self, name: &str) -> bool {
        self.endpoints.iter().any(|e| e.name == name)
    }
}

/// An endpoint of a service: its name and the names of its request and response types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Endpoint {
    /// The endpoint name, e.g. `Greeter.Hello`.
    pub name: String,
    /// The request type's name.
    pub request: String,
    /// The response type's name.
    pub response: String,
    /// Metadata of the endpoint.
    pub metadata: Metadata,
}

/// The endpoint metadata key under which a [`Service`](crate::Service) says how its endpoint is
/// called: `unary`, `server-stream`, `client-stream` or `bidi-stream`. Metadata keys starting
/// with `micromesh.` are micromesh's own.
pub const KIND_KEY: &str = "micromesh.kind";
/// The endpoint metadata key of a JSON example of the request (at most 1,024 bytes), when the
/// request type's shape could be traced: what a caller sends.
pub const REQUEST_EXAMPLE_KEY: &str = "micromesh.request-example";

impl Endpoint {
    /// How the endpoint is called ([`KIND_KEY`]): `unary`, `server-stream`, `client-stream`
    /// or `bidi-stream`; `None` when its service did not say.
    pub fn kind(&self) -> Option<&str> {
        self.metadata.get(KIND_KEY)
    }

    /// A JSON example of the request ([`REQUEST_EXAMPLE_KEY`]), if the service gave one.
    pub fn request_example(&self) -> Option<&str> {
        self.metadata.get(REQUEST_EXAMPLE_KEY)
    }

    /// An endpoint with no type names or metadata yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            request: String::new(),
            response: String::new(),
            metadata: Metadata::new(),
        }
    }

    /// Sets the request type's name.
    pub fn request(mut self, type_name: impl Into<String>) -> Self {
        self.request = type_name.into();
        self
    }

    /// Sets the response type's name.
    pub fn response(mut self, type_name: impl Into<String>) -> Self {
        self.response = type_name.into();
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }
}

/// A node that runs a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Instance {
    /// The node's peer id.
    pub peer_id: PeerId,
    /// The addresses it announced.
    pub addresses: Vec<Multiaddr>,
    /// Metadata of this node's instance.
    pub metadata: Metadata,
}

/// What [`Registry::register`] announces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Registration {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) metadata: Metadata,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) node_metadata: Metadata,
}

impl Registration {
    /// A registration of `name`, version `latest`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: "latest".into(),
            metadata: Metadata::new(),
            endpoints: Vec::new(),
            node_metadata: Metadata::new(),
        }
    }

    /// The version. Default is `latest`.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds a metadata entry of the service.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Replaces the service metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Adds a metadata entry of this node's instance (e.g. a zone).
    pub fn node_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_metadata.insert(key, value);
        self
    }

    fn record(&self) -> wire::ServiceRecord {
        wire::ServiceRecord {
            name: self.name.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| wire::EndpointRecord {
                    name: e.name.clone(),
                    request: e.request.clone(),
                    response: e.response.clone(),
                    metadata: e.metadata.clone(),
                })
                .collect(),
            node_metadata: self.node_metadata.clone(),
        }
    }
}

/// A change in the registry, from [`Registry::watch`]. Each carries the service with the one
/// node that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A node started running a service version.
    Created(Entry),
    /// A node changed what it announces for a service version.
    Updated(Entry),
    /// A node stopped running a service version (left, unreachable, or expired).
    Deleted(Entry),
}

impl Event {
    /// The service the event is about.
    pub fn service(&self) -> &Entry {
        match self {
            Self::Created(s) | Self::Updated(s) | Self::Deleted(s) => s,
        }
    }
}

/// Errors of the registry.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No node runs a service of that name, as far as the view and the DHT know.
    #[error("service {0:?} not found in the registry")]
    NotFound(String),
    /// A registration breaks a limit of the wire format.
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// A watcher fell behind and lost events; the view itself is intact.
    #[error("the watcher fell behind and missed {0} events")]
    Lagged(u64),
    /// The node underneath failed.
    #[error(transparent)]
    Node(#[from] node::Error),
}

/// How long an entry lives without a newer announcement, unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Registry settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    pub(crate) announce_interval: Duration,
    pub(crate) ttl: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) lookup_timeout: Duration,
    pub(crate) watch_queue: usize,
    pub(crate) initial_syncs: usize,
    pub(crate) max_peers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            announce_interval: Duration::from_secs(10),
            ttl: DEFAULT_TTL,
            probe_timeout: Duration::from_secs(3),
            lookup_timeout: Duration::from_secs(10),
            watch_queue: 1024,
            initial_syncs: 3,
            max_peers: view::DEFAULT_MAX_PEERS,
        }
    }
}

impl Config {
    /// How often a node re-announces its services. Default is 10 s.
    pub fn announce_interval(mut self, value: Duration) -> Self {
        self.announce_interval = value;
        self
    }

    /// How long an entry lives without a newer announcement. Default is 30 s.
    pub fn ttl(mut self, value: Duration) -> Self {
        self.ttl = value;
        self
    }

    /// How long a liveness check of a peer may take. Default is 3 s.
    pub fn probe_timeout(mut self, value: Duration) -> Self {
        self.probe_timeout = value;
        self
    }

    /// How long a DHT fallback lookup and its fetches may take. Default is 10 s.
    pub fn lookup_timeout(mut self, value: Duration) -> Self {
        self.lookup_timeout = value;
        self
    }

    /// How many events each watcher queues before it lags. Default is 1,024.
    pub fn watch_queue(mut self, value: usize) -> Self {
        self.watch_queue = value;
        self
    }

    /// From how many of the first peers it meets a node fetches their whole view. Default is
    /// 3.
    pub fn initial_syncs(mut self, value: usize) -> Self {
        self.initial_syncs = value;
        self
    }

    /// The most peers the view holds (with services, or recently gone). Beyond, announcements of
    /// new peers are not taken, and counted in `micromesh_registry_view_full_total`. Default is
    /// 100,000.
    pub fn max_peers(mut self, value: usize) -> Self {
        self.max_peers = value;
        self
    }

    /// The defaults, with this announce interval and a TTL of three intervals.
    pub fn with_announce_interval(interval: Duration) -> Self {
        Self {
            announce_interval: interval,
            ttl: interval * 3,
            ..Self::default()
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    received: Counter,
    rejected: Family<ReasonLabel, Counter>,
    marked_down: Counter,
    syncs: Counter,
    lookups: Counter,
    services: Gauge,
    view_full: Counter,
    view_peers: Gauge,
}

impl Metrics {
    fn register(node: &node::Node) -> Self {
        let metrics = Self::default();
        node.register_metrics("registry", |registry| metrics.add_to(registry));
        metrics
    }

    fn add_to(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "messages_received",
            "Registry messages accepted",
            self.received.clone(),
        );
        registry.register(
            "messages_rejected",
            "Registry messages dropped: too large, malformed, badly signed or out of limits",
            self.rejected.clone(),
        );
        registry.register(
            "peers_marked_down",
            "Peers dropped after a failed liveness check",
            self.marked_down.clone(),
        );
        registry.register(
            "syncs",
            "Registry views fetched from peers",
            self.syncs.clone(),
        );
        registry.register(
            "lookups",
            "Lookups of service names missing from the view (connected peers and the DHT asked)",
            self.lookups.clone(),
        );
        registry.register(
            "services",
            "Service names in this node's view",
            self.services.clone(),
        );
        registry.register(
            "view_full",
            "Announcements of new peers not taken because the view held its most peers",
            self.view_full.clone(),
        );
        registry.register(
            "view_peers",
            "Peers in this node's view, with services or recently gone",
            self.view_peers.clone(),
        );
    }
}

struct State {
    own: BTreeMap<(String, String), Registration>,
    seq: u64,
    view: view::View,
}

/// A DHT lookup of a name; ends with the error that kept it from asking the mesh, if any.
type Lookup = Shared<futures::future::BoxFuture<'static, Option<node::Error>>>;

pub(crate) struct Inner {
    node: node::Node,
    config: Config,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    lookups: Mutex<HashMap<String, Lookup>>,
    metrics: Metrics,
    /// The last announcement found nobody subscribed: repeat it as soon as someone is.
    unheard: std::sync::atomic::AtomicBool,
}

/// The registry of one node. Cheap to clone. Made by the [`Service`](crate::Service)
/// (`service.registry()`) or by [`Registry::start`].
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("peer_id", &self.inner.node.peer_id())
            .finish_non_exhaustive()
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many providers of a name one lookup fetches announcements from.
const MAX_LOOKUP_FETCHES: usize = 8;
/// How many connected peers one lookup asks for a name, before and beside the DHT.
const MAX_LOOKUP_NEIGHBOURS: usize = 3;

fn provider_key(name: &str) -> Vec<u8> {
    format!("/micromesh/registry/{name}").into_bytes()
}

impl Registry {
    /// Starts the registry on `node`: joins the registry topic, serves the sync protocol, and
    /// runs the announcer and liveness checks until the node stops.
    ///
    /// # Errors
    ///
    /// [`Error::Node`] if the node has stopped.
    pub async fn start(node: node::Node, config: Config) -> Result<Self, Error> {
        let (events, _) = broadcast::channel(config.watch_queue.max(1));
        let view = view::View::with_capacity(config.max_peers);
        let registry = Self {
            inner: Arc::new(Inner {
                metrics: Metrics::register(&node),
                node,
                config,
                state: Mutex::new(State {
                    own: BTreeMap::new(),
                    // Sequence numbers start at the wall clock, so a restarted node's
                    // announcements are newer than those of its previous run.
                    seq: unix_millis(),
                    view,
                }),
                events,
                lookups: Mutex::new(HashMap::new()),
                unheard: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        task::spawn(registry.clone()).await?;
        Ok(registry)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn node(&self) -> &node::Node {
        &self.inner.node
    }

    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Announces that this node runs `registration`, replacing an earlier registration of the
    /// same name and version. The mesh hears of it at once.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if it breaks a wire limit (names of 1 to 256 bytes, at most 256
    /// endpoints, 64 metadata entries…), [`Error::Node`] if the node has stopped.
    pub async fn register(&self, registration: Registration) -> Result<(), Error> {
        let name = registration.name.clone();
        let offer = crate::auth::Resource::announce(name.as_str());
        if let Err(denied) = self.inner.node.auth().authorize_self(&[offer]) {
            // Announced anyway (other nodes may have other rules), but nodes with the same
            // rules will not list it.
            tracing::warn!(service = %name, "this node's auth rules do not let it offer the service; nodes with the same rules will ignore it: {denied}");
        }
        let key = (name.clone(), registration.version.clone());
        let addrs = self.own_addrs().await?;
        let (signed, first_of_name) = {
            let mut state = self.state();
            let first = !state.own.keys().any(|(n, _)| *n == name);
            let previous = state.own.insert(key.clone(), registration);
            match self.sign_announcement(&mut state, addrs) {
                Ok(signed) => (signed, first),
                Err(e) => {
                    // Put back what was there: a registration that breaks a limit is never
                    // announced, and must not break the announcements of the others.
                    match previous {
                        Some(previous) => state.own.insert(key, previous),
                        None => state.own.remove(&key),
                    };
                    return Err(e);
                }
            }
        };
        self.publish(signed).await?;
        if first_of_name {
            // The provider record is the late joiners' shortcut. Publishing it is a DHT query
            // that can take seconds; the gossip announcement already went out, so do not make
            // the caller wait for it.
            self.inner.node.start_providing(provider_key(&name)).await?;
        }
        Ok(())
    }

    /// Stops announcing one version of a service; the mesh drops it at once.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if this node does not run it, [`Error::Node`] if the node stopped.
    pub async fn deregister(&self, name: &str, version: &str) -> Result<(), Error> {
        let last_of_name = {
            let mut state = self.state();
            if state
                .own
                .remove(&(name.to_owned(), version.to_owned()))
                .is_none()
            {
                return Err(Error::NotFound(name.to_owned()));
            }
            !state.own.keys().any(|(n, _)| n == name)
        };
        self.announce().await?;
        if last_of_name {
            self.inner.node.stop_providing(provider_key(name)).await?;
        }
        Ok(())
    }

    /// The services this node registered.
    pub fn registrations(&self) -> Vec<Registration> {
        self.state().own.values().cloned().collect()
    }

    /// The addresses to announce: those confirmed from outside first (behind a NAT that lets
    /// peers in, the only ones that work), then the listen addresses.
    async fn own_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        let node = &self.inner.node;
        let mut addrs = node.external_addrs().await?;
        for addr in node.listen_addrs().await? {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        Ok(addrs
            .into_iter()
            .map(|mut a| {
                if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                    a.pop();
                }
                a
            })
            .take(wire::MAX_ADDRS)
            .collect())
    }

    /// Signs this node's announcement of `state.own` with a new sequence number and applies it
    /// to the local view. Fails, changing nothing, if a receiver would refuse it.
    fn sign_announcement(
        &self,
        state: &mut State,
        addrs: Vec<Multiaddr>,
    ) -> Result<Vec<u8>, Error> {
        let node = &self.inner.node;
        let seq = state.seq.max(unix_millis()) + 1;
        let services: Vec<wire::ServiceRecord> =
            state.own.values().map(Registration::record).collect();
        let body = wire::Body::Announce {
            peer: node.peer_id().to_bytes(),
            seq,
            ttl_ms: self.inner.config.ttl.as_millis() as u64,
            addrs: addrs
                .iter()
                .map(|a| serde_bytes::ByteBuf::from(a.to_vec()))
                .collect(),
            services: services.clone(),
        };
        let signed = wire::sign(
            node.identity(),
            node.network(),
            &body,
            &node.auth().own_encoded(),
        );
        // Check it as every receiver will, so that a limit is an error here rather than a
        // silent refusal on every other node.
        wire::verify(node.network(), &signed).map_err(|e| Error::Invalid(e.to_string()))?;
        state.seq = seq;
        let announced = view::Announced {
            seq,
            ttl: self.inner.config.ttl,
            addrs,
            services,
            signed: signed.clone(),
        };
        let events = state
            .view
            .announce(node.peer_id(), announced, std::time::Instant::now())
            .unwrap_or_default();
        for event in events {
            let _ = self.inner.events.send(event);
        }
        Ok(signed)
    }

    /// Signs and publishes this node's current announcement.
    pub(crate) async fn announce(&self) -> Result<(), Error> {
        let addrs = self.own_addrs().await?;
        self.announce_at(addrs).await
    }

    /// Announces again if this node's addresses are no longer the ones it last announced (a
    /// relay granted a reservation, AutoNAT confirmed an address); otherwise does nothing, so
    /// that a burst of address events costs the mesh one announcement at most.
    pub(crate) async fn announce_if_moved(&self) -> Result<(), Error> {
        let addrs = self.own_addrs().await?;
        if addrs == self.announced_addrs(&self.inner.node.peer_id()) {
            return Ok(());
        }
        self.announce_at(addrs).await
    }

    async fn announce_at(&self, addrs: Vec<Multiaddr>) -> Result<(), Error> {
        let signed = {
            let mut state = self.state();
            self.sign_announcement(&mut state, addrs)?
        };
        self.publish(signed).await
    }

    /// Announces the leave of every service of this node: other views drop them at once.
    /// The [`Service`](crate::Service) calls this when it stops.
    ///
    /// # Errors
    ///
    /// [`Error::Node`] if the node has stopped.
    pub async fn leave(&self) -> Result<(), Error> {
        let node = &self.inner.node;
        let (signed, names, events) = {
            let mut state = self.state();
            if state.own.is_empty() {
                return Ok(());
            }
            let names: Vec<String> = state.own.keys().map(|(n, _)| n.clone()).collect();
            state.own.clear();
            state.seq = state.seq.max(unix_millis()) + 1;
            let seq = state.seq;
            let body = wire::Body::Leave {
                peer: node.peer_id().to_bytes(),
                seq,
            };
            let events = state
                .view
                .leave(node.peer_id(), seq, std::time::Instant::now())
                .unwrap_or_default();
            (
                wire::sign(node.identity(), node.network(), &body, &[]),
                names,
                events,
            )
        };
        self.emit(events);
        for name in names {
            let _ = node.stop_providing(provider_key(&name)).await;
        }
        self.publish(signed).await?;
        // gossipsub has no flush: give the message a moment to leave before the caller closes
        // the connections. Peers that miss it drop this node after their liveness check.
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok(())
    }

    async fn publish(&self, signed: Vec<u8>) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        match self.inner.node.publish_unchecked(TOPIC, signed).await {
            Ok(_) => {
                self.inner.unheard.store(false, Ordering::Relaxed);
                Ok(())
            }
            // Nobody to tell yet (a fresh node, or the topic's mesh is still forming): the
            // background task repeats the announcement as soon as a peer is subscribed.
            Err(node::Error::Publish { .. }) => {
                self.inner.unheard.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the last announcement reached nobody.
    pub(crate) fn unheard(&self) -> bool {
        self.inner
            .unheard
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn emit(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let (names, peers) = {
            let state = self.state();
            (state.view.names().len(), state.view.len())
        };
        self.inner.metrics.services.set(names as i64);
        self.inner.metrics.view_peers.set(peers as i64);
        for event in events {
            let _ = self.inner.events.send(event);
        }
    }

    /// Every version of `name` with the nodes that run it, sorted by version. When the view
    /// has none, asks its connected peers (up to three; on a node still joining, the first
    /// peers it connects to) for their announcements of the name and, at the same time, the
    /// DHT for providers of the name, whose announcements it fetches; the first answer that
    /// names it ends the lookup. Concurrent lookups of one name share one lookup.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if neither the view nor the DHT knows the name, [`Error::Node`] with
    /// [`node::Error::NoKnownPeers`] if the node could not ask the mesh (it reached no peer).
    pub async fn get_service(&self, name: &str) -> Result<Vec<Entry>, Error> {
        self.resolve(name).await.map(|found| found.to_vec())
    }

    /// As [`Registry::get_service`], sharing the view's snapshot instead of copying it: what a
    /// call costs does not grow with the number of the service's nodes.
    pub(crate) async fn resolve(&self, name: &str) -> Result<Arc<Vec<Entry>>, Error> {
        let found = self.state().view.service(name);
        if !found.is_empty() {
            return Ok(found);
        }
        let failed = self.lookup(name).await;
        let found = self.state().view.service(name);
        match failed {
            _ if !found.is_empty() => Ok(found),
            Some(e @ node::Error::NoKnownPeers(_)) => Err(Error::Node(e)),
            _ => Err(Error::NotFound(name.to_owned())),
        }
    }

    /// Every version of `name` in this node's view, without a DHT lookup.
    pub fn cached_service(&self, name: &str) -> Vec<Entry> {
        self.state().view.service(name).to_vec()
    }

    /// Every service in this node's view: one entry per name and version, with its nodes.
    pub fn list_services(&self) -> Vec<Entry> {
        let mut state = self.state();
        let names = state.view.names();
        names
            .iter()
            .flat_map(|name| state.view.service(name).to_vec())
            .collect()
    }

    /// Watches for changes, of every service (`None`) or of one name.
    ///
    /// A watcher sees the states this node learns of, in order. Changes a peer makes faster
    /// than they spread may reach this node merged (when a registry sync brings the peer's
    /// newest state before the gossip of a step in between): the watcher then sees the newest
    /// state, never an older one after it.
    pub fn watch(&self, service: Option<&str>) -> Watcher {
        Watcher {
            events: self.inner.events.subscribe(),
            service: service.map(str::to_owned),
        }
    }

    /// Fetches the registry view of every connected peer of this network and merges it: what
    /// a newly started client does before it lists services.
    ///
    /// # Errors
    ///
    /// [`Error::Node`] if the node has stopped.
    pub async fn refresh(&self) -> Result<(), Error> {
        let peers: Vec<PeerId> = self
            .inner
            .node
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.same_network != Some(false))
            .map(|p| p.peer_id)
            .collect();
        let fetches = peers.into_iter().map(|peer| sync::fetch(self, peer, None));
        futures::future::join_all(fetches).await;
        Ok(())
    }

    async fn lookup(&self, name: &str) -> Option<node::Error> {
        let lookup = {
            let mut lookups = self.inner.lookups.lock().unwrap_or_else(|e| e.into_inner());
            lookups
                .entry(name.to_owned())
                .or_insert_with(|| {
                    let registry = self.clone();
                    let name = name.to_owned();
                    async move {
                        let timeout = registry.inner.config.lookup_timeout;
                        let failed = tokio::time::timeout(timeout, registry.lookup_now(&name))
                            .await
                            .unwrap_or(None);
                        registry
                            .inner
                            .lookups
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&name);
                        failed
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        lookup.await
    }

    /// Finds `name` in the mesh. Two searches run at once, and the first that brings the name
    /// into the view ends the lookup:
    ///
    /// - the neighbours: the connected peers (and, on a node still joining, the first peers it
    ///   connects to) are asked for their announcements of the name. A neighbour holds a view of
    ///   the whole mesh, so on a fresh node this answers in one round trip after the connection,
    ///   without waiting for identify and the DHT;
    /// - the DHT: providers of the name, whose announcements are fetched as each is found, for
    ///   names the neighbours do not know (a view still filling, a mesh split by the gossip).
    ///
    /// Announcements reaching the view any other way (gossip, the initial sync with a new peer)
    /// end it too. Returns the error that kept the DHT lookup from asking the mesh, if the
    /// neighbours did not find the name either.
    async fn lookup_now(&self, name: &str) -> Option<node::Error> {
        use futures::StreamExt as _;
        self.inner.metrics.lookups.inc();
        let node = &self.inner.node;
        // Subscribed before anything is asked, so no arrival of the name is missed.
        let mut changes = self.watch(Some(name));
        let mut joined = node.events();
        let mut neighbours = Vec::with_capacity(MAX_LOOKUP_NEIGHBOURS);
        let mut fetches = futures::stream::FuturesUnordered::new();
        for peer in node.connected_peers() {
            if neighbours.len() == MAX_LOOKUP_NEIGHBOURS {
                break;
            }
            neighbours.push(peer);
            fetches.push(sync::fetch(self, peer, Some(name.to_owned())));
        }
        if !self.state().view.service(name).is_empty() {
            return None;
        }
        let mut providers = match node.providers_as_found(provider_key(name)).await {
            Ok(providers) => providers,
            Err(e) => return Some(e),
        };
        let me = node.peer_id();
        let mut asked = 0;
        let mut dht_done = false;
        let mut dht_failed = None;
        let mut node_gone = false;
        loop {
            tokio::select! {
                found = providers.recv(), if !dht_done => match found {
                    Some(Ok(peer)) if peer != me && asked < MAX_LOOKUP_FETCHES => {
                        asked += 1;
                        if !neighbours.contains(&peer) {
                            fetches.push(sync::fetch(self, peer, Some(name.to_owned())));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(service = %name, "DHT lookup failed: {e}");
                        dht_failed = Some(e);
                        dht_done = true;
                    }
                    None => dht_done = true,
                },
                event = joined.recv(), if neighbours.len() < MAX_LOOKUP_NEIGHBOURS && !node_gone => match event {
                    Ok(node::Event::PeerConnected { peer_id, .. }) if !neighbours.contains(&peer_id) => {
                        neighbours.push(peer_id);
                        fetches.push(sync::fetch(self, peer_id, Some(name.to_owned())));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => node_gone = true,
                },
                Some(_) = changes.next() => {
                    if !self.state().view.service(name).is_empty() {
                        return None;
                    }
                }
                Some(()) = fetches.next() => {
                    if !self.state().view.service(name).is_empty() {
                        return None;
                    }
                }
                else => return dht_failed,
            }
            // Nothing left that could bring the name: the DHT lookup has ended and every fetch
            // has answered.
            if dht_done && fetches.is_empty() {
                return dht_failed;
            }
        }
    }

    /// Applies a signed message from the mesh (gossip or sync). Returns it when it was valid.
    pub(crate) fn receive(&self, bytes: &[u8]) -> Option<wire::Verified> {
        self.receive_from(bytes, None)
    }

    /// Counts a rejected message under a reason label, without holding the registry.
    pub(crate) fn rejection_counter(&self) -> impl Fn(&'static str) + Send + Sync + 'static {
        let rejected = self.inner.metrics.rejected.clone();
        move |reason| {
            rejected.get_or_create(&ReasonLabel { reason }).inc();
        }
    }

    /// As [`Registry::receive`]; a gossip message must also have been published by its
    /// signer (`publisher`), so nobody can replay another node's announcements on the topic.
    pub(crate) fn receive_from(
        &self,
        bytes: &[u8],
        publisher: Option<PeerId>,
    ) -> Option<wire::Verified> {
        let node = &self.inner.node;
        // From gossip, the frame's signature (checked by the node) covers the message; from a
        // sync, the message's own signature is all there is.
        let verified = match publisher {
            Some(publisher) => wire::verify_published(node.network(), bytes, publisher),
            None => wire::verify(node.network(), bytes),
        };
        let verified = match verified {
            Ok(v) => v,
            Err(rejection) => {
                tracing::debug!("dropped a registry message: {rejection}");
                self.inner
                    .metrics
                    .rejected
                    .get_or_create(&ReasonLabel {
                        reason: rejection.label(),
                    })
                    .inc();
                return None;
            }
        };
        self.inner.metrics.received.inc();
        // Only the services the rules let the signer offer enter the view.
        let allowed = match &verified.body {
            wire::Body::Announce { services, .. } if verified.signer != node.peer_id() => {
                self.allowed_services(verified.signer, &verified.grants, services)
            }
            _ => Vec::new(),
        };
        let now = std::time::Instant::now();
        let applied = {
            let mut state = self.state();
            match &verified.body {
                // Our own announcements come back through sync: ours are authoritative.
                _ if verified.signer == node.peer_id() => Err(view::Unchanged::Stale),
                wire::Body::Announce {
                    seq, ttl_ms, addrs, ..
                } => {
                    let ttl = Duration::from_millis(*ttl_ms).min(wire::MAX_TTL);
                    let addrs = addrs
                        .iter()
                        .filter_map(|a| Multiaddr::try_from(a.to_vec()).ok())
                        .collect();
                    let announced = view::Announced {
                        seq: *seq,
                        ttl,
                        addrs,
                        services: allowed,
                        signed: bytes.to_vec(),
                    };
                    state.view.announce(verified.signer, announced, now)
                }
                wire::Body::Leave { seq, .. } => state.view.leave(verified.signer, *seq, now),
                wire::Body::Suspect { .. } => Err(view::Unchanged::Stale),
            }
        };
        match applied {
            Ok(events) => self.emit(events),
            Err(view::Unchanged::Full) => {
                tracing::debug!(peer = %verified.signer, "registry view full: announcement not taken");
                self.inner.metrics.view_full.inc();
            }
            Err(view::Unchanged::Stale) => {}
        }
        Some(verified)
    }

    /// The services of an announcement that `peer`, carrying `grants`, may offer under this
    /// node's auth rules (`announce:<name>`).
    fn allowed_services(
        &self,
        peer: PeerId,
        grants: &[serde_bytes::ByteBuf],
        services: &[wire::ServiceRecord],
    ) -> Vec<wire::ServiceRecord> {
        let auth = self.inner.node.auth();
        let now = std::time::SystemTime::now();
        services
            .iter()
            .filter(|service| {
                let decision = auth.authorize(
                    crate::auth::Surface::Announce,
                    peer,
                    crate::auth::Grants::Carried(grants),
                    &[crate::auth::Resource::announce(service.name.as_str())],
                    now,
                );
                match decision {
                    Ok(_) => true,
                    Err(denied) => {
                        tracing::debug!(%peer, service = %service.name, "announcement not taken: {denied}");
                        false
                    }
                }
            })
            .cloned()
            .collect()
    }

    /// Drops `peer` from the view after a failed liveness check.
    pub(crate) fn mark_down(&self, peer: PeerId) {
        let events = self.state().view.down(peer, std::time::Instant::now());
        if !events.is_empty() {
            self.inner.metrics.marked_down.inc();
            tracing::info!(%peer, "peer unreachable: its services are down");
        }
        self.emit(events);
    }

    pub(crate) fn has_services(&self, peer: &PeerId) -> bool {
        self.state().view.has_services(peer)
    }

    pub(crate) fn announced_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.state().view.addrs(peer)
    }

    pub(crate) fn expire(&self) {
        let events = self.state().view.expire(std::time::Instant::now());
        self.emit(events);
    }

    pub(crate) fn signed_messages(&self, service: Option<&str>) -> Vec<Vec<u8>> {
        self.state().view.signed(service)
    }

    pub(crate) fn has_registrations(&self) -> bool {
        !self.state().own.is_empty()
    }

    pub(crate) fn count_sync(&self) {
        self.inner.metrics.syncs.inc();
    }
}

/// Registry changes, from [`Registry::watch`].
pub struct Watcher {
    events: broadcast::Receiver<Event>,
    service: Option<String>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// The next change, in the order the view applied them. `None` once the registry is gone.
    ///
    /// # Errors
    ///
    /// [`Error::Lagged`] when this watcher fell behind and events were lost; the next call
    /// continues with the oldest event still queued.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            match self.events.recv().await {
                Ok(event) => {
                    if self
                        .service
                        .as_ref()
                        .is_none_or(|s| *s == event.service().name)
                    {
                        return Some(Ok(event));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => return Some(Err(Error::Lagged(n))),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
