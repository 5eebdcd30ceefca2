//! A replicated key-value store with no database server.
//!
//! ```text
//! cargo run --example kv                                       # a 4-node mesh in one process
//! cargo run --example kv -- serve --data-dir DIR [--bootstrap ADDR] [--listen ADDR]
//! cargo run -- store write greeting 'hello' --bootstrap ADDR   # then, from anywhere:
//! cargo run -- store read greeting --bootstrap ADDR
//! cargo run -- store list --bootstrap ADDR
//! ```
//!
//! In one process: four nodes on the in-memory transport. One writes, another reads, a third
//! lists the table, a record with a TTL expires, a delete wins over the write before it, and
//! the record stays readable after its writer stops. `serve` runs one storing node until
//! interrupted, its records kept in `DIR`.

use std::{path::PathBuf, time::Duration};

use micromesh::{
    Multiaddr, Service,
    node::Preset,
    store::{ListOptions, WriteOptions},
};

fn usage() -> ! {
    eprintln!("usage: kv [serve --data-dir DIR [--bootstrap MULTIADDR] [--listen MULTIADDR]]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => together().await,
        Some("serve") => {
            let mut builder = Service::builder("kv").configure_node(|n| n.mdns(false));
            let mut data_dir = None;
            while let Some(flag) = args.next() {
                let value = args.next().unwrap_or_else(|| usage());
                builder = match flag.as_str() {
                    "--bootstrap" => builder.bootstrap(value.parse::<Multiaddr>()?),
                    "--listen" => builder.listen(value.parse::<Multiaddr>()?),
                    "--data-dir" => {
                        data_dir = Some(PathBuf::from(value));
                        builder
                    }
                    _ => usage(),
                };
            }
            let Some(dir) = data_dir else { usage() };
            let service = builder.data_dir(dir).build().await?;
            for addr in service.node().listen_addrs().await? {
                println!("kv node listening on {addr}");
            }
            service.run().await?;
            Ok(())
        }
        Some(_) => usage(),
    }
}

async fn together() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let first = Service::builder("kv")
        .preset(Preset::Local)
        .data_dir(dir.path().join("node-0"))
        .build()
        .await?;
    let addr = first.node().listen_addrs().await?.remove(0);
    let mut nodes = vec![first];
    for i in 1..4 {
        nodes.push(
            Service::builder("kv")
                .preset(Preset::Local)
                .data_dir(dir.path().join(format!("node-{i}")))
                .bootstrap(addr.clone())
                .build()
                .await?,
        );
    }
    // Wait until every node's routing table knows the others, so writes reach their quorum.
    micromesh::testing::wait_until(Duration::from_secs(10), || async {
        let mut known = true;
        for node in &nodes {
            known &= node.node().dht_peers().await.map_or(0, |p| p.len()) >= 3;
        }
        known
    })
    .await?;

    let users = nodes[1].store().table("shop", "users")?;
    let version = users.write("alice", b"admin".to_vec()).await?;
    users.write("bob", b"customer".to_vec()).await?;
    println!("node 1 wrote alice (version {version}) and bob");

    let seen = nodes[2].store().table("shop", "users")?;
    let alice = seen.read("alice").await?.ok_or("alice is missing")?;
    println!(
        "node 2 read alice = {:?}, written by {}",
        String::from_utf8_lossy(&alice.value),
        alice.writer
    );
    let keys = nodes[3]
        .store()
        .table("shop", "users")?
        .list(ListOptions::new())
        .await?;
    println!("node 3 lists the table: {keys:?}");

    let sessions = nodes[3].store().table("shop", "sessions")?;
    sessions
        .write_with(
            "s-1",
            b"alice".to_vec(),
            WriteOptions::new().ttl(Duration::from_secs(1)),
        )
        .await?;
    println!(
        "node 3 wrote session s-1 with a 1 s TTL: {}",
        sessions.read("s-1").await?.is_some()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "after 1.5 s, session s-1 is {}",
        if sessions.read("s-1").await?.is_some() {
            "still there"
        } else {
            "gone"
        }
    );

    nodes[2]
        .store()
        .table("shop", "users")?
        .delete("bob")
        .await?;
    println!(
        "node 2 deleted bob; node 0 reads bob: {:?}",
        nodes[0]
            .store()
            .table("shop", "users")?
            .read("bob")
            .await?
            .map(|r| r.value)
    );

    let writer = nodes.remove(1);
    writer.stop().await?;
    let alice = nodes[0]
        .store()
        .table("shop", "users")?
        .read("alice")
        .await?;
    println!(
        "node 1 stopped; node 0 still reads alice = {:?}",
        alice.map(|r| String::from_utf8_lossy(&r.value).into_owned())
    );
    for node in nodes {
        node.stop().await?;
    }
    Ok(())
}
