//! The node's own counters, registered next to libp2p's.

use prometheus_client::{metrics::counter::Counter, registry::Registry};

/// Counters of the node itself (prefix `micromesh_`).
#[derive(Clone, Default)]
pub(crate) struct NodeMetrics {
    pub(crate) connections_pruned: Counter,
    pub(crate) gossip_delivered: Counter,
    pub(crate) gossip_dropped: Counter,
    pub(crate) inbound_streams_dropped: Counter,
    pub(crate) stale_connections: Counter,
    pub(crate) peers_left: Counter,
    pub(crate) routing_removed: Counter,
    pub(crate) gossip_rejected: Counter,
    pub(crate) gossip_send_dropped: Counter,
    pub(crate) gossip_validation_overflow: Counter,
}

impl NodeMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "connections_pruned",
            "Connections closed by the connection manager above its high water mark",
            metrics.connections_pruned.clone(),
        );
        registry.register(
            "gossip_delivered",
            "Gossip messages queued to local subscriptions",
            metrics.gossip_delivered.clone(),
        );
        registry.register(
            "gossip_dropped",
            "Gossip messages dropped because a subscription's queue was full",
            metrics.gossip_dropped.clone(),
        );
        registry.register(
            "inbound_streams_dropped",
            "Inbound RPC or sync streams refused because their queue was full",
            metrics.inbound_streams_dropped.clone(),
        );
        registry.register(
            "peers_left",
            "Peers that said goodbye before stopping, and were forgotten at once",
            metrics.peers_left.clone(),
        );
        registry.register(
            "routing_removed",
            "Peers removed from the DHT routing table after a dial to them failed",
            metrics.routing_removed.clone(),
        );
        registry.register(
            "gossip_validation_overflow",
            "Gossip messages ignored because their topic's validation queue was full (a slow hook)",
            metrics.gossip_validation_overflow.clone(),
        );
        registry.register(
            "stale_connections",
            "Peers reconnected because an older connection to them was dead (they restarted)",
            metrics.stale_connections.clone(),
        );
        registry.register(
            "gossip_rejected",
            "Gossip messages rejected, for a bad frame or by a topic's validation hook (not delivered, not forwarded)",
            metrics.gossip_rejected.clone(),
        );
        registry.register(
            "gossip_send_dropped",
            "Gossip messages to slow peers dropped from send queues (full, or waited too long)",
            metrics.gossip_send_dropped.clone(),
        );
        metrics
    }
}
