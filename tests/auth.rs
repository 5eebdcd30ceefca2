//! Auth through the public API, on several nodes: certificates in rustls, grants and their
//! refusals, rule priority, revocation spreading, and enforcement on calls, publishes and
//! store writes.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use micromesh::{
    Context, Identity, Multiaddr, PeerId, Service, Status,
    auth::{self, Certificate, DefaultPolicy, Grant, Revocation},
    broker,
    client::CallOptions,
    node::Preset,
    store,
    testing::{self, Cluster, wait_until},
};

const WAIT: Duration = Duration::from_secs(20);

fn grant(issuer: &Identity, subject: PeerId, role: &str, network: &str) -> Grant {
    Grant::builder(subject)
        .role(role)
        .valid_for(Duration::from_secs(3600))
        .sign(issuer, network)
        .unwrap()
}

/// Runs a rustls handshake between two in-memory connections, moving the bytes by hand.
fn handshake(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    for _ in 0..20 {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets()?;
        }
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish");
}

#[test]
fn peer_certificates_run_mutual_tls_in_rustls_and_name_both_peers() {
    use std::io::{Read as _, Write as _};

    let alice = Identity::generate();
    let bob = Identity::generate();
    let cert = Certificate::new(&alice).unwrap();
    assert_eq!(
        Certificate::peer_id_of(cert.der()).unwrap(),
        alice.peer_id()
    );
    // The PEM files hold what other TLS software loads.
    assert!(cert.pem().contains("BEGIN CERTIFICATE"));
    assert!(cert.private_key_pem().contains("BEGIN PRIVATE KEY"));

    let server_config = Arc::new(auth::server_config(&bob, None).unwrap());
    let client_config = Arc::new(auth::client_config(&alice, Some(bob.peer_id())).unwrap());
    let name = rustls::pki_types::ServerName::try_from("micromesh").unwrap();
    let mut client = rustls::ClientConnection::new(client_config, name.clone()).unwrap();
    let mut server = rustls::ServerConnection::new(server_config.clone()).unwrap();
    handshake(&mut client, &mut server).unwrap();
    assert_eq!(auth::peer_of(&client), Some(bob.peer_id()));
    assert_eq!(auth::peer_of(&server), Some(alice.peer_id()));
    assert_eq!(
        client.negotiated_cipher_suite().unwrap().version(),
        &rustls::version::TLS13
    );

    // Application data crosses, encrypted.
    client.writer().write_all(b"hello bob").unwrap();
    let mut wire = Vec::new();
    client.write_tls(&mut wire).unwrap();
    server.read_tls(&mut &wire[..]).unwrap();
    server.process_new_packets().unwrap();
    let mut got = [0u8; 9];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello bob");

    // A client expecting another peer refuses bob's certificate.
    let wrong =
        Arc::new(auth::client_config(&alice, Some(Identity::generate().peer_id())).unwrap());
    let mut client = rustls::ClientConnection::new(wrong, name.clone()).unwrap();
    let mut server = rustls::ServerConnection::new(server_config.clone()).unwrap();
    assert!(handshake(&mut client, &mut server).is_err());

    // A client with an ordinary (non-peer) certificate is refused by the server.
    let ecdsa = rcgen_free_client();
    let mut client = rustls::ClientConnection::new(ecdsa, name).unwrap();
    let mut server = rustls::ServerConnection::new(server_config).unwrap();
    assert!(handshake(&mut client, &mut server).is_err());
}

/// A rustls client presenting no certificate at all (it trusts anything).
fn rcgen_free_client() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            vec![rustls::SignatureScheme::ED25519]
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth(),
    )
}

/// The vault: a service whose endpoints are guarded by rules.
struct Vault {
    network: String,
    issuer: Identity,
    policy: auth::Config,
    server: Service,
    addr: Multiaddr,
    opened: Arc<AtomicUsize>,
    burned: Arc<AtomicUsize>,
    streamed: Arc<AtomicUsize>,
}

