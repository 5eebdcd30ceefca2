//! Handlers: plain async functions, turned into type-erased services.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures::{Stream, StreamExt as _, future::BoxFuture};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;

use super::Context;
use crate::{
    Metadata, Status,
    codec::{Codec as _, ContentType},
    registry,
    transport::wire::{CallKind, DataFrame},
};

/// A unary call as the tower stack sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Request {
    /// The call's context.
    pub context: Context,
    /// The codec of the body (and of the response).
    pub content_type: ContentType,
    /// The encoded request body.
    pub body: Vec<u8>,
}

/// A unary response as the tower stack sees it.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Response {
    /// The encoded response body.
    pub body: Vec<u8>,
    /// Metadata returned to the caller.
    pub metadata: Metadata,
}

/// An error of a tower layer or handler, before it becomes a [`Status`].
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(crate) type BoxedUnary = BoxCloneSyncService<Request, Response, BoxError>;

/// Bytes in, bytes out: the erased form of every streaming handler. Requests come in as
/// encoded bodies; responses go out encoded into [`DataFrame::buffer`]s, ready to be framed
/// without a copy.
pub(crate) type StreamHandler = Arc<
    dyn Fn(
            Context,
            ContentType,
            mpsc::Receiver<Vec<u8>>,
            mpsc::Sender<Vec<u8>>,
        ) -> BoxFuture<'static, Result<(), Status>>
        + Send
        + Sync,
>;

/// A registered endpoint.
#[derive(Clone)]
pub(crate) enum Endpoint {
    Unary {
        service: BoxedUnary,
        shape: Shape,
    },
    Stream {
        handler: StreamHandler,
        kind: CallKind,
        shape: Shape,
    },
}

/// What the registry says of an endpoint's messages.
#[derive(Clone, Debug)]
pub(crate) struct Shape {
    request: String,
    response: String,
    /// A JSON example of the request, when the type can be traced.
    request_example: Option<String>,
}

impl Shape {
    fn of<Req: DeserializeOwned, Resp>() -> Self {
        Self {
            request: short_type_name::<Req>(),
            response: short_type_name::<Resp>(),
            request_example: super::example::request_example::<Req>(),
        }
    }
}

impl Endpoint {
    pub(crate) fn kind(&self) -> CallKind {
        match self {
            Self::Unary { .. } => CallKind::Unary,
            Self::Stream { kind, .. } => *kind,
        }
    }

    /// The endpoint as the registry announces it: type names, how it is called, and a JSON
    /// example of its request.
    pub(crate) fn describe(&self, name: &str) -> registry::Endpoint {
        let (Self::Unary { shape, .. } | Self::Stream { shape, .. }) = self;
        let kind = match self.kind() {
            CallKind::Unary => "unary",
            CallKind::ServerStream => "server-stream",
            CallKind::ClientStream => "client-stream",
            CallKind::Bidi => "bidi-stream",
        };
        let mut endpoint = registry::Endpoint::new(name)
            .request(shape.request.clone())
            .response(shape.response.clone())
            .metadata(registry::KIND_KEY, kind);
        if let Some(example) = &shape.request_example {
            endpoint = endpoint.metadata(registry::REQUEST_EXAMPLE_KEY, example.clone());
        }
        endpoint
    }
}

/// The last segment of a type's path: `HelloRequest`, not `my_crate::api::HelloRequest`.
pub(crate) fn short_type_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    let short = base.rsplit("::").next().unwrap_or(base);
    if base.len() == full.len() {
        short.to_owned()
    } else {
        format!("{short}{}", &full[base.len()..])
    }
}

/// A unary handler: an async function from a [`Context`] and a request to a response or a
/// [`Status`]. Implemented for every `Fn(Context, Req) -> impl Future<Output =
/// Result<Resp, Status>>` that is `Clone + Send + Sync + 'static`.
pub trait Handler<Req, Resp>: Clone + Send + Sync + 'static {
    /// The future the handler returns.
    type Future: Future<Output = Result<Resp, Status>> + Send + 'static;

    /// Handles one call.
    fn call(&self, context: Context, request: Req) -> Self::Future;
}

impl<F, Fut, Req, Resp> Handler<Req, Resp> for F
where
    F: Fn(Context, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, context: Context, request: Req) -> Fut {
        self(context, request)
    }
}

fn decode_error(e: crate::codec::Error) -> Status {
    Status::bad_request(format!("cannot decode the request: {e}"))
}

