//! The service: one name, one node, every component, one lifecycle.
//!
//! A [`Service`] is what go-micro calls a service: a named, versioned program on the mesh.
//! [`Service::builder`] configures it, [`Builder::build`] starts its node, and
//! [`Service::run`] serves until the process is asked to stop (ctrl-c or SIGTERM), then shuts
//! down gracefully within a deadline. Lifecycle hooks run before and after start and stop.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), micromesh::Error> {
//! use micromesh::{Service, node::Preset};
//!
//! let service = Service::builder("greeter")
//!     .version("1.0.0")
//!     .preset(Preset::Local)
//!     .after_start(|| async { println!("started"); Ok(()) })
//!     .build()
//!     .await?;
//! assert_eq!(service.name(), "greeter");
//! // `service.run().await` would serve until ctrl-c; stop it here instead.
//! service.stop().await?;
//! # Ok(()) }
//! ```

use std::{fmt, future::Future, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use tokio::sync::Mutex;

use futures::Stream;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Context, Error, Identity, Metadata, Multiaddr, PeerId, Status,
    broker::{self, Broker},
    client::Client,
    error::BoxError,
    node::{self, Node, Preset},
    registry::{self, Registration, Registry},
    selector::{self, Selector},
    server::{self, BoxedUnary, Endpoint, Handler, Router, Streaming},
    store::{self, Store},
    transport,
};

type LayerFn = Arc<dyn Fn(BoxedUnary) -> BoxedUnary + Send + Sync>;

type HookFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Hook = Arc<dyn Fn() -> HookFuture + Send + Sync>;

#[derive(Clone, Default)]
struct Hooks {
    before_start: Vec<Hook>,
    after_start: Vec<Hook>,
    before_stop: Vec<Hook>,
    after_stop: Vec<Hook>,
}

async fn run_hooks(stage: &'static str, hooks: &[Hook]) -> Result<(), Error> {
    for hook in hooks {
        hook()
            .await
            .map_err(|source| Error::Hook { stage, source })?;
    }
    Ok(())
}