impl Vault {
    async fn start(network: &str, burner: PeerId) -> Self {
        let issuer = Identity::generate();
        let policy = auth::Config::new()
            .trust(issuer.peer_id())
            // Nobody may use the vault...
            .rule("deny service:vault any 0".parse().unwrap())
            // ...but keepers may, except burn: at the same priority, deny wins.
            .rule("allow service:vault role:keeper 10".parse().unwrap())
            .rule(
                "deny endpoint:vault/Vault.Burn role:keeper 10"
                    .parse()
                    .unwrap(),
            )
            // One peer may burn: a higher priority beats the deny.
            .rule(
                auth::Rule::allow(
                    auth::Resource::endpoint("vault", "Vault.Burn"),
                    auth::Subject::Peer(burner),
                )
                .priority(20),
            );
        let (opened, burned, streamed) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (o, b, s) = (opened.clone(), burned.clone(), streamed.clone());
        let server = Service::builder("vault")
            .preset(Preset::Local)
            .network(network)
            .auth(policy.clone())
            .handle("Vault.Open", move |ctx: Context, _: ()| {
                let o = o.clone();
                async move {
                    o.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>(ctx.roles().to_vec())
                }
            })
            .handle("Vault.Burn", move |_: Context, _: ()| {
                let b = b.clone();
                async move {
                    b.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>(())
                }
            })
            .server_stream("Vault.List", move |_: Context, n: u64| {
                let s = s.clone();
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>(futures::stream::iter((0..n).map(Ok)))
                }
            })
            .build()
            .await
            .unwrap();
        let addr = server.node().listen_addrs().await.unwrap().remove(0);
        Self {
            network: network.into(),
            issuer,
            policy,
            server,
            addr,
            opened,
            burned,
            streamed,
        }
    }

    /// A caller with `identity`, presenting `grants`, that can resolve the vault.
    async fn caller(&self, identity: Identity, grants: Vec<Grant>) -> Service {
        let mut policy = self.policy.clone();
        for g in grants {
            policy = policy.grant(g);
        }
        let caller = Service::builder("caller")
            .preset(Preset::Local)
            .network(self.network.clone())
            .identity(identity)
            .auth(policy)
            .bootstrap(self.addr.clone())
            .register(false)
            .build()
            .await
            .unwrap();
        let registry = caller.registry().clone();
        wait_until(WAIT, || async {
            registry
                .get_service("vault")
                .await
                .map(|v| !v.is_empty())
                .unwrap_or(false)
        })
        .await
        .expect("the vault is resolvable");
        caller
    }

    fn grant(&self, subject: PeerId, role: &str) -> Grant {
        grant(&self.issuer, subject, role, &self.network)
    }
}

