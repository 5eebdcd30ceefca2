//! The composed libp2p behaviour and the swarm it runs in.
//!
//! Every protocol the node speaks is a field here. The ones a configuration may leave out are
//! `Toggle`s inside [`Optional`], itself one `Toggle`: a configuration that turns a protocol
//! off takes the same code path with the field empty, and a node with none of them (every
//! [`Preset::Local`](super::Preset::Local) node) carries a single empty link for all five.

use std::{num::NonZeroUsize, time::Duration};

use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, autonat,
    connection_limits::{self, ConnectionLimits},
    core::{Transport as _, muxing::StreamMuxerBox, transport::MemoryTransport, upgrade::Version},
    dcutr, gossipsub, identify,
    identity::Keypair,
    kad, mdns, memory_connection_limits, noise, ping, relay,
    swarm::behaviour::toggle::Toggle,
    tcp, tls, upnp, yamux,
};
use prometheus_client::registry::Registry;

use super::{Error, config::Config, gossip, keep_alive, records, scoring, streams};

/// The version string of micromesh's protocol family, sent in identify.
pub(crate) const PROTOCOL_VERSION: &str = "/micromesh/1.0.0";

/// The Kademlia protocol of a network. Never `/ipfs/kad/1.0.0`: a private name keeps the
/// network's DHT from merging with any other.
pub(crate) fn kad_protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/kad/1.0.0"))
        .expect("network names are checked to be protocol-safe")
}

pub(crate) fn keep_alive_protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/keepalive/1.0.0"))
        .expect("network names are checked to be protocol-safe")
}

/// The protocol on which a node that stops says goodbye (`protocols/leave.md`).
pub(crate) fn leave_protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/leave/1.0.0"))
        .expect("network names are checked to be protocol-safe")
}

/// The largest value a DHT record may carry. Kademlia's packets must fit a record and its
/// framing, so the packet limit is raised with it (libp2p's 16 KiB default would refuse records
/// that its own store accepts).
pub(crate) const MAX_RECORD_SIZE: usize = 2 * 1024 * 1024;
pub(crate) const MAX_KAD_PACKET: usize = MAX_RECORD_SIZE + 64 * 1024;

#[derive(libp2p::swarm::NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) optional: Toggle<Optional>,
    pub(crate) keep_alive: keep_alive::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<records::Store>,
    pub(crate) gossipsub: gossipsub::Behaviour<gossipsub::IdentityTransform, gossip::Filter>,
    pub(crate) streams: streams::Behaviour,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: dcutr::Behaviour,
}

