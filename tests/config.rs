//! Configuration through the public API: files edited while watched, precedence of the
//! sources, bad input, the mesh layer across nodes (propagation, auth, restarts), and auth
//! rules that change while services run.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use micromesh::{
    Context, Identity, Service, Status,
    client::CallOptions,
    config::{Config, Error},
    node::Preset,
    testing::{Cluster, wait_until},
};

const WAIT: Duration = Duration::from_secs(20);

/// The next item of a watch, within `within`.
async fn next_within<T>(
    watch: &mut micromesh::config::Watch<T>,
    within: Duration,
) -> Result<T, Error> {
    tokio::time::timeout(within, watch.next())
        .await
        .unwrap_or_else(|_| panic!("no change within {within:?}"))
        .expect("the config is alive")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn a_file_edit_reaches_a_watcher_within_a_second_and_an_unchanged_value_makes_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    write(&file, "[greeter]\ngreeting = \"hello\"\nretries = 1\n");
    let config = Config::builder().file(&file).build().unwrap();
    let mut greetings = config.watch::<String>("greeter.greeting");

    // Another key changes: the greeting's watcher sees nothing; then the greeting changes.
    write(&file, "[greeter]\ngreeting = \"hello\"\nretries = 2\n");
    wait_until(WAIT, || async {
        config.get::<u32>("greeter.retries").unwrap() == 2
    })
    .await
    .unwrap();
    let edited = Instant::now();
    write(&file, "[greeter]\ngreeting = \"bonjour\"\nretries = 2\n");
    assert_eq!(
        next_within(&mut greetings, Duration::from_secs(1))
            .await
            .unwrap(),
        "bonjour"
    );
    assert!(edited.elapsed() < Duration::from_secs(1));

    // Editors replace the file by renaming a new one over it.
    let new = dir.path().join("app.toml.new");
    write(&new, "[greeter]\ngreeting = \"hej\"\nretries = 2\n");
    std::fs::rename(&new, &file).unwrap();
    assert_eq!(
        next_within(&mut greetings, Duration::from_secs(1))
            .await
            .unwrap(),
        "hej"
    );
    assert_eq!(config.errors(), 0);
}

#[tokio::test]
async fn environment_beats_files_and_overrides_beat_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.yaml");
    let local = dir.path().join("local.json");
    write(
        &base,
        "network: from-base\nmax_connections: 10\ndial_timeout: 5s\n",
    );
    write(&local, r#"{ "max_connections": 20, "idle_timeout": "1m" }"#);
    let config = Config::builder()
        .default_value("query_timeout", "30s")
        .unwrap()
        .default_value("max_connections", 1)
        .unwrap()
        .file(&base)
        .file(&local)
        .env_vars(
            "MICROMESH",
            [
                ("MICROMESH_NETWORK", "from-env"),
                ("MICROMESH_DIAL_TIMEOUT", "7s"),
                ("MICROMESH_AUTH__DEFAULT_POLICY", "deny"),
            ],
        )
        .set("network", "from-flag")
        .unwrap()
        .build()
        .unwrap();
    let settings = micromesh::config::Settings::from_config(&config).unwrap();
    assert_eq!(
        settings.network.as_deref(),
        Some("from-flag"),
        "flag beats env"
    );
    assert_eq!(
        settings.dial_timeout,
        Some(Duration::from_secs(7)),
        "env beats file"
    );
    assert_eq!(
        settings.max_connections,
        Some(20),
        "later file beats earlier"
    );
    assert_eq!(settings.idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(
        settings.query_timeout,
        Some(Duration::from_secs(30)),
        "default"
    );
    assert_eq!(
        settings.auth.default_policy,
        Some(micromesh::auth::DefaultPolicy::Deny)
    );
}

#[tokio::test]
async fn a_malformed_file_keeps_the_last_good_configuration_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    write(&file, "limit = 5\n");
    let config = Config::builder().file(&file).build().unwrap();
    let mut limits = config.watch::<u32>("limit");

    write(&file, "limit = = 6\n[broken\n");
    match next_within(&mut limits, WAIT).await {
        Err(Error::File { path, .. }) => assert_eq!(path, file),
        other => panic!("expected the file's error, got {other:?}"),
    }
    assert_eq!(
        config.get::<u32>("limit").unwrap(),
        5,
        "the last good value stays"
    );
    assert_eq!(config.errors(), 1);

    // A value of the wrong type reaches the watcher as an error; the config keeps it as text.
    write(&file, "limit = \"lots\"\n");
    assert!(matches!(
        next_within(&mut limits, WAIT).await,
        Err(Error::Type { .. })
    ));
    // A good file again: the stream goes on.
    write(&file, "limit = 7\n");
    assert_eq!(next_within(&mut limits, WAIT).await.unwrap(), 7);

    // A file that does not parse at the start is an error, not an empty configuration.
    let bad = dir.path().join("bad.json");
    write(&bad, "{ not json");
    assert!(matches!(
        Config::builder().file(&bad).build(),
        Err(Error::File { .. })
    ));
    assert!(matches!(
        Config::builder()
            .file(dir.path().join("missing.toml"))
            .build(),
        Err(Error::File { .. })
    ));
}

