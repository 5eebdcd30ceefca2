//! `micromesh`: run a node, and inspect and use the mesh from the command line.
//!
//! Every verb that talks to the mesh joins it as a short-lived client node through
//! `--bootstrap ADDR` (or `MICROMESH_BOOTSTRAP`), prints readable output, or one JSON document
//! with `--json`, and exits non-zero with a message on failure.

mod call_cmd;
mod cli;
mod config_cmd;
mod debug_cmd;
mod grant_cmd;
mod identity_cmd;
mod node_cmd;
mod peers_cmd;
mod pubsub_cmd;
mod services_cmd;
mod store_cmd;
mod top_cmd;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let logging = match cli::init_logging(&args) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {}", cli::error_chain(e.as_ref()));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &args.command {
            cli::Command::Node(cmd) => node_cmd::run(&args.global, cmd).await,
            cli::Command::Peers(cmd) => peers_cmd::run(&args.global, cmd).await,
            cli::Command::Services(cmd) => services_cmd::services(&args.global, cmd).await,
            cli::Command::Describe(cmd) => services_cmd::describe(&args.global, cmd).await,
            cli::Command::Call(cmd) => call_cmd::call(&args.global, cmd).await,
            cli::Command::Stream(cmd) => call_cmd::stream(cmd).await,
            cli::Command::Publish(cmd) => pubsub_cmd::publish(&args.global, cmd).await,
            cli::Command::Subscribe(cmd) => pubsub_cmd::subscribe(&args.global, cmd).await,
            cli::Command::Store(cmd) => store_cmd::run(&args.global, cmd).await,
            cli::Command::Config(cmd) => config_cmd::run(&args.global, cmd).await,
            cli::Command::Identity(cmd) => identity_cmd::run(&args.global, cmd),
            cli::Command::Grant(cmd) => grant_cmd::run(&args.global, cmd).await,
            cli::Command::Health(cmd) => debug_cmd::health(&args.global, cmd).await,
            cli::Command::Stats(cmd) => debug_cmd::stats(&args.global, cmd).await,
            cli::Command::Logs(cmd) => debug_cmd::logs(&args.global, cmd).await,
            cli::Command::Trace(cmd) => debug_cmd::trace(&args.global, cmd).await,
            cli::Command::Top(cmd) => top_cmd::run(&args.global, cmd).await,
        }
    });
    // The runtime first (its tasks may still log), then the exporter, which sends what it holds.
    drop(runtime);
    logging.finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
