//! Unary calls, and the steps every call shares: resolve, select, connect.
//!
//! A unary call goes on a stream kept from an earlier call to the same peer when there is one
//! (see [`super::pool`]), else on a new stream.

use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use serde::{Serialize, de::DeserializeOwned};

use super::{CallOptions, Client, Error};
use crate::{
    Multiaddr, PeerId,
    codec::Codec as _,
    registry,
    selector::{Outcome, Selected},
    status::Code,
    trace::{TRACEPARENT, TraceParent},
    transport::{
        self,
        frame::{self, ReadError},
        wire::{CallKind, Frame, Head},
    },
};

impl Client {
    /// Calls `endpoint` of `service` with the default options and decodes the response.
    ///
    /// # Errors
    ///
    /// An [`Error`] naming the phase that failed and the peer tried; a handler's own error
    /// is [`Error::Remote`] with its status.
    pub async fn call<Req, Resp>(
        &self,
        service: &str,
        endpoint: &str,
        request: &Req,
    ) -> Result<Resp, Error>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.call_with(service, endpoint, request, CallOptions::default())
            .await
    }

    /// Calls `endpoint` of `service` with these options.
    ///
    /// # Errors
    ///
    /// As [`Client::call`].
    pub async fn call_with<Req, Resp>(
        &self,
        service: &str,
        endpoint: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, Error>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let codec = options.content_type;
        let body = codec
            .encode(request)
            .map_err(|e| Error::Encode(e.to_string()))?;
        let bytes = self.call_bytes(service, endpoint, body, &options).await?;
        codec.decode(&bytes).map_err(|e| Error::Receive {
            peer: options.peer.unwrap_or_else(|| self.inner.node.peer_id()),
            reason: format!("cannot decode the response: {e}"),
        })
    }

    /// Calls with an encoded body (in `options`' content type) and returns the encoded
    /// response: for gateways and tools that relay bodies they do not decode.
    ///
    /// # Errors
    ///
    /// As [`Client::call`].
    pub async fn call_bytes(
        &self,
        service: &str,
        endpoint: &str,
        body: Vec<u8>,
        options: &CallOptions,
    ) -> Result<Vec<u8>, Error> {
        let max = self.inner.config.max_message;
        if body.len() > max {
            return Err(Error::Encode(format!(
                "the request is {} bytes, the limit is {max} bytes",
                body.len()
            )));
        }
        let started = Instant::now();
        let deadline = options.deadline_from(started);
        let counted = self.inner.calls.start(service, endpoint);
        // The span times the call and names the peer; it is not entered (entering at every
        // poll would cost more than the rest of it).
        let (trace, span) = client_span(service, endpoint, options);
        let outcome = self
            .call_with_retries(
                service,
                endpoint,
                &body,
                options,
                (&trace, &span),
                started,
                deadline,
            )
            .await;
        let code = match &outcome {
            Ok(_) => crate::status::Code::Ok.as_u16(),
            Err(e) => e.status().code().as_u16(),
        };
        span.record("rpc.response.status_code", code);
        counted.finish(code);
        outcome
    }

    /// The attempts of a unary call: the first, and retries while the options allow them.
    #[allow(clippy::too_many_arguments)]
    async fn call_with_retries(
        &self,
        service: &str,
        endpoint: &str,
        body: &[u8],
        options: &CallOptions,
        trace: (&TraceParent, &tracing::Span),
        started: Instant,
        deadline: Instant,
    ) -> Result<Vec<u8>, Error> {
        let mut tried = Vec::new();
        let mut attempt = 0;
        loop {
            let outcome = tokio::time::timeout_at(
                deadline.into(),
                self.attempt(
                    service, endpoint, body, options, trace, &mut tried, deadline,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    peer: tried.last().copied(),
                    after: deadline.saturating_duration_since(started),
                })
            });
            match outcome {
                Err(e) if attempt < options.retries && (options.retry)(&e) => {
                    let wait = options.backoff.saturating_mul(1 << attempt.min(16));
                    if Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(%service, %endpoint, "retrying after: {e}");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        service: &str,
        endpoint: &str,
        body: &[u8],
        options: &CallOptions,
        (trace, span): (&TraceParent, &tracing::Span),
        tried: &mut Vec<PeerId>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Error> {
        let selected = self.pick(service, options, tried).await?;
        let peer = selected.peer_id();
        tried.push(peer);
        if !span.is_disabled() {
            span.record("peer", &*self.inner.peer_text(peer));
        }
        let started = Instant::now();
        let result = async {
            let head = head(service, endpoint, CallKind::Unary, options, trace, deadline);
            let mut request = Vec::with_capacity(body.len() + 256);
            head.put(&mut request)
                .and_then(|()| transport::wire::put_data(&mut request, body))
                .and_then(|()| Frame::End.put(&mut request))
                .map_err(|e| Error::Encode(e.to_string()))?;
            self.exchange(&selected, options, &request).await
        }
        .await;
        selected.finish(outcome_of(&result, started));
        result
    }

    /// Sends a unary request (its frames laid out in `request`) to the selected node and
    /// reads the response: on a kept stream when there is one, else on a new stream. The
    /// stream is kept for the next call when the call succeeded.
    async fn exchange(
        &self,
        selected: &Selected,
        options: &CallOptions,
        request: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let peer = selected.peer_id();
        let node = &self.inner.node;
        let pool = &self.inner.pool;
        if let Some(best) = node.best_connection(&peer)
            && let Some(mut stream) = pool.take(&peer, best)
        {
            match self.unary_on(&mut stream, peer, request).await? {
                Unary::Answered(body) => {
                    pool.put(peer, best, stream);
                    return Ok(body);
                }
                // The server closed the stream before reading this call (it had been idle
                // too long): the call never ran, so it goes on a new stream.
                Unary::Closed => {}
            }
        }
        let (mut stream, connection) = self.open(selected, options).await?;
        match self.unary_on(&mut stream, peer, request).await? {
            Unary::Answered(body) => {
                pool.put(peer, connection, stream);
                Ok(body)
            }
            Unary::Closed => Err(Error::Receive {
                peer,
                reason: "the server closed a new stream without answering".into(),
            }),
        }
    }

    async fn unary_on(
        &self,
        stream: &mut libp2p::Stream,
        peer: PeerId,
        request: &[u8],
    ) -> Result<Unary, Error> {
        frame::write_buf(stream, request)
            .await
            .map_err(|e| Error::Send {
                peer,
                reason: e.to_string(),
            })?;
        receive_unary(stream, peer, self.inner.config.max_message).await
    }

    /// Resolves `service` and picks a node: the pinned peer, or the selector's choice among
    /// those not tried yet (or among all, when every one has been tried).
    pub(crate) async fn pick(
        &self,
        service: &str,
        options: &CallOptions,
        tried: &[PeerId],
    ) -> Result<Selected, Error> {
        let registry = &self.inner.registry;
        // The view's shared snapshot: nothing here copies or scans the service's nodes, except
        // for a pinned peer.
        let resolved = match options.peer {
            // A pinned peer this node is connected to needs no address: the view's entries,
            // if any, are enough, and the call does not wait for a lookup of the name.
            Some(peer) if self.inner.node.is_connected(&peer) => {
                Ok(std::sync::Arc::new(registry.cached_service(service)))
            }
            _ => registry.resolve(service).await,
        };
        let mut select = options.select.clone();
        let candidates = match (options.peer, resolved) {
            (Some(peer), resolved) => {
                // The pinned peer, with the addresses the registry has for it, if any.
                let mut known: Vec<registry::Entry> =
                    resolved.map(|found| found.to_vec()).unwrap_or_default();
                for s in &mut known {
                    s.nodes.retain(|n| n.peer_id == peer);
                }
                known.retain(|s| !s.nodes.is_empty());
                if known.is_empty() {
                    known.push(pinned(service, peer));
                }
                std::sync::Arc::new(known)
            }
            (None, Ok(found)) => {
                if !tried.is_empty() {
                    let untried = found
                        .iter()
                        .flat_map(|s| &s.nodes)
                        .any(|n| !tried.contains(&n.peer_id));
                    if untried {
                        select.exclude.extend(tried.iter().copied());
                    }
                }
                found
            }
            (None, Err(source)) => {
                return Err(Error::Resolve {
                    service: service.to_owned(),
                    source,
                });
            }
        };
        match self.inner.selector.select(service, &candidates, &select) {
            // Every remaining node is ejected: rather than fail without trying, try them anyway
            // (as Envoy does below its panic threshold); a success brings a node back.
            Err(crate::selector::Error::NoneAvailable(_)) if !select.include_unhealthy => {
                select.include_unhealthy = true;
                Ok(self.inner.selector.select(service, &candidates, &select)?)
            }
            result => Ok(result?),
        }
    }

    /// Connects to the selected node and opens a call stream; says on which connection.
    pub(crate) async fn open(
        &self,
        selected: &Selected,
        options: &CallOptions,
    ) -> Result<(libp2p::Stream, ConnectionId), Error> {
        let peer = selected.peer_id();
        let node = &self.inner.node;
        let addrs: Vec<Multiaddr> = selected
            .addresses()
            .iter()
            .map(|a| a.clone().with_p2p(peer).unwrap_or_else(|a| a))
            .collect();
        let connect = async {
            if peer != node.peer_id() && !node.is_connected(&peer) {
                node.probe(peer, addrs).await.map_err(|e| Error::Dial {
                    peer,
                    reason: e.to_string(),
                })?;
            }
            node.open_stream_on_best(peer, transport::protocol(node.network()))
                .await
                .map_err(|e| Error::Dial {
                    peer,
                    reason: match e {
                        crate::node::OpenError::Unsupported(_) => NO_RPC.into(),
                        other => other.to_string(),
                    },
                })
        };
        tokio::time::timeout(options.connect_timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Dial {
                    peer,
                    reason: format!("no connection within {:?}", options.connect_timeout),
                })
            })
    }
}

