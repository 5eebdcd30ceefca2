//! Publish/subscribe through the public API: broadcast order and exactly-once delivery on 20
//! nodes, queue groups with a killed member, bounded slow subscribers, validation and scoring,
//! size limits, publishing with no subscribers, and peers restarting on QUIC and TCP.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use micromesh::{
    Identity, Multiaddr, Service, Status,
    broker::{Error, Event, Message, PublishOptions, SubscribeOptions, Validation},
    testing::{Cluster, wait_until},
};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(60);

/// What one subscriber received.
type Log<T> = Arc<Mutex<Vec<T>>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Tick {
    n: u64,
}

/// Waits until `publisher` knows `count` peers subscribed to `topic`.
async fn wait_for_topic_peers(service: &Service, topic: &str, count: usize) {
    let node = service.node().clone();
    wait_until(WAIT, || async {
        node.topic_peers(topic).await.unwrap().len() >= count
    })
    .await
    .unwrap_or_else(|_| panic!("{count} peers subscribed to {topic} in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broadcast_reaches_every_subscriber_once_in_publish_order() {
    const NODES: usize = 20;
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: u64 = 250;
    let cluster = Cluster::builder().size(NODES).build().await.unwrap();
    let received: Vec<Log<(String, u64)>> = (0..NODES).map(|_| Arc::default()).collect();
    let mut subscriptions = Vec::new();
    for (i, service) in cluster.services().enumerate() {
        let log = received[i].clone();
        let sub = service
            .broker()
            .subscribe("ticks", move |event: Event<Tick>| {
                let log = log.clone();
                async move {
                    assert_eq!(event.topic, "ticks");
                    log.lock()
                        .unwrap()
                        .push((event.publisher.to_string(), event.body.n));
                    Ok::<_, Status>(())
                }
            })
            .await
            .unwrap();
        subscriptions.push(sub);
    }
    for p in 0..PUBLISHERS {
        wait_for_topic_peers(cluster.service(1 + p), "ticks", NODES - 1).await;
    }

    let publishers = (0..PUBLISHERS).map(|p| {
        let broker = cluster.service(1 + p).broker().clone();
        tokio::spawn(async move {
            // A steady 100 messages per second from each publisher (a test build of 20 nodes on
            // a small machine has far less headroom than a real node).
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            for n in 0..PER_PUBLISHER {
                pace.tick().await;
                broker.publish("ticks", &Tick { n }).await.unwrap();
            }
        })
    });
    let started = std::time::Instant::now();
    for publisher in futures::future::join_all(publishers).await {
        publisher.unwrap();
    }
    eprintln!("published in {:?}", started.elapsed());
    for _ in 0..40 {
        let counts: Vec<usize> = received.iter().map(|l| l.lock().unwrap().len()).collect();
        eprintln!("{:?} {counts:?}", started.elapsed());
        if counts.iter().all(|&c| c >= 1000) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let total = PUBLISHERS * PER_PUBLISHER as usize;
    let all = received.clone();
    wait_until(WAIT, || {
        let all = all.clone();
        async move { all.iter().all(|log| log.lock().unwrap().len() >= total) }
    })
    .await
    .unwrap_or_else(|_| {
        let counts: Vec<usize> = received.iter().map(|l| l.lock().unwrap().len()).collect();
        let stats: Vec<_> = subscriptions.iter().map(|s| s.stats()).collect();
        let send_dropped: Vec<String> = cluster
            .services()
            .map(|s| {
                s.node()
                    .encode_metrics()
                    .lines()
                    .filter(|l| l.starts_with("micromesh_gossip_send_dropped_total"))
                    .collect()
            })
            .collect();
        panic!("every subscriber got {total} messages in time; got {counts:?}, {stats:?}, {send_dropped:?}")
    });
    // Let duplicates, if any, arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, log) in received.iter().enumerate() {
        let log = log.lock().unwrap();
        assert_eq!(log.len(), total, "subscriber {i} got duplicates");
        let mut by_publisher: HashMap<&str, Vec<u64>> = HashMap::new();
        for (publisher, n) in log.iter() {
            by_publisher.entry(publisher).or_default().push(*n);
        }
        assert_eq!(by_publisher.len(), PUBLISHERS);
        for (publisher, ns) in by_publisher {
            let expected: Vec<u64> = (0..PER_PUBLISHER).collect();
            assert_eq!(ns, expected, "subscriber {i}, publisher {publisher}: order");
        }
    }
    for sub in &subscriptions {
        let stats = sub.stats();
        assert_eq!(stats.delivered, total as u64);
        assert_eq!((stats.dropped, stats.late, stats.skipped), (0, 0, 0));
    }
    drop(subscriptions);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_group_takes_each_message_once_and_survives_a_killed_member() {
    const MESSAGES: u64 = 1000;
    let mut cluster = Cluster::new(5).await.unwrap();
    let handled: Vec<Log<u64>> = (0..5).map(|_| Arc::default()).collect();
    let mut members = Vec::new();
    for (i, log) in handled.iter().enumerate().skip(2) {
        let log = log.clone();
        let sub = cluster
            .service(i)
            .broker()
            .subscribe_with(
                "jobs",
                SubscribeOptions::new().group("workers"),
                move |event: Event<Tick>| {
                    let log = log.clone();
                    async move {
                        assert_eq!(event.group.as_deref(), Some("workers"));
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        log.lock().unwrap().push(event.body.n);
                        Ok::<_, Status>(())
                    }
                },
            )
            .await
            .unwrap();
        members.push(sub);
    }
    let publisher = cluster.service(1).clone();
    let broker = publisher.broker().clone();
    wait_until(WAIT, || async {
        let subscribers = broker.subscribers("jobs").await.unwrap();
        subscribers.broadcast.is_empty()
            && subscribers
                .groups
                .get("workers")
                .is_some_and(|m| m.len() == 3)
    })
    .await
    .expect("the publisher knows the three workers");

    // Without failures: each message to exactly one member, spread over all three.
    for n in 0..MESSAGES {
        publisher
            .broker()
            .publish("jobs", &Tick { n })
            .await
            .unwrap();
    }
    assert!(
        publisher.broker().flush(WAIT).await,
        "every delivery acknowledged"
    );
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (i, log) in handled.iter().enumerate().skip(2) {
        let log = log.lock().unwrap();
        assert!(log.len() > 100, "member {i} took a share: {}", log.len());
        for n in log.iter() {
            *seen.entry(*n).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), MESSAGES as usize);
    assert!(seen.values().all(|&c| c == 1), "no message twice");

    // A member is killed while messages are in flight: the others take every message.
    for log in &handled {
        log.lock().unwrap().clear();
    }
    let killed_at = 300;
    for n in 0..MESSAGES {
        if n == killed_at {
            cluster.kill(4).await;
        }
        publisher
            .broker()
            .publish("jobs", &Tick { n: MESSAGES + n })
            .await
            .unwrap();
    }
    assert!(
        publisher.broker().flush(WAIT).await,
        "every delivery acknowledged"
    );
    let survivors: HashSet<u64> = handled[2..4]
        .iter()
        .flat_map(|log| log.lock().unwrap().clone())
        .collect();
    let killed: HashSet<u64> = handled[4].lock().unwrap().iter().copied().collect();
    for n in MESSAGES..2 * MESSAGES {
        assert!(
            survivors.contains(&n) || killed.contains(&n),
            "message {n} was handled by some member"
        );
        if n >= MESSAGES + killed_at + 50 {
            assert!(survivors.contains(&n), "message {n} reached a live member");
        }
    }
    let metrics = publisher.node().encode_metrics();
    assert!(
        metrics.contains("micromesh_broker_dead_lettered_total 0"),
        "{metrics}"
    );
    drop(members);
    cluster.shutdown().await.unwrap();
}

/// Subscribes member `i` of `cluster` to `topic` (in `group`, if any), logging what it gets.
async fn logged_subscription(
    cluster: &Cluster,
    i: usize,
    topic: &str,
    group: Option<&str>,
) -> (micromesh::broker::Subscription, Log<u64>) {
    let log: Log<u64> = Arc::default();
    let mut options = SubscribeOptions::new();
    if let Some(group) = group {
        options = options.group(group);
    }
    let sink = log.clone();
    let sub = cluster
        .service(i)
        .broker()
        .subscribe_with(topic, options, move |event: Event<Tick>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(event.body.n);
                Ok::<_, Status>(())
            }
        })
        .await
        .unwrap();
    (sub, log)
}

/// Checks what one publish reached: both broadcast subscribers, and one member of each group.
async fn assert_reached_everyone(published: micromesh::broker::Published) {
    assert!(
        published.subscribers >= 2,
        "sent to both broadcast subscribers: {published:?}"
    );
    assert_eq!(published.groups, ["audit", "billing"], "{published:?}");
    for delivery in published.delivered().await {
        assert!(delivery.member.is_some(), "{delivery:?}");
        assert_eq!(delivery.error, None);
    }
}

/// A topic with broadcast subscribers and two queue groups: every publish reaches every
/// subscriber and one member of each group, from a long-lived publisher and from nodes that
/// publish the moment they start (which used to reach one kind of subscriber or the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_reaches_broadcast_subscribers_and_every_queue_group() {
    const LONG_LIVED: u64 = 10;
    const FRESH: u64 = 6;
    let cluster = Cluster::new(6).await.unwrap();
    let mut subscriptions = Vec::new();
    let mut logs = Vec::new();
    for (i, group) in [
        (1, None),
        (2, None),
        (3, Some("billing")),
        (4, Some("billing")),
        (5, Some("audit")),
    ] {
        let (sub, log) = logged_subscription(&cluster, i, "orders", group).await;
        subscriptions.push(sub);
        logs.push(log);
    }

    // Member 0, the bootstrap node, subscribes to nothing and publishes at once.
    let long_lived = cluster.service(0).broker().clone();
    for n in 0..LONG_LIVED {
        let published = long_lived.publish("orders", &Tick { n }).await.unwrap();
        assert_reached_everyone(published).await;
    }
    // Fresh nodes publish right after `build`, before anything told them of the subscribers.
    for n in LONG_LIVED..LONG_LIVED + FRESH {
        let fresh = Service::builder("publisher")
            .preset(micromesh::node::Preset::Local)
            .network(cluster.network())
            .bootstrap(cluster.bootstrap_addr().clone())
            .register(false)
            .build()
            .await
            .unwrap();
        let published = fresh.broker().publish("orders", &Tick { n }).await.unwrap();
        assert_reached_everyone(published).await;
        fresh.stop().await.unwrap();
    }

    let total = LONG_LIVED + FRESH;
    let expected: Vec<u64> = (0..total).collect();
    let logs_for_wait = logs.clone();
    wait_until(WAIT, || {
        let logs = logs_for_wait.clone();
        async move {
            logs[..2]
                .iter()
                .all(|l| l.lock().unwrap().len() as u64 >= total)
        }
    })
    .await
    .unwrap_or_else(|_| {
        let counts: Vec<usize> = logs.iter().map(|l| l.lock().unwrap().len()).collect();
        panic!("both broadcast subscribers got {total} messages; got {counts:?}")
    });
    for log in &logs[..2] {
        let mut got = log.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(
            got, expected,
            "each broadcast subscriber gets every message once"
        );
    }
    let mut billing: Vec<u64> = logs[2..4]
        .iter()
        .flat_map(|l| l.lock().unwrap().clone())
        .collect();
    billing.sort_unstable();
    assert_eq!(billing, expected, "billing takes each message once");
    let mut audit = logs[4].lock().unwrap().clone();
    audit.sort_unstable();
    assert_eq!(audit, expected, "audit takes each message once");
    drop(subscriptions);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_stays_bounded_and_counts_what_it_drops() {
    const MESSAGES: u64 = 500;
    const QUEUE: usize = 16;
    let cluster = Cluster::new(2).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let (g, h) = (gate.clone(), handled.clone());
    let sub = cluster
        .service(1)
        .broker()
        .subscribe_with(
            "firehose",
            SubscribeOptions::new().queue_capacity(QUEUE),
            move |_: Event<Tick>| {
                let (g, h) = (g.clone(), h.clone());
                async move {
                    g.acquire().await.unwrap().forget();
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>(())
                }
            },
        )
        .await
        .unwrap();
    let publisher = cluster.service(0);
    wait_for_topic_peers(publisher, "firehose", 1).await;
    for n in 0..MESSAGES {
        publisher
            .broker()
            .publish("firehose", &Tick { n })
            .await
            .unwrap();
    }
    // The handler is stuck: the queue fills and the rest is dropped and counted.
    wait_until(WAIT, || async {
        sub.stats().dropped + QUEUE as u64 + 1 >= MESSAGES
    })
    .await
    .unwrap_or_else(|_| panic!("drops counted: {:?}", sub.stats()));
    gate.add_permits(MESSAGES as usize);
    wait_until(WAIT, || async {
        let s = sub.stats();
        s.delivered + s.dropped == MESSAGES
    })
    .await
    .unwrap_or_else(|_| panic!("every message delivered or counted: {:?}", sub.stats()));
    let stats = sub.stats();
    assert!(
        stats.delivered <= QUEUE as u64 + 1,
        "at most the queue and the message in hand were kept: {stats:?}"
    );
    let metrics = cluster.node(1).encode_metrics();
    assert!(
        metrics.contains("micromesh_gossip_dropped_total"),
        "{metrics}"
    );
    drop(sub);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_message_reaches_nobody_and_lowers_its_senders_score() {
    let cluster = Cluster::new(4).await.unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let mut subs = Vec::new();
    for i in 1..4 {
        let broker = cluster.service(i).broker();
        broker.set_validator("prices", |message: &Message| {
            match message.decode::<f64>() {
                Ok(price) if price >= 0.0 => Validation::Accept,
                _ => Validation::Reject,
            }
        });
        let log = received.clone();
        subs.push(
            broker
                .subscribe("prices", move |event: Event<f64>| {
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push(event.body);
                        Ok::<_, Status>(())
                    }
                })
                .await
                .unwrap(),
        );
    }
    // Node 0 has no hook: it publishes what the others reject.
    let liar = cluster.service(0);
    wait_for_topic_peers(liar, "prices", 3).await;
    liar.broker().publish("prices", &1.5f64).await.unwrap();
    let log = received.clone();
    wait_until(WAIT, || {
        let log = log.clone();
        async move { log.lock().unwrap().len() == 3 }
    })
    .await
    .expect("the valid price reached all three subscribers");

    liar.broker().publish("prices", &-1.0f64).await.unwrap();
    let liar_id = liar.peer_id();
    for i in 1..4 {
        let node = cluster.node(i).clone();
        wait_until(WAIT, || async {
            node.gossip_score(liar_id).await.unwrap().unwrap_or(0.0) < 0.0
        })
        .await
        .unwrap_or_else(|_| panic!("node {i} lowered the liar's score"));
    }
    assert_eq!(*received.lock().unwrap(), vec![1.5, 1.5, 1.5]);
    let metrics = cluster.node(1).encode_metrics();
    assert!(
        metrics.contains("micromesh_broker_rejected_total 1"),
        "{metrics}"
    );

    // A node refuses to publish what its own hook rejects.
    let err = cluster
        .service(1)
        .broker()
        .publish("prices", &-2.0f64)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "{err}");
    drop(subs);
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_fail_clearly_before_anything_is_sent() {
    let cluster = Cluster::builder()
        .size(1)
        .configure(|_, b| {
            b.broker_config(micromesh::broker::Config::default().topic_limit("thumbs", 1024))
        })
        .build()
        .await
        .unwrap();
    let broker = cluster.service(0).broker();
    let options = || PublishOptions::new().allow_no_subscribers();
    let err = broker
        .publish_raw("thumbs", vec![0u8; 2048], options())
        .await
        .unwrap_err();
    match &err {
        Error::TooLarge { topic, size, max } => {
            assert_eq!((topic.as_str(), *max), ("thumbs", 1024));
            assert!(*size > 2048);
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    assert!(
        err.to_string().contains("exceeds the limit of 1024 bytes"),
        "{err}"
    );
    let err = broker
        .publish_raw("photos", vec![0u8; 2 << 20], options())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    broker
        .publish_raw("thumbs", vec![0u8; 512], options())
        .await
        .unwrap();
    let err = broker
        .publish_with("bad topic", &1, options())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTopic { .. }), "{err}");
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_publish_with_no_subscribers_waits_then_fails_unless_allowed() {
    let cluster = Cluster::new(2).await.unwrap();
    let broker = cluster.service(1).broker();
    let started = std::time::Instant::now();
    let err = broker
        .publish_with(
            "nobody",
            &Tick { n: 1 },
            PublishOptions::new().wait_for_subscribers(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoSubscribers { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    broker
        .publish_with(
            "nobody",
            &Tick { n: 2 },
            PublishOptions::new().allow_no_subscribers(),
        )
        .await
        .unwrap();
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_start_waits_for_the_subscriber() {
    let mut cluster = Cluster::new(2).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let _sub = cluster
        .service(1)
        .broker()
        .subscribe_raw("hello", SubscribeOptions::new(), move |message: Message| {
            let tx = tx.clone();
            async move {
                tx.send(message).await.unwrap();
                Ok::<_, Status>(())
            }
        })
        .await
        .unwrap();
    // A fresh node publishes at once: it knows no subscriber yet, and must find one.
    let fresh = cluster.add_member().await.unwrap();
    let publisher = cluster.service(fresh).clone();
    publisher
        .broker()
        .publish_raw(
            "hello",
            b"first".to_vec(),
            PublishOptions::new().header("kind", "greeting"),
        )
        .await
        .unwrap();
    let message = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.body, &b"first"[..]);
    assert_eq!(message.publisher, publisher.peer_id());
    assert_eq!(message.headers.get("kind"), Some("greeting"));
    assert_eq!(message.content_type, micromesh::broker::RAW_CONTENT_TYPE);
    assert_eq!(message.id.seq, 0);
    cluster.shutdown().await.unwrap();
}

/// A peer on real sockets.
async fn socket_peer(listen: &str, identity: Identity, bootstrap: Option<Multiaddr>) -> Service {
    let mut builder = Service::builder("restarting")
        .network("broker-restart")
        .identity(identity)
        .listen(listen.parse().unwrap())
        .register(false)
        .configure_node(|n| n.mdns(false).upnp(false).autonat(false).memory_limit(None));
    if let Some(addr) = bootstrap {
        builder = builder.bootstrap(addr);
    }
    builder.build().await.unwrap()
}

/// The subscriber crashes (no goodbye on the wire) and comes back with the same identity on the
/// same address; the publisher must reach the new process within seconds.
async fn a_restarted_subscriber_gets_messages_again(listen: &str) {
    let publisher = socket_peer(listen, Identity::generate(), None).await;
    // In one test process a crashed node's socket may outlive it, so the new process listens
    // on a new port, as a restarted process often does.
    let addr = publisher.node().listen_addrs().await.unwrap().remove(0);
    let identity = Identity::generate();
    let subscriber = socket_peer(listen, identity.clone(), Some(addr.clone())).await;
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let sub = subscriber
        .broker()
        .subscribe("beats", move |_: Event<Tick>| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Status>(())
            }
        })
        .await
        .unwrap();
    wait_for_topic_peers(&publisher, "beats", 1).await;
    let broker = publisher.broker().clone();
    let beating = tokio::spawn(async move {
        for n in 0.. {
            let options = PublishOptions::new().allow_no_subscribers();
            let _ = broker.publish_with("beats", &Tick { n }, options).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let c = count.clone();
    wait_until(WAIT, || async { c.load(Ordering::SeqCst) > 0 })
        .await
        .unwrap();

    // Crash: the event loop ends at once and nothing is said to the publisher.
    drop(sub);
    micromesh::testing::crash(&subscriber);
    subscriber.node().stopped().await;
    drop(subscriber);
    let again = socket_peer(listen, identity, Some(addr)).await;
    let restarted = Arc::new(AtomicUsize::new(0));
    let r = restarted.clone();
    let _sub = again
        .broker()
        .subscribe("beats", move |_: Event<Tick>| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Status>(())
            }
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = restarted.clone();
    wait_until(Duration::from_secs(8), || async {
        r.load(Ordering::SeqCst) > 0
    })
    .await
    .unwrap_or_else(|_| panic!("the restarted subscriber got nothing within 8 s on {listen}"));
    let stale = publisher
        .node()
        .encode_metrics()
        .lines()
        .find(|l| l.starts_with("micromesh_stale_connections_total"))
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "{listen}: messages again {:?} after the restart ({stale})",
        started.elapsed()
    );
    beating.abort();
    again.stop().await.unwrap();
    publisher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_subscriber_gets_messages_again_over_quic() {
    a_restarted_subscriber_gets_messages_again("/ip4/127.0.0.1/udp/0/quic-v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_subscriber_gets_messages_again_over_tcp() {
    a_restarted_subscriber_gets_messages_again("/ip4/127.0.0.1/tcp/0").await;
}

/// A validation hook that blocks for seconds holds up its own topic only: the same node goes
/// on answering calls, its event loop answers at once, and registry updates spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_validation_hook_holds_up_only_its_topic() {
    let cluster = Cluster::builder()
        .size(3)
        .configure(|i, b| {
            if i == 1 {
                b.handle("Echo.Echo", |_: micromesh::Context, n: u64| async move {
                    Ok::<_, Status>(n)
                })
                .register(true)
            } else {
                b
            }
        })
        .build()
        .await
        .unwrap();
    let slow = cluster.service(1).clone();
    let hooks_run = Arc::new(AtomicUsize::new(0));
    let runs = hooks_run.clone();
    slow.broker().set_validator("slow", move |_: &Message| {
        runs.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(5));
        Validation::Accept
    });
    let _sub = slow
        .broker()
        .subscribe_raw("slow", SubscribeOptions::new(), |_: Message| async {
            Ok::<_, Status>(())
        })
        .await
        .unwrap();
    let publisher = cluster.service(2).clone();
    wait_for_topic_peers(&publisher, "slow", 1).await;
    for n in 0..20u64 {
        publisher
            .broker()
            .publish_raw("slow", n.to_be_bytes().to_vec(), PublishOptions::new())
            .await
            .unwrap();
    }
    wait_until(WAIT, || async { hooks_run.load(Ordering::SeqCst) >= 1 })
        .await
        .expect("the slow hook runs");

    // While the hook sleeps: calls to the node are answered, each well within a second.
    let caller = cluster.service(0).clone();
    let registry = caller.registry().clone();
    wait_until(WAIT, || async {
        registry.get_service("member-1").await.is_ok()
    })
    .await
    .expect("the caller knows the node");
    for n in 0..50u64 {
        let started = std::time::Instant::now();
        let echoed: u64 = caller
            .client()
            .call_with(
                "member-1",
                "Echo.Echo",
                &n,
                micromesh::client::CallOptions::default().timeout(Duration::from_secs(2)),
            )
            .await
            .unwrap_or_else(|e| panic!("call {n} while the hook sleeps: {e}"));
        assert_eq!(echoed, n);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Its event loop answers at once, and a registration on it spreads to the others.
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(1), slow.node().peers())
            .await
            .expect("the event loop answers within a second")
            .unwrap();
    }
    slow.registry()
        .register(micromesh::registry::Registration::new("added-while-slow"))
        .await
        .unwrap();
    let watcher = caller.registry().clone();
    wait_until(Duration::from_secs(4), || async {
        !watcher.cached_service("added-while-slow").is_empty()
    })
    .await
    .expect("the registration spreads while the hook sleeps");
    assert!(
        hooks_run.load(Ordering::SeqCst) < 20,
        "the test ran while the hook was still behind"
    );
    cluster.shutdown().await.unwrap();
}

/// A flood of 10,000 gossip messages with forged frames: each is refused by the first node that
/// sees it, and calls to that node go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_invalid_gossip_does_not_stop_calls() {
    let cluster = Cluster::builder()
        .size(3)
        .configure(|i, b| {
            if i == 1 {
                b.handle("Echo.Echo", |_: micromesh::Context, n: u64| async move {
                    Ok::<_, Status>(n)
                })
                .register(true)
            } else {
                b
            }
        })
        .build()
        .await
        .unwrap();
    let target = cluster.service(1).clone();
    let _sub = target
        .broker()
        .subscribe_raw("news", SubscribeOptions::new(), |_: Message| async {
            Ok::<_, Status>(())
        })
        .await
        .unwrap();
    let attacker = cluster.node(2).clone();
    wait_until(WAIT, || async {
        attacker
            .topic_peers("news")
            .await
            .is_ok_and(|p| p.contains(&target.peer_id()))
    })
    .await
    .unwrap();
    let flood = tokio::spawn(async move {
        for n in 0..10_000u32 {
            // Not a frame at all: every one fails its check.
            let _ = micromesh::testing::inject_gossip_frame(
                &attacker,
                "news",
                n.to_be_bytes().repeat(40),
            )
            .await;
        }
    });
    let caller = cluster.service(0).clone();
    let registry = caller.registry().clone();
    wait_until(WAIT, || async {
        registry.get_service("member-1").await.is_ok()
    })
    .await
    .unwrap();
    let mut calls = 0u64;
    while !flood.is_finished() || calls < 50 {
        let echoed: u64 = caller
            .client()
            .call_with(
                "member-1",
                "Echo.Echo",
                &calls,
                micromesh::client::CallOptions::default().timeout(Duration::from_secs(2)),
            )
            .await
            .unwrap_or_else(|e| panic!("call {calls} during the flood: {e}"));
        assert_eq!(echoed, calls);
        calls += 1;
    }
    flood.await.unwrap();
    assert!(micromesh::testing::metric(target.node(), "micromesh_gossip_rejected_total") >= 1);
    let score = target
        .node()
        .gossip_score(cluster.node(2).peer_id())
        .await
        .unwrap()
        .unwrap_or(0.0);
    assert!(score < 0.0, "the flooder still scores {score}");
    cluster.shutdown().await.unwrap();
}
