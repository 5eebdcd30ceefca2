//! `call-cost`: what a call costs as the registry view grows.
//!
//! Two services on the memory transport: `echo` serves calls, the client calls it. The
//! client's registry view also holds N synthetic instances (signed announcements of N other
//! identities) of another service, for N = 10, 1,000 and 10,000: a call by name must cost the
//! same whatever else the view holds. Then the selection itself among N instances of one
//! service (the selector's public API on a synthetic list): sampled above 64 candidates, it
//! must cost the same among ten as among ten thousand.

use std::time::{Duration, Instant};

use micromesh::{
    Context, Identity, Metadata, PeerId, Service, Status,
    node::Preset,
    registry,
    selector::{Outcome, SelectOptions, Selector},
    testing,
};

use crate::measure::{Options, cpu_time, percentiles, quantile_ms};

const CALLS: usize = 3_000;
const SELECTIONS: usize = 20_000;
const SIZES: [usize; 3] = [10, 1_000, 10_000];

pub(crate) async fn run(_options: &Options) -> Result<serde_json::Value, String> {
    let network = "sim-call-cost";
    let echo = Service::builder("echo")
        .preset(Preset::Local)
        .network(network)
        .handle("Echo.Echo", |_: Context, n: u64| async move {
            Ok::<_, Status>(n)
        })
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let addr = echo
        .node()
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?
        .remove(0);
    let client = Service::builder("client")
        .preset(Preset::Local)
        .network(network)
        .bootstrap(addr)
        .register(false)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let _: u64 = client
        .client()
        .call("echo", "Echo.Echo", &0u64)
        .await
        .map_err(|e| e.to_string())?;

    let mut by_view = Vec::new();
    let mut fed = 0;
    for size in SIZES {
        // Grow the view to `size` synthetic instances of another service.
        while fed < size {
            let who = Identity::generate();
            let message = testing::registry_announcement(&who, who.peer_id(), network, 1, "crowd");
            if !testing::feed_registry(client.registry(), &message) {
                return Err("a synthetic announcement was refused".into());
            }
            fed += 1;
        }
        // Warm up, then measure.
        for n in 0..200u64 {
            let _: u64 = client
                .client()
                .call("echo", "Echo.Echo", &n)
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut latencies = Vec::with_capacity(CALLS);
        let cpu_before = cpu_time();
        for n in 0..CALLS as u64 {
            let started = Instant::now();
            let _: u64 = client
                .client()
                .call("echo", "Echo.Echo", &n)
                .await
                .map_err(|e| e.to_string())?;
            latencies.push(started.elapsed());
        }
        let cpu = cpu_time().saturating_sub(cpu_before);
        by_view.push((size, latencies, cpu));
    }

    // The selection among N instances of one service.
    let mut selection = Vec::new();
    for size in SIZES {
        let candidates = [synthetic("crowd", size)];
        let selector = Selector::default();
        let options = SelectOptions::default();
        let started = Instant::now();
        for _ in 0..SELECTIONS {
            let selected = selector
                .select("crowd", &candidates, &options)
                .map_err(|e| e.to_string())?;
            selected.finish(Outcome::Success(Duration::from_micros(100)));
        }
        selection.push((size, started.elapsed() / SELECTIONS as u32));
    }
    client.stop().await.map_err(|e| e.to_string())?;
    echo.stop().await.map_err(|e| e.to_string())?;

    let base_p50 = quantile_ms(&by_view[0].1, 0.5);
    let base_cpu = by_view[0].2.as_secs_f64() / CALLS as f64;
    let base_selection = selection[0].1.as_secs_f64();
    Ok(serde_json::json!({
        "scenario": "call-cost",
        "calls_per_size": CALLS,
        "calls_with_a_view_of": by_view.iter().map(|(size, latencies, cpu)| {
            let cpu_per_call = cpu.as_secs_f64() / CALLS as f64;
            serde_json::json!({
                "instances_in_view": size,
                "latency": percentiles(latencies.clone()),
                "cpu_us_per_call": cpu_per_call * 1e6,
                "p50_ratio_to_smallest": quantile_ms(latencies, 0.5) / base_p50,
                "cpu_ratio_to_smallest": cpu_per_call / base_cpu,
            })
        }).collect::<Vec<_>>(),
        "selection_among_instances_of_one_service": selection.iter().map(|(size, per)| {
            serde_json::json!({
                "instances": size,
                "us_per_selection": per.as_secs_f64() * 1e6,
                "ratio_to_smallest": per.as_secs_f64() / base_selection,
            })
        }).collect::<Vec<_>>(),
    }))
}

/// One version of `name` with `n` nodes of made-up peers.
fn synthetic(name: &str, n: usize) -> registry::Service {
    let mut service: registry::Service = serde_json::from_value(serde_json::json!({
        "name": name,
        "version": "1.0.0",
        "metadata": {},
        "endpoints": [],
        "nodes": [],
    }))
    .expect("a valid service");
    service.nodes = (0..n)
        .map(|_| {
            serde_json::from_value::<registry::Node>(serde_json::json!({
                "peer_id": PeerId::random(),
                "addresses": [],
                "metadata": Metadata::new(),
            }))
            .expect("a valid node")
        })
        .collect();
    service
}
