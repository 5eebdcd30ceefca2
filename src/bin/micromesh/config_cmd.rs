//! `micromesh config …`: read, set and watch configuration, locally and across the mesh.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use futures::StreamExt as _;
use micromesh::{Service, config::Config};

use crate::cli::{BoxError, Global, Join};

#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// Print the value at PATH: the mesh's (with --bootstrap) over the environment's
    /// (`MICROMESH_…`) over the file's (--config). Exits with 1 when nothing is set there.
    Get(ReadArgs),
    /// Set PATH to VALUE (JSON, or else text) for every node of the mesh. The nodes' rules
    /// must allow `config:PATH` for this identity (see --key, --grant).
    Set(SetArgs),
    /// Remove PATH from the mesh's configuration on every node.
    Unset(UnsetArgs),
    /// Print the value at PATH, then each new value as it changes, until interrupted.
    Watch(WatchArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ReadArgs {
    /// The path, e.g. `auth.rules` or `greeter.greeting`.
    path: String,
    /// A configuration file (TOML, YAML or JSON) to read under the environment and the mesh.
    #[arg(long, short = 'c', env = "MICROMESH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// Exit after this many changes (the first value printed does not count).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct SetArgs {
    /// The path.
    path: String,
    /// The value: JSON (`42`, `true`, `["a","b"]`, `{"k":1}`, `"text"`), or else plain text.
    value: String,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct UnsetArgs {
    /// The path.
    path: String,
    #[command(flatten)]
    join: Join,
}

pub(crate) async fn run(global: &Global, command: &ConfigCommand) -> Result<(), BoxError> {
    match command {
        ConfigCommand::Get(args) => get(global, args).await,
        ConfigCommand::Watch(args) => watch(global, args).await,
        ConfigCommand::Set(args) => {
            let value: serde_json::Value = serde_json::from_str(&args.value)
                .unwrap_or_else(|_| serde_json::Value::String(args.value.clone()));
            change(global, &args.path, Some(value), &args.join).await
        }
        ConfigCommand::Unset(args) => change(global, &args.path, None, &args.join).await,
    }
}

/// Sets `path` to `value` in the mesh, or unsets it with `None`, and says so.
async fn change(
    global: &Global,
    path: &str,
    value: Option<serde_json::Value>,
    join: &Join,
) -> Result<(), BoxError> {
    micromesh::config::check_path(path)?;
    let service = join.connect().await?;
    let result = match &value {
        Some(value) => service.config().set_in_mesh(path, value).await,
        None => service.config().unset_in_mesh(path).await,
    };
    let stopped = service.stop().await;
    let version = result.map_err(refusal)?;
    stopped?;
    let (verb, json) = match value {
        Some(value) => (
            "set",
            serde_json::json!({ "path": path, "value": value, "version": version }),
        ),
        None => (
            "unset",
            serde_json::json!({ "path": path, "unset": true, "version": version }),
        ),
    };
    if global.json {
        println!("{json}");
    } else {
        println!("{verb} {path} (version {version})");
    }
    Ok(())
}

/// A refused change, with its status code first: what an operator scans for.
fn refusal(error: micromesh::config::Error) -> BoxError {
    let status = error.status();
    format!(
        "{} ({}): {error}",
        status.code().reason().to_lowercase(),
        status.code().as_u16()
    )
    .into()
}

/// The sources a reading command sees: the file and the environment here, and the mesh
/// through a client node when a bootstrap peer is given.
struct Sources {
    local: Config,
    mesh: Option<Service>,
}

impl Sources {
    async fn open(args: &ReadArgs) -> Result<Self, BoxError> {
        micromesh::config::check_path(&args.path)?;
        let mut local = Config::builder().env(micromesh::config::ENV_PREFIX);
        if let Some(file) = &args.config {
            local = local.file(file);
        }
        let local = local.build()?;
        let mesh = if args.join.bootstrap.is_empty() {
            None
        } else {
            let service = args.join.connect().await?;
            if let Err(e) = service.config().sync_mesh().await {
                service.stop().await?;
                return Err(format!("cannot read the mesh's configuration: {e}").into());
            }
            Some(service)
        };
        Ok(Self { local, mesh })
    }

    /// The value at `path`: the mesh's merged over the local one.
    fn value(&self, path: &str) -> Option<serde_json::Value> {
        let local = self.local.value(path);
        let mesh = self.mesh.as_ref().and_then(|s| s.config().value(path));
        match (local, mesh) {
            (Some(mut local), Some(mesh)) => {
                merge(&mut local, mesh);
                Some(local)
            }
            (local, mesh) => mesh.or(local),
        }
    }

    async fn close(self) -> Result<(), BoxError> {
        if let Some(service) = self.mesh {
            service.stop().await?;
        }
        Ok(())
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

async fn get(global: &Global, args: &ReadArgs) -> Result<(), BoxError> {
    let sources = Sources::open(args).await?;
    let value = sources.value(&args.path);
    sources.close().await?;
    match value {
        Some(value) => {
            print_value(global.json, &args.path, &value, false);
            Ok(())
        }
        None => Err(format!("{} is not set", args.path).into()),
    }
}

fn print_value(json: bool, path: &str, value: &serde_json::Value, with_path: bool) {
    if json {
        println!("{}", serde_json::json!({ "path": path, "value": value }));
        return;
    }
    let text = match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => "(not set)".into(),
        other => other.to_string(),
    };
    if with_path {
        println!("{path} = {text}");
    } else {
        println!("{text}");
    }
}

async fn watch(global: &Global, args: &WatchArgs) -> Result<(), BoxError> {
    let path = &args.read.path;
    let sources = Sources::open(&args.read).await?;
    let mut last = sources.value(path).unwrap_or(serde_json::Value::Null);
    print_value(global.json, path, &last, true);
    let mut local = sources.local.watch::<serde_json::Value>(path);
    let mut mesh = match &sources.mesh {
        Some(service) => service.config().watch::<serde_json::Value>(path).boxed(),
        None => futures::stream::pending().boxed(),
    };
    let signal = micromesh::service::shutdown_signal();
    tokio::pin!(signal);
    let mut changes = 0;
    while args.count.is_none_or(|count| changes < count) {
        let event = tokio::select! {
            event = local.next() => event,
            event = mesh.next() => event,
            result = &mut signal => {
                result?;
                break;
            }
        };
        match event {
            // A source's error: say so, and go on with the last good values.
            Some(Err(e)) if !matches!(e, micromesh::config::Error::Missing { .. }) => {
                if global.json {
                    println!(
                        "{}",
                        serde_json::json!({ "path": path, "error": e.to_string() })
                    );
                } else {
                    eprintln!("warning: {e}");
                }
                continue;
            }
            Some(_) => {}
            None => break,
        }
        let value = sources.value(path).unwrap_or(serde_json::Value::Null);
        if value != last {
            print_value(global.json, path, &value, true);
            last = value;
            changes += 1;
        }
    }
    sources.close().await
}