/// Configures and starts a [`Service`]. Made by [`Service::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    name: String,
    version: String,
    metadata: Metadata,
    node: node::Builder,
    hooks: Hooks,
    shutdown_timeout: Duration,
    register: bool,
    metrics: Option<std::net::SocketAddr>,
    endpoints: Vec<registry::Endpoint>,
    registry: registry::Config,
    selector: selector::Config,
    broker: broker::Config,
    store: store::Config,
    transport: transport::Config,
    router: Router,
    layers: Vec<LayerFn>,
    config: Option<crate::config::Config>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("metadata", &self.metadata)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Builder {
    fn new(name: String) -> Self {
        Self {
            name,
            version: "latest".into(),
            metadata: Metadata::new(),
            node: Node::builder(),
            hooks: Hooks::default(),
            shutdown_timeout: Duration::from_secs(10),
            register: true,
            metrics: None,
            endpoints: Vec::new(),
            registry: registry::Config::default(),
            selector: selector::Config::default(),
            broker: broker::Config::default(),
            store: store::Config::default(),
            transport: transport::Config::default(),
            router: Router::default(),
            layers: Vec::new(),
            config: None,
        }
    }

    /// Serves `endpoint` (e.g. `"Greeter.Hello"`) with a unary handler: an async function
    /// from a [`Context`] and a request to a response or a [`Status`]. The endpoint and its
    /// type names are announced in the registry.
    pub fn handle<H, Req, Resp>(mut self, endpoint: impl Into<String>, handler: H) -> Self
    where
        H: Handler<Req, Resp>,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        self.router
            .insert(endpoint.into(), server::handler_unary(handler));
        self
    }

    /// Serves `endpoint` with a server-streaming handler: one request, a stream of responses.
    pub fn server_stream<F, Fut, S, Req, Resp>(
        mut self,
        endpoint: impl Into<String>,
        handler: F,
    ) -> Self
    where
        F: Fn(Context, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<S, Status>> + Send + 'static,
        S: Stream<Item = Result<Resp, Status>> + Send + 'static,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        let buffer = self.transport.stream_buffer;
        self.router.insert(
            endpoint.into(),
            server::handler_server_stream(buffer, handler),
        );
        self
    }

    /// Serves `endpoint` with a client-streaming handler: a stream of requests, one response.
    pub fn client_stream<F, Fut, Req, Resp>(
        mut self,
        endpoint: impl Into<String>,
        handler: F,
    ) -> Self
    where
        F: Fn(Context, Streaming<Req>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        let buffer = self.transport.stream_buffer;
        self.router.insert(
            endpoint.into(),
            server::handler_client_stream(buffer, handler),
        );
        self
    }

    /// Serves `endpoint` with a bidirectional handler: a stream of requests in, a stream of
    /// responses out, both flowing at once.
    pub fn bidi_stream<F, Fut, S, Req, Resp>(
        mut self,
        endpoint: impl Into<String>,
        handler: F,
    ) -> Self
    where
        F: Fn(Context, Streaming<Req>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<S, Status>> + Send + 'static,
        S: Stream<Item = Result<Resp, Status>> + Send + 'static,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        let buffer = self.transport.stream_buffer;
        self.router
            .insert(endpoint.into(), server::handler_bidi(buffer, handler));
        self
    }

    /// Wraps every unary handler in a tower [`Layer`](tower::Layer): tower's own timeout,
    /// concurrency-limit, rate-limit and load-shed layers work unchanged. The first layer
    /// added is the outermost (it sees each request first), as with tower's
    /// `ServiceBuilder`. A layer's errors reach the caller as statuses: a [`Status`] as it
    /// is, tower's timeout as 408, load shedding as 503, anything else as 500.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxedUnary> + Send + Sync + 'static,
        L::Service: tower::Service<server::Request, Response = server::Response>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<server::Request>>::Error: Into<BoxError>,
        <L::Service as tower::Service<server::Request>>::Future: Send + 'static,
    {
        self.layers.push(Arc::new(move |inner| {
            use tower::ServiceExt as _;
            tower::util::BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Transport limits: message size, calls per peer, stream buffers. Default is
    /// [`transport::Config::default`].
    pub fn transport_config(mut self, config: transport::Config) -> Self {
        self.transport = config;
        self
    }

    /// Whether the service announces itself in the registry when it starts (and its leave when
    /// it stops). Turn it off for clients and tools that only call others. Default is on.
    pub fn register(mut self, on: bool) -> Self {
        self.register = on;
        self
    }

    /// Adds an endpoint to the service's registry entry. (Handlers registered with the server
    /// add theirs automatically.)
    pub fn endpoint(mut self, endpoint: registry::Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Registry settings (announce interval, TTL, liveness checks). Default is
    /// [`registry::Config::default`].
    pub fn registry_config(mut self, config: registry::Config) -> Self {
        self.registry = config;
        self
    }

    /// Selector settings. Default is [`selector::Config::default`].
    pub fn selector_config(mut self, config: selector::Config) -> Self {
        self.selector = config;
        self
    }

    /// Broker settings. Default is [`broker::Config::default`].
    pub fn broker_config(mut self, config: broker::Config) -> Self {
        self.broker = config;
        self
    }

    /// Store settings: quorums, timeout, the default database and table. Default is
    /// [`store::Config::default`].
    pub fn store_config(mut self, config: store::Config) -> Self {
        self.store = config;
        self
    }

    /// The version of this service. Default is `"latest"`.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds a metadata entry describing this service. Default is none.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Reads the service's options from `config` ([`Settings`](crate::config::Settings):
    /// network, data directory, listen and bootstrap addresses, connection limits, timeouts,
    /// auth policy) when the service starts, over what the builder was given; follows its
    /// `auth` section while the service runs (a rule changed in a file or in the mesh applies
    /// to the next request); and makes it the service's [`Service::config`], whose mesh layer
    /// the service carries.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use micromesh::{Service, config::Config, node::Preset};
    /// let config = Config::builder()
    ///     .set("network", "docs")?
    ///     .set("auth.rules", ["deny service:admin any"])?
    ///     .build()?;
    /// let service = Service::builder("app").preset(Preset::Local).config(config).build().await?;
    /// assert_eq!(service.node().network(), "docs");
    /// assert_eq!(service.auth().rules().len(), 1);
    /// service.stop().await?;
    /// # Ok(()) }
    /// ```
    pub fn config(mut self, config: crate::config::Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Applies a node preset ([`Preset::Local`] for tests). Default is
    /// [`Preset::Production`].
    pub fn preset(mut self, preset: Preset) -> Self {
        self.node = self.node.preset(preset);
        self
    }

    /// The network to join. Default is `"main"`.
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.node = self.node.network(network);
        self
    }

    /// The data directory (identity key and local state). Default is none: a fresh identity on
    /// every start.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.node = self.node.data_dir(dir);
        self
    }

    /// Uses this identity instead of the data directory's.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.node = self.node.identity(identity);
        self
    }

    /// The node's [auth](crate::auth) policy: trusted issuers, rules, default policy, and the
    /// grants it presents.
    pub fn auth(mut self, config: crate::auth::Config) -> Self {
        self.node = self.node.auth(config);
        self
    }

    /// Adds a listen address; the first call replaces the preset's.
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        self.node = self.node.listen(addr);
        self
    }

    /// Adds a bootstrap peer. Default is none.
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.node = self.node.bootstrap(addr);
        self
    }

    /// Adjusts any other node setting.
    ///
    /// ```
    /// # use micromesh::Service;
    /// let builder = Service::builder("x").configure_node(|node| node.mdns(false).relay_server(true));
    /// ```
    pub fn configure_node(mut self, f: impl FnOnce(node::Builder) -> node::Builder) -> Self {
        self.node = f(self.node);
        self
    }

    /// Serves the node's metrics (Prometheus/OpenMetrics text at `/metrics`) and health
    /// (`/health/live`, `/health/ready`) over HTTP on `addr`; port 0 picks a free port, which
    /// [`Service::metrics_addr`] tells. Off by default. See [`crate::debug`].
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use micromesh::{Service, node::Preset};
    ///
    /// let service = Service::builder("greeter")
    ///     .preset(Preset::Local)
    ///     .metrics("127.0.0.1:0".parse()?)
    ///     .build()
    ///     .await?;
    /// assert!(service.metrics_addr().is_some());
    /// # service.stop().await?;
    /// # Ok(()) }
    /// ```
    pub fn metrics(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// How long [`Service::stop`] may take before the node is stopped hard. Default is 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Runs `hook` before the node starts; an error aborts `build`.
    pub fn before_start<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.before_start.push(boxed_hook(hook));
        self
    }

    /// Runs `hook` once the node runs; an error stops the node and fails `build`.
    pub fn after_start<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.after_start.push(boxed_hook(hook));
        self
    }

    /// Runs `hook` when a stop begins, while the node still runs.
    pub fn before_stop<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.before_stop.push(boxed_hook(hook));
        self
    }

    /// Runs `hook` after the node has stopped.
    pub fn after_stop<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.after_stop.push(boxed_hook(hook));
        self
    }

    /// Starts the service: runs the `before_start` hooks, starts the node, runs the
    /// `after_start` hooks.
    ///
    /// # Errors
    ///
    /// [`Error::Hook`] if a start hook fails, [`Error::Node`] if the node cannot start (bad
    /// configuration, unreadable identity, address in use).
    pub async fn build(mut self) -> Result<Service, Error> {
        run_hooks("before_start", &self.hooks.before_start).await?;
        // The builder's auth policy, before the configuration's: the base its `auth` section
        // adds to whenever it changes.
        let base_auth = self.node.auth_config().clone();
        let config = match self.config.take() {
            Some(config) => {
                let settings = crate::config::Settings::from_config(&config)?;
                self.node = settings.apply(self.node);
                config
            }
            None => crate::config::Config::default(),
        };
        // The components that plug into the node are made first: the auth policy (shared by
        // every component) and the store's record keeper, which Kademlia runs with.
        let identity = self.node.resolve_identity()?;
        let has_bootstrap = self.node.has_bootstrap();
        let network = self.node.network_name().to_owned();
        let auth = crate::auth::Auth::new(
            identity.peer_id(),
            network.clone(),
            self.node.auth_config().clone(),
        )?;
        let data_dir = self.node.data_dir_path().map(std::path::Path::to_path_buf);
        let keeper = store::Keeper::open(
            identity.peer_id(),
            network,
            self.node.data_dir_path(),
            store::local::Limits::new(self.store.capacity_bytes()),
            auth.clone(),
        )?;
        let node = self
            .node
            .auth_component(auth)
            .records(Box::new(keeper.clone()))
            .build()
            .await?;
        tracing::info!(
            service = %self.name,
            version = %self.version,
            peer = %node.peer_id(),
            network = %node.network(),
            "service started"
        );
        let mut router = self.router;
        for endpoint in router.endpoints.values_mut() {
            if let Endpoint::Unary { service, .. } = endpoint {
                for layer in self.layers.iter().rev() {
                    *service = layer(service.clone());
                }
            }
        }
        let mut endpoints = self.endpoints;
        for name in &router.order {
            endpoints.push(router.endpoints[name].describe(name));
        }
        // The debug endpoints are served but not announced: every service has them.
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let debug = Arc::new(DebugState {
            name: self.name.clone(),
            version: self.version.clone(),
            started: std::time::SystemTime::now(),
            started_at: std::time::Instant::now(),
            node: node.clone(),
            stopping: stopping.clone(),
            server: std::sync::OnceLock::new(),
        });
        add_debug_endpoints(&mut router, &debug, self.transport.stream_buffer);
        let transport = self.transport;
        let name = self.name.clone();
        let started = async {
            crate::auth::exchange::start(&node).map_err(|e| {
                Error::Node(node::Error::InvalidConfig(format!("auth exchange: {e}")))
            })?;
            let registry = Registry::start(node.clone(), self.registry).await?;
            let selector = Selector::new(self.selector);
            selector.follow(&node);
            let server = server::Server::start(&node, name, Arc::new(router), transport.clone());
            let _ = debug.server.set(server.downgrade());
            let client = Client::new(node.clone(), registry.clone(), selector.clone(), transport);
            let broker = Broker::start(node.clone(), self.broker)?;
            let store = Store::with_keeper(node.clone(), Some(keeper), self.store)?;
            let config_table =
                store.table(crate::config::MESH_DATABASE, crate::config::MESH_TABLE)?;
            config
                .attach(&node, config_table, data_dir.as_deref())
                .await?;
            node.spawn_task(
                "config",
                crate::config::follow_auth(&config, node.auth().clone(), base_auth),
            );
            if self.register {
                let mut registration = Registration::new(self.name.clone())
                    .version(self.version.clone())
                    .with_metadata(self.metadata.clone());
                for endpoint in endpoints {
                    registration = registration.endpoint(endpoint);
                }
                registry.register(registration).await?;
            }
            let http = match self.metrics {
                Some(addr) => {
                    let ready = readiness(node.clone(), has_bootstrap, stopping.clone());
                    Some(crate::debug::HttpEndpoint::serve_with(addr, node.clone(), ready).await?)
                }
                None => None,
            };
            Ok::<_, Error>((
                registry, selector, server, client, broker, store, http, stopping,
            ))
        };
        let (registry, selector, server, client, broker, store, http, stopping) =
            match started.await {
                Ok(parts) => parts,
                Err(e) => {
                    node.shutdown().await;
                    return Err(e);
                }
            };
        let service = Service {
            inner: Arc::new(Inner {
                name: self.name,
                version: self.version,
                metadata: self.metadata,
                node,
                registry,
                selector,
                server,
                client,
                broker,
                store,
                hooks: self.hooks,
                shutdown_timeout: self.shutdown_timeout,
                stopped: Mutex::new(false),
                http,
                stopping,
                config,
            }),
        };
        if let Err(e) = run_hooks("after_start", &service.inner.hooks.after_start).await {
            service.inner.node.shutdown().await;
            return Err(e);
        }
        Ok(service)
    }
}

