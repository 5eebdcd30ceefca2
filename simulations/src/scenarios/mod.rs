//! The scenarios.

mod auth_bench;
mod call_cost;
mod churn;
mod idle;
mod metrics_overhead;
mod pubsub_bench;
mod registry;
mod rpc_bench;
mod slow_hook;
mod store_bench;

use crate::measure::Options;

/// Every scenario: its name and what it measures.
pub(crate) const LIST: &[(&str, &str)] = &[
    (
        "idle",
        "start N nodes through one bootstrap; time to a full DHT view, memory per idle node",
    ),
    (
        "rpc-bench",
        "micromesh calls, streams and first calls against raw libp2p and gRPC (tonic), loopback TCP",
    ),
    (
        "pubsub-bench",
        "broker publish-to-deliver latency and delivery ratio against raw gossipsub, N nodes",
    ),
    (
        "store-bench",
        "store write and read latency against raw Kademlia put_record/get_record, N nodes",
    ),
    (
        "auth-bench",
        "unary call latency and calls/s with auth rules and grants enforced against auth off",
    ),
    (
        "churn",
        "a server and N short-lived nodes in turn (half stopped, half killed), TCP and QUIC: first-call latency",
    ),
    (
        "slow-hook",
        "call latency on a node whose gossip validation hook blocks, against the same without",
    ),
    (
        "call-cost",
        "call latency and CPU with 10, 1,000 and 10,000 instances in the view; selection among N",
    ),
    (
        "metrics-overhead",
        "calls/s, latency and CPU per call with call metrics on against off",
    ),
    (
        "registry",
        "register on one node: time until every node sees it; kill it: time until every node drops it",
    ),
];

pub(crate) async fn run(name: &str, options: &Options) -> Result<serde_json::Value, String> {
    match name {
        "idle" => idle::run(options).await,
        "registry" => registry::run(options).await,
        "churn" => churn::run(options).await,
        "call-cost" => call_cost::run(options).await,
        "metrics-overhead" => metrics_overhead::run(options).await,
        "slow-hook" => slow_hook::run(options).await,
        "rpc-bench" => rpc_bench::run(options).await,
        "pubsub-bench" => pubsub_bench::run(options).await,
        "store-bench" => store_bench::run(options).await,
        "auth-bench" => auth_bench::run(options).await,
        other => Err(format!("unknown scenario {other:?}")),
    }
}
