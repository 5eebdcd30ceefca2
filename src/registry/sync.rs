//! The sync protocol (`/micromesh/<network>/registry/1.0.0`): fetch the signed announcements
//! a peer holds. Late joiners and clients use it to fill their view at once.

use std::time::Duration;

use futures::AsyncWriteExt as _;
use libp2p::StreamProtocol;

use super::{Registry, wire};
use crate::PeerId;
use crate::transport::frame;

/// How many sync requests one node serves at a time; more wait.
const MAX_CONCURRENT_SERVED: usize = 16;
/// How long serving one request may take.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/registry/1.0.0"))
        .expect("network names are protocol-safe")
}

fn invalid(e: frame::ReadError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Serves the sync requests of `incoming` until the node stops.
pub(crate) async fn serve(registry: Registry, mut incoming: crate::node::streams::Incoming) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SERVED));
    let stopped = registry.node().clone();
    let serving = async {
        while let Some((peer, mut stream)) = incoming.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let registry = registry.clone();
            let node = registry.node().clone();
            node.spawn_task("registry", async move {
                let _slot = slot;
                let result = tokio::time::timeout(SERVE_TIMEOUT, async {
                    let request = frame::read(&mut stream, wire::MAX_SYNC_REQUEST)
                        .await
                        .map_err(invalid)?;
                    let request = wire::decode_sync_request(&request)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    let messages = registry.signed_messages(request.service.as_deref());
                    let mut refs: Vec<&[u8]> = Vec::new();
                    let mut total = 16;
                    for m in &messages {
                        // Stop short of the response limit rather than fail the whole sync.
                        total += m.len() + 8;
                        if total > wire::MAX_SYNC_RESPONSE {
                            break;
                        }
                        refs.push(m);
                    }
                    frame::write(&mut stream, &wire::encode_sync_response(&refs)).await?;
                    stream.close().await
                })
                .await;
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, "registry sync request failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "registry sync request timed out"),
                }
            });
        }
    };
    tokio::select! {
        () = serving => {}
        _ = stopped.stopped() => {}
    }
}

/// Fetches `peer`'s view (or the part about one service) and applies it. Failures are logged:
/// a sync is an optimisation, the gossip announcements are the source of truth.
pub(crate) async fn fetch(registry: &Registry, peer: PeerId, service: Option<String>) {
    let timeout = registry.config().lookup_timeout;
    let node = registry.node().clone();
    let result = tokio::time::timeout(timeout, async {
        if !node.is_connected(&peer) {
            // The DHT knows where providers are: dial with whatever addresses the node has.
            node.probe(peer, Vec::new())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let mut stream = node
            .open_stream(peer, protocol(node.network()))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let request = wire::encode_sync_request(&wire::SyncRequest { service });
        frame::write(&mut stream, &request).await?;
        let response = frame::read(&mut stream, wire::MAX_SYNC_RESPONSE)
            .await
            .map_err(invalid)?;
        wire::decode_sync_response(&response)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })
    .await;
    match result {
        Ok(Ok(messages)) => {
            registry.count_sync();
            for message in messages {
                registry.receive(&message);
            }
        }
        Ok(Err(e)) => tracing::debug!(%peer, "registry sync failed: {e}"),
        Err(_) => tracing::debug!(%peer, "registry sync timed out"),
    }
}
