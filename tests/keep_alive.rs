//! The keep-alive protocol (`protocols/keepalive.md`) on the wire, against a bare libp2p swarm
//! that opens keep-alive streams to a micromesh node and reads what the node does with them.
//!
//! A node holds every inbound keep-alive stream open until its holder closes it, then lets go
//! of its half; it holds at most two per connection, and a third closes the oldest.

use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{
    Stream, StreamProtocol, SwarmBuilder,
    core::{Transport as _, transport::MemoryTransport, upgrade::Version},
    noise,
    swarm::SwarmEvent,
    yamux,
};
use micromesh::node::{Node, Preset};

/// A local node of its own network.
async fn node(network: &str) -> Node {
    Node::builder()
        .preset(Preset::Local)
        .network(network)
        .build()
        .await
        .unwrap()
}

/// Dials `node` from a bare swarm and opens `streams` keep-alive streams to it, one after the
/// other. The swarm runs until the test ends.
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
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    let mut control = swarm.behaviour().new_control();
    swarm
        .dial(node.listen_addrs().await.unwrap().remove(0))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            swarm.select_next_some().await,
            SwarmEvent::ConnectionEstablished { .. }
        ) {}
    })
    .await
    .expect("the bare swarm connects to the node");
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionClosed { cause, .. } = swarm.select_next_some().await {
                panic!("the node closed the connection: {cause:?}");
            }
        }
    });
    let mut opened = Vec::new();
    for _ in 0..streams {
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            control.open_stream(node.peer_id(), protocol.clone()),
        )
        .await
        .expect("the node answers in time")
        .expect("the node accepts keep-alive streams");
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
    let node = node(network).await;
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
    let node = node(network).await;
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
