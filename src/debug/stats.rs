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
