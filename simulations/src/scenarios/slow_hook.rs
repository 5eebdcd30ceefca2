//! `slow-hook`: call latency on a node whose gossip validation hook blocks.
//!
//! Three nodes on the memory transport; node 1 serves `Echo.Echo` and subscribes to a topic
//! whose validation hook sleeps 5 s per message. Node 0 calls node 1, sequentially, first with no
//! message on the topic, then while node 2 publishes on it (so the hook is always busy). The
//! ratio of the two p99s says how much a slow hook costs the node's other work: hooks run on
//! per-topic workers, off the event loop.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use micromesh::{
    Context, Status,
    broker::{Message, PublishOptions, SubscribeOptions, Validation},
    testing::{Cluster, wait_until},
};

use crate::measure::{Options, percentiles, quantile_ms};

const CALLS: u64 = 2_000;

pub(crate) async fn run(_options: &Options) -> Result<serde_json::Value, String> {
    let cluster = Cluster::builder()
        .size(3)
        .network("sim-slow-hook")
        .configure(|i, b| {
            if i == 1 {
                b.handle("Echo.Echo", |_: Context, n: u64| async move {
                    Ok::<_, Status>(n)
                })
                .register(true)
            } else {
                b
            }
        })
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let slow = cluster.service(1).clone();
    slow.broker().set_validator("slow", |_: &Message| {
        std::thread::sleep(Duration::from_secs(5));
        Validation::Accept
    });
    let _subscription = slow
        .broker()
        .subscribe_raw("slow", SubscribeOptions::new(), |_: Message| async {
            Ok::<_, Status>(())
        })
        .await
        .map_err(|e| e.to_string())?;
    let caller = cluster.service(0).clone();
    let registry = caller.registry().clone();
    wait_until(Duration::from_secs(30), || async {
        registry.get_service("member-1").await.is_ok()
    })
    .await
    .map_err(|e| e.to_string())?;
    let calls = |caller: micromesh::Service| async move {
        let mut latencies = Vec::with_capacity(CALLS as usize);
        for n in 0..CALLS {
            let started = Instant::now();
            let _: u64 = caller
                .client()
                .call("member-1", "Echo.Echo", &n)
                .await
                .map_err(|e| e.to_string())?;
            latencies.push(started.elapsed());
        }
        Ok::<_, String>(latencies)
    };
    let quiet = calls(caller.clone()).await?;

    // Node 2 keeps the hook busy: a message every 100 ms, each holding it 5 s.
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = cluster.service(2).clone();
    let keep_going = publishing.clone();
    let feeder = tokio::spawn(async move {
        let mut n = 0u64;
        while keep_going.load(Ordering::Relaxed) {
            let _ = publisher
                .broker()
                .publish_raw(
                    "slow",
                    n.to_be_bytes().to_vec(),
                    PublishOptions::new().allow_no_subscribers(),
                )
                .await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = calls(caller.clone()).await?;
    publishing.store(false, Ordering::Relaxed);
    let _ = feeder.await;
    let overflow =
        micromesh::testing::metric(slow.node(), "micromesh_gossip_validation_overflow_total");
    cluster.shutdown().await.map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "scenario": "slow-hook",
        "calls_per_series": CALLS,
        "without_slow_hook": percentiles(quiet.clone()),
        "with_slow_hook": percentiles(busy.clone()),
        "p50_ratio": quantile_ms(&busy, 0.5) / quantile_ms(&quiet, 0.5),
        "p99_ratio": quantile_ms(&busy, 0.99) / quantile_ms(&quiet, 0.99),
        "messages_dropped_behind_the_hook": overflow,
    }))
}
