//! Serving calls: accept streams, read the head, run the handler, write the answer.

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{AsyncReadExt as _, AsyncWriteExt as _, FutureExt as _};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt as _;
use tracing::Instrument as _;

use super::{Context, Endpoint, Request, SharedRouter, status_of};
use crate::{
    Metadata, PeerId, Status,
    codec::ContentType,
    node::Node,
    trace::{TRACEPARENT, TraceParent},
    transport::{
        self,
        frame::{self, ReadError},
        metrics::{CALLER_GONE, CallMetrics, OTHER_METHOD, Side},
        wire::{DataFrame, Frame, Head, Trailer},
    },
};

/// The id of statuses the server itself produces (not a handler).
const SERVER_ID: &str = "micromesh.server";

#[derive(Clone, Default)]
struct Metrics {
    calls: Counter,
    failed: Counter,
    refused: Counter,
    streams_refused: Counter,
    streams: Counter,
    streams_open: Gauge,
}

struct Inner {
    name: String,
    router: SharedRouter,
    config: transport::Config,
    in_flight: AtomicUsize,
    idle: Notify,
    draining: AtomicBool,
    per_peer: Mutex<HashMap<PeerId, usize>>,
    /// Call streams open per peer, counted before a stream gets a task.
    streams_per_peer: Mutex<HashMap<PeerId, usize>>,
    metrics: Metrics,
    /// Latency and calls in flight by endpoint and status (`rpc_server_*`).
    calls: CallMetrics,
    auth: crate::auth::Auth,
    /// The node, which owns the tasks serving calls.
    node: crate::node::Node,
}

/// Counts an open call stream of a peer until dropped (its task ended, however it ended).
struct StreamGuard {
    inner: Arc<Inner>,
    peer: PeerId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.inner.metrics.streams_open.dec();
        let mut open = self
            .inner
            .streams_per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Counts a call in flight (in total and per peer) until dropped.
struct CallGuard {
    inner: Arc<Inner>,
    peer: PeerId,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut per_peer = self
            .inner
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
        drop(per_peer);
        if self.inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// The serving side of a service. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Server {
    inner: Arc<Inner>,
}

/// See [`Server::downgrade`].
#[derive(Clone)]
pub(crate) struct WeakServer(std::sync::Weak<Inner>);

impl WeakServer {
    /// The server, unless it is gone.
    pub(crate) fn upgrade(&self) -> Option<Server> {
        self.0.upgrade().map(|inner| Server { inner })
    }
}

impl Server {
    /// Starts accepting calls on the node's RPC protocol.
    pub(crate) fn start(
        node: &Node,
        name: String,
        router: SharedRouter,
        config: transport::Config,
    ) -> Self {
        let metrics = Metrics::default();
        node.register_metrics("server", |registry| {
            registry.register("calls", "Calls received", metrics.calls.clone());
            registry.register(
                "calls_failed",
                "Calls answered with an error status",
                metrics.failed.clone(),
            );
            registry.register(
                "calls_refused",
                "Calls refused before a handler ran (limits, draining, unknown endpoint, bad input)",
                metrics.refused.clone(),
            );
            registry.register(
                "streams",
                "Call streams accepted (a stream carries one call, or unary calls one after another)",
                metrics.streams.clone(),
            );
            registry.register(
                "streams_refused",
                "Call streams refused on arrival: the peer had too many open",
                metrics.streams_refused.clone(),
            );
            registry.register(
                "streams_open",
                "Call streams open now, in a call or waiting for the next one",
                metrics.streams_open.clone(),
            );
        });
        let calls = {
            let registry = node.metrics_registry();
            let mut registry = registry.lock().unwrap_or_else(|e| e.into_inner());
            CallMetrics::register(&mut registry, Side::Server, config.call_metrics)
        };
        let server = Self {
            inner: Arc::new(Inner {
                calls,
                name,
                router,
                config,
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
                draining: AtomicBool::new(false),
                per_peer: Mutex::new(HashMap::new()),
                streams_per_peer: Mutex::new(HashMap::new()),
                metrics,
                auth: node.auth().clone(),
                node: node.clone(),
            }),
        };
        match node.accept(transport::protocol(node.network())) {
            Ok(mut incoming) => {
                let server = server.clone();
                node.spawn_task("server", async move {
                    // Ends when the node stops and drops the queue's sender.
                    while let Some((peer, stream)) = incoming.recv().await {
                        server.spawn_call(peer, stream);
                    }
                });
            }
            Err(e) => tracing::error!("RPC cannot be served: {e}"),
        }
        server
    }

