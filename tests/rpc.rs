//! Calls between services, through the public API: unary and streaming, errors, limits,
//! deadlines, failover, middleware.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use micromesh::{
    Context, Multiaddr, Service, Status,
    client::{CallOptions, Error, Phase},
    codec::ContentType,
    node::Preset,
    server::Streaming,
    status::Code,
    testing::{self, wait_until},
    transport,
};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize, Deserialize)]
struct HelloRequest {
    name: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct HelloReply {
    msg: String,
}

async fn hello(ctx: Context, req: HelloRequest) -> Result<HelloReply, Status> {
    if req.name.is_empty() {
        return Err(Status::new(Code::Conflict, "a name is required"));
    }
    Ok(HelloReply {
        msg: format!("Hello, {}! (from {})", req.name, ctx.service()),
    })
}

async fn panics(_: Context, _: HelloRequest) -> Result<HelloReply, Status> {
    panic!("this handler is broken");
}

/// A small mesh: a bootstrap node (no service) and services joined through it.
struct Mesh {
    network: String,
    bootstrap: Service,
    addr: Multiaddr,
}

impl Mesh {
    async fn new(network: &str) -> Self {
        let bootstrap = Service::builder("bootstrap")
            .preset(Preset::Local)
            .network(network)
            .register(false)
            .build()
            .await
            .unwrap();
        let addr = bootstrap.node().listen_addrs().await.unwrap().remove(0);
        Self {
            network: network.into(),
            bootstrap,
            addr,
        }
    }

    fn service(&self, name: &str) -> micromesh::service::Builder {
        Service::builder(name)
            .preset(Preset::Local)
            .network(self.network.clone())
            .bootstrap(self.addr.clone())
    }

