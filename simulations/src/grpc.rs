//! The gRPC baseline of the benchmarks: tonic over cleartext HTTP/2 on loopback TCP, an echo
//! method whose request and response are a protobuf message with one `bytes` field, called
//! through one shared channel.
//!
//! The service is written by hand, as tonic's code generator would write it, so the
//! simulations need no `protoc`.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    net::SocketAddr,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use tonic::{
    body::Body,
    client::Grpc,
    server::{NamedService, UnaryService},
    transport::{Channel, Endpoint, server::TcpIncoming},
};
use tonic_prost::ProstCodec;

/// The echo method's request and response: `message Payload { bytes body = 1; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Payload {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) body: Vec<u8>,
}

const ECHO_PATH: &str = "/bench.Bench/Echo";
/// Both sides accept messages up to this size (tonic's default is 4 MiB for decoding).
const MAX_MESSAGE: usize = 8 << 20;

/// The server: routes `Echo` and answers anything else with `UNIMPLEMENTED`.
#[derive(Clone)]
struct Bench;

impl NamedService for Bench {
    const NAME: &'static str = "bench.Bench";
}

struct Echo;

impl UnaryService<Payload> for Echo {
    type Response = Payload;
    type Future = Ready<Result<tonic::Response<Payload>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Payload>) -> Self::Future {
        ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl tower_service::Service<http::Request<Body>> for Bench {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() == ECHO_PATH {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<Payload, Payload>::default())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                Ok(grpc.unary(Echo, request).await)
            } else {
                Ok(tonic::Status::unimplemented(request.uri().path().to_owned()).into_http())
            }
        })
    }
}

/// Starts the echo server on a loopback port (TCP_NODELAY on) and returns its address.
pub(crate) async fn serve() -> Result<SocketAddr, String> {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("valid"))
        .map_err(|e| format!("gRPC server: {e}"))?
        .with_nodelay(Some(true));
    let addr = incoming
        .local_addr()
        .map_err(|e| format!("gRPC server: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .serve_with_incoming(Bench, incoming)
            .await
        {
            eprintln!("gRPC server stopped: {e}");
        }
    });
    Ok(addr)
}

/// A client of the echo server: clones share one HTTP/2 connection, as clones of a tonic
/// channel do.
#[derive(Clone)]
pub(crate) struct Client {
    grpc: Grpc<Channel>,
}

impl Client {
    /// Opens a channel to `addr` (TCP_NODELAY on) and waits for its connection.
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("gRPC channel: {e}"))?;
        let grpc = Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self { grpc })
    }

    /// Calls `Echo` with `body` and checks the body comes back.
    pub(crate) async fn echo(&mut self, body: Vec<u8>) -> Result<(), String> {
        self.grpc
            .ready()
            .await
            .map_err(|e| format!("gRPC channel: {e}"))?;
        let sent = body.len();
        let reply = self
            .grpc
            .unary(
                tonic::Request::new(Payload { body }),
                PathAndQuery::from_static(ECHO_PATH),
                ProstCodec::<Payload, Payload>::default(),
            )
            .await
            .map_err(|e| format!("gRPC call: {e}"))?;
        let received = reply.into_inner().body.len();
        if received != sent {
            return Err(format!("gRPC echo sent {sent} bytes, got {received}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_baseline_echoes_small_and_large_bodies_over_one_channel() {
        let addr = serve().await.unwrap();
        let client = Client::connect(addr).await.unwrap();
        for size in [0, 64, 64 * 1024, 5 << 20] {
            client.clone().echo(vec![7; size]).await.unwrap();
        }
    }
}