    /// Serves a call stream in a task of its own, once it is counted: a peer may keep twice as
    /// many streams open as it may have calls in flight (the rest wait for their next call);
    /// beyond, a new stream is reset at once, before it costs a task.
    fn spawn_call(&self, peer: PeerId, stream: libp2p::Stream) {
        let inner = self.inner.clone();
        let limit = inner.config.max_calls_per_peer.saturating_mul(2).max(1);
        {
            let mut open = inner
                .streams_per_peer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = open.entry(peer).or_default();
            if *n >= limit {
                drop(open);
                inner.metrics.streams_refused.inc();
                tracing::debug!(%peer, "call stream refused: {limit} open from this peer");
                return;
            }
            *n += 1;
        }
        let span = tracing::debug_span!("calls", %peer);
        inner.metrics.streams.inc();
        inner.metrics.streams_open.inc();
        let node = inner.node.clone();
        let counted = StreamGuard {
            inner: inner.clone(),
            peer,
        };
        node.spawn_task(
            "server",
            async move {
                let _counted = counted;
                serve(&inner, peer, stream).await;
            }
            .instrument(span),
        );
    }

    /// A handle that does not keep the server alive, for what the server's own router holds
    /// (the debug endpoints): a strong one there would be a cycle, and the server and its node
    /// would never be freed.
    pub(crate) fn downgrade(&self) -> WeakServer {
        WeakServer(Arc::downgrade(&self.inner))
    }

    /// The calls served so far, by endpoint.
    pub(crate) fn totals(&self) -> Vec<crate::transport::metrics::MethodTotals> {
        self.inner.calls.totals()
    }

    /// Calls received, calls that failed or were refused, and calls under way.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        let metrics = &self.inner.metrics;
        (
            metrics.calls.get(),
            metrics.failed.get() + metrics.refused.get(),
            self.inner.in_flight.load(Ordering::Acquire) as u64,
        )
    }

