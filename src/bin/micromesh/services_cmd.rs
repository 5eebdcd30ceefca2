//! `micromesh services` and `micromesh describe`: what the registry knows.

use std::collections::BTreeMap;

use clap::Args;
use micromesh::registry::Entry;

use crate::cli::{BoxError, Global, Join, print_table};

#[derive(Args, Debug)]
pub(crate) struct ServicesArgs {
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct DescribeArgs {
    /// The service name.
    name: String,
    #[command(flatten)]
    join: Join,
}

pub(crate) async fn services(global: &Global, args: &ServicesArgs) -> Result<(), BoxError> {
    let service = args.join.connect().await?;
    service.registry().refresh().await?;
    let found = service.registry().list_services();
    service.stop().await?;

    // One row per name: its versions and how many nodes run it.
    let mut by_name: BTreeMap<&str, (Vec<&str>, usize)> = BTreeMap::new();
    for s in &found {
        let entry = by_name.entry(&s.name).or_default();
        entry.0.push(&s.version);
        entry.1 += s.nodes.len();
    }
    if global.json {
        let list: Vec<_> = by_name
            .iter()
            .map(|(name, (versions, nodes))| {
                serde_json::json!({ "name": name, "versions": versions, "nodes": nodes })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if by_name.is_empty() {
        println!("no services found");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = by_name
        .iter()
        .map(|(name, (versions, nodes))| {
            vec![(*name).to_owned(), versions.join(", "), nodes.to_string()]
        })
        .collect();
    print_table(&["SERVICE", "VERSIONS", "NODES"], &rows);
    Ok(())
}

pub(crate) async fn describe(global: &Global, args: &DescribeArgs) -> Result<(), BoxError> {
    let service = args.join.connect().await?;
    service.registry().refresh().await?;
    let result = service.registry().get_service(&args.name).await;
    service.stop().await?;
    let versions: Vec<Entry> = result?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&versions)?);
        return Ok(());
    }
    for (i, s) in versions.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("service  {}", s.name);
        println!("version  {}", s.version);
        for (k, v) in s.metadata.iter() {
            println!("meta     {k}={v}");
        }
        if s.endpoints.is_empty() {
            println!("endpoints  (none)");
        } else {
            println!("endpoints");
            // What to send: a JSON example when the service gave one, else the type's name.
            let rows: Vec<Vec<String>> = s
                .endpoints
                .iter()
                .map(|e| {
                    vec![
                        format!("  {}", e.name),
                        e.kind().unwrap_or("-").to_owned(),
                        e.request_example()
                            .map_or_else(|| format!("<{}>", e.request), str::to_owned),
                        e.response.clone(),
                    ]
                })
                .collect();
            print_table(&["  NAME", "KIND", "REQUEST (JSON)", "RESPONSE"], &rows);
        }
        println!("nodes");
        let rows: Vec<Vec<String>> = s
            .nodes
            .iter()
            .map(|n| {
                vec![
                    format!("  {}", n.peer_id),
                    n.addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                    n.metadata
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect();
        print_table(&["  PEER", "ADDRESSES", "METADATA"], &rows);
    }
    Ok(())
}
