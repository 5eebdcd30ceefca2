//! Command-line options and measurements shared by the scenarios.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, future::BoxFuture};

/// Options every scenario understands.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) nodes: usize,
    pub(crate) rounds: usize,
    /// Messages (or calls) per second, for scenarios that pace their load.
    pub(crate) rate: usize,
}

impl Options {
    pub(crate) fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut options = Options {
            nodes: 100,
            rounds: 5,
            rate: 20,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| format!("{name} needs a value"))?
                    .parse::<usize>()
                    .map_err(|e| format!("{name}: {e}"))
            };
            match arg.as_str() {
                "--nodes" => options.nodes = value("--nodes")?,
                "--rounds" => options.rounds = value("--rounds")?,
                "--rate" => options.rate = value("--rate")?.max(1),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if options.nodes < 2 {
            return Err("--nodes must be at least 2".into());
        }
        Ok(options)
    }
}

/// The resident set size of this process, in bytes (Linux; 0 elsewhere).
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time this process has used: the sum over its threads of `/proc/self/task/*/schedstat`
/// (nanoseconds; Linux), else user and system time from `/proc/self/stat` (10 ms ticks), else
/// zero. Threads that have ended are not counted: measure across spans in which the runtime's
/// threads live.
pub(crate) fn cpu_time() -> Duration {
    if let Some(ns) = schedstat_ns() {
        return Duration::from_nanos(ns);
    }
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

fn schedstat_ns() -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let path = entry.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// The `q` quantile (0 to 1) of `samples`, in milliseconds; NaN when there are none.
pub(crate) fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0
}

/// Percentiles of a set of durations, in milliseconds.
pub(crate) fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::json!(null);
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    serde_json::json!({
        "count": samples.len(),
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
    })
}

/// One call of a benchmark: a closure making a future per call.
pub(crate) type Call = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The latency of `n` calls of `a` and `n` calls of `b`, made one at a time and interleaved
/// (a b, b a, a b, …), so that a burst of load from elsewhere on the machine falls on both series
/// alike instead of on whichever was running: what makes a p99 ratio worth reading on a shared
/// machine.
pub(crate) async fn paired_latencies(
    a: &Call,
    b: &Call,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut samples = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let call = if which == 0 { a } else { b };
            let started = Instant::now();
            call().await;
            samples[which].push(started.elapsed());
        }
    }
    let [of_a, of_b] = samples;
    (of_a, of_b)
}

/// Calls per second with `in_flight` calls kept running for `duration`.
pub(crate) async fn calls_per_second(call: &Call, in_flight: usize, duration: Duration) -> f64 {
    load(call, in_flight, duration).await.calls_per_second
}

/// What a run of calls under load achieved, and what it cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) calls_per_second: f64,
    /// CPU time of the whole process (client and server, which share it) per call, in µs.
    pub(crate) cpu_us_per_call: f64,
}

impl Load {
    /// The mean of each figure over `runs`.
    pub(crate) fn mean(runs: &[Load]) -> Load {
        let n = runs.len().max(1) as f64;
        Load {
            calls_per_second: runs.iter().map(|l| l.calls_per_second).sum::<f64>() / n,
            cpu_us_per_call: runs.iter().map(|l| l.cpu_us_per_call).sum::<f64>() / n,
        }
    }
}

/// Runs `call` with `in_flight` calls kept running for `duration`: calls per second, and the
/// process's CPU time per call.
pub(crate) async fn load(call: &Call, in_flight: usize, duration: Duration) -> Load {
    let cpu = cpu_time();
    let started = Instant::now();
    let mut done = 0u64;
    let mut running = futures::stream::FuturesUnordered::new();
    for _ in 0..in_flight {
        running.push(call());
    }
    while running.next().await.is_some() {
        done += 1;
        if started.elapsed() < duration {
            running.push(call());
        }
    }
    let cpu = cpu_time().saturating_sub(cpu);
    Load {
        calls_per_second: done as f64 / started.elapsed().as_secs_f64(),
        cpu_us_per_call: cpu.as_secs_f64() * 1e6 / done.max(1) as f64,
    }
}

/// The benchmarks' echo endpoint: answers with the body it got.
pub(crate) async fn echo(
    _: micromesh::Context,
    body: serde_bytes::ByteBuf,
) -> Result<serde_bytes::ByteBuf, micromesh::Status> {
    Ok(body)
}

/// The benchmarks' sink: a client stream whose answer is the number of bytes it carried, for
/// the sender to check that none was lost.
pub(crate) async fn count_bytes(
    _: micromesh::Context,
    mut chunks: micromesh::server::Streaming<serde_bytes::ByteBuf>,
) -> Result<u64, micromesh::Status> {
    let mut total = 0u64;
    while let Some(chunk) = chunks.message().await {
        total += chunk?.len() as u64;
    }
    Ok(total)
}
