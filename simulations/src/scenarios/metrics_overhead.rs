//! `metrics-overhead`: what the call metrics cost.
//!
//! Two pairs of services on the memory transport, each a server and a client: one with call
//! metrics on (the default: `rpc_server_*` and `rpc_client_*` on both sides), one with them off
//! (`transport::Config::call_metrics(false)`). No tracing subscriber is installed, as in a
//! program that logs at `info` (the call spans are at `debug`). Measured in alternation, so
//! that the machine's drift falls on both: calls/s with 64 in flight (rounds of 2 s), latency at
//! concurrency 1, and CPU per call.

use std::{sync::Arc, time::Duration};

use micromesh::{Context, Service, Status, node::Preset, transport};

use crate::measure::{
    Call, Options, calls_per_second, cpu_time, paired_latencies, percentiles, quantile_ms,
};

const LATENCY_CALLS: usize = 3_000;
const ROUND: Duration = Duration::from_secs(2);

async fn pair(network: &str, metrics: bool) -> Result<(Service, Service), String> {
    let config = transport::Config::default().call_metrics(metrics);
    let server = Service::builder("echo")
        .preset(Preset::Local)
        .network(network)
        .transport_config(config.clone())
        .handle("Echo.Echo", |_: Context, n: u64| async move {
            Ok::<_, Status>(n)
        })
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let addr = server
        .node()
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?
        .remove(0);
    let client = Service::builder("caller")
        .preset(Preset::Local)
        .network(network)
        .transport_config(config)
        .bootstrap(addr)
        .register(false)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    Ok((server, client))
}

fn caller(client: &Service) -> Call {
    let client = client.client().clone();
    Arc::new(move || {
        let client = client.clone();
        Box::pin(async move {
            client
                .call::<_, u64>("echo", "Echo.Echo", &7u64)
                .await
                .expect("echo answers");
        })
    })
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let (on_server, on_client) = pair("sim-metrics-on", true).await?;
    let (off_server, off_client) = pair("sim-metrics-off", false).await?;
    let (on, off) = (caller(&on_client), caller(&off_client));
    // Warm-up: connections, kept streams, the registry views.
    for _ in 0..300 {
        on().await;
        off().await;
    }

    let rounds = options.rounds.max(2);
    let (mut on_tput, mut off_tput) = (Vec::new(), Vec::new());
    let (mut on_cpu, mut off_cpu) = (Duration::ZERO, Duration::ZERO);
    let (mut on_calls, mut off_calls) = (0.0, 0.0);
    for round in 0..rounds {
        // Alternating which goes first.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for metrics in order {
            let before = cpu_time();
            let rate = calls_per_second(if metrics { &on } else { &off }, 64, ROUND).await;
            let cpu = cpu_time().saturating_sub(before);
            if metrics {
                on_tput.push(rate);
                on_cpu += cpu;
                on_calls += rate * ROUND.as_secs_f64();
            } else {
                off_tput.push(rate);
                off_cpu += cpu;
                off_calls += rate * ROUND.as_secs_f64();
            }
        }
    }
    let (on_latency, off_latency) = paired_latencies(&on, &off, LATENCY_CALLS).await;

    // The metrics were really kept on one side and not on the other.
    let counted = |service: &Service| {
        service
            .node()
            .encode_metrics()
            .lines()
            .any(|l| l.starts_with("rpc_server_call_duration_seconds_count{"))
    };
    if !counted(&on_server) || counted(&off_server) {
        return Err("call metrics were not on and off as configured".into());
    }
    for service in [on_client, on_server, off_client, off_server] {
        service.stop().await.map_err(|e| e.to_string())?;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on_rate, off_rate) = (median(on_tput.clone()), median(off_tput.clone()));
    let cpu_per_call = |cpu: Duration, calls: f64| cpu.as_secs_f64() * 1e6 / calls.max(1.0);
    Ok(serde_json::json!({
        "scenario": "metrics-overhead",
        "rounds": rounds,
        "calls_per_second_64_in_flight": {
            "metrics_on": on_tput,
            "metrics_off": off_tput,
            "median_on": on_rate,
            "median_off": off_rate,
            "off_over_on": off_rate / on_rate,
        },
        "cpu_us_per_call": {
            "metrics_on": cpu_per_call(on_cpu, on_calls),
            "metrics_off": cpu_per_call(off_cpu, off_calls),
            "on_over_off": cpu_per_call(on_cpu, on_calls) / cpu_per_call(off_cpu, off_calls),
        },
        "latency_concurrency_1": {
            "metrics_on": percentiles(on_latency.clone()),
            "metrics_off": percentiles(off_latency.clone()),
            "p50_on_over_off": quantile_ms(&on_latency, 0.5) / quantile_ms(&off_latency, 0.5),
        },
    }))
}
