//! The node through its public API: DHT, identity, network isolation, keep-alive, pnet, signed
//! gossip.

use std::time::Duration;

use micromesh::{
    Error, Multiaddr, Service,
    node::{self, Event, Node, PreSharedKey, Preset},
    testing::{self, Cluster, wait_until},
};

const WAIT: Duration = Duration::from_secs(20);

async fn dht_knows(node: &Node, peer: micromesh::PeerId) -> bool {
    node.dht_peers()
        .await
        .map(|peers| peers.iter().any(|p| p.peer_id == peer))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_from_one_bootstrap_see_and_resolve_each_other() {
    let cluster = Cluster::builder()
        .size(8)
        .network("dht")
        .build()
        .await
        .unwrap();
    let ids: Vec<_> = (0..8).map(|i| cluster.node(i).peer_id()).collect();

    // Every node's routing table holds every other node.
    for i in 0..8 {
        let node = cluster.node(i).clone();
        let others: Vec<_> = ids
            .iter()
            .copied()
            .filter(|p| *p != node.peer_id())
            .collect();
        wait_until(WAIT, || async {
            let table = node.dht_peers().await.unwrap_or_default();
            others.iter().all(|o| table.iter().any(|p| p.peer_id == *o))
        })
        .await
        .unwrap_or_else(|_| panic!("node {i} does not see every peer in its DHT"));
    }

    // Every node resolves the address of the last one through a DHT lookup, and the address
    // is one the target listens on.
    let target = cluster.node(7).clone();
    let target_addrs: Vec<Multiaddr> = target.listen_addrs().await.unwrap();
    for i in 0..7 {
        let found = cluster.node(i).find_peer(target.peer_id()).await.unwrap();
        assert!(
            found.iter().any(|a| target_addrs.contains(a)),
            "node {i} resolved {found:?}, the target listens on {target_addrs:?}"
        );
    }
    cluster.shutdown().await.unwrap();
}

/// A node that stops says goodbye: its peers drop it from their routing tables and forget its
/// provider records at once. A node that crashes says nothing: its peers find it gone with one
/// dial once its connection breaks, and drop it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_nodes_leave_the_routing_table_at_once() {
    let mut cluster = Cluster::builder()
        .size(3)
        .network("leaving")
        .build()
        .await
        .unwrap();
    let hub = cluster.node(0).clone();
    let (graceful, crashed) = (cluster.node(1).peer_id(), cluster.node(2).peer_id());
    cluster
        .node(1)
        .provide(b"leaving-key".to_vec())
        .await
        .unwrap();
    wait_until(WAIT, || async {
        dht_knows(&hub, graceful).await
            && dht_knows(&hub, crashed).await
            && hub
                .providers(b"leaving-key".to_vec())
                .await
                .is_ok_and(|p| p.contains(&graceful))
    })
    .await
    .expect("the hub knows both nodes, and who provides the key");

    cluster.stop(1).await.unwrap();
    // Exact: the goodbye is taken before the connection closes.
    assert!(!dht_knows(&hub, graceful).await);
    assert_eq!(testing::metric(&hub, "micromesh_peers_left_total"), 1);
    assert_eq!(
        hub.providers(b"leaving-key".to_vec()).await.unwrap(),
        Vec::<micromesh::PeerId>::new()
    );

    cluster.kill(2).await;
    wait_until(WAIT, || async { !dht_knows(&hub, crashed).await })
        .await
        .expect("the crashed node leaves the routing table");
    assert_eq!(testing::metric(&hub, "micromesh_peers_left_total"), 1);
    assert!(testing::metric(&hub, "micromesh_routing_removed_total") >= 1);
    cluster.shutdown().await.unwrap();
}

