//! In-process clusters for tests and simulations (feature `testing`).
//!
//! A [`Cluster`] starts services on libp2p's memory transport, all joined through one bootstrap
//! node, each with a data directory of its own in a temporary directory. Members can be
//! stopped gracefully, killed (a crash, as the rest of the mesh sees it) and restarted with the
//! same identity and address. The protocols are the real ones: only the wire is in memory.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use micromesh::testing::{Cluster, wait_until};
//!
//! let cluster = Cluster::new(3).await?;
//! let node = cluster.node(2).clone();
//! let peer = cluster.node(1).peer_id();
//! wait_until(Duration::from_secs(10), || async {
//!     node.dht_peers().await.unwrap_or_default().iter().any(|p| p.peer_id == peer)
//! })
//! .await?;
//! cluster.shutdown().await?;
//! # Ok(()) }
//! ```

use std::{
    fmt,
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Error, Multiaddr, Service,
    node::{ExitReason, Node, Preset},
    service,
};

/// A condition did not become true in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("condition not met within {0:?}")]
pub struct Timeout(pub Duration);

/// Polls `condition` every 20 ms until it returns `true`, for at most `timeout`.
///
/// # Errors
///
/// [`Timeout`] if the condition is still false when the time is up.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> Result<(), Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Configure = Arc<dyn Fn(usize, service::Builder) -> service::Builder + Send + Sync>;

/// Configures a [`Cluster`]. Made by [`Cluster::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    size: usize,
    network: String,
    configure: Configure,
    connect_timeout: Duration,
}

impl Builder {
    /// How many members to start. Default is 3.
    pub fn size(mut self, n: usize) -> Self {
        self.size = n;
        self
    }

    /// The network the members join. Default is `"test"`.
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.network = network.into();
        self
    }

    /// Adjusts each member's service builder; gets the member's index. Applied on every start,
    /// restarts included. Members are called `member-<index>` and do not register themselves
    /// in the registry unless this turns it on (`builder.register(true)`).
    pub fn configure(
        mut self,
        f: impl Fn(usize, service::Builder) -> service::Builder + Send + Sync + 'static,
    ) -> Self {
        self.configure = Arc::new(f);
        self
    }

    /// How long `build` waits for every member to connect to the bootstrap member. Default is
    /// 20 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Starts the members: member 0 first (the bootstrap node), then the others, and waits
    /// until each is connected to member 0.
    ///
    /// # Errors
    ///
    /// Any error of starting a service, and [`Error::Node`] with a dial error if a member does
    /// not connect in time.
    pub async fn build(self) -> Result<Cluster, Error> {
        let dir = tempfile::Builder::new()
            .prefix("micromesh-cluster-")
            .tempdir()
            .map_err(|source| Error::Io {
                context: "cannot create the cluster's temporary directory".into(),
                source,
            })?;
        let mut cluster = Cluster {
            dir,
            network: self.network,
            configure: self.configure,
            members: Vec::new(),
            past_panics: Vec::new(),
            panics_reported: false,
            bootstrap: None,
            connect_timeout: self.connect_timeout,
        };
        for _ in 0..self.size {
            cluster.add_member().await?;
        }
        Ok(cluster)
    }
}

struct Member {
    service: Option<Service>,
    data_dir: PathBuf,
    listen: Option<Multiaddr>,
}

/// Services on the memory transport, joined through member 0. See the [module docs](self).
///
/// Dropping a cluster stops its members. Call [`Cluster::shutdown`] to stop them gracefully
/// and to learn whether any member's event loop panicked.
pub struct Cluster {
    dir: tempfile::TempDir,
    network: String,
    configure: Configure,
    members: Vec<Member>,
    /// What panicked in members that were stopped or killed since.
    past_panics: Vec<(usize, String)>,
    /// Whether [`Cluster::shutdown`] reported the panics already.
    panics_reported: bool,
    bootstrap: Option<Multiaddr>,
    connect_timeout: Duration,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("network", &self.network)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts `n` members with the default settings.
    ///
    /// # Errors
    ///
    /// As [`Builder::build`].
    pub async fn new(n: usize) -> Result<Self, Error> {
        Self::builder().size(n).build().await
    }

