//! The task that owns the swarm.
//!
//! It waits on three things: commands from handles, swarm events, and a one-second tick for
//! timeouts and housekeeping. Nothing here blocks or awaits anything but those three, so one
//! slow caller can never stall the node.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroUsize,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat,
    core::transport::ListenerId,
    gossipsub, identify,
    kad::{self, store::RecordStore as _},
    mdns,
    metrics::Recorder as _,
    multiaddr::Protocol,
    ping, relay,
    swarm::{ConnectionId, SwarmEvent, dial_opts::DialOpts},
    upnp,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Command, DhtMode, DhtPeer, Error, Event, ExitReason, FoundRecord, PeerInfo, ProvidersReply,
    PublishError,
    behaviour::{
        Behaviour, BehaviourEvent, OptionalEvent, kad_protocol, keep_alive_protocol, leave_protocol,
    },
    config::Config,
    dial_error,
    gossip::{self, Delivery, Subscriber, Validation},
    metrics::NodeMetrics,
    relays, scoring, streams, tasks, validation,
};

/// How long a shutdown waits for connections to close gracefully.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long `build` waits for the listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Redials of bootstrap peers back off from 1 s to this.
const MAX_BOOTSTRAP_BACKOFF: Duration = Duration::from_secs(30);
/// How long an older connection has to answer a liveness probe when its peer connects again.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Older connections younger than this are not probed: two peers dialling each other at once
/// open two live connections within moments; a restart takes longer.
const STALE_MIN_AGE: Duration = Duration::from_secs(1);
/// How long a graceful stop lets the last published gossip message leave.
const PUBLISH_LINGER: Duration = Duration::from_millis(500);
/// How many stale-connection reports wait for the event loop.
const STALE_QUEUE: usize = 64;
/// How long a stopping node waits for its peers to take its goodbye (`protocols/leave.md`).
const LEAVE_GRACE: Duration = Duration::from_millis(500);

struct PeerState {
    connections: HashMap<ConnectionId, Multiaddr>,
    connected_at: Instant,
    last_active: Instant,
    rtt: Option<Duration>,
    agent: Option<String>,
    same_network: Option<bool>,
    /// The direct addresses last dialled while the peer was reachable only through a relay.
    dialled_past_relay: Vec<Multiaddr>,
}

impl PeerState {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            connections: HashMap::new(),
            connected_at: now,
            last_active: now,
            rtt: None,
            agent: None,
            same_network: None,
            dialled_past_relay: Vec::new(),
        }
    }
}

struct PendingDial {
    addr: Multiaddr,
    deadline: Instant,
    reply: Option<oneshot::Sender<Result<PeerId, Error>>>,
}

enum Query {
    FindPeer {
        peer: PeerId,
        reply: oneshot::Sender<Result<Vec<Multiaddr>, Error>>,
    },
    Bootstrap {
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Provide {
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Providers {
        found: HashSet<PeerId>,
        reply: ProvidersReply,
    },
    PutRecord {
        quorum: usize,
        reply: oneshot::Sender<Result<usize, Error>>,
    },
    GetRecord {
        want: usize,
        found: Vec<FoundRecord>,
        reply: oneshot::Sender<Result<Vec<FoundRecord>, Error>>,
    },
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<Event>,
    metrics: libp2p::metrics::Metrics,
    network: String,
    kad_protocol: StreamProtocol,
    replication: usize,
    dht_mode: DhtMode,
    dial_timeout: Duration,
    bootstrap_addrs: Vec<Multiaddr>,
    bootstrap_peers: HashSet<PeerId>,
    bootstrap_backoff: Duration,
    next_bootstrap_dial: Instant,
    dht_bootstrapped: bool,
    peers: HashMap<PeerId, PeerState>,
    listen_addrs: Vec<Multiaddr>,
    dials: HashMap<ConnectionId, PendingDial>,
    queries: HashMap<kad::QueryId, Query>,
    topics: HashMap<String, Vec<Subscriber>>,
    gossip_prefix: String,
    max_gossip_size: usize,
    /// DHT commands made while the routing table was empty but connected peers were not yet
    /// identified: they run as soon as the table has a peer, or fail at their deadline.
    waiting_for_dht: Vec<(Instant, Command)>,
    listeners: Vec<ListenerId>,
    low_water: usize,
    high_water: usize,
    connection_grace: Duration,
    metrics_local: NodeMetrics,
    connected: Arc<RwLock<HashSet<PeerId>>>,
    /// Probes waiting for a connection to a peer: deadline, the address shown in errors, reply.
    probes: HashMap<PeerId, Vec<Probe>>,
    /// Opens liveness probes on older connections when a peer connects again.
    opener: streams::Opener,
    keep_alive_protocol: StreamProtocol,
    /// Older connections found dead by a liveness probe, reported by the probe tasks.
    stale_tx: mpsc::Sender<(PeerId, ConnectionId)>,
    stale_rx: mpsc::Receiver<(PeerId, ConnectionId)>,
    /// Peers disconnected because a connection to them was stale: dialled again once every
    /// connection to them has closed, so that every protocol starts afresh with them.
    redial_after_close: HashSet<PeerId>,
    /// The connected peers subscribed to each topic of the network (topic name without the
    /// network prefix), as gossipsub reported their subscriptions.
    topic_peers: HashMap<String, HashSet<PeerId>>,
    /// Validation hooks of gossip topics (user topic name → hook), shared with the workers.
    hooks: validation::Hooks,
    /// The validation worker of each subscribed topic.
    workers: HashMap<String, mpsc::Sender<validation::Pending>>,
    /// Verdicts of the workers, sent back to this loop.
    verdicts_tx: mpsc::Sender<validation::Checked>,
    verdicts_rx: mpsc::Receiver<validation::Checked>,
    /// When this node last published a gossip message.
    last_publish: Option<Instant>,
    /// Why the last dial failed, in plain words: the cause given when the node cannot ask the
    /// mesh for lack of peers.
    last_dial_failure: Option<String>,
    /// Goodbyes of peers that stop (`protocols/leave.md`).
    leaves: mpsc::Receiver<(PeerId, libp2p::Stream)>,
    leave_protocol: StreamProtocol,
    /// Connected peers that said goodbye: their connections closing is no reason to check on
    /// them.
    departed: HashSet<PeerId>,
    /// The owner of the node's background tasks.
    tasks: tasks::Tasks,
    /// The relays this node listens through while it is not known to be reachable.
    relays: relays::AutoRelay,
    /// Whether a peer reached only through a relay is dialled at the direct addresses it
    /// reports (with AutoNAT on: where NATs are expected).
    dial_past_relays: bool,
    /// Whether relay service is offered exactly while AutoNAT finds the node reachable (the
    /// default), rather than always or never.
    relay_server_follows_reachability: bool,
}

type Probe = (Instant, Multiaddr, oneshot::Sender<Result<PeerId, Error>>);

/// What the event loop shares with the node's handles.
pub(crate) struct Wiring {
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) metrics: libp2p::metrics::Metrics,
    pub(crate) metrics_local: NodeMetrics,
    pub(crate) connected: Arc<RwLock<HashSet<PeerId>>>,
    pub(crate) opener: streams::Opener,
    pub(crate) leaves: mpsc::Receiver<(PeerId, libp2p::Stream)>,
    pub(crate) tasks: tasks::Tasks,
}

impl EventLoop {
    pub(crate) fn new(swarm: Swarm<Behaviour>, config: &Config, wiring: Wiring) -> Self {
        let Wiring {
            commands,
            events,
            metrics,
            metrics_local,
            connected,
            opener,
            leaves,
            tasks,
        } = wiring;
        let (stale_tx, stale_rx) = mpsc::channel(STALE_QUEUE);
        let (verdicts_tx, verdicts_rx) = mpsc::channel(validation::VERDICT_QUEUE);
        Self {
            swarm,
            commands,
            events,
            metrics,
            network: config.network.clone(),
            kad_protocol: kad_protocol(&config.network),
            replication: config.replication.get(),
            dht_mode: config.dht_mode,
            dial_timeout: config.dial_timeout,
            bootstrap_addrs: config.bootstrap.clone(),
            bootstrap_peers: HashSet::new(),
            bootstrap_backoff: Duration::from_secs(1),
            next_bootstrap_dial: Instant::now(),
            dht_bootstrapped: false,
            peers: HashMap::new(),
            listen_addrs: Vec::new(),
            dials: HashMap::new(),
            queries: HashMap::new(),
            topics: HashMap::new(),
            gossip_prefix: gossip::topic_prefix(&config.network),
            max_gossip_size: config.max_gossip_size,
            waiting_for_dht: Vec::new(),
            listeners: Vec::new(),
            low_water: config.low_water,
            high_water: config.high_water,
            connection_grace: config.connection_grace,
            metrics_local,
            connected,
            probes: HashMap::new(),
            opener,
            keep_alive_protocol: keep_alive_protocol(&config.network),
            stale_tx,
            stale_rx,
            redial_after_close: HashSet::new(),
            topic_peers: HashMap::new(),
            hooks: validation::Hooks::default(),
            workers: HashMap::new(),
            verdicts_tx,
            verdicts_rx,
            last_publish: None,
            last_dial_failure: None,
            leaves,
            leave_protocol: leave_protocol(&config.network),
            departed: HashSet::new(),
            tasks,
            relays: relays::AutoRelay::new(if config.autonat {
                config.auto_relays
            } else {
                0
            }),
            dial_past_relays: config.autonat,
            relay_server_follows_reachability: config.relay_server.is_none() && config.autonat,
        }
    }

