//! Export of call spans over OTLP/HTTP (feature `otel`): the spans `Debug.Trace` serves, with
//! the same W3C ids, sent to an OpenTelemetry collector or any OTLP receiver.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tracing::Subscriber;
use tracing_subscriber::{Layer, registry::LookupSpan};

use super::spans::{Kept, Sink, span_layer};

/// Spans waiting for the exporter at most; beyond, new spans are dropped and counted.
const QUEUE: usize = 8192;
/// The most spans in one export request.
const BATCH: usize = 512;
/// How long spans wait for more before they are sent.
const DELAY: Duration = Duration::from_secs(1);

/// Where and how spans are exported. Made by [`OtlpConfig::new`].
///
/// ```
/// let config = micromesh::debug::OtlpConfig::new("http://127.0.0.1:4318")
///     .service_name("greeter")
///     .timeout(std::time::Duration::from_secs(5));
/// assert_eq!(config.traces_url(), "http://127.0.0.1:4318/v1/traces");
/// ```
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    endpoint: String,
    service_name: String,
    timeout: Duration,
}

impl OtlpConfig {
    /// Exports to the OTLP/HTTP receiver at `endpoint`: a base URL such as
    /// `http://collector:4318` (spans go to its `/v1/traces`), or the full URL of the traces
    /// path.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: "micromesh".into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The resource's `service.name`. Default `micromesh`.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = name.into();
        self
    }

    /// How long one export request may take. Default 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        }
    }
}

/// Why the exporter did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtlpError {
    /// The endpoint is not an `http://` or `https://` URL.
    #[error("the OTLP endpoint {0:?} is not an http:// or https:// URL")]
    Endpoint(String),
    /// The exporter could not be built.
    #[error("cannot start the OTLP exporter: {0}")]
    Start(String),
}

enum Message {
    Span(Box<Kept>),
    Flush(mpsc::SyncSender<()>),
    Stop,
}

#[derive(Default)]
struct Counters {
    exported: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The exporter of an [`otlp_layer`]: counts what it sent, flushes on demand, and sends what
/// is queued when dropped (for at most its timeout).
pub struct OtlpExporter {
    queue: mpsc::SyncSender<Message>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("exported", &self.exported())
            .field("failed", &self.failed())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// Sends every span queued so far, and waits until the receiver answered (or `timeout`).
    /// Returns whether it finished in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, finished) = mpsc::sync_channel(1);
        if self.queue.send(Message::Flush(done)).is_err() {
            return false;
        }
        finished.recv_timeout(timeout).is_ok()
    }

    /// Spans the receiver took.
    pub fn exported(&self) -> u64 {
        self.counters.exported.load(Ordering::Relaxed)
    }

