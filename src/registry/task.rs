//! The registry's background work: receiving announcements, re-announcing, expiring entries,
//! and checking the liveness of peers that went away.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::broadcast::error::RecvError;

use super::{Error, Registry, TOPIC, sync, wire};
use crate::{
    PeerId,
    node::{
        Event, Subscription,
        gossip::{self, Validation},
    },
};

pub(crate) async fn spawn(registry: Registry) -> Result<(), Error> {
    let node = registry.node().clone();
    // Forged, malformed and replayed-by-another-peer messages stop at the first node that sees
    // them (and cost their sender gossipsub score) instead of flooding the mesh. The hook runs on
    // the node's event loop, so it holds no handle to the node.
    let network = node.network().to_owned();
    let rejected = registry.rejection_counter();
    let hook = move |message: &gossip::Message| {
        // The gossip frame's signature, checked by the node, covers the message: only its
        // shape, its limits and its signer are checked here.
        match wire::verify_published(&network, &message.data, message.source) {
            Ok(_) => Validation::Accept,
            Err(rejection) => {
                tracing::debug!("rejected a registry message: {rejection}");
                rejected(rejection.label());
                Validation::Reject
            }
        }
    };
    let incoming = node
        .accept(sync::protocol(node.network()))
        .map_err(|e| Error::Invalid(format!("a registry runs on this node already ({e})")))?;
    node.set_validator(TOPIC, Some(Arc::new(hook))).await?;
    let subscription = node.subscribe_unchecked(TOPIC).await?;
    let events = node.events();
    node.spawn_task("registry", sync::serve(registry.clone(), incoming));
    node.spawn_task("registry", run(registry, subscription, events));
    Ok(())
}

fn jittered(interval: Duration) -> Duration {
    // ±10 %, so that nodes started together do not announce together forever.
    let factor = 0.9 + rand::random::<f64>() * 0.2;
    interval.mul_f64(factor)
}

async fn run(
    registry: Registry,
    mut subscription: Subscription,
    mut events: tokio::sync::broadcast::Receiver<Event>,
) {
    let probing = Arc::new(Mutex::new(HashSet::new()));
    let mut synced = 0usize;
    let interval = registry.config().announce_interval;
    let announce = tokio::time::sleep(jittered(interval));
    tokio::pin!(announce);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = subscription.recv() => {
                let Some(message) = message else { break };
                let Some(verified) = registry.receive_from(&message.data, Some(message.source)) else {
                    continue;
                };
                if let wire::Body::Suspect { peer, .. } = verified.body
                    && let Ok(peer) = PeerId::from_bytes(&peer)
                {
                    if peer == registry.node().peer_id() {
                        // Someone lost us: tell everyone we are here.
                        if registry.has_registrations() && let Err(e) = registry.announce().await {
                            tracing::debug!("cannot re-announce: {e}");
                        }
                    } else if registry.has_services(&peer) {
                        let node = registry.node();
                        node.spawn_task("registry", check(registry.clone(), peer, false, probing.clone()));
                    }
                }
            }
            event = events.recv() => match event {
                // A goodbye needs no check: the peer said it is gone.
                Ok(Event::PeerLeft { peer_id }) => registry.mark_down(peer_id),
                Ok(Event::PeerDisconnected { peer_id }) if registry.has_services(&peer_id) => {
                    let node = registry.node();
                    node.spawn_task("registry", check(registry.clone(), peer_id, true, probing.clone()));
                }
                // Peers reach this node's services at the addresses announced: a new one (a
                // relay's, once a reservation is granted) or one gone is announced at once.
                Ok(Event::ListenAddr { .. } | Event::ListenAddrExpired { .. } | Event::ExternalAddrsChanged)
                    if registry.has_registrations() =>
                {
                    if let Err(e) = registry.announce_if_moved().await {
                        tracing::debug!("cannot announce new addresses: {e}");
                    }
                }
                Ok(Event::PeerIdentified { peer_id, same_network: true }) if synced < registry.config().initial_syncs => {
                    synced += 1;
                    let task = registry.clone();
                    registry.node().spawn_task("registry", async move { sync::fetch(&task, peer_id, None).await });
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
            () = &mut announce => {
                if registry.has_registrations() && let Err(e) = registry.announce().await {
                    tracing::debug!("cannot announce: {e}");
                }
                announce.as_mut().reset(tokio::time::Instant::now() + jittered(interval));
            }
            _ = sweep.tick() => {
                registry.expire();
                if registry.unheard()
                    && registry.has_registrations()
                    && !registry.node().topic_peers(TOPIC).await.unwrap_or_default().is_empty()
                    && let Err(e) = registry.announce().await
                {
                    tracing::debug!("cannot announce: {e}");
                }
            }
        }
    }
}

/// Checks whether `peer` is still reachable; if not, drops its services and (when this node
/// noticed it first hand) tells the mesh. One check per peer at a time.
async fn check(
    registry: Registry,
    peer: PeerId,
    report: bool,
    probing: Arc<Mutex<HashSet<PeerId>>>,
) {
    if !probing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(peer)
    {
        return;
    }
    let node = registry.node().clone();
    let addrs = registry
        .announced_addrs(&peer)
        .into_iter()
        .map(|a| a.with_p2p(peer).unwrap_or_else(|a| a))
        .collect();
    let probe =
        tokio::time::timeout(registry.config().probe_timeout, node.probe(peer, addrs)).await;
    // This node is stopping (its connections close, which is why the peer looked gone): the
    // peer was not found dead.
    let stopping = matches!(probe, Ok(Err(crate::node::Error::Stopped(_))));
    let alive = matches!(probe, Ok(Ok(())));
    if !alive && !stopping {
        registry.mark_down(peer);
        if report {
            let body = wire::Body::Suspect {
                reporter: node.peer_id().to_bytes(),
                peer: peer.to_bytes(),
            };
            let signed = wire::sign(node.identity(), node.network(), &body, &[]);
            if let Err(e) = node.publish_unchecked(TOPIC, signed).await {
                tracing::debug!(%peer, "cannot report an unreachable peer: {e}");
            }
        }
    }
    probing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&peer);
}