/// Why a call to a peer that does not speak this network's RPC protocol failed.
const NO_RPC: &str = "the peer serves no RPC on this network";

fn pinned(service: &str, peer: PeerId) -> registry::Entry {
    registry::Entry {
        name: service.to_owned(),
        version: String::new(),
        metadata: Default::default(),
        endpoints: Vec::new(),
        nodes: vec![registry::Instance {
            peer_id: peer,
            addresses: Vec::new(),
            metadata: Default::default(),
        }],
    }
}

/// The client span of a call to `endpoint` of `service`, with OpenTelemetry's RPC attributes,
/// and its W3C ids: a child of the `traceparent` in the options' metadata (the caller's own
/// span, from [`crate::Context::call_options`]), or a new trace. The call sends it as its
/// `traceparent`, so the server's span is its child.
pub(crate) fn client_span(
    service: &str,
    endpoint: &str,
    options: &CallOptions,
) -> (TraceParent, tracing::Span) {
    let (trace, parent) = TraceParent::continuing(options.metadata.get(TRACEPARENT));
    // Field values are written out only for a span some layer keeps.
    let span = tracing::debug_span!(
        "call",
        otel.kind = "client",
        rpc.system = "micromesh",
        rpc.service = %service,
        rpc.method = %endpoint,
        rpc.response.status_code = tracing::field::Empty,
        trace_id = %trace.trace_id_hex(),
        span_id = %trace.span_id_hex(),
        parent_span_id = parent.as_ref().map(|p| tracing::field::display(p.span_id_hex())),
        peer = tracing::field::Empty,
    );
    (trace, span)
}

