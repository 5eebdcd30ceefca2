//! `churn`: a server, and short-lived nodes that join it one after another on loopback sockets.
//! Each resolves the server's service by name, calls it once, and stops: half of them
//! gracefully, half killed. Over TCP and over QUIC. Measures each fresh node's first call
//! (from `build` to the reply), and checks that the nodes that went away left the server's DHT
//! routing table.
//!
//! The nodes use default settings: they listen, so their DHT runs in server mode, which is what
//! once made a departed node's entry linger and later lookups wait on dials to it.

use std::time::{Duration, Instant};

use micromesh::{
    Context, Multiaddr, PeerId, Service, Status,
    client::CallOptions,
    testing::{Process, wait_until},
};

use crate::measure::{Options, percentiles, quantile_ms};

/// The service every short-lived node calls.
const SERVICE: &str = "bench";
/// How long a first call may take before it counts as timed out: below the node's connection
/// timeout (3 s), so a call that waited on a dial to a departed peer counts.
const CALL_TIMEOUT: Duration = Duration::from_millis(2_500);

/// A transport the scenario runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    fn listen(self) -> Multiaddr {
        match self {
            Self::Tcp => "/ip4/127.0.0.1/tcp/0",
            Self::Quic => "/ip4/127.0.0.1/udp/0/quic-v1",
        }
        .parse()
        .expect("a valid address")
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Quic => "quic",
        }
    }
}

/// What one run saw.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The first connection of the process over the transport, before the run.
    pub(crate) warm_up: Duration,
    /// Each fresh node's first call, from `build` to the reply, in order.
    pub(crate) first_calls: Vec<Duration>,
    /// The part of each first call spent in `build` (joining the mesh), in order.
    pub(crate) joins: Vec<Duration>,
    /// Calls that failed or took longer than [`CALL_TIMEOUT`], with why.
    pub(crate) failed: Vec<String>,
    /// Departed nodes still in the server's routing table once every liveness check had its
    /// time, with whether each was killed (rather than stopped).
    pub(crate) lingering: Vec<(PeerId, bool)>,
}

fn node(name: &str, network: &str, transport: Transport) -> micromesh::service::Builder {
    Service::builder(name)
        .network(network)
        .listen(transport.listen())
        .configure_node(|n| n.mdns(false).upnp(false).autonat(false).memory_limit(None))
}

/// Connects two throwaway nodes over `transport` and returns how long it took: the first
/// TLS (or QUIC) handshake of a process pays for the crypto library's one-time set-up, a cost of
/// starting a process rather than of joining a mesh with churn, and is kept out of the figures.
async fn warm_up(transport: Transport) -> Result<Duration, String> {
    let network = format!("sim-churn-warm-up-{}", transport.name());
    let started = Instant::now();
    let first = node("warm-up", &network, transport)
        .register(false)
        .build()
        .await
        .map_err(|e| format!("warm-up: {e}"))?;
    let addr = first
        .node()
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?
        .remove(0);
    let second = node("warm-up", &network, transport)
        .register(false)
        .bootstrap(addr)
        .build()
        .await
        .map_err(|e| format!("warm-up: {e}"))?;
    let peer = first.peer_id();
    wait_until(Duration::from_secs(10), || async {
        let peers = second.node().peers().await.unwrap_or_default();
        peers.iter().any(|p| p.peer_id == peer)
    })
    .await
    .map_err(|e| format!("warm-up: {e}"))?;
    let took = started.elapsed();
    second.stop().await.map_err(|e| e.to_string())?;
    first.stop().await.map_err(|e| e.to_string())?;
    Ok(took)
}