async fn status_of<T: serde::de::DeserializeOwned>(
    caller: &Service,
    endpoint: &str,
) -> Result<T, u16> {
    caller
        .client()
        .call_with::<(), T>("vault", endpoint, &(), CallOptions::default().timeout(WAIT))
        .await
        .map_err(|e| e.status().code().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_checked_against_grants_and_rules_before_handlers_run() {
    let burner = Identity::generate();
    let vault = Vault::start("auth-rpc", burner.peer_id()).await;

    // A keeper opens; the handler sees its roles. Burn is denied by the tie at priority 10.
    let keeper_id = Identity::generate();
    let keeper_grant = vault.grant(keeper_id.peer_id(), "keeper");
    let keeper = vault.caller(keeper_id, vec![keeper_grant.clone()]).await;
    assert_eq!(
        status_of::<Vec<String>>(&keeper, "Vault.Open").await,
        Ok(vec!["keeper".to_owned()])
    );
    assert_eq!(status_of::<()>(&keeper, "Vault.Burn").await, Err(403));

    // A peer named by a higher-priority rule burns, with no grant at all.
    let burner = vault.caller(burner, vec![]).await;
    assert_eq!(status_of::<()>(&burner, "Vault.Burn").await, Ok(()));
    // ...but may not open: the lowest rule denies everyone else.
    assert_eq!(
        status_of::<Vec<String>>(&burner, "Vault.Open").await,
        Err(403)
    );

    // No grant: 403. A grant naming another peer, a forged grant (untrusted issuer), an
    // expired grant: 401, the credentials are at fault.
    let stranger = vault.caller(Identity::generate(), vec![]).await;
    assert_eq!(
        status_of::<Vec<String>>(&stranger, "Vault.Open").await,
        Err(403)
    );
    let thief = vault.caller(Identity::generate(), vec![]).await;
    testing::present_any_grant(thief.node(), keeper_grant.clone());
    let forger_id = Identity::generate();
    let forged = grant(
        &Identity::generate(),
        forger_id.peer_id(),
        "keeper",
        &vault.network,
    );
    let forger = vault.caller(forger_id, vec![forged]).await;
    let late_id = Identity::generate();
    let expired = Grant::builder(late_id.peer_id())
        .role("keeper")
        .not_before(SystemTime::now() - Duration::from_secs(7200))
        .valid_for(Duration::from_secs(3600))
        .sign(&vault.issuer, &vault.network)
        .unwrap();
    let late = vault.caller(late_id, vec![expired]).await;
    for (who, caller) in [("thief", &thief), ("forger", &forger), ("late", &late)] {
        let status = status_of::<Vec<String>>(caller, "Vault.Open").await;
        assert_eq!(status, Err(401), "{who}");
    }
    // Streams are checked the same way, before the handler runs.
    let mut stream = stranger
        .client()
        .server_stream::<u64, u64>(
            "vault",
            "Vault.List",
            &3,
            CallOptions::default().timeout(WAIT),
        )
        .await
        .unwrap();
    let first = stream.recv().await.expect("an answer");
    assert_eq!(first.unwrap_err().status().code().as_u16(), 403);
    let mut stream = keeper
        .client()
        .server_stream::<u64, u64>(
            "vault",
            "Vault.List",
            &3,
            CallOptions::default().timeout(WAIT),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(n) = stream.recv().await {
        got.push(n.unwrap());
    }
    assert_eq!(got, [0, 1, 2]);

    // Only the allowed calls reached a handler; the denials are counted.
    let metrics = vault.server.node().encode_metrics();
    assert!(
        metrics.contains("micromesh_auth_denied_total{surface=\"call\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("micromesh_auth_grants_refused_total 3"),
        "{metrics}"
    );
    assert_eq!(vault.opened.load(Ordering::SeqCst), 1);
    assert_eq!(vault.burned.load(Ordering::SeqCst), 1);
    assert_eq!(vault.streamed.load(Ordering::SeqCst), 1);

    // Deny by default: an endpoint no rule mentions is closed once the policy says so.
    vault.server.auth().set_rules(vec![]);
    assert_eq!(
        status_of::<Vec<String>>(&stranger, "Vault.Open")
            .await
            .map(drop),
        Ok(())
    );
    vault.server.auth().set_default_policy(DefaultPolicy::Deny);
    assert_eq!(
        status_of::<Vec<String>>(&stranger, "Vault.Open").await,
        Err(403)
    );

    for s in [stranger, thief, forger, late, burner, keeper, vault.server] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_node_and_ends_the_grant() {
    let vault = Vault::start("auth-revoke", Identity::generate().peer_id()).await;
    let keeper_id = Identity::generate();
    let keeper_grant = vault.grant(keeper_id.peer_id(), "keeper");
    let keeper = vault.caller(keeper_id, vec![keeper_grant.clone()]).await;
    let bystander = vault.caller(Identity::generate(), vec![]).await;
    assert!(
        status_of::<Vec<String>>(&keeper, "Vault.Open")
            .await
            .is_ok()
    );

    // The issuer hands the revocation to one node (the bystander); it floods from there.
    let revocation = Revocation::of(&keeper_grant, &vault.issuer).unwrap();
    let reached = bystander.auth().revoke(revocation.clone()).await.unwrap();
    assert!(reached >= 1, "the bystander's peers took the revocation");
    let server_auth = vault.server.auth().clone();
    wait_until(WAIT, || async { server_auth.is_revoked(&keeper_grant) })
        .await
        .expect("the revocation reached the vault");
    assert_eq!(
        status_of::<Vec<String>>(&keeper, "Vault.Open").await,
        Err(401)
    );

    // A node that joins later, through another peer than the vault, learns it on connect.
    let addr = bystander.node().listen_addrs().await.unwrap().remove(0);
    let late = Service::builder("late")
        .preset(Preset::Local)
        .network(vault.network.clone())
        .auth(vault.policy.clone())
        .bootstrap(addr)
        .register(false)
        .build()
        .await
        .unwrap();
    let late_auth = late.auth().clone();
    wait_until(WAIT, || async { late_auth.is_revoked(&keeper_grant) })
        .await
        .expect("a late joiner learned the revocation");

    // A revocation by anyone but the issuer cannot even be made; one from an untrusted key is
    // not taken.
    assert!(Revocation::of(&keeper_grant, &Identity::generate()).is_err());
    let rogue = Identity::generate();
    let rogue_grant = grant(&rogue, keeper.peer_id(), "keeper", &vault.network);
    let err = late
        .auth()
        .revoke(Revocation::of(&rogue_grant, &rogue).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not trusted"), "{err}");

    for s in [late, bystander, keeper, vault.server] {
        s.stop().await.unwrap();
    }
}

/// A cluster of `size` members with known identities, all trusting one fresh issuer and
/// enforcing `rules` (text form); member `i` of each `(i, role)` in `roles` presents a grant
/// of that role.
async fn guarded_cluster(
    network: &str,
    size: usize,
    rules: &[&str],
    roles: &[(usize, &str)],
) -> (Cluster, Vec<Identity>) {
    let issuer = Identity::generate();
    let policy = rules.iter().fold(
        auth::Config::new().trust(issuer.peer_id()),
        |config, rule| config.rule(rule.parse().unwrap()),
    );
    let ids: Vec<Identity> = (0..size).map(|_| Identity::generate()).collect();
    let mut policies: Vec<auth::Config> = vec![policy; size];
    for &(i, role) in roles {
        policies[i] = policies[i]
            .clone()
            .grant(grant(&issuer, ids[i].peer_id(), role, network));
    }
    let given = ids.clone();
    let cluster = Cluster::builder()
        .size(size)
        .network(network)
        .configure(move |i, builder| builder.identity(given[i].clone()).auth(policies[i].clone()))
        .build()
        .await
        .unwrap();
    (cluster, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthorised_publish_reaches_no_subscriber() {
    const NET: &str = "auth-broker";
    // Member 1 is the alerter; member 2 holds a grant for another role.
    let (cluster, _) = guarded_cluster(
        NET,
        5,
        &[
            "deny topic:alerts any 0",
            "allow topic:alerts role:alerter 10",
        ],
        &[(1, "alerter"), (2, "viewer")],
    )
    .await;
    let received = Arc::new(Mutex::new(Vec::<(usize, Vec<u8>)>::new()));
    let mut subs = Vec::new();
    for i in [3, 4] {
        let log = received.clone();
        subs.push(
            cluster
                .service(i)
                .broker()
                .subscribe_raw("alerts", Default::default(), move |m: broker::Message| {
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push((i, m.body.to_vec()));
                        Ok::<_, Status>(())
                    }
                })
                .await
                .unwrap(),
        );
    }
    for i in 0..3 {
        let node = cluster.node(i).clone();
        wait_until(WAIT, || async {
            node.topic_peers("alerts")
                .await
                .map(|p| p.len() >= 2)
                .unwrap_or(false)
        })
        .await
        .expect("publishers see both subscribers");
    }

    // The alerter publishes; both subscribers get it.
    let alerter = cluster.service(1).broker();
    alerter
        .publish_raw("alerts", b"fire".to_vec(), Default::default())
        .await
        .unwrap();
    let log = received.clone();
    wait_until(WAIT, || {
        let log = log.clone();
        async move { log.lock().unwrap().len() == 2 }
    })
    .await
    .expect("the alerter's message reached both subscribers");

    // The others may not: their own node refuses first.
    for i in [0, 2] {
        let err = cluster
            .service(i)
            .broker()
            .publish_raw("alerts", b"nope".to_vec(), Default::default())
            .await
            .unwrap_err();
        assert!(matches!(err, broker::Error::Forbidden { .. }), "{err}");
    }
    // Sent anyway (a misbehaving node): no grant, the alerter's grant replayed, the wrong
    // role. Every subscriber rejects each and lowers the sender's score.
    let alerter_grant = cluster.node(1).auth().grants().remove(0);
    let viewer_grant = cluster.node(2).auth().grants().remove(0);
    testing::publish_unchecked(cluster.node(0), "alerts", b"no grant", &[])
        .await
        .unwrap();
    testing::publish_unchecked(cluster.node(0), "alerts", b"replayed", &[alerter_grant])
        .await
        .unwrap();
    testing::publish_unchecked(cluster.node(2), "alerts", b"wrong role", &[viewer_grant])
        .await
        .unwrap();
    for sub in [3, 4] {
        for liar in [0, 2] {
            let node = cluster.node(sub).clone();
            let liar = cluster.node(liar).peer_id();
            wait_until(WAIT, || async {
                node.gossip_score(liar).await.unwrap().unwrap_or(0.0) < 0.0
            })
            .await
            .unwrap_or_else(|_| panic!("node {sub} rejected the unauthorised messages"));
        }
    }
    // A later authorised message still arrives, and nothing unauthorised ever did.
    alerter
        .publish_raw("alerts", b"smoke".to_vec(), Default::default())
        .await
        .unwrap();
    let log = received.clone();
    wait_until(WAIT, || {
        let log = log.clone();
        async move { log.lock().unwrap().len() == 4 }
    })
    .await
    .expect("the second alert reached both subscribers");
    let denied: u64 = [3, 4]
        .iter()
        .map(|&i| {
            testing::metric(
                cluster.node(i),
                "micromesh_auth_denied_total{surface=\"publish\"}",
            )
        })
        .sum();
    assert!(
        denied >= 3,
        "subscribers counted the refused messages ({denied})"
    );
    let bodies: Vec<Vec<u8>> = received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b.clone())
        .collect();
    assert!(
        bodies.iter().all(|b| b == b"fire" || b == b"smoke"),
        "only the alerter's messages were delivered: {bodies:?}"
    );
    drop(subs);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_allowed_to_offer_a_service_are_listed() {
    const NET: &str = "auth-registry";
    let (cluster, _) = guarded_cluster(
        NET,
        4,
        &[
            "deny announce:vault any 0",
            "allow announce:vault role:vault-server 10",
        ],
        &[(1, "vault-server")],
    )
    .await;
    // Member 1 may offer `vault`; member 2 offers it too, without a grant, and `open` besides.
    for i in [1, 2] {
        cluster
            .service(i)
            .registry()
            .register(micromesh::registry::Registration::new("vault"))
            .await
            .unwrap();
    }
    cluster
        .service(2)
        .registry()
        .register(micromesh::registry::Registration::new("open"))
        .await
        .unwrap();
    let viewer = cluster.service(3).clone();
    let nodes_of = |name: &'static str| {
        let registry = viewer.registry().clone();
        async move {
            registry
                .get_service(name)
                .await
                .map(|versions| {
                    versions
                        .iter()
                        .flat_map(|v| v.nodes.iter().map(|n| n.peer_id))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };
    let (allowed, rogue) = (cluster.node(1).peer_id(), cluster.node(2).peer_id());
    // The viewer hears both announcements: `open` from the rogue is listed...
    wait_until(WAIT, || async { nodes_of("open").await == [rogue] })
        .await
        .expect("the rogue's other service is listed");
    wait_until(WAIT, || async {
        nodes_of("vault").await.contains(&allowed)
    })
    .await
    .expect("the allowed server is listed");
    // ...but only the allowed server offers `vault`, and the refusal is counted.
    assert_eq!(nodes_of("vault").await, [allowed]);
    let denied = testing::metric(
        cluster.node(3),
        "micromesh_auth_denied_total{surface=\"announce\"}",
    );
    assert!(denied >= 1, "{denied}");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_members_refuse_unauthorised_deliveries() {
    const NET: &str = "auth-queue";
    let (cluster, _) = guarded_cluster(
        NET,
        3,
        &[
            "deny topic:jobs any 0",
            "allow topic:jobs role:dispatcher 10",
        ],
        &[(1, "dispatcher")],
    )
    .await;
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let _worker = cluster
        .service(2)
        .broker()
        .subscribe_raw(
            "jobs",
            broker::SubscribeOptions::new().group("workers"),
            move |_: broker::Message| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>(())
                }
            },
        )
        .await
        .unwrap();
    let member = cluster.node(2).peer_id();
    let member_addr = cluster.node(2).listen_addrs().await.unwrap().remove(0);
    for i in [0, 1] {
        cluster.node(i).dial(member_addr.clone()).await.unwrap();
    }

    // The dispatcher's job is handled.
    let dispatcher_grant = cluster.node(1).auth().grants().remove(0);
    testing::deliver_unchecked(
        cluster.node(1),
        member,
        "jobs",
        "workers",
        b"job",
        std::slice::from_ref(&dispatcher_grant),
    )
    .await
    .unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    // Without a grant, or with the dispatcher's replayed: refused before the handler.
    let err = testing::deliver_unchecked(cluster.node(0), member, "jobs", "workers", b"x", &[])
        .await
        .unwrap_err();
    assert!(err.starts_with("refused with 403"), "{err}");
    let err = testing::deliver_unchecked(
        cluster.node(0),
        member,
        "jobs",
        "workers",
        b"x",
        &[dispatcher_grant],
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("refused with 401"), "{err}");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthorised_store_write_is_held_by_no_replica() {
    const NET: &str = "auth-store";
    let (cluster, ids) = guarded_cluster(
        NET,
        8,
        &[
            "deny table:vault/* any 0",
            "allow table:vault/* role:writer 10",
        ],
        &[(1, "writer")],
    )
    .await;
    for i in 0..8 {
        let node = cluster.node(i).clone();
        wait_until(WAIT, || async {
            node.dht_peers()
                .await
                .map(|p| p.len() >= 4)
                .unwrap_or(false)
        })
        .await
        .expect("routing tables fill");
    }

    // The writer writes; another node reads it.
    let table = |i: usize| {
        cluster
            .service(i)
            .store()
            .table("vault", "secrets")
            .unwrap()
    };
    table(1).write("k", b"v1".to_vec()).await.unwrap();
    let reader = table(5);
    assert_eq!(reader.read("k").await.unwrap().unwrap().value, b"v1");
    // Other tables are open to everyone (no rule names them).
    cluster
        .service(0)
        .store()
        .write("open", b"yes".to_vec())
        .await
        .unwrap();

    // An unauthorised writer is refused by its own node first...
    let err = table(0).write("k", b"mine".to_vec()).await.unwrap_err();
    assert!(matches!(err, store::Error::Forbidden { .. }), "{err}");
    // ...and its records are held by no replica: without a grant, and with the writer's
    // grant replayed.
    let writer_grant = cluster.node(1).auth().grants().remove(0);
    let (key, bytes) = testing::store_record(
        &ids[0],
        ids[0].peer_id(),
        NET,
        "vault",
        "secrets",
        "stolen",
        b"x",
        now_us(),
    );
    let replayed = testing::store_record_with_grants(&bytes, &[writer_grant]).unwrap();
    for record in [bytes, replayed] {
        let acks = testing::put_raw_record(cluster.node(0), key.clone(), record, 1).await;
        assert!(
            matches!(acks, Err(micromesh::node::Error::Quorum { reached: 0, .. })),
            "{acks:?}"
        );
    }
    for i in 0..8 {
        let copies = testing::raw_records(cluster.node(i), key.clone(), 3)
            .await
            .unwrap_or_default();
        assert!(copies.is_empty(), "node {i} holds the unauthorised record");
    }
    let denied: u64 = (0..8)
        .map(|i| {
            testing::metric(
                cluster.node(i),
                "micromesh_auth_denied_total{surface=\"write\"}",
            )
        })
        .sum();
    assert!(
        denied >= 2,
        "replicas counted the refused records ({denied})"
    );
    // The writer's own value is still the one everyone reads.
    assert_eq!(table(7).read("k").await.unwrap().unwrap().value, b"v1");
    cluster.shutdown().await.unwrap();
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}
