//! micromesh simulations: clusters of many nodes in one process, scenarios that print JSON.
//!
//! ```text
//! cargo run -p micromesh-simulations --release -- <scenario> [--nodes N] [...]
//! ```
//!
//! Every scenario runs real micromesh nodes (Noise, yamux, Kademlia, gossipsub) on libp2p's
//! in-process memory transport and prints one JSON document on stdout. The exception is
//! `nat-lab`: one process per node, in Linux network namespaces behind NAT routers (root
//! only; see `nat_lab`). `RUST_LOG` (for example
//! `RUST_LOG=micromesh=debug`) logs what the nodes do to stderr.

mod grpc;
mod measure;
mod nat_lab;
mod scenarios;

use std::process::ExitCode;

fn usage() -> String {
    let mut text = String::from(
        "usage: micromesh-simulations <scenario> [--nodes N] [--rounds N] [--rate PER_SECOND]\n\nscenarios:\n",
    );
    for (name, about) in scenarios::LIST {
        text.push_str(&format!("  {name:<12} {about}\n"));
    }
    text.push_str(
        "  nat-lab      micromesh across NATs in Linux network namespaces (root): the NAT matrix\n               [--out DIR] [--kinds none,home,full-cone,corporate,cgnat] [--calls N]\n               [--stream-mib M] [--direct-wait SECONDS] [--delay-ms D]\n",
    );
    text
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(scenario) = args.next() else {
        eprint!("{}", usage());
        return ExitCode::FAILURE;
    };
    if scenario == "--help" || scenario == "-h" {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    };
    // The NAT lab and its peers take options of their own.
    if scenario == "nat-lab" || scenario == "nat-peer" {
        let args: Vec<String> = args.collect();
        let outcome = runtime().block_on(async {
            if scenario == "nat-lab" {
                nat_lab::run(&args).await.map(|report| {
                    println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
                })
            } else {
                nat_lab::peer::run(args).await
            }
        });
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match measure::Options::parse(args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("error: {e}\n\n{}", usage());
            return ExitCode::FAILURE;
        }
    };
    match runtime().block_on(scenarios::run(&scenario, &options)) {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