/// What the debug endpoints of a service read.
struct DebugState {
    name: String,
    version: String,
    started: std::time::SystemTime,
    started_at: std::time::Instant,
    node: Node,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the server runs; weak, since the server's router holds this state.
    server: std::sync::OnceLock<server::WeakServer>,
}

impl DebugState {
    fn health(&self) -> crate::debug::Health {
        let stopping = self.stopping.load(std::sync::atomic::Ordering::Acquire);
        crate::debug::Health {
            status: if stopping { "stopping" } else { "serving" }.into(),
            service: self.name.clone(),
            version: self.version.clone(),
        }
    }

    fn stats(&self) -> crate::debug::Stats {
        let (memory_bytes, threads) = crate::debug::process();
        let server = self.server.get().and_then(server::WeakServer::upgrade);
        let (requests, errors, in_flight) =
            server.as_ref().map_or((0, 0, 0), server::Server::counts);
        crate::debug::Stats {
            service: self.name.clone(),
            version: self.version.clone(),
            peer_id: self.node.peer_id().to_string(),
            started_unix_ms: self
                .started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_secs: self.started_at.elapsed().as_secs(),
            memory_bytes,
            threads,
            requests,
            errors,
            in_flight,
            connections: self.node.connected_count() as u64,
            endpoints: server
                .as_ref()
                .map(server::Server::totals)
                .unwrap_or_default()
                .into_iter()
                .map(|totals| crate::debug::EndpointStats {
                    method: totals.method,
                    calls: totals.calls,
                    errors: totals.errors,
                    latency_buckets: totals.buckets,
                })
                .collect(),
        }
    }
}