    async fn client(&self) -> Service {
        self.service("client")
            .register(false)
            .build()
            .await
            .unwrap()
    }
}

async fn resolvable(client: &Service, name: &str, nodes: usize) {
    let registry = client.registry().clone();
    wait_until(WAIT, || async {
        registry
            .get_service(name)
            .await
            .map(|v| v.iter().map(|s| s.nodes.len()).sum::<usize>() >= nodes)
            .unwrap_or(false)
    })
    .await
    .unwrap_or_else(|_| panic!("{name} never had {nodes} nodes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_round_trip_by_name_with_cbor_and_json_callers() {
    let mesh = Mesh::new("rpc-greet").await;
    let server = mesh
        .service("greeter")
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    let client = mesh.client().await;
    resolvable(&client, "greeter", 1).await;

    let reply: HelloReply = client
        .client()
        .call(
            "greeter",
            "Greeter.Hello",
            &HelloRequest { name: "Ada".into() },
        )
        .await
        .unwrap();
    assert_eq!(reply.msg, "Hello, Ada! (from greeter)");
    // A JSON caller, with an untyped body, is served by the same handler in JSON.
    let reply: serde_json::Value = client
        .client()
        .call_with(
            "greeter",
            "Greeter.Hello",
            &serde_json::json!({ "name": "Bob" }),
            CallOptions::default().content_type(ContentType::Json),
        )
        .await
        .unwrap();
    assert_eq!(reply["msg"], "Hello, Bob! (from greeter)");
    let raw = client
        .client()
        .call_bytes(
            "greeter",
            "Greeter.Hello",
            br#"{"name":"Cy"}"#.to_vec(),
            &CallOptions::default().content_type(ContentType::Json),
        )
        .await
        .unwrap();
    assert_eq!(raw, br#"{"msg":"Hello, Cy! (from greeter)"}"#);
    // The registry announces the endpoint with its type names.
    let described = client.registry().get_service("greeter").await.unwrap();
    let endpoint = &described[0].endpoints[0];
    assert_eq!(
        (
            endpoint.name.as_str(),
            endpoint.request.as_str(),
            endpoint.response.as_str()
        ),
        ("Greeter.Hello", "HelloRequest", "HelloReply")
    );
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

/// A node that calls a service the moment `build` returns behaves as it would a second later:
/// the call waits for the node to join (within its deadline) instead of failing with "not
/// found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_right_after_build_reaches_the_service() {
    let mesh = Mesh::new("rpc-first-moments").await;
    let server = mesh
        .service("greeter")
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    // The mesh knows the greeter (the bootstrap node has it in its view).
    resolvable(&mesh.bootstrap, "greeter", 1).await;
    for round in 0..10 {
        let client = mesh.client().await;
        let reply: HelloReply = client
            .client()
            .call(
                "greeter",
                "Greeter.Hello",
                &HelloRequest {
                    name: format!("caller {round}"),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("call {round} right after build: {e}"));
        assert_eq!(reply.msg, format!("Hello, caller {round}! (from greeter)"));
        client.stop().await.unwrap();
    }
    // A node whose bootstrap peer is not there says why, within the call's deadline.
    let lonely = Service::builder("lonely")
        .preset(Preset::Local)
        .network("rpc-first-moments")
        .bootstrap("/memory/1".parse().unwrap())
        .register(false)
        .build()
        .await
        .unwrap();
    let err = lonely
        .client()
        .call::<_, HelloReply>(
            "greeter",
            "Greeter.Hello",
            &HelloRequest { name: "x".into() },
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cannot reach a bootstrap peer"), "{text}");
    for s in [lonely, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

/// A peer that opens hundreds of call streams and sends nothing on them gets only a bounded
/// number served (counted before they cost a task); the rest are reset at once, and other
/// callers are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_hoards_call_streams_is_bounded_and_others_are_served() {
    let mesh = Mesh::new("rpc-hoard").await;
    let server = mesh
        .service("greeter")
        .transport_config(transport::Config::default().max_calls_per_peer(8))
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    let hoarder = mesh.client().await;
    hoarder
        .node()
        .dial(server.node().listen_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    let held = testing::hold_call_streams(hoarder.node(), server.peer_id(), 200).await;
    let refused = || testing::metric(server.node(), "micromesh_server_streams_refused_total");
    wait_until(WAIT, || async { refused() >= 200 - 16 })
        .await
        .unwrap_or_else(|_| panic!("refused {} of 200 streams", refused()));
    assert!(
        testing::metric(server.node(), "micromesh_server_streams_open") <= 16,
        "at most twice the call limit stays open"
    );
    let client = mesh.client().await;
    resolvable(&client, "greeter", 1).await;
    for n in 0..20 {
        let reply: HelloReply = client
            .client()
            .call(
                "greeter",
                "Greeter.Hello",
                &HelloRequest {
                    name: format!("n{n}"),
                },
            )
            .await
            .unwrap();
        assert_eq!(reply.msg, format!("Hello, n{n}! (from greeter)"));
    }
    drop(held);
    for s in [client, hoarder, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_case_yields_its_status_and_the_server_keeps_serving() {
    let mesh = Mesh::new("rpc-errors").await;
    let server = mesh
        .service("greeter")
        .handle("Greeter.Hello", hello)
        .handle("Greeter.Panic", panics)
        .build()
        .await
        .unwrap();
    let client = mesh.client().await;
    resolvable(&client, "greeter", 1).await;
    let c = client.client();
    let ada = HelloRequest { name: "Ada".into() };

    let err = c
        .call::<_, HelloReply>("nobody", "X.Y", &ada)
        .await
        .unwrap_err();
    assert_eq!(err.phase(), Phase::Resolve, "{err}");
    assert_eq!(err.status().code(), Code::NotFound);

    let err = c
        .call::<_, HelloReply>("greeter", "Greeter.Bye", &ada)
        .await
        .unwrap_err();
    assert_eq!(
        (err.phase(), err.status().code()),
        (Phase::Remote, Code::NotFound),
        "{err}"
    );
    assert_eq!(err.peer(), Some(server.peer_id()));
    assert!(err.to_string().contains("Greeter.Bye"), "{err}");

    // A body of the wrong shape cannot be decoded: 400.
    let err = c
        .call::<_, HelloReply>("greeter", "Greeter.Hello", &42u32)
        .await
        .unwrap_err();
    assert_eq!(err.status().code(), Code::BadRequest, "{err}");

    // The handler's own status passes through, detail and all.
    let err = c
        .call::<_, HelloReply>(
            "greeter",
            "Greeter.Hello",
            &HelloRequest {
                name: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status().code(), Code::Conflict);
    assert_eq!(err.status().detail(), "a name is required");

    // A panic is a 500, and the next call is served.
    let err = c
        .call::<_, HelloReply>("greeter", "Greeter.Panic", &ada)
        .await
        .unwrap_err();
    assert_eq!(err.status().code(), Code::Internal, "{err}");
    let ok: HelloReply = c.call("greeter", "Greeter.Hello", &ada).await.unwrap();
    assert!(ok.msg.starts_with("Hello, Ada"));

    // Calling a unary endpoint as a stream is refused with 400.
    let mut stream = c
        .stream::<HelloRequest, HelloReply>("greeter", "Greeter.Hello", CallOptions::default())
        .await
        .unwrap();
    let err = stream.recv().await.unwrap().unwrap_err();
    assert_eq!(err.status().code(), Code::BadRequest, "{err}");

    // A peer of another network does not speak this network's RPC protocol. Streams are
    // negotiated optimistically, so its refusal arrives in answer to the call's first bytes:
    // still a dial error that says why, not a broken response.
    let stranger = Service::builder("greeter")
        .preset(Preset::Local)
        .network("rpc-errors-elsewhere")
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    let stranger_addr = stranger.node().listen_addrs().await.unwrap().remove(0);
    client.node().dial(stranger_addr).await.unwrap();
    let err = c
        .call_with::<_, HelloReply>(
            "greeter",
            "Greeter.Hello",
            &ada,
            CallOptions::default().peer(stranger.peer_id()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.phase(), Phase::Dial, "{err}");
    assert_eq!(err.peer(), Some(stranger.peer_id()));
    assert!(
        err.to_string().contains("serves no RPC on this network"),
        "{err}"
    );
    // The refusal spoils nothing: the next call on this network is served.
    let ok: HelloReply = c.call("greeter", "Greeter.Hello", &ada).await.unwrap();
    assert!(ok.msg.starts_with("Hello, Ada"));
    for s in [client, server, stranger, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_gets_a_clear_error_and_the_connection_keeps_serving() {
    let mesh = Mesh::new("rpc-size").await;
    let small = transport::Config::default().max_message(64 * 1024);
    let server = mesh
        .service("echo")
        .transport_config(small)
        .handle(
            "Echo.Bytes",
            |_: Context, b: serde_bytes::ByteBuf| async move { Ok::<_, Status>(b) },
        )
        .build()
        .await
        .unwrap();
    let client = mesh.client().await;
    resolvable(&client, "echo", 1).await;
    let c = client.client();
    let big = serde_bytes::ByteBuf::from(vec![7u8; 100 * 1024]);
    let err = c
        .call::<_, serde_bytes::ByteBuf>("echo", "Echo.Bytes", &big)
        .await
        .unwrap_err();
    assert_eq!(err.status().code(), Code::PayloadTooLarge, "{err}");
    assert!(
        err.to_string()
            .contains("exceeds the server's limit of 65536 bytes"),
        "{err}"
    );
    // Larger than the client's own limit: refused before anything is sent.
    let huge = serde_bytes::ByteBuf::from(vec![1u8; 5 * 1024 * 1024]);
    let err = c
        .call::<_, serde_bytes::ByteBuf>("echo", "Echo.Bytes", &huge)
        .await
        .unwrap_err();
    assert_eq!(err.phase(), Phase::Encode, "{err}");
    // The same connection serves the next call.
    let ok: serde_bytes::ByteBuf = c
        .call(
            "echo",
            "Echo.Bytes",
            &serde_bytes::ByteBuf::from(vec![1u8; 1000]),
        )
        .await
        .unwrap();
    assert_eq!(ok.len(), 1000);
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    remaining_ms: u64,
    trace_id: String,
    caller: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_trace_ids_cascade_across_two_hops() {
    let mesh = Mesh::new("rpc-hops").await;
    let last = mesh
        .service("last")
        .handle("Last.Inspect", |ctx: Context, _: ()| async move {
            Ok::<_, Status>(Seen {
                remaining_ms: ctx.remaining().map_or(u64::MAX, |d| d.as_millis() as u64),
                trace_id: ctx.trace_id().to_owned(),
                caller: ctx.peer_id().to_string(),
            })
        })
        .handle("Last.Slow", |_: Context, _: ()| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, Status>(())
        })
        .build()
        .await
        .unwrap();
    let middle_client: Arc<std::sync::OnceLock<micromesh::Client>> = Arc::default();
    let relay_client = middle_client.clone();
    let middle = mesh
        .service("middle")
        .handle("Middle.Relay", move |ctx: Context, endpoint: String| {
            let client = relay_client.get().cloned().expect("set after build");
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let seen: Result<Seen, _> = client
                    .call_with("last", &endpoint, &(), ctx.call_options())
                    .await;
                seen.map(|s| (s, ctx.trace_id().to_owned()))
                    .map_err(|e| e.status())
            }
        })
        .build()
        .await
        .unwrap();
    middle_client.set(middle.client().clone()).unwrap();
    let client = mesh.client().await;
    resolvable(&client, "middle", 1).await;
    resolvable(&middle, "last", 1).await;

    // The caller starts a W3C trace; the chain continues it.
    let root = micromesh::trace::TraceParent::new_root();
    let options = CallOptions::default()
        .timeout(Duration::from_secs(3))
        .metadata(micromesh::trace::TRACEPARENT, root.to_string());
    let (seen, middle_trace): (Seen, String) = client
        .client()
        .call_with("middle", "Middle.Relay", &"Last.Inspect", options.clone())
        .await
        .unwrap();
    assert!(
        seen.remaining_ms < 2_900,
        "the deadline did not shrink across hops: {seen:?}"
    );
    assert!(seen.remaining_ms > 1_000, "{seen:?}");
    assert_eq!(seen.trace_id, middle_trace, "one trace id across the chain");
    assert_eq!(
        seen.trace_id,
        root.trace_id(),
        "the caller's trace, continued"
    );
    assert_eq!(
        seen.caller,
        middle.peer_id().to_string(),
        "the callee sees its verified caller"
    );

    // The last hop is slow: the caller's deadline ends the whole chain.
    let started = std::time::Instant::now();
    let err = client
        .client()
        .call_with::<_, (Seen, String)>(
            "middle",
            "Middle.Relay",
            &"Last.Slow",
            options.timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err.status().code(), Code::Timeout), "{err}");
    for s in [client, middle, last, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

fn counting(
    counter: Arc<AtomicUsize>,
) -> impl Fn(Context, u64) -> futures::future::Ready<Result<u64, Status>> + Clone {
    move |_, n| {
        counter.fetch_add(1, Ordering::Relaxed);
        futures::future::ready(Ok(n))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_load_and_a_killed_replica_fails_over() {
    let mesh = Mesh::new("rpc-replicas").await;
    let counters: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let mut replicas = Vec::new();
    for counter in &counters {
        replicas.push(
            mesh.service("work")
                .handle("Work.Do", counting(counter.clone()))
                .build()
                .await
                .unwrap(),
        );
    }
    let client = mesh.client().await;
    resolvable(&client, "work", 3).await;
    // The endpoint is idempotent: any failure may be retried elsewhere.
    let options = CallOptions::default().retries(4).retry_if(|e: &Error| {
        matches!(e.phase(), Phase::Dial | Phase::Send | Phase::Receive) || e.is_safe_to_retry()
    });
    let c = client.client().clone();
    let run = |from: u64, count: u64| {
        let c = c.clone();
        let options = options.clone();
        futures::stream::iter(from..from + count)
            .map(move |n| {
                let c = c.clone();
                let options = options.clone();
                async move {
                    c.call_with::<_, u64>("work", "Work.Do", &n, options)
                        .await
                        .map(|r| (n, r))
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
    };
    for result in run(0, 600).await {
        let (n, r) = result.unwrap();
        assert_eq!(n, r);
    }
    for (i, counter) in counters.iter().enumerate() {
        let share = counter.load(Ordering::Relaxed);
        assert!(share >= 60, "replica {i} served only {share} of 600 calls");
    }
    // Kill one replica while calls are in flight: every call still succeeds.
    let victim = replicas.remove(0);
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        micromesh::testing::crash(&victim);
    });
    for result in run(1000, 600).await {
        let (n, r) = result.expect("a call failed during failover");
        assert_eq!(n, r);
    }
    killer.await.unwrap();
    for s in replicas.into_iter().chain([client, mesh.bootstrap]) {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_streaming_shape_moves_ten_thousand_messages_in_order() {
    const N: u64 = 10_000;
    let mesh = Mesh::new("rpc-streams").await;
    let server = mesh
        .service("numbers")
        .server_stream("Numbers.Count", |_: Context, n: u64| async move {
            Ok::<_, Status>(futures::stream::iter((0..n).map(Ok)))
        })
        .client_stream(
            "Numbers.Sum",
            |_: Context, mut numbers: Streaming<u64>| async move {
                let (mut sum, mut count, mut expected) = (0u64, 0u64, 0u64);
                while let Some(n) = numbers.message().await {
                    let n = n?;
                    if n != expected {
                        return Err(Status::bad_request(format!(
                            "out of order: {n} after {}",
                            expected - 1
                        )));
                    }
                    expected += 1;
                    sum += n;
                    count += 1;
                }
                Ok((count, sum))
            },
        )
        .bidi_stream(
            "Numbers.Echo",
            |_: Context, numbers: Streaming<u64>| async move {
                Ok::<_, Status>(numbers.map(|n| n.map(|n| n * 2)))
            },
        )
        .build()
        .await
        .unwrap();
    let client = mesh.client().await;
    resolvable(&client, "numbers", 1).await;
    let c = client.client();
    let options = || CallOptions::default().timeout(Duration::from_secs(60));

    let mut count = c
        .server_stream::<u64, u64>("numbers", "Numbers.Count", &N, options())
        .await
        .unwrap();
    let mut next = 0;
    while let Some(n) = count.recv().await {
        assert_eq!(n.unwrap(), next);
        next += 1;
    }
    assert_eq!(next, N, "server stream ended early");
    assert!(count.recv().await.is_none(), "end of stream is final");

    let mut sum = c
        .client_stream::<u64, (u64, u64)>("numbers", "Numbers.Sum", options())
        .await
        .unwrap();
    for n in 0..N {
        sum.send(&n).await.unwrap();
    }
    assert_eq!(sum.finish().await.unwrap(), (N, N * (N - 1) / 2));

    // Bidirectional: send in batches of 16 and read the answers in between, so both
    // directions carry messages at once.
    let mut echo = c
        .stream::<u64, u64>("numbers", "Numbers.Echo", options())
        .await
        .unwrap();
    let mut received = 0;
    for n in 0..N {
        echo.send(&n).await.unwrap();
        if n % 16 == 15 {
            for _ in 0..16 {
                assert_eq!(echo.recv().await.unwrap().unwrap(), received * 2);
                received += 1;
            }
        }
    }
    echo.close_send().await.unwrap();
    while let Some(m) = echo.recv().await {
        assert_eq!(m.unwrap(), received * 2);
        received += 1;
    }
    assert_eq!(received, N);
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_layers_work_unchanged() {
    let mesh = Mesh::new("rpc-tower").await;
    let server = mesh
        .service("slow")
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
            100,
        )))
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .handle("Slow.Sleep", |_: Context, ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Status>(ms)
        })
        .build()
        .await
        .unwrap();
    let client = mesh.client().await;
    resolvable(&client, "slow", 1).await;
    let c = client.client();
    assert_eq!(
        c.call::<_, u64>("slow", "Slow.Sleep", &1u64).await.unwrap(),
        1
    );
    // tower's timeout: 408.
    let err = c
        .call::<_, u64>("slow", "Slow.Sleep", &500u64)
        .await
        .unwrap_err();
    assert_eq!(err.status().code(), Code::Timeout, "{err}");
    // One call at a time, the rest shed: 503 (no retries, to see it).
    let no_retry = CallOptions::default().retries(0);
    let calls =
        (0..4).map(|_| c.call_with::<_, u64>("slow", "Slow.Sleep", &80u64, no_retry.clone()));
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().any(Result::is_ok));
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(e) if e.status().code() == Code::Unavailable)),
        "{results:?}"
    );
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

const STREAMS: &str = "micromesh_server_streams_total";
const STREAMS_OPEN: &str = "micromesh_server_streams_open";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_follow_one_another_on_one_stream_until_it_fails_or_idles() {
    let mesh = Mesh::new("rpc-reuse").await;
    let idle = transport::Config::default().idle_timeout(Duration::from_millis(500));
    let server = mesh
        .service("greeter")
        .transport_config(idle)
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    // A client that does not listen: the only connection between it and the server is the one
    // it dials. (The server, publishing its provider record, may otherwise dial a listening
    // client at the moment the client dials it; calls then move to the newer connection, and
    // a new stream, which this test must not mistake for a stream not kept.)
    let client = mesh
        .service("client")
        .register(false)
        .configure_node(|n| n.no_listen())
        .build()
        .await
        .unwrap();
    resolvable(&client, "greeter", 1).await;
    let c = client.client();
    let greet = |name: &str| {
        let request = HelloRequest { name: name.into() };
        async move {
            c.call::<_, HelloReply>("greeter", "Greeter.Hello", &request)
                .await
        }
    };

    for i in 0..20 {
        let reply = greet(&format!("n{i}")).await.unwrap();
        assert_eq!(reply.msg, format!("Hello, n{i}! (from greeter)"));
    }
    assert_eq!(
        testing::metric(server.node(), STREAMS),
        1,
        "20 calls in a row share a stream"
    );

    // An error status closes the stream; the next call opens another.
    let err = greet("").await.unwrap_err();
    assert_eq!(err.status().code(), Code::Conflict, "{err}");
    greet("after an error").await.unwrap();
    assert_eq!(testing::metric(server.node(), STREAMS), 2);

    // The server closes the stream once it idles past 500 ms; the client still holds it, and
    // its next call, which meets the server's `end`, goes on a new stream without an error.
    wait_until(WAIT, || async {
        testing::metric(server.node(), STREAMS_OPEN) == 0
    })
    .await
    .expect("the server closes an idle stream");
    let reply = greet("after idling").await.unwrap();
    assert_eq!(reply.msg, "Hello, after idling! (from greeter)");
    assert_eq!(testing::metric(server.node(), STREAMS), 3);
    assert_eq!(
        testing::metric(server.node(), "micromesh_server_calls_total"),
        23
    );
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

/// Counts its drops: the handler's future owns one.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_drops_its_handler_and_the_server_keeps_serving() {
    let mesh = Mesh::new("rpc-abandon").await;
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (s, d) = (started.clone(), dropped.clone());
    let server = mesh
        .service("waiter")
        .handle("Wait.Forever", move |_: Context, _: u32| {
            let guard = DropCount(d.clone());
            s.fetch_add(1, Ordering::SeqCst);
            async move {
                let _guard = guard;
                futures::future::pending::<Result<u32, Status>>().await
            }
        })
        .handle("Wait.Not", |_: Context, n: u32| async move {
            Ok::<_, Status>(n)
        })
        .build()
        .await
        .unwrap();
    let client = mesh.client().await;
    resolvable(&client, "waiter", 1).await;
    let c = client.client().clone();
    // Warm the client's kept stream, so the abandoned call runs on a reused one.
    assert_eq!(c.call::<_, u32>("waiter", "Wait.Not", &1).await.unwrap(), 1);

    // A call with a 60 s budget, dropped by its caller once the handler runs.
    let patient = CallOptions::default().timeout(Duration::from_secs(60));
    let call = tokio::spawn({
        let c = c.clone();
        async move {
            c.call_with::<_, u32>("waiter", "Wait.Forever", &0, patient)
                .await
        }
    });
    wait_until(WAIT, || async { started.load(Ordering::SeqCst) == 1 })
        .await
        .expect("the handler starts");
    call.abort();
    // Without abandonment the handler would live until the call's deadline, a minute away.
    wait_until(WAIT, || async { dropped.load(Ordering::SeqCst) == 1 })
        .await
        .expect("the server drops the abandoned call's handler");
    wait_until(WAIT, || async {
        testing::metric(server.node(), "micromesh_server_calls_total") == 2
            && testing::metric(server.node(), STREAMS_OPEN) == 0
    })
    .await
    .expect("the abandoned call's stream closes");
    assert_eq!(c.call::<_, u32>("waiter", "Wait.Not", &2).await.unwrap(), 2);
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_calling_closes_its_kept_streams() {
    let mesh = Mesh::new("rpc-release").await;
    let server = mesh
        .service("greeter")
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    // The server would keep an idle stream for 30 s; this client lets go after 300 ms.
    let client = mesh
        .service("client")
        .register(false)
        .transport_config(transport::Config::default().idle_timeout(Duration::from_millis(300)))
        .build()
        .await
        .unwrap();
    resolvable(&client, "greeter", 1).await;
    let requests: Vec<_> = (0..4)
        .map(|i| HelloRequest {
            name: format!("n{i}"),
        })
        .collect();
    let calls = requests.iter().map(|r| {
        client
            .client()
            .call::<_, HelloReply>("greeter", "Greeter.Hello", r)
    });
    for reply in futures::future::join_all(calls).await {
        reply.unwrap();
    }
    assert!(testing::metric(server.node(), STREAMS) >= 1);
    wait_until(WAIT, || async {
        testing::metric(server.node(), STREAMS_OPEN) == 0
    })
    .await
    .expect("the client closes the streams it no longer uses");
    for s in [client, server, mesh.bootstrap] {
        s.stop().await.unwrap();
    }
}

/// A free-enough in-process port: random, so tests running at once do not collide.
fn rand_port() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) | 1
}

/// A relay (relay service on, advertising its in-process address; `relay_node` adjusts it) and
/// a greeter that listens through it, and also on `direct` when given. Returns the relay, the
/// greeter and the greeter's relayed address.
async fn greeter_behind_relay(
    network: &str,
    direct: Option<Multiaddr>,
    relay_node: impl FnOnce(micromesh::node::Builder) -> micromesh::node::Builder,
) -> (Service, Service, Multiaddr) {
    let relay_addr: Multiaddr = format!("/memory/{}", rand_port()).parse().unwrap();
    let relay = Service::builder("relay")
        .preset(Preset::Local)
        .network(network)
        .register(false)
        .listen(relay_addr.clone())
        .configure_node(|n| relay_node(n.external_address(relay_addr).relay_server(true)))
        .build()
        .await
        .unwrap();
    let relay_addr = relay.node().listen_addrs().await.unwrap().remove(0);
    let circuit: Multiaddr = format!("{relay_addr}/p2p-circuit").parse().unwrap();
    let mut server = Service::builder("greeter")
        .preset(Preset::Local)
        .network(network)
        .register(false)
        .bootstrap(relay_addr);
    if let Some(direct) = direct {
        server = server.listen(direct);
    }
    let server = server
        .listen(circuit.clone())
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    let via_relay = format!("{circuit}/p2p/{}", server.node().peer_id())
        .parse()
        .unwrap();
    (relay, server, via_relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_move_from_a_relayed_connection_to_a_direct_one() {
    let network = "rpc-direct";
    let direct: Multiaddr = format!("/memory/{}", rand_port()).parse().unwrap();
    let (relay, server, via_relay) =
        greeter_behind_relay(network, Some(direct.clone()), |n| n).await;
    let b = server.node().peer_id();
    let client = Service::builder("client")
        .preset(Preset::Local)
        .network(network)
        .register(false)
        .build()
        .await
        .unwrap();
    let c = client.client();
    let to_b = CallOptions::default().peer(b);
    let greet = |name: &'static str| {
        let options = to_b.clone();
        async move {
            c.call_with::<_, HelloReply>(
                "greeter",
                "Greeter.Hello",
                &HelloRequest { name: name.into() },
                options,
            )
            .await
        }
    };

    // Only a relayed connection: calls go through the relay, on one kept stream.
    assert_eq!(client.node().dial(via_relay).await.unwrap(), b);
    for _ in 0..3 {
        greet("relayed").await.unwrap();
    }
    assert_eq!(testing::metric(server.node(), STREAMS), 1);
    // The server sees the connection as relayed too (libp2p names its remote bare `/p2p/…`).
    // (It may also have dialled the client directly by now, for its DHT.)
    let server_side = server.node().peers().await.unwrap();
    let from_client = &server_side
        .iter()
        .find(|p| p.peer_id == client.node().peer_id())
        .unwrap()
        .addresses;
    assert!(
        from_client
            .iter()
            .any(|a| a.to_string().contains("/p2p-circuit/p2p/")),
        "{from_client:?}"
    );

    // Once a direct connection exists, the kept stream on the relayed one is dropped and
    // calls go direct, again on one kept stream.
    // (Without `/p2p/`: a dial naming a connected peer would stand for its connection.)
    assert_eq!(client.node().dial(direct).await.unwrap(), b);
    for _ in 0..3 {
        greet("direct").await.unwrap();
    }
    assert_eq!(testing::metric(server.node(), STREAMS), 2);
    let peers = client.node().peers().await.unwrap();
    let addresses = &peers.iter().find(|p| p.peer_id == b).unwrap().addresses;
    assert!(
        addresses
            .iter()
            .any(|a| !a.to_string().contains("p2p-circuit")),
        "{addresses:?}"
    );
    for s in [client, server, relay] {
        s.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_inside_a_handler_carries_the_calls_trace() {
    #[derive(Debug, Serialize, Deserialize)]
    struct Placed {
        id: u64,
    }
    let mesh = Mesh::new("rpc-trace-publish").await;
    let subscriber = mesh.client().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let _subscription = subscriber
        .broker()
        .subscribe("placed", move |event: micromesh::broker::Event<Placed>| {
            let tx = tx.clone();
            async move {
                let traceparent = event
                    .headers
                    .get(micromesh::trace::TRACEPARENT)
                    .map(str::to_owned);
                tx.send((event.body.id, traceparent)).await.ok();
                Ok::<_, Status>(())
            }
        })
        .await
        .unwrap();
    let broker_slot: Arc<std::sync::OnceLock<micromesh::broker::Broker>> = Arc::default();
    let broker = broker_slot.clone();
    let orders = mesh
        .service("orders")
        .handle("Orders.Place", move |ctx: Context, id: u64| {
            let broker = broker.get().cloned().expect("set after build");
            async move {
                broker
                    .publish_with("placed", &Placed { id }, ctx.publish_options())
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok::<_, Status>(ctx.trace_id().to_owned())
            }
        })
        .build()
        .await
        .unwrap();
    broker_slot.set(orders.broker().clone()).unwrap();
    let client = mesh.client().await;
    resolvable(&client, "orders", 1).await;

    let root = micromesh::trace::TraceParent::new_root();
    let options = CallOptions::default().metadata(micromesh::trace::TRACEPARENT, root.to_string());
    let handler_trace: String = client
        .client()
        .call_with("orders", "Orders.Place", &7u64, options)
        .await
        .unwrap();
    assert_eq!(handler_trace, root.trace_id());
    let (id, traceparent) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the message arrives")
        .unwrap();
    assert_eq!(id, 7);
    let traceparent =
        micromesh::trace::TraceParent::parse(&traceparent.expect("a traceparent header"))
            .expect("a valid traceparent");
    assert_eq!(
        traceparent.trace_id(),
        root.trace_id(),
        "the message is in the call's trace"
    );
    assert_ne!(
        traceparent.span_id(),
        root.span_id(),
        "its parent is the handler's span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_pinned_to_a_connected_peer_does_not_look_the_name_up() {
    // Cluster members register nothing: only a pinned call can reach member 0's endpoint.
    let cluster = testing::Cluster::builder()
        .size(2)
        .network("rpc-pinned")
        .configure(|i, b| {
            if i == 0 {
                b.handle("Greeter.Hello", hello)
            } else {
                b
            }
        })
        .build()
        .await
        .unwrap();
    let (client, server) = (cluster.service(1), cluster.node(0).peer_id());
    let unlisted = cluster.service(0).name();
    const LOOKUPS: &str = "micromesh_registry_lookups_total";
    let ada = HelloRequest { name: "Ada".into() };
    let reply: HelloReply = client
        .client()
        .call_with(
            unlisted,
            "Greeter.Hello",
            &ada,
            CallOptions::default().peer(server),
        )
        .await
        .unwrap();
    assert!(reply.msg.starts_with("Hello, Ada"));
    assert_eq!(testing::metric(client.node(), LOOKUPS), 0);
    // Unpinned, the name is looked up, and nobody runs it.
    let err = client
        .client()
        .call::<_, HelloReply>(unlisted, "Greeter.Hello", &ada)
        .await
        .unwrap_err();
    assert_eq!(err.phase(), Phase::Resolve, "{err}");
    assert_eq!(testing::metric(client.node(), LOOKUPS), 1);
    cluster.shutdown().await.unwrap();
}

/// A relay closes a circuit past the limits it is configured with, and carries calls within
/// them. (The defaults, an hour and 1 GiB, are what the NAT lab's calls and streams run under.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_closes_a_circuit_past_its_byte_limit() {
    let network = "rpc-relay-limit";
    let (relay, server, via_relay) = greeter_behind_relay(network, None, |n| {
        n.relay_circuit_limits(Duration::from_secs(60), 48 << 10)
    })
    .await;
    let b = server.node().peer_id();
    // A client that does not listen: the server cannot dial it (its DHT would, given an
    // address), so the circuit is the only way between them.
    let client = Service::builder("client")
        .preset(Preset::Local)
        .network(network)
        .register(false)
        .configure_node(|n| n.no_listen())
        .build()
        .await
        .unwrap();
    assert_eq!(client.node().dial(via_relay).await.unwrap(), b);
    let to_b = CallOptions::default().peer(b).retries(0);
    let greet = |name: String| {
        let options = to_b.clone();
        let c = client.client();
        async move {
            c.call_with::<_, HelloReply>(
                "greeter",
                "Greeter.Hello",
                &HelloRequest { name },
                options,
            )
            .await
        }
    };
    greet("within the limit".into()).await.unwrap();
    // 256 KiB is an ordinary call (a circuit with the default limits carries it), past this
    // relay's 48 KiB: the relay cuts the circuit in the middle of it.
    let err = greet("x".repeat(256 << 10)).await.unwrap_err();
    assert_eq!(err.status().code(), Code::Unavailable, "{err}");
    for s in [client, server, relay] {
        s.stop().await.unwrap();
    }
}