fn encode_error(e: crate::codec::Error) -> Status {
    Status::internal(format!("cannot encode the response: {e}"))
}

pub(crate) fn unary<H, Req, Resp>(handler: H) -> Endpoint
where
    H: Handler<Req, Resp>,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let service = tower::service_fn(move |request: Request| {
        let handler = handler.clone();
        async move {
            let input: Req = request
                .content_type
                .decode(&request.body)
                .map_err(decode_error)?;
            let output = handler.call(request.context, input).await?;
            let body = request.content_type.encode(&output).map_err(encode_error)?;
            Ok::<_, BoxError>(Response {
                body,
                metadata: Metadata::new(),
            })
        }
    });
    Endpoint::Unary {
        service: BoxCloneSyncService::new(service),
        shape: Shape::of::<Req, Resp>(),
    }
}

/// The requests of a streaming call, as they arrive. Ends when the caller closes its side.
pub struct Streaming<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
}

impl<T> std::fmt::Debug for Streaming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming").finish_non_exhaustive()
    }
}

impl<T> Streaming<T> {
    /// The next request: `None` once the caller has closed its side, `Some(Err)` if a message
    /// could not be decoded.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn message(&mut self) -> Option<Result<T, Status>> {
        self.rx.recv().await
    }
}

impl<T> Stream for Streaming<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Wraps a typed bidirectional handler into the erased form.
pub(crate) fn bidi_kind<F, Fut, S, Req, Resp>(kind: CallKind, buffer: usize, f: F) -> Endpoint
where
    F: Fn(Context, Streaming<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<S, Status>> + Send + 'static,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let handler: StreamHandler = Arc::new(move |context, codec, mut raw_in, raw_out| {
        let f = f.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(buffer.max(1));
            let decode = async move {
                while let Some(bytes) = raw_in.recv().await {
                    let item = codec.decode::<Req>(&bytes).map_err(decode_error);
                    if tx.send(item).await.is_err() {
                        break;
                    }
                }
            };
            let respond = async move {
                let stream = f(context, Streaming { rx }).await?;
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    let mut bytes = DataFrame::buffer();
                    codec
                        .encode_into(&item?, &mut bytes)
                        .map_err(encode_error)?;
                    if raw_out.send(bytes).await.is_err() {
                        return Err(Status::unavailable("the caller went away"));
                    }
                }
                Ok(())
            };
            // The decoder ends when the caller closes its side; the handler may finish first.
            let (_, result) = tokio::join!(decode, respond);
            result
        })
    });
    Endpoint::Stream {
        handler,
        kind,
        shape: Shape::of::<Req, Resp>(),
    }
}

/// A bidirectional handler.
pub(crate) fn bidi<F, Fut, S, Req, Resp>(buffer: usize, f: F) -> Endpoint
where
    F: Fn(Context, Streaming<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<S, Status>> + Send + 'static,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    bidi_kind(CallKind::Bidi, buffer, f)
}

/// A server-streaming handler: one request, a stream of responses.
pub(crate) fn server_stream<F, Fut, S, Req, Resp>(buffer: usize, f: F) -> Endpoint
where
    F: Fn(Context, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<S, Status>> + Send + 'static,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    bidi_kind(
        CallKind::ServerStream,
        buffer,
        move |context, mut requests: Streaming<Req>| {
            let f = f.clone();
            async move {
                let request = match requests.message().await {
                    Some(request) => request?,
                    None => {
                        return Err(Status::bad_request(
                            "a server-streaming call needs one request",
                        ));
                    }
                };
                f(context, request).await
            }
        },
    )
}

/// A client-streaming handler: a stream of requests, one response.
pub(crate) fn client_stream<F, Fut, Req, Resp>(buffer: usize, f: F) -> Endpoint
where
    F: Fn(Context, Streaming<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    bidi_kind(CallKind::ClientStream, buffer, move |context, requests| {
        let f = f.clone();
        async move {
            let response = f(context, requests).await?;
            Ok(futures::stream::once(async move { Ok(response) }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_short() {
        struct HelloRequest;
        assert_eq!(short_type_name::<HelloRequest>(), "HelloRequest");
        assert_eq!(short_type_name::<Vec<u8>>(), "Vec<u8>");
        assert_eq!(short_type_name::<serde_json::Value>(), "Value");
    }
}