/// Adds `Debug.Health`, `Debug.Stats`, `Debug.Log` and `Debug.Trace` to `router`, unless the
/// service serves endpoints of those names itself.
fn add_debug_endpoints(router: &mut Router, debug: &Arc<DebugState>, buffer: usize) {
    use crate::debug::{
        HEALTH, LOG, LogRecord, LogRequest, STATS, SpanRecord, TRACE, TraceRequest,
    };

    if !router.endpoints.contains_key(TRACE) {
        let trace = |_: Context, request: TraceRequest| async move {
            let Some(ring) = crate::debug::spans::ring() else {
                return Err(Status::new(
                    crate::status::Code::Other(501),
                    "this process does not keep its spans: add micromesh::debug::trace_layer() \
                     to its tracing subscriber",
                ));
            };
            if let Some(id) = &request.trace_id
                && !crate::trace::is_trace_id(id)
            {
                return Err(Status::bad_request(format!(
                    "{id:?} is not a trace id: 32 lower-case hex digits, not all zero"
                )));
            }
            let limit = request
                .limit
                .map_or(100, |n| n as usize)
                .min(crate::debug::SPAN_CAPACITY);
            Ok::<Vec<SpanRecord>, Status>(ring.recent(request.trace_id.as_deref(), limit))
        };
        router.insert(TRACE.into(), server::handler_unary(trace));
    }

    if !router.endpoints.contains_key(HEALTH) {
        let debug = debug.clone();
        let health = move |_: Context, _: ()| {
            let health = debug.health();
            async move { Ok::<_, Status>(health) }
        };
        router.insert(HEALTH.into(), server::handler_unary(health));
    }
    if !router.endpoints.contains_key(STATS) {
        let debug = debug.clone();
        let stats = move |_: Context, _: ()| {
            let stats = debug.stats();
            async move { Ok::<_, Status>(stats) }
        };
        router.insert(STATS.into(), server::handler_unary(stats));
    }
    if !router.endpoints.contains_key(LOG) {
        let log = |_: Context, request: LogRequest| async move {
            let Some(ring) = crate::debug::logs::ring() else {
                return Err(Status::new(
                    crate::status::Code::Other(501),
                    "this process does not keep its logs: add micromesh::debug::log_layer() \
                     to its tracing subscriber",
                ));
            };
            let level = match request.level.as_deref() {
                None => tracing::Level::INFO,
                Some(name) => crate::debug::parse_level(name).ok_or_else(|| {
                    Status::bad_request(format!(
                        "unknown log level {name:?}; use error, warn, info, debug or trace"
                    ))
                })?,
            };
            let limit = request
                .limit
                .map_or(100, |n| n as usize)
                .min(crate::debug::LOG_CAPACITY);
            let (recent, follow) = ring.recent(level, limit);
            let recent = futures::stream::iter(recent.into_iter().map(Ok::<LogRecord, Status>));
            let follow = request.follow.then(|| {
                futures::stream::unfold(follow, move |mut follow| async move {
                    loop {
                        match follow.recv().await {
                            Ok(record) if crate::debug::logs::severe_enough(&record, level) => {
                                return Some((Ok(record), follow));
                            }
                            Ok(_) => {}
                            // A slow reader misses records, and is told how many.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                                return Some((Ok(LogRecord::missed(missed)), follow));
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                })
            });
            use futures::StreamExt as _;
            Ok(recent.chain(futures::stream::iter(follow).flatten()))
        };
        router.insert(LOG.into(), server::handler_server_stream(buffer, log));
    }
}

/// What `/health/ready` answers: ready once started (the service is announced by then), unless
/// it is stopping, or was given bootstrap peers and is connected to none.
fn readiness(
    node: Node,
    has_bootstrap: bool,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) -> crate::debug::http::Readiness {
    Arc::new(move || {
        if stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err("the service is stopping".into());
        }
        if has_bootstrap && node.connected_count() == 0 {
            return Err("connected to no peer of the mesh".into());
        }
        Ok(())
    })
}

fn boxed_hook<F, Fut>(hook: F) -> Hook
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    Arc::new(move || Box::pin(hook()) as HookFuture)
}