    /// A builder for a cluster of 3 members on network `"test"`.
    pub fn builder() -> Builder {
        Builder {
            size: 3,
            network: "test".into(),
            configure: Arc::new(|_, b| b),
            connect_timeout: Duration::from_secs(20),
        }
    }

    /// The number of members, stopped ones included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The network of the cluster.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The address of member 0, which every member bootstraps from.
    ///
    /// # Panics
    ///
    /// If the cluster has no members.
    pub fn bootstrap_addr(&self) -> &Multiaddr {
        self.bootstrap.as_ref().expect("the cluster has no members")
    }

    /// The service of member `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range or the member is stopped.
    pub fn service(&self, i: usize) -> &Service {
        self.members[i]
            .service
            .as_ref()
            .unwrap_or_else(|| panic!("cluster member {i} is stopped"))
    }

    /// The node of member `i`.
    ///
    /// # Panics
    ///
    /// As [`Cluster::service`].
    pub fn node(&self, i: usize) -> &Node {
        self.service(i).node()
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].service.is_some()
    }

    /// The services of the running members.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.members.iter().filter_map(|m| m.service.as_ref())
    }

    /// The data directory of member `i`.
    pub fn data_dir(&self, i: usize) -> &std::path::Path {
        &self.members[i].data_dir
    }

    /// Starts one more member, which joins through member 0, and returns its index.
    ///
    /// # Errors
    ///
    /// As [`Builder::build`].
    pub async fn add_member(&mut self) -> Result<usize, Error> {
        let i = self.members.len();
        self.members.push(Member {
            service: None,
            data_dir: self.dir.path().join(format!("member-{i}")),
            listen: None,
        });
        self.start(i).await?;
        Ok(i)
    }

    async fn start(&mut self, i: usize) -> Result<(), Error> {
        let member = &self.members[i];
        let listen = member
            .listen
            .clone()
            .unwrap_or_else(|| "/memory/0".parse().expect("valid multiaddr"));
        let mut builder = Service::builder(format!("member-{i}"))
            .register(false)
            .preset(Preset::Local)
            .network(self.network.clone())
            .data_dir(member.data_dir.clone())
            .listen(listen);
        if let Some(bootstrap) = &self.bootstrap
            && i != 0
        {
            builder = builder.bootstrap(bootstrap.clone());
        }
        let service = (self.configure)(i, builder).build().await?;
        let addr = service
            .node()
            .listen_addrs()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::Node(crate::node::Error::InvalidConfig(format!(
                    "cluster member {i} listens on nothing"
                )))
            })?;
        if i == 0 {
            self.bootstrap = Some(addr.clone());
        } else if let Some(bootstrap) = &self.bootstrap {
            let node = service.node().clone();
            let target = crate::node::peer_of(bootstrap);
            let connected = wait_until(self.connect_timeout, || async {
                match target {
                    Some(peer) => node
                        .peers()
                        .await
                        .map(|peers| peers.iter().any(|p| p.peer_id == peer))
                        .unwrap_or(false),
                    None => true,
                }
            })
            .await;
            if connected.is_err() {
                return Err(Error::Node(crate::node::Error::DialTimeout {
                    addr: bootstrap.clone(),
                    timeout: self.connect_timeout,
                }));
            }
        }
        let member = &mut self.members[i];
        member.listen = Some(strip_p2p(&addr));
        member.service = Some(service);
        Ok(())
    }

    /// Stops member `i` gracefully (hooks, connections closed).
    ///
    /// # Errors
    ///
    /// As [`Service::stop`].
    pub async fn stop(&mut self, i: usize) -> Result<(), Error> {
        match self.members[i].service.take() {
            Some(service) => {
                let stopped = service.stop().await;
                self.remember_panics(i, &service);
                stopped
            }
            None => Ok(()),
        }
    }

    /// Keeps what panicked in a member that leaves the cluster, for [`Cluster::shutdown`].
    fn remember_panics(&mut self, i: usize, service: &Service) {
        let node = service.node();
        if let Some(ExitReason::Panicked(msg)) = node.exit_reason() {
            self.past_panics.push((i, format!("event loop: {msg}")));
        }
        for panic in node.task_panics() {
            self.past_panics
                .push((i, format!("{} task: {}", panic.component, panic.message)));
        }
    }

    /// Kills member `i`: its event loop ends at once, nothing is announced, connections drop
    /// as if the process had crashed.
    pub async fn kill(&mut self, i: usize) {
        if let Some(service) = self.members[i].service.take() {
            service.node().kill();
            service.node().stopped().await;
            self.remember_panics(i, &service);
        }
    }

    /// Starts member `i` again, with the identity in its data directory and its old address.
    ///
    /// # Errors
    ///
    /// As [`Builder::build`].
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.stop(i).await?;
        self.start(i).await
    }

    /// Starts member `i` again after [`Cluster::stop`] or [`Cluster::kill`].
    ///
    /// # Errors
    ///
    /// As [`Builder::build`].
    pub async fn start_member(&mut self, i: usize) -> Result<(), Error> {
        if self.members[i].service.is_some() {
            return Ok(());
        }
        self.start(i).await
    }

    /// What panicked in any member, now or before it stopped: event loops and the tasks of
    /// every component.
    fn panics(&self) -> Vec<(usize, String)> {
        let mut panics = self.past_panics.clone();
        for (i, m) in self.members.iter().enumerate() {
            let Some(service) = &m.service else { continue };
            let node = service.node();
            if let Some(ExitReason::Panicked(msg)) = node.exit_reason() {
                panics.push((i, format!("event loop: {msg}")));
            }
            for panic in node.task_panics() {
                panics.push((i, format!("{} task: {}", panic.component, panic.message)));
            }
        }
        panics
    }

    /// Stops every member gracefully.
    ///
    /// # Errors
    ///
    /// [`Error::Node`] with [`ExitReason::Panicked`] if any member's event loop, or any task of
    /// its components, panicked during the test; and any error of stopping a member.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some((i, msg)) = self.panics().into_iter().next() {
            // Reported here: dropping the cluster must not panic about it again.
            self.panics_reported = true;
            return Err(Error::Node(crate::node::Error::Stopped(
                ExitReason::Panicked(format!("cluster member {i}: {msg}")),
            )));
        }
        let services: Vec<Service> = self
            .members
            .iter_mut()
            .filter_map(|m| m.service.take())
            .collect();
        let results = futures::future::join_all(services.iter().map(Service::stop)).await;
        results.into_iter().collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panics = self.panics();
        for m in &self.members {
            if let Some(service) = &m.service {
                service.node().kill();
            }
        }
        if !panics.is_empty() && !self.panics_reported && !std::thread::panicking() {
            panic!("cluster members panicked: {panics:?}");
        }
    }
}

fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(
        addr.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(_))
    ) {
        addr.pop();
    }
    addr
}

/// Fault injection: ends `service`'s node at once, as a crash of its event loop would: no leave
/// is announced, calls in flight break, connections drop.
///
/// The process lives on, so its transports still close their connections: a TCP peer sees the
/// connection end without a yamux close, a QUIC peer gets a close frame, as when a connection
/// idles out. To simulate a process that dies (its peers hear nothing more), run the node in a
/// [`Process`] and [`Process::crash`] it.
pub fn crash(service: &Service) {
    service.node().kill();
}

/// A service in a runtime of its own, as if in a process of its own, which can die the way a
/// killed process does: at once and silently.
///
/// [`crash`] ends a node's event loop, but the transports' own tasks go on and close the
/// connections politely. [`Process::crash`] ends every task of the runtime, the transports'
/// included, so that nothing more is sent: peers find out through their keep-alives and idle
/// timeouts, as they would after a `kill -9` or a power cut.
///
/// ```
/// # #[tokio::main(flavor = "multi_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use micromesh::{Service, node::Preset, testing::Process};
///
/// let process = Process::start(Service::builder("worker").preset(Preset::Local)).await?;
/// let peer = process.service().peer_id();
/// let answer = process.run(|service| async move { service.peer_id() }).await;
/// assert_eq!(answer, peer);
/// process.crash();
/// # Ok(()) }
/// ```
///
/// Dropping a `Process` crashes it.
pub struct Process {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    service: Service,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.service.abandon();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("peer", &self.service.peer_id())
            .finish_non_exhaustive()
    }
}

