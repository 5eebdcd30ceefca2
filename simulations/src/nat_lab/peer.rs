//! The micromesh nodes of the lab, one process each, run inside a namespace by the lab:
//! `micromesh-simulations nat-peer <role> ...`. Each prints JSON lines on stdout.
//!
//! - `public --port P [--bootstrap ADDR]`: an ordinary node on the internet's address. Nothing
//!   is configured to make it a relay: it offers relay service because AutoNAT finds it
//!   reachable.
//! - `server --name NAME --bootstrap ADDR...`: serves `NAME` (`Lab.Echo`, `Lab.Sink`); says
//!   `ready` once peers can reach it: through a relay it found, or at an address confirmed
//!   from outside.
//! - `client --target NAME --bootstrap ADDR... --calls N --stream-mib M --direct-wait S`: a
//!   fresh node that calls `NAME`, waits for a direct connection, makes N calls
//!   ([`IN_FLIGHT`] at a time) and streams M MiB, and prints what it measured.
//! - `delay --ms D`: not a node; holds the namespace's outgoing packets (see [`super::delay`]).
//!
//! Every node runs with the production preset; the only lab-specific setting is that AutoNAT
//! counts the lab's private addresses as public (`private_addresses_are_public`), since the
//! lab's internet is 10.99.0.0/24. mDNS and UPnP are off: the lab's routers answer neither.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use micromesh::{Multiaddr, PeerId, Service, client::CallOptions};
use serde_bytes::ByteBuf;
use serde_json::json;

/// How long a client tries before it says the pair does not connect.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);
/// How long a server waits to be reachable.
const READY_WITHIN: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// The size of each message of the stream.
const CHUNK: usize = 64 << 10;
/// How many of a client's calls are in flight at once: on a link with delay, a thousand calls
/// one after another would take a thousand round trips.
const IN_FLIGHT: usize = 16;

struct Args(Vec<String>);

impl Args {
    fn values(&self, name: &str) -> Vec<String> {
        self.0
            .windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].clone())
            .collect()
    }

    fn value(&self, name: &str) -> Result<String, String> {
        self.values(name)
            .pop()
            .ok_or_else(|| format!("nat-peer: {name} is required"))
    }

    fn number(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.values(name).pop() {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("nat-peer: {name} takes a number, got {v:?}")),
        }
    }

    fn bootstrap(&self) -> Result<Vec<Multiaddr>, String> {
        self.values("--bootstrap")
            .iter()
            .map(|a| a.parse().map_err(|e| format!("--bootstrap {a}: {e}")))
            .collect()
    }
}

fn say(line: serde_json::Value) {
    println!("{line}");
}

fn builder(name: &str, bootstrap: &[Multiaddr]) -> micromesh::service::Builder {
    let mut builder = Service::builder(name)
        .network("nat-lab")
        .configure_node(|n| n.mdns(false).upnp(false).private_addresses_are_public(true));
    for addr in bootstrap {
        builder = builder.bootstrap(addr.clone());
    }
    builder
}

/// Runs the role named by the first argument; returns when the role is done (a client) or
/// when stdin closes (the others: the lab holds their stdin).
pub(crate) async fn run(args: Vec<String>) -> Result<(), String> {
    let started = Instant::now();
    let role = args.first().cloned().unwrap_or_default();
    let args = Args(args);
    match role.as_str() {
        "public" => public(&args).await,
        "server" => server(&args).await,
        "client" => client(&args, started).await,
        "delay" => {
            let delay = Duration::from_millis(args.number("--ms", 20)?);
            tokio::task::spawn_blocking(move || super::delay::run(delay))
                .await
                .map_err(|e| e.to_string())?
        }
        other => Err(format!(
            "nat-peer: unknown role {other:?} (public, server, client or delay)"
        )),
    }
}

/// Waits until the lab closes stdin, then stops `service`.
async fn serve_until_stdin_closes(service: Service) -> Result<(), String> {
    use tokio::io::AsyncReadExt as _;
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    service.stop().await.map_err(|e| e.to_string())
}

async fn public(args: &Args) -> Result<(), String> {
    let port = args.number("--port", 4001)?;
    let ip = super::net::PUBLIC_IP;
    let service = builder("lab-public", &args.bootstrap()?)
        .register(false)
        .listen(format!("/ip4/{ip}/tcp/{port}").parse().expect("valid"))
        .listen(
            format!("/ip4/{ip}/udp/{port}/quic-v1")
                .parse()
                .expect("valid"),
        )
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let addrs = service
        .node()
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?;
    let tcp = addrs
        .iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .ok_or("the public node has no TCP address")?;
    say(json!({ "event": "ready", "address": tcp.to_string() }));
    serve_until_stdin_closes(service).await
}