    /// Listens, sets the DHT mode and dials the bootstrap peers. Runs before the task is
    /// spawned, so that listen errors reach the caller of `build`, and returns once every
    /// listener has reported its first address.
    pub(crate) async fn start(&mut self, config: &Config) -> Result<(), Error> {
        for addr in &config.external {
            self.swarm.add_external_address(addr.clone());
        }
        let mut listeners = HashMap::new();
        for addr in &config.listen {
            if config.psk.is_some() && is_quic(addr) {
                return Err(Error::Listen {
                    addr: addr.clone(),
                    source: super::Cause::new(
                        "QUIC cannot carry a pre-shared key; listen on TCP instead",
                    ),
                });
            }
            let id = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Listen {
                    addr: addr.clone(),
                    source: super::Cause::new(e),
                })?;
            listeners.insert(id, addr.clone());
            self.listeners.push(id);
        }
        let server = match self.dht_mode {
            DhtMode::Server => true,
            DhtMode::Client => false,
            DhtMode::Auto => !config.listen.is_empty(),
        };
        self.set_dht_server(server);
        for addr in &config.bootstrap {
            if let Some(peer) = peer_of(addr) {
                self.bootstrap_peers.insert(peer);
                self.swarm.behaviour_mut().keep_alive.set(peer, true);
            }
        }
        // The bootstrap dials leave at once: they need no listening address, and a node
        // joins the mesh while its listeners come up rather than after. A relayed listening
        // address connects to its relay itself, and a dial of the same peer at the same time
        // would race that connection: such a node dials once it listens.
        let relayed = config.listen.iter().any(relays::is_relayed);
        if !relayed {
            self.dial_bootstrap_peers();
        }
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while !listeners.is_empty() {
            let event = tokio::select! {
                event = self.swarm.select_next_some() => event,
                _ = &mut deadline => {
                    let addr = listeners.into_values().next().expect("not empty");
                    return Err(Error::Listen { addr, source: super::Cause::new("no address reported in time") });
                }
            };
            match &event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    listeners.remove(listener_id);
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    ..
                } => {
                    if let Some(addr) = listeners.remove(listener_id) {
                        return Err(Error::Listen {
                            addr,
                            source: match reason {
                                Err(e) => {
                                    super::Cause::new(std::io::Error::new(e.kind(), e.to_string()))
                                }
                                Ok(()) => super::Cause::new("the listener closed"),
                            },
                        });
                    }
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    if let Some(addr) = listeners.remove(listener_id) {
                        return Err(Error::Listen {
                            addr,
                            source: super::Cause::new(std::io::Error::new(
                                error.kind(),
                                error.to_string(),
                            )),
                        });
                    }
                }
                _ => {}
            }
            self.on_swarm_event(event);
        }
        if relayed {
            self.dial_bootstrap_peers();
        }
        Ok(())
    }

    pub(crate) async fn run(mut self) -> ExitReason {
        tracing::debug!(peer = %self.swarm.local_peer_id(), "node event loop started");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        self.drain().await;
                        let _ = reply.send(());
                        return ExitReason::Shutdown;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        self.drain().await;
                        return ExitReason::HandlesDropped;
                    }
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, connection)) = self.stale_rx.recv() => self.on_stale(peer, connection),
                // The goodbye is the stream itself; its byte need not be read.
                Some((peer, _goodbye)) = self.leaves.recv() => self.on_peer_left(peer),
                Some(checked) = self.verdicts_rx.recv() => self.on_checked(checked),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    /// A peer connected again while older connections to it were open. When it restarted
    /// (same identity, new process), those older connections are dead but linger until their
    /// idle timeout, and protocols that pick one connection per peer (gossipsub, for one) keep
    /// sending into them. Each older connection must answer a stream negotiation within
    /// [`STALE_PROBE_TIMEOUT`].
    fn probe_older_connections(&mut self, peer: PeerId, newest: ConnectionId) {
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        if state.connected_at.elapsed() < STALE_MIN_AGE {
            return;
        }
        for &connection in state.connections.keys().filter(|&&c| c != newest) {
            let opener = self.opener.clone();
            let protocol = self.keep_alive_protocol.clone();
            let stale = self.stale_tx.clone();
            self.tasks.spawn("node", async move {
                let probe = opener.open_on(peer, connection, protocol);
                match tokio::time::timeout(STALE_PROBE_TIMEOUT, probe).await {
                    // Alive, closed meanwhile, or refused for a reason of its own: only a
                    // connection that does not answer at all is dead.
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "liveness probe of an older connection: {e}");
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "older connection did not answer a liveness probe");
                        let _ = stale.send((peer, connection)).await;
                    }
                }
            });
        }
    }

    /// An older connection to `peer` is dead: the peer restarted. Every connection to it is
    /// closed and the peer dialled again once they are gone, so that gossipsub, which greets a
    /// peer only on its first connection, exchanges subscriptions with the new process.
    fn on_stale(&mut self, peer: PeerId, connection: ConnectionId) {
        let still_open = self
            .peers
            .get(&peer)
            .is_some_and(|state| state.connections.contains_key(&connection));
        if !still_open {
            return;
        }
        tracing::info!(%peer, "peer restarted: reconnecting");
        self.metrics_local.stale_connections.inc();
        self.redial_after_close.insert(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Says goodbye to the peers of the network, then closes every connection and waits
    /// (briefly) for them to close.
    async fn drain(&mut self) {
        let mut goodbyes = tokio::task::JoinSet::new();
        for (peer, state) in &self.peers {
            if state.same_network == Some(true) {
                let opener = self.opener.clone();
                let protocol = self.leave_protocol.clone();
                goodbyes.spawn(say_goodbye(opener, *peer, protocol));
            }
        }
        let goodbyes_until = Instant::now() + LEAVE_GRACE;
        // Gossipsub cannot say when its send queues are empty: give messages published just
        // before the stop a moment to leave before the connections close under them.
        let linger_until = self.last_publish.map(|last| last + PUBLISH_LINGER);
        loop {
            let now = Instant::now();
            let saying_goodbye = !goodbyes.is_empty() && now < goodbyes_until;
            let lingering = linger_until.is_some_and(|until| now < until);
            if !saying_goodbye && !lingering {
                break;
            }
            let wake = match (saying_goodbye, linger_until) {
                (true, Some(linger)) => goodbyes_until.max(linger),
                (true, None) => goodbyes_until,
                (false, linger) => linger.unwrap_or(now),
            };
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(_) = goodbyes.join_next(), if saying_goodbye => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        goodbyes.abort_all();
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        while !self.peers.is_empty() {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = &mut deadline => break,
            }
        }
        tracing::debug!("node event loop stopped");
    }

    /// `peer` said goodbye: it leaves the routing table and takes its provider records along.
    fn on_peer_left(&mut self, peer: PeerId) {
        tracing::debug!(%peer, "peer said goodbye");
        self.metrics_local.peers_left.inc();
        if self.peers.contains_key(&peer) {
            self.departed.insert(peer);
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        kad.remove_peer(&peer);
        kad.store_mut().forget_provider(&peer);
        self.emit(Event::PeerLeft { peer_id: peer });
    }

    /// Whether the DHT routing table holds `peer`.
    fn in_routing_table(&mut self, peer: &PeerId) -> bool {
        self.swarm
            .behaviour_mut()
            .kad
            .kbucket(*peer)
            .is_some_and(|bucket| bucket.iter().any(|entry| entry.node.key.preimage() == peer))
    }

    fn emit(&self, event: Event) {
        // No receivers is fine: nobody is listening.
        let _ = self.events.send(event);
    }

    fn set_dht_server(&mut self, server: bool) {
        let mode = if server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        };
        self.swarm.behaviour_mut().kad.set_mode(Some(mode));
    }

    fn dial_bootstrap_peers(&mut self) {
        // The next redial (when every connection is lost) waits for the backoff.
        self.next_bootstrap_dial = Instant::now() + self.bootstrap_backoff;
        for addr in self.bootstrap_addrs.clone() {
            if let Some(peer) = peer_of(&addr)
                && self.peers.contains_key(&peer)
            {
                continue;
            }
            let opts = dial_opts(&addr);
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.dials.insert(
                        id,
                        PendingDial {
                            addr,
                            deadline: Instant::now() + self.dial_timeout,
                            reply: None,
                        },
                    );
                }
                // A dial to it is already under way.
                Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    tracing::warn!(%addr, "cannot dial bootstrap peer: {}", dial_error::explain(&e))
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<ConnectionId> = self
            .dials
            .iter()
            .filter(|(_, d)| d.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(dial) = self.dials.remove(&id) {
                self.last_dial_failure = Some(format!(
                    "no connection to {} within {:?}",
                    dial_error::without_peer(&dial.addr),
                    self.dial_timeout
                ));
                if let Some(reply) = dial.reply {
                    let _ = reply.send(Err(Error::DialTimeout {
                        addr: dial.addr,
                        timeout: self.dial_timeout,
                    }));
                }
            }
        }
        for waiters in self.probes.values_mut() {
            let (late, on_time): (Vec<_>, Vec<_>) = std::mem::take(waiters)
                .into_iter()
                .partition(|(d, _, _)| *d <= now);
            *waiters = on_time;
            for (_, addr, reply) in late {
                let _ = reply.send(Err(Error::DialTimeout {
                    addr,
                    timeout: self.dial_timeout,
                }));
            }
        }
        self.probes.retain(|_, waiters| !waiters.is_empty());
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_for_dht)
            .into_iter()
            .partition(|(deadline, _)| *deadline <= now);
        self.waiting_for_dht = waiting;
        for (_, command) in expired {
            fail_for_lack_of_peers(command, self.alone_reason());
        }
        self.fail_waiting_if_alone();
        if self.peers.is_empty()
            && !self.bootstrap_addrs.is_empty()
            && now >= self.next_bootstrap_dial
        {
            self.dial_bootstrap_peers();
            self.bootstrap_backoff = (self.bootstrap_backoff * 2).min(MAX_BOOTSTRAP_BACKOFF);
        }
        // Subscriptions dropped while the command queue was full.
        let mut emptied = Vec::new();
        for (topic, subscribers) in &mut self.topics {
            subscribers.retain(|s| !s.queue.is_closed());
            if subscribers.is_empty() {
                emptied.push(topic.clone());
            }
        }
        for topic in emptied {
            self.unsubscribe_topic(&topic);
        }
        self.prune_connections(now);
    }

    /// The connection manager: above the high water mark, closes the least recently active
    /// connections that nothing protects, down to the low water mark.
    fn prune_connections(&mut self, now: Instant) {
        if self.peers.len() <= self.high_water {
            return;
        }
        let behaviour = self.swarm.behaviour();
        let mesh: HashSet<PeerId> = behaviour.gossipsub.all_mesh_peers().copied().collect();
        let mut candidates: Vec<(Instant, PeerId)> = self
            .peers
            .iter()
            .filter(|(peer, state)| {
                !behaviour.keep_alive.is_kept(peer)
                    && !mesh.contains(peer)
                    && now.duration_since(state.connected_at) >= self.connection_grace
            })
            .map(|(peer, state)| (state.last_active, *peer))
            .collect();
        candidates.sort();
        let excess = self.peers.len() - self.low_water;
        for (_, peer) in candidates.into_iter().take(excess) {
            tracing::debug!(%peer, "closing an unused connection (connection manager)");
            self.metrics_local.connections_pruned.inc();
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn on_command(&mut self, command: Command) {
        // A provider record is stored locally at once and announced to whoever is known: a
        // node alone can provide; one with connections waits until it knows their addresses.
        let needs_dht = match command {
            Command::FindPeer { .. } | Command::Bootstrap { .. } | Command::Providers { .. } => {
                true
            }
            Command::Provide { .. } => !self.peers.is_empty(),
            // A record goes to (or comes from) the DHT once the routing table knows the peers
            // this node is connected to; a node with no connections works on its own copy.
            Command::PutRecord { .. } | Command::GetRecord { .. } => !self.peers.is_empty(),
            _ => false,
        };
        if needs_dht && self.no_dht_peers() {
            if self.peers.is_empty() && !self.joining() {
                fail_for_lack_of_peers(command, self.alone_reason());
            } else {
                // Connected, but identify has not told us the peers' addresses yet; or a dial (a
                // bootstrap peer's, at start) is under way: a command made right after `build`
                // runs once the node has joined, as it would a moment later.
                self.waiting_for_dht
                    .push((Instant::now() + self.dial_timeout, command));
            }
            return;
        }
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::ExternalAddrs { reply } => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .swarm
                    .external_addresses()
                    .map(|a| a.clone().with_p2p(me).unwrap_or_else(|a| a))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::Dial { addr, reply } => self.dial(addr, reply),
            Command::Probe { peer, addrs, reply } => {
                if self.peers.contains_key(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                // Every probe of a peer waits for the same dial: the first starts it, the
                // others (and probes during a dial started elsewhere) join.
                let shown = addrs
                    .first()
                    .cloned()
                    .unwrap_or_else(|| Multiaddr::empty().with(Protocol::P2p(peer)));
                let deadline = Instant::now() + self.dial_timeout;
                let waiters = self.probes.entry(peer).or_default();
                let first = waiters.is_empty();
                waiters.push((deadline, shown.clone(), reply));
                if first {
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    match self.swarm.dial(opts) {
                        Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                        Err(e) => self.finish_probes(peer, Err(dial_error::explain(&e))),
                    }
                }
            }
            Command::Peers { reply } => {
                let peers = self
                    .peers
                    .iter()
                    .map(|(peer_id, state)| PeerInfo {
                        peer_id: *peer_id,
                        addresses: state.connections.values().cloned().collect(),
                        rtt: state.rtt,
                        agent: state.agent.clone(),
                        same_network: state.same_network,
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::DhtPeers { reply } => {
                let peers = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .flat_map(|bucket| {
                        bucket
                            .iter()
                            .map(|entry| DhtPeer {
                                peer_id: *entry.node.key.preimage(),
                                addresses: entry.node.value.iter().cloned().collect(),
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::FindPeer { peer, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.queries.insert(id, Query::FindPeer { peer, reply });
            }
            Command::Bootstrap { reply } => match self.swarm.behaviour_mut().kad.bootstrap() {
                Ok(id) => {
                    self.queries
                        .insert(id, Query::Bootstrap { reply: Some(reply) });
                }
                Err(kad::NoKnownPeers()) => {
                    let _ = reply.send(Err(Error::NoKnownPeers(self.alone_reason())));
                }
            },
            Command::Provide { key, reply } => {
                match self.swarm.behaviour_mut().kad.start_providing(key.into()) {
                    Ok(id) => {
                        self.queries.insert(id, Query::Provide { reply });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Dht {
                            operation: "provider announcement",
                            source: super::Cause::new(e),
                        }));
                    }
                }
            }
            Command::PutRecord {
                key,
                value,
                quorum,
                checked,
                reply,
            } => {
                if checked {
                    self.put_record(key, value, quorum, reply);
                } else {
                    self.put_record_unchecked(key, value, quorum, reply);
                }
            }
            Command::GetRecord { key, want, reply } => {
                let key = kad::RecordKey::new(&key);
                if self.routing_table_size() == 0 {
                    let local = self.swarm.behaviour_mut().kad.store_mut().get(&key);
                    let found = local
                        .map(|r| FoundRecord {
                            peer: None,
                            value: r.value.clone(),
                        })
                        .into_iter()
                        .collect();
                    let _ = reply.send(Ok(found));
                } else {
                    let id = self.swarm.behaviour_mut().kad.get_record(key);
                    self.queries.insert(
                        id,
                        Query::GetRecord {
                            want: want.max(1),
                            found: Vec::new(),
                            reply,
                        },
                    );
                }
            }
            Command::PutRecordTo { key, value, peers } => {
                if !peers.is_empty() {
                    let quorum = NonZeroUsize::new(peers.len()).expect("not empty");
                    self.swarm.behaviour_mut().kad.put_record_to(
                        kad::Record::new(key, value),
                        peers.into_iter(),
                        kad::Quorum::N(quorum),
                    );
                }
            }
            Command::StopProviding { key } => {
                self.swarm.behaviour_mut().kad.stop_providing(&key.into());
            }
            Command::Providers { key, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key.into());
                self.queries.insert(
                    id,
                    Query::Providers {
                        found: HashSet::new(),
                        reply,
                    },
                );
            }
            Command::Subscribe {
                topic,
                subscriber,
                reply,
            } => {
                let wire = gossipsub::IdentTopic::new(gossip::wire_topic(&self.network, &topic));
                let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
                let result = match gossipsub.subscribe(&wire) {
                    Ok(_) => {
                        // Invalid messages on the topic then count against their senders.
                        let _ = gossipsub.set_topic_params(wire, scoring::topic_params());
                        self.start_worker(&topic);
                        self.topics.entry(topic).or_default().push(subscriber);
                        Ok(())
                    }
                    Err(e) => Err(Error::InvalidTopic {
                        topic,
                        reason: e.to_string(),
                    }),
                };
                let _ = reply.send(result);
            }
            Command::Unsubscribe { topic, id } => {
                if let Some(subscribers) = self.topics.get_mut(&topic) {
                    subscribers.retain(|s| s.id != id);
                    if subscribers.is_empty() {
                        self.unsubscribe_topic(&topic);
                    }
                }
            }
            Command::Publish {
                topic,
                frame,
                size,
                reply,
            } => {
                let wire = gossipsub::IdentTopic::new(gossip::wire_topic(&self.network, &topic));
                self.last_publish = Some(Instant::now());
                let subscribers = self.topic_peers.get(&topic).map_or(0, HashSet::len);
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(wire, frame)
                    .map(|_| subscribers)
                    .map_err(|e| Error::Publish {
                        topic,
                        reason: match e {
                            gossipsub::PublishError::NoPeersSubscribedToTopic => {
                                PublishError::NoSubscribers
                            }
                            gossipsub::PublishError::MessageTooLarge => PublishError::TooLarge {
                                size,
                                max: self.max_gossip_size,
                            },
                            gossipsub::PublishError::Duplicate => PublishError::Duplicate,
                            gossipsub::PublishError::AllQueuesFull(_) => PublishError::QueuesFull,
                            other => PublishError::Other(other.to_string()),
                        },
                    });
                let _ = reply.send(result);
            }
            Command::TopicPeers { topic, reply } => {
                let peers = self
                    .topic_peers
                    .get(&topic)
                    .map(|peers| peers.iter().copied().collect())
                    .unwrap_or_default();
                let _ = reply.send(peers);
            }
            Command::TopicsWithPrefix { prefix, reply } => {
                let found = self
                    .topic_peers
                    .iter()
                    .filter(|(topic, _)| topic.starts_with(&prefix))
                    .flat_map(|(topic, peers)| peers.iter().map(|peer| (topic.clone(), *peer)))
                    .collect();
                let _ = reply.send(found);
            }
            Command::SetValidator { topic, validator } => {
                let mut hooks = self.hooks.write().unwrap_or_else(|e| e.into_inner());
                match validator {
                    Some(validator) => hooks.insert(topic, validator),
                    None => hooks.remove(&topic),
                };
            }
            Command::GossipScore { peer, reply } => {
                let _ = reply.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::KeepAlive { peer, keep } => {
                // Bootstrap peers stay kept whatever a component says.
                let keep = keep || self.bootstrap_peers.contains(&peer);
                self.swarm.behaviour_mut().keep_alive.set(peer, keep);
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    /// Answers every probe of `peer`: connected, or why not.
    fn finish_probes(&mut self, peer: PeerId, outcome: Result<(), String>) {
        for (_, addr, reply) in self.probes.remove(&peer).unwrap_or_default() {
            let _ = reply.send(match &outcome {
                Ok(()) => Ok(peer),
                Err(reason) => Err(Error::Dial {
                    addr,
                    reason: reason.clone(),
                }),
            });
        }
    }

    /// Whether a connection is being made (a bootstrap dial, a user's dial, a probe).
    fn joining(&self) -> bool {
        !self.dials.is_empty() || !self.probes.is_empty()
    }

    /// Why the node cannot ask the mesh, for errors.
    fn alone_reason(&self) -> String {
        match &self.last_dial_failure {
            Some(reason) if !self.bootstrap_addrs.is_empty() => {
                format!("cannot reach a bootstrap peer: {reason}")
            }
            Some(reason) => format!("the last dial failed: {reason}"),
            None if self.bootstrap_addrs.is_empty() => {
                "give the node a bootstrap peer, or dial one".into()
            }
            None => "no bootstrap peer has answered yet".into(),
        }
    }

    /// Fails the DHT commands that wait for a first peer once no connection is left to wait for.
    fn fail_waiting_if_alone(&mut self) {
        if self.waiting_for_dht.is_empty() || !self.peers.is_empty() || self.joining() {
            return;
        }
        let reason = self.alone_reason();
        for (_, command) in std::mem::take(&mut self.waiting_for_dht) {
            fail_for_lack_of_peers(command, reason.clone());
        }
    }

    /// The peers in Kademlia's routing table.
    fn routing_table_size(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|bucket| bucket.num_entries())
            .sum()
    }

    fn put_record(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        quorum: usize,
        reply: oneshot::Sender<Result<usize, Error>>,
    ) {
        let quorum = quorum.min(self.routing_table_size());
        let record = kad::Record::new(key, value);
        let local = *self.swarm.local_peer_id();
        let kad = &mut self.swarm.behaviour_mut().kad;
        let result = if quorum == 0 {
            let mut record = record;
            record.publisher = Some(local);
            kad.store_mut().put(record).map(|()| None)
        } else {
            let n = NonZeroUsize::new(quorum).expect("quorum > 0");
            kad.put_record(record, kad::Quorum::N(n)).map(Some)
        };
        match result {
            Ok(Some(id)) => {
                self.queries.insert(id, Query::PutRecord { quorum, reply });
            }
            Ok(None) => {
                let _ = reply.send(Ok(0));
            }
            Err(e) => {
                let reason = kad
                    .store_mut()
                    .take_refusal()
                    .unwrap_or_else(|| e.to_string());
                let _ = reply.send(Err(Error::RecordRefused(reason)));
            }
        }
    }

    fn put_record_unchecked(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        quorum: usize,
        reply: oneshot::Sender<Result<usize, Error>>,
    ) {
        let record = kad::Record::new(key, value);
        let kad = &mut self.swarm.behaviour_mut().kad;
        let target = kad::KBucketKey::new(record.key.clone());
        let peers: Vec<PeerId> = kad
            .get_closest_local_peers(&target)
            .map(|k| *k.preimage())
            .take(self.replication)
            .collect();
        let quorum = quorum.clamp(1, peers.len().max(1));
        let n = NonZeroUsize::new(quorum).expect("quorum > 0");
        let id = kad.put_record_to(record, peers.into_iter(), kad::Quorum::N(n));
        self.queries.insert(id, Query::PutRecord { quorum, reply });
    }

    fn no_dht_peers(&mut self) -> bool {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .all(|bucket| bucket.num_entries() == 0)
    }

    /// Starts the validation worker of `topic` unless it runs.
    fn start_worker(&mut self, topic: &str) {
        if self.workers.contains_key(topic) {
            return;
        }
        let (tx, rx) = mpsc::channel(validation::TOPIC_QUEUE);
        self.workers.insert(topic.to_owned(), tx);
        self.tasks.spawn(
            "gossip",
            validation::worker(
                topic.to_owned(),
                gossip::wire_topic(&self.network, topic),
                rx,
                self.hooks.clone(),
                self.verdicts_tx.clone(),
            ),
        );
    }

    fn unsubscribe_topic(&mut self, topic: &str) {
        self.topics.remove(topic);
        // Its worker ends once it has checked what it holds.
        self.workers.remove(topic);
        let wire = gossipsub::IdentTopic::new(gossip::wire_topic(&self.network, topic));
        self.swarm.behaviour_mut().gossipsub.unsubscribe(&wire);
    }

    fn dial(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, Error>>) {
        if let Some(peer) = peer_of(&addr)
            && self.peers.contains_key(&peer)
        {
            self.swarm.behaviour_mut().keep_alive.set(peer, true);
            let _ = reply.send(Ok(peer));
            return;
        }
        let opts = dial_opts(&addr);
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dials.insert(
                    id,
                    PendingDial {
                        addr,
                        deadline: Instant::now() + self.dial_timeout,
                        reply: Some(reply),
                    },
                );
            }
            Err(e @ libp2p::swarm::DialError::DialPeerConditionFalse(_)) => match peer_of(&addr) {
                // A dial to this peer is already under way (the DHT's, say): wait for it.
                Some(peer) => {
                    self.swarm.behaviour_mut().keep_alive.set(peer, true);
                    let deadline = Instant::now() + self.dial_timeout;
                    self.probes
                        .entry(peer)
                        .or_default()
                        .push((deadline, addr, reply));
                }
                None => {
                    let _ = reply.send(Err(Error::Dial {
                        addr,
                        reason: dial_error::explain(&e),
                    }));
                }
            },
            Err(e) => {
                let _ = reply.send(Err(Error::Dial {
                    addr,
                    reason: dial_error::explain(&e),
                }));
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                let address = address
                    .with_p2p(*self.swarm.local_peer_id())
                    .unwrap_or_else(|a| a);
                tracing::info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address.clone());
                }
                self.emit(Event::ListenAddr { address });
                let actions = self.relays.on_granted(listener_id);
                self.apply(actions);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let address = address
                    .with_p2p(*self.swarm.local_peer_id())
                    .unwrap_or_else(|a| a);
                self.listen_addrs.retain(|a| a != &address);
                self.emit(Event::ListenAddrExpired { address });
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let address = remote_address(&endpoint, peer_id);
                tracing::debug!(peer = %peer_id, %address, "connection established");
                self.peers
                    .entry(peer_id)
                    .or_insert_with(PeerState::new)
                    .connections
                    .insert(connection_id, address.clone());
                // Known as connected before a dial is answered: whoever dialled may open
                // streams to the peer at once.
                if num_established.get() == 1 {
                    self.connected
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(peer_id);
                }
                if let Some(dial) = self.dials.remove(&connection_id) {
                    self.swarm.behaviour_mut().keep_alive.set(peer_id, true);
                    match dial.reply {
                        Some(reply) => {
                            let _ = reply.send(Ok(peer_id));
                        }
                        None => {
                            // A bootstrap dial.
                            self.bootstrap_peers.insert(peer_id);
                            self.bootstrap_backoff = Duration::from_secs(1);
                        }
                    }
                }
                self.finish_probes(peer_id, Ok(()));
                if num_established.get() > 1 && !self.redial_after_close.contains(&peer_id) {
                    self.probe_older_connections(peer_id, connection_id);
                }
                if num_established.get() == 1 {
                    self.emit(Event::PeerConnected { peer_id, address });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                // An I/O error: not this node's own idle timeout, nor a close the remote made on
                // purpose (its connection manager, its own idle timeout), which must not be
                // answered with a dial.
                let failed = matches!(
                    &cause,
                    Some(libp2p::swarm::ConnectionError::IO(e)) if !closed_by_remote(e)
                );
                // The peer went silent: a QUIC connection's idle timeout despite keep-alives.
                let silent = matches!(
                    &cause,
                    Some(libp2p::swarm::ConnectionError::IO(e)) if timed_out(e)
                );
                if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.connections.remove(&connection_id);
                }
                if num_established == 0 {
                    self.relays.on_disconnected(&peer_id);
                    self.connected
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&peer_id);
                    self.peers.remove(&peer_id);
                    // Gossipsub forgets a peer's subscriptions with its last connection.
                    self.topic_peers.retain(|_, peers| {
                        peers.remove(&peer_id);
                        !peers.is_empty()
                    });
                    self.emit(Event::PeerDisconnected { peer_id });
                    let departed = self.departed.remove(&peer_id);
                    if self.redial_after_close.remove(&peer_id) {
                        let opts = DialOpts::peer_id(peer_id).build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!(peer = %peer_id, "cannot redial restarted peer: {e}");
                        }
                    } else if silent && !departed {
                        if self
                            .swarm
                            .behaviour_mut()
                            .kad
                            .remove_peer(&peer_id)
                            .is_some()
                        {
                            tracing::debug!(peer = %peer_id, "silent: removed from the routing table");
                            self.metrics_local.routing_removed.inc();
                        }
                    } else if failed && !departed && self.in_routing_table(&peer_id) {
                        // The connection broke (reset, failed ping or keep-alive, a silent QUIC
                        // peer's idle timeout): one dial tells whether the peer is still there,
                        // so that a dead one leaves the routing table now rather than when a
                        // lookup finds it dead.
                        let opts = DialOpts::peer_id(peer_id)
                            .condition(
                                libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing,
                            )
                            .build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!(peer = %peer_id, "cannot check a lost peer: {e}");
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
                ..
            } => {
                let reason = dial_error::explain(&error);
                if let Some(peer) = peer_id
                    && !self.peers.contains_key(&peer)
                {
                    self.finish_probes(peer, Err(reason.clone()));
                    // A peer that cannot be reached leaves the routing table until it connects
                    // again, so that lookups stop dialling it.
                    let unreachable = matches!(
                        error,
                        libp2p::swarm::DialError::Transport(_)
                            | libp2p::swarm::DialError::WrongPeerId { .. }
                            | libp2p::swarm::DialError::NoAddresses
                    );
                    if unreachable && self.swarm.behaviour_mut().kad.remove_peer(&peer).is_some() {
                        tracing::debug!(%peer, "unreachable: removed from the routing table");
                        self.metrics_local.routing_removed.inc();
                    }
                }
                if let Some(dial) = self.dials.remove(&connection_id) {
                    match dial.reply {
                        Some(reply) => {
                            let _ = reply.send(Err(Error::Dial {
                                addr: dial.addr,
                                reason: reason.clone(),
                            }));
                        }
                        None => {
                            tracing::warn!(addr = %dial.addr, "cannot reach bootstrap peer: {reason}")
                        }
                    }
                } else {
                    tracing::debug!(peer = ?peer_id, "outgoing connection failed: {reason}");
                }
                self.last_dial_failure = Some(reason);
                self.fail_waiting_if_alone();
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                tracing::debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!("listener error: {error}"),
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if let Err(e) = &reason {
                    tracing::warn!(?addresses, "listener closed: {e}");
                }
                let actions = self.relays.on_listener_closed(listener_id, reason.is_err());
                self.apply(actions);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.emit(Event::ExternalAddrsChanged);
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.emit(Event::ExternalAddrsChanged);
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(event) => {
                self.metrics.record(&event);
                if let identify::Event::Received {
                    peer_id,
                    info,
                    connection_id,
                } = event
                {
                    self.on_identified(peer_id, connection_id, info);
                }
            }
            BehaviourEvent::Ping(event) => {
                self.metrics.record(&event);
                if let ping::Event {
                    peer,
                    result: Ok(rtt),
                    ..
                } = event
                    && let Some(state) = self.peers.get_mut(&peer)
                {
                    state.rtt = Some(rtt);
                    self.emit(Event::PeerRtt { peer_id: peer, rtt });
                }
            }
            BehaviourEvent::Kad(event) => {
                self.metrics.record(&event);
                self.on_kad_event(event);
            }
            BehaviourEvent::Gossipsub(event) => {
                self.metrics.record(&event);
                match event {
                    gossipsub::Event::Message {
                        propagation_source,
                        message,
                        message_id,
                    } => self.on_gossip_message(propagation_source, message_id, message),
                    gossipsub::Event::Subscribed { peer_id, topic } => {
                        if let Some(topic) = topic.as_str().strip_prefix(&self.gossip_prefix) {
                            let topic = topic.to_owned();
                            self.topic_peers
                                .entry(topic.clone())
                                .or_default()
                                .insert(peer_id);
                            self.emit(Event::PeerSubscribed { peer_id, topic });
                        }
                    }
                    gossipsub::Event::Unsubscribed { peer_id, topic } => {
                        if let Some(topic) = topic.as_str().strip_prefix(&self.gossip_prefix) {
                            if let Some(peers) = self.topic_peers.get_mut(topic) {
                                peers.remove(&peer_id);
                                if peers.is_empty() {
                                    self.topic_peers.remove(topic);
                                }
                            }
                            let topic = topic.to_owned();
                            self.emit(Event::PeerUnsubscribed { peer_id, topic });
                        }
                    }
                    gossipsub::Event::SlowPeer {
                        peer_id,
                        failed_messages,
                    } => {
                        let dropped = failed_messages.priority + failed_messages.non_priority;
                        tracing::debug!(peer = %peer_id, ?failed_messages, "gossip messages to a slow peer dropped");
                        self.metrics_local
                            .gossip_send_dropped
                            .inc_by(dropped as u64);
                    }
                    _ => {}
                }
            }
            BehaviourEvent::Optional(OptionalEvent::Mdns(mdns::Event::Discovered(found))) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    if peer == *self.swarm.local_peer_id() || self.peers.contains_key(&peer) {
                        continue;
                    }
                    tracing::debug!(%peer, "discovered on the local network");
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, "cannot dial mDNS peer: {e}");
                    }
                }
            }
            BehaviourEvent::Optional(OptionalEvent::Autonat(autonat::Event::StatusChanged {
                old,
                new,
            })) => {
                tracing::info!(?old, ?new, "reachability changed");
                let public = matches!(new, autonat::NatStatus::Public(_));
                let actions = self.relays.on_reachability(public);
                self.apply(actions);
                if self.relay_server_follows_reachability {
                    self.offer_relay_service(public);
                }
                if self.dht_mode == DhtMode::Auto {
                    match new {
                        autonat::NatStatus::Public(_) => self.set_dht_server(true),
                        autonat::NatStatus::Private => self.set_dht_server(false),
                        autonat::NatStatus::Unknown => {}
                    }
                }
            }
            BehaviourEvent::Optional(OptionalEvent::Upnp(upnp::Event::NewExternalAddr {
                external_addr,
                ..
            })) => {
                tracing::info!(%external_addr, "UPnP mapped an external address");
            }
            BehaviourEvent::Optional(OptionalEvent::Upnp(upnp::Event::NonRoutableGateway)) => {
                tracing::debug!("UPnP gateway is not routable");
            }
            BehaviourEvent::Optional(OptionalEvent::RelayServer(event)) => {
                self.metrics.record(&event)
            }
            BehaviourEvent::Dcutr(event) => {
                self.metrics.record(&event);
                tracing::debug!(?event, "hole punching");
            }
            _ => {}
        }
    }

    /// Offers relay service to others, or stops offering it (the circuits open go on).
    fn offer_relay_service(&mut self, on: bool) {
        if let Some(relay) = self
            .swarm
            .behaviour_mut()
            .optional
            .as_mut()
            .and_then(|o| o.relay_server.as_mut())
        {
            tracing::info!(on, "relay service");
            relay.set_status(Some(if on {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
        }
    }

    /// Carries out what the relays found through the mesh need.
    fn apply(&mut self, actions: Vec<relays::Action>) {
        for action in actions {
            match action {
                relays::Action::Listen(relay, circuit) => {
                    match self.swarm.listen_on(circuit.clone()) {
                        Ok(listener) => {
                            tracing::info!(%relay, "reserving a slot on a relay");
                            self.relays.on_listening(relay, listener);
                        }
                        Err(e) => {
                            tracing::debug!(%circuit, "cannot listen through the relay: {e}");
                            self.relays.on_listen_failed(&relay);
                        }
                    }
                }
                relays::Action::Stop(listener) => {
                    tracing::info!("reachable: giving a relay up");
                    self.swarm.remove_listener(listener);
                }
            }
        }
    }

    /// A peer reached only through a relay may be reachable directly: behind a NAT that lets
    /// anyone in once it has a mapping (a full cone), or with a port forward. DCUtR does not
    /// find that when the other side's NAT is symmetric (over QUIC only one side dials), so
    /// this node dials the direct addresses the peer reports, each time they change.
    fn dial_past_relay(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if !self.dial_past_relays {
            return;
        }
        let direct: Vec<Multiaddr> = addrs
            .iter()
            .filter(|a| !relays::is_relayed(a))
            .cloned()
            .collect();
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let only_relayed =
            !state.connections.is_empty() && state.connections.values().all(relays::is_relayed);
        if !only_relayed || direct.is_empty() || state.dialled_past_relay == direct {
            return;
        }
        state.dialled_past_relay = direct.clone();
        // Whatever else is dialling the peer: DCUtR's hole punch over QUIC is a dial that
        // cannot succeed when this side's NAT is symmetric.
        let opts = DialOpts::peer_id(peer)
            .addresses(direct)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        tracing::debug!(%peer, "reached through a relay only: dialling it directly");
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "cannot dial past the relay: {e}");
        }
    }

    fn on_identified(&mut self, peer: PeerId, connection: ConnectionId, info: identify::Info) {
        let same_network = info.protocols.contains(&self.kad_protocol);
        let remote = self
            .peers
            .get_mut(&peer)
            .map(|state| {
                state.agent = Some(info.agent_version.clone());
                state.same_network = Some(same_network);
                state.connections.get(&connection).cloned()
            })
            .unwrap_or_default();
        if same_network {
            let remote_is_loopback = remote.as_ref().is_some_and(is_loopback);
            let reachable: Vec<Multiaddr> = info
                .listen_addrs
                .into_iter()
                .filter(|a| !is_unspecified(a) && (remote_is_loopback || !is_loopback(a)))
                .collect();
            let offers_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
            let relay_addr = reachable.iter().find(|a| !relays::is_relayed(a)).cloned();
            let actions = self.relays.on_identified(peer, offers_relay, relay_addr);
            self.apply(actions);
            self.dial_past_relay(peer, &reachable);
            for addr in reachable {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr);
            }
            if !self.dht_bootstrapped {
                self.dht_bootstrapped = true;
                if let Ok(id) = self.swarm.behaviour_mut().kad.bootstrap() {
                    self.queries.insert(id, Query::Bootstrap { reply: None });
                }
            }
            if !self.no_dht_peers() {
                for (_, command) in std::mem::take(&mut self.waiting_for_dht) {
                    self.on_command(command);
                }
            }
        } else if self.bootstrap_peers.contains(&peer) {
            tracing::warn!(
                %peer,
                network = %self.network,
                "bootstrap peer does not belong to this node's network; it cannot help us join"
            );
        }
        self.emit(Event::PeerIdentified {
            peer_id: peer,
            same_network,
        });
    }

    /// Hands a message of a subscribed topic to the topic's validation worker; its verdict
    /// comes back through [`EventLoop::on_checked`]. Nothing here waits.
    fn on_gossip_message(
        &mut self,
        via: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        if let Some(state) = self.peers.get_mut(&via) {
            state.last_active = Instant::now();
        }
        let verdict = match message.topic.as_str().strip_prefix(&self.gossip_prefix) {
            None => Some(gossipsub::MessageAcceptance::Reject),
            Some(topic) => match self.workers.get(topic) {
                // Gossipsub hands over only the first copy of each message, so each signature
                // is checked once.
                Some(worker) => {
                    let pending = validation::Pending {
                        id: id.clone(),
                        via,
                        data: message.data,
                    };
                    match worker.try_send(pending) {
                        Ok(()) => None,
                        Err(_) => {
                            // The topic's hook is behind: drop without penalty.
                            self.metrics_local.gossip_validation_overflow.inc();
                            Some(gossipsub::MessageAcceptance::Ignore)
                        }
                    }
                }
                None => Some(gossipsub::MessageAcceptance::Ignore),
            },
        };
        if let Some(verdict) = verdict {
            if verdict == gossipsub::MessageAcceptance::Reject {
                self.metrics_local.gossip_rejected.inc();
            }
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(&id, &via, verdict);
        }
    }

    /// A worker's verdict: gossipsub forwards (or drops) the message, subscribers get it.
    fn on_checked(&mut self, checked: validation::Checked) {
        let acceptance = match checked.verdict {
            Validation::Accept => gossipsub::MessageAcceptance::Accept,
            Validation::Reject => {
                self.metrics_local.gossip_rejected.inc();
                gossipsub::MessageAcceptance::Reject
            }
            Validation::Ignore => gossipsub::MessageAcceptance::Ignore,
        };
        // Forward before delivering. Both wake other tasks (the connections to the mesh peers,
        // the subscribers' readers), and tokio runs the task woken last first: a subscriber
        // woken before the forwards would wait behind them and behind the work they cause on
        // this runtime (measured on 50 in-process nodes: 3× the delivery latency).
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&checked.id, &checked.via, acceptance);
        if let Some(message) = checked.message {
            self.deliver_gossip(&message);
        }
    }

    /// Queues an accepted message to its topic's subscribers.
    fn deliver_gossip(&mut self, message: &gossip::Message) {
        let metrics = &self.metrics_local;
        let Some(subscribers) = self.topics.get_mut(&message.topic) else {
            return;
        };
        subscribers.retain(|s| match s.deliver(message.clone()) {
            Delivery::Queued => {
                metrics.gossip_delivered.inc();
                true
            }
            Delivery::Dropped => {
                metrics.gossip_dropped.inc();
                true
            }
            Delivery::Gone => false,
        });
        if subscribers.is_empty() {
            self.unsubscribe_topic(&message.topic);
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        let Some(query) = self.queries.remove(&id) else {
            return;
        };
        match (query, result) {
            (Query::FindPeer { peer, reply }, kad::QueryResult::GetClosestPeers(result)) => {
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let found = peers
                    .into_iter()
                    .find(|p| p.peer_id == peer && !p.addrs.is_empty())
                    .map(|p| {
                        p.addrs
                            .into_iter()
                            .map(|a| a.with_p2p(peer).unwrap_or_else(|a| a))
                            .collect()
                    });
                let _ = reply.send(found.ok_or(Error::PeerNotFound(peer)));
            }
            (Query::Bootstrap { reply }, kad::QueryResult::Bootstrap(result)) => match result {
                Ok(ok) if ok.num_remaining > 0 && !step.last => {
                    self.queries.insert(id, Query::Bootstrap { reply });
                }
                Ok(_) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(Error::Dht {
                            operation: "bootstrap",
                            source: super::Cause::new(e),
                        }));
                    }
                }
            },
            (Query::Provide { reply }, kad::QueryResult::StartProviding(result)) => {
                let _ = reply.send(result.map(drop).map_err(|e| Error::Dht {
                    operation: "provider announcement",
                    source: super::Cause::new(e),
                }));
            }
            (Query::Providers { mut found, reply }, kad::QueryResult::GetProviders(result)) => {
                match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        let local = *self.swarm.local_peer_id();
                        for provider in providers {
                            if found.insert(provider)
                                && let ProvidersReply::Each(each) = &reply
                            {
                                // A reader acts on a provider at once, usually by connecting to
                                // it: dial now, while the lookup still knows the addresses its
                                // answer carried (they go with the lookup when it ends).
                                if provider != local && !self.peers.contains_key(&provider) {
                                    let opts = DialOpts::peer_id(provider)
                                        .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                                        .build();
                                    let _ = self.swarm.dial(opts);
                                }
                                // A reader that fell 64 providers behind does not need more.
                                let _ = each.try_send(Ok(provider));
                            }
                        }
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                    Err(e) => {
                        if found.is_empty() {
                            let error = Error::Dht {
                                operation: "provider lookup",
                                source: super::Cause::new(e),
                            };
                            match reply {
                                ProvidersReply::All(all) => {
                                    let _ = all.send(Err(error));
                                }
                                ProvidersReply::Each(each) => {
                                    let _ = each.try_send(Err(error));
                                }
                            }
                            return;
                        }
                    }
                }
                let abandoned = matches!(&reply, ProvidersReply::Each(each) if each.is_closed());
                if abandoned {
                    // Nobody reads the providers any more: stop asking.
                    if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        query.finish();
                    }
                } else if step.last {
                    if let ProvidersReply::All(all) = reply {
                        let _ = all.send(Ok(found.into_iter().collect()));
                    }
                } else {
                    self.queries.insert(id, Query::Providers { found, reply });
                }
            }
            (Query::PutRecord { quorum, reply }, kad::QueryResult::PutRecord(result)) => {
                let result = match result {
                    Ok(_) => Ok(quorum),
                    Err(
                        kad::PutRecordError::QuorumFailed { success, .. }
                        | kad::PutRecordError::Timeout { success, .. },
                    ) => Err(Error::Quorum {
                        reached: success.len(),
                        quorum,
                    }),
                };
                let _ = reply.send(result);
            }
            (
                Query::GetRecord {
                    want,
                    mut found,
                    reply,
                },
                kad::QueryResult::GetRecord(result),
            ) => {
                if let Ok(kad::GetRecordOk::FoundRecord(peer_record)) = result {
                    found.push(FoundRecord {
                        peer: peer_record.peer,
                        value: peer_record.record.value,
                    });
                    // Copies from other peers count; this node's own is extra.
                    let remote = found.iter().filter(|f| f.peer.is_some()).count();
                    if remote < want && !step.last {
                        self.queries
                            .insert(id, Query::GetRecord { want, found, reply });
                        return;
                    }
                    if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        query.finish();
                    }
                }
                // Not found, timed out, or finished: what was found is the answer.
                let _ = reply.send(Ok(found));
            }
            (query, _) => {
                // A result of another kind for this id cannot happen; keep the query.
                self.queries.insert(id, query);
            }
        }
    }
}

