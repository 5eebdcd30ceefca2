//! The HTTP listener of `/metrics` and `/health/*`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::JoinSet;

use super::Error;
use crate::node::Node;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a service is ready for traffic; `Err` says why not.
pub(crate) type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// An HTTP listener serving a node's metrics and health; see the [module docs](super). It
/// closes when dropped.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use micromesh::{debug::HttpEndpoint, node::{Node, Preset}};
///
/// let node = Node::builder().preset(Preset::Local).build().await?;
/// let endpoint = HttpEndpoint::serve("127.0.0.1:0".parse()?, node.clone()).await?;
/// println!("metrics on http://{}/metrics", endpoint.local_addr());
/// # node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct HttpEndpoint {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpEndpoint {
    /// Serves `node`'s metrics and health on `addr` (port 0 picks a free port). Without a
    /// service around the node, `/health/ready` answers as `/health/live` does.
    ///
    /// # Errors
    ///
    /// [`Error::Bind`] if `addr` cannot be listened on.
    pub async fn serve(addr: SocketAddr, node: Node) -> Result<Self, Error> {
        Self::serve_with(addr, node, Arc::new(|| Ok(()))).await
    }

    pub(crate) async fn serve_with(
        addr: SocketAddr,
        node: Node,
        ready: Readiness,
    ) -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let state = Arc::new(State { node, ready });
        let task = tokio::spawn(accept(listener, state));
        tracing::info!(%local_addr, "serving metrics and health over HTTP");
        Ok(Self { local_addr, task })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for HttpEndpoint {
    fn drop(&mut self) {
        // The connections are the accept task's: they end with it.
        self.task.abort();
    }
}

struct State {
    node: Node,
    ready: Readiness,
}

async fn accept(listener: tokio::net::TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            // Wait for one to end before taking another.
            connections.join_next().await;
            continue;
        }
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, most likely: try again shortly, do not spin.
                tracing::debug!("metrics listener: cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(state.node.encode_metrics())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/health/live" => match state.node.exit_reason() {
            None => text(StatusCode::OK, "live\n".into()),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("stopped: {reason}\n"),
            ),
        },
        "/health/ready" => match (state.node.exit_reason(), (state.ready)()) {
            (Some(reason), _) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("stopped: {reason}\n"),
            ),
            (None, Err(why)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
            (None, Ok(())) => text(StatusCode::OK, "ready\n".into()),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /health/live or /health/ready\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