struct Inner {
    name: String,
    version: String,
    metadata: Metadata,
    node: Node,
    registry: Registry,
    selector: Selector,
    server: server::Server,
    client: Client,
    broker: Broker,
    store: Store,
    hooks: Hooks,
    shutdown_timeout: Duration,
    stopped: Mutex<bool>,
    /// The metrics and health listener, if asked for.
    http: Option<crate::debug::HttpEndpoint>,
    /// Set when the service begins to stop: no longer ready.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    config: crate::config::Config,
}

/// The last handle is gone without [`Service::stop`]: the service stops in the background, as
/// `stop` would but without its hooks and without waiting for calls in flight.
impl Drop for Inner {
    fn drop(&mut self) {
        if *self.stopped.get_mut() {
            return;
        }
        let (node, registry, deadline) = (
            self.node.clone(),
            self.registry.clone(),
            self.shutdown_timeout,
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::debug!(service = %self.name, "every handle dropped: stopping");
                runtime.spawn(async move {
                    let graceful = async {
                        if let Err(e) = registry.leave().await {
                            tracing::debug!("cannot announce the leave: {e}");
                        }
                        node.shutdown().await;
                    };
                    if tokio::time::timeout(deadline, graceful).await.is_err() {
                        node.kill();
                    }
                });
            }
            // Outside a runtime nothing can be said to the peers: the node ends at once.
            Err(_) => node.kill(),
        }
    }
}