#[tokio::test]
async fn a_mesh_set_reaches_the_watchers_of_ten_nodes_within_two_seconds() {
    let cluster = Cluster::builder().size(10).build().await.unwrap();
    let mut watches: Vec<_> = cluster
        .services()
        .map(|s| s.config().watch::<String>("greeter.greeting"))
        .collect();
    // Every member hears the configuration topic before the change is made.
    for i in 0..cluster.len() {
        let node = cluster.node(i);
        wait_until(WAIT, || async {
            !node
                .topic_peers(micromesh::config::MESH_TOPIC)
                .await
                .unwrap_or_default()
                .is_empty()
        })
        .await
        .unwrap();
    }

    let set = Instant::now();
    cluster
        .service(3)
        .config()
        .set_in_mesh("greeter.greeting", "hello from 3")
        .await
        .unwrap();
    for watch in &mut watches {
        let left = Duration::from_secs(2).saturating_sub(set.elapsed());
        assert_eq!(next_within(watch, left).await.unwrap(), "hello from 3");
    }
    let values = cluster.service(7).config().mesh_values();
    assert_eq!(values.len(), 1);
    assert_eq!(values[0].writer, cluster.service(3).peer_id());

    // The newest write wins everywhere, whichever node writes it.
    cluster
        .service(8)
        .config()
        .set_in_mesh("greeter.greeting", "hello from 8")
        .await
        .unwrap();
    for watch in &mut watches {
        assert_eq!(next_within(watch, WAIT).await.unwrap(), "hello from 8");
    }
    // Unset: the path goes on every node.
    cluster
        .service(0)
        .config()
        .unset_in_mesh("greeter.greeting")
        .await
        .unwrap();
    for watch in &mut watches {
        assert!(matches!(
            next_within(watch, WAIT).await,
            Err(Error::Missing { .. })
        ));
    }
    cluster.shutdown().await.unwrap();
}