/// The behaviours a node runs only when configured to, grouped so that they cost one link of
/// the connection handler when all are off.
///
/// A connection's handler chains one handler per behaviour, and libp2p polls the whole chain
/// and collects its protocols on every wake-up of the connection: five switched-off behaviours
/// as five `Toggle`s of [`Behaviour`] were five links on every message and every call.
#[derive(libp2p::swarm::NetworkBehaviour)]
pub(crate) struct Optional {
    pub(crate) memory_limits: Toggle<memory_connection_limits::Behaviour>,
    pub(crate) autonat: Toggle<autonat::Behaviour>,
    pub(crate) relay_server: Toggle<super::relay_service::RelayService>,
    pub(crate) upnp: Toggle<upnp::tokio::Behaviour>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Optional {
    fn is_empty(&self) -> bool {
        !(self.memory_limits.is_enabled()
            || self.autonat.is_enabled()
            || self.relay_server.is_enabled()
            || self.upnp.is_enabled()
            || self.mdns.is_enabled())
    }
}

impl Behaviour {
    fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &Config,
        registry: &mut Registry,
        streams: streams::Behaviour,
        store: records::Store,
    ) -> Result<Self, Error> {
        let peer_id = key.public().to_peer_id();
        let network = &config.network;

        let limits = connection_limits::Behaviour::new(
            ConnectionLimits::default()
                .with_max_established(Some(config.max_connections))
                .with_max_established_per_peer(Some(config.max_connections_per_peer))
                .with_max_pending_incoming(Some(config.max_pending_incoming)),
        );
        let memory_limits = Toggle::from(
            config
                .memory_limit
                .map(memory_connection_limits::Behaviour::with_max_percentage),
        );

        let identify = identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                .with_agent_version(format!("micromesh/{}", env!("CARGO_PKG_VERSION")))
                .with_push_listen_addr_updates(true)
                .with_interval(Duration::from_secs(300)),
        );
        let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(10)));

        let mut kad_config = kad::Config::new(kad_protocol(network));
        kad_config
            .set_query_timeout(config.query_timeout)
            .set_max_packet_size(MAX_KAD_PACKET)
            .set_periodic_bootstrap_interval(Some(config.bootstrap_interval))
            // Provider records name the services a peer runs: a dead peer's should not linger
            // for libp2p's default of 48 hours.
            .set_provider_record_ttl(Some(Duration::from_secs(600)))
            .set_provider_publication_interval(Some(Duration::from_secs(300)))
            .set_parallelism(NonZeroUsize::new(3).expect("3 > 0"))
            .set_replication_factor(config.replication)
            // Store records carry their own signed expiry; Kademlia must not cut them short.
            .set_record_ttl(None)
            // Holders re-send their records to the current closest peers every 5 minutes, so
            // that a record lost with a holder is copied again; its writer re-publishes hourly.
            .set_replication_interval(Some(Duration::from_secs(300)))
            .set_publication_interval(Some(Duration::from_secs(3600)));
        let kad = kad::Behaviour::with_config(peer_id, store, kad_config);

        // Messages carry micromesh's signed frame instead of gossipsub's author fields, and are
        // named by the frame's hash: the node checks a signature once per message rather than
        // once per copy (see `frame`). Gossipsub refuses messages that carry author fields.
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .message_id_fn(|message: &gossipsub::Message| {
                gossipsub::MessageId::from(super::frame::message_id(&message.data))
            })
            .heartbeat_interval(config.gossip_heartbeat)
            .heartbeat_initial_delay(Duration::from_millis(100))
            .max_transmit_size(config.max_gossip_size)
            // Messages are forwarded only once the topic's validation hook accepted them.
            .validate_messages()
            // A burst may queue messages for a while on a loaded node: deliver them late rather
            // than drop them (gossipsub drops forwards after 1 s by default), and keep them for
            // gossip repair (IWANT) for 5 s instead of 2.5 s.
            .forward_queue_duration(Duration::from_secs(3))
            .history_length(10)
            .build()
            .map_err(|e| Error::InvalidConfig(format!("gossipsub: {e}")))?;
        let mut gossipsub = gossipsub::Behaviour::new_with_subscription_filter(
            gossipsub::MessageAuthenticity::Anonymous,
            gossip_config,
            gossip::filter(network),
        )
        .map_err(|e| Error::InvalidConfig(format!("gossipsub: {e}")))?
        .with_metrics(registry, gossipsub::MetricsConfig::default());
        gossipsub
            .with_peer_score(scoring::params(), scoring::thresholds())
            .map_err(|e| Error::InvalidConfig(format!("gossipsub scoring: {e}")))?;

        let autonat = Toggle::from(config.autonat.then(|| {
            autonat::Behaviour::new(
                peer_id,
                autonat::Config {
                    only_global_ips: !config.private_addresses_are_public,
                    // libp2p waits 15 s before its first probe, and 90 s between probes while
                    // it has no verdict: a node behind a NAT would wait that long for relays.
                    boot_delay: Duration::from_secs(1),
                    retry_interval: Duration::from_secs(15),
                    ..Default::default()
                },
            )
        }));
        // Offered always, never, or (the default with AutoNAT) while AutoNAT finds the node
        // reachable: the event loop enables it then. (libp2p's own rule, "while an external
        // address is confirmed", would count the addresses of the node's own relays, and turn
        // every node behind a NAT into a relay nobody can reach.)
        let relay_status = match config.relay_server {
            Some(true) => Some(relay::Status::Enable),
            Some(false) => None,
            None => config.autonat.then_some(relay::Status::Disable),
        };
        let relay_server = Toggle::from(relay_status.map(|status| {
            let mut relay = relay::Behaviour::new(
                peer_id,
                relay::Config {
                    max_circuit_duration: config.relay_circuit_limits.0,
                    max_circuit_bytes: config.relay_circuit_limits.1,
                    ..Default::default()
                },
            );
            relay.set_status(Some(status));
            super::relay_service::RelayService::new(relay)
        }));
        let upnp = Toggle::from(config.upnp.then(upnp::tokio::Behaviour::default));
        let mdns = Toggle::from(if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id).map_err(|e| {
                    Error::Transport {
                        what: "mDNS",
                        source: super::Cause::new(e),
                    }
                })?,
            )
        } else {
            None
        });

        let optional = Optional {
            memory_limits,
            autonat,
            relay_server,
            upnp,
            mdns,
        };
        Ok(Self {
            limits,
            optional: Toggle::from((!optional.is_empty()).then_some(optional)),
            keep_alive: keep_alive::Behaviour::new(keep_alive_protocol(network)),
            identify,
            ping,
            kad,
            gossipsub,
            streams,
            relay_client,
            dcutr: dcutr::Behaviour::new(peer_id),
        })
    }
}

type BoxedTransport = libp2p::core::transport::Boxed<(libp2p::PeerId, StreamMuxerBox)>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn transport_error(e: impl Into<BoxError>) -> Error {
    Error::Transport {
        what: "the node's transports",
        source: super::Cause::new(e),
    }
}

/// The in-process memory transport, optionally behind the pre-shared key, with Noise and yamux.
fn memory_transport(
    noise: noise::Config,
    psk: Option<libp2p::pnet::PreSharedKey>,
) -> Result<BoxedTransport, BoxError> {
    let base = MemoryTransport::default();
    Ok(match psk {
        None => base
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        Some(psk) => base
            .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    })
}

