//! The keep-alive protocol (`protocols/keepalive.md`) on the wire, against a bare libp2p swarm
//! that opens keep-alive streams to a micromesh node and reads what the node does with them.
//!
//! A node holds every inbound keep-alive stream open until its holder closes it, then lets go
//! of its half; it holds at most two per connection, and a third closes the oldest.

use std::{
    collections::VecDeque,
    task::{Context, Poll},
    time::Duration,
};

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol, SwarmBuilder,
    core::{
        Endpoint, Transport as _,
        transport::{MemoryTransport, PortUse},
        upgrade::{DeniedUpgrade, ReadyUpgrade, Version},
    },
    noise,
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, SubstreamProtocol, SwarmEvent, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
        handler::{ConnectionEvent, FullyNegotiatedOutbound},
    },
    yamux,
};
use micromesh::node::{Node, Preset};
use tokio::sync::mpsc;

/// Opens `streams` keep-alive streams on its connection, one after the other, and hands each
/// to the test.
struct Opener {
    protocol: StreamProtocol,
    streams: usize,
    opened: VecDeque<Stream>,
}

struct OpenerHandler {
    protocol: StreamProtocol,
    to_open: usize,
    opening: bool,
    opened: VecDeque<Stream>,
}

impl ConnectionHandler for OpenerHandler {
    type FromBehaviour = ();
    type ToBehaviour = Stream;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        true
    }

    fn on_behaviour_event(&mut self, (): ()) {}

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, DeniedUpgrade, ReadyUpgrade<StreamProtocol>>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => {
                self.opening = false;
                self.opened.push_back(stream);
            }
            ConnectionEvent::DialUpgradeError(e) => {
                panic!("a keep-alive stream failed: {}", e.error)
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<ReadyUpgrade<StreamProtocol>, (), Stream>> {
        if let Some(stream) = self.opened.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(stream));
        }
        if !self.opening && self.to_open > 0 {
            self.opening = true;
            self.to_open -= 1;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ()),
            });
        }
        Poll::Pending
    }
}

impl NetworkBehaviour for Opener {
    type ConnectionHandler = OpenerHandler;
    type ToSwarm = Stream;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Err(ConnectionDenied::new("this peer only dials"))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(OpenerHandler {
            protocol: self.protocol.clone(),
            to_open: self.streams,
            opening: false,
            opened: VecDeque::new(),
        })
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        stream: THandlerOutEvent<Self>,
    ) {
        self.opened.push_back(stream);
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Stream, THandlerInEvent<Self>>> {
        match self.opened.pop_front() {
            Some(stream) => Poll::Ready(ToSwarm::GenerateEvent(stream)),
            None => Poll::Pending,
        }
    }
}

/// Dials `node` from a bare swarm that opens `streams` keep-alive streams; returns them in the
/// order they opened. The swarm runs until the test ends.
async fn open_streams(node: &Node, network: &str, streams: usize) -> Vec<Stream> {
    let protocol =
        StreamProtocol::try_from_owned(format!("/micromesh/{network}/keepalive/1.0.0")).unwrap();
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .boxed())
        })
        .unwrap()
        .with_behaviour(|_| Opener {
            protocol,
            streams,
            opened: VecDeque::new(),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    swarm
        .dial(node.listen_addrs().await.unwrap().remove(0))
        .unwrap();
    let (tx, mut rx) = mpsc::channel(streams.max(1));
    tokio::spawn(async move {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(stream) => {
                    let _ = tx.send(stream).await;
                }
                SwarmEvent::ConnectionClosed { cause, .. } => {
                    panic!("the node closed the connection: {cause:?}")
                }
                _ => {}
            }
        }
    });
    let mut opened = Vec::new();
    for _ in 0..streams {
        let stream = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the node accepts keep-alive streams")
            .expect("the swarm runs");
        opened.push(stream);
    }
    opened
}

/// Whether the node has let go of its half of `stream` within `wait`: end-of-stream or an
/// error. `false` while the node holds it.
async fn let_go(stream: &mut Stream, wait: Duration) -> bool {
    let mut buf = [0u8; 8];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("the node wrote {n} bytes on a keep-alive stream"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_holds_a_keep_alive_stream_until_its_holder_closes_it() {
    let network = "keepalive-test";
    let node = Node::builder()
        .preset(Preset::Local)
        .network(network)
        .build()
        .await
        .unwrap();
    let mut streams = open_streams(&node, network, 1).await;
    let stream = &mut streams[0];

    // The node holds its half: nothing arrives, not even its end.
    assert!(!let_go(stream, Duration::from_secs(3)).await);

    // The holder closes its half: the node notices and closes its own.
    stream.close().await.unwrap();
    assert!(
        let_go(stream, Duration::from_secs(10)).await,
        "the node still holds a stream its holder closed"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_keep_alive_stream_closes_the_oldest() {
    let network = "keepalive-limit";
    let node = Node::builder()
        .preset(Preset::Local)
        .network(network)
        .build()
        .await
        .unwrap();
    let mut streams = open_streams(&node, network, 3).await;
    assert!(
        let_go(&mut streams[0], Duration::from_secs(10)).await,
        "the oldest stream is still held"
    );
    // The two newest stay held.
    assert!(!let_go(&mut streams[1], Duration::from_secs(2)).await);
    assert!(!let_go(&mut streams[2], Duration::from_millis(100)).await);
    node.shutdown().await;
}
