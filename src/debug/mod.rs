//! Debug: what an operator asks of a running node, over HTTP.
//!
//! A service built with [`Builder::metrics`](crate::service::Builder::metrics) (or
//! `micromesh node --metrics ADDR`) serves, on that address:
//!
//! - `GET /metrics`: every metric of the node in the OpenMetrics text format, for Prometheus
//!   to scrape: libp2p's own (`libp2p_*`: connections, dials, Kademlia, identify, ping, relay,
//!   DCUtR, gossipsub), micromesh's (`micromesh_*`: server, broker, store, registry, auth), and
//!   the golden metrics of calls after OpenTelemetry's RPC conventions
//!   (`rpc_server_call_duration_seconds`, `rpc_client_call_duration_seconds`, calls in flight:
//!   see below).
//! - `GET /health/live`: 200 while the node runs, 503 once it stopped.
//! - `GET /health/ready`: 200 once the service is started, its services are announced and,
//!   if it was given bootstrap peers, it is connected to the mesh; 503 with the reason
//!   otherwise (and from the moment it begins to stop).
//!
//! # Debug endpoints
//!
//! Every service also serves go-micro's debug endpoints, over the mesh like any other (and
//! under the same auth rules: resource `endpoint:<service>/Debug.Health` and so on; the
//! default policy lets any authenticated peer call them, a rule such as
//! `deny endpoint:*/Debug.* any 0` closes them):
//!
//! - [`HEALTH`] (`Debug.Health`): a [`Health`];
//! - [`STATS`] (`Debug.Stats`): [`Stats`]: uptime, memory, threads, calls, errors,
//!   connections;
//! - [`LOG`] (`Debug.Log`): the process's recent log records and, with `follow`, new ones as
//!   they come, when the program added [`log_layer`] to its tracing subscriber (the CLI's
//!   `micromesh node` does); 501 otherwise.
//! - [`TRACE`] (`Debug.Trace`): the process's recent call spans ([`SpanRecord`]: W3C trace
//!   and span ids, parent, kind, timing, OpenTelemetry's RPC attributes), of one trace or of
//!   all, when the program added [`trace_layer`] to its subscriber (the CLI's `micromesh node`
//!   does); 501 otherwise. Every call has a client span (on the caller) and a server span (on
//!   the callee), the server's a child of the client's.
//!
//! `micromesh health NAME`, `micromesh stats NAME`, `micromesh logs NAME` and
//! `micromesh trace NAME` call them. A
//! service's own endpoints of the same names take precedence.
//!
//! # Call metrics
//!
//! `rpc_server_call_duration_seconds` (a histogram by `rpc_service`, `rpc_method` and
//! `rpc_response_status_code`) counts and times every call the service served; its `_count`
//! gives request and error rates, its buckets the latency quantiles:
//!
//! ```text
//! sum by (rpc_method) (rate(rpc_server_call_duration_seconds_count[1m]))
//! histogram_quantile(0.99, sum by (le) (rate(rpc_server_call_duration_seconds_bucket[1m])))
//! ```
//!
//! `rpc_client_call_duration_seconds` does the same for unary calls the service made (retries
//! included in one call), and `rpc_server_calls_in_flight` / `rpc_client_calls_in_flight`
//! count calls under way. A server labels calls to endpoints it does not serve `_OTHER`.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use micromesh::{Service, node::Preset};
//!
//! let service = Service::builder("greeter")
//!     .preset(Preset::Local)
//!     .metrics("127.0.0.1:0".parse()?)
//!     .build()
//!     .await?;
//! let addr = service.metrics_addr().expect("asked for");
//! println!("scrape http://{addr}/metrics");
//! service.stop().await?;
//! # Ok(()) }
//! ```

pub(crate) mod http;
pub(crate) mod logs;
#[cfg(feature = "otel")]
mod otlp;
pub(crate) mod spans;
mod stats;

pub use http::HttpEndpoint;
pub use logs::{CAPACITY as LOG_CAPACITY, LogLayer, LogRecord, LogRequest, log_layer, parse_level};
#[cfg(feature = "otel")]
pub use otlp::{OtlpConfig, OtlpError, OtlpExporter, otlp_layer};
pub use spans::{CAPACITY as SPAN_CAPACITY, SpanRecord, TraceRequest, trace_layer};
pub(crate) use stats::process;
pub use stats::{EndpointStats, Health, Stats, latency_bounds};

/// The endpoint every service serves with its [`Health`].
pub const HEALTH: &str = "Debug.Health";
/// The endpoint every service serves with its [`Stats`].
pub const STATS: &str = "Debug.Stats";
/// The server-streaming endpoint every service serves with the process's recent
/// [`LogRecord`]s (asked with a [`LogRequest`]), when its subscriber has a [`log_layer`].
pub const LOG: &str = "Debug.Log";
/// The endpoint every service serves with the process's recent call [`SpanRecord`]s (asked
/// with a [`TraceRequest`]), when its subscriber has a [`trace_layer`].
pub const TRACE: &str = "Debug.Trace";

/// Errors of the debug endpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The HTTP listener could not be opened.
    #[error("cannot serve metrics on {addr}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}
