//! Streams of micromesh's own protocols (RPC, registry sync), in and out.
//!
//! Components register the protocols they serve at run time ([`Acceptor::accept`], behind
//! [`Node::accept`](super::Node::accept)), as libp2p-stream's `Control::accept` does: the node
//! knows them only as names. A protocol nobody accepts is refused in negotiation.
//!
//! Inbound streams are queued per protocol for the tasks that serve them, in a bounded queue;
//! a stream is refused only when its queue is full (the node is overloaded), and every such
//! refusal is counted. (libp2p-stream hands them over through a single slot and drops the
//! rest, which loses calls whenever several arrive at once.)
//!
//! Outbound streams are opened on the connection that suits them best: a direct connection
//! before a relayed one, and the newest before older ones (an old QUIC connection to a peer
//! that restarted may linger, dead, until its idle timeout). Any number of streams may be
//! negotiating at once on one connection. (libp2p-stream picks a connection at random and
//! negotiates one stream at a time per connection, which caps calls per second at one per
//! round trip.)
//!
//! Opening a stream takes no trip through the swarm's event loop: the caller talks to the
//! connection's handler directly.
//!
//! Outbound streams, of every protocol the node speaks, are negotiated optimistically
//! (multistream-select's "lazy" dialer, identical on the wire): the protocol proposal leaves
//! together with the stream's first bytes, and the peer's confirmation is read before its first
//! reply. A call therefore costs one round trip, not two. The price is that a peer refusing the
//! protocol is noticed at the first read, not when the stream opens: [`refused`] tells such an
//! error apart.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::{Ready, ready},
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol,
    core::{
        Endpoint, InboundUpgrade, OutboundUpgrade, UpgradeInfo, multiaddr::Protocol,
        transport::PortUse, upgrade::NegotiationError,
    },
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
        handler::{
            ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
        },
    },
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

/// How many inbound streams of one protocol wait for their server before new ones are refused.
pub(crate) const INBOUND_QUEUE: usize = 1024;
/// How many stream requests wait for one connection's handler.
const OUTBOUND_QUEUE: usize = 1024;

/// Why a stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("not connected")]
    NotConnected,
    #[error("the peer does not support {0}")]
    Unsupported(StreamProtocol),
    #[error("the connection closed while the stream was negotiated")]
    Closed,
    #[error("{0}")]
    Failed(String),
}

/// Whether an I/O error on an outbound stream means the peer does not speak its protocol.
///
/// With optimistic negotiation the peer's refusal arrives as the error of the first read (or
/// of a write after it), not as an error of [`Opener::open`].
pub(crate) fn refused(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<NegotiationError>())
        .is_some_and(|e| matches!(e, NegotiationError::Failed))
}

type Reply = oneshot::Sender<Result<Stream, OpenError>>;

struct Request {
    protocol: StreamProtocol,
    reply: Reply,
}

struct Connection {
    id: ConnectionId,
    relayed: bool,
    established: Instant,
    requests: mpsc::Sender<Request>,
}

#[derive(Default)]
struct Shared {
    connections: HashMap<PeerId, Vec<Connection>>,
}

impl Shared {
    /// A direct connection before a relayed one, the newest before older ones.
    fn best<'a>(&'a self, peer: &PeerId) -> Option<&'a Connection> {
        self.connections
            .get(peer)?
            .iter()
            .max_by_key(|c| (!c.relayed, c.established))
    }
}

/// Opens outbound streams. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Opener {
    shared: Arc<Mutex<Shared>>,
}

impl Opener {
    /// Opens a stream of `protocol` to `peer` on its best connection, and says which one.
    pub(crate) async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<(Stream, ConnectionId), OpenError> {
        let (id, requests) = {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            match Shared::best(&shared, &peer) {
                Some(connection) => (connection.id, connection.requests.clone()),
                None => return Err(OpenError::NotConnected),
            }
        };
        Ok((Self::request(requests, protocol).await?, id))
    }

    /// The connection to `peer` that [`Opener::open`] would use now, if any.
    pub(crate) fn best(&self, peer: &PeerId) -> Option<ConnectionId> {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        Shared::best(&shared, peer).map(|c| c.id)
    }

