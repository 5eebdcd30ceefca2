//! `micromesh node`: run a node until interrupted.

use std::path::PathBuf;

use clap::Args;
use micromesh::{Multiaddr, Service, node::Event};

use crate::cli::{BoxError, Global, Mesh};

#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    /// Where the identity key lives (created on first start, reused after).
    /// Default: `$XDG_DATA_HOME/micromesh`, else `~/.local/share/micromesh`.
    #[arg(long, env = "MICROMESH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// An address to listen on (repeatable).
    /// Default: `/ip4/0.0.0.0/udp/0/quic-v1` and `/ip4/0.0.0.0/tcp/0`.
    #[arg(
        long,
        short = 'l',
        env = "MICROMESH_LISTEN",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    listen: Vec<Multiaddr>,
    /// A peer to join through (repeatable). A node with none waits for others to join it.
    #[arg(
        long = "bootstrap",
        short = 'b',
        env = "MICROMESH_BOOTSTRAP",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long, env = "MICROMESH_NO_MDNS")]
    no_mdns: bool,
    /// Do not ask the router for a port mapping with UPnP.
    #[arg(long, env = "MICROMESH_NO_UPNP")]
    no_upnp: bool,
    /// Do not probe reachability with AutoNAT.
    #[arg(long, env = "MICROMESH_NO_AUTONAT")]
    no_autonat: bool,
    /// Offer circuit-relay service to peers behind NAT. A relay needs an address peers reach
    /// it at: one confirmed by AutoNAT, or one given with `--advertise`.
    #[arg(long, env = "MICROMESH_RELAY")]
    relay: bool,
    /// An address peers reach this node at, e.g. a port forward's (repeatable).
    #[arg(
        long,
        env = "MICROMESH_ADVERTISE",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    advertise: Vec<Multiaddr>,
    /// The most bytes of store records this node keeps for the mesh, e.g. `512MiB`, `2GiB`.
    #[arg(long, env = "MICROMESH_STORE_CAPACITY", default_value = "256MiB", value_parser = parse_size)]
    store_capacity: u64,
    /// Serve metrics (`/metrics`, for Prometheus) and health (`/health/live`, `/health/ready`)
    /// over HTTP on this address, e.g. `127.0.0.1:9464`.
    #[arg(long, env = "MICROMESH_METRICS", value_name = "HOST:PORT")]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    mesh: Mesh,
}

/// Parses a size: a number of bytes, or with a unit `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`,
/// powers of 1000).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("a size is a number with an optional unit, got {s:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn default_data_dir() -> Result<PathBuf, BoxError> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("micromesh"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/micromesh")),
        None => Err("no data directory: set --data-dir, MICROMESH_DATA_DIR or HOME".into()),
    }
}

pub(crate) async fn run(global: &Global, args: &NodeArgs) -> Result<(), BoxError> {
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    let mut builder = Service::builder("micromesh-node")
        .version(env!("CARGO_PKG_VERSION"))
        .network(args.mesh.network.clone())
        .data_dir(data_dir)
        .auth(args.mesh.auth_config()?);
    if let Some(identity) = args.mesh.identity()? {
        builder = builder.identity(identity);
    }
    for addr in &args.listen {
        builder = builder.listen(addr.clone());
    }
    for addr in &args.bootstrap {
        builder = builder.bootstrap(addr.clone());
    }
    let key = args.mesh.pre_shared_key()?;
    let advertise = args.advertise.clone();
    let (no_mdns, no_upnp, no_autonat, relay, capacity) = (
        args.no_mdns,
        args.no_upnp,
        args.no_autonat,
        args.relay,
        args.store_capacity,
    );
    builder = builder.configure_node(move |mut node| {
        if let Some(key) = key {
            node = node.pre_shared_key(key);
        }
        for addr in &advertise {
            node = node.external_address(addr.clone());
        }
        node.mdns(!no_mdns)
            .upnp(!no_upnp)
            .autonat(!no_autonat)
            .relay_server(relay)
    });
    builder = builder.store_config(micromesh::store::Config::default().capacity(capacity));
    if let Some(addr) = args.metrics {
        builder = builder.metrics(addr);
    }
    let service = builder.build().await?;
    if let Some(addr) = service.metrics_addr() {
        if global.json {
            println!(
                "{}",
                serde_json::json!({ "event": "metrics", "url": format!("http://{addr}/metrics") })
            );
        } else {
            println!("metrics on http://{addr}/metrics");
        }
    }
    let node = service.node().clone();
    // Subscribe before reading the current addresses, so none is missed in between.
    let mut events = node.events();
    let mut printed = std::collections::HashSet::new();
    for address in node.listen_addrs().await? {
        print_listen(global.json, &address);
        printed.insert(address);
    }
    let json = global.json;
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(Event::ListenAddr { address }) if printed.insert(address.clone()) => {
                    print_listen(json, &address);
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let result = service.run().await;
    printer.abort();
    result.map_err(Into::into)
}

fn print_listen(json: bool, address: &Multiaddr) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "event": "listening", "address": address.to_string() })
        );
    } else {
        println!("listening on {address}");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
