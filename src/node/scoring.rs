//! Gossipsub peer scoring: the parameters every node runs with, and why.
//!
//! Scoring is how gossipsub defends a mesh against peers that send invalid messages or misbehave
//! in the protocol: each node keeps a score per peer, drops peers with low scores from its
//! meshes, stops gossiping with them, and finally ignores them altogether. micromesh switches it
//! on with deliberately simple parameters:
//!
//! - **Invalid messages (P4) dominate.** A message rejected by a topic's validation hook costs its
//!   propagation source `-100 × n²` for `n` recent rejects (weight −100, counter decaying ×0.9 per
//!   second). One invalid message puts a peer below the graylist threshold (−80) for about a
//!   second and below the gossip threshold (−10) for about eleven; a stream of them keeps it shut
//!   out for as long as it lasts. Honest peers never pay it, because they validate before they
//!   forward.
//! - **Being useful earns a little (P1, P2).** Time in a topic's mesh (+0.01 per second, capped
//!   at +3) and first deliveries of messages (+1 each, decaying ×0.5 per second, capped at +10).
//!   The positive part is small, so a peer cannot bank credit to spend on invalid messages.
//! - **Mesh delivery deficits (P3, P3b) are off.** They punish mesh peers that deliver fewer
//!   messages than a threshold, which needs a known message rate per topic; a service mesh has
//!   many quiet topics, where P3 would punish honest peers for silence.
//! - **IP colocation (P6) is off.** Peers behind one NAT, containers on one host and every node
//!   of a test share addresses; sybil resistance comes from the network's pre-shared key and
//!   from auth grants instead.
//! - **Protocol misbehaviour (P7)** keeps gossipsub's defaults (−10 per squared excess penalty,
//!   decaying ×0.2).
//! - **Slow peers are not punished.** Gossipsub's default takes 0.2 points per message it could
//!   not queue to a peer in time; a burst of a few hundred messages to a busy peer then graylists
//!   it, and the node ignores everything that peer sends, which turns overload into loss. A busy
//!   service is not an attacker: drops to it are counted (`micromesh_gossip_send_dropped_total`)
//!   instead.
//!
//! Thresholds: gossip −10, publish −50, graylist −80, accepting peer exchange at +10, and
//! opportunistic grafting below a median of +1.

use std::time::Duration;

use libp2p::gossipsub::{PeerScoreParams, PeerScoreThresholds, TopicScoreParams};

/// The node-wide score parameters (topics are added as the node subscribes to them).
pub(crate) fn params() -> PeerScoreParams {
    PeerScoreParams {
        topic_score_cap: 20.0,
        app_specific_weight: 0.0,
        ip_colocation_factor_weight: 0.0,
        slow_peer_weight: 0.0,
        decay_interval: Duration::from_secs(1),
        decay_to_zero: 0.01,
        retain_score: Duration::from_secs(600),
        ..PeerScoreParams::default()
    }
}

/// The score thresholds.
pub(crate) fn thresholds() -> PeerScoreThresholds {
    PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 1.0,
    }
}

/// The parameters of every topic the node subscribes to.
pub(crate) fn topic_params() -> TopicScoreParams {
    TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 300.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.9,
        ..TopicScoreParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_valid() {
        params().validate().unwrap();
        thresholds().validate().unwrap();
        topic_params().validate().unwrap();
    }

    #[test]
    fn one_invalid_message_graylists_briefly() {
        let p = topic_params();
        let penalty = |seconds: i32| {
            let n = p.invalid_message_deliveries_decay.powi(seconds);
            p.invalid_message_deliveries_weight * n * n
        };
        let t = thresholds();
        assert!(penalty(0) < t.graylist_threshold);
        assert!(penalty(2) > t.graylist_threshold);
        assert!(penalty(10) < t.gossip_threshold);
        assert!(penalty(12) > t.gossip_threshold);
    }
}
