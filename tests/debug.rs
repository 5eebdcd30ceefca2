//! Every service's debug endpoints, through the public API: `Debug.Health`, `Debug.Stats`,
//! `Debug.Log`, `Debug.Trace`, under auth rules like any endpoint. Its own binary: it installs
//! the process's tracing subscriber, with the log and span layers.

use std::time::Duration;

use micromesh::{
    Context, Service, Status, auth,
    client::CallOptions,
    debug::{self, Health, LogRecord, LogRequest, SpanRecord, Stats, TraceRequest},
    node::Preset,
    testing::wait_until,
};
use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

const WAIT: Duration = Duration::from_secs(20);

fn init_logs() {
    let _ = tracing_subscriber::registry()
        .with(
            debug::log_layer()
                .with_filter(tracing_subscriber::EnvFilter::new("info,debug_tests=debug")),
        )
        .with(debug::trace_layer())
        .try_init();
}

async fn echo(_: Context, n: u64) -> Result<u64, Status> {
    tracing::info!(target: "debug_tests", n, "echoing");
    tracing::debug!(target: "debug_tests", "echo in detail");
    Ok(n)
}

/// A service that serves nothing and calls through `addr`.
async fn caller(network: &str, addr: micromesh::Multiaddr) -> Service {
    Service::builder("caller")
        .preset(Preset::Local)
        .network(network)
        .bootstrap(addr)
        .register(false)
        .build()
        .await
        .unwrap()
}

