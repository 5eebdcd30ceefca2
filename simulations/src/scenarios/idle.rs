//! `idle`: how long N nodes take to start and learn their neighbourhood, and what an idle
//! node costs in memory.

use std::time::{Duration, Instant};

use micromesh::testing::{Cluster, wait_until};

use crate::measure::{Options, percentiles, rss_bytes};

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let rss_before = rss_bytes();
    let started = Instant::now();
    let cluster = Cluster::builder()
        .size(options.nodes)
        .network("sim-idle")
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let start_time = started.elapsed();

    // Every node knows enough of the DHT to route: at least min(N - 1, 20) peers (Kademlia's
    // bucket size), the way a fresh node sees a large network.
    let want = (options.nodes - 1).min(20);
    let mut ready = Vec::with_capacity(options.nodes);
    for i in 0..options.nodes {
        let node = cluster.node(i).clone();
        wait_until(Duration::from_secs(120), || async {
            node.dht_peers()
                .await
                .map(|p| p.len() >= want)
                .unwrap_or(false)
        })
        .await
        .map_err(|e| format!("node {i}: {e}"))?;
        ready.push(started.elapsed());
    }

    // Let the cluster settle (connections, first gossip heartbeats), then read memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = rss_bytes();
    let mut connections = Vec::with_capacity(options.nodes);
    for service in cluster.services() {
        connections.push(
            service
                .node()
                .peers()
                .await
                .map_err(|e| e.to_string())?
                .len(),
        );
    }
    cluster.shutdown().await.map_err(|e| e.to_string())?;

    let per_node = rss_after.saturating_sub(rss_before) / options.nodes as u64;
    Ok(serde_json::json!({
        "scenario": "idle",
        "nodes": options.nodes,
        "start_seconds": start_time.as_secs_f64(),
        "dht_ready_since_first_start": percentiles(ready),
        "dht_peers_wanted": want,
        "connections_per_node": {
            "min": connections.iter().min(),
            "max": connections.iter().max(),
            "mean": connections.iter().sum::<usize>() as f64 / connections.len() as f64,
        },
        "rss_bytes": { "before": rss_before, "after": rss_after },
        "rss_bytes_per_node": per_node,
    }))
}
