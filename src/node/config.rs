//! How a node is configured: [`Builder`], [`Preset`], [`PreSharedKey`].

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{Identity, Multiaddr};

use super::{Error, Node, records::Records};

/// The network a node joins when none is named.
pub const DEFAULT_NETWORK: &str = "main";

/// The longest network name, in bytes.
pub const MAX_NETWORK_LEN: usize = 64;

/// Ready-made configurations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Preset {
    /// For tests and simulations: listens on libp2p's in-process memory transport
    /// (`/memory/0`), no mDNS, no UPnP, no AutoNAT, no memory-based connection limits, an
    /// ephemeral identity unless a data directory is given. Many nodes fit in one process.
    Local,
    /// For real deployments: QUIC and TCP on all IPv4 interfaces with ports chosen by the
    /// system (`/ip4/0.0.0.0/udp/0/quic-v1`, `/ip4/0.0.0.0/tcp/0`), mDNS and UPnP on, AutoNAT
    /// on, new connections refused above 90 % of system memory.
    #[default]
    Production,
}

/// Whether this node answers Kademlia queries from others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DhtMode {
    /// Server while the node has listen addresses and AutoNAT has not found it unreachable;
    /// client otherwise.
    #[default]
    Auto,
    /// Always answer queries (a node you know is reachable).
    Server,
    /// Never answer queries (a short-lived client, a node behind NAT).
    Client,
}

/// A pre-shared key that closes a network to everyone who does not hold it (libp2p `pnet`).
///
/// Every TCP and in-memory connection is encrypted with the key *before* the TLS/Noise
/// handshake, so a peer without the key cannot even learn that a micromesh node is there.
/// QUIC cannot be wrapped this way (its handshake is built in), so a node with a key does not
/// use QUIC at all, neither to listen nor to dial. The text form is the `swarm.key` format shared
/// with IPFS and go-libp2p.
///
/// ```
/// use micromesh::node::PreSharedKey;
///
/// let key = PreSharedKey::generate();
/// let again: PreSharedKey = key.to_string().parse()?;
/// assert_eq!(key.fingerprint(), again.fingerprint());
/// # Ok::<(), micromesh::node::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct PreSharedKey(pub(crate) libp2p::pnet::PreSharedKey);

impl PreSharedKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(libp2p::pnet::PreSharedKey::new(bytes))
    }

    /// A short, non-secret fingerprint to tell keys apart in logs.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }
}

impl FromStr for PreSharedKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        libp2p::pnet::PreSharedKey::from_str(s.trim_start())
            .map(Self)
            .map_err(|e| Error::InvalidConfig(format!("invalid pre-shared key: {e}")))
    }
}

impl fmt::Display for PreSharedKey {
    /// The `swarm.key` file format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_key_file())
    }
}

impl fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PreSharedKey({})", self.fingerprint())
    }
}

/// Where the node's identity comes from.
#[derive(Clone, Debug)]
pub(crate) enum IdentitySource {
    /// `<data dir>/identity.key`, or a fresh one when there is no data directory.
    Default,
    Given(Box<Identity>),
}

/// Everything a node is built from. Filled in by [`Builder`].
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) network: String,
    pub(crate) identity: IdentitySource,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) listen: Vec<Multiaddr>,
    pub(crate) bootstrap: Vec<Multiaddr>,
    pub(crate) external: Vec<Multiaddr>,
    pub(crate) mdns: bool,
    pub(crate) upnp: bool,
    pub(crate) autonat: bool,
    pub(crate) private_addresses_are_public: bool,
    /// `None`: offer relay service while reachable, when AutoNAT runs.
    pub(crate) relay_server: Option<bool>,
    pub(crate) auto_relays: usize,
    /// How long a relayed circuit may last, and how many bytes it may carry.
    pub(crate) relay_circuit_limits: (Duration, u64),
    pub(crate) memory_limit: Option<f64>,
    pub(crate) psk: Option<PreSharedKey>,
    pub(crate) dht_mode: DhtMode,
    pub(crate) idle_timeout: Duration,
    pub(crate) dial_timeout: Duration,
    pub(crate) connection_timeout: Duration,
    pub(crate) query_timeout: Duration,
    pub(crate) bootstrap_interval: Duration,
    pub(crate) max_connections: u32,
    pub(crate) max_connections_per_peer: u32,
    pub(crate) max_pending_incoming: u32,
    pub(crate) low_water: usize,
    pub(crate) high_water: usize,
    pub(crate) connection_grace: Duration,
    pub(crate) max_gossip_size: usize,
    pub(crate) gossip_heartbeat: Duration,
    pub(crate) subscription_queue: usize,
    pub(crate) command_queue: usize,
    pub(crate) event_queue: usize,
    pub(crate) replication: std::num::NonZeroUsize,
    pub(crate) auth: crate::auth::Config,
    /// An auth component made by the caller (a [`Service`](crate::Service) shares it with its
    /// other components); otherwise one is made from `auth`.
    pub(crate) auth_component: Option<crate::auth::Auth>,
    /// What keeps the DHT's records; without it, provider records only.
    pub(crate) records: RecordsSlot,
}

