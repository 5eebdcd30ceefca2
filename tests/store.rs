//! The store through the public API on in-process clusters: reads everywhere, TTL and delete,
//! list across the mesh, durability when holders die, a full restart from the data
//! directories, concurrent writers, forged and tampered records, size limits.

use std::time::Duration;

use micromesh::{
    Service,
    node::Error as NodeError,
    store::{Error, ListOptions, MAX_VALUE_SIZE, WriteOptions},
    testing::{self, Cluster, wait_until},
};

const WAIT: Duration = Duration::from_secs(30);

/// The cluster's members that run.
fn running(cluster: &Cluster) -> Vec<usize> {
    (0..cluster.len())
        .filter(|&i| cluster.is_running(i))
        .collect()
}

/// Reads `key` on `service`, as a string.
async fn read(service: &Service, key: &str) -> Option<String> {
    service
        .store()
        .read(key)
        .await
        .unwrap_or_else(|e| panic!("read {key}: {e}"))
        .map(|r| String::from_utf8(r.value).unwrap())
}

/// Bytes of records a node holds, from its metrics.
fn held_bytes(service: &Service) -> u64 {
    testing::metric(service.node(), "micromesh_store_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_are_readable_and_listed_on_every_node() {
    let cluster = Cluster::new(20).await.unwrap();
    // Five writers, four keys each.
    let mut written = Vec::new();
    for writer in 1..=5 {
        for k in 0..4 {
            let key = format!("user/{writer:02}-{k}");
            let version = cluster
                .service(writer)
                .store()
                .write(&key, format!("from {writer}").into_bytes())
                .await
                .unwrap();
            assert!(version > 0);
            written.push((key, format!("from {writer}")));
        }
    }
    cluster
        .service(2)
        .store()
        .write("other/x", b"not a user".to_vec())
        .await
        .unwrap();
    // Every node reads every key.
    for i in running(&cluster) {
        for (key, value) in &written {
            assert_eq!(
                read(cluster.service(i), key).await.as_deref(),
                Some(value.as_str()),
                "node {i} reads {key}"
            );
        }
    }
    // A record carries its writer, version and metadata.
    let record = cluster
        .service(7)
        .store()
        .read("user/03-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.writer, cluster.node(3).peer_id());
    assert_eq!(record.key, "user/03-1");

    // list: prefix, offset and limit, from a node that wrote nothing.
    let store = cluster.service(11).store();
    let all = store
        .list(ListOptions::new().prefix("user/"))
        .await
        .unwrap();
    let mut expected: Vec<String> = written.iter().map(|(k, _)| k.clone()).collect();
    expected.sort();
    assert_eq!(all, expected);
    let page = store
        .list(ListOptions::new().prefix("user/").offset(5).limit(3))
        .await
        .unwrap();
    assert_eq!(page, expected[5..8].to_vec());
    let everything = store.list(ListOptions::new()).await.unwrap();
    assert_eq!(everything.len(), written.len() + 1);
    let records = store
        .read_prefix(ListOptions::new().prefix("user/04"))
        .await
        .unwrap();
    assert_eq!(records.len(), 4);
    assert!(records.iter().all(|r| r.value == b"from 4"));

    // Tables are separate namespaces.
    let other = store.table("app", "other").unwrap();
    assert!(other.read("user/01-0").await.unwrap().is_none());
    assert!(other.list(ListOptions::new()).await.unwrap().is_empty());
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_expiry_and_delete_apply_everywhere() {
    let cluster = Cluster::new(20).await.unwrap();
    let store = cluster.service(4).store();
    store
        .write_with(
            "session",
            b"s3cr3t".to_vec(),
            WriteOptions::new()
                .ttl(Duration::from_secs(3))
                .metadata("owner", "web"),
        )
        .await
        .unwrap();
    store.write("doomed", b"bye".to_vec()).await.unwrap();
    store.write("kept", b"here".to_vec()).await.unwrap();
    let session = cluster
        .service(9)
        .store()
        .read("session")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.metadata.get("owner"), Some("web"));
    assert!(session.expires.is_some());
    for i in running(&cluster) {
        assert_eq!(
            read(cluster.service(i), "doomed").await.as_deref(),
            Some("bye")
        );
    }

    cluster.service(13).store().delete("doomed").await.unwrap();
    for i in running(&cluster) {
        assert_eq!(read(cluster.service(i), "doomed").await, None, "node {i}");
        assert_eq!(
            read(cluster.service(i), "kept").await.as_deref(),
            Some("here")
        );
    }
    // The session expires on every node, and leaves the listing.
    wait_until(WAIT, || async {
        let mut gone = true;
        for i in running(&cluster) {
            gone &= read(cluster.service(i), "session").await.is_none();
        }
        gone
    })
    .await
    .expect("the session expires everywhere");
    let keys = cluster
        .service(17)
        .store()
        .list(ListOptions::new())
        .await
        .unwrap();
    assert_eq!(keys, vec!["kept"]);
    // A delete wins over the older write also on the writer, and a new write wins over it.
    assert_eq!(read(cluster.service(4), "doomed").await, None);
    store.write("doomed", b"again".to_vec()).await.unwrap();
    assert_eq!(
        read(cluster.service(13), "doomed").await.as_deref(),
        Some("again")
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_the_writer_and_another_holder() {
    let mut cluster = Cluster::new(20).await.unwrap();
    let writer = 5;
    let keys: Vec<String> = (0..40).map(|n| format!("order-{n}")).collect();
    for key in &keys {
        cluster
            .service(writer)
            .store()
            .write(key, key.as_bytes().to_vec())
            .await
            .unwrap();
    }
    // Kill the writer and the holder with the most records.
    let victim = running(&cluster)
        .into_iter()
        .filter(|&i| i != writer && i != 0)
        .max_by_key(|&i| held_bytes(cluster.service(i)))
        .unwrap();
    assert!(held_bytes(cluster.service(victim)) > 0);
    cluster.kill(writer).await;
    cluster.kill(victim).await;
    for reader in [1, 12, 19] {
        if reader == victim {
            continue;
        }
        for key in &keys {
            assert_eq!(
                read(cluster.service(reader), key).await.as_deref(),
                Some(key.as_str()),
                "node {reader} reads {key} after nodes {writer} and {victim} died"
            );
        }
        let listed = cluster
            .service(reader)
            .store()
            .list(ListOptions::new().prefix("order-"))
            .await
            .unwrap();
        assert_eq!(listed.len(), keys.len());
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_restart_from_the_data_directories_brings_every_record_back() {
    const NODES: usize = 20;
    let mut cluster = Cluster::new(NODES).await.unwrap();
    let keys: Vec<String> = (0..30).map(|n| format!("k{n:02}")).collect();
    for (n, key) in keys.iter().enumerate() {
        cluster
            .service(n % NODES)
            .store()
            .write(key, format!("v{n}").into_bytes())
            .await
            .unwrap();
    }
    cluster.service(1).store().delete("k00").await.unwrap();
    for i in 0..NODES {
        cluster.stop(i).await.unwrap();
    }
    for i in 0..NODES {
        cluster.start_member(i).await.unwrap();
    }
    for i in 0..NODES {
        for (n, key) in keys.iter().enumerate().skip(1) {
            assert_eq!(
                read(cluster.service(i), key).await,
                Some(format!("v{n}")),
                "node {i} reads {key} after the restart"
            );
        }
        assert_eq!(
            read(cluster.service(i), "k00").await,
            None,
            "the delete survives"
        );
    }
    let listed = cluster
        .service(3)
        .store()
        .list(ListOptions::new())
        .await
        .unwrap();
    assert_eq!(listed, keys[1..].to_vec());
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_converge_on_one_winner_everywhere() {
    let cluster = Cluster::new(20).await.unwrap();
    for round in 0..3 {
        let key = format!("leader-{round}");
        let writes = (0..10).map(|i| {
            let store = cluster.service(i * 2).store().clone();
            let key = key.clone();
            async move {
                let version = store
                    .write(&key, format!("node {}", i * 2).into_bytes())
                    .await;
                (version, i * 2)
            }
        });
        let results = futures::future::join_all(writes).await;
        // The winner: the highest version, ties broken by writer id.
        let winner = results
            .iter()
            .filter_map(|(v, i)| {
                v.as_ref()
                    .ok()
                    .map(|v| (*v, cluster.node(*i).peer_id(), *i))
            })
            .max_by(|a, b| a.0.cmp(&b.0).then(a.1.to_bytes().cmp(&b.1.to_bytes())))
            .expect("some writes succeed");
        let expected = format!("node {}", winner.2);
        wait_until(WAIT, || async {
            let mut agreed = true;
            for i in running(&cluster) {
                agreed &=
                    read(cluster.service(i), &key).await.as_deref() == Some(expected.as_str());
            }
            agreed
        })
        .await
        .unwrap_or_else(|_| panic!("every node reads {expected:?} for {key}"));
    }
    cluster.shutdown().await.unwrap();
}

/// The DHT key of a record, as `protocols/store.md` defines it.
fn key_of(database: &str, table: &str, key: &str) -> Vec<u8> {
    format!("r/{database}/{table}/{key}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_tampered_records_are_refused_by_every_node() {
    let cluster = Cluster::new(20).await.unwrap();
    let alice = cluster.service(1);
    let store = alice.store();
    let version = store.write("balance", b"100".to_vec()).await.unwrap();
    let db = store.database().to_owned();
    let table = store.table_name().to_owned();
    let network = cluster.network().to_owned();
    let mallory = cluster.service(6);

    // A holder that refuses a record does not answer; the sender gives up at Kademlia's
    // stream timeout, so the five attempts run at once.
    let key = key_of(&db, &table, "balance");
    let genuine = testing::raw_records(alice.node(), key.clone(), 1)
        .await
        .unwrap()
        .remove(0);
    // A newer record in alice's name, signed by mallory.
    let (_, forged) = testing::store_record(
        mallory.node().identity(),
        alice.node().peer_id(),
        &network,
        &db,
        &table,
        "balance",
        b"0",
        version + 1_000_000,
    );
    // alice's genuine record with its value changed.
    let mut tampered = genuine.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    // An older version of alice's own record: a rollback.
    let (_, old) = testing::store_record(
        alice.node().identity(),
        alice.node().peer_id(),
        &network,
        &db,
        &table,
        "balance",
        b"1000",
        version - 1,
    );
    let node = mallory.node();
    let (forged, tampered, moved, garbage, rollback) = tokio::join!(
        testing::put_raw_record(node, key.clone(), forged, 3),
        testing::put_raw_record(node, key.clone(), tampered, 3),
        // alice's record replayed under another key.
        testing::put_raw_record(node, key_of(&db, &table, "stolen"), genuine, 3),
        testing::put_raw_record(node, key.clone(), b"\x00garbage".to_vec(), 3),
        testing::put_raw_record(node, key.clone(), old, 3),
    );
    for (what, sent) in [
        ("forged", forged),
        ("tampered", tampered),
        ("moved", moved),
        ("garbage", garbage),
    ] {
        assert!(
            matches!(sent, Err(NodeError::Quorum { reached: 0, .. })),
            "no node takes a {what} record: {sent:?}"
        );
    }
    // Its holders (at least 3 of the 5 closest) refuse the rollback; a peer that never held the
    // key may take it, and it loses to the newer version on every read.
    assert!(
        matches!(rollback, Err(NodeError::Quorum { .. })),
        "{rollback:?}"
    );

    for i in running(&cluster) {
        let record = cluster
            .service(i)
            .store()
            .read("balance")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.value, b"100", "node {i}");
        assert_eq!(record.writer, alice.node().peer_id());
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_up_to_the_limit_cross_the_mesh_and_larger_ones_fail_clearly() {
    let cluster = Cluster::new(5).await.unwrap();
    let store = cluster.service(2).store();
    let big = vec![0xab; MAX_VALUE_SIZE];
    store.write("big", big.clone()).await.unwrap();
    let read = cluster
        .service(4)
        .store()
        .read("big")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.value.len(), MAX_VALUE_SIZE);
    assert!(read.value == big);

    let err = store
        .write("bigger", vec![0; MAX_VALUE_SIZE + 1])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("1048577 bytes"), "{err}");
    let err = store.write("", b"x".to_vec()).await.unwrap_err();
    assert!(matches!(err, Error::InvalidName(_)), "{err:?}");
    assert!(store.table("bad/name", "t").is_err());
    // The node goes on serving.
    store.write("small", b"ok".to_vec()).await.unwrap();
    assert_eq!(
        cluster
            .service(0)
            .store()
            .read("small")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"ok"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lone_node_keeps_its_writes_and_a_corrupt_store_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::builder("lone")
        .register(false)
        .preset(micromesh::node::Preset::Local)
        .data_dir(dir.path())
        .build()
        .await
        .unwrap();
    service.store().write("a", b"1".to_vec()).await.unwrap();
    assert_eq!(read(&service, "a").await.as_deref(), Some("1"));
    assert_eq!(
        service.store().list(ListOptions::new()).await.unwrap(),
        vec!["a"]
    );
    service.stop().await.unwrap();

    // Damage the database file: starting fails with a clear error, and the file is kept.
    let path = dir.path().join("store.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Service::builder("lone")
        .register(false)
        .preset(micromesh::node::Preset::Local)
        .data_dir(dir.path())
        .build()
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("store.redb"), "{message}");
    assert!(message.contains("corrupt"), "{message}");
    assert!(matches!(err, micromesh::Error::RecordStore(_)), "{err:?}");
    assert!(path.exists(), "a damaged file is left in place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_that_missed_a_write_is_repaired_by_a_read() {
    // Six nodes: with 5 replicas every node holds every record. Reads collect every copy.
    let mut cluster = Cluster::builder()
        .size(6)
        .configure(|_, b| b.store_config(micromesh::store::Config::default().read_quorum(6)))
        .build()
        .await
        .unwrap();
    let store = cluster.service(1).store().clone();
    store.write("k", b"v1".to_vec()).await.unwrap();
    let key = key_of(store.database(), store.table_name(), "k");
    cluster.stop(4).await.unwrap();
    store.write("k", b"v2".to_vec()).await.unwrap();
    cluster.start_member(4).await.unwrap();
    // Member 4 came back with v1 from its disk.
    let local = |i: usize| {
        let node = cluster.node(i).clone();
        let key = key.clone();
        async move { testing::raw_records(&node, key, 1).await.unwrap().remove(0) }
    };
    let newest = local(1).await;
    assert_ne!(local(4).await, newest, "member 4 missed the second write");
    // Reads answer v2 everywhere, member 4 included, and repair member 4's copy.
    wait_until(WAIT, || async {
        assert_eq!(read(cluster.service(2), "k").await.as_deref(), Some("v2"));
        assert_eq!(read(cluster.service(4), "k").await.as_deref(), Some("v2"));
        local(4).await == newest
    })
    .await
    .expect("member 4 holds v2 after reads");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_store_refuses_writes_clearly_and_keeps_what_it_has() {
    let cluster = Cluster::builder()
        .size(4)
        .configure(|_, b| b.store_config(micromesh::store::Config::default().capacity(100 * 1024)))
        .build()
        .await
        .unwrap();
    let store = cluster.service(1).store();
    let mut written = Vec::new();
    let err = loop {
        let key = format!("blob-{}", written.len());
        match store.write(&key, vec![1; 16 * 1024]).await {
            Ok(_) => written.push(key),
            Err(e) => break e,
        }
        assert!(
            written.len() < 10,
            "a 100 KiB store cannot take 10 values of 16 KiB"
        );
    };
    assert!(written.len() >= 3, "{written:?}");
    assert!(
        matches!(&err, Error::Refused { reason, .. } if reason.contains("full")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("raise the node's store capacity"),
        "{err}"
    );
    for key in &written {
        assert!(
            cluster
                .service(3)
                .store()
                .read(key)
                .await
                .unwrap()
                .is_some()
        );
    }
    cluster.shutdown().await.unwrap();
}