/// Waits until `service` knows DHT peers to write to.
async fn joined(service: &Service) {
    wait_until(WAIT, || async {
        !service
            .node()
            .dht_peers()
            .await
            .unwrap_or_default()
            .is_empty()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unauthorised_set_is_refused_with_403_and_applied_nowhere() {
    let admin = Identity::generate();
    let admin_id = admin.peer_id();
    let rules = move || {
        micromesh::auth::Config::new()
            .rule("deny config:* any 0".parse().unwrap())
            .rule(
                format!("allow config:* peer:{admin_id} 10")
                    .parse()
                    .unwrap(),
            )
    };
    let cluster = Cluster::builder()
        .size(4)
        .configure(move |_, builder| builder.auth(rules()))
        .build()
        .await
        .unwrap();
    let addr = cluster.bootstrap_addr().clone();
    let network = cluster.network().to_owned();
    let join = |identity: Identity, auth: micromesh::auth::Config| {
        Service::builder("tool")
            .preset(Preset::Local)
            .network(network.clone())
            .identity(identity)
            .auth(auth)
            .bootstrap(addr.clone())
            .register(false)
            .build()
    };

    // A stranger under the same rules is refused before anything is written.
    let stranger = join(Identity::generate(), rules()).await.unwrap();
    let refused = stranger
        .config()
        .set_in_mesh("greeting", "from a stranger")
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Forbidden { .. }), "{refused:?}");
    assert_eq!(refused.status().code().as_u16(), 403);

    // A stranger that ignores the rules gets its record refused by every holder.
    let rogue = join(Identity::generate(), micromesh::auth::Config::new())
        .await
        .unwrap();
    joined(&rogue).await;
    let refused = rogue
        .config()
        .set_in_mesh("greeting", "from a rogue")
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Store(reason) if reason.contains("peers refuse a record")),
        "{refused}"
    );

    // The admin's change goes everywhere; the strangers' went nowhere.
    let admin = join(admin, rules()).await.unwrap();
    joined(&admin).await;
    admin
        .config()
        .set_in_mesh("greeting", "from the admin")
        .await
        .unwrap();
    for service in cluster.services() {
        wait_until(WAIT, || async {
            service
                .config()
                .get_opt::<String>("greeting")
                .unwrap()
                .as_deref()
                == Some("from the admin")
        })
        .await
        .unwrap();
    }
    for service in cluster.services() {
        service.config().sync_mesh().await.unwrap();
        assert_eq!(
            service.config().get::<String>("greeting").unwrap(),
            "from the admin"
        );
    }
    for service in [stranger, rogue, admin] {
        service.stop().await.unwrap();
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_node_starts_from_the_last_mesh_values_it_knew_without_a_peer() {
    let mut cluster = Cluster::builder().size(3).build().await.unwrap();
    cluster
        .service(0)
        .config()
        .set_in_mesh("limits.rate", &42)
        .await
        .unwrap();
    cluster
        .service(0)
        .config()
        .set_in_mesh("auth.rules", &["deny service:legacy any 3"])
        .await
        .unwrap();
    let member = cluster.service(2).clone();
    wait_until(WAIT, || async {
        member.config().get_opt::<u32>("limits.rate").unwrap() == Some(42)
            && member.auth().rules().len() == 1
    })
    .await
    .unwrap();
    drop(member);
    cluster.stop(2).await.unwrap();

    // Alone: no bootstrap peer, the same data directory.
    let alone = Service::builder("alone")
        .preset(Preset::Local)
        .network(cluster.network())
        .data_dir(cluster.data_dir(2))
        .build()
        .await
        .unwrap();
    assert_eq!(alone.node().connected_count(), 0);
    assert_eq!(alone.config().get::<u32>("limits.rate").unwrap(), 42);
    assert_eq!(alone.config().errors(), 0);
    // The rules set in the mesh are in force from the start.
    wait_until(WAIT, || async { alone.auth().rules().len() == 1 })
        .await
        .unwrap();
    assert_eq!(
        alone.auth().rules()[0].to_string(),
        "deny service:legacy any 3"
    );
    assert_eq!(
        alone.config().mesh_values()[0].writer,
        cluster.service(0).peer_id()
    );
    alone.stop().await.unwrap();
    cluster.shutdown().await.unwrap();
}

async fn whoami(_ctx: Context, _: ()) -> Result<String, Status> {
    Ok("greeter".into())
}

#[tokio::test]
async fn a_rule_changed_in_a_file_or_in_the_mesh_applies_to_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("greeter.toml");
    write(&file, "[auth]\nrules = [\"allow config:* any\"]\n");
    let config = Config::builder().file(&file).build().unwrap();
    let server = Service::builder("greeter")
        .preset(Preset::Local)
        .config(config)
        .handle("Greeter.Who", whoami)
        .build()
        .await
        .unwrap();
    let client = Service::builder("client")
        .preset(Preset::Local)
        .bootstrap(server.node().listen_addrs().await.unwrap()[0].clone())
        .build()
        .await
        .unwrap();
    let call = || async {
        client
            .client()
            .call_with::<_, String>(
                "greeter",
                "Greeter.Who",
                &(),
                CallOptions::default().peer(server.peer_id()),
            )
            .await
    };
    assert_eq!(call().await.unwrap(), "greeter");

    // The file denies the service: the rule is in force as soon as the server has read it.
    write(
        &file,
        "[auth]\nrules = [\"allow config:* any\", \"deny service:greeter any 5\"]\n",
    );
    wait_until(WAIT, || async { server.auth().rules().len() == 2 })
        .await
        .unwrap();
    let denied = call().await.unwrap_err();
    assert_eq!(denied.status().code().as_u16(), 403, "{denied}");

    // A bad rule keeps the rules in force, and is counted.
    let errors = server.config().errors();
    write(&file, "[auth]\nrules = [\"allow nonsense\"]\n");
    wait_until(WAIT, || async { server.config().errors() > errors })
        .await
        .unwrap();
    assert_eq!(
        micromesh::testing::metric(server.node(), "micromesh_config_errors_total"),
        server.config().errors(),
        "the count is the service's metric too"
    );
    assert_eq!(server.auth().rules().len(), 2);
    assert_eq!(call().await.unwrap_err().status().code().as_u16(), 403);

    // The mesh wins over the file: its rules allow the service again.
    client
        .config()
        .set_in_mesh(
            "auth.rules",
            &["allow config:* any", "allow service:greeter any 9"],
        )
        .await
        .unwrap();
    wait_until(WAIT, || async {
        server
            .auth()
            .rules()
            .iter()
            .any(|r| r.to_string() == "allow service:greeter any 9")
    })
    .await
    .unwrap();
    assert_eq!(call().await.unwrap(), "greeter");
    client.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_that_joins_after_a_change_catches_up_from_the_store() {
    let mut cluster = Cluster::builder().size(4).build().await.unwrap();
    for i in 0..cluster.len() {
        joined(cluster.service(i)).await;
    }
    // Written straight into the store's configuration table: no announcement, so a node can
    // only learn it from the store.
    cluster
        .service(1)
        .store()
        .table(
            micromesh::config::MESH_DATABASE,
            micromesh::config::MESH_TABLE,
        )
        .unwrap()
        .write("feature.beta", b"true".to_vec())
        .await
        .unwrap();
    // It learns it once it has a peer, by itself.
    let late = cluster.add_member().await.unwrap();
    let config = cluster.service(late).config().clone();
    wait_until(WAIT, || async {
        config.get_opt::<bool>("feature.beta").unwrap() == Some(true)
    })
    .await
    .unwrap();
    assert_eq!(config.mesh_values()[0].writer, cluster.service(1).peer_id());
    cluster.shutdown().await.unwrap();
}