impl Process {
    /// Builds the service on a runtime of its own (one worker thread).
    ///
    /// # Errors
    ///
    /// What [`service::Builder::build`] returns, or [`Error::Io`] if the runtime cannot start.
    pub async fn start(builder: service::Builder) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("micromesh-process")
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                context: "cannot start a runtime for the process".into(),
                source,
            })?;
        let built = runtime.spawn(builder.build()).await;
        match built {
            Ok(Ok(service)) => Ok(Self {
                runtime: Some(runtime),
                service,
            }),
            Ok(Err(e)) => {
                runtime.shutdown_background();
                Err(e)
            }
            Err(join) => {
                runtime.shutdown_background();
                std::panic::resume_unwind(join.into_panic())
            }
        }
    }

    /// The service. Its handles work from any runtime; what they spawn runs on the caller's.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Runs `task` on the process's runtime, so that everything it spawns dies with the
    /// process, and waits for its result. A panic in `task` resumes on the caller.
    pub async fn run<F, Fut, T>(&self, task: F) -> T
    where
        F: FnOnce(Service) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the process");
        match runtime.spawn(task(self.service.clone())).await {
            Ok(value) => value,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// Stops the service gracefully (see [`Service::stop`]), then ends the runtime.
    ///
    /// # Errors
    ///
    /// What [`Service::stop`] returns.
    pub async fn stop(self) -> Result<(), Error> {
        let service = self.service.clone();
        self.run(|_| async move { service.stop().await }).await
    }

    /// Kills the process: every task of its runtime ends where it stands, the node's event
    /// loop and the transports' sockets included. No leave, no close frame, no reset: the
    /// peers hear nothing more.
    pub fn crash(self) {
        drop(self);
    }
}

/// Fault injection: runs a task on `node` that panics with `message`, as a bug in a component
/// would: the node goes on, the panic is logged and listed by [`Node::task_panics`], and a
/// [`Cluster`] holding the node fails its [`Cluster::shutdown`].
pub fn inject_task_panic(node: &Node, message: &'static str) {
    node.spawn_task("testing", async move { panic!("{message}") });
}

/// Call streams held open by a misbehaving peer, from [`hold_call_streams`]; dropping it
/// closes them.
pub struct HeldStreams(#[allow(dead_code)] Vec<libp2p::Stream>);

impl fmt::Debug for HeldStreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeldStreams({})", self.0.len())
    }
}

/// Fault injection: opens `n` call streams from `node` to `peer` and sends one byte of a call
/// head on each, then nothing more: a peer that ties up a server's streams. Returns the streams
/// that opened.
pub async fn hold_call_streams(node: &Node, peer: crate::PeerId, n: usize) -> HeldStreams {
    use futures::AsyncWriteExt as _;
    let protocol = crate::transport::protocol(node.network());
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut stream) = node.open_stream(peer, protocol.clone()).await else {
            continue;
        };
        if stream.write_all(&[0]).await.is_ok() && stream.flush().await.is_ok() {
            held.push(stream);
        }
    }
    HeldStreams(held)
}