/// Runs `clients` short-lived nodes against one server over `transport`.
pub(crate) async fn churn(transport: Transport, clients: usize) -> Result<Outcome, String> {
    let network = format!("sim-churn-{}", transport.name());
    let warm_up = warm_up(transport).await?;
    let server = node(SERVICE, &network, transport)
        .handle("Bench.Echo", |_: Context, n: u64| async move {
            Ok::<_, Status>(n)
        })
        .build()
        .await
        .map_err(|e| format!("server: {e}"))?;
    let addr = server
        .node()
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?
        .remove(0);
    let mut first_calls = Vec::with_capacity(clients);
    let mut joins = Vec::with_capacity(clients);
    let mut failed = Vec::new();
    let mut departed = Vec::with_capacity(clients);
    for i in 0..clients {
        // Each short-lived node runs as if in a process of its own, so that a killed one goes
        // silent the way a killed process does.
        let started = Instant::now();
        let client = Process::start(
            node("client", &network, transport)
                .register(false)
                .bootstrap(addr.clone()),
        )
        .await
        .map_err(|e| format!("client {i}: {e}"))?;
        joins.push(started.elapsed());
        let reply = client
            .run(move |client| async move {
                client
                    .client()
                    .call_with::<_, u64>(
                        SERVICE,
                        "Bench.Echo",
                        &(i as u64),
                        CallOptions::default().timeout(CALL_TIMEOUT),
                    )
                    .await
            })
            .await;
        let took = started.elapsed();
        first_calls.push(took);
        match reply {
            Ok(n) if n == i as u64 => {}
            Ok(n) => failed.push(format!("client {i}: got {n} back")),
            Err(e) => failed.push(format!("client {i} after {took:?}: {e}")),
        }
        departed.push(client.service().peer_id());
        if i % 2 == 0 {
            client
                .stop()
                .await
                .map_err(|e| format!("client {i}: {e}"))?;
        } else {
            client.crash();
        }
    }
    // Graceful leavers are gone from the routing table at once; killed ones once the server's
    // liveness dial fails (a QUIC peer is noticed after the connection's idle timeout).
    let server_node = server.node().clone();
    let settled = wait_until(Duration::from_secs(30), || async {
        let table = server_node.dht_peers().await.unwrap_or_default();
        !table.iter().any(|p| departed.contains(&p.peer_id))
    })
    .await;
    let lingering = match settled {
        Ok(()) => Vec::new(),
        Err(_) => server_node
            .dht_peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                let at = departed.iter().position(|d| *d == p.peer_id)?;
                Some((p.peer_id, at % 2 == 1))
            })
            .collect(),
    };
    server.stop().await.map_err(|e| e.to_string())?;
    Ok(Outcome {
        warm_up,
        first_calls,
        joins,
        failed,
        lingering,
    })
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let mut reports = Vec::new();
    for transport in [Transport::Tcp, Transport::Quic] {
        let outcome = churn(transport, options.nodes).await?;
        let first_ten = &outcome.first_calls[..outcome.first_calls.len().min(10)];
        let (max_at, max) = outcome
            .first_calls
            .iter()
            .copied()
            .enumerate()
            .max_by_key(|(_, d)| *d)
            .unwrap_or_default();
        reports.push(serde_json::json!({
            "transport": transport.name(),
            "clients": options.nodes,
            "process_warm_up_ms": outcome.warm_up.as_secs_f64() * 1e3,
            "first_call": percentiles(outcome.first_calls.clone()),
            "join": percentiles(outcome.joins.clone()),
            "first_ten_ms": first_ten.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "first_ten_p50_ms": quantile_ms(first_ten, 0.5),
            "max_over_first_ten_p50": max.as_secs_f64() * 1e3 / quantile_ms(first_ten, 0.5),
            "slowest_client": max_at,
            "failed_or_timed_out": outcome.failed.len(),
            "failures": outcome.failed,
            "departed_still_in_routing_table": outcome.lingering.len(),
            "of_which_killed": outcome.lingering.iter().filter(|(_, killed)| *killed).count(),
        }));
    }
    Ok(serde_json::json!({
        "scenario": "churn",
        "call_timeout_ms": CALL_TIMEOUT.as_millis() as u64,
        "runs": reports,
    }))
}

#[cfg(test)]
mod tests {
    use super::{Transport, churn};

    /// The small version: 20 short-lived nodes per transport. Every first call succeeds within
    /// the call timeout, which is below the connection timeout, so no call waited on a dial to
    /// a departed node; and every departed node left the server's routing table.
    async fn check(transport: Transport) {
        let outcome = churn(transport, 20).await.unwrap();
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        assert!(
            outcome.lingering.is_empty(),
            "departed nodes still in the routing table: {:?}",
            outcome.lingering
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_lived_nodes_over_tcp_keep_first_calls_fast() {
        check(Transport::Tcp).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_lived_nodes_over_quic_keep_first_calls_fast() {
        check(Transport::Quic).await;
    }
}