/// Every background task belongs to its node: one that panics is reported, the node goes on,
/// and a test cluster fails its shutdown; the tasks end with the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_panics_is_reported_and_fails_the_cluster() {
    let cluster = Cluster::new(2).await.unwrap();
    let node = cluster.node(1).clone();
    testing::inject_task_panic(&node, "a bug in a component");
    wait_until(WAIT, || async { !node.task_panics().is_empty() })
        .await
        .expect("the panic is reported");
    let panic = node.task_panics().remove(0);
    assert_eq!(panic.component, "testing");
    assert_eq!(panic.message, "a bug in a component");
    // The node goes on serving.
    assert!(node.peers().await.is_ok());
    let err = cluster.shutdown().await.unwrap_err();
    assert!(err.to_string().contains("a bug in a component"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_peer_id_and_rejoins() {
    let mut cluster = Cluster::new(3).await.unwrap();
    let before = cluster.node(2).peer_id();
    cluster.restart(2).await.unwrap();
    assert_eq!(cluster.node(2).peer_id(), before);

    // A crash and a start again: same identity, and the others see it again.
    cluster.kill(2).await;
    let watcher = cluster.node(1).clone();
    wait_until(WAIT, || async {
        !watcher
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == before)
            || dht_knows(&watcher, before).await
    })
    .await
    .unwrap();
    cluster.start_member(2).await.unwrap();
    assert_eq!(cluster.node(2).peer_id(), before);
    wait_until(WAIT, || dht_knows(&watcher, before))
        .await
        .unwrap();
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_networks_on_one_bootstrap_never_mix() {
    // The bootstrap node belongs to network "red".
    let boot = Service::builder("boot")
        .preset(Preset::Local)
        .network("red")
        .build()
        .await
        .unwrap();
    let boot_addr = boot.node().listen_addrs().await.unwrap().remove(0);
    let start = |network: &'static str| {
        let addr = boot_addr.clone();
        async move {
            Service::builder(network)
                .preset(Preset::Local)
                .network(network)
                .bootstrap(addr)
                .build()
                .await
                .unwrap()
        }
    };
    let red1 = start("red").await;
    let red2 = start("red").await;
    let blue1 = start("blue").await;
    let blue2 = start("blue").await;
    // The blue nodes also know each other directly, so blue is a working network too.
    blue2
        .node()
        .dial(blue1.node().listen_addrs().await.unwrap().remove(0))
        .await
        .unwrap();

    let reds = [boot.peer_id(), red1.peer_id(), red2.peer_id()];
    let blues = [blue1.peer_id(), blue2.peer_id()];
    wait_until(WAIT, || dht_knows(red2.node(), red1.peer_id()))
        .await
        .unwrap();
    wait_until(WAIT, || dht_knows(blue2.node(), blue1.peer_id()))
        .await
        .unwrap();

    // Provider records: red finds red's, blue finds none of them.
    red1.node().provide(b"shared-key".to_vec()).await.unwrap();
    let found = red2.node().providers(b"shared-key".to_vec()).await.unwrap();
    assert_eq!(
        found,
        vec![red1.peer_id()],
        "the control: red sees red's record"
    );
    assert!(
        blue2
            .node()
            .providers(b"shared-key".to_vec())
            .await
            .unwrap()
            .is_empty()
    );

    // Gossip on the same topic name: red receives red's message, blue never does.
    let mut red_sub = red2.node().subscribe("news").await.unwrap();
    let mut blue_sub = blue1.node().subscribe("news").await.unwrap();
    let _blue_sub2 = blue2.node().subscribe("news").await.unwrap();
    let publisher = red1.node().clone();
    let _own = publisher.subscribe("news").await.unwrap();
    wait_until(WAIT, || async {
        publisher
            .topic_peers("news")
            .await
            .unwrap()
            .contains(&red2.peer_id())
    })
    .await
    .unwrap();
    assert!(
        !publisher
            .topic_peers("news")
            .await
            .unwrap()
            .iter()
            .any(|p| blues.contains(p)),
        "red tracks no blue subscription"
    );
    publisher
        .publish("news", b"from red".to_vec())
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, red_sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"from red");
    assert_eq!(got.source, red1.peer_id());
    // Blue's publish on the same name reaches only blue.
    wait_until(WAIT, || async {
        blue2
            .node()
            .topic_peers("news")
            .await
            .unwrap()
            .contains(&blue1.peer_id())
    })
    .await
    .unwrap();
    blue2
        .node()
        .publish("news", b"from blue".to_vec())
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, blue_sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"from blue", "blue received red's message");
    // Red's next message arrives, and nothing from blue came with it.
    publisher.publish("news", b"again".to_vec()).await.unwrap();
    let got = tokio::time::timeout(WAIT, red_sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"again", "red received blue's message");
    assert!(red_sub.try_recv().is_none(), "red received blue's message");

    // Neither routing table holds a peer of the other network.
    for node in [boot.node(), red1.node(), red2.node()] {
        let table = node.dht_peers().await.unwrap();
        assert!(
            table.iter().all(|p| !blues.contains(&p.peer_id)),
            "a red table holds a blue peer"
        );
    }
    for node in [blue1.node(), blue2.node()] {
        let table = node.dht_peers().await.unwrap();
        assert!(
            table.iter().all(|p| !reds.contains(&p.peer_id)),
            "a blue table holds a red peer"
        );
    }
    for s in [red1, red2, blue1, blue2, boot] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_connections_survive_silence_and_unused_ones_close() {
    let local = || Node::builder().preset(Preset::Local);
    // b keeps no connection it does not use: above 0 peers, after a 1 s grace period.
    let b = local()
        .idle_timeout(Duration::from_secs(3))
        .connection_water_marks(0, 0)
        .connection_grace(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let a = local().build().await.unwrap();
    let c = local().build().await.unwrap();
    let mut b_events = b.events();
    b.dial(a.listen_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    b.dial(c.listen_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    // b stops needing c: that connection is closed; a stays.
    b.keep_alive(c.peer_id(), false).await.unwrap();
    let c_id = c.peer_id();
    wait_until(Duration::from_secs(10), || async {
        !b.peers().await.unwrap().iter().any(|p| p.peer_id == c_id)
    })
    .await
    .expect("the unused connection is closed");

    // b's connection to a stays open through 30 s of silence.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        b.peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == a.peer_id())
    );
    assert!(
        a.peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == b.peer_id())
    );
    while let Ok(event) = b_events.try_recv() {
        assert!(
            !matches!(event, Event::PeerDisconnected { peer_id } if peer_id == a.peer_id()),
            "the used connection was closed and reopened"
        );
    }
    assert!(
        b.encode_metrics()
            .contains("micromesh_connections_pruned_total 1")
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_key_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("identity.key"), b"garbage").unwrap();
    let err = Service::builder("x")
        .preset(Preset::Local)
        .data_dir(dir.path())
        .build()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Node(node::Error::Identity(_))),
        "{err:?}"
    );
    assert!(
        text.contains("identity.key") && text.contains("corrupt"),
        "{text}"
    );
    // The file was not replaced by a new identity.
    assert_eq!(
        std::fs::read(dir.path().join("identity.key")).unwrap(),
        b"garbage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_shared_key_closes_the_network() {
    let key = PreSharedKey::generate();
    let start = |key: Option<PreSharedKey>| async move {
        let mut b = Node::builder()
            .preset(Preset::Local)
            .dial_timeout(Duration::from_secs(3));
        if let Some(key) = key {
            b = b.pre_shared_key(key);
        }
        b.build().await.unwrap()
    };
    let a = start(Some(key)).await;
    let a_addr = a.listen_addrs().await.unwrap().remove(0);
    let member = start(Some(key)).await;
    assert_eq!(member.dial(a_addr.clone()).await.unwrap(), a.peer_id());
    let outsider = start(Some(PreSharedKey::generate())).await;
    assert!(
        outsider.dial(a_addr.clone()).await.is_err(),
        "another key got in"
    );
    let open = start(None).await;
    assert!(
        open.dial(a_addr).await.is_err(),
        "a node without a key got in"
    );
    // QUIC cannot carry the key, so it is refused up front.
    let err = Node::builder()
        .pre_shared_key(key)
        .listen("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .mdns(false)
        .upnp(false)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, node::Error::Listen { .. }), "{err}");
    for n in [a, member, outsider, open] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handle_reports_why_the_node_stopped() {
    let node = Node::builder().preset(Preset::Local).build().await.unwrap();
    let other = node.clone();
    node.shutdown().await;
    match other.peers().await {
        Err(node::Error::Stopped(node::ExitReason::Shutdown)) => {}
        other => panic!("expected Stopped(Shutdown), got {other:?}"),
    }
    let err = other.dial("/memory/1".parse().unwrap()).await.unwrap_err();
    assert_eq!(err.to_string(), "the node has stopped: it was shut down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_dials_are_clear_errors() {
    let err = Node::builder()
        .preset(Preset::Local)
        .network("has space")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, node::Error::InvalidConfig(_)), "{err}");
    let node = Node::builder()
        .preset(Preset::Local)
        .dial_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    assert!(matches!(
        node.subscribe("_reserved").await,
        Err(node::Error::InvalidTopic { .. })
    ));
    assert!(matches!(
        node.publish("nobody-listens", b"x".to_vec()).await,
        Err(node::Error::Publish {
            reason: node::PublishError::NoSubscribers,
            ..
        })
    ));
    let err = node
        .dial("/memory/999999999".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            node::Error::Dial { .. } | node::Error::DialTimeout { .. }
        ),
        "{err}"
    );
    assert!(matches!(
        node.bootstrap().await,
        Err(node::Error::NoKnownPeers(_))
    ));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_a_listen_error_whose_source_says_so() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let err = Node::builder()
        .preset(Preset::Local)
        .listen(addr.clone())
        .build()
        .await
        .unwrap_err();
    let node::Error::Listen { addr: refused, .. } = &err else {
        panic!("not a listen error: {err}");
    };
    assert_eq!(*refused, addr);
    // The message names the address; the operating system's reason is its source.
    assert_eq!(err.to_string(), format!("cannot listen on {addr}"));
    let mut causes = String::new();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        causes.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(causes.contains("in use"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_hooks_run_in_order() {
    use std::sync::{Arc, Mutex};
    let log = Arc::new(Mutex::new(Vec::new()));
    let hook = |name: &'static str| {
        let log = log.clone();
        move || {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(name);
                Ok(())
            }
        }
    };
    let service = Service::builder("hooks")
        .preset(Preset::Local)
        .before_start(hook("before_start"))
        .after_start(hook("after_start"))
        .before_stop(hook("before_stop"))
        .after_stop(hook("after_stop"))
        .build()
        .await
        .unwrap();
    assert_eq!(*log.lock().unwrap(), ["before_start", "after_start"]);
    let node = service.node().clone();
    service.run_until(async { Ok(()) }).await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["before_start", "after_start", "before_stop", "after_stop"]
    );
    assert_eq!(node.exit_reason(), Some(node::ExitReason::Shutdown));
    // A failing start hook aborts the start with the hook's error.
    let err = Service::builder("bad")
        .preset(Preset::Local)
        .after_start(|| async { Err("no database".into()) })
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "the after_start hook failed: no database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_hold_libp2p_counters() {
    let cluster = Cluster::new(2).await.unwrap();
    let text = cluster.node(1).encode_metrics();
    assert!(
        text.contains("libp2p_swarm_connections_established"),
        "{text}"
    );
    assert!(
        text.contains("libp2p_bandwidth"),
        "bandwidth metrics missing"
    );
    cluster.shutdown().await.unwrap();
}

