//! libp2p's relay server, safe to switch on and off while relayed connections are open.
//!
//! `libp2p-relay` 0.22 gives relayed connections a do-nothing handler (no relaying over a
//! relay), yet tells every connection's handler when its advertisement status changes: a
//! status change while a relayed connection is open makes that connection's task panic
//! (`Either` handler, "entered unreachable code"). micromesh changes the status whenever
//! AutoNAT changes its verdict, and a node has relayed connections exactly when that happens,
//! so this wrapper drops the notifications meant for relayed connections; everything else
//! passes through unchanged. (The notification came with runtime status changes in
//! rust-libp2p#6154; rust-libp2p#5412 reports the same panic from applications.)

use std::{
    collections::HashSet,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    relay,
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
};

use super::relays::is_relayed;

/// [`relay::Behaviour`], minus the notifications its relayed connections cannot take.
pub(crate) struct RelayService {
    inner: relay::Behaviour,
    /// Connections that go through a relay themselves.
    relayed: HashSet<ConnectionId>,
}

impl RelayService {
    pub(crate) fn new(inner: relay::Behaviour) -> Self {
        Self {
            inner,
            relayed: HashSet::new(),
        }
    }

    /// Advertises relay service to peers, or stops (see [`relay::Behaviour::set_status`]).
    pub(crate) fn set_status(&mut self, status: Option<relay::Status>) {
        self.inner.set_status(status);
    }
}

impl NetworkBehaviour for RelayService {
    type ConnectionHandler = <relay::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(local_addr) {
            self.relayed.insert(connection);
        }
        self.inner
            .handle_established_inbound_connection(connection, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(connection, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(addr) {
            self.relayed.insert(connection);
        }
        self.inner
            .handle_established_outbound_connection(connection, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        if let FromSwarm::ConnectionClosed(closed) = &event {
            self.relayed.remove(&closed.connection_id);
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer, connection, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::NotifyHandler {
                    handler: NotifyHandler::One(connection),
                    ..
                }) if self.relayed.contains(&connection) => {}
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::{core::ConnectedPoint, swarm::behaviour::ConnectionEstablished};

    use super::*;

    /// Without the wrapper, libp2p's relay would hand the relayed connection's do-nothing
    /// handler a status change, and its connection task would panic.
    #[test]
    fn a_status_change_reaches_direct_connections_only() {
        let mut service = RelayService::new(relay::Behaviour::new(
            PeerId::random(),
            relay::Config::default(),
        ));
        let peer = PeerId::random();
        let circuit: Multiaddr =
            format!("/ip4/10.0.0.1/tcp/1/p2p/{}/p2p-circuit", PeerId::random())
                .parse()
                .unwrap();
        let plain: Multiaddr = "/ip4/10.0.0.2/tcp/2".parse().unwrap();
        let (relayed, direct) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        for (connection, local) in [(relayed, &circuit), (direct, &plain)] {
            service
                .handle_established_inbound_connection(connection, peer, local, &plain)
                .unwrap();
            let endpoint = ConnectedPoint::Listener {
                local_addr: local.clone(),
                send_back_addr: plain.clone(),
            };
            service.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: connection,
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: 0,
            }));
        }
        service.set_status(Some(relay::Status::Enable));
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut notified = Vec::new();
        while let Poll::Ready(event) = service.poll(&mut cx) {
            if let ToSwarm::NotifyHandler {
                handler: NotifyHandler::One(connection),
                ..
            } = event
            {
                notified.push(connection);
            }
        }
        assert_eq!(notified, [direct]);
    }
}