    /// Refuses new calls (with 503, so callers retry elsewhere) and waits until the calls in
    /// flight have finished, or `timeout` has passed. Returns whether every call finished.
    pub(crate) async fn drain(&self, timeout: Duration) -> bool {
        self.inner.draining.store(true, Ordering::Release);
        let wait = async {
            loop {
                let idle = self.inner.idle.notified();
                if self.inner.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

async fn write_frame<W: futures::AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    frame.put(&mut buf)?;
    frame::write_buf(writer, &buf).await
}

/// Writes the trailer and closes. A status without an id gets `id`: the service's name for
/// a handler's status, the server's for a refusal.
async fn write_trailer<W: futures::AsyncWrite + Unpin>(writer: &mut W, status: &Status, id: &str) {
    let status = if status.id().is_empty() && !status.is_ok() {
        status.clone().with_id(id)
    } else {
        status.clone()
    };
    let _ = write_frame(
        writer,
        &Frame::Trailer(Trailer::from_status(&status, Metadata::new())),
    )
    .await;
    let _ = writer.close().await;
}

/// Counts a call in flight, and says whether it must be refused: while draining, or over a
/// limit.
fn admit(inner: &Arc<Inner>, peer: PeerId) -> (CallGuard, Option<Status>) {
    inner.in_flight.fetch_add(1, Ordering::AcqRel);
    let over_peer_limit = {
        let mut per_peer = inner.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_peer.entry(peer).or_default();
        *n += 1;
        *n > inner.config.max_calls_per_peer
    };
    let guard = CallGuard {
        inner: inner.clone(),
        peer,
    };
    let refusal = if inner.draining.load(Ordering::Acquire) {
        Some(Status::unavailable("the service is shutting down"))
    } else if over_peer_limit {
        Some(Status::too_many_requests(format!(
            "more than {} calls in flight from this peer",
            inner.config.max_calls_per_peer
        )))
    } else if inner.in_flight.load(Ordering::Acquire) > inner.config.max_calls {
        Some(Status::unavailable("the server is at its call limit"))
    } else {
        None
    };
    (guard, refusal)
}

/// Serves the calls of one stream: one call, or a sequence of unary calls, each begun once the
/// one before it succeeded.
async fn serve(inner: &Arc<Inner>, peer: PeerId, mut stream: libp2p::Stream) {
    let mut wait = Wait::Head;
    // The caller's id as text, for the call spans: written out once per stream, and only if
    // a span is kept.
    let mut peer_text: Option<String> = None;
    loop {
        let head = match read_head(inner, &mut stream, wait).await {
            Ok(head) => head,
            Err(Unread::Refuse(status)) => {
                inner.metrics.calls.inc();
                inner.metrics.refused.inc();
                write_trailer(&mut stream, &status, SERVER_ID).await;
                return;
            }
            Err(Unread::Idle) => {
                // Idle too long: say so with `end`, which the caller takes as "this stream
                // carried no call of yours", so a call crossing it goes on a new stream.
                let _ = write_frame(&mut stream, &Frame::End).await;
                let _ = stream.close().await;
                return;
            }
            Err(Unread::Gone) => return,
        };
        inner.metrics.calls.inc();
        let (guard, refusal) = admit(inner, peer);
        // This call's span continues the caller's trace.
        let trace = TraceParent::continuing(head.metadata.get(TRACEPARENT));
        // OpenTelemetry's RPC attributes, and the W3C ids of this call's span (written out only
        // for a span some layer keeps).
        let call = tracing::debug_span!(
            "call",
            otel.kind = "server",
            rpc.system = "micromesh",
            rpc.service = %inner.name,
            rpc.method = %head.endpoint,
            rpc.response.status_code = tracing::field::Empty,
            trace_id = %trace.0.trace_id_hex(),
            span_id = %trace.0.span_id_hex(),
            parent_span_id = trace.1.as_ref().map(|p| tracing::field::display(p.span_id_hex())),
            peer = peer_text.get_or_insert_with(|| peer.to_string()).as_str(),
        );
        let method = match inner.router.endpoints.contains_key(&head.endpoint) {
            true => head.endpoint.as_str(),
            false => OTHER_METHOD,
        };
        let counted = inner.calls.start(&inner.name, method);
        let (reusable, code) = serve_call(inner, peer, &mut stream, head, trace, refusal)
            .instrument(call.clone())
            .await;
        call.record("rpc.response.status_code", code);
        counted.finish(code);
        drop(guard);
        if !reusable {
            return;
        }
        wait = Wait::Idle;
    }
}

/// What a server waits for when it reads a head.
#[derive(Clone, Copy)]
enum Wait {
    /// The first call of a new stream, for up to the head timeout.
    Head,
    /// The next call on a kept stream, for up to the idle timeout.
    Idle,
}

/// Why no head was read.
enum Unread {
    /// Answer with this status and close.
    Refuse(Status),
    /// A kept stream carried no call for the idle timeout.
    Idle,
    /// The caller went away before saying anything: nothing to answer.
    Gone,
}

/// Reads the head of a call, or says why it cannot.
async fn read_head(inner: &Inner, stream: &mut libp2p::Stream, wait: Wait) -> Result<Head, Unread> {
    let limit = match wait {
        Wait::Head => inner.config.head_timeout,
        Wait::Idle => inner.config.idle_timeout,
    };
    let read = tokio::time::timeout(
        limit,
        transport::wire::read(stream, inner.config.max_message),
    )
    .await;
    let refuse = |status| Err(Unread::Refuse(status));
    match read {
        Err(_) => match wait {
            Wait::Head => refuse(Status::timeout("no call head arrived in time")),
            Wait::Idle => Err(Unread::Idle),
        },
        Ok(Err(ReadError::TooLarge { size, max })) => refuse(Status::payload_too_large(format!(
            "the call head of {size} bytes exceeds the server's limit of {max} bytes"
        ))),
        Ok(Err(ReadError::Eof | ReadError::Io(_))) => Err(Unread::Gone),
        Ok(Ok(decoded)) => match decoded {
            Ok(Frame::Head(head)) => Ok(head),
            Ok(_) => refuse(Status::bad_request("a call must begin with a head frame")),
            Err(e) => refuse(Status::bad_request(format!("malformed frame: {e}"))),
        },
    }
}

/// Serves one call whose head was read. Returns whether the stream may carry another call
/// (only after a unary call that succeeded; after anything else it has been closed), and the
/// call's status code.
async fn serve_call(
    inner: &Arc<Inner>,
    peer: PeerId,
    stream: &mut libp2p::Stream,
    head: Head,
    trace: (TraceParent, Option<TraceParent>),
    refusal: Option<Status>,
) -> (bool, u16) {
    let received = Instant::now();
    let checked = match refusal {
        Some(status) => Err(status),
        None => prepare(inner, &head),
    };
    let endpoint = match checked {
        Ok(endpoint) => endpoint,
        Err(status) => {
            inner.metrics.refused.inc();
            write_trailer(stream, &status, SERVER_ID).await;
            return (false, status.code().as_u16());
        }
    };
    // Auth: the caller's verified peer id and grants against this node's rules, before the
    // handler runs.
    let resources = [
        crate::auth::Resource::service(inner.name.as_str()),
        crate::auth::Resource::endpoint(&inner.name, &head.endpoint),
    ];
    let roles = match inner.auth.authorize_peer(peer, &resources).await {
        Ok(roles) => roles,
        Err(denied) => {
            inner.metrics.refused.inc();
            tracing::debug!(%peer, endpoint = %head.endpoint, "call refused: {denied}");
            let status = denied.status();
            write_trailer(stream, &status, SERVER_ID).await;
            return (false, status.code().as_u16());
        }
    };
    let codec = ContentType::from_mime(&head.content_type).expect("checked by prepare");
    let deadline = head
        .timeout_ms
        .map(|ms| received + Duration::from_millis(ms));
    let context = Context::new(
        inner.name.clone(),
        head.endpoint.clone(),
        peer,
        head.metadata,
        deadline,
        roles,
        trace,
    );
    tracing::trace!(endpoint = %head.endpoint, "call");
    let status = match endpoint {
        Endpoint::Unary { service, .. } => {
            match serve_unary(inner, stream, service, context, codec, deadline).await {
                Answer::Sent => return (true, crate::status::Code::Ok.as_u16()),
                Answer::Gone => return (false, CALLER_GONE),
                Answer::Status(status) => status,
            }
        }
        Endpoint::Stream { handler, .. } => {
            let (reader, writer) = futures::AsyncReadExt::split(stream);
            let code = serve_stream(inner, reader, writer, handler, context, codec, deadline).await;
            return (false, code);
        }
    };
    if !status.is_ok() {
        inner.metrics.failed.inc();
    }
    write_trailer(stream, &status, &inner.name).await;
    (false, status.code().as_u16())
}

/// Checks a head against the router: the endpoint, its shape, the codec.
fn prepare(inner: &Inner, head: &Head) -> Result<Endpoint, Status> {
    if head.service != inner.name {
        return Err(Status::not_found(format!(
            "service {:?} is not served here (this node serves {:?})",
            head.service, inner.name
        )));
    }
    let Some(endpoint) = inner.router.endpoints.get(&head.endpoint) else {
        return Err(Status::not_found(format!(
            "service {:?} has no endpoint {:?}",
            inner.name, head.endpoint
        )));
    };
    if endpoint.kind() != head.kind {
        return Err(Status::bad_request(format!(
            "endpoint {:?} is {:?}, but was called as {:?}",
            head.endpoint,
            endpoint.kind(),
            head.kind
        )));
    }
    ContentType::from_mime(&head.content_type).map_err(|e| Status::bad_request(e.to_string()))?;
    Ok(endpoint.clone())
}

fn time_left(deadline: Option<Instant>) -> Duration {
    deadline.map_or(Duration::MAX, |d| {
        d.saturating_duration_since(Instant::now())
    })
}

/// How a unary call was answered.
enum Answer {
    /// The response and its 200 trailer were written; the stream stays open.
    Sent,
    /// The caller is gone (it closed or reset its stream, or broke the protocol while it
    /// waited): nothing more to write.
    Gone,
    /// Answer with this status.
    Status(Status),
}

/// Serves a unary call. While the handler runs, the server watches the stream: a caller that
/// gives up (its stream closes or resets) drops the handler.
async fn serve_unary(
    inner: &Inner,
    stream: &mut libp2p::Stream,
    service: super::BoxedUnary,
    context: Context,
    codec: ContentType,
    deadline: Option<Instant>,
) -> Answer {
    let max = inner.config.max_message;
    let body = match read_body(stream, max).await {
        Ok(body) => body,
        Err(Some(status)) => return Answer::Status(status),
        Err(None) => return Answer::Gone,
    };
    let call = AssertUnwindSafe(service.oneshot(Request {
        context,
        content_type: codec,
        body,
    }))
    .catch_unwind();
    let mut probe = [0u8; 1];
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(time_left(deadline), call) => match outcome {
            Err(_) => Err(Status::timeout("the deadline passed while the handler ran")),
            Ok(Err(panic)) => Err(panicked(panic)),
            Ok(Ok(result)) => result.map_err(status_of),
        },
        // The caller sends nothing until the trailer: whatever this read returns (an end, a
        // reset, stray bytes) means the call is abandoned.
        _ = stream.read(&mut probe) => {
            tracing::debug!("the caller abandoned the call");
            let _ = stream.close().await;
            return Answer::Gone;
        }
    };
    let response = match outcome {
        Ok(response) => response,
        Err(status) => return Answer::Status(status),
    };
    if response.body.len() > max {
        return Answer::Status(Status::internal(format!(
            "the response of {} bytes exceeds the limit of {max} bytes",
            response.body.len()
        )));
    }
    // The reply and its trailer leave in one write.
    let mut buf = Vec::new();
    let written = transport::wire::put_data(&mut buf, &response.body).and_then(|()| {
        Frame::Trailer(Trailer::from_status(
            &Status::new(crate::status::Code::Ok, ""),
            response.metadata,
        ))
        .put(&mut buf)
    });
    if let Err(e) = written {
        return Answer::Status(Status::internal(format!("cannot frame the response: {e}")));
    }
    match frame::write_buf(stream, &buf).await {
        Ok(()) => Answer::Sent,
        Err(_) => Answer::Gone,
    }
}

/// Reads the single data frame and the end frame of a unary request.
async fn read_body(stream: &mut libp2p::Stream, max: usize) -> Result<Vec<u8>, Option<Status>> {
    let mut body = None;
    loop {
        match transport::wire::read(stream, max).await {
            Ok(decoded) => match decoded {
                Ok(Frame::Data(data)) if body.is_none() => body = Some(data),
                Ok(Frame::End) => {
                    return body.ok_or_else(|| {
                        Some(Status::bad_request("a unary call needs a request body"))
                    });
                }
                Ok(_) => {
                    return Err(Some(Status::bad_request(
                        "a unary call sends one data frame, then end",
                    )));
                }
                Err(e) => return Err(Some(Status::bad_request(format!("malformed frame: {e}")))),
            },
            Err(ReadError::TooLarge { size, max }) => {
                return Err(Some(Status::payload_too_large(format!(
                    "the request of {size} bytes exceeds the server's limit of {max} bytes"
                ))));
            }
            Err(_) => return Err(None),
        }
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> Status {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!("a handler panicked: {msg}");
    Status::internal("the handler panicked")
}

async fn serve_stream<R, W>(
    inner: &Inner,
    mut reader: R,
    mut writer: W,
    handler: super::StreamHandler,
    context: Context,
    codec: ContentType,
    deadline: Option<Instant>,
) -> u16
where
    R: futures::AsyncRead + Unpin,
    W: futures::AsyncWrite + Unpin,
{
    let max = inner.config.max_message;
    let buffer = inner.config.stream_buffer.max(1);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(buffer);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(buffer);
    // Requests: frames in, bodies to the handler, until the caller's end frame.
    let read = async move {
        loop {
            match transport::wire::read(&mut reader, max).await {
                Ok(decoded) => match decoded {
                    Ok(Frame::Data(data)) => {
                        if in_tx.send(data).await.is_err() {
                            // The handler reads no more; the caller may still be sending.
                            return Ok(None);
                        }
                    }
                    Ok(Frame::End) => return Ok(Some(reader)),
                    Ok(_) => {
                        return Err(Status::bad_request("unexpected frame in a request stream"));
                    }
                    Err(e) => return Err(Status::bad_request(format!("malformed frame: {e}"))),
                },
                Err(ReadError::TooLarge { size, max }) => {
                    return Err(Status::payload_too_large(format!(
                        "a request message of {size} bytes exceeds the server's limit of {max} bytes"
                    )));
                }
                Err(_) => {
                    return Err(Status::bad_request(
                        "the caller's stream ended without an end frame",
                    ));
                }
            }
        }
    };
    let run = AssertUnwindSafe(handler(context, codec, in_rx, out_tx)).catch_unwind();
    // Responses: bodies from the handler out as data frames, as they come.
    let write = async {
        while let Some(body) = out_rx.recv().await {
            let len = DataFrame::body_len(&body);
            if len > max {
                return Err(Status::internal(format!(
                    "a response message of {len} bytes exceeds the limit of {max} bytes"
                )));
            }
            let data = DataFrame::new(body)
                .map_err(|e| Status::internal(format!("cannot frame a response: {e}")))?;
            if frame::write_buf(&mut writer, data.bytes()).await.is_err() {
                return Err(Status::unavailable("the caller went away"));
            }
        }
        Ok(())
    };
    let respond = async {
        let (run, write) = tokio::join!(run, write);
        let run = match run {
            Ok(result) => result,
            Err(panic) => Err(panicked(panic)),
        };
        run.and(write)
    };
    let all = async {
        let mut read = std::pin::pin!(read);
        let mut respond = std::pin::pin!(respond);
        // The handler may finish before the caller ends its side: then the call is over. A
        // broken request stream ends the call at once (the handler is dropped).
        tokio::select! {
            result = &mut respond => Some(result),
            read = &mut read => match read {
                // The caller sends nothing after its end frame: whatever a read returns now
                // (the stream's end, a reset) means it went away, and the handler is dropped
                // instead of running until its next response finds nobody (a follower of
                // logs might wait for hours).
                Ok(Some(mut reader)) => {
                    let mut probe = [0u8; 1];
                    tokio::select! {
                        result = &mut respond => Some(result),
                        _ = reader.read(&mut probe) => None,
                    }
                }
                Ok(None) => Some(respond.await),
                Err(status) => Some(Err(status)),
            },
        }
    };
    let status = match tokio::time::timeout(time_left(deadline), all).await {
        Ok(Some(Ok(()))) => Status::new(crate::status::Code::Ok, ""),
        Ok(Some(Err(status))) => status,
        Ok(None) => {
            tracing::debug!("the caller abandoned the stream");
            return CALLER_GONE;
        }
        Err(_) => Status::timeout("the deadline passed during the stream"),
    };
    if !status.is_ok() {
        inner.metrics.failed.inc();
    }
    write_trailer(&mut writer, &status, &inner.name).await;
    status.code().as_u16()
}