/// A node with the relay server on (the optional behaviours' link enabled) relays: `b` reserves
/// a circuit on it, and `c`, which only knows `b`'s circuit address, reaches `b` through it.
/// In-process, the relay's only external address is the one it is told to advertise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_server_carries_a_circuit_between_two_peers() {
    let relay_addr: Multiaddr = format!("/memory/{}", rand_port()).parse().unwrap();
    let relay = Node::builder()
        .preset(Preset::Local)
        .listen(relay_addr.clone())
        .external_address(relay_addr.clone())
        .relay_server(true)
        .build()
        .await
        .unwrap();
    let relay_addr = relay.listen_addrs().await.unwrap().remove(0);
    let circuit: Multiaddr = format!("{relay_addr}/p2p-circuit").parse().unwrap();
    let b = Node::builder()
        .preset(Preset::Local)
        .bootstrap(relay_addr.clone())
        .listen(circuit.clone())
        .build()
        .await
        .unwrap();
    let b_via_relay: Multiaddr = format!("{circuit}/p2p/{}", b.peer_id()).parse().unwrap();
    let c = Node::builder().preset(Preset::Local).build().await.unwrap();

    // b's build returned once its circuit listener was up, i.e. once the relay granted the
    // reservation: the first dial must get through.
    let reached = c.dial(b_via_relay.clone()).await;
    assert_eq!(reached.expect("c reaches b through the relay"), b.peer_id());
    let peers = c.peers().await.unwrap();
    let to_b = peers
        .iter()
        .find(|p| p.peer_id == b.peer_id())
        .expect("c is connected to b");
    assert!(
        to_b.addresses
            .iter()
            .any(|a| a.to_string().contains("/p2p-circuit")),
        "c's connection to b is not relayed: {:?}",
        to_b.addresses
    );
    for node in [c, b, relay] {
        node.shutdown().await;
    }
}

