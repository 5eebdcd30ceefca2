//! `micromesh store …`: the replicated key-value store from the command line.

use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};
use micromesh::{
    Service,
    store::{ListOptions, Record, Store, WriteOptions},
};

use crate::cli::{BoxError, Global, Join, parse_duration};

#[derive(Subcommand, Debug)]
pub(crate) enum StoreCommand {
    /// Write VALUE (UTF-8 text) under KEY; prints the version written.
    Write(WriteArgs),
    /// Print the value under KEY; exits with 1 if there is none.
    Read(KeyArgs),
    /// Delete KEY (a tombstone that wins over older writes).
    Delete(KeyArgs),
    /// List the keys of a table across the mesh, in key order.
    List(ListArgs),
}

/// Which table.
#[derive(Args, Debug)]
pub(crate) struct Table {
    /// The database.
    #[arg(long, default_value = "micromesh")]
    database: String,
    /// The table.
    #[arg(long, default_value = "default")]
    table: String,
}

#[derive(Args, Debug)]
pub(crate) struct WriteArgs {
    /// The key.
    key: String,
    /// The value, as text.
    value: String,
    /// Expire the record this long after the write, e.g. `30s`, `10m`, `2h`.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Metadata stored with the record, as KEY=VALUE (repeatable).
    #[arg(long = "metadata", short = 'm', value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    #[command(flatten)]
    table: Table,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct KeyArgs {
    /// The key.
    key: String,
    #[command(flatten)]
    table: Table,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Only keys that start with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// At most this many keys.
    #[arg(long)]
    limit: Option<usize>,
    /// Skip this many keys first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    #[command(flatten)]
    table: Table,
    #[command(flatten)]
    join: Join,
}

pub(crate) async fn run(global: &Global, command: &StoreCommand) -> Result<(), BoxError> {
    let (join, table) = match command {
        StoreCommand::Write(a) => (&a.join, &a.table),
        StoreCommand::Read(a) | StoreCommand::Delete(a) => (&a.join, &a.table),
        StoreCommand::List(a) => (&a.join, &a.table),
    };
    let service = join.connect().await?;
    let result = execute(global, command, &service, table).await;
    let stopped = service.stop().await;
    result?;
    stopped?;
    Ok(())
}

async fn execute(
    global: &Global,
    command: &StoreCommand,
    service: &Service,
    table: &Table,
) -> Result<(), BoxError> {
    let store: Store = service.store().table(&table.database, &table.table)?;
    match command {
        StoreCommand::Write(args) => {
            let mut options = WriteOptions::new();
            if let Some(ttl) = args.ttl {
                options = options.ttl(ttl);
            }
            for entry in &args.metadata {
                let (k, v) = entry
                    .split_once('=')
                    .ok_or_else(|| format!("metadata must be KEY=VALUE, got {entry:?}"))?;
                options = options.metadata(k, v);
            }
            let version = store
                .write_with(&args.key, args.value.clone().into_bytes(), options)
                .await?;
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({ "key": args.key, "version": version })
                );
            } else {
                println!("wrote {} (version {version})", args.key);
            }
        }
        StoreCommand::Read(args) => match store.read(&args.key).await? {
            Some(record) => {
                if global.json {
                    println!("{}", record_json(&record));
                } else {
                    println!("{}", String::from_utf8_lossy(&record.value));
                }
            }
            None => return Err(format!("not found: {}", args.key).into()),
        },
        StoreCommand::Delete(args) => {
            store.delete(&args.key).await?;
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({ "key": args.key, "deleted": true })
                );
            } else {
                println!("deleted {}", args.key);
            }
        }
        StoreCommand::List(args) => {
            let mut options = ListOptions::new()
                .prefix(args.prefix.clone())
                .offset(args.offset);
            if let Some(limit) = args.limit {
                options = options.limit(limit);
            }
            let keys = store.list(options).await?;
            if global.json {
                println!("{}", serde_json::to_string(&keys)?);
            } else if keys.is_empty() {
                // On stderr: standard output holds keys only, for scripts.
                let matching = if args.prefix.is_empty() {
                    String::new()
                } else {
                    format!(" starting with {:?}", args.prefix)
                };
                eprintln!(
                    "no keys{matching} in table {}/{}",
                    table.database, table.table
                );
            } else {
                for key in keys {
                    println!("{key}");
                }
            }
        }
    }
    Ok(())
}

fn record_json(record: &Record) -> serde_json::Value {
    let metadata: serde_json::Map<String, serde_json::Value> = record
        .metadata
        .iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
        .collect();
    let expires_ms = record.expires.and_then(|t| {
        t.duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    });
    let value = match std::str::from_utf8(&record.value) {
        Ok(text) => serde_json::json!({ "value": text }),
        Err(_) => {
            serde_json::json!({ "value_hex": record.value.iter().map(|b| format!("{b:02x}")).collect::<String>() })
        }
    };
    let mut out = serde_json::json!({
        "key": record.key,
        "version": record.version,
        "writer": record.writer.to_string(),
        "metadata": metadata,
        "expires_ms": expires_ms,
    });
    if let (Some(out), serde_json::Value::Object(value)) = (out.as_object_mut(), value) {
        out.extend(value);
    }
    out
}
