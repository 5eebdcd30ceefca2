//! The golden metrics of calls, on the serving and the calling side, named after OpenTelemetry's
//! RPC semantic conventions as Prometheus exposes them:
//!
//! - `rpc_server_call_duration_seconds` and `rpc_client_call_duration_seconds`: histograms of
//!   call latency, by `rpc_system` (`micromesh`), `rpc_service`, `rpc_method` and
//!   `rpc_response_status_code` (200 for success, the status code otherwise). Their `_count`
//!   series count calls, so request and error rates come from them.
//! - `rpc_server_calls_in_flight` and `rpc_client_calls_in_flight`: calls under way, by
//!   service and method.
//!
//! A server labels calls to endpoints it does not serve with the method `_OTHER`, so a caller
//! cannot make the number of series grow.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// The method label of calls to endpoints a server does not serve.
pub(crate) const OTHER_METHOD: &str = "_OTHER";

/// The status code counted for a call whose caller went away before its answer (as nginx's
/// 499): it has no status of its own.
pub(crate) const CALLER_GONE: u16 = 499;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc_system: &'static str,
    rpc_service: String,
    rpc_method: String,
    rpc_response_status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    rpc_system: &'static str,
    rpc_service: String,
    rpc_method: String,
}

/// Which side of a call the metrics describe.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    Server,
    Client,
}

/// Call latency and calls in flight of one side of one node.
#[derive(Clone)]
pub(crate) struct CallMetrics {
    duration: Family<CallLabels, Histogram>,
    in_flight: Family<MethodLabels, Gauge>,
    /// The series of each service and method met so far, so that a call finds them without
    /// building labels: service, then method.
    methods: Arc<RwLock<Methods>>,
    /// Off: calls are not counted (the series are registered, and stay empty).
    enabled: bool,
}

/// Service name, then method name.
type Methods = HashMap<String, HashMap<String, Arc<Method>>>;

/// The upper bounds of the latency buckets: 10 µs, doubling, 21 of them (about 10 s), then
/// everything above. The Prometheus histograms use the same bounds.
pub(crate) fn bucket_bounds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_01, 2.0, BUCKETS as u16)
}

/// Finite buckets; counts have one more, for what lies above.
pub(crate) const BUCKETS: usize = 21;

/// What one method's calls came to, since the node started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MethodTotals {
    pub(crate) service: String,
    pub(crate) method: String,
    pub(crate) calls: u64,
    /// Calls that ended with a status of 400 or more.
    pub(crate) errors: u64,
    /// Calls by latency bucket (see [`bucket_bounds`]), not cumulative; one more than the
    /// bounds.
    pub(crate) buckets: Vec<u64>,
}

/// The series of one service and method.
struct Method {
    /// Counts kept beside the Prometheus series, which cannot be read back.
    calls: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    buckets: [std::sync::atomic::AtomicU64; BUCKETS + 1],
    labels: MethodLabels,
    in_flight: Gauge,
    /// Its latency with status 200, the common case.
    ok: Histogram,
    /// Every latency series, for the other status codes.
    duration: Family<CallLabels, Histogram>,
}

impl CallMetrics {
    /// Registers the metrics of `side` in `registry` (the node's, at its root: the names are
    /// OpenTelemetry's, not micromesh's).
    pub(crate) fn register(registry: &mut Registry, side: Side, enabled: bool) -> Self {
        let metrics = Self {
            enabled,
            // 10 µs to about 10 s, doubling.
            duration: Family::new_with_constructor(|| Histogram::new(bucket_bounds())),
            in_flight: Family::default(),
            methods: Arc::default(),
        };
        let (prefix, whose) = match side {
            Side::Server => ("rpc_server", "served"),
            Side::Client => ("rpc_client", "made"),
        };
        let registry = registry.sub_registry_with_prefix(prefix);
        registry.register_with_unit(
            "call_duration",
            format!("Duration of calls {whose} by this node, by service, method and status code"),
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "calls_in_flight",
            format!("Calls {whose} by this node that are under way"),
            metrics.in_flight.clone(),
        );
        metrics
    }

    /// Counts a call as under way until [`Call::finish`] (or until dropped, as a call whose
    /// caller went away).
    pub(crate) fn start(&self, service: &str, method: &str) -> Call {
        let method = self.enabled.then(|| self.method(service, method));
        if let Some(method) = &method {
            method.in_flight.inc();
        }
        Call {
            method,
            started: Instant::now(),
        }
    }

