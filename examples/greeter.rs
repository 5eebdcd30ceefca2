//! A Greeter service and a client calling it by name.
//!
//! ```text
//! cargo run --example greeter                                  # server and client, one process
//! cargo run --example greeter -- serve                         # a server that others can join
//! cargo run --example greeter -- serve --bootstrap ADDR        # a server joining a mesh
//! cargo run --example greeter -- serve --no-upnp               # no port mapping on the router
//! cargo run -- call greeter Greeter.Hello '{"name": "Ada"}' --bootstrap ADDR
//! ```
//!
//! The server registers `Greeter.Hello` (request `{"name": …}`, reply `{"msg": …}`) and
//! `Greeter.Count` (a server stream); the registry announces both, and callers find the
//! service by name.

use futures::StreamExt as _;
use micromesh::{Context, Multiaddr, Service, Status, client::CallOptions, node::Preset};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct HelloRequest {
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct HelloReply {
    msg: String,
}

async fn hello(ctx: Context, req: HelloRequest) -> Result<HelloReply, Status> {
    if req.name.trim().is_empty() {
        return Err(Status::bad_request("a name is required"));
    }
    tracing::info!(caller = %ctx.peer_id(), "greeting {}", req.name);
    Ok(HelloReply {
        msg: format!("Hello, {}!", req.name),
    })
}

fn greeter() -> micromesh::service::Builder {
    Service::builder("greeter")
        .version("1.0.0")
        .handle("Greeter.Hello", hello)
        .server_stream("Greeter.Count", |_: Context, up_to: u32| async move {
            Ok::<_, Status>(futures::stream::iter(1..=up_to).map(Ok))
        })
}

fn usage() -> ! {
    eprintln!("usage: greeter [serve [--bootstrap MULTIADDR] [--listen MULTIADDR] [--no-upnp]]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p_kad=error".into()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only on a terminal: a log file or a pipe gets plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        // Recent records for `micromesh logs greeter`.
        .with(micromesh::debug::log_layer())
        .init();
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => together().await,
        Some("serve") => {
            let mut builder = greeter().configure_node(|n| n.mdns(false));
            while let Some(flag) = args.next() {
                if flag == "--no-upnp" {
                    builder = builder.configure_node(|n| n.upnp(false));
                    continue;
                }
                let value: Multiaddr = args.next().unwrap_or_else(|| usage()).parse()?;
                builder = match flag.as_str() {
                    "--bootstrap" => builder.bootstrap(value),
                    "--listen" => builder.listen(value),
                    _ => usage(),
                };
            }
            let service = builder.build().await?;
            for addr in service.node().listen_addrs().await? {
                println!("greeter listening on {addr}");
            }
            service.run().await?;
            Ok(())
        }
        Some(_) => usage(),
    }
}

/// Server and client in one process, on the in-memory transport.
async fn together() -> Result<(), Box<dyn std::error::Error>> {
    let server = greeter().preset(Preset::Local).build().await?;
    let addr = server.node().listen_addrs().await?.remove(0);
    let client = Service::builder("greeter-client")
        .preset(Preset::Local)
        .register(false)
        .bootstrap(addr)
        .build()
        .await?;

    // Called at once: the call waits for the client to join, then finds the greeter by name.
    let reply: HelloReply = client
        .client()
        .call(
            "greeter",
            "Greeter.Hello",
            &HelloRequest { name: "Ada".into() },
        )
        .await?;
    println!("{}", reply.msg);

    let mut count = client
        .client()
        .server_stream::<u32, u32>("greeter", "Greeter.Count", &3, CallOptions::default())
        .await?;
    while let Some(n) = count.recv().await {
        println!("count {}", n?);
    }
    match client
        .client()
        .call::<_, HelloReply>(
            "greeter",
            "Greeter.Hello",
            &HelloRequest { name: " ".into() },
        )
        .await
    {
        Err(e) => println!("an empty name: {}", e.status()),
        Ok(reply) => println!("unexpected: {}", reply.msg),
    }
    client.stop().await?;
    server.stop().await?;
    Ok(())
}
