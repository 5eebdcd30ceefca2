//! `micromesh peers`: join the mesh and list the peers it knows.

use std::{collections::BTreeMap, time::Duration};

use clap::Args;
use micromesh::{Multiaddr, PeerId};

use crate::cli::{BoxError, Global, Join, print_table};

#[derive(Args, Debug)]
pub(crate) struct PeersArgs {
    #[command(flatten)]
    join: Join,
}

#[derive(Default)]
struct Row {
    addresses: Vec<Multiaddr>,
    rtt: Option<Duration>,
    connected: bool,
    agent: Option<String>,
}

pub(crate) async fn run(global: &Global, args: &PeersArgs) -> Result<(), BoxError> {
    let service = args.join.connect().await?;
    let node = service.node().clone();
    // Walk the DHT so that peers beyond the bootstrap node are found too.
    if let Err(e) = tokio::time::timeout(args.join.timeout, node.bootstrap())
        .await
        .unwrap_or(Ok(()))
    {
        tracing::warn!("DHT walk incomplete: {e}");
    }
    // The first ping goes out as soon as a connection opens; give it a moment to come back.
    let _ = wait_for_rtts(&node).await;
    let mut rows: BTreeMap<PeerId, Row> = BTreeMap::new();
    for peer in node.dht_peers().await? {
        rows.entry(peer.peer_id).or_default().addresses = peer.addresses;
    }
    for peer in node.peers().await? {
        if peer.same_network == Some(false) {
            continue;
        }
        let row = rows.entry(peer.peer_id).or_default();
        row.connected = true;
        row.rtt = peer.rtt;
        row.agent = peer.agent;
        if row.addresses.is_empty() {
            row.addresses = peer.addresses;
        }
    }
    service.stop().await?;

    if global.json {
        let peers: Vec<_> = rows
            .iter()
            .map(|(peer, row)| {
                serde_json::json!({
                    "peer_id": peer.to_string(),
                    "addresses": row.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "connected": row.connected,
                    "rtt_ms": row.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    "agent": row.agent,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no peers found");
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(peer, row)| {
            vec![
                peer.to_string(),
                row.rtt
                    .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                    .unwrap_or_else(|| "-".into()),
                // The peer is named in the first column: its id is not repeated per address.
                row.addresses
                    .iter()
                    .map(|a| without_peer(a, peer))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    print_table(&["PEER", "RTT", "ADDRESSES"], &table);
    println!("{} peer(s)", rows.len());
    Ok(())
}

/// `addr` without a trailing `/p2p/<peer>`.
fn without_peer(addr: &Multiaddr, peer: &PeerId) -> String {
    let text = addr.to_string();
    match text.strip_suffix(&format!("/p2p/{peer}")) {
        Some(bare) => bare.to_owned(),
        None => text,
    }
}

/// Waits up to a second for every connected peer to have a ping round trip.
async fn wait_for_rtts(node: &micromesh::node::Node) -> Result<(), micromesh::node::Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        if node.peers().await?.iter().all(|p| p.rtt.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
