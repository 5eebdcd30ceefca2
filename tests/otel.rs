//! Call spans exported over OTLP/HTTP (feature `otel`) to a receiver that decodes the requests
//! with OpenTelemetry's own protocol types, as a collector would. Its own binary: it installs
//! the process's tracing subscriber.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use micromesh::{
    Context, Service, Status,
    client::CallOptions,
    debug::{OtlpConfig, otlp_layer},
    node::Preset,
    testing::wait_until,
    trace::{TRACEPARENT, TraceParent},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use prost::Message as _;
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

const WAIT: Duration = Duration::from_secs(20);

/// What the receiver got: each request's service name and spans.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on loopback: decodes `POST /v1/traces` protobuf bodies.
async fn receiver() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        assert_eq!(request.uri().path(), "/v1/traces");
                        assert_eq!(request.headers()["content-type"], "application/x-protobuf");
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        for resource in export.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.as_ref()?.value.clone());
                            let Some(Value::StringValue(service)) = service else {
                                panic!("no service.name");
                            };
                            for scope in resource.scope_spans {
                                for span in scope.spans {
                                    store.lock().unwrap().push((service.clone(), span));
                                }
                            }
                        }
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

async fn hello(_: Context, name: String) -> Result<String, Status> {
    Ok(format!("hello {name}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_exported_as_a_client_and_a_server_span_of_one_trace() {
    let (endpoint, received) = receiver().await;
    let (layer, exporter) =
        otlp_layer(OtlpConfig::new(&endpoint).service_name("otel-test")).unwrap();
    tracing_subscriber::registry().with(layer).init();

    let server = Service::builder("greeter")
        .preset(Preset::Local)
        .network("otel")
        .handle("Greeter.Hello", hello)
        .build()
        .await
        .unwrap();
    let caller = Service::builder("caller")
        .preset(Preset::Local)
        .network("otel")
        .bootstrap(server.node().listen_addrs().await.unwrap().remove(0))
        .register(false)
        .build()
        .await
        .unwrap();
    let root = TraceParent::new_root();
    let options = CallOptions::default()
        .peer(server.peer_id())
        .metadata(TRACEPARENT, root.to_string());
    let reply: String = caller
        .client()
        .call_with("greeter", "Greeter.Hello", &"otel", options)
        .await
        .unwrap();
    assert_eq!(reply, "hello otel");

    // The server span ends just after its answer is written: flush until both are out.
    let of_trace = || -> Vec<(String, Span)> {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == root.trace_id())
            .cloned()
            .collect()
    };
    wait_until(WAIT, || async {
        assert!(exporter.flush(WAIT));
        of_trace().len() >= 2
    })
    .await
    .unwrap();
    let spans = of_trace();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.kind == SpanKind::Client as i32)
        .expect("a client span");
    let server_span = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    assert!(spans.iter().all(|(service, _)| service == "otel-test"));
    assert_eq!(client.name, "greeter/Greeter.Hello");
    assert_eq!(server_span.name, "greeter/Greeter.Hello");
    // The caller's span is the child of the root it was given, the server's of the caller's.
    assert_eq!(hex(&client.parent_span_id), root.span_id());
    assert_eq!(server_span.parent_span_id, client.span_id);
    assert!(client.end_time_unix_nano >= client.start_time_unix_nano);
    let attribute = |span: &Span, key: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    assert_eq!(
        attribute(server_span, "rpc.service"),
        Some(Value::StringValue("greeter".into()))
    );
    assert_eq!(
        attribute(server_span, "rpc.response.status_code"),
        Some(Value::IntValue(200))
    );
    assert_eq!(exporter.failed(), 0);
    assert_eq!(exporter.dropped(), 0);
    assert!(exporter.exported() >= 2);

    caller.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// `micromesh node --otlp` and a command's `--otlp`: the command's client span and the node's
/// server span reach the receiver from two processes, in one trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_exports_the_spans_of_a_call_from_both_processes() {
    use std::io::BufRead as _;
    let (endpoint, received) = receiver().await;
    let data = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_micromesh");
    let mut node = std::process::Command::new(bin)
        .args([
            "node",
            "--json",
            "--network",
            "otel-cli",
            "--no-mdns",
            "--no-upnp",
        ])
        .args([
            "--no-autonat",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--otlp",
            &endpoint,
        ])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = node.stdout.take().unwrap();
    let addr = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(&line).ok()?;
            value["address"].as_str().map(str::to_owned)
        })
        .expect("the node prints its address");
    let health = tokio::process::Command::new(bin)
        .args([
            "health",
            "micromesh-node",
            "--network",
            "otel-cli",
            "--bootstrap",
            &addr,
        ])
        .args(["--otlp", &endpoint])
        .output()
        .await
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    // The command flushed before it exited; the node sends within a second.
    let exported = || {
        let spans = received.lock().unwrap().clone();
        let client = spans
            .iter()
            .find(|(service, s)| service == "micromesh-cli" && s.kind == SpanKind::Client as i32)
            .cloned();
        let server = client.as_ref().and_then(|(_, c)| {
            spans
                .iter()
                .find(|(service, s)| {
                    service == "micromesh-node"
                        && s.trace_id == c.trace_id
                        && s.parent_span_id == c.span_id
                })
                .cloned()
        });
        (client, server)
    };
    assert!(
        exported().0.is_some(),
        "the command's span was sent before it exited"
    );
    let found = wait_until(WAIT, || async { exported().1.is_some() }).await;
    let _ = node.kill();
    let _ = node.wait();
    found.expect("the node's server span of the same call");
    assert_eq!(exported().1.unwrap().1.name, "micromesh-node/Debug.Health");
}