/// Tells `peer` this node is leaving (`protocols/leave.md`): one byte on a stream of the leave
/// protocol, then a wait for the peer to close the stream, which it does once it has taken the
/// goodbye (closing the connection before then could lose the stream on the way).
async fn say_goodbye(opener: streams::Opener, peer: PeerId, protocol: StreamProtocol) {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let said = async {
        let (mut stream, _) = opener
            .open(peer, protocol)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(&[0]).await.map_err(|e| e.to_string())?;
        stream.close().await.map_err(|e| e.to_string())?;
        // End of stream (or a reset) once the peer's node took it; nothing is ever sent back.
        let mut rest = [0u8; 1];
        match stream.read(&mut rest).await {
            Ok(0) => Ok(()),
            Ok(_) => Err("the peer answered a goodbye".to_owned()),
            Err(e) if streams::refused(&e) => Err("the peer does not take goodbyes".to_owned()),
            Err(_) => Ok(()),
        }
    };
    if let Err(e) = said.await {
        tracing::debug!(%peer, "goodbye not taken: {e}");
    }
}

/// Whether a connection's error is the remote closing it on purpose: yamux's close
/// ("connection is closed") or a QUIC close frame ("closed by peer").
fn closed_by_remote(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if text.contains("connection is closed") || text.contains("closed by peer") {
            return true;
        }
        current = e.source();
    }
    false
}

