//! `micromesh node`: run a node until interrupted.

use std::path::PathBuf;

use clap::Args;
use micromesh::{Multiaddr, Service, node::Event};

use crate::cli::{BoxError, Global};

#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    /// Where the identity key lives (created on first start, reused after).
    /// Default: `$XDG_DATA_HOME/micromesh`, else `~/.local/share/micromesh`.
    #[arg(long, env = "MICROMESH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// An address to listen on (repeatable).
    /// Default: `/ip4/0.0.0.0/udp/0/quic-v1` and `/ip4/0.0.0.0/tcp/0`.
    #[arg(long, short = 'l', value_name = "MULTIADDR")]
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
    #[arg(long)]
    no_mdns: bool,
    /// Do not ask the router for a port mapping with UPnP.
    #[arg(long)]
    no_upnp: bool,
    /// Do not probe reachability with AutoNAT.
    #[arg(long)]
    no_autonat: bool,
    /// Offer circuit-relay service to peers behind NAT.
    #[arg(long)]
    relay: bool,
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
        .network(global.network.clone())
        .data_dir(data_dir);
    for addr in &args.listen {
        builder = builder.listen(addr.clone());
    }
    for addr in &args.bootstrap {
        builder = builder.bootstrap(addr.clone());
    }
    let key = global.pre_shared_key()?;
    let (no_mdns, no_upnp, no_autonat, relay) =
        (args.no_mdns, args.no_upnp, args.no_autonat, args.relay);
    builder = builder.configure_node(move |mut node| {
        if let Some(key) = key {
            node = node.pre_shared_key(key);
        }
        node.mdns(!no_mdns)
            .upnp(!no_upnp)
            .autonat(!no_autonat)
            .relay_server(relay)
    });
    let service = builder.build().await?;
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