/// TCP behind the pre-shared key, with Noise and yamux (QUIC cannot carry the key).
fn private_tcp_transport(
    noise: noise::Config,
    psk: libp2p::pnet::PreSharedKey,
) -> Result<BoxedTransport, BoxError> {
    Ok(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1)
            .authenticate(noise.clone())
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed()
            .or_transport(memory_transport(noise, Some(psk))?)
            .map(|either, _| either.into_inner())
            .boxed(),
    )
}

/// A transport's security upgrade made of a config built once, in the form the swarm builder
/// takes (a constructor from the node's key).
fn shared<T: Clone>(config: &T) -> impl FnOnce(&Keypair) -> Result<T, std::convert::Infallible> {
    let config = config.clone();
    move |_| Ok(config)
}

/// Builds the swarm: transports (QUIC, TCP with TLS or Noise, memory, DNS, relay circuits),
/// bandwidth metrics, and the behaviour.
pub(crate) fn build_swarm(
    key: Keypair,
    config: &Config,
    registry: &mut Registry,
    streams: streams::Behaviour,
    store: records::Store,
) -> Result<Swarm<Behaviour>, Error> {
    let mut store = Some(store);
    let idle_timeout = config.idle_timeout;
    let connection_timeout = config.connection_timeout;
    let mut streams = Some(streams);
    // The tail of the builder chain is the same for both transport stacks, but the stacks are
    // different types, so it is spelled out by a macro rather than a function.
    macro_rules! finish {
        ($builder:expr) => {{
            let mut built = None;
            let swarm = $builder
                .with_bandwidth_metrics(registry)
                .with_behaviour(|key, relay_client| {
                    let streams = streams.take().expect("the behaviour is built once");
                    let store = store.take().expect("the behaviour is built once");
                    match Behaviour::new(key, relay_client, config, registry, streams, store) {
                        Ok(behaviour) => Ok(behaviour),
                        Err(e) => {
                            built = Some(e);
                            Err("behaviour".into())
                        }
                    }
                })
                .map_err(|e| built.take().unwrap_or_else(|| transport_error(e)))?
                .with_swarm_config(|c| {
                    c.with_idle_connection_timeout(idle_timeout)
                        // Optimistic negotiation: a stream's protocol proposal leaves with its
                        // first bytes instead of waiting a round trip for the peer's
                        // confirmation (see `streams::refused`).
                        .with_substream_upgrade_protocol_override(Version::V1Lazy)
                })
                .with_connection_timeout(connection_timeout)
                .build();
            Ok(swarm)
        }};
    }

    // A security config costs key generation and signatures (a TLS one, two certificates):
    // the transports share one of each, which halves the CPU a node spends starting.
    let noise = noise::Config::new(&key).map_err(transport_error)?;
    let builder = SwarmBuilder::with_existing_identity(key.clone()).with_tokio();
    match config.psk {
        None => {
            let tls = tls::Config::new(&key).map_err(transport_error)?;
            finish!(
                builder
                    .with_tcp(
                        tcp::Config::default().nodelay(true),
                        (shared(&tls), shared(&noise)),
                        yamux::Config::default,
                    )
                    .map_err(transport_error)?
                    .with_quic_config(|mut quic| {
                        quic.handshake_timeout = connection_timeout;
                        // A peer that went silent (crashed, unplugged) is noticed after 6 s
                        // rather than libp2p's 10 s; keep-alives every 2 s hold live
                        // connections open.
                        quic.max_idle_timeout = 6_000;
                        quic.keep_alive_interval = Duration::from_secs(2);
                        quic
                    })
                    .with_other_transport(|_| memory_transport(noise.clone(), None))
                    .map_err(transport_error)?
                    .with_dns()
                    .map_err(transport_error)?
                    .with_relay_client((shared(&tls), shared(&noise)), yamux::Config::default)
                    .map_err(transport_error)?
            )
        }
        Some(psk) => finish!(
            builder
                .with_other_transport(|_| private_tcp_transport(noise.clone(), psk.0))
                .map_err(transport_error)?
                .with_dns()
                .map_err(transport_error)?
                .with_relay_client(shared(&noise), yamux::Config::default)
                .map_err(transport_error)?
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the test vector table of `protocols/README.md` and checks every row.
    #[test]
    fn protocol_ids_match_the_spec() {
        let spec = include_str!("../../protocols/README.md");
        let table = spec
            .split("### Test vectors")
            .nth(1)
            .expect("the spec has a test vector section");
        let rows: Vec<Vec<String>> = table
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert!(rows.len() >= 2, "no vectors found");
        for row in rows {
            let [network, topic, wire, kad, keep, leave] = &row[..] else {
                panic!("malformed row {row:?}");
            };
            super::super::config::check_network_name(network).unwrap();
            gossip::check_user_topic(topic).unwrap();
            assert_eq!(&gossip::wire_topic(network, topic), wire);
            assert_eq!(kad_protocol(network).as_ref(), kad);
            assert_eq!(keep_alive_protocol(network).as_ref(), keep);
            assert_eq!(leave_protocol(network).as_ref(), leave);
        }
        assert_eq!(MAX_KAD_PACKET, 2_162_688, "the spec names this number");
    }
}
