//! The server: handlers for a service's endpoints, served over the RPC transport.
//!
//! Handlers are plain async functions over serde types, registered by endpoint name on the
//! [`Service`](crate::Service) builder:
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), micromesh::Error> {
//! use micromesh::{Context, Service, Status, node::Preset};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct HelloRequest { name: String }
//! #[derive(Serialize)]
//! struct HelloReply { msg: String }
//!
//! async fn hello(_ctx: Context, req: HelloRequest) -> Result<HelloReply, Status> {
//!     if req.name.is_empty() {
//!         return Err(Status::bad_request("a name is required"));
//!     }
//!     Ok(HelloReply { msg: format!("Hello, {}!", req.name) })
//! }
//!
//! let service = Service::builder("greeter")
//!     .preset(Preset::Local)
//!     .handle("Greeter.Hello", hello)
//!     .build()
//!     .await?;
//! service.stop().await?;
//! # Ok(()) }
//! ```
//!
//! Unary handlers are tower services underneath: [`crate::service::Builder::layer`] wraps them
//! all in any tower `Layer` (timeouts, concurrency limits, rate limits, load shedding), and a
//! layer's own errors become statuses (a tower timeout is 408, load shedding 503). Streaming
//! handlers take a [`Streaming`] of requests and return a stream of responses; the three
//! streaming shapes (server, client, bidirectional) are registered with their own methods.
//!
//! Every call runs in its own task, never on the node's event loop. A panic in a handler is
//! caught and answered with 500; the server keeps serving.

mod context;
mod dispatch;
mod example;
mod handler;

use std::{collections::HashMap, sync::Arc};

pub use self::{
    context::Context,
    handler::{Handler, Request, Response, Streaming},
};
pub(crate) use self::{
    dispatch::{Server, WeakServer},
    handler::{
        BoxedUnary, Endpoint, StreamHandler, bidi as handler_bidi,
        client_stream as handler_client_stream, server_stream as handler_server_stream,
        unary as handler_unary,
    },
};

/// The endpoints of a service, before it starts serving.
#[derive(Clone, Default)]
pub(crate) struct Router {
    pub(crate) endpoints: HashMap<String, Endpoint>,
    pub(crate) order: Vec<String>,
}

impl Router {
    pub(crate) fn insert(&mut self, name: String, endpoint: Endpoint) {
        if self.endpoints.insert(name.clone(), endpoint).is_none() {
            self.order.push(name);
        }
    }
}

/// Maps an error from a tower stack to the status the caller sees.
pub(crate) fn status_of(error: handler::BoxError) -> crate::Status {
    let error = match error.downcast::<crate::Status>() {
        Ok(status) => return *status,
        Err(e) => e,
    };
    if error.is::<tower::timeout::error::Elapsed>() {
        return crate::Status::timeout("the handler did not finish in time");
    }
    if error.is::<tower::load_shed::error::Overloaded>() {
        return crate::Status::unavailable("the server is overloaded");
    }
    crate::Status::internal(error.to_string())
}

pub(crate) type SharedRouter = Arc<Router>;
