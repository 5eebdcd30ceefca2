//! Metrics and health over HTTP: what a scraper and an orchestrator see, and a real Prometheus
//! scraping a node under load.

use std::{net::SocketAddr, time::Duration};

use micromesh::{
    Context, Service, Status,
    node::Preset,
    testing::{Cluster, wait_until},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WAIT: Duration = Duration::from_secs(20);

async fn echo(_: Context, n: u64) -> Result<u64, Status> {
    Ok(n)
}

/// A GET over a fresh connection: the status code and the body.
async fn get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    request(addr, "GET", target).await
}

async fn request(addr: SocketAddr, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The server (member 0, serving `Echo.Say` and its metrics) and a caller.
async fn server_and_caller(network: &str) -> (Service, Cluster) {
    let server = Service::builder("echo")
        .preset(Preset::Local)
        .network(network)
        .listen("/memory/0".parse().unwrap())
        .metrics("127.0.0.1:0".parse().unwrap())
        .handle("Echo.Say", echo)
        .build()
        .await
        .unwrap();
    let addr = server.node().listen_addrs().await.unwrap().remove(0);
    let addr: micromesh::Multiaddr = format!("{addr}/p2p/{}", server.peer_id()).parse().unwrap();
    let callers = Cluster::builder()
        .size(1)
        .network(network)
        .configure(move |_, builder| builder.bootstrap(addr.clone()))
        .build()
        .await
        .unwrap();
    let client = callers.service(0).client().clone();
    wait_until(WAIT, || async {
        client
            .call::<_, u64>("echo", "Echo.Say", &0u64)
            .await
            .is_ok()
    })
    .await
    .expect("the caller reaches the server");
    (server, callers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_show_in_metrics_and_health_follows_the_node() {
    let (server, callers) = server_and_caller("metrics-http").await;
    let http = server.metrics_addr().expect("metrics were asked for");
    let caller = callers.service(0).clone();
    for n in 1..=20u64 {
        assert_eq!(
            caller
                .client()
                .call::<_, u64>("echo", "Echo.Say", &n)
                .await
                .unwrap(),
            n
        );
    }
    let unknown = caller
        .client()
        .call_with::<_, u64>(
            "echo",
            "Echo.Nope",
            &1u64,
            micromesh::client::CallOptions::default().peer(server.peer_id()),
        )
        .await;
    assert!(unknown.is_err());

    let (status, metrics) = get(http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    // The calls made after the first successful one (which the wait above may have repeated).
    let count = metrics
        .lines()
        .find(|l| {
            l.starts_with("rpc_server_call_duration_seconds_count{")
                && l.contains(r#"rpc_method="Echo.Say""#)
                && l.contains(r#"rpc_response_status_code="200""#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count of Echo.Say calls in:\n{metrics}"));
    assert!(count >= 21, "{count} calls counted");
    // An endpoint the server does not serve is counted under `_OTHER`, with its 404.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rpc_server_call_duration_seconds_count{")
                && l.contains(r#"rpc_method="_OTHER""#)
                && l.contains(r#"rpc_response_status_code="404""#)),
        "{metrics}"
    );
    assert!(
        !metrics.contains("Echo.Nope"),
        "a caller's names made a series"
    );
    assert!(metrics.contains("rpc_server_call_duration_seconds_bucket{"));
    assert!(metrics.contains("rpc_server_calls_in_flight{"));
    assert!(
        metrics.contains("libp2p_swarm_connections_established"),
        "libp2p's metrics are missing:\n{metrics}"
    );
    assert!(metrics.contains("\nmicromesh_server_calls_total"));
    assert!(metrics.trim_end().ends_with("# EOF"));
    // The caller's side, in its own node's registry.
    let called = caller.node().encode_metrics();
    assert!(
        called
            .lines()
            .any(|l| l.starts_with("rpc_client_call_duration_seconds_count{")
                && l.contains(r#"rpc_service="echo""#)
                && l.contains(r#"rpc_method="Echo.Say""#)
                && l.contains(r#"rpc_response_status_code="200""#)),
        "{called}"
    );

    assert_eq!(
        get(http, "/health/live").await.unwrap(),
        (200, "live\n".into())
    );
    assert_eq!(
        get(http, "/health/ready").await.unwrap(),
        (200, "ready\n".into())
    );
    assert_eq!(get(http, "/nothing").await.unwrap().0, 404);
    assert_eq!(request(http, "POST", "/metrics").await.unwrap().0, 405);

    // Stopped: not live, not ready, while the service's handles live; closed once they are gone.
    server.stop().await.unwrap();
    assert_eq!(get(http, "/health/live").await.unwrap().0, 503);
    assert_eq!(get(http, "/health/ready").await.unwrap().0, 503);
    drop(server);
    wait_until(WAIT, || async { get(http, "/health/live").await.is_err() })
        .await
        .expect("the listener closes with the service");
    callers.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_reach_its_bootstrap_peer_is_live_but_not_ready() {
    let server = Service::builder("lonely")
        .preset(Preset::Local)
        .network("metrics-ready")
        .metrics("127.0.0.1:0".parse().unwrap())
        .bootstrap("/memory/987654321".parse().unwrap())
        .build()
        .await
        // A service whose bootstrap peer cannot be reached starts, and waits for others.
        .unwrap();
    let http = server.metrics_addr().unwrap();
    assert_eq!(get(http, "/health/live").await.unwrap().0, 200);
    let (status, body) = get(http, "/health/ready").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: connected to no peer of the mesh\n")
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = Service::builder("clash")
        .preset(Preset::Local)
        .metrics(taken.local_addr().unwrap())
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            micromesh::Error::Debug(micromesh::debug::Error::Bind { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("cannot serve metrics on 127.0.0.1:"),
        "{err}"
    );
}

/// A Prometheus process, ended when dropped.
struct Prometheus {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percent_encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The values of an instant query's result vector.
async fn query(prometheus: SocketAddr, expr: &str) -> Vec<f64> {
    let target = format!("/api/v1/query?query={}", percent_encode(expr));
    let Ok((200, body)) = get(prometheus, &target).await else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    json["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CI installs Debian's `prometheus`; elsewhere the test says it did not run, unless
/// `MICROMESH_REQUIRE_PROMETHEUS` is set, which makes a missing Prometheus a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_node_under_load() {
    let installed = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        assert!(
            std::env::var_os("MICROMESH_REQUIRE_PROMETHEUS").is_none(),
            "MICROMESH_REQUIRE_PROMETHEUS is set but `prometheus` is not installed"
        );
        eprintln!("SKIPPED: `prometheus` is not installed (apt-get install prometheus)");
        return;
    }
    let (server, callers) = server_and_caller("metrics-prometheus").await;
    let target = server.metrics_addr().unwrap();
    // Load: four callers without pause.
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = callers.service(0).client().clone();
        load.spawn(async move {
            for n in 0u64.. {
                let _ = client.call::<_, u64>("echo", "Echo.Say", &n).await;
            }
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: micromesh\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let _prometheus = Prometheus { child, _dir: dir };

    let rate = r#"sum(rate(rpc_server_call_duration_seconds_count{rpc_service="echo",rpc_method="Echo.Say",rpc_response_status_code="200"}[10s]))"#;
    let p99 = r#"histogram_quantile(0.99, sum by (le) (rate(rpc_server_call_duration_seconds_bucket{rpc_method="Echo.Say"}[10s])))"#;
    let answered = wait_until(Duration::from_secs(60), || async {
        let up = query(web, r#"up{job="micromesh"}"#).await;
        let rate = query(web, rate).await;
        let p99 = query(web, p99).await;
        up == [1.0]
            && rate.first().is_some_and(|r| *r > 0.0)
            && p99.first().is_some_and(|q| q.is_finite() && *q > 0.0)
    })
    .await;
    let (up, rate, p99) = (
        query(web, "up").await,
        query(web, rate).await,
        query(web, p99).await,
    );
    answered.unwrap_or_else(|_| {
        panic!("Prometheus did not answer: up {up:?}, rate {rate:?}, p99 {p99:?}")
    });
    eprintln!("Prometheus: {rate:?} calls/s, p99 {p99:?} s");
    load.abort_all();
    server.stop().await.unwrap();
    callers.shutdown().await.unwrap();
}