    /// Spans whose export failed (the receiver refused them or could not be reached).
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for OtlpExporter {
    fn drop(&mut self) {
        self.flush(self.timeout);
        let _ = self.queue.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Queue {
    queue: mpsc::SyncSender<Message>,
    counters: Arc<Counters>,
}

impl Sink for Queue {
    fn keep(&self, span: Kept) {
        if self.queue.try_send(Message::Span(Box::new(span))).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A layer that exports micromesh's call spans (and a program's own spans that record W3C
/// ids the same way, see [`trace_layer`](super::trace_layer)) over OTLP/HTTP with protobuf
/// bodies, in batches, from a thread of its own; and its exporter, to keep while the program
/// runs (dropping it sends what is queued).
///
/// The spans keep micromesh's ids: a call's client span is the parent of the server span on
/// the other node, and a chain of calls across nodes is one trace in the collector.
///
/// # Errors
///
/// [`OtlpError`] when the endpoint is not a URL or the exporter cannot be built.
///
/// ```no_run
/// use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
/// use micromesh::debug::{OtlpConfig, otlp_layer};
///
/// let (layer, exporter) = otlp_layer(OtlpConfig::new("http://127.0.0.1:4318").service_name("greeter"))?;
/// tracing_subscriber::registry().with(layer).init();
/// // … run the service; keep `exporter` until the end.
/// drop(exporter);
/// # Ok::<(), micromesh::debug::OtlpError>(())
/// ```
pub fn otlp_layer<S>(config: OtlpConfig) -> Result<(impl Layer<S>, OtlpExporter), OtlpError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let url = config.traces_url();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(OtlpError::Endpoint(config.endpoint));
    }
    let (queue, received) = mpsc::sync_channel(QUEUE);
    let counters = Arc::new(Counters::default());
    let (started, start) = mpsc::sync_channel(1);
    let thread_counters = counters.clone();
    let timeout = config.timeout;
    // The exporter's HTTP client blocks: it lives on a thread of its own, built there (a
    // blocking client must not be made or dropped inside an async runtime).
    let thread = std::thread::Builder::new()
        .name("micromesh-otlp".into())
        .spawn(move || {
            let built = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(timeout)
                .build();
            let mut exporter = match built {
                Ok(exporter) => {
                    let _ = started.send(Ok(()));
                    exporter
                }
                Err(e) => {
                    let _ = started.send(Err(e.to_string()));
                    return;
                }
            };
            exporter.set_resource(
                &opentelemetry_sdk::Resource::builder_empty()
                    .with_service_name(config.service_name)
                    .build(),
            );
            export_loop(&exporter, &received, &thread_counters);
            let _ = exporter.shutdown();
        })
        .map_err(|e| OtlpError::Start(e.to_string()))?;
    match start.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(OtlpError::Start(e)),
        Err(_) => return Err(OtlpError::Start("the exporter thread ended".into())),
    }
    let layer = span_layer(Queue {
        queue: queue.clone(),
        counters: counters.clone(),
    });
    Ok((
        layer,
        OtlpExporter {
            queue,
            counters,
            thread: Some(thread),
            timeout,
        },
    ))
}

fn export_loop(
    exporter: &opentelemetry_otlp::SpanExporter,
    received: &mpsc::Receiver<Message>,
    counters: &Counters,
) {
    let scope = InstrumentationScope::builder("micromesh")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut batch = Vec::new();
    let send = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let n = spans.len() as u64;
        match futures::executor::block_on(exporter.export(spans)) {
            Ok(()) => counters.exported.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!("OTLP export of {n} spans failed: {e}");
                counters.failed.fetch_add(n, Ordering::Relaxed)
            }
        };
    };
    loop {
        match received.recv_timeout(DELAY) {
            Ok(Message::Span(span)) => {
                if let Some(data) = span_data(&span, &scope) {
                    batch.push(data);
                }
                if batch.len() >= BATCH {
                    send(&mut batch);
                }
            }
            Ok(Message::Flush(done)) => {
                send(&mut batch);
                let _ = done.send(());
            }
            Ok(Message::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                send(&mut batch);
                return;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => send(&mut batch),
        }
    }
}

/// A kept span as OpenTelemetry's span data; `None` when its ids are not W3C ids.
fn span_data(span: &Kept, scope: &InstrumentationScope) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(span.trace_id()).ok()?;
    let span_id = SpanId::from_hex(span.span_id()).ok()?;
    let parent = span
        .parent_span_id()
        .and_then(|p| SpanId::from_hex(p).ok())
        .unwrap_or(SpanId::INVALID);
    let kind = match span.kind() {
        Some("client") => SpanKind::Client,
        Some("server") => SpanKind::Server,
        Some("producer") => SpanKind::Producer,
        Some("consumer") => SpanKind::Consumer,
        _ => SpanKind::Internal,
    };
    let attribute = |name: &str| span.attribute(name);
    // OpenTelemetry's RPC spans are named `service/method`.
    let name = match (attribute("rpc.service"), attribute("rpc.method")) {
        (Some(service), Some(method)) => format!("{service}/{method}").into(),
        _ => span.name.into(),
    };
    // A call failed when its status is a server error; for the caller, any error.
    let status = attribute("rpc.response.status_code")
        .and_then(|code| code.parse::<u16>().ok())
        .map_or(Status::Unset, |code| {
            let failed = match kind {
                SpanKind::Client => code >= 400,
                _ => code >= 500,
            };
            if failed {
                Status::error(format!("status {code}"))
            } else {
                Status::Unset
            }
        });
    let start_time = UNIX_EPOCH + Duration::from_micros(span.start_unix_us);
    Some(SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: kind == SpanKind::Server && parent != SpanId::INVALID,
        span_kind: kind,
        name,
        start_time,
        end_time: start_time + Duration::from_micros(span.duration_us),
        attributes: span
            .attributes()
            .map(|(name, value)| match value.parse::<i64>() {
                Ok(number) => KeyValue::new(name, number),
                Err(_) => KeyValue::new(name, value.to_owned()),
            })
            .collect(),
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status,
        instrumentation_scope: scope.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_call_span_becomes_an_rpc_span_with_its_own_ids() {
        let fields = [
            ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("span_id", "00f067aa0ba902b7"),
            ("parent_span_id", "b7ad6b7169203331"),
            ("otel.kind", "server"),
            ("rpc.service", "greeter"),
            ("rpc.method", "Greeter.Hello"),
            ("rpc.response.status_code", "503"),
        ];
        let kept = Kept::new("call", 1_767_225_600_000_000, 250, &fields);
        let scope = InstrumentationScope::builder("micromesh").build();
        let data = span_data(&kept, &scope).unwrap();
        assert_eq!(data.name, "greeter/Greeter.Hello");
        assert_eq!(data.span_kind, SpanKind::Server);
        assert_eq!(
            data.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            data.parent_span_id,
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
        assert!(data.parent_span_is_remote);
        assert!(matches!(data.status, Status::Error { .. }));
        assert_eq!(
            data.end_time.duration_since(data.start_time).unwrap(),
            Duration::from_micros(250)
        );
        assert!(
            data.attributes
                .contains(&KeyValue::new("rpc.response.status_code", 503))
        );

        let mut bad = fields.to_vec();
        bad[0].1 = "not hex";
        assert!(span_data(&Kept::new("call", 0, 1, &bad), &scope).is_none());
    }

    #[test]
    fn endpoints_get_the_traces_path_once_and_must_be_urls() {
        assert_eq!(
            OtlpConfig::new("http://c:4318/").traces_url(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            OtlpConfig::new("https://c/v1/traces").traces_url(),
            "https://c/v1/traces"
        );
        let refused = otlp_layer::<tracing_subscriber::Registry>(OtlpConfig::new("c:4318"));
        assert!(matches!(refused, Err(OtlpError::Endpoint(_))));
    }
}