/// The record keeper handed to a node, taken once when it starts.
#[derive(Clone, Default)]
pub(crate) struct RecordsSlot(Arc<Mutex<Option<Box<dyn Records>>>>);

impl fmt::Debug for RecordsSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordsSlot")
    }
}

impl Config {
    fn new(preset: Preset) -> Self {
        let local = preset == Preset::Local;
        let listen = if local {
            vec!["/memory/0".parse().expect("valid multiaddr")]
        } else {
            vec![
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
            ]
        };
        Self {
            network: DEFAULT_NETWORK.into(),
            identity: IdentitySource::Default,
            data_dir: None,
            listen,
            bootstrap: Vec::new(),
            external: Vec::new(),
            mdns: !local,
            upnp: !local,
            autonat: !local,
            private_addresses_are_public: false,
            relay_server: None,
            auto_relays: 2,
            relay_circuit_limits: (Duration::from_secs(3600), 1 << 30),
            memory_limit: (!local).then_some(0.9),
            psk: None,
            dht_mode: DhtMode::Auto,
            idle_timeout: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(15),
            connection_timeout: Duration::from_secs(3),
            query_timeout: Duration::from_secs(15),
            bootstrap_interval: Duration::from_secs(300),
            max_connections: 2_000,
            max_connections_per_peer: 8,
            max_pending_incoming: 256,
            low_water: 96,
            high_water: 160,
            connection_grace: Duration::from_secs(30),
            max_gossip_size: 1 << 20,
            gossip_heartbeat: Duration::from_millis(500),
            subscription_queue: 1_024,
            command_queue: 1_024,
            event_queue: 1_024,
            replication: std::num::NonZeroUsize::new(5).expect("5 > 0"),
            auth: crate::auth::Config::default(),
            auth_component: None,
            records: RecordsSlot::default(),
        }
    }

    /// The identity the node runs as, loaded (or created) now if it comes from the data
    /// directory; later calls return the same one.
    pub(crate) fn resolve_identity(&mut self) -> Result<Identity, Error> {
        let identity = match &self.identity {
            IdentitySource::Given(identity) => return Ok((**identity).clone()),
            IdentitySource::Default => match &self.data_dir {
                Some(dir) => {
                    Identity::load_or_create(dir).map_err(|e| Error::Identity(Arc::new(e)))?
                }
                None => Identity::generate(),
            },
        };
        self.identity = IdentitySource::Given(Box::new(identity.clone()));
        Ok(identity)
    }

    /// The record keeper, if one was given and not taken yet.
    pub(crate) fn take_records(&self) -> Option<Box<dyn Records>> {
        self.records
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        check_network_name(&self.network)?;
        if self.subscription_queue == 0 || self.command_queue == 0 || self.event_queue == 0 {
            return Err(Error::InvalidConfig(
                "queue sizes must be at least 1".into(),
            ));
        }
        if self.low_water > self.high_water {
            return Err(Error::InvalidConfig(format!(
                "the connection low water mark ({}) is above the high water mark ({})",
                self.low_water, self.high_water
            )));
        }
        if self.connection_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "the connection timeout must be above zero".into(),
            ));
        }
        if self.max_gossip_size < 1024 {
            return Err(Error::InvalidConfig(
                "the gossip message size limit must be at least 1 KiB".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a network name: 1 to 64 bytes of ASCII letters, digits, `-`, `_` and `.`.
pub(crate) fn check_network_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NETWORK_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "invalid network name {name:?}: use 1 to {MAX_NETWORK_LEN} ASCII letters, digits, `-`, `_` or `.`"
        )))
    }
}

