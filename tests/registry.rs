//! The registry across a cluster, through the public API.

use std::time::{Duration, Instant};

use micromesh::{
    registry::{self, Endpoint, Event, Registration},
    selector::{Filter, SelectOptions},
    testing::{self, Cluster, wait_until},
};

const WAIT: Duration = Duration::from_secs(20);

async fn sees(
    registry: &micromesh::registry::Registry,
    name: &str,
    peer: micromesh::PeerId,
) -> bool {
    registry
        .cached_service(name)
        .iter()
        .any(|s| s.nodes.iter().any(|n| n.peer_id == peer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_reaches_twenty_nodes_within_a_second() {
    let cluster = Cluster::builder()
        .size(20)
        .network("reg20")
        .build()
        .await
        .unwrap();
    // Let the registry topic's gossip mesh form before measuring.
    let first = cluster.node(0).clone();
    wait_until(WAIT, || async {
        first
            .topic_peers(testing::REGISTRY_TOPIC)
            .await
            .map(|p| p.len() >= 5)
            .unwrap_or(false)
    })
    .await
    .unwrap();

    let owner = cluster.node(7).peer_id();
    let started = Instant::now();
    cluster
        .service(7)
        .registry()
        .register(Registration::new("inventory").version("2.1.0"))
        .await
        .unwrap();
    for i in 0..20 {
        let registry = cluster.service(i).registry().clone();
        wait_until(Duration::from_secs(1), || {
            sees(&registry, "inventory", owner)
        })
        .await
        .unwrap_or_else(|_| panic!("node {i} did not see the service within 1 s"));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "all 20 nodes saw it after {elapsed:?}"
    );
    cluster.shutdown().await.unwrap();
}

/// A registry that re-announces only every 5 minutes and syncs no views with new peers: a
/// newcomer learns a name only by asking for it.
fn asked_only() -> registry::Config {
    registry::Config::with_announce_interval(Duration::from_secs(300)).initial_syncs(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_finds_a_service_through_the_dht_at_once() {
    // Only the DHT can tell the newcomer.
    let config = asked_only();
    let mut cluster = Cluster::builder()
        .size(6)
        .network("late")
        .configure(move |_, b| b.registry_config(config.clone()))
        .build()
        .await
        .unwrap();
    let owner = cluster.node(3).peer_id();
    cluster
        .service(3)
        .registry()
        .register(Registration::new("billing").endpoint(Endpoint::new("Billing.Charge")))
        .await
        .unwrap();
    // The provider record (key per protocols/registry.md) is published in the background.
    let probe = cluster.node(0).clone();
    wait_until(WAIT, || async {
        probe
            .providers(b"/micromesh/registry/billing".to_vec())
            .await
            .map(|p| p.contains(&owner))
            .unwrap_or(false)
    })
    .await
    .unwrap();
    let newcomer = cluster.add_member().await.unwrap();
    let registry = cluster.service(newcomer).registry().clone();
    assert!(
        registry.cached_service("billing").is_empty(),
        "the newcomer heard it some other way"
    );

    // Ten concurrent lookups share one DHT query.
    let started = Instant::now();
    let lookups = (0..10).map(|_| registry.get_service("billing"));
    let results = futures::future::join_all(lookups).await;
    for result in results {
        let versions = result.expect("found through the DHT");
        assert_eq!(versions[0].nodes[0].peer_id, owner);
        assert!(versions[0].has_endpoint("Billing.Charge"));
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let metrics = cluster.node(newcomer).encode_metrics();
    assert!(
        metrics.contains("micromesh_registry_lookups_total 1\n"),
        "expected exactly one lookup:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("registry"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A name nobody runs is a clear error.
    assert!(matches!(
        registry.get_service("nobody-runs-this").await,
        Err(registry::Error::NotFound(_))
    ));
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_resolves_a_name_through_its_bootstrap_peer_without_the_dht() {
    let config = asked_only();
    let mut cluster = Cluster::builder()
        .size(1)
        .network("ask-neighbours")
        .configure(move |i, b| {
            b.registry_config(config.clone())
                .register(i == 0)
                .handle("Orders.Count", |_: micromesh::Context, n: u32| async move {
                    Ok::<_, micromesh::Status>(n + 1)
                })
        })
        .build()
        .await
        .unwrap();
    let owner = cluster.node(0).peer_id();
    // The member's own service is registered at start, and its provider record (key per
    // protocols/registry.md) is held by the member alone: taking it out leaves the DHT nobody
    // to name.
    let name = cluster.service(0).name().to_owned();
    let key = format!("/micromesh/registry/{name}").into_bytes();
    cluster.node(0).stop_providing(key.clone()).await.unwrap();

    let newcomer = cluster.add_member().await.unwrap();
    let client = cluster.service(newcomer).clone();
    let versions = client
        .registry()
        .get_service(&name)
        .await
        .expect("the bootstrap peer's view names it");
    assert_eq!(versions[0].nodes[0].peer_id, owner);
    let reply: u32 = client
        .client()
        .call(&name, "Orders.Count", &41u32)
        .await
        .unwrap();
    assert_eq!(reply, 42);
    // The DHT indeed had nobody to name.
    let providers = client.node().providers(key).await.unwrap_or_default();
    assert!(
        !providers.contains(&owner),
        "the DHT still names {providers:?}"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_disappears_from_every_view_far_below_the_ttl() {
    let mut cluster = Cluster::builder()
        .size(10)
        .network("kill")
        .build()
        .await
        .unwrap();
    let victim = cluster.node(4).peer_id();
    cluster
        .service(4)
        .registry()
        .register(Registration::new("payments"))
        .await
        .unwrap();
    for i in 0..10 {
        let registry = cluster.service(i).registry().clone();
        wait_until(WAIT, || sees(&registry, "payments", victim))
            .await
            .unwrap();
    }
    let started = Instant::now();
    cluster.kill(4).await;
    // The documented bound: a connection close, two liveness dials and one gossip hop; on
    // the memory transport that is well under 5 s, against a TTL of 30 s.
    for i in (0..10).filter(|i| *i != 4) {
        let registry = cluster.service(i).registry().clone();
        wait_until(Duration::from_secs(5), || async {
            !sees(&registry, "payments", victim).await
        })
        .await
        .unwrap_or_else(|_| panic!("node {i} still lists the killed node after 5 s"));
    }
    println!(
        "killed node dropped from every view after {:?}",
        started.elapsed()
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_removes_the_node_at_once() {
    let mut cluster = Cluster::builder()
        .size(5)
        .network("grace")
        .build()
        .await
        .unwrap();
    let leaving = cluster.node(2).peer_id();
    cluster
        .service(2)
        .registry()
        .register(Registration::new("search"))
        .await
        .unwrap();
    let watcher = cluster.service(4).registry().clone();
    wait_until(WAIT, || sees(&watcher, "search", leaving))
        .await
        .unwrap();
    let mut events = watcher.watch(Some("search"));
    cluster.stop(2).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(1), events.next())
        .await
        .expect("the leave arrives at once")
        .unwrap()
        .unwrap();
    assert!(matches!(event, Event::Deleted(s) if s.nodes[0].peer_id == leaving));
    for i in [0, 1, 3, 4] {
        assert!(
            !sees(cluster.service(i).registry(), "search", leaving).await,
            "node {i}"
        );
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_create_update_delete_in_order() {
    let cluster = Cluster::builder()
        .size(3)
        .network("watch")
        .build()
        .await
        .unwrap();
    // Announcements made before the registry topic's mesh forms reach nobody (the state is
    // repeated later, but the steps in between are gone): wait for it.
    let publisher = cluster.node(2).clone();
    let watcher_id = cluster.node(0).peer_id();
    wait_until(WAIT, || async {
        publisher
            .topic_peers(testing::REGISTRY_TOPIC)
            .await
            .unwrap()
            .contains(&watcher_id)
    })
    .await
    .unwrap();
    let mut watcher = cluster.service(0).registry().watch(Some("orders"));
    let mut everything = cluster.service(0).registry().watch(None);
    let owner = cluster.service(2).registry().clone();
    // Each change is made once the one before it has reached the watcher: changes that follow
    // one another faster than they spread may reach it merged (see `Registry::watch`).
    let mut next = async || {
        let event = tokio::time::timeout(WAIT, watcher.next())
            .await
            .expect("the watcher hears of the change")
            .unwrap()
            .unwrap();
        assert_eq!(
            event.service().name,
            "orders",
            "the filter let another name through"
        );
        event
    };
    owner
        .register(Registration::new("orders").version("1"))
        .await
        .unwrap();
    assert!(matches!(next().await, Event::Created(_)));
    owner.register(Registration::new("other")).await.unwrap();
    owner
        .register(
            Registration::new("orders")
                .version("1")
                .metadata("stage", "canary"),
        )
        .await
        .unwrap();
    match next().await {
        Event::Updated(s) => assert_eq!(s.metadata.get("stage"), Some("canary")),
        other => panic!("expected an update, got {other:?}"),
    }
    owner.deregister("orders", "1").await.unwrap();
    assert!(matches!(next().await, Event::Deleted(_)));
    // The unfiltered watcher saw the other service too.
    let mut names = Vec::new();
    while names.len() < 4 {
        let event = tokio::time::timeout(WAIT, everything.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        names.push(event.service().name.clone());
    }
    assert!(names.contains(&"other".to_owned()));
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_are_both_listed_and_filterable() {
    let cluster = Cluster::builder()
        .size(4)
        .network("versions")
        .build()
        .await
        .unwrap();
    cluster
        .service(1)
        .registry()
        .register(Registration::new("api").version("1.0"))
        .await
        .unwrap();
    cluster
        .service(2)
        .registry()
        .register(Registration::new("api").version("2.0"))
        .await
        .unwrap();
    cluster
        .service(3)
        .registry()
        .register(Registration::new("api").version("2.0"))
        .await
        .unwrap();
    let registry = cluster.service(0).registry().clone();
    wait_until(WAIT, || async {
        registry
            .cached_service("api")
            .iter()
            .map(|s| s.nodes.len())
            .sum::<usize>()
            == 3
    })
    .await
    .unwrap();
    let versions = registry.get_service("api").await.unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(
        (versions[0].version.as_str(), versions[0].nodes.len()),
        ("1.0", 1)
    );
    assert_eq!(
        (versions[1].version.as_str(), versions[1].nodes.len()),
        ("2.0", 2)
    );
    let listed = registry.list_services();
    assert_eq!(listed.iter().filter(|s| s.name == "api").count(), 2);

    let selector = cluster.service(0).selector();
    let v1 = SelectOptions::default().filter(Filter::Version("1.0".into()));
    for _ in 0..20 {
        let selected = selector.select("api", &versions, &v1).unwrap();
        assert_eq!(selected.peer_id(), cluster.node(1).peer_id());
    }
    let v2 = SelectOptions::default().filter(Filter::Version("2.0".into()));
    let picked: std::collections::HashSet<_> = (0..50)
        .map(|_| selector.select("api", &versions, &v2).unwrap().peer_id())
        .collect();
    assert!(
        picked
            .iter()
            .all(|p| *p == cluster.node(2).peer_id() || *p == cluster.node(3).peer_id())
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_announcements_are_rejected_counted_and_penalised() {
    // 0 bootstraps, 1 is the victim, 3 observes; 2, 4 and 5 attack.
    let cluster = Cluster::builder()
        .size(6)
        .network("forge")
        .build()
        .await
        .unwrap();
    let victim = cluster.node(1).peer_id();
    cluster
        .service(1)
        .registry()
        .register(Registration::new("ledger"))
        .await
        .unwrap();
    let observer = cluster.service(3).registry().clone();
    wait_until(WAIT, || sees(&observer, "ledger", victim))
        .await
        .unwrap();
    let observer_id = cluster.node(3).peer_id();
    for attacker in [2, 4, 5] {
        let node = cluster.node(attacker).clone();
        wait_until(WAIT, || async {
            node.topic_peers(testing::REGISTRY_TOPIC)
                .await
                .map(|p| p.contains(&observer_id))
                .unwrap_or(false)
        })
        .await
        .unwrap();
    }
    let inject = |attacker: usize, data: Vec<u8>| {
        let node = cluster.node(attacker).clone();
        async move {
            testing::inject_gossip(&node, testing::REGISTRY_TOPIC, data)
                .await
                .unwrap()
        }
    };

    // Mallory claims the victim runs another service, and that the victim left.
    let mallory = cluster.node(2).clone();
    let forged =
        testing::registry_announcement(mallory.identity(), victim, "forge", u64::MAX - 1, "evil");
    inject(2, forged).await;
    let forged_leave = testing::registry_leave(mallory.identity(), victim, "forge", u64::MAX);
    inject(2, forged_leave).await;
    // Garbage, and an oversized message.
    inject(4, b"\xa2not cbor at all".to_vec()).await;
    inject(5, vec![0x5a; 70 * 1024]).await;

    // Each kind is rejected by the first node that sees it, and counted there.
    let node3 = cluster.node(3).clone();
    let rejected = move |reason: &'static str| {
        let series = format!("micromesh_registry_messages_rejected_total{{reason=\"{reason}\"}}");
        testing::metric(&node3, &series)
    };
    wait_until(WAIT, || {
        let rejected = rejected.clone();
        async move {
            // On gossip a forgery is caught by its frame: signed by Mallory, it speaks for
            // the victim.
            rejected("wrong_publisher") >= 1
                && rejected("malformed") >= 1
                && rejected("too_large") >= 1
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{}", cluster.node(3).encode_metrics()));
    // And it costs the sender: its gossipsub score on the observer drops below zero.
    for attacker in [2, 4, 5] {
        let score = cluster
            .node(3)
            .gossip_score(cluster.node(attacker).peer_id())
            .await
            .unwrap()
            .unwrap_or(0.0);
        assert!(score < 0.0, "attacker {attacker} still scores {score}");
    }
    assert!(
        sees(&observer, "ledger", victim).await,
        "a forged leave evicted the victim"
    );
    assert!(
        observer.cached_service("evil").is_empty(),
        "a forged announcement was applied"
    );
    // The node goes on serving: a new registration still spreads.
    cluster
        .service(0)
        .registry()
        .register(Registration::new("after"))
        .await
        .unwrap();
    wait_until(WAIT, || sees(&observer, "after", cluster.node(0).peer_id()))
        .await
        .unwrap();
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registrations_are_refused_up_front() {
    let cluster = Cluster::new(1).await.unwrap();
    let registry = cluster.service(0).registry();
    let err = registry.register(Registration::new("")).await.unwrap_err();
    assert!(matches!(err, registry::Error::Invalid(_)), "{err}");
    let err = registry
        .register(Registration::new("x").metadata("k", "v".repeat(2000)))
        .await
        .unwrap_err();
    assert!(matches!(err, registry::Error::Invalid(_)), "{err}");
    // The refused ones left nothing behind; a valid one still works.
    assert!(registry.registrations().is_empty());
    registry.register(Registration::new("ok")).await.unwrap();
    assert_eq!(registry.registrations().len(), 1);
    assert!(matches!(
        registry.deregister("missing", "1").await,
        Err(registry::Error::NotFound(_))
    ));
    cluster.shutdown().await.unwrap();
}
