//! `auth-bench`: the cost of enforcement on unary calls, auth on against auth off, in one run.
//!
//! Two server/client pairs on loopback TCP. Off: no rules, no trusted issuer (the default).
//! On: the server trusts an issuer, denies the service to everyone at priority 0 and allows it
//! to role `caller` at priority 10; the client presents a grant of that role. Each call is
//! checked against the rules with the caller's grants (asked for once per connection, then
//! held). Figures: the first call of each client (it pays the grant exchange when auth is on),
//! latency p50/p99 at concurrency 1, and calls/s with 64 in flight; the two pairs alternate,
//! `--rounds` times.

use std::{sync::Arc, time::Duration};

use micromesh::{
    Context, Identity, Service, Status,
    auth::{self, Grant},
    client::CallOptions,
    testing::wait_until,
};
use serde_bytes::ByteBuf;

use crate::measure::{Call, Options, calls_per_second, paired_latencies, percentiles, quantile_ms};

struct Pair {
    server: Service,
    client: Service,
}

async fn pair(
    network: &str,
    server_auth: auth::Config,
    client_auth: auth::Config,
    client_id: Identity,
) -> Result<Pair, String> {
    let local =
        |n: micromesh::node::Builder| n.mdns(false).upnp(false).autonat(false).memory_limit(None);
    let server = Service::builder("bench")
        .network(network)
        .listen("/ip4/127.0.0.1/tcp/0".parse().expect("valid"))
        .configure_node(local)
        .auth(server_auth)
        .handle("Bench.Echo", |_: Context, body: ByteBuf| async move {
            Ok::<_, Status>(body)
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
    let client = Service::builder("bench-client")
        .network(network)
        .identity(client_id)
        .register(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().expect("valid"))
        .bootstrap(addr)
        .configure_node(local)
        .auth(client_auth)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let registry = client.registry().clone();
    wait_until(Duration::from_secs(20), || async {
        registry.get_service("bench").await.is_ok()
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(Pair { server, client })
}

fn caller(service: &Service) -> Call {
    let c = service.client().clone();
    let payload = ByteBuf::from(vec![0x5au8; 64]);
    Arc::new(move || {
        let c = c.clone();
        let payload = payload.clone();
        Box::pin(async move {
            let options = CallOptions::default().timeout(Duration::from_secs(60));
            let reply: Result<ByteBuf, _> =
                c.call_with("bench", "Bench.Echo", &payload, options).await;
            if let Err(e) = reply {
                panic!("call failed: {e}");
            }
        })
    })
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let rounds = options.rounds.clamp(1, 8);
    let issuer = Identity::generate();
    let caller_id = Identity::generate();
    let grant = Grant::builder(caller_id.peer_id())
        .role("caller")
        .valid_for(Duration::from_secs(24 * 3600))
        .sign(&issuer, "bench-on")
        .map_err(|e| e.to_string())?;
    let rules = auth::Config::new()
        .trust(issuer.peer_id())
        .rule(
            "deny service:bench any 0"
                .parse()
                .map_err(|e: auth::RuleError| e.to_string())?,
        )
        .rule(
            "allow service:bench role:caller 10"
                .parse()
                .map_err(|e: auth::RuleError| e.to_string())?,
        );
    let off = pair(
        "bench-off",
        auth::Config::new(),
        auth::Config::new(),
        Identity::generate(),
    )
    .await?;
    let on = pair("bench-on", rules.clone(), rules.grant(grant), caller_id).await?;
    let (off_call, on_call) = (caller(&off.client), caller(&on.client));

    // The first call of each client: with auth on, it pays the grant exchange.
    let (first_off, first_on) = paired_latencies(&off_call, &on_call, 1).await;
    let (first_off, first_on) = (first_off[0], first_on[0]);
    eprintln!("warm-up");
    paired_latencies(&off_call, &on_call, 300).await;

    let (mut off_lat, mut on_lat, mut off_tput, mut on_tput) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("round {}", round + 1);
        let (off, on) = paired_latencies(&off_call, &on_call, 1000).await;
        off_lat.extend(off);
        on_lat.extend(on);
        off_tput.push(calls_per_second(&off_call, 64, Duration::from_secs(3)).await);
        on_tput.push(calls_per_second(&on_call, 64, Duration::from_secs(3)).await);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let report = serde_json::json!({
        "scenario": "auth-bench",
        "rounds": rounds,
        "first_call_ms": {
            "auth_off": first_off.as_secs_f64() * 1e3,
            "auth_on": first_on.as_secs_f64() * 1e3,
        },
        "latency_c1": { "auth_off": percentiles(off_lat.clone()), "auth_on": percentiles(on_lat.clone()) },
        "latency_p50_ratio": quantile_ms(&on_lat, 0.5) / quantile_ms(&off_lat, 0.5),
        "latency_p99_ratio": quantile_ms(&on_lat, 0.99) / quantile_ms(&off_lat, 0.99),
        "calls_per_second_64_in_flight": { "auth_off": off_tput, "auth_on": on_tput },
        "throughput_ratio": mean(&on_tput) / mean(&off_tput),
    });
    for p in [on, off] {
        let _ = p.client.stop().await;
        let _ = p.server.stop().await;
    }
    Ok(report)
}
