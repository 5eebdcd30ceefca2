//! Publish/subscribe with no broker: a broadcast topic and a queue group.
//!
//! ```text
//! cargo run --example pubsub                                   # everything in one process
//! cargo run --example pubsub -- worker --bootstrap ADDR        # a queue-group worker
//! cargo run -- publish orders '{"id": 1, "item": "tea"}' --bootstrap ADDR
//! cargo run -- subscribe orders --bootstrap ADDR --json        # watch every order
//! ```
//!
//! In one process: three nodes on the in-memory transport. Every node hears every `orders`
//! message (broadcast, in publish order); each message is also handled by exactly one of two
//! `billing` workers (a queue group, acknowledged, redelivered if a worker fails).

use std::time::Duration;

use micromesh::{
    Multiaddr, Service, Status,
    broker::{Event, SubscribeOptions},
    node::Preset,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    item: String,
}

fn usage() -> ! {
    eprintln!("usage: pubsub [worker --bootstrap MULTIADDR]");
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
        Some("worker") => {
            let mut builder = Service::builder("billing").configure_node(|n| n.mdns(false));
            while let Some(flag) = args.next() {
                let value: Multiaddr = args.next().unwrap_or_else(|| usage()).parse()?;
                builder = match flag.as_str() {
                    "--bootstrap" => builder.bootstrap(value),
                    "--listen" => builder.listen(value),
                    _ => usage(),
                };
            }
            let service = builder.build().await?;
            for addr in service.node().listen_addrs().await? {
                println!("billing worker listening on {addr}");
            }
            let _worker = service
                .broker()
                .subscribe_with(
                    "orders",
                    SubscribeOptions::new().group("billing"),
                    |event: Event<Order>| async move {
                        println!("billing order {} ({})", event.body.id, event.body.item);
                        Ok::<_, Status>(())
                    },
                )
                .await?;
            service.run().await?;
            Ok(())
        }
        Some(_) => usage(),
    }
}

async fn together() -> Result<(), Box<dyn std::error::Error>> {
    let shop = Service::builder("shop")
        .preset(Preset::Local)
        .build()
        .await?;
    let addr = shop.node().listen_addrs().await?.remove(0);
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Service::builder("billing")
                .preset(Preset::Local)
                .bootstrap(addr.clone())
                .build()
                .await?,
        );
    }

    // Every worker node also watches all orders; each order is billed by one worker only.
    let (log, mut lines) = mpsc::channel::<String>(64);
    let mut subscriptions = Vec::new();
    for (i, worker) in workers.iter().enumerate() {
        let log_all = log.clone();
        subscriptions.push(
            worker
                .broker()
                .subscribe("orders", move |event: Event<Order>| {
                    let log = log_all.clone();
                    async move {
                        let line = format!("node {i} saw order {}", event.body.id);
                        log.send(line).await.ok();
                        Ok::<_, Status>(())
                    }
                })
                .await?,
        );
        let log_billing = log.clone();
        subscriptions.push(
            worker
                .broker()
                .subscribe_with(
                    "orders",
                    SubscribeOptions::new().group("billing"),
                    move |event: Event<Order>| {
                        let log = log_billing.clone();
                        async move {
                            let line = format!(
                                "node {i} billed order {} ({}), attempt {}",
                                event.body.id, event.body.item, event.attempt
                            );
                            log.send(line).await.ok();
                            Ok::<_, Status>(())
                        }
                    },
                )
                .await?,
        );
    }
    drop(log);

    // The shop's first publish looks the topic's subscribers up and connects to them, so it
    // reaches the two watchers and the billing group alike.
    for (id, item) in [(1, "tea"), (2, "scones"), (3, "jam")] {
        let order = Order {
            id,
            item: item.into(),
        };
        shop.broker().publish("orders", &order).await?;
    }
    if !shop.broker().flush(Duration::from_secs(10)).await {
        return Err("the billing group did not acknowledge every order".into());
    }
    // 3 orders × 2 watchers, and 3 billings.
    for _ in 0..9 {
        match tokio::time::timeout(Duration::from_secs(10), lines.recv()).await {
            Ok(Some(line)) => println!("{line}"),
            _ => return Err("an order went missing".into()),
        }
    }
    drop(subscriptions);
    for worker in workers {
        worker.stop().await?;
    }
    shop.stop().await?;
    Ok(())
}