async fn server(args: &Args) -> Result<(), String> {
    let name = args.value("--name")?;
    let service = builder(&name, &args.bootstrap()?)
        .handle("Lab.Echo", crate::measure::echo)
        .client_stream("Lab.Sink", crate::measure::count_bytes)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let node = service.node().clone();
    let deadline = Instant::now() + READY_WITHIN;
    let (via, addrs) = loop {
        // Relayed addresses count as external once the relay granted the reservation.
        let external = node.external_addrs().await.map_err(|e| e.to_string())?;
        let (relayed, direct): (Vec<Multiaddr>, Vec<Multiaddr>) =
            external.into_iter().partition(is_relayed);
        if !direct.is_empty() {
            break ("public address", direct);
        }
        if !relayed.is_empty() {
            break ("relay", relayed);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name} found neither a relay nor an external address in {READY_WITHIN:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    say(json!({ "event": "ready", "reachable_via": via, "addresses": addrs }));
    serve_until_stdin_closes(service).await
}

/// Whether this node has a connection to `peer` that goes through no relay (`None`: no
/// connection at all).
async fn direct(service: &Service, peer: PeerId) -> Result<Option<bool>, String> {
    Ok(addresses(service, peer)
        .await?
        .map(|addrs| addrs.iter().any(|a| !is_relayed(a))))
}

/// The remote addresses of this node's connections to `peer`, if it has any.
async fn addresses(service: &Service, peer: PeerId) -> Result<Option<Vec<Multiaddr>>, String> {
    let peers = service.node().peers().await.map_err(|e| e.to_string())?;
    Ok(peers
        .into_iter()
        .find(|p| p.peer_id == peer)
        .map(|p| p.addresses))
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

fn path(direct: Option<bool>) -> &'static str {
    match direct {
        Some(true) => "direct",
        Some(false) => "relayed",
        None => "none",
    }
}

async fn client(args: &Args, started: Instant) -> Result<(), String> {
    let target = args.value("--target")?;
    let calls = args.number("--calls", 1_000)?;
    let stream_bytes = args.number("--stream-mib", 10)? << 20;
    let direct_wait = Duration::from_secs(args.number("--direct-wait", 5)?);
    let service = builder("lab-client", &args.bootstrap()?)
        .register(false)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let client = service.client();
    let ping = ByteBuf::from(vec![7u8; 64]);
    let once = CallOptions::default().timeout(Duration::from_secs(5));

    // Start to first successful call.
    let mut last_error = String::new();
    let first_call = loop {
        match client
            .call_with::<_, ByteBuf>(&target, "Lab.Echo", &ping, once.clone())
            .await
        {
            Ok(_) => break Some(started.elapsed()),
            Err(e) => last_error = e.to_string(),
        }
        if started.elapsed() > CONNECT_WITHIN {
            break None;
        }
        tokio::time::sleep(POLL).await;
    };
    let Some(first_call) = first_call else {
        say(json!({ "connected": false, "error": last_error }));
        return service.stop().await.map_err(|e| e.to_string());
    };
    let server = service
        .registry()
        .get_service(&target)
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .flat_map(|s| s.nodes.iter().map(|n| n.peer_id))
        .next()
        .ok_or("the target left the registry")?;
    let first_path = path(direct(&service, server).await?);

    // Hole punching, if it is to happen, happens now.
    let waited = Instant::now();
    let mut time_to_direct = None;
    while waited.elapsed() < direct_wait {
        if direct(&service, server).await? == Some(true) {
            time_to_direct = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(POLL).await;
    }

    let run = Instant::now();
    let mut calls_ok = 0u64;
    let mut call_error = None;
    let mut replies = futures::stream::iter(0..calls)
        .map(|_| client.call::<_, ByteBuf>(&target, "Lab.Echo", &ping))
        .buffer_unordered(IN_FLIGHT);
    while let Some(reply) = replies.next().await {
        match reply {
            Ok(reply) if reply == ping => calls_ok += 1,
            Ok(_) => call_error = Some("a reply differed from its request".to_owned()),
            Err(e) => call_error = Some(e.to_string()),
        }
    }
    drop(replies);
    let calls_per_second = calls_ok as f64 / run.elapsed().as_secs_f64();

    let streamed = Instant::now();
    let stream = stream(&service, &target, stream_bytes).await;
    let stream_seconds = streamed.elapsed().as_secs_f64();

    let final_path = path(direct(&service, server).await?);
    let connections: Vec<String> = addresses(&service, server)
        .await?
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    say(json!({
        "connected": true,
        "first_call_ms": first_call.as_secs_f64() * 1e3,
        "first_path": first_path,
        "direct_after_ms": time_to_direct.map(|t| t.as_secs_f64() * 1e3),
        "final_path": final_path,
        "connections": connections,
        "calls": calls,
        "calls_ok": calls_ok,
        "calls_per_second": calls_per_second,
        "call_error": call_error,
        "stream_bytes": stream_bytes,
        "stream_ok": stream.is_ok(),
        "stream_mib_per_second": (stream_bytes as f64 / (1 << 20) as f64) / stream_seconds,
        "stream_error": stream.err(),
    }));
    service.stop().await.map_err(|e| e.to_string())
}

/// Streams `bytes` to the target's `Lab.Sink` and checks it counted every one.
async fn stream(service: &Service, target: &str, bytes: u64) -> Result<(), String> {
    let options = CallOptions::default().timeout(Duration::from_secs(120));
    let mut call = service
        .client()
        .client_stream::<ByteBuf, u64>(target, "Lab.Sink", options)
        .await
        .map_err(|e| e.to_string())?;
    let chunk = ByteBuf::from(vec![1u8; CHUNK]);
    let mut sent = 0u64;
    while sent < bytes {
        call.send(&chunk).await.map_err(|e| e.to_string())?;
        sent += CHUNK as u64;
    }
    let received = call.finish().await.map_err(|e| e.to_string())?;
    if received != sent {
        return Err(format!("sent {sent} bytes, the server counted {received}"));
    }
    Ok(())
}