/// A free-enough in-process port: random, so tests running at once do not collide.
fn rand_port() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) | 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_and_misdirected_gossip_frames_reach_nobody() {
    // 0 and 1 subscribe; 2, 3, 4 and 5 each publish one genuine message, then one bad frame.
    let cluster = Cluster::builder()
        .size(6)
        .network("frames")
        .build()
        .await
        .unwrap();
    let mut subscriptions = Vec::new();
    for i in 0..2 {
        subscriptions.push(cluster.node(i).subscribe("prices").await.unwrap());
    }
    let subscribers = [cluster.node(0).peer_id(), cluster.node(1).peer_id()];
    for attacker in 2..6 {
        let node = cluster.node(attacker).clone();
        wait_until(WAIT, || async {
            node.topic_peers("prices")
                .await
                .is_ok_and(|p| subscribers.iter().all(|s| p.contains(s)))
        })
        .await
        .unwrap();
        node.publish("prices", format!("genuine from {attacker}"))
            .await
            .unwrap();
    }
    let frame = |attacker: usize, topic: &str, payload: &[u8]| {
        let signer = cluster.node(attacker).identity();
        testing::gossip_frame(signer, "frames", topic, 7, payload)
    };
    // 2 signs with its own key but names subscriber 1's key as the publisher's.
    let mut impersonation = frame(2, "prices", b"from 1, honest");
    impersonation[1..33].copy_from_slice(&cluster.node(1).identity().public_key_bytes());
    // 3 changes the payload of a frame it signed.
    let mut tampered = frame(3, "prices", b"price 10");
    *tampered.last_mut().unwrap() = b'9';
    // 4 replays on `prices` a frame it signed for another topic.
    let misdirected = frame(4, "audit", b"price 12");
    // 5 sends bytes that are no frame.
    let garbage = b"\x01short".to_vec();
    for (attacker, bad) in [
        (2, impersonation),
        (3, tampered),
        (4, misdirected),
        (5, garbage),
    ] {
        testing::inject_gossip_frame(cluster.node(attacker), "prices", bad)
            .await
            .unwrap();
    }

    // Every subscriber rejects the four bad frames...
    for i in 0..2 {
        let node = cluster.node(i).clone();
        wait_until(WAIT, || async {
            testing::metric(&node, "micromesh_gossip_rejected_total") >= 4
        })
        .await
        .unwrap_or_else(|_| panic!("{}", node.encode_metrics()));
    }
    // ...and received exactly the four genuine messages, each from the peer that signed it.
    for (i, subscription) in subscriptions.iter_mut().enumerate() {
        let mut got = Vec::new();
        while let Some(message) = subscription.try_recv() {
            got.push((message.source, String::from_utf8(message.data).unwrap()));
        }
        got.sort();
        let mut expected: Vec<_> = (2..6)
            .map(|a| (cluster.node(a).peer_id(), format!("genuine from {a}")))
            .collect();
        expected.sort();
        assert_eq!(got, expected, "subscriber {i}");
        assert_eq!(
            testing::metric(cluster.node(i), "micromesh_gossip_rejected_total"),
            4,
            "subscriber {i}"
        );
    }
    // Each bad frame cost its sender: its gossipsub score on both subscribers is negative.
    for i in 0..2 {
        for attacker in 2..6 {
            let score = cluster
                .node(i)
                .gossip_score(cluster.node(attacker).peer_id())
                .await
                .unwrap()
                .unwrap_or(0.0);
            assert!(score < 0.0, "attacker {attacker} scores {score} on {i}");
        }
    }
    drop(subscriptions);
    cluster.shutdown().await.unwrap();
}
