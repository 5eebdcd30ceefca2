//! Every service's debug endpoints, through the public API: `Debug.Health`, `Debug.Stats`,
//! `Debug.Log`, under auth rules like any endpoint. Its own binary: it installs the process's
//! tracing subscriber, with the log layer.

use std::time::Duration;

use micromesh::{
    Context, Service, Status, auth,
    client::CallOptions,
    debug::{self, Health, LogRecord, LogRequest, Stats},
    node::Preset,
    testing::wait_until,
};
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

const WAIT: Duration = Duration::from_secs(20);

fn init_logs() {
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info,debug_tests=debug"))
        .with(debug::log_layer())
        .try_init();
}

async fn echo(_: Context, n: u64) -> Result<u64, Status> {
    tracing::info!(target: "debug_tests", n, "echoing");
    tracing::debug!(target: "debug_tests", "echo in detail");
    Ok(n)
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
    let caller = Service::builder("caller")
        .preset(Preset::Local)
        .network(network)
        .bootstrap(addr)
        .register(false)
        .build()
        .await
        .unwrap();
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