async fn pair(network: &str, policy: auth::Config) -> (Service, Service) {
    let server = Service::builder("echo")
        .preset(Preset::Local)
        .network(network)
        .version("1.2.3")
        .auth(policy)
        .handle("Echo.Say", echo)
        .build()
        .await
        .unwrap();
    let addr = server.node().listen_addrs().await.unwrap().remove(0);
    let caller = caller(network, addr).await;
    let client = caller.client().clone();
    wait_until(WAIT, || async {
        client
            .call::<_, u64>("echo", "Echo.Say", &0u64)
            .await
            .is_ok()
    })
    .await
    .expect("the caller reaches the server");
    (server, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stats_and_logs_of_a_service() {
    init_logs();
    let (server, caller) = pair("debug-endpoints", auth::Config::new()).await;
    let client = caller.client().clone();
    for n in 1..=5u64 {
        client.call::<_, u64>("echo", "Echo.Say", &n).await.unwrap();
    }

    let health: Health = client.call("echo", debug::HEALTH, &()).await.unwrap();
    assert!(health.is_serving(), "{health:?}");
    assert_eq!(
        (health.service.as_str(), health.version.as_str()),
        ("echo", "1.2.3")
    );

    let stats: Stats = client.call("echo", debug::STATS, &()).await.unwrap();
    assert_eq!(stats.peer_id, server.peer_id().to_string());
    // The five calls, the wait's calls, and the health check.
    assert!(stats.requests >= 7, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert!(stats.connections >= 1, "{stats:?}");
    #[cfg(target_os = "linux")]
    assert!(
        stats.memory_bytes.is_some() && stats.threads.is_some(),
        "{stats:?}"
    );

    // Recent records at info: the handler's, not its debug ones.
    let mut records = client
        .server_stream::<_, LogRecord>(
            "echo",
            debug::LOG,
            &LogRequest::new(Some("info"), Some(1000), false),
            CallOptions::default(),
        )
        .await
        .unwrap();
    let mut mine = Vec::new();
    while let Some(record) = records.recv().await {
        let record = record.unwrap();
        if record.target == "debug_tests" {
            mine.push(record);
        }
    }
    assert!(
        mine.iter()
            .any(|r| r.message == "echoing" && r.fields.get("n").map(String::as_str) == Some("5")),
        "{mine:?}"
    );
    assert!(mine.iter().all(|r| r.level == "INFO"), "{mine:?}");

    // Following: a record logged after the call began arrives.
    let mut follow = client
        .server_stream::<_, LogRecord>(
            "echo",
            debug::LOG,
            &LogRequest::new(Some("debug"), Some(0), true),
            CallOptions::default(),
        )
        .await
        .unwrap();
    let marker = format!("marker {}", rand_marker());
    let logged = marker.clone();
    let logger = tokio::spawn(async move {
        // Logged until the follower has it: the call may start after the first ones.
        loop {
            tracing::debug!(target: "debug_tests", "{logged}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(record) = follow.recv().await {
            if record.unwrap().message == marker {
                return true;
            }
        }
        false
    })
    .await;
    logger.abort();
    assert_eq!(seen, Ok(true), "the follower never saw the new record");
    // A follower that goes away ends its call on the server at once, not when the next record
    // finds nobody: only the stats call itself is then in flight.
    drop(follow);
    wait_until(WAIT, || async {
        client
            .call::<_, Stats>("echo", debug::STATS, &())
            .await
            .is_ok_and(|stats| stats.in_flight == 1)
    })
    .await
    .expect("the abandoned follower's call ended");

    // A bad level is a clear error.
    let bad = client
        .server_stream::<_, LogRecord>(
            "echo",
            debug::LOG,
            &LogRequest::new(Some("loud"), None, false),
            CallOptions::default(),
        )
        .await;
    let status = match bad {
        Err(e) => e.status(),
        Ok(mut call) => call.recv().await.unwrap().unwrap_err().status(),
    };
    assert_eq!(status.code().as_u16(), 400, "{status:?}");

    // Not announced: `describe` shows the service's own endpoints only.
    let entries = caller.registry().get_service("echo").await.unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e.endpoints.iter().all(|ep| !ep.name.starts_with("Debug.")))
    );

    caller.stop().await.unwrap();
    server.stop().await.unwrap();
}

fn rand_marker() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_endpoints_obey_auth_rules() {
    init_logs();
    let policy = auth::Config::new().rule("deny endpoint:*/Debug.* any 0".parse().unwrap());
    let (server, caller) = pair("debug-auth", policy).await;
    let client = caller.client().clone();
    let err = client
        .call::<_, Stats>("echo", debug::STATS, &())
        .await
        .unwrap_err();
    assert_eq!(err.status().code().as_u16(), 403, "{err}");
    // The service's own endpoints still answer.
    assert_eq!(
        client
            .call::<_, u64>("echo", "Echo.Say", &9u64)
            .await
            .unwrap(),
        9
    );
    caller.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// A service `name` whose endpoint `Hop.Next` calls `Hop.Next` of `next` in the same trace, or
/// answers when there is no next.
async fn hop(
    network: &str,
    name: &str,
    next: Option<&'static str>,
    bootstrap: Option<micromesh::Multiaddr>,
) -> Service {
    let client: std::sync::Arc<std::sync::OnceLock<micromesh::Client>> = Default::default();
    let own = client.clone();
    let mut builder = Service::builder(name)
        .preset(Preset::Local)
        .network(network)
        .handle("Hop.Next", move |ctx: Context, n: u64| {
            let client = own.get().cloned();
            async move {
                match (next, client) {
                    (Some(next), Some(client)) => client
                        .call_with::<_, u64>(next, "Hop.Next", &(n + 1), ctx.call_options())
                        .await
                        .map_err(|e| e.status()),
                    _ => Ok(n),
                }
            }
        });
    if let Some(addr) = bootstrap {
        builder = builder.bootstrap(addr);
    }
    let service = builder.build().await.unwrap();
    client.set(service.client().clone()).ok();
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_chain_is_one_trace_of_client_and_server_spans() {
    init_logs();
    let network = "debug-trace";
    let back = hop(network, "back", None, None).await;
    let addr = back.node().listen_addrs().await.unwrap().remove(0);
    let middle = hop(network, "middle", Some("back"), Some(addr.clone())).await;
    let front = hop(network, "front", Some("middle"), Some(addr.clone())).await;
    let caller = caller(network, addr).await;
    let client = caller.client().clone();
    wait_until(WAIT, || async {
        client
            .call::<_, u64>("front", "Hop.Next", &0u64)
            .await
            .is_ok()
    })
    .await
    .expect("the chain answers");

    let root = micromesh::trace::TraceParent::new_root();
    let options = CallOptions::default().metadata(micromesh::trace::TRACEPARENT, root.to_string());
    let answer: u64 = client
        .call_with("front", "Hop.Next", &0u64, options)
        .await
        .unwrap();
    assert_eq!(answer, 2, "three hops");

    // Every service of this process serves the process's spans: ask the last one. A server
    // span ends just after its answer is written, so the six may take a moment to be there.
    let request = TraceRequest::new(Some(&root.trace_id()), None);
    let seen: std::sync::Arc<std::sync::Mutex<Vec<SpanRecord>>> = Default::default();
    let ready = wait_until(WAIT, || {
        let back = client.clone();
        let request = request.clone();
        let seen = seen.clone();
        async move {
            let spans = back
                .call::<_, Vec<SpanRecord>>("back", debug::TRACE, &request)
                .await
                .unwrap();
            let enough = spans.len() >= 6;
            *seen.lock().unwrap() = spans;
            enough
        }
    })
    .await;
    let spans = seen.lock().unwrap().clone();
    assert!(ready.is_ok(), "six spans of the chain: {spans:#?}");
    assert_eq!(spans.len(), 6, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == root.trace_id()));

    // From the caller's own span down: client → server at each hop, each the child of the one
    // before, on the peers that made and served the call.
    let mut parent = root.span_id();
    let hops = [
        ("client", "front", &caller),
        ("server", "front", &front),
        ("client", "middle", &front),
        ("server", "middle", &middle),
        ("client", "back", &middle),
        ("server", "back", &back),
    ];
    for (kind, service, _) in hops {
        let span = spans
            .iter()
            .find(|s| s.parent_span_id.as_deref() == Some(parent.as_str()))
            .unwrap_or_else(|| panic!("no child of {parent}: {spans:#?}"));
        assert_eq!(span.kind, kind, "{span:#?}");
        assert_eq!(span.name, "call");
        assert_eq!(span.attribute("rpc.service"), Some(service), "{span:#?}");
        assert_eq!(span.attribute("rpc.method"), Some("Hop.Next"));
        assert_eq!(span.attribute("rpc.system"), Some("micromesh"));
        assert_eq!(span.attribute("rpc.response.status_code"), Some("200"));
        parent = span.span_id.clone();
    }
    // A client span names the peer it called; a server span the peer that called it.
    let by_parent = |id: &str| {
        spans
            .iter()
            .find(|s| s.parent_span_id.as_deref() == Some(id))
            .unwrap()
    };
    let first = by_parent(&root.span_id());
    assert_eq!(
        first.attribute("peer"),
        Some(front.peer_id().to_string().as_str())
    );
    let served = by_parent(&first.span_id);
    assert_eq!(
        served.attribute("peer"),
        Some(caller.peer_id().to_string().as_str())
    );
    // Each span lies within its parent's time.
    assert!(served.start_unix_us >= first.start_unix_us);
    assert!(served.duration_us <= first.duration_us);

    // A bad trace id is refused.
    let err = client
        .call::<_, Vec<SpanRecord>>("back", debug::TRACE, &TraceRequest::new(Some("nope"), None))
        .await
        .unwrap_err();
    assert_eq!(err.status().code().as_u16(), 400, "{err}");

    for service in [caller, front, middle, back] {
        service.stop().await.unwrap();
    }
}
