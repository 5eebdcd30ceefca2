//! `micromesh node`: run a node until interrupted.

use std::path::PathBuf;

use clap::Args;
use micromesh::{Multiaddr, Service, config::Config, node::Event};

use crate::cli::{BoxError, Global, Mesh};

#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    /// A configuration file (TOML, YAML or JSON, by its extension), watched while the node
    /// runs: its `auth` section applies again whenever it changes. Flags and `MICROMESH_*`
    /// variables win over it; see the README's configuration section for its keys.
    #[arg(long, short = 'c', env = "MICROMESH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
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
    /// Offer circuit-relay service to peers behind NAT even before AutoNAT confirms an address
    /// (by default a node offers it while AutoNAT finds it reachable). A relay needs an address
    /// peers reach it at: one confirmed by AutoNAT, or one given with `--advertise`.
    #[arg(long, env = "MICROMESH_RELAY", conflicts_with = "no_relay")]
    relay: bool,
    /// Never offer circuit-relay service.
    #[arg(long, env = "MICROMESH_NO_RELAY")]
    no_relay: bool,
    /// Let AutoNAT count private addresses (10/8, 172.16/12, 192.168/16) as reachable: for
    /// labs and closed networks whose "public" side uses them.
    #[arg(long, env = "MICROMESH_PRIVATE_ADDRESSES_ARE_PUBLIC")]
    private_addresses_are_public: bool,
    /// An address peers reach this node at, e.g. a port forward's (repeatable).
    #[arg(
        long,
        env = "MICROMESH_ADVERTISE",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    advertise: Vec<Multiaddr>,
    /// The most bytes of store records this node keeps for the mesh, e.g. `512MiB`, `2GiB`.
    /// Default: 256MiB.
    #[arg(long, env = "MICROMESH_STORE_CAPACITY", value_parser = parse_size)]
    store_capacity: Option<u64>,
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

/// The keys of a node's configuration besides [`micromesh::config::Settings`]'s.
const NODE_KEYS: &[&str] = &[
    "mdns",
    "upnp",
    "autonat",
    "relay",
    "private_addresses_are_public",
    "store_capacity",
    "metrics",
];
/// The node's configuration: the file, the environment, then the options given (on the
/// command line or in their environment variables).
fn configuration(args: &NodeArgs) -> Result<Config, BoxError> {
    let mut config = Config::builder().env(micromesh::config::ENV_PREFIX);
    if let Some(file) = &args.config {
        config = config.file(file);
    }
    let text = |addrs: &[Multiaddr]| addrs.iter().map(ToString::to_string).collect::<Vec<_>>();
    if args.mesh.network != micromesh::node::DEFAULT_NETWORK {
        config = config.set("network", &args.mesh.network)?;
    }
    if let Some(dir) = &args.data_dir {
        config = config.set("data_dir", dir)?;
    }
    for (key, addrs) in [
        ("listen", &args.listen),
        ("bootstrap", &args.bootstrap),
        ("advertise", &args.advertise),
    ] {
        if !addrs.is_empty() {
            config = config.set(key, text(addrs))?;
        }
    }
    for (key, off) in [
        ("mdns", args.no_mdns),
        ("upnp", args.no_upnp),
        ("autonat", args.no_autonat),
    ] {
        if off {
            config = config.set(key, false)?;
        }
    }
    if args.relay || args.no_relay {
        config = config.set("relay", args.relay)?;
    }
    if args.private_addresses_are_public {
        config = config.set("private_addresses_are_public", true)?;
    }
    if let Some(capacity) = args.store_capacity {
        config = config.set("store_capacity", capacity)?;
    }
    if let Some(addr) = args.metrics {
        config = config.set("metrics", addr.to_string())?;
    }
    let config = config.build()?;
    // A key nobody reads is most likely misspelt (variables of the CLI's other options are
    // not keys of the file). The settings' keys are those of their serialised form.
    let settings = serde_json::to_value(micromesh::config::Settings::default())?;
    let is_setting = |key: &str| settings.get(key).is_some();
    if let Some(tree) = config.tree().as_object() {
        for key in tree.keys() {
            let known = NODE_KEYS.contains(&key.as_str()) || is_setting(key);
            let from_env = std::env::var_os(format!("MICROMESH_{}", key.to_uppercase())).is_some();
            if !known && !from_env {
                tracing::warn!("configuration: unknown key {key:?} ignored");
            }
        }
    }
    Ok(config)
}

/// The store capacity from the configuration: a number of bytes, or a size with a unit.
fn store_capacity(config: &Config) -> Result<u64, BoxError> {
    match config.value("store_capacity") {
        None => Ok(256 << 20),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| {
            format!("store_capacity must be a whole number of bytes, not {n}").into()
        }),
        Some(serde_json::Value::String(s)) => {
            parse_size(&s).map_err(|e| format!("store_capacity: {e}").into())
        }
        Some(other) => {
            Err(format!("store_capacity must be a size like \"512MiB\", not {other}").into())
        }
    }
}

pub(crate) async fn run(global: &Global, args: &NodeArgs) -> Result<(), BoxError> {
    let config = configuration(args)?;
    let data_dir = match config.get_opt::<PathBuf>("data_dir")? {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let mut builder = Service::builder("micromesh-node")
        .version(env!("CARGO_PKG_VERSION"))
        .data_dir(data_dir)
        .auth(args.mesh.auth_config()?);
    if let Some(identity) = args.mesh.identity()? {
        builder = builder.identity(identity);
    }
    let key = args.mesh.pre_shared_key()?;
    let on = |key: &str| config.get_opt::<bool>(key).map(|v| v.unwrap_or(true));
    let (mdns, upnp, autonat) = (on("mdns")?, on("upnp")?, on("autonat")?);
    let relay = config.get_opt::<bool>("relay")?;
    let private_is_public = config
        .get_opt::<bool>("private_addresses_are_public")?
        .unwrap_or(false);
    let capacity = store_capacity(&config)?;
    builder = builder.configure_node(move |mut node| {
        if let Some(key) = key {
            node = node.pre_shared_key(key);
        }
        node = node
            .mdns(mdns)
            .upnp(upnp)
            .autonat(autonat)
            .private_addresses_are_public(private_is_public);
        match relay {
            Some(on) => node.relay_server(on),
            None => node,
        }
    });
    builder = builder.store_config(micromesh::store::Config::default().capacity(capacity));
    if let Some(addr) = config.get_opt::<String>("metrics")? {
        let addr: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| format!("metrics: {addr:?} is not HOST:PORT ({e})"))?;
        builder = builder.metrics(addr);
    }
    builder = builder.config(config);
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