/// Builds a [`Node`]. Made by [`Node::builder`].
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), micromesh::node::Error> {
/// use micromesh::node::{Node, Preset};
///
/// let node = Node::builder().preset(Preset::Local).network("demo").build().await?;
/// assert_eq!(node.network(), "demo");
/// node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    pub(crate) config: Config,
    listen_set: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// A builder with the [`Preset::Production`] settings.
    pub fn new() -> Self {
        Self {
            config: Config::new(Preset::Production),
            listen_set: false,
        }
    }

    /// Resets every transport and discovery setting to a preset, keeping the network, identity,
    /// data directory, bootstrap peers, pre-shared key, auth policy and listen addresses already
    /// set. Default is
    /// [`Preset::Production`].
    pub fn preset(mut self, preset: Preset) -> Self {
        let mut fresh = Config::new(preset);
        fresh.network = std::mem::take(&mut self.config.network);
        fresh.identity = self.config.identity.clone();
        fresh.data_dir = self.config.data_dir.take();
        fresh.bootstrap = std::mem::take(&mut self.config.bootstrap);
        fresh.psk = self.config.psk;
        fresh.auth = std::mem::take(&mut self.config.auth);
        fresh.auth_component = self.config.auth_component.take();
        fresh.records = std::mem::take(&mut self.config.records);
        if self.listen_set {
            fresh.listen = std::mem::take(&mut self.config.listen);
        }
        self.config = fresh;
        self
    }

    /// The network to join: protocol ids and topic names carry it, so nodes of different
    /// networks never exchange DHT records or gossip even when they share peers. 1 to 64 ASCII
    /// letters, digits, `-`, `_`, `.`. Default is `"main"`.
    pub fn network(mut self, name: impl Into<String>) -> Self {
        self.config.network = name.into();
        self
    }

    /// The directory for this node's state: its identity key (`identity.key`) is created there
    /// on first start and reused afterwards. Default is none: a fresh identity on every start.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = Some(dir.into());
        self
    }

    /// Uses this identity instead of the data directory's. Default is the data directory's, or a
    /// fresh one.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.config.identity = IdentitySource::Given(Box::new(identity));
        self
    }

    /// Adds an address to listen on. The first call replaces the preset's addresses. Port 0
    /// picks a free port; `/memory/0` a free in-process address.
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        if !self.listen_set {
            self.config.listen.clear();
            self.listen_set = true;
        }
        self.config.listen.push(addr);
        self
    }

    /// Listens on nothing: a client that only dials out. Its DHT runs in client mode.
    pub fn no_listen(mut self) -> Self {
        self.config.listen.clear();
        self.listen_set = true;
        self
    }

    /// Advertises an address at which peers reach this node, beside the ones it learns itself
    /// (its listen addresses, identify's observations, AutoNAT, UPnP): the address of a port
    /// forward or a load balancer in front of it (go-micro's `Advertise`). Peers learn it through
    /// identify (and put it in their DHT routing tables) and in relay reservations; a relay
    /// server hands out circuits only while it knows at least one such address. Repeatable;
    /// default is none.
    ///
    /// ```
    /// use micromesh::node::{Node, Preset};
    ///
    /// let builder = Node::builder()
    ///     .preset(Preset::Local)
    ///     .external_address("/dns4/mesh.example.com/tcp/4001".parse()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn external_address(mut self, addr: Multiaddr) -> Self {
        self.config.external.push(addr);
        self
    }

    /// Adds a bootstrap peer, dialled at start and again whenever the node has lost every
    /// connection. A trailing `/p2p/<peer id>` is checked against the peer reached. Default is
    /// none.
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.config.bootstrap.push(addr);
        self
    }

    /// Discovers peers on the local network with mDNS. Default is on for
    /// [`Preset::Production`], off for [`Preset::Local`].
    pub fn mdns(mut self, on: bool) -> Self {
        self.config.mdns = on;
        self
    }

    /// Asks the router for a port mapping with UPnP. Default is on for [`Preset::Production`],
    /// off for [`Preset::Local`].
    pub fn upnp(mut self, on: bool) -> Self {
        self.config.upnp = on;
        self
    }

    /// Learns whether this node is reachable from outside with AutoNAT. Default is on for
    /// [`Preset::Production`], off for [`Preset::Local`].
    pub fn autonat(mut self, on: bool) -> Self {
        self.config.autonat = on;
        self
    }

    /// Lets AutoNAT treat private (RFC 1918) addresses as reachable, for labs and closed
    /// networks. Default is off.
    pub fn private_addresses_are_public(mut self, on: bool) -> Self {
        self.config.private_addresses_are_public = on;
        self
    }

    /// Offers circuit-relay service to peers that cannot be reached directly (`true`), or never
    /// (`false`). By default a node with AutoNAT on offers it while it has an external address
    /// confirmed, that is while AutoNAT finds it publicly reachable: the public nodes of a mesh
    /// are its relays, and no dedicated relay server is needed. Without AutoNAT
    /// ([`Preset::Local`]) the default is off.
    ///
    /// A circuit lasts up to an hour and carries up to 1 GiB ([`Builder::relay_circuit_limits`]).
    ///
    /// ```
    /// # use micromesh::node::Node;
    /// let never = Node::builder().relay_server(false);
    /// ```
    pub fn relay_server(mut self, on: bool) -> Self {
        self.config.relay_server = Some(on);
        self
    }

    /// How long a circuit this node relays may last, and how many bytes (both ways together) it
    /// may carry before the relay closes it. Default: an hour and 1 GiB, sized for calls and
    /// streams over a relay when hole punching cannot help (libp2p's defaults, 2 minutes and
    /// 128 KiB, fit only the coordination of a hole punch).
    ///
    /// ```
    /// # use micromesh::node::Node;
    /// use std::time::Duration;
    /// let frugal = Node::builder().relay_circuit_limits(Duration::from_secs(600), 64 << 20);
    /// ```
    pub fn relay_circuit_limits(mut self, duration: Duration, bytes: u64) -> Self {
        self.config.relay_circuit_limits = (duration, bytes);
        self
    }

    /// How many relays a node that AutoNAT has not found publicly reachable listens through
    /// (see [`crate::node`], "Across NATs"). The relays are connected peers that offer relay
    /// service; none is configured. A relay that leaves is replaced, and a node found reachable
    /// gives its relays up. 0 turns this off. Default is 2; it needs AutoNAT
    /// ([`Builder::autonat`]).
    ///
    /// ```
    /// # use micromesh::node::Node;
    /// let one_relay = Node::builder().auto_relays(1);
    /// ```
    pub fn auto_relays(mut self, relays: usize) -> Self {
        self.config.auto_relays = relays;
        self
    }

    /// Refuses new connections while this process uses more than `fraction` of the system's
    /// memory (`None` turns the check off). Default is `Some(0.9)` for
    /// [`Preset::Production`], `None` for [`Preset::Local`].
    pub fn memory_limit(mut self, fraction: Option<f64>) -> Self {
        self.config.memory_limit = fraction;
        self
    }

    /// Closes the network with a pre-shared key (see [`PreSharedKey`]; this turns QUIC off).
    /// Default is none.
    pub fn pre_shared_key(mut self, key: PreSharedKey) -> Self {
        self.config.psk = Some(key);
        self
    }

    /// Whether this node answers DHT queries. Default is [`DhtMode::Auto`].
    pub fn dht_mode(mut self, mode: DhtMode) -> Self {
        self.config.dht_mode = mode;
        self
    }

    /// How long a connection that nobody uses stays open. Connections to bootstrap peers,
    /// dialled peers and peers that components use stay open regardless. Default is 30 s.
    ///
    /// Between two micromesh nodes this rarely applies: gossipsub holds a stream open on every
    /// connection to a peer that speaks it, which counts as use. The connection manager
    /// ([`Builder::connection_water_marks`]) is what bounds those connections.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// How long [`Node::dial`] waits for a connection. Default is 15 s.
    pub fn dial_timeout(mut self, timeout: Duration) -> Self {
        self.config.dial_timeout = timeout;
        self
    }

    /// How long establishing one connection may take, on every transport: the TCP connect or
    /// the QUIC handshake, the security handshake and the multiplexer. A dial to a peer that is
    /// gone fails after this at the latest; over QUIC, which hears nothing from a closed port,
    /// this is how long such a dial takes. Default is 3 s: handshakes take a few round trips,
    /// and a dial to a dead peer should end well within a call's deadline (10 s by default).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.config.connection_timeout = timeout;
        self
    }

    /// How long one DHT query may run. Default is 15 s.
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.config.query_timeout = timeout;
        self
    }

    /// How often the DHT routing table is refreshed with a bootstrap query. Default is 5 min.
    pub fn bootstrap_interval(mut self, interval: Duration) -> Self {
        self.config.bootstrap_interval = interval;
        self
    }

    /// The most established connections in total. Default is 2,000.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.config.max_connections = n;
        self
    }

    /// The most established connections to one peer. Default is 8.
    pub fn max_connections_per_peer(mut self, n: u32) -> Self {
        self.config.max_connections_per_peer = n;
        self
    }

    /// The connection manager's water marks. When more than `high` peers are connected, the
    /// node closes connections down to `low` peers, least recently active first. Peers it never
    /// closes: bootstrap peers, dialled peers, peers kept by [`Node::keep_alive`], gossip mesh
    /// peers, and peers connected for less than the grace period. Default is 96 and 160.
    ///
    /// libp2p's idle timeout alone does not bound connections here: gossipsub keeps a stream
    /// open on every connection, so no connection between two micromesh nodes ever goes idle.
    pub fn connection_water_marks(mut self, low: usize, high: usize) -> Self {
        self.config.low_water = low;
        self.config.high_water = high;
        self
    }

    /// How long a new connection is safe from the connection manager. Default is 30 s.
    pub fn connection_grace(mut self, grace: Duration) -> Self {
        self.config.connection_grace = grace;
        self
    }

    /// The largest gossip message, in bytes (after the network's framing). Default is 1 MiB.
    pub fn max_gossip_size(mut self, bytes: usize) -> Self {
        self.config.max_gossip_size = bytes;
        self
    }

    /// The gossipsub heartbeat: how often meshes are repaired and gossip is emitted. Default is
    /// 500 ms.
    pub fn gossip_heartbeat(mut self, interval: Duration) -> Self {
        self.config.gossip_heartbeat = interval;
        self
    }

    /// How many messages each [`Subscription`](super::Subscription) queues before it drops
    /// new ones. Default is 1,024.
    pub fn subscription_queue(mut self, messages: usize) -> Self {
        self.config.subscription_queue = messages;
        self
    }

    /// How many peers closest to a key hold each [store](crate::store) record (Kademlia's
    /// replication factor; also how many closest peers a DHT lookup returns). Every node of a
    /// network should use the same value. Default is 5: with the store's write quorum of 3, a
    /// record survives the loss of any two of its holders.
    pub fn replication(mut self, peers: std::num::NonZeroUsize) -> Self {
        self.config.replication = peers;
        self
    }

    /// The node's [auth](crate::auth) policy: trusted issuers, rules, default policy, and the
    /// grants it presents. Default: no rules, any authenticated peer allowed.
    pub fn auth(mut self, config: crate::auth::Config) -> Self {
        self.config.auth = config;
        self
    }

    /// The identity the node will run as: loaded (or created) from the data directory now, so
    /// that components made before the node can know its peer id.
    pub(crate) fn resolve_identity(&mut self) -> Result<Identity, Error> {
        self.config.resolve_identity()
    }

    /// The data directory, if any.
    pub(crate) fn data_dir_path(&self) -> Option<&Path> {
        self.config.data_dir.as_deref()
    }

    /// Whether bootstrap peers were given.
    pub(crate) fn has_bootstrap(&self) -> bool {
        !self.config.bootstrap.is_empty()
    }

    /// The network the node will join.
    pub(crate) fn network_name(&self) -> &str {
        &self.config.network
    }

    /// The auth configuration given with [`Builder::auth`].
    pub(crate) fn auth_config(&self) -> &crate::auth::Config {
        &self.config.auth
    }

    /// Runs with this auth component instead of one made from the configuration.
    pub(crate) fn auth_component(mut self, auth: crate::auth::Auth) -> Self {
        self.config.auth_component = Some(auth);
        self
    }

    /// Keeps the DHT's records in `records` (the store's keeper).
    pub(crate) fn records(self, records: Box<dyn Records>) -> Self {
        *self
            .config
            .records
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(records);
        self
    }

    /// Starts the node: loads or creates its identity, builds the swarm, listens, dials the
    /// bootstrap peers, and spawns the event loop on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad network name or setting, [`Error::Identity`] if the
    /// identity key cannot be loaded, [`Error::Transport`] if the transports cannot be built,
    /// [`Error::Listen`] if an address cannot be listened on.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn build(self) -> Result<Node, Error> {
        Node::start(self.config).await
    }
}