/// A running service. Cheap to clone; every clone is the same service.
///
/// Dropping the last clone without [`Service::stop`] stops the service in the background: its
/// registry entries are withdrawn and the node says goodbye and closes its connections, but no
/// stop hook runs and calls in flight are cut. Handles taken from it ([`Service::client`],
/// [`Service::node`], …) fail with a `Stopped` error from then on. Call [`Service::stop`] (or
/// [`Service::run`]) for a graceful stop.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("peer_id", &self.inner.node.peer_id())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Starts configuring a service called `name`.
    pub fn builder(name: impl Into<String>) -> Builder {
        Builder::new(name.into())
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The service's version.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The service's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// Where the metrics and health are served over HTTP, if [`Builder::metrics`] asked for it.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner
            .http
            .as_ref()
            .map(crate::debug::HttpEndpoint::local_addr)
    }

    /// The node this service runs on.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// The registry: register, look up and watch services across the mesh.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The selector: picks the node of a service for each call, and learns from outcomes.
    pub fn selector(&self) -> &Selector {
        &self.inner.selector
    }

    /// The client: call any service of the mesh by name.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The broker: publish and subscribe, broadcast or in queue groups.
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// The store: the mesh's replicated key-value store, on the configured database and table
    /// ([`Store::table`] for others).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The configuration ([`crate::config`]): the one given to
    /// [`Builder::config`], or one with the mesh layer only. This service's node carries its
    /// mesh layer.
    pub fn config(&self) -> &crate::config::Config {
        &self.inner.config
    }

    /// Auth: this node's rules, grants and revocations ([`crate::auth`]).
    pub fn auth(&self) -> &crate::auth::Auth {
        self.node().auth()
    }

    /// The peer id of this service's node.
    pub fn peer_id(&self) -> PeerId {
        self.inner.node.peer_id()
    }

    /// Serves until ctrl-c or SIGTERM, then stops gracefully (see [`Service::stop`]).
    ///
    /// # Errors
    ///
    /// As [`Service::stop`], and [`Error::Signal`] if signals cannot be listened for.
    pub async fn run(&self) -> Result<(), Error> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `signal` completes (or the node stops by itself), then stops gracefully.
    ///
    /// # Errors
    ///
    /// As [`Service::stop`]; and the signal's own error.
    pub async fn run_until<F>(&self, signal: F) -> Result<(), Error>
    where
        F: Future<Output = Result<(), Error>>,
    {
        let outcome = tokio::select! {
            result = signal => result,
            reason = self.inner.node.stopped() => {
                tracing::warn!(service = %self.inner.name, "the node stopped: {reason}");
                Ok(())
            }
        };
        let stopped = self.stop().await;
        outcome.and(stopped)
    }

    /// Stops gracefully: runs the `before_stop` hooks, announces the leave of its registry
    /// entries (every view drops them at once), refuses new calls with 503 (callers retry on
    /// other nodes) and waits for the calls in flight to finish, shuts the node down (closing
    /// every connection), and runs the `after_stop` hooks, all within the shutdown timeout.
    /// Calling it again returns at once.
    ///
    /// # Errors
    ///
    /// [`Error::Hook`] if a stop hook fails (the stop still completes), and
    /// [`Error::ShutdownTimeout`] if the deadline passed (the node is then stopped hard).
    pub async fn stop(&self) -> Result<(), Error> {
        let mut stopped = self.inner.stopped.lock().await;
        if *stopped {
            return Ok(());
        }
        *stopped = true;
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let deadline = self.inner.shutdown_timeout;
        let graceful = async {
            let before = run_hooks("before_stop", &self.inner.hooks.before_stop).await;
            if let Err(e) = self.inner.registry.leave().await {
                tracing::debug!("cannot announce the leave: {e}");
            }
            if !self.inner.server.drain(deadline).await {
                tracing::warn!(service = %self.inner.name, "calls still in flight at the shutdown deadline");
            }
            if !self.inner.broker.flush(deadline).await {
                tracing::warn!(
                    service = %self.inner.name,
                    pending = self.inner.broker.pending(),
                    "queue-group messages still unacknowledged at the shutdown deadline"
                );
            }
            self.inner.node.shutdown().await;
            let after = run_hooks("after_stop", &self.inner.hooks.after_stop).await;
            before.and(after)
        };
        match tokio::time::timeout(deadline, graceful).await {
            Ok(result) => {
                tracing::info!(service = %self.inner.name, "service stopped");
                result
            }
            Err(_) => {
                self.inner.node.kill();
                Err(Error::ShutdownTimeout(deadline))
            }
        }
    }

    /// Marks the service as stopped without stopping anything, so that dropping the last handle
    /// does not stop it either: for [`crate::testing::Process`], whose runtime dies with the
    /// node in it, where a goodbye would spoil the simulated crash.
    #[cfg(feature = "testing")]
    pub(crate) fn abandon(&self) {
        if let Ok(mut stopped) = self.inner.stopped.try_lock() {
            *stopped = true;
        }
    }
}

/// Completes on ctrl-c, or on SIGTERM on Unix.
pub async fn shutdown_signal() -> Result<(), Error> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map_err(Error::Signal),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(Error::Signal)
    }
}