/// Whether an error (or one of its sources) is a timeout.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        let timeout = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        if timeout || e.to_string().to_lowercase().contains("timed out") {
            return true;
        }
        current = e.source();
    }
    false
}

/// Answers a DHT command that cannot run: the node knows no peers, for `reason`.
fn fail_for_lack_of_peers(command: Command, reason: String) {
    let error = || Error::NoKnownPeers(reason.clone());
    match command {
        Command::FindPeer { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::Bootstrap { reply } => {
            let _ = reply.send(Err(error()));
        }
        // Waited for identify in vain: the record is announced with the DHT's republication.
        Command::Provide { reply, .. } => {
            let _ = reply.send(Ok(()));
        }
        Command::Providers { reply, .. } => match reply {
            ProvidersReply::All(all) => {
                let _ = all.send(Err(error()));
            }
            ProvidersReply::Each(each) => {
                let _ = each.try_send(Err(error()));
            }
        },
        Command::PutRecord { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::GetRecord { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        _ => {}
    }
}

impl Drop for EventLoop {
    /// Closes the listeners however the loop ends (shutdown, panic, abort): libp2p's memory
    /// transport keeps an address taken until its listener is removed, and a node restarted in
    /// the same process must be able to listen there again.
    fn drop(&mut self) {
        for id in self.listeners.drain(..) {
            self.swarm.remove_listener(id);
        }
    }
}

fn dial_opts(addr: &Multiaddr) -> DialOpts {
    match peer_of(addr) {
        Some(peer) => DialOpts::peer_id(peer)
            .addresses(vec![addr.clone()])
            .build(),
        None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
    }
}

/// The peer id at the end of an address, if there is one.
pub(crate) fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// The address a connection to `peer` reaches it at. libp2p gives a connection that came in
/// through a relay the bare `/p2p/<peer>` as its remote address; this node names it
/// `<relay address>/p2p-circuit/p2p/<peer>` instead, so that it reads, and counts, as relayed.
fn remote_address(endpoint: &libp2p::core::ConnectedPoint, peer: PeerId) -> Multiaddr {
    let remote = endpoint.get_remote_address();
    match endpoint {
        libp2p::core::ConnectedPoint::Listener { local_addr, .. }
            if endpoint.is_relayed() && !relays::is_relayed(remote) =>
        {
            let mut via: Multiaddr = local_addr
                .iter()
                .take_while(|p| !matches!(p, Protocol::P2pCircuit))
                .collect();
            via.push(Protocol::P2pCircuit);
            via.with(Protocol::P2p(peer))
        }
        _ => remote.clone(),
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
