//! # micromesh
//!
//! go-micro's way of building services — one [`Service`] bundling the node, registry,
//! broker, client, server, store, auth, config and debug — running on a libp2p peer-to-peer
//! mesh instead of central servers. There is no registry server, no broker, no database: every
//! node carries its share of the mesh.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), micromesh::Error> {
//! use micromesh::{Service, node::Preset};
//!
//! // Two services on the in-process memory transport; real programs use the default preset
//! // (QUIC and TCP) and a bootstrap address.
//! let a = Service::builder("alpha").preset(Preset::Local).build().await?;
//! let addr = a.node().listen_addrs().await?.remove(0);
//! let b = Service::builder("beta").preset(Preset::Local).bootstrap(addr).build().await?;
//!
//! micromesh::testing::wait_until(std::time::Duration::from_secs(10), || async {
//!     b.node().peers().await.map(|p| !p.is_empty()).unwrap_or(false)
//! })
//! .await
//! .expect("beta reaches alpha");
//! b.stop().await?;
//! a.stop().await?;
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
//! - [`testing`] (feature `testing`): in-process clusters with fault injection.
//!
//! ## Networks
//!
//! Every node belongs to one named network (default `"main"`). The DHT protocol, the gossip
//! topics and the keep-alive protocol carry the name, so two networks on one LAN, or sharing
//! a bootstrap peer, never exchange records or messages. A [`node::PreSharedKey`] closes a
//! network to everyone without the key.

pub mod error;
pub mod identity;
pub mod metadata;
pub mod node;
pub mod registry;
pub mod selector;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;

pub use libp2p::{Multiaddr, PeerId};

pub use crate::{error::Error, identity::Identity, metadata::Metadata, service::Service};
