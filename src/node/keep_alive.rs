//! Keeping the connections to peers we use open.
//!
//! libp2p closes a connection once it has been idle (no open streams, no handler asking to keep
//! it) for the swarm's idle timeout, and ping does not count as use. That is right for peers we
//! met in passing, and wrong for the peers a node depends on: its bootstrap peers, the peers it
//! dialled on purpose, and the peers its components call.
//!
//! For each such peer this behaviour holds one idle stream of the network's keep-alive protocol
//! (see `protocols/keepalive.md`). An open stream keeps the connection alive on *both* ends, so
//! the remote does not close it either. When the node stops needing the peer, the stream is
//! closed and the connection falls back to the normal idle timeout.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    convert::Infallible,
    task::{Context, Poll},
};

use futures::AsyncRead;
use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol,
    core::{Endpoint, transport::PortUse, upgrade::ReadyUpgrade},
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
        handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound},
    },
};

/// The largest number of inbound keep-alive streams one connection holds; older ones are closed.
const MAX_INBOUND_STREAMS: usize = 2;

/// Holds keep-alive streams to the peers marked with [`Behaviour::set`].
pub(crate) struct Behaviour {
    protocol: StreamProtocol,
    kept: HashSet<PeerId>,
    connections: HashMap<PeerId, HashSet<ConnectionId>>,
    pending: VecDeque<ToSwarm<Infallible, bool>>,
}

impl Behaviour {
    pub(crate) fn new(protocol: StreamProtocol) -> Self {
        Self {
            protocol,
            kept: HashSet::new(),
            connections: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    /// Marks `peer` as used (`keep = true`) or no longer used.
    pub(crate) fn set(&mut self, peer: PeerId, keep: bool) {
        let changed = if keep {
            self.kept.insert(peer)
        } else {
            self.kept.remove(&peer)
        };
        if !changed {
            return;
        }
        for connection in self.connections.get(&peer).into_iter().flatten() {
            self.pending.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(*connection),
                event: keep,
            });
        }
    }

    pub(crate) fn is_kept(&self, peer: &PeerId) -> bool {
        self.kept.contains(peer)
    }

    fn handler(&mut self, peer: PeerId, connection: ConnectionId) -> Handler {
        self.connections.entry(peer).or_default().insert(connection);
        Handler {
            protocol: self.protocol.clone(),
            keep: self.kept.contains(&peer),
            outbound: Outbound::Idle,
            inbound: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, connection))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, connection))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        if let FromSwarm::ConnectionClosed(closed) = event
            && let Some(set) = self.connections.get_mut(&closed.peer_id)
        {
            set.remove(&closed.connection_id);
            if set.is_empty() {
                self.connections.remove(&closed.peer_id);
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
        match self.pending.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

enum Outbound {
    /// No stream, none requested.
    Idle,
    /// A stream was requested and is being negotiated.
    Opening,
    /// The stream is open and holds the connection.
    Open(Stream),
    /// The remote does not speak the protocol (another network, another program), or closed
    /// our stream: do not ask again on this connection.
    Refused,
}

/// The per-connection half of [`Behaviour`].
pub(crate) struct Handler {
    protocol: StreamProtocol,
    keep: bool,
    outbound: Outbound,
    inbound: VecDeque<Stream>,
}

/// Polls a held stream for the remote's close. Returns `true` while the stream is still open.
fn still_open(stream: &mut Stream, cx: &mut Context<'_>) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Pending => return true,
            // The protocol carries no data: any byte is ignored, EOF or an error ends the stream.
            Poll::Ready(Ok(n)) if n > 0 => continue,
            Poll::Ready(_) => return false,
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = bool;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.keep
    }

    fn on_behaviour_event(&mut self, keep: bool) {
        self.keep = keep;
        if !keep && matches!(self.outbound, Outbound::Open(_)) {
            // Dropping the stream closes it; the remote sees EOF and lets go of its half.
            self.outbound = Outbound::Idle;
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => {
                self.outbound = if self.keep {
                    Outbound::Open(stream)
                } else {
                    Outbound::Idle
                };
            }
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => {
                if self.inbound.len() == MAX_INBOUND_STREAMS {
                    self.inbound.pop_front();
                }
                self.inbound.push_back(stream);
            }
            ConnectionEvent::DialUpgradeError(_) => self.outbound = Outbound::Refused,
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        self.inbound.retain_mut(|stream| still_open(stream, cx));
        if let Outbound::Open(stream) = &mut self.outbound
            && !still_open(stream, cx)
        {
            self.outbound = Outbound::Refused;
        }
        if self.keep && matches!(self.outbound, Outbound::Idle) {
            self.outbound = Outbound::Opening;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ()),
            });
        }
        Poll::Pending
    }
}