    /// Opens a stream of `protocol` on one given connection to `peer`.
    pub(crate) async fn open_on(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenError> {
        let requests = {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let found = shared
                .connections
                .get(&peer)
                .and_then(|connections| connections.iter().find(|c| c.id == connection));
            match found {
                Some(connection) => connection.requests.clone(),
                None => return Err(OpenError::NotConnected),
            }
        };
        Self::request(requests, protocol).await
    }

    async fn request(
        requests: mpsc::Sender<Request>,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenError> {
        let (reply, response) = oneshot::channel();
        requests
            .send(Request { protocol, reply })
            .await
            .map_err(|_| OpenError::Closed)?;
        response.await.map_err(|_| OpenError::Closed)?
    }
}

/// The behaviour: accepts streams of a fixed set of protocols and opens streams on request.
pub(crate) struct Behaviour {
    accepting: Arc<RwLock<Accepting>>,
    shared: Arc<Mutex<Shared>>,
    dropped: Counter,
}

/// The inbound streams of one protocol, as they arrive, with the peer that opened each.
pub(crate) type Incoming = mpsc::Receiver<(PeerId, Stream)>;

/// The protocols accepted, and where their inbound streams go.
#[derive(Default)]
struct Accepting {
    /// What every connection offers; replaced (not changed) when a protocol is added, so that
    /// handlers share it without copying.
    offered: Protocols,
    queues: HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>,
}

/// A protocol is accepted already, by a component that still reads its streams.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the protocol {0} is already accepted on this node")]
pub(crate) struct AlreadyAccepted(pub(crate) StreamProtocol);

/// Registers protocols to accept. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Acceptor {
    accepting: Arc<RwLock<Accepting>>,
}

impl Acceptor {
    /// Accepts inbound streams of `protocol` from now on, on every connection, old and new.
    pub(crate) fn accept(&self, protocol: StreamProtocol) -> Result<Incoming, AlreadyAccepted> {
        let mut accepting = self.accepting.write().unwrap_or_else(|e| e.into_inner());
        if accepting
            .queues
            .get(&protocol)
            .is_some_and(|queue| !queue.is_closed())
        {
            return Err(AlreadyAccepted(protocol));
        }
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        accepting.queues.insert(protocol, tx);
        accepting.offered = Protocols(accepting.queues.keys().cloned().collect());
        Ok(rx)
    }
}

impl Behaviour {
    /// A behaviour that accepts nothing until protocols are registered with the [`Acceptor`].
    pub(crate) fn new(dropped: Counter) -> (Self, Opener, Acceptor) {
        let accepting = Arc::new(RwLock::new(Accepting::default()));
        let shared = Arc::new(Mutex::new(Shared::default()));
        (
            Self {
                accepting: accepting.clone(),
                shared: shared.clone(),
                dropped,
            },
            Opener { shared },
            Acceptor { accepting },
        )
    }

    fn handler(&self, peer: PeerId, id: ConnectionId, remote: &Multiaddr) -> Handler {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let relayed = remote.iter().any(|p| matches!(p, Protocol::P2pCircuit));
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connections
            .entry(peer)
            .or_default()
            .push(Connection {
                id,
                relayed,
                established: Instant::now(),
                requests: tx,
            });
        Handler {
            peer,
            accepting: self.accepting.clone(),
            dropped: self.dropped.clone(),
            requests: rx,
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, id, remote))
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        remote: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, id, remote))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        if let FromSwarm::ConnectionClosed(closed) = event {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(connections) = shared.connections.get_mut(&closed.peer_id) {
                connections.retain(|c| c.id != closed.connection_id);
                if connections.is_empty() {
                    shared.connections.remove(&closed.peer_id);
                }
            }
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// A set of protocols offered, or the one requested. Cheap to clone: the swarm asks every
/// connection's handler for its protocols each time the connection is polled.
#[derive(Clone)]
pub(crate) struct Protocols(Arc<[StreamProtocol]>);

impl Default for Protocols {
    fn default() -> Self {
        Self(Arc::from([]))
    }
}

/// Iterates the protocols of a [`Protocols`] without copying the set.
#[derive(Clone)]
pub(crate) struct ProtocolIter {
    protocols: Arc<[StreamProtocol]>,
    next: usize,
}

impl Iterator for ProtocolIter {
    type Item = StreamProtocol;

    fn next(&mut self) -> Option<StreamProtocol> {
        let protocol = self.protocols.get(self.next)?.clone();
        self.next += 1;
        Some(protocol)
    }
}

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = ProtocolIter;

    fn protocol_info(&self) -> Self::InfoIter {
        ProtocolIter {
            protocols: self.0.clone(),
            next: 0,
        }
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<Stream> for Protocols {
    type Output = Stream;
    type Error = Infallible;
    type Future = Ready<Result<Stream, Infallible>>;

    fn upgrade_outbound(self, stream: Stream, _: StreamProtocol) -> Self::Future {
        ready(Ok(stream))
    }
}

/// The per-connection half of [`Behaviour`]. It never keeps a connection alive by itself: the
/// streams it hands out do, while they are open.
pub(crate) struct Handler {
    peer: PeerId,
    accepting: Arc<RwLock<Accepting>>,
    dropped: Counter,
    requests: mpsc::Receiver<Request>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = Protocols;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = (StreamProtocol, Reply);

    fn listen_protocol(&self) -> SubstreamProtocol<Protocols> {
        let accepting = self.accepting.read().unwrap_or_else(|e| e.into_inner());
        SubstreamProtocol::new(accepting.offered.clone(), ())
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        libp2p::core::util::unreachable(event)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Protocols, Protocols, (), (StreamProtocol, Reply)>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => {
                let queue = self
                    .accepting
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .queues
                    .get(&protocol)
                    .cloned();
                if let Some(queue) = queue
                    && queue.try_send((self.peer, stream)).is_err()
                {
                    // Dropping the stream resets it: the caller sees a failed call, not a hang.
                    self.dropped.inc();
                    tracing::warn!(peer = %self.peer, %protocol, "inbound stream queue full; stream refused");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: (_, reply),
            }) => {
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (protocol, reply),
                error,
            }) => {
                let error = match error {
                    libp2p::swarm::StreamUpgradeError::NegotiationFailed => {
                        OpenError::Unsupported(protocol)
                    }
                    other => OpenError::Failed(other.to_string()),
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Protocols, (StreamProtocol, Reply), Infallible>> {
        match self.requests.poll_recv(cx) {
            Poll::Ready(Some(Request { protocol, reply })) => {
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(
                        Protocols(Arc::from([protocol.clone()])),
                        (protocol, reply),
                    ),
                })
            }
            _ => Poll::Pending,
        }
    }
}