pub(crate) fn head(
    service: &str,
    endpoint: &str,
    kind: CallKind,
    options: &CallOptions,
    trace: &TraceParent,
    deadline: Instant,
) -> Frame {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut metadata = options.metadata.clone();
    metadata.insert(TRACEPARENT, trace.to_string());
    Frame::Head(Head {
        service: service.to_owned(),
        endpoint: endpoint.to_owned(),
        content_type: options.content_type.content_type().to_owned(),
        metadata,
        timeout_ms: Some(left.as_millis().min(u128::from(u64::MAX)) as u64),
        kind,
    })
}

/// Writes frames in one go and flushes.
pub(crate) async fn send_all<W: futures::AsyncWrite + Unpin>(
    writer: &mut W,
    peer: PeerId,
    frames: &[Frame],
) -> Result<(), Error> {
    let mut buf = Vec::new();
    for f in frames {
        f.put(&mut buf).map_err(|e| Error::Encode(e.to_string()))?;
    }
    frame::write_buf(writer, &buf)
        .await
        .map_err(|e: std::io::Error| Error::Send {
            peer,
            reason: e.to_string(),
        })
}

/// Reads one frame from the server.
pub(crate) async fn receive<R: futures::AsyncRead + Unpin>(
    reader: &mut R,
    peer: PeerId,
    max: usize,
) -> Result<Frame, Error> {
    let decoded = transport::wire::read(reader, max)
        .await
        .map_err(|e| match e {
            // The stream was opened optimistically: a peer without RPC on this network says so
            // only now, in answer to the call's first bytes.
            ReadError::Io(e) if crate::node::streams::refused(&e) => Error::Dial {
                peer,
                reason: NO_RPC.into(),
            },
            e => Error::Receive {
                peer,
                reason: match e {
                    ReadError::Eof => "the stream ended before the call's trailer".into(),
                    ReadError::TooLarge { size, max } => {
                        format!(
                            "a response of {size} bytes exceeds this client's limit of {max} bytes"
                        )
                    }
                    ReadError::Io(e) => e.to_string(),
                },
            },
        })?;
    decoded.map_err(|e| Error::Receive {
        peer,
        reason: format!("malformed frame: {e}"),
    })
}

