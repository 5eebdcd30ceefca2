//! `metrics-overhead`: what the call metrics and call tracing cost.
//!
//! Two pairs of services on the memory transport, each a server and a client: one with call
//! metrics on (the default: `rpc_server_*` and `rpc_client_*` on both sides), one with them off
//! (`transport::Config::call_metrics(false)`). The process's subscriber holds
//! [`micromesh::debug::trace_layer`] behind a switch: with it on, every call's client and server
//! spans are made and kept for `Debug.Trace` (as in `micromesh node`); with it off, the call
//! spans are disabled, as in a program that logs at `info` without the layer. Three modes,
//! measured in alternation so that the machine's drift falls on all: both off, metrics only,
//! metrics and tracing. Calls/s with 64 in flight (rounds of 2 s), latency at concurrency 1, and
//! CPU per call.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use micromesh::{Context, Service, Status, node::Preset, transport};
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::measure::{
    Call, Options, calls_per_second, cpu_time, paired_latencies, percentiles, quantile_ms,
};

const LATENCY_CALLS: usize = 3_000;
const ROUND: Duration = Duration::from_secs(2);

/// Whether the span layer keeps call spans now.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Switches the span layer on or off. Its filter's answer is cached per call site, so every
/// call site is asked again: off, the call spans are disabled where they are made, as in a
/// process without the layer.
fn set_tracing(on: bool) {
    if TRACING.swap(on, Ordering::Relaxed) != on {
        tracing::callsite::rebuild_interest_cache();
    }
}
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

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    Metrics,
    MetricsAndTracing,
}

const MODES: [Mode; 3] = [Mode::Off, Mode::Metrics, Mode::MetricsAndTracing];

/// The latency of calls one at a time, `BLOCK` with tracing on (`traced`) and `BLOCK` of
/// `off`, in alternating blocks: switching the layer rebuilds every call site's interest, which
/// is kept out of the timings.
async fn block_latencies(traced: &Call, off: &Call, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    const BLOCK: usize = 100;
    let (mut on_samples, mut off_samples) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while on_samples.len() < n {
        for tracing_on in [true, false] {
            set_tracing(tracing_on);
            let (call, samples) = match tracing_on {
                true => (traced, &mut on_samples),
                false => (off, &mut off_samples),
            };
            for _ in 0..BLOCK {
                let started = std::time::Instant::now();
                call().await;
                samples.push(started.elapsed());
            }
        }
    }
    (on_samples, off_samples)
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    tracing_subscriber::registry()
        .with(micromesh::debug::trace_layer())
        // The switch, as a global filter in front of the layer's own: off, every call site is
        // disabled; on, the call spans alone are enabled, as in a process that has the layer.
        // (A switch that enabled everything would turn every other call site's interest from
        // "never" into "sometimes", and put a filter check on every log line of the stack.)
        .with(
            tracing_subscriber::filter::filter_fn(|metadata| {
                TRACING.load(Ordering::Relaxed)
                    && metadata.is_span()
                    && metadata.fields().field("trace_id").is_some()
            })
            .with_max_level_hint(tracing_subscriber::filter::LevelFilter::DEBUG),
        )
        .try_init()
        .map_err(|_| "metrics-overhead installs its own subscriber: run it without RUST_LOG")?;
    let (on_server, on_client) = pair("sim-metrics-on", true).await?;
    let (off_server, off_client) = pair("sim-metrics-off", false).await?;
    let (on, off) = (caller(&on_client), caller(&off_client));
    // Warm-up: connections, kept streams, the registry views.
    for _ in 0..300 {
        on().await;
        off().await;
    }

    let rounds = options.rounds.max(2);
    let mut tput = [Vec::new(), Vec::new(), Vec::new()];
    let mut cpu = [Duration::ZERO; 3];
    let mut calls = [0.0f64; 3];
    for round in 0..rounds {
        // Rotating which goes first.
        for k in 0..MODES.len() {
            let i = (round + k) % MODES.len();
            let mode = MODES[i];
            set_tracing(mode == Mode::MetricsAndTracing);
            let before = cpu_time();
            let rate =
                calls_per_second(if mode == Mode::Off { &off } else { &on }, 64, ROUND).await;
            cpu[i] += cpu_time().saturating_sub(before);
            tput[i].push(rate);
            calls[i] += rate * ROUND.as_secs_f64();
        }
    }
    set_tracing(false);
    let (traced_latency, off_latency) = block_latencies(&on, &off, LATENCY_CALLS).await;
    let (metrics_latency, off_latency_2) = paired_latencies(&on, &off, LATENCY_CALLS).await;

    // The metrics were really kept on one side and not on the other, and spans were kept.
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
    let spans = on_client
        .client()
        .call::<_, Vec<micromesh::debug::SpanRecord>>(
            "echo",
            micromesh::debug::TRACE,
            &micromesh::debug::TraceRequest::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    if !spans
        .iter()
        .any(|s| s.attribute("rpc.method") == Some("Echo.Echo"))
    {
        return Err(format!("no call span was kept with tracing on: {spans:?}"));
    }
    for service in [on_client, on_server, off_client, off_server] {
        service.stop().await.map_err(|e| e.to_string())?;
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rate = |i: usize| median(&tput[i]);
    let per_call = |i: usize| cpu[i].as_secs_f64() * 1e6 / calls[i].max(1.0);
    Ok(serde_json::json!({
        "scenario": "metrics-overhead",
        "rounds": rounds,
        "calls_per_second_64_in_flight": {
            "off": tput[0],
            "metrics": tput[1],
            "metrics_and_tracing": tput[2],
            "median_off": rate(0),
            "median_metrics": rate(1),
            "median_metrics_and_tracing": rate(2),
            "off_over_metrics": rate(0) / rate(1),
            "off_over_metrics_and_tracing": rate(0) / rate(2),
        },
        "cpu_us_per_call": {
            "off": per_call(0),
            "metrics": per_call(1),
            "metrics_and_tracing": per_call(2),
            "metrics_over_off": per_call(1) / per_call(0),
            "metrics_and_tracing_over_off": per_call(2) / per_call(0),
        },
        "latency_concurrency_1": {
            "off": percentiles(off_latency.clone()),
            "metrics": percentiles(metrics_latency.clone()),
            "metrics_and_tracing": percentiles(traced_latency.clone()),
            "p50_metrics_over_off": quantile_ms(&metrics_latency, 0.5) / quantile_ms(&off_latency_2, 0.5),
            "p50_metrics_and_tracing_over_off": quantile_ms(&traced_latency, 0.5) / quantile_ms(&off_latency, 0.5),
        },
    }))
}