    fn method(&self, service: &str, method: &str) -> Arc<Method> {
        let known = self
            .methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .and_then(|methods| methods.get(method))
            .cloned();
        if let Some(known) = known {
            return known;
        }
        let labels = MethodLabels {
            rpc_system: "micromesh",
            rpc_service: service.to_owned(),
            rpc_method: method.to_owned(),
        };
        let fresh = Method {
            calls: Default::default(),
            errors: Default::default(),
            buckets: Default::default(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            ok: self
                .duration
                .get_or_create(&call_labels(&labels, OK))
                .clone(),
            duration: self.duration.clone(),
            labels,
        };
        self.methods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.to_owned())
            .or_default()
            .entry(method.to_owned())
            .or_insert_with(|| Arc::new(fresh))
            .clone()
    }

    /// Every method's totals so far.
    pub(crate) fn totals(&self) -> Vec<MethodTotals> {
        use std::sync::atomic::Ordering::Relaxed;
        let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
        let mut totals: Vec<MethodTotals> = methods
            .values()
            .flat_map(HashMap::values)
            .map(|method| MethodTotals {
                service: method.labels.rpc_service.clone(),
                method: method.labels.rpc_method.clone(),
                calls: method.calls.load(Relaxed),
                errors: method.errors.load(Relaxed),
                buckets: method.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            })
            .collect();
        totals.sort_by(|a, b| (&a.service, &a.method).cmp(&(&b.service, &b.method)));
        totals
    }
}

const OK: u16 = 200;

fn call_labels(labels: &MethodLabels, code: u16) -> CallLabels {
    CallLabels {
        rpc_system: labels.rpc_system,
        rpc_service: labels.rpc_service.clone(),
        rpc_method: labels.rpc_method.clone(),
        rpc_response_status_code: code,
    }
}

/// A call under way; see [`CallMetrics::start`].
pub(crate) struct Call {
    /// `None` when call metrics are off, and once recorded.
    method: Option<Arc<Method>>,
    started: Instant,
}

impl Call {
    /// Ends the call with its status code.
    pub(crate) fn finish(mut self, code: u16) {
        self.record(code);
    }

    fn record(&mut self, code: u16) {
        let Some(method) = self.method.take() else {
            return;
        };
        method.in_flight.dec();
        let elapsed = self.started.elapsed().as_secs_f64();
        {
            use std::sync::atomic::Ordering::Relaxed;
            method.calls.fetch_add(1, Relaxed);
            if code >= 400 {
                method.errors.fetch_add(1, Relaxed);
            }
            let bucket = bucket_bounds()
                .position(|bound| elapsed <= bound)
                .unwrap_or(BUCKETS);
            method.buckets[bucket].fetch_add(1, Relaxed);
        }
        match code {
            OK => method.ok.observe(elapsed),
            code => method
                .duration
                .get_or_create(&call_labels(&method.labels, code))
                .observe(elapsed),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record(CALLER_GONE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_method_and_code_and_leave_the_in_flight_gauge() {
        let mut registry = Registry::default();
        let metrics = CallMetrics::register(&mut registry, Side::Server, true);
        let ok = metrics.start("greeter", "Greeter.Hello");
        let dropped = metrics.start("greeter", "Greeter.Hello");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"rpc_server_calls_in_flight{rpc_system="micromesh",rpc_service="greeter",rpc_method="Greeter.Hello"} 2"#),
            "{text}"
        );
        ok.finish(200);
        drop(dropped);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"rpc_server_calls_in_flight{rpc_system="micromesh",rpc_service="greeter",rpc_method="Greeter.Hello"} 0"#),
            "{text}"
        );
        for code in [200, CALLER_GONE] {
            let series = format!(
                r#"rpc_server_call_duration_seconds_count{{rpc_system="micromesh",rpc_service="greeter",rpc_method="Greeter.Hello",rpc_response_status_code="{code}"}} 1"#
            );
            assert!(text.contains(&series), "{series} in {text}");
        }
    }

    #[test]
    fn calls_are_not_counted_when_off() {
        let mut registry = Registry::default();
        let metrics = CallMetrics::register(&mut registry, Side::Client, false);
        metrics.start("greeter", "Greeter.Hello").finish(200);
        drop(metrics.start("greeter", "Greeter.Hello"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("Greeter.Hello"), "{text}");
        assert!(
            !text.contains("rpc_client_call_duration_seconds_count"),
            "{text}"
        );
    }
}