/// The value of one series in `node`'s metrics, 0 while the node has none (a counter appears
/// with its first increment). `series` is the name with its labels as the Prometheus text
/// prints them, such as `micromesh_gossip_rejected_total` or
/// `micromesh_auth_denied_total{surface="publish"}`.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use micromesh::testing::{Cluster, metric};
///
/// let cluster = Cluster::new(1).await?;
/// assert_eq!(metric(cluster.node(0), "micromesh_gossip_rejected_total"), 0);
/// cluster.shutdown().await?;
/// # Ok(()) }
/// ```
pub fn metric(node: &Node, series: &str) -> u64 {
    node.encode_metrics()
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Fault injection: publishes `data` on any gossip topic of the node's network, micromesh's
/// own topics included, skipping every check a normal publish makes. The node still signs it
/// in a gossip frame; [`inject_gossip_frame`] sends bytes unsigned.
///
/// # Errors
///
/// As [`Node::publish`].
pub async fn inject_gossip(
    node: &Node,
    topic: &str,
    data: Vec<u8>,
) -> Result<(), crate::node::Error> {
    node.publish_unchecked(topic, data).await.map(drop)
}

/// Fault injection: publishes `frame` as the data of a gossip message on `topic`, as it is,
/// instead of the frame the node would sign (`protocols/README.md`, "Gossip frames"): a frame
/// made with [`gossip_frame`] and then altered, or bytes that are no frame at all.
///
/// # Errors
///
/// As [`Node::publish`].
pub async fn inject_gossip_frame(
    node: &Node,
    topic: &str,
    frame: Vec<u8>,
) -> Result<(), crate::node::Error> {
    let size = frame.len();
    node.publish_frame(topic, frame, size).await.map(drop)
}

/// A gossip frame of `payload` for `topic` of `network`, signed by `signer`: what a node
/// publishes, for tests that alter it before [`inject_gossip_frame`].
///
/// ```
/// use micromesh::{Identity, testing::gossip_frame};
///
/// let frame = gossip_frame(&Identity::generate(), "main", "orders", 1, b"hello");
/// // Version, key, sequence number and signature come before the payload.
/// assert_eq!(frame.len(), 105 + 5);
/// assert!(frame.ends_with(b"hello"));
/// ```
pub fn gossip_frame(
    signer: &crate::Identity,
    network: &str,
    topic: &str,
    sequence: u64,
    payload: &[u8],
) -> Vec<u8> {
    let wire = crate::node::gossip::wire_topic(network, topic);
    crate::node::frame::seal(signer, &wire, sequence, payload)
}

/// The registry's gossip topic, for [`inject_gossip`].
pub const REGISTRY_TOPIC: &str = crate::registry::TOPIC;

/// Fault injection: a registry announcement of one service (`name`, version `1.0.0`), signed
/// by `signer` but claiming to come from `claimed`. Genuine when the two are the same peer, a
/// forgery otherwise.
pub fn registry_announcement(
    signer: &crate::Identity,
    claimed: crate::PeerId,
    network: &str,
    seq: u64,
    name: &str,
) -> Vec<u8> {
    use crate::registry::wire;
    let body = wire::Body::Announce {
        peer: claimed.to_bytes(),
        seq,
        ttl_ms: 30_000,
        addrs: Vec::new(),
        services: vec![wire::ServiceRecord {
            name: name.into(),
            version: "1.0.0".into(),
            metadata: crate::Metadata::new(),
            endpoints: Vec::new(),
            node_metadata: crate::Metadata::new(),
        }],
    };
    wire::sign(signer, network, &body, &[])
}

/// Hands a signed registry message (from [`registry_announcement`], say) to `registry` as if a
/// peer had sent it by sync: checked, then applied. Returns whether it was valid. For filling a
/// view with many synthetic instances in benchmarks.
pub fn feed_registry(registry: &crate::registry::Registry, message: &[u8]) -> bool {
    registry.receive(message).is_some()
}

/// Fault injection: a registry leave signed by `signer`, claiming to come from `claimed`.
pub fn registry_leave(
    signer: &crate::Identity,
    claimed: crate::PeerId,
    network: &str,
    seq: u64,
) -> Vec<u8> {
    use crate::registry::wire;
    wire::sign(
        signer,
        network,
        &wire::Body::Leave {
            peer: claimed.to_bytes(),
            seq,
        },
        &[],
    )
}

/// Fault injection: a store record for `database`/`table`/`key` with `value` and `version`,
/// signed by `signer` but naming `claimed` as its writer. Genuine when the two are the same
/// peer, a forgery otherwise. Returns the DHT key and the record's bytes, for
/// [`put_raw_record`].
#[allow(clippy::too_many_arguments)]
pub fn store_record(
    signer: &crate::Identity,
    claimed: crate::PeerId,
    network: &str,
    database: &str,
    table: &str,
    key: &str,
    value: &[u8],
    version: u64,
) -> (Vec<u8>, Vec<u8>) {
    use crate::store::record;
    let header = record::Header {
        version: record::VERSION,
        database: database.into(),
        table: table.into(),
        key: key.into(),
        revision: version,
        expires_ms: None,
        metadata: crate::Metadata::new(),
        deleted: false,
        value_len: value.len() as u64,
        value_digest: record::digest(value),
    };
    let mut entry = record::sign(signer, network, &header);
    entry.writer = claimed.to_bytes();
    (
        record::record_key(database, table, key),
        record::encode_record(&entry, value),
    )
}

/// Fault injection: puts raw bytes under a DHT key, as a misbehaving peer would, bypassing
/// every check of the [store](crate::store) on the sending side. Returns how many peers
/// acknowledged it; [`node::Error::Quorum`](crate::node::Error::Quorum) when fewer than
/// `quorum` did.
///
/// # Errors
///
/// As described, and [`node::Error::Stopped`](crate::node::Error::Stopped).
pub async fn put_raw_record(
    node: &Node,
    dht_key: Vec<u8>,
    bytes: Vec<u8>,
    quorum: usize,
) -> Result<usize, crate::node::Error> {
    node.put_record_unchecked(dht_key, bytes, quorum).await
}

/// The copies of a DHT record that `node` finds (its own first), as raw bytes.
///
/// # Errors
///
/// [`node::Error::Stopped`](crate::node::Error::Stopped) and DHT failures.
pub async fn raw_records(
    node: &Node,
    dht_key: Vec<u8>,
    want: usize,
) -> Result<Vec<Vec<u8>>, crate::node::Error> {
    Ok(node
        .get_records(dht_key, want)
        .await?
        .into_iter()
        .map(|f| f.value)
        .collect())
}

/// Fault injection: `record` (from [`store_record`]) with `grants` attached, as a writer
/// presenting them would send it. Returns `None` if `record` is not a store record.
pub fn store_record_with_grants(record: &[u8], grants: &[crate::auth::Grant]) -> Option<Vec<u8>> {
    crate::store::record::attach_grants(record, grants).ok()
}

/// Fault injection: `node` presents `grant` as its own even when the grant names another peer
/// (a peer replaying someone else's grant), and tells every connected peer.
pub fn present_any_grant(node: &Node, grant: crate::auth::Grant) {
    node.auth().present_unchecked(grant);
}

/// Fault injection: delivers `body` to queue-group member `member` of `group` on `topic`,
/// carrying `grants`, skipping every check of the publishing side, as a misbehaving peer
/// would. Returns the member's refusal (`"refused with <code>: <detail>"`) as the error.
///
/// # Errors
///
/// The member's refusal, or why the delivery could not be sent.
pub async fn deliver_unchecked(
    node: &Node,
    member: crate::PeerId,
    topic: &str,
    group: &str,
    body: &[u8],
    grants: &[crate::auth::Grant],
) -> Result<(), String> {
    let delivery = crate::broker::wire::Deliver {
        topic: topic.into(),
        group: group.into(),
        attempt: 1,
        message: raw_envelope(body, grants),
    };
    crate::broker::queue::send(node, member, &delivery).await
}

fn raw_envelope(body: &[u8], grants: &[crate::auth::Grant]) -> crate::broker::wire::Envelope {
    crate::broker::wire::Envelope {
        version: crate::broker::wire::VERSION,
        epoch: rand::random(),
        seq: 0,
        time_ms: 0,
        content_type: crate::broker::RAW_CONTENT_TYPE.into(),
        headers: crate::Metadata::new(),
        body: bytes::Bytes::copy_from_slice(body),
        grants: grants
            .iter()
            .map(|g| serde_bytes::ByteBuf::from(g.to_bytes().to_vec()))
            .collect(),
    }
}

/// Fault injection: publishes `body` on broker topic `topic` as a broker message carrying
/// `grants`, skipping every check of the publishing side (auth rules included), as a
/// misbehaving peer would. Returns whether any peer was sent it.
///
/// # Errors
///
/// [`node::Error`](crate::node::Error) from gossipsub (other than "no subscribers").
pub async fn publish_unchecked(
    node: &Node,
    topic: &str,
    body: &[u8],
    grants: &[crate::auth::Grant],
) -> Result<bool, crate::node::Error> {
    let envelope = raw_envelope(body, grants);
    match node.publish_unchecked(topic, envelope.encode()).await {
        Ok(_) => Ok(true),
        Err(crate::node::Error::Publish {
            reason: crate::node::PublishError::NoSubscribers,
            ..
        }) => Ok(false),
        Err(e) => Err(e),
    }
}
