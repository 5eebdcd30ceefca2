//! `registry`: how fast a registration reaches every node, and how fast a killed node's
//! entries leave every view.

use std::time::{Duration, Instant};

use micromesh::{
    registry::{Event, Registration},
    testing::{Cluster, REGISTRY_TOPIC, wait_until},
};

use crate::measure::{Options, percentiles};

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let n = options.nodes;
    let mut cluster = Cluster::builder()
        .size(n)
        .network("sim-registry")
        .build()
        .await
        .map_err(|e| e.to_string())?;
    // Let the registry topic's gossip mesh form everywhere first.
    for i in 0..n {
        let node = cluster.node(i).clone();
        wait_until(Duration::from_secs(60), || async {
            !node
                .topic_peers(REGISTRY_TOPIC)
                .await
                .unwrap_or_default()
                .is_empty()
        })
        .await
        .map_err(|e| format!("node {i} never joined the registry topic: {e}"))?;
    }

    let mut rounds = Vec::new();
    let mut all_create = Vec::new();
    let mut all_delete = Vec::new();
    for round in 0..options.rounds {
        // A node other than the bootstrap node registers, then is killed.
        let owner = 1 + round % (n - 1);
        let name = format!("svc-{round}");
        let watchers: Vec<_> = (0..n)
            .filter(|i| *i != owner && cluster.is_running(*i))
            .map(|i| (i, cluster.service(i).registry().watch(Some(&name))))
            .collect();
        let started = Instant::now();
        cluster
            .service(owner)
            .registry()
            .register(Registration::new(name.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let seen = collect(watchers, started, |e| matches!(e, Event::Created(_))).await?;

        let watchers: Vec<_> = (0..n)
            .filter(|i| *i != owner && cluster.is_running(*i))
            .map(|i| (i, cluster.service(i).registry().watch(Some(&name))))
            .collect();
        let killed = Instant::now();
        cluster.kill(owner).await;
        let dropped = collect(watchers, killed, |e| matches!(e, Event::Deleted(_))).await?;
        cluster
            .start_member(owner)
            .await
            .map_err(|e| e.to_string())?;

        rounds.push(serde_json::json!({
            "owner": owner,
            "visible_everywhere_ms": seen.iter().max().map(|d| d.as_secs_f64() * 1000.0),
            "dropped_everywhere_ms": dropped.iter().max().map(|d| d.as_secs_f64() * 1000.0),
        }));
        all_create.extend(seen);
        all_delete.extend(dropped);
    }
    cluster.shutdown().await.map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "scenario": "registry",
        "nodes": n,
        "rounds": rounds,
        "register_to_visible": percentiles(all_create),
        "kill_to_dropped": percentiles(all_delete),
        "ttl_seconds": micromesh::registry::DEFAULT_TTL.as_secs(),
    }))
}

/// Waits on every watcher for the first event matching `want`; returns each node's delay.
async fn collect(
    watchers: Vec<(usize, micromesh::registry::Watcher)>,
    started: Instant,
    want: fn(&Event) -> bool,
) -> Result<Vec<Duration>, String> {
    let waits = watchers.into_iter().map(|(i, mut watcher)| async move {
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(event) = watcher.next().await {
                if let Ok(event) = event
                    && want(&event)
                {
                    return Some(started.elapsed());
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(delay)) => Ok(delay),
            _ => Err(format!("node {i} never saw the change")),
        }
    });
    futures::future::join_all(waits).await.into_iter().collect()
}
