//! The `micromesh` binary, as operators run it: real processes on loopback sockets.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_micromesh");

/// A `micromesh node` process, killed when dropped.
struct NodeProcess {
    child: Child,
    addrs: mpsc::Receiver<String>,
}

impl NodeProcess {
    fn start(data_dir: &Path, listen: &[&str], bootstrap: Option<&str>) -> Self {
        Self::start_with(data_dir, listen, bootstrap, &[])
    }

    /// As [`NodeProcess::start`], with more arguments.
    fn start_with(
        data_dir: &Path,
        listen: &[&str],
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("node")
            .args(extra)
            .arg("--json")
            .args(["--network", "clitest"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--no-mdns", "--no-upnp", "--no-autonat"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for addr in listen {
            cmd.args(["--listen", addr]);
        }
        if let Some(addr) = bootstrap {
            cmd.args(["--bootstrap", addr]);
        }
        let mut child = cmd.spawn().expect("start micromesh node");
        let stdout = child.stdout.take().unwrap();
        let (tx, addrs) = mpsc::sync_channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: serde_json::Value =
                    serde_json::from_str(&line).expect("one JSON value per line");
                let printed = match value["event"].as_str() {
                    Some("listening") => value["address"].as_str(),
                    Some("metrics") => value["url"].as_str(),
                    _ => panic!("unexpected output: {line}"),
                };
                if tx.send(printed.unwrap().to_owned()).is_err() {
                    break;
                }
            }
        });
        Self { child, addrs }
    }

    /// The next listen address (or metrics URL) printed that contains `needle`.
    fn addr(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let addr = self
                .addrs
                .recv_timeout(left)
                .expect("the node prints its listen addresses");
            if addr.contains(needle) {
                return addr;
            }
        }
    }

    fn peer_id(addr: &str) -> &str {
        addr.rsplit("/p2p/").next().unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peers(bootstrap: &str) -> Output {
    Command::new(BIN)
        .args([
            "peers",
            "--json",
            "--network",
            "clitest",
            "--timeout",
            "10s",
            "--bootstrap",
            bootstrap,
        ])
        .output()
        .expect("run micromesh peers")
}

fn peer_ids(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let peers: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("JSON output");
    peers
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Two nodes find each other from one bootstrap address, over `transport`; the first one runs
/// with `a_options` too.
fn two_nodes_find_each_other(transport: &str, listen: &str, a_options: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let a = NodeProcess::start_with(&dir.path().join("a"), &[listen], None, a_options);
    let a_addr = a.addr(transport);
    let b = NodeProcess::start(&dir.path().join("b"), &[listen], Some(&a_addr));
    let b_addr = b.addr(transport);
    let (a_id, b_id) = (NodeProcess::peer_id(&a_addr), NodeProcess::peer_id(&b_addr));

    // A client that knows only a's address finds b through the DHT, and reaches both.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = peer_ids(&peers(&a_addr));
        if found.iter().any(|p| p == a_id) && found.iter().any(|p| p == b_id) {
            break;
        }
        assert!(Instant::now() < deadline, "b never showed up: {found:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The table names each peer once: addresses do not repeat `/p2p/<peer id>`.
    let out = Command::new(BIN)
        .args(["peers", "--network", "clitest", "--bootstrap", &a_addr])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("PEER"), "{table}");
    for line in table.lines().skip(1).filter(|l| l.starts_with("12D3")) {
        assert_eq!(line.matches("/p2p/").count(), 0, "{line}");
    }
}

#[test]
fn two_node_processes_find_each_other_over_tcp() {
    two_nodes_find_each_other("/tcp/", "/ip4/127.0.0.1/tcp/0", &[]);
}

#[test]
fn two_node_processes_find_each_other_over_quic() {
    two_nodes_find_each_other("/quic-v1/", "/ip4/127.0.0.1/udp/0/quic-v1", &[]);
}

#[test]
fn a_restarted_node_process_keeps_its_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let first = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let id = NodeProcess::peer_id(&first.addr("/tcp/")).to_owned();
    drop(first);
    let second = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    assert_eq!(NodeProcess::peer_id(&second.addr("/tcp/")), id);
}

#[test]
fn unreachable_bootstrap_fails_with_a_clear_message() {
    // Ports nothing listens on: take them from the OS and free them.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let live = node.addr("/tcp/");
    let other_peer = "12D3KooWGhMXbUqYyskVCwR4wvCSXa6x6Q1vEL7uiQx7gvFRnUDR";
    let wrong_peer = format!("{}/p2p/{other_peer}", live.rsplit_once("/p2p/").unwrap().0);
    let addrs = [
        format!("/ip4/127.0.0.1/tcp/{tcp}"),
        format!("/ip4/127.0.0.1/udp/{udp}/quic-v1"),
        wrong_peer,
    ];
    let started = Instant::now();
    let output = Command::new(BIN)
        .args([
            "peers",
            "--connect-timeout",
            "1s",
            "--bootstrap",
            &addrs.join(","),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the QUIC dial gives up after --connect-timeout"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[0], "error: cannot join the mesh: no bootstrap peer could be reached",
        "{stderr}"
    );
    // One line per address, the cause in plain words, and what to check.
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        lines[1].contains(&addrs[0]) && lines[1].contains("connection refused"),
        "{stderr}"
    );
    assert!(lines[1].contains("is a node running"), "{stderr}");
    assert!(
        lines[2].contains(&addrs[1]) && lines[2].contains("no answer in time"),
        "{stderr}"
    );
    assert!(lines[3].contains("is the peer id right?"), "{stderr}");
    assert!(!stderr.contains(": :"), "{stderr}");
}

#[test]
fn a_corrupt_identity_stops_the_node_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("identity.key"), b"\x00\x01not a key").unwrap();
    let output = Command::new(BIN)
        .args([
            "node",
            "--no-mdns",
            "--no-upnp",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("identity key file") && stderr.contains("corrupt"),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_are_rejected_before_anything_starts() {
    let output = Command::new(BIN)
        .args(["peers", "--bootstrap", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not-an-address"));
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["node", "--network", "bad name", "--no-mdns", "--no-upnp"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid network name"));
    let output = Command::new(BIN)
        .args(["node", "--relay", "--no-relay"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--relay") && stderr.contains("--no-relay"),
        "{stderr}"
    );
}

/// The NAT options are node options like the others: a node that never relays and lets
/// AutoNAT count private addresses (as the NAT lab's nodes do) joins a mesh.
#[test]
fn a_node_with_the_nat_options_joins_a_mesh() {
    two_nodes_find_each_other(
        "/tcp/",
        "/ip4/127.0.0.1/tcp/0",
        &["--no-relay", "--private-addresses-are-public"],
    );
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let output = Command::new(BIN)
        .args(args)
        .args(["--json", "--network", "clitest", "--timeout", "10s"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

#[test]
fn services_and_describe_show_what_the_mesh_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Every `micromesh node` registers itself as `micromesh-node`.
    let a = NodeProcess::start(&dir.path().join("a"), &["/ip4/127.0.0.1/tcp/0"], None);
    let a_addr = a.addr("/tcp/");
    let b = NodeProcess::start(
        &dir.path().join("b"),
        &["/ip4/127.0.0.1/tcp/0"],
        Some(&a_addr),
    );
    let b_id = NodeProcess::peer_id(&b.addr("/tcp/")).to_owned();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = run_json(&["services", "--bootstrap", &a_addr]);
        let node = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "micromesh-node")
            .cloned();
        if node.as_ref().is_some_and(|n| n["nodes"] == 2) {
            assert_eq!(node.unwrap()["versions"][0], env!("CARGO_PKG_VERSION"));
            break;
        }
        assert!(Instant::now() < deadline, "never listed both nodes: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let described = run_json(&["describe", "micromesh-node", "--bootstrap", &a_addr]);
    let nodes = described[0]["nodes"].as_array().unwrap();
    assert!(
        nodes.iter().any(|n| n["peer_id"] == b_id.as_str()),
        "{described}"
    );
    assert!(
        nodes
            .iter()
            .all(|n| !n["addresses"].as_array().unwrap().is_empty())
    );

    // A name nobody runs: non-zero exit and a clear message.
    let output = Command::new(BIN)
        .args([
            "describe",
            "no-such-service",
            "--network",
            "clitest",
            "--bootstrap",
            &a_addr,
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("service \"no-such-service\" not found")
    );
}

async fn greeter_on_loopback() -> (micromesh::Service, String) {
    use micromesh::{Context, Status};
    let service = micromesh::Service::builder("greeter")
        .network("clitest")
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .configure_node(|n| n.mdns(false).upnp(false).autonat(false).memory_limit(None))
        .handle(
            "Greeter.Hello",
            |_: Context, req: serde_json::Value| async move {
                let name = req["name"]
                    .as_str()
                    .ok_or_else(|| Status::bad_request("name must be a string"))?;
                Ok::<_, Status>(serde_json::json!({ "msg": format!("Hello, {name}!") }))
            },
        )
        .server_stream("Greeter.Count", |_: Context, n: u32| async move {
            Ok::<_, Status>(futures::stream::iter((1..=n).map(Ok)))
        })
        .bidi_stream(
            "Greeter.Shout",
            |_: Context, words: micromesh::server::Streaming<String>| async move {
                use futures::StreamExt as _;
                Ok::<_, Status>(words.map(|w| w.map(|w| w.to_uppercase())))
            },
        )
        .build()
        .await
        .unwrap();
    let addr = service
        .node()
        .listen_addrs()
        .await
        .unwrap()
        .remove(0)
        .to_string();
    (service, addr)
}

async fn cli(args: Vec<String>, stdin: Option<&'static str>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .args(["--network", "clitest", "--timeout", "10s"]);
        match stdin {
            None => cmd.output().unwrap(),
            Some(input) => {
                use std::io::Write as _;
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                child.wait_with_output().unwrap()
            }
        }
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_and_stream_any_endpoint_with_json() {
    let (service, addr) = greeter_on_loopback().await;
    let out = cli(
        args(&[
            "call",
            "greeter",
            "Greeter.Hello",
            r#"{"name": "Ada"}"#,
            "--json",
            "--bootstrap",
            &addr,
        ]),
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["msg"], "Hello, Ada!");

    // Errors: the status on stderr, a non-zero exit.
    let out = cli(
        args(&["call", "greeter", "Greeter.Bye", "{}", "--bootstrap", &addr]),
        None,
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("404 Not Found") && stderr.contains("Greeter.Bye"),
        "{stderr}"
    );
    let out = cli(
        args(&[
            "call",
            "greeter",
            "Greeter.Hello",
            r#"{"name": 5}"#,
            "--bootstrap",
            &addr,
        ]),
        None,
    )
    .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400 Bad Request: name must be a string")
    );
    let out = cli(
        args(&[
            "call",
            "greeter",
            "Greeter.Hello",
            "{not json",
            "--bootstrap",
            &addr,
        ]),
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    // A server stream: one JSON value per line.
    let out = cli(
        args(&[
            "stream",
            "greeter",
            "Greeter.Count",
            "3",
            "--bootstrap",
            &addr,
        ]),
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n2\n3\n");
    // A bidirectional stream fed from standard input.
    let out = cli(
        args(&["stream", "greeter", "Greeter.Shout", "--bootstrap", &addr]),
        Some("\"a\"\n\"bc\"\n"),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\"A\"\n\"BC\"\n");

    // The wrong verb: the CLI says which one to use instead of failing on the wire.
    let out = cli(
        args(&[
            "call",
            "greeter",
            "Greeter.Count",
            "3",
            "--bootstrap",
            &addr,
        ]),
        None,
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server-stream endpoint")
            && stderr.contains("micromesh stream greeter Greeter.Count"),
        "{stderr}"
    );
    let out = cli(
        args(&[
            "stream",
            "greeter",
            "Greeter.Hello",
            "{}",
            "--bootstrap",
            &addr,
        ]),
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("micromesh call greeter Greeter.Hello"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `describe` says how each endpoint is called and what JSON to send.
    let out = cli(args(&["describe", "greeter", "--bootstrap", &addr]), None).await;
    let said = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        said.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {said}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("Greeter.Count"),
        ["Greeter.Count", "server-stream", "0", "u32"]
    );
    // An untyped request (serde_json::Value) has no example: its type is shown.
    assert_eq!(
        row("Greeter.Hello"),
        ["Greeter.Hello", "unary", "<Value>", "Value"]
    );
    service.stop().await.unwrap();
}

#[test]
fn sigterm_stops_a_node_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    node.addr("/tcp/");
    let pid = node.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a graceful stop exits 0, got {status}");
}

/// A GET on a fresh connection: the status code and the body.
fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut tcp = std::net::TcpStream::connect(host).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_node_serves_metrics_and_health_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start_with(
        dir.path(),
        &["/ip4/127.0.0.1/tcp/0"],
        None,
        &["--metrics", "127.0.0.1:0"],
    );
    let url = node.addr("http://");
    assert!(url.ends_with("/metrics"), "{url}");
    let (status, metrics) = http_get(&url);
    assert_eq!(status, 200);
    assert!(metrics.contains("libp2p_swarm_"), "{metrics}");
    assert!(metrics.contains("micromesh_"), "{metrics}");
    assert!(metrics.trim_end().ends_with("# EOF"));
    let health = url.replace("/metrics", "/health/ready");
    assert_eq!(http_get(&health), (200, "ready\n".to_owned()));
}

#[test]
fn logs_can_be_json_lines_without_colours() {
    let out = Command::new(BIN)
        .args([
            "peers",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGuTne2qDC9AZU36RkYekhCuVRXdVhVyJsNDyf9BWVdSk",
        ])
        .args([
            "--network",
            "clitest",
            "--log-format",
            "json",
            "--log",
            "debug",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains('\x1b'), "colour codes in logs: {stderr}");
    let logs: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!logs.is_empty(), "no JSON log lines in: {stderr}");
    assert!(
        logs.iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object()),
        "{stderr}"
    );
    // The error itself is still a sentence for the person at the terminal.
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
}

/// Two node processes on loopback TCP, the second joined through the first, and their
/// addresses. The processes end when the first value is dropped.
fn two_nodes_on_tcp() -> (
    (NodeProcess, NodeProcess, [tempfile::TempDir; 2]),
    String,
    String,
) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let first = NodeProcess::start(dirs[0].path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let addr = first.addr("/tcp/");
    let second = NodeProcess::start(dirs[1].path(), &["/ip4/127.0.0.1/tcp/0"], Some(&addr));
    let second_addr = second.addr("/tcp/");
    ((first, second, dirs), addr, second_addr)
}

/// The standard output of a command that succeeded (its standard error otherwise fails the test).
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the binary to completion with `args`, on the test network (given in the environment,
/// which commands that join no mesh ignore).
fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("MICROMESH_NETWORK", "clitest")
        .output()
        .expect("run micromesh")
}

/// A `micromesh subscribe` process, with its stdout read line by line.
fn start_subscriber(addr: &str, topic: &str, group: Option<&str>, count: u64) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["--json", "subscribe", topic, "--network", "clitest"])
        .args(["--count", &count.to_string()])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(group) = group {
        cmd.args(["--group", group]);
    }
    let mut subscriber = cmd.spawn().expect("start micromesh subscribe");
    // The subscriber says on stderr when it is subscribed.
    let stderr = subscriber.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let said = lines.next().expect("a line on stderr").unwrap();
    assert!(
        said.starts_with(&format!("subscribed to {topic}")),
        "{said}"
    );
    std::thread::spawn(move || lines.for_each(drop));
    subscriber
}

/// The JSON lines a subscriber printed before it exited.
fn received(subscriber: Child) -> Vec<serde_json::Value> {
    let out = subscriber.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the subscriber exits 0 after --count messages"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON value per line"))
        .collect()
}

/// Two plain subscribers and a queue group on one topic, and a fresh `micromesh publish`
/// process per message: every message reaches both subscribers and one member of the group, and
/// `publish` says so.
#[test]
fn publish_and_subscribe_from_the_command_line() {
    const MESSAGES: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let addr = node.addr("/tcp/");

    let plain = [
        start_subscriber(&addr, "events", None, MESSAGES),
        start_subscriber(&addr, "events", None, MESSAGES),
    ];
    let group = start_subscriber(&addr, "events", Some("workers"), MESSAGES);

    for n in 1..=MESSAGES {
        let body = format!(r#"{{"n":{n}}}"#);
        let json = n % 2 == 0;
        let mut args = vec!["publish", "events", &body, "-H", "kind=test"];
        if json {
            args.push("--json");
        }
        args.extend(["--bootstrap", &addr]);
        let out = run(&args);
        assert!(
            out.status.success(),
            "publish {n} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        if json {
            let report: serde_json::Value = serde_json::from_str(&said).expect("JSON report");
            assert_eq!(report["topic"], "events");
            assert_eq!(report["subscribers"], 2, "{said}");
            assert_eq!(report["groups"][0]["group"], "workers", "{said}");
            assert!(report["groups"][0]["member"].is_string(), "{said}");
            assert_eq!(report["groups"][0]["attempts"], 1, "{said}");
        } else {
            assert!(said.starts_with("published on events: "), "{said}");
            assert!(said.contains("subscribers reached directly: 2"), "{said}");
            assert!(said.contains("group workers: taken by "), "{said}");
        }
    }
    for (i, subscriber) in plain.into_iter().enumerate() {
        let messages = received(subscriber);
        assert_eq!(
            messages.len() as u64,
            MESSAGES,
            "subscriber {i}: {messages:?}"
        );
        for (message, n) in messages.iter().zip(1..) {
            assert_eq!(message["body"]["n"], n);
            assert_eq!(message["headers"]["kind"], "test");
            assert_eq!(message["content_type"], "application/json");
            assert_eq!(message["group"], serde_json::Value::Null);
        }
    }
    let messages = received(group);
    let mut got: Vec<u64> = messages
        .iter()
        .map(|m| {
            assert_eq!(m["group"], "workers");
            m["body"]["n"].as_u64().unwrap()
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, (1..=MESSAGES).collect::<Vec<_>>());

    let out = run(&[
        "publish",
        "nobody",
        "{}",
        "--wait",
        "500ms",
        "--bootstrap",
        &addr,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no subscribers of topic \"nobody\""),
        "{stderr}"
    );
    let out = run(&["publish", "events", "not json", "--bootstrap", &addr]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not valid JSON"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn write_read_list_and_delete_store_keys_from_the_command_line() {
    let (_nodes, addr, second_addr) = two_nodes_on_tcp();

    let said = ok(&run(&[
        "store",
        "write",
        "greeting",
        "hello mesh",
        "-m",
        "lang=en",
        "--table",
        "cli",
        "--bootstrap",
        &addr,
    ]));
    assert!(said.starts_with("wrote greeting (version "), "{said}");
    ok(&run(&[
        "store",
        "write",
        "other",
        "x",
        "--ttl",
        "1h",
        "--table",
        "cli",
        "--bootstrap",
        &addr,
    ]));
    // Read through the other node.
    let said = ok(&run(&[
        "store",
        "read",
        "greeting",
        "--table",
        "cli",
        "--bootstrap",
        &second_addr,
    ]));
    assert_eq!(said, "hello mesh\n");
    let record = run_json(&[
        "store",
        "read",
        "greeting",
        "--table",
        "cli",
        "--bootstrap",
        &second_addr,
    ]);
    assert_eq!(record["value"], "hello mesh");
    assert_eq!(record["metadata"]["lang"], "en");
    assert!(record["version"].as_u64().unwrap() > 0);
    let keys = run_json(&[
        "store",
        "list",
        "--table",
        "cli",
        "--bootstrap",
        &second_addr,
    ]);
    assert_eq!(keys, serde_json::json!(["greeting", "other"]));
    let said = ok(&run(&[
        "store",
        "list",
        "--prefix",
        "gr",
        "--table",
        "cli",
        "--bootstrap",
        &addr,
    ]));
    assert_eq!(said, "greeting\n");
    // An empty listing says so, on stderr: standard output holds keys only.
    let none = run(&[
        "store",
        "list",
        "--prefix",
        "zz",
        "--table",
        "cli",
        "--bootstrap",
        &addr,
    ]);
    assert!(none.status.success());
    assert!(none.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&none.stderr).trim(),
        "no keys starting with \"zz\" in table micromesh/cli"
    );

    ok(&run(&[
        "store",
        "delete",
        "greeting",
        "--table",
        "cli",
        "--bootstrap",
        &second_addr,
    ]));
    let out = run(&[
        "store",
        "read",
        "greeting",
        "--table",
        "cli",
        "--bootstrap",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found: greeting"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "store",
        "read",
        "x",
        "--table",
        "no/slash",
        "--bootstrap",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a table name is"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn identities_certificates_grants_and_revocations_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };

    // Identities: new, show, cert.
    let issuer = ok(run(&["identity", "new", "--out", &path("issuer.key")]));
    let ops = ok(run(&["identity", "new", "--out", &path("ops.key")]));
    let again = run(&["identity", "new", "--out", &path("ops.key")]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let shown: serde_json::Value = serde_json::from_str(&ok(run(&[
        "identity",
        "show",
        "--key",
        &path("ops.key"),
        "--json",
    ])))
    .unwrap();
    assert_eq!(shown["peer_id"], ops.as_str());
    let pem = ok(run(&[
        "identity",
        "cert",
        "--key",
        &path("ops.key"),
        "--key-out",
        &path("ops-key.pem"),
    ]));
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = data_encoding::BASE64.decode(body.as_bytes()).unwrap();
    assert_eq!(
        micromesh::auth::Certificate::peer_id_of(&der)
            .unwrap()
            .to_string(),
        ops
    );
    let key_pem = std::fs::read_to_string(path("ops-key.pem")).unwrap();
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{key_pem}"
    );
    // Offline commands list only their own options.
    let help = ok(run(&["identity", "new", "--help"]));
    for unrelated in [
        "--bootstrap",
        "--network",
        "--rule",
        "--trust",
        "--swarm-key",
    ] {
        assert!(!help.contains(unrelated), "{unrelated} in {help}");
    }
    let missing = run(&["identity", "show"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--key FILE"));

    // Grants: issue, show.
    ok(run(&[
        "grant",
        "issue",
        "--issuer",
        &path("issuer.key"),
        "--subject",
        &ops,
        "--role",
        "ops",
        "--valid-for",
        "1h",
        "--out",
        &path("ops.grant"),
    ]));
    let grant: serde_json::Value =
        serde_json::from_str(&ok(run(&["grant", "show", &path("ops.grant"), "--json"]))).unwrap();
    assert_eq!(grant["subject"], ops.as_str());
    assert_eq!(grant["issuer"], issuer.as_str());
    assert_eq!(grant["roles"], serde_json::json!(["ops"]));
    assert_eq!(grant["network"], "clitest");
    // Times as dates, with the time left.
    let shown = ok(run(&["grant", "show", &path("ops.grant")]));
    let expires = shown.lines().find(|l| l.starts_with("expires")).unwrap();
    assert!(
        expires.contains(" UTC (") && expires.ends_with("min left)"),
        "{shown}"
    );
    let bad = run(&["grant", "show", "AAAA"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a grant"));

    // A node where only holders of the role write table `cli`.
    let rules = [
        "--trust",
        &issuer,
        "--rule",
        "deny table:micromesh/cli any 0",
        "--rule",
        "allow table:micromesh/cli role:ops 10",
    ];
    let node = NodeProcess::start_with(
        &dir.path().join("node"),
        &["/ip4/127.0.0.1/tcp/0"],
        None,
        &rules,
    );
    let addr = node.addr("/tcp/");
    let write = |extra: &[&str], value: &str| {
        let mut a = vec![
            "store",
            "write",
            "k",
            value,
            "--table",
            "cli",
            "--bootstrap",
            &addr,
        ];
        a.extend_from_slice(&rules);
        a.extend_from_slice(extra);
        run(&a)
    };
    let refused = write(&[], "stranger");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("not allowed") && said.contains("default policy")
            || said.contains("denied by rule"),
        "{said}"
    );
    let read_k = || {
        ok(run(&[
            "store",
            "read",
            "k",
            "--table",
            "cli",
            "--bootstrap",
            &addr,
        ]))
    };
    let as_ops = ["--key", &path("ops.key"), "--grant", &path("ops.grant")];
    ok(write(&as_ops, "by ops"));
    assert_eq!(read_k(), "by ops");
    // A client with no rules of its own presents the grant without warnings about it.
    let client = run(&[
        "store",
        "read",
        "k",
        "--table",
        "cli",
        "--bootstrap",
        &addr,
        "--key",
        &path("ops.key"),
        "--grant",
        &path("ops.grant"),
    ]);
    let said = String::from_utf8_lossy(&client.stderr);
    assert!(client.status.success(), "{said}");
    assert!(!said.contains("gives it no roles"), "{said}");

    // Revoked: the node takes it, and the grant writes nothing more.
    let revoke = |grant: &str, through: &str| -> serde_json::Value {
        serde_json::from_str(&ok(run(&[
            "grant",
            "revoke",
            "--issuer",
            &path("issuer.key"),
            grant,
            "--bootstrap",
            through,
            "--json",
        ])))
        .unwrap()
    };
    let revoked = revoke(&path("ops.grant"), &addr);
    assert!(revoked["peers_reached"].as_u64().unwrap() >= 1, "{revoked}");
    assert!(!write(&as_ops, "after revocation").status.success());
    assert_eq!(read_k(), "by ops");

    // Through a node that trusts nobody (a plain bootstrap node, which refuses revocations of
    // issuers it does not trust): the revocation still reaches the node that does.
    ok(run(&[
        "grant",
        "issue",
        "--issuer",
        &path("issuer.key"),
        "--subject",
        &ops,
        "--role",
        "ops",
        "--out",
        &path("ops2.grant"),
    ]));
    let plain = NodeProcess::start(
        &dir.path().join("plain"),
        &["/ip4/127.0.0.1/tcp/0"],
        Some(&addr),
    );
    let plain_addr = plain.addr("/tcp/");
    let node_id = NodeProcess::peer_id(&addr).to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !peer_ids(&peers(&plain_addr)).contains(&node_id) {
        assert!(
            Instant::now() < deadline,
            "the plain node never knew the node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let revoked = revoke(&path("ops2.grant"), &plain_addr);
    assert_eq!(
        revoked["peers_reached"], 1,
        "the node, not the plain one: {revoked}"
    );
}

#[test]
fn health_stats_and_logs_of_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let addr = node.addr("/tcp/");
    let id = NodeProcess::peer_id(&addr).to_owned();

    let health = run(&["health", "micromesh-node", "--bootstrap", &addr]);
    let text = String::from_utf8_lossy(&health.stdout);
    assert!(health.status.success(), "{health:?}");
    assert!(text.contains(&id) && text.contains("serving"), "{text}");

    let stats = run_json(&["stats", "micromesh-node", "--bootstrap", &addr]);
    let stats = &stats.as_array().unwrap()[0];
    assert_eq!(stats["peer_id"], id.as_str());
    assert_eq!(stats["version"], env!("CARGO_PKG_VERSION"));
    assert!(stats["requests"].as_u64().unwrap() >= 1, "{stats}");
    let table = run(&["stats", "micromesh-node", "--bootstrap", &addr]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("UPTIME"));

    // The node logs "service started" at info when it starts.
    let logs = run(&[
        "logs",
        "micromesh-node",
        "--bootstrap",
        &addr,
        "-n",
        "50",
        "--json",
    ]);
    assert!(logs.status.success(), "{logs:?}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["message"] == "service started"),
        "{records:?}"
    );
    let bad = run(&[
        "logs",
        "micromesh-node",
        "--bootstrap",
        &addr,
        "--level",
        "loud",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown log level"));

    // A service nobody runs: a clear error, exit 1.
    let missing = run(&["health", "nobody", "--bootstrap", &addr, "--timeout", "2s"]);
    assert!(!missing.status.success());
    assert!(!String::from_utf8_lossy(&missing.stderr).is_empty());
}

#[test]
fn top_once_shows_the_endpoints_of_a_running_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let addr = node.addr("/tcp/");
    // Its first reading's `Debug.Stats` call is traffic the second reading sees.
    let view = run_json(&["top", "--once", "--interval", "500ms", "--bootstrap", &addr]);
    assert_eq!(view["services"], 1, "{view}");
    assert_eq!(view["instances"], 1, "{view}");
    let stats = view["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["service"] == "micromesh-node" && l["endpoint"] == "Debug.Stats")
        .unwrap_or_else(|| panic!("no Debug.Stats line in {view}"))
        .clone();
    assert!(stats["calls_per_second"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["p50_ms"].as_f64().is_some(), "{stats}");
    assert_eq!(stats["error_ratio"], 0.0, "{stats}");

    // Without a terminal, `top` prints one view as a table.
    let table = run(&["top", "--interval", "200ms", "--bootstrap", &addr]);
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("CALLS/S") && text.contains("micromesh-node"),
        "{text}"
    );
}

#[test]
fn trace_shows_the_spans_of_a_call_to_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &["/ip4/127.0.0.1/tcp/0"], None);
    let addr = node.addr("/tcp/");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent=00-{trace_id}-00f067aa0ba902b7-01");
    let call = run(&[
        "call",
        "micromesh-node",
        "Debug.Health",
        "null",
        "--metadata",
        &traceparent,
        "--bootstrap",
        &addr,
    ]);
    assert!(call.status.success(), "{call:?}");

    // The node's server span of that call, in the caller's trace; the caller's own client
    // span (its parent) was in the CLI's process.
    let spans = run_json(&[
        "trace",
        "micromesh-node",
        "--trace-id",
        trace_id,
        "--bootstrap",
        &addr,
    ]);
    let spans = spans.as_array().unwrap();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span["trace_id"], trace_id);
    assert_eq!(span["kind"], "server");
    assert_eq!(span["attributes"]["rpc.method"], "Debug.Health");
    assert_eq!(span["attributes"]["rpc.response.status_code"], "200");
    let parent = span["parent_span_id"].as_str().unwrap();
    assert_eq!(parent.len(), 16);
    assert_ne!(
        parent, "00f067aa0ba902b7",
        "the CLI's client span sits between"
    );

    let tree = run(&[
        "trace",
        "micromesh-node",
        "--trace-id",
        trace_id,
        "--bootstrap",
        &addr,
    ]);
    assert!(tree.status.success(), "{tree:?}");
    let text = String::from_utf8_lossy(&tree.stdout);
    assert!(text.starts_with(&format!("trace {trace_id}")), "{text}");
    assert!(
        text.contains("server micromesh-node/Debug.Health  200"),
        "{text}"
    );

    let bad = run(&[
        "trace",
        "micromesh-node",
        "--trace-id",
        "nope",
        "--bootstrap",
        &addr,
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a trace id"));
}

/// A `micromesh config watch` process printing JSON lines, and the lines as they come.
fn start_config_watch(addr: &str, path: &str, count: u64) -> (Child, mpsc::Receiver<String>) {
    let mut watch = Command::new(BIN)
        .args(["--json", "config", "watch", path, "--network", "clitest"])
        .args(["--count", &count.to_string(), "--bootstrap", addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start micromesh config watch");
    let stdout = watch.stdout.take().unwrap();
    let (tx, lines) = mpsc::sync_channel(16);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (watch, lines)
}

fn next_line(lines: &mpsc::Receiver<String>) -> serde_json::Value {
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("config watch prints a line");
    serde_json::from_str(&line).expect("one JSON value per line")
}

#[test]
fn config_set_get_unset_and_watch_across_node_processes() {
    let (_nodes, addr, second_addr) = two_nodes_on_tcp();

    let (watch, lines) = start_config_watch(&second_addr, "shop.greeting", 2);
    // First the value now: nothing yet.
    assert_eq!(
        next_line(&lines),
        serde_json::json!({ "path": "shop.greeting", "value": null })
    );
    let said = ok(&run(&[
        "config",
        "set",
        "shop.greeting",
        "hello mesh",
        "--bootstrap",
        &addr,
    ]));
    assert!(said.starts_with("set shop.greeting (version "), "{said}");
    assert_eq!(
        next_line(&lines),
        serde_json::json!({ "path": "shop.greeting", "value": "hello mesh" })
    );
    // Read through the other node; JSON values keep their type.
    assert_eq!(
        ok(&run(&[
            "config",
            "get",
            "shop.greeting",
            "--bootstrap",
            &second_addr
        ])),
        "hello mesh\n"
    );
    ok(&run(&[
        "config",
        "set",
        "shop.limits",
        r#"{"rate": 5}"#,
        "--bootstrap",
        &addr,
    ]));
    let got = run_json(&["config", "get", "shop", "--bootstrap", &second_addr]);
    assert_eq!(got["value"]["limits"]["rate"], 5);
    assert_eq!(got["value"]["greeting"], "hello mesh");

    ok(&run(&[
        "config",
        "unset",
        "shop.greeting",
        "--bootstrap",
        &addr,
    ]));
    assert_eq!(
        next_line(&lines),
        serde_json::json!({ "path": "shop.greeting", "value": null })
    );
    assert!(watch.wait_with_output().unwrap().status.success());
    let missing = run(&["config", "get", "shop.greeting", "--bootstrap", &addr]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("shop.greeting is not set"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // Refused by the rules: 403, and nothing written.
    let refused = run(&[
        "config",
        "set",
        "shop.greeting",
        "sneaky",
        "--rule",
        "deny config:shop.* any 10",
        "--bootstrap",
        &addr,
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("forbidden (403)"), "{stderr}");
    assert!(
        !run(&["config", "get", "shop.greeting", "--bootstrap", &addr])
            .status
            .success()
    );
    // A bad path is refused before joining anything.
    let bad = run(&["config", "set", "shop..x", "1", "--bootstrap", &addr]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid config path"));
}

/// Starts `micromesh node` with `args` and `env`, and returns it with the first TCP address it
/// prints.
fn node_with_env(args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut node = Command::new(BIN)
        .arg("node")
        .args(["--json", "--no-mdns", "--no-upnp", "--no-autonat"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start micromesh node");
    let stdout = node.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = lines
        .find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(&line.ok()?).ok()?;
            value["address"]
                .as_str()
                .filter(|a| a.contains("/tcp/"))
                .map(str::to_owned)
        })
        .expect("the node prints its address");
    (node, addr)
}

/// A free loopback TCP port (free when this returns; the OS does not hand it out again at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_node_reads_its_config_file_under_the_environment_and_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let [from_file, from_env, from_flag] = [free_port(), free_port(), free_port()];
    let file = dir.path().join("node.toml");
    // The README's example, on a loopback port of this test's choosing.
    let readme = include_str!("../README.md");
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a TOML example");
    std::fs::write(
        &file,
        example.replace(
            "/ip4/0.0.0.0/tcp/4001",
            &format!("/ip4/127.0.0.1/tcp/{from_file}"),
        ),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let config = file.to_str().unwrap();
    let data = data_dir.to_str().unwrap();
    let listen = |port: u16| format!("/ip4/127.0.0.1/tcp/{port}");
    let base = ["--config", config, "--data-dir", data];

    let (mut node, addr) = node_with_env(&base, &[]);
    assert!(addr.starts_with(&listen(from_file)), "{addr}");
    // The file names the network: a client on another network does not reach the node.
    let peers = Command::new(BIN)
        .args(["peers", "--json", "--network", "shop", "--bootstrap", &addr])
        .output()
        .unwrap();
    assert!(
        peers.status.success(),
        "{}",
        String::from_utf8_lossy(&peers.stderr)
    );
    let _ = node.kill();
    let _ = node.wait();

    let env_listen = listen(from_env);
    let (mut node, addr) = node_with_env(&base, &[("MICROMESH_LISTEN", &env_listen)]);
    assert!(
        addr.starts_with(&env_listen),
        "the environment beats the file: {addr}"
    );
    let _ = node.kill();
    let _ = node.wait();

    let flag_listen = listen(from_flag);
    let mut args = base.to_vec();
    args.extend(["--listen", &flag_listen]);
    let (mut node, addr) = node_with_env(&args, &[("MICROMESH_LISTEN", &env_listen)]);
    assert!(
        addr.starts_with(&flag_listen),
        "a flag beats the environment: {addr}"
    );
    let _ = node.kill();
    let _ = node.wait();

    // `config get` reads the same sources: the environment over the file.
    let got = Command::new(BIN)
        .args(["config", "get", "max_connections", "--config", config])
        .env("MICROMESH_MAX_CONNECTIONS", "7")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout), "7\n");
    let got = Command::new(BIN)
        .args(["config", "get", "network", "--config", config])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout), "shop\n");
}

#[test]
fn a_node_warns_about_a_key_of_its_config_file_that_nothing_reads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "max_conections = 5\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n[auth]\nrule = []\n",
    )
    .unwrap();
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--no-upnp", "--no-autonat", "--config"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(node.stderr.take().unwrap());
    // The node logs its start after the warnings: read up to that line.
    let lines: Vec<String> = stderr
        .lines()
        .map_while(Result::ok)
        .take_while(|line| !line.contains("service started"))
        .collect();
    let _ = node.kill();
    let _ = node.wait();
    let warned = |key: &str| lines.iter().any(|l| l.contains("WARN") && l.contains(key));
    assert!(warned("unknown key \"max_conections\""), "{lines:#?}");
    assert!(warned("unknown key \"auth.rule\""), "{lines:#?}");
    // The keys it reads are not warned about.
    assert!(
        !lines.iter().any(|l| l.contains("\"listen\"")),
        "{lines:#?}"
    );
}
