//! A small mesh in one process: five services join through one bootstrap node and find each
//! other in the DHT.
//!
//! Run it with `cargo run --example quickstart`. Every node speaks the real protocols
//! (Noise, yamux, Kademlia, gossipsub, identify, ping) over libp2p's in-process memory
//! transport; swap `Preset::Local` for the default preset and the same code runs on QUIC and
//! TCP across machines.

use std::time::{Duration, Instant};

use micromesh::{Service, node::Preset, testing::wait_until};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let bootstrap = Service::builder("bootstrap")
        .preset(Preset::Local)
        .build()
        .await?;
    let addr = bootstrap.node().listen_addrs().await?.remove(0);
    println!("bootstrap node listens on {addr}");

    let mut services = vec![bootstrap];
    for name in ["orders", "payments", "shipping", "billing"] {
        let service = Service::builder(name)
            .preset(Preset::Local)
            .bootstrap(addr.clone())
            .build()
            .await?;
        println!("{name:>9} joined as {}", service.peer_id());
        services.push(service);
    }

    // Each node learns every other node from the DHT, not from the bootstrap node alone.
    let everyone: Vec<_> = services.iter().map(|s| s.peer_id()).collect();
    for service in &services {
        let node = service.node().clone();
        let others: Vec<_> = everyone
            .iter()
            .copied()
            .filter(|p| *p != node.peer_id())
            .collect();
        wait_until(Duration::from_secs(20), || async {
            let table = node.dht_peers().await.unwrap_or_default();
            others.iter().all(|o| table.iter().any(|p| p.peer_id == *o))
        })
        .await?;
    }
    println!(
        "\nevery node sees every other node in its DHT after {:?}\n",
        started.elapsed()
    );

    let last = services.last().expect("five services");
    println!("peers connected to {}:", last.name());
    for peer in last.node().peers().await? {
        let name = services
            .iter()
            .find(|s| s.peer_id() == peer.peer_id)
            .map_or("?", |s| s.name());
        let rtt = peer.rtt.map_or_else(
            || "-".to_owned(),
            |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
        );
        println!("  {name:>9}  {}  rtt {rtt}", peer.peer_id);
    }
    let target = services[1].peer_id();
    let found = last.node().find_peer(target).await?;
    println!(
        "\n{} looked up {} in the DHT: {:?}",
        last.name(),
        services[1].name(),
        found
    );

    for service in services {
        service.stop().await?;
    }
    Ok(())
}