/// How a unary exchange on a stream ended, when it did not fail.
enum Unary {
    /// The server answered with this body and status 200; the stream may carry another call.
    Answered(Vec<u8>),
    /// The server closed the stream (with `end`) instead of reading the call.
    Closed,
}

async fn receive_unary(
    stream: &mut libp2p::Stream,
    peer: PeerId,
    max: usize,
) -> Result<Unary, Error> {
    let mut body = None;
    loop {
        match receive(stream, peer, max).await? {
            Frame::End if body.is_none() => return Ok(Unary::Closed),
            Frame::Data(data) if body.is_none() => body = Some(data),
            Frame::Trailer(trailer) => {
                let status = trailer.status();
                if !status.is_ok() {
                    return Err(Error::Remote {
                        peer,
                        status: Box::new(status),
                    });
                }
                return body.map(Unary::Answered).ok_or_else(|| Error::Receive {
                    peer,
                    reason: "the call succeeded without a response body".into(),
                });
            }
            _ => {
                return Err(Error::Receive {
                    peer,
                    reason: "unexpected frame in a unary response".into(),
                });
            }
        }
    }
}

/// What the selector learns from an attempt.
pub(crate) fn outcome_of<T>(result: &Result<T, Error>, started: Instant) -> Outcome {
    let elapsed: Duration = started.elapsed();
    match result {
        Ok(_) => Outcome::Success(elapsed),
        // The node answered: it is alive, and its answer took this long.
        Err(Error::Remote { status, .. })
            if !matches!(status.code(), Code::Unavailable | Code::TooManyRequests) =>
        {
            Outcome::Success(elapsed)
        }
        Err(_) => Outcome::Failure,
    }
}
