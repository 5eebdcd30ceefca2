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
//! closed and the connection falls back to the normal idle timeout. (Gossipsub holds a stream
//! of its own on every connection between micromesh nodes, which counts as use too; the
//! connection manager, not the idle timeout, closes those.)

use std::{
    collections::{HashMap, HashSet, VecDeque},
    convert::Infallible,
    task::{Context, Poll},
};

use futures::{
    AsyncReadExt, FutureExt, StreamExt,
    future::{AbortHandle, Abortable, Aborted, BoxFuture},
    stream::FuturesUnordered,
};
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
        Handler::new(self.protocol.clone(), self.kept.contains(&peer))
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
    /// The stream is open and holds the connection; it is watched in [`Handler::held`], and
    /// aborting its watch closes it.
    Open(AbortHandle),
    /// The remote does not speak the protocol (another network, another program), or closed
    /// our stream: do not ask again on this connection.
    Refused,
}

/// Which held stream a watch belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Outbound,
    Inbound(u64),
}

/// Resolves with its stream's [`Held`] once the remote closes the stream; aborting it drops
/// (closes) the stream.
type Watch = Abortable<BoxFuture<'static, Held>>;

/// The per-connection half of [`Behaviour`].
pub(crate) struct Handler {
    protocol: StreamProtocol,
    keep: bool,
    outbound: Outbound,
    /// Inbound streams held, oldest first.
    inbound: VecDeque<(u64, AbortHandle)>,
    next_inbound: u64,
    /// One watch per held stream. The connection polls its handler on every wake-up, for every
    /// message of every protocol; a set of futures polls only the watches that were woken, so
    /// the idle streams are read when something arrives on them, not on every message.
    held: FuturesUnordered<Watch>,
}

impl Handler {
    fn new(protocol: StreamProtocol, keep: bool) -> Self {
        Self {
            protocol,
            keep,
            outbound: Outbound::Idle,
            inbound: VecDeque::new(),
            next_inbound: 0,
            held: FuturesUnordered::new(),
        }
    }

    /// Watches `stream` until its remote closes it; the returned handle closes it from here.
    fn hold(&mut self, stream: Stream, which: Held) -> AbortHandle {
        let (handle, registration) = AbortHandle::new_pair();
        let watch = async move {
            until_closed(stream).await;
            which
        };
        self.held.push(Abortable::new(watch.boxed(), registration));
        handle
    }
}

/// Reads a held stream until the remote closes it. The protocol carries no data: any byte is
/// ignored, end-of-stream or an error ends the stream.
async fn until_closed(mut stream: Stream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
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
        if !keep && let Outbound::Open(stream) = &self.outbound {
            // The watch drops the stream at its next poll: the remote sees it end and lets go
            // of its half.
            stream.abort();
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
                    Outbound::Open(self.hold(stream, Held::Outbound))
                } else {
                    Outbound::Idle
                };
            }
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => {
                if self.inbound.len() == MAX_INBOUND_STREAMS
                    && let Some((_, oldest)) = self.inbound.pop_front()
                {
                    oldest.abort();
                }
                let id = self.next_inbound;
                self.next_inbound += 1;
                let handle = self.hold(stream, Held::Inbound(id));
                self.inbound.push_back((id, handle));
            }
            ConnectionEvent::DialUpgradeError(_) => self.outbound = Outbound::Refused,
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        // Aborted watches resolve too (their stream is dropped); only a remote close matters.
        while let Poll::Ready(Some(ended)) = self.held.poll_next_unpin(cx) {
            match ended {
                Ok(Held::Outbound) => {
                    if matches!(self.outbound, Outbound::Open(_)) {
                        self.outbound = Outbound::Refused;
                    }
                }
                Ok(Held::Inbound(id)) => self.inbound.retain(|(held, _)| *held != id),
                Err(Aborted) => {}
            }
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
