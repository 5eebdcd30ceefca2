//! What `Debug.Health` and `Debug.Stats` answer.

use serde::{Deserialize, Serialize};

/// `Debug.Health`: whether the service takes calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Health {
    /// `serving`, or `stopping` once the service began to stop.
    pub status: String,
    /// The service's name.
    pub service: String,
    /// The service's version.
    pub version: String,
}

impl Health {
    /// Whether the service takes calls.
    pub fn is_serving(&self) -> bool {
        self.status == "serving"
    }
}

/// `Debug.Stats`: the service's process and traffic, as go-micro's `debug.Stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// The service's name.
    pub service: String,
    /// The service's version.
    pub version: String,
    /// The node's peer id.
    pub peer_id: String,
    /// When the service started, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// The process's resident memory, where the platform tells it (Linux).
    pub memory_bytes: Option<u64>,
    /// The process's threads, where the platform tells it (Linux).
    pub threads: Option<u64>,
    /// Calls the service received.
    pub requests: u64,
    /// Calls answered with an error status, and calls refused before a handler ran.
    pub errors: u64,
    /// Calls under way.
    pub in_flight: u64,
    /// Peers the node has a connection to.
    pub connections: u64,
    /// The calls served, by endpoint, since the service started.
    #[serde(default)]
    pub endpoints: Vec<EndpointStats>,
}

/// The calls one endpoint served, since the service started: what `micromesh top` turns into
/// rates and quantiles by comparing two of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EndpointStats {
    /// The endpoint, e.g. `Greeter.Hello`; `_OTHER` for calls to endpoints not served.
    pub method: String,
    /// Calls answered (or abandoned by their caller).
    pub calls: u64,
    /// Calls that ended with a status of 400 or more.
    pub errors: u64,
    /// Calls by latency: one count per bucket of [`latency_bounds`], then one for slower
    /// calls. Not cumulative.
    pub latency_buckets: Vec<u64>,
}

impl EndpointStats {
    /// What happened between `earlier` (a previous reading of the same endpoint) and this
    /// one. Counts that went down (the service restarted) start over from zero.
    pub fn since(&self, earlier: &EndpointStats) -> EndpointStats {
        let restarted = self.calls < earlier.calls;
        let minus = |now: u64, then: u64| {
            if restarted {
                now
            } else {
                now.saturating_sub(then)
            }
        };
        EndpointStats {
            method: self.method.clone(),
            calls: minus(self.calls, earlier.calls),
            errors: minus(self.errors, earlier.errors),
            latency_buckets: self
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(i, now)| minus(*now, earlier.latency_buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The latency below which a fraction `q` of the calls fell, in seconds, interpolated
    /// within its bucket as Prometheus's `histogram_quantile` does; `None` without calls.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let bounds = latency_bounds();
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, count) in self.latency_buckets.iter().enumerate() {
            if *count > 0 && (below + count) as f64 >= rank {
                let Some(upper) = bounds.get(i) else {
                    // Above the last bound: say the last bound, as Prometheus does.
                    return bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
                let within = (rank - below as f64) / *count as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        bounds.last().copied()
    }
}

/// The upper bounds of [`EndpointStats::latency_buckets`], in seconds: 10 µs, doubling, to
/// about 10 s.
pub fn latency_bounds() -> Vec<f64> {
    crate::transport::metrics::bucket_bounds().collect()
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn deltas_and_quantiles() {
        let bounds = latency_bounds();
        assert_eq!(bounds.len(), 21);
        assert!((bounds[0] - 0.000_01).abs() < 1e-12);
        let mut buckets = vec![0; 22];
        buckets[3] = 90; // 40..80 µs
        buckets[10] = 10; // 5.12..10.24 ms
        let earlier = EndpointStats {
            method: "A.B".into(),
            calls: 5,
            errors: 1,
            latency_buckets: vec![0; 22],
        };
        let now = EndpointStats {
            method: "A.B".into(),
            calls: 105,
            errors: 3,
            latency_buckets: buckets,
        };
        let window = now.since(&earlier);
        assert_eq!((window.calls, window.errors), (100, 2));
        let p50 = window.latency_quantile(0.5).unwrap();
        assert!(p50 > 0.000_04 && p50 <= 0.000_08, "{p50}");
        let p99 = window.latency_quantile(0.99).unwrap();
        assert!(p99 > 0.005 && p99 <= 0.011, "{p99}");
        // A restart: the counts start over.
        assert_eq!(earlier.since(&now).calls, 5);
        let empty = EndpointStats {
            latency_buckets: vec![0; 22],
            ..earlier
        };
        assert_eq!(empty.latency_quantile(0.5), None);
    }
}

/// The process's resident memory in bytes and its thread count, from `/proc/self/status`.
pub(crate) fn process() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    (field("VmRSS:").map(|kib| kib * 1024), field("Threads:"))
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn linux_tells_memory_and_threads() {
        let (memory, threads) = super::process();
        assert!(memory.is_some_and(|m| m > 1 << 20), "{memory:?}");
        assert!(threads.is_some_and(|t| t >= 1), "{threads:?}");
    }
}
