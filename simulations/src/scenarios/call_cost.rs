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
    // Two clients: one whose view stays small (the baseline), one whose view grows. Each size
    // is measured right after a baseline series, so that the machine's drift cancels out.
    let client = |name: &'static str| {
        Service::builder(name)
            .preset(Preset::Local)
            .network(network)
            .bootstrap(addr.clone())
            .register(false)
            .build()
    };
    let baseline = client("baseline").await.map_err(|e| e.to_string())?;
    let loaded = client("loaded").await.map_err(|e| e.to_string())?;
    feed(&baseline, network, SIZES[0])?;

    let mut by_view = Vec::new();
    let mut fed = 0;
    for size in SIZES {
        feed(&loaded, network, size - fed)?;
        fed = size;
        let [(base_latencies, base_cpu), (latencies, cpu)] = measure([&baseline, &loaded]).await?;
        by_view.push((size, base_latencies, base_cpu, latencies, cpu));
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
    for service in [baseline, loaded, echo] {
        service.stop().await.map_err(|e| e.to_string())?;
    }

    let base_selection = selection[0].1.as_secs_f64();
    let per_call = |cpu: &Duration| cpu.as_secs_f64() / CALLS as f64;
    Ok(serde_json::json!({
        "scenario": "call-cost",
        "calls_per_series": CALLS,
        "baseline_instances_in_view": SIZES[0],
        "calls_with_a_view_of": by_view.iter().map(|(size, base, base_cpu, latencies, cpu)| {
            serde_json::json!({
                "instances_in_view": size,
                "latency": percentiles(latencies.clone()),
                "baseline_latency": percentiles(base.clone()),
                "cpu_us_per_call": per_call(cpu) * 1e6,
                "baseline_cpu_us_per_call": per_call(base_cpu) * 1e6,
                "p50_ratio_to_baseline": quantile_ms(latencies, 0.5) / quantile_ms(base, 0.5),
                "cpu_ratio_to_baseline": per_call(cpu) / per_call(base_cpu),
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

/// Puts `n` more synthetic instances of another service in `client`'s view.
fn feed(client: &Service, network: &str, n: usize) -> Result<(), String> {
    for _ in 0..n {
        let who = Identity::generate();
        let message = testing::registry_announcement(&who, who.peer_id(), network, 1, "crowd");
        if !testing::feed_registry(client.registry(), &message) {
            return Err("a synthetic announcement was refused".into());
        }
    }
    Ok(())
}

/// `CALLS` sequential calls to `echo` from each client, after a warm-up, in alternating blocks
/// of `BLOCK` (so that both series see the same states of the machine): each client's
/// latencies and the process's CPU during its blocks.
async fn measure(clients: [&Service; 2]) -> Result<[(Vec<Duration>, Duration); 2], String> {
    const BLOCK: usize = 100;
    let call = |client: &Service, n: u64| {
        let client = client.client().clone();
        async move {
            client
                .call::<_, u64>("echo", "Echo.Echo", &n)
                .await
                .map_err(|e| e.to_string())
        }
    };
    for client in clients {
        for n in 0..200u64 {
            call(client, n).await?;
        }
    }
    let mut out = [
        (Vec::with_capacity(CALLS), Duration::ZERO),
        (Vec::with_capacity(CALLS), Duration::ZERO),
    ];
    for block in 0..CALLS / BLOCK {
        for (client, (latencies, cpu)) in clients.iter().zip(out.iter_mut()) {
            let cpu_before = cpu_time();
            for n in 0..BLOCK as u64 {
                let started = Instant::now();
                call(client, (block * BLOCK) as u64 + n).await?;
                latencies.push(started.elapsed());
            }
            *cpu += cpu_time().saturating_sub(cpu_before);
        }
    }
    Ok(out)
}

/// One version of `name` with `n` nodes of made-up peers.
fn synthetic(name: &str, n: usize) -> registry::Entry {
    let mut service: registry::Entry = serde_json::from_value(serde_json::json!({
        "name": name,
        "version": "1.0.0",
        "metadata": {},
        "endpoints": [],
        "nodes": [],
    }))
    .expect("a valid service");
    service.nodes = (0..n)
        .map(|_| {
            serde_json::from_value::<registry::Instance>(serde_json::json!({
                "peer_id": PeerId::random(),
                "addresses": [],
                "metadata": Metadata::new(),
            }))
            .expect("a valid node")
        })
        .collect();
    service
}
