//! # micromesh
//!
//! go-micro's way of building services — one [`Service`] bundling the node, registry,
//! broker, client, server, store, auth, config and debug — running on a libp2p peer-to-peer
//! mesh instead of central servers. There is no registry server, no broker, no database: every
//! node carries its share of the mesh.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), micromesh::Error> {
//! use micromesh::{Context, Service, Status, node::Preset};
//!
//! async fn hello(_ctx: Context, name: String) -> Result<String, Status> {
//!     Ok(format!("Hello, {name}!"))
//! }
//!
//! // A service and a client on the in-process memory transport; real programs use the
//! // default preset (QUIC and TCP) and a bootstrap address.
//! let greeter = Service::builder("greeter").preset(Preset::Local).handle("Greeter.Hello", hello).build().await?;
//! let addr = greeter.node().listen_addrs().await?.remove(0);
//! let app = Service::builder("app").preset(Preset::Local).bootstrap(addr).build().await?;
//!
//! // A call made at once waits for the node to join the mesh, then finds the greeter.
//! let reply: String = app.client().call("greeter", "Greeter.Hello", &"Ada").await?;
//! assert_eq!(reply, "Hello, Ada!");
//! app.stop().await?;
//! greeter.stop().await?;
//! # Ok(()) }
//! ```
//!
//! ## Components
//!
//! - [`node`]: the libp2p swarm in one task, driven through a cloneable [`node::Node`] handle:
//!   transports (QUIC, TCP with TLS or Noise, in-memory), Kademlia, gossipsub, identify, ping,
//!   AutoNAT, relay, hole punching, UPnP, mDNS, connection limits, metrics.
//! - [`identity`]: the node's ed25519 key, kept in its data directory; the [`PeerId`] is
//!   the node's name everywhere.
//! - [`service`]: a named, versioned program on the mesh, with lifecycle hooks and graceful
//!   shutdown. It registers itself and hands out the components.
//! - [`registry`]: which services run where: signed gossip announcements, DHT provider
//!   records for late joiners, TTLs, leave on shutdown, liveness checks when a peer vanishes,
//!   and `watch`.
//! - [`selector`]: which node gets the next call: filters (version, metadata, endpoint,
//!   health), latency-weighted choice (peak-EWMA, power of two choices), random, round robin,
//!   least outstanding; failures push a node back and eject it for a while.
//! - [`server`]: handlers as plain async functions over serde types, unary and streaming,
//!   with tower middleware; [`Context`] carries the verified caller, metadata, deadline and
//!   the W3C trace context ([`trace`]).
//! - [`config`]: layered configuration (defaults, TOML/YAML/JSON files, environment,
//!   overrides, and values set for the whole mesh by authorised peers), typed and watched.
//! - [`debug`]: metrics (libp2p's, micromesh's, calls') and health over HTTP.
//! - [`broker`]: typed publish/subscribe on gossipsub, in publish order per publisher, with
//!   validation hooks feeding peer scoring, and queue groups with acknowledgements and
//!   redelivery.
//! - [`client`]: calls by service name, with timeouts, safe retries on other nodes, a pinned
//!   peer, selector strategy and filters; errors name the phase and the peer.
//! - [`transport`] and [`codec`]: libp2p streams carrying length-prefixed CBOR frames with
//!   explicit end-of-stream, kept open between unary calls to the same peer; CBOR or JSON
//!   bodies, answered in the caller's codec.
//! - [`status`]: the [`Status`] that crosses the wire (go-micro's codes, id and detail).
//! - `testing` (feature `testing`): in-process clusters with fault injection.
//!
//! ## Features
//!
//! - `cli` (default): the `micromesh` command-line tool and its own dependencies (clap,
//!   ratatui, tracing-subscriber's formatting). A library dependency that does not want them
//!   says `default-features = false`.
//! - `testing`: the `testing` module.
//! - `otel`: `debug::otlp_layer`, which exports call spans over OTLP/HTTP (and the CLI's
//!   `--otlp URL`).
//!
//! ## Layers
//!
//! The node is the bottom layer and names no component: components accept their own stream
//! protocols ([`node::Node`] hands them their inbound streams), the store's record keeper and
//! the auth policy are handed to the node, and [`Service`] wires everything together. Every
//! background task is owned by its node ([`node::Node::task_panics`]). `ARCHITECTURE.md` has
//! the map; `tests/layers.rs` fails on an import of a module above the importing one.
//!
//! ## Networks
//!
//! Every node belongs to one named network (default `"main"`). The DHT protocol, the gossip
//! topics and the keep-alive protocol carry the name, so two networks on one LAN, or sharing
//! a bootstrap peer, never exchange records or messages. A [`node::PreSharedKey`] closes a
//! network to everyone without the key.

pub mod auth;
pub mod broker;
pub mod client;
pub mod codec;
pub mod config;
pub mod debug;
pub mod error;
pub mod identity;
pub mod metadata;
pub mod node;
pub mod registry;
pub mod selector;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
#[cfg(test)]
mod test_vectors;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod transport;

/// Shared, cheaply cloned bytes: a message's body ([`broker::Message`]).
pub use bytes::Bytes;
pub use libp2p::{Multiaddr, PeerId};

pub use crate::{
    client::Client, error::Error, identity::Identity, metadata::Metadata, server::Context,
    service::Service, status::Status,
};

/// The README's examples, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
