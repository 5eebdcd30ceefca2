//! `micromesh call` and `micromesh stream`: call any endpoint with JSON.

use std::io::BufRead as _;

use clap::Args;
use micromesh::{PeerId, client::CallOptions, codec::ContentType};

use crate::cli::{BoxError, Global, Join, parse_duration};

#[derive(Args, Debug)]
pub(crate) struct CallArgs {
    /// The service name, e.g. `greeter`.
    service: String,
    /// The endpoint, e.g. `Greeter.Hello`.
    endpoint: String,
    /// The request body as JSON, e.g. '{"name": "Ada"}'.
    #[arg(default_value = "{}")]
    body: String,
    /// Call this peer rather than the one the selector picks.
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<PeerId>,
    /// Metadata sent with the call, as KEY=VALUE (repeatable).
    #[arg(long = "metadata", short = 'm', value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// The whole call's time budget.
    #[arg(long = "call-timeout", default_value = "10s", value_parser = parse_duration)]
    call_timeout: std::time::Duration,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct StreamArgs {
    /// The service name.
    service: String,
    /// The endpoint.
    endpoint: String,
    /// A single request (for a server-streaming endpoint). Without it, requests are read from
    /// standard input, one JSON value per line (a bidirectional or client-streaming endpoint).
    body: Option<String>,
    /// Call this peer rather than the one the selector picks.
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<PeerId>,
    /// The whole call's time budget.
    #[arg(long = "call-timeout", default_value = "60s", value_parser = parse_duration)]
    call_timeout: std::time::Duration,
    #[command(flatten)]
    join: Join,
}

/// When the registry says `endpoint` is called the other way (a streaming endpoint given to
/// `call`, a unary one to `stream`), what to run instead.
async fn wrong_verb(
    service: &micromesh::Service,
    name: &str,
    endpoint: &str,
    streaming: bool,
) -> Option<String> {
    let versions = service.registry().get_service(name).await.ok()?;
    let kind = versions
        .iter()
        .flat_map(|v| &v.endpoints)
        .find(|e| e.name == endpoint)?
        .kind()?
        .to_owned();
    match (kind.as_str(), streaming) {
        ("unary", true) => Some(format!(
            "{endpoint} of {name} is a unary endpoint: call it with `micromesh call {name} {endpoint} '<json>'`"
        )),
        ("unary", false) | (_, true) => None,
        (kind, false) => Some(format!(
            "{endpoint} of {name} is a {kind} endpoint: call it with `micromesh stream {name} {endpoint}` \
             (one request as an argument, or one JSON request per line on standard input)"
        )),
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value, BoxError> {
    serde_json::from_str(text)
        .map_err(|e| format!("the request is not valid JSON ({e}): {text}").into())
}

fn options(
    timeout: std::time::Duration,
    peer: Option<PeerId>,
    metadata: &[String],
) -> Result<CallOptions, BoxError> {
    let mut options = CallOptions::default()
        .content_type(ContentType::Json)
        .timeout(timeout);
    if let Some(peer) = peer {
        options = options.peer(peer);
    }
    for entry in metadata {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| format!("metadata must be KEY=VALUE, got {entry:?}"))?;
        options = options.metadata(k, v);
    }
    Ok(options)
}

pub(crate) async fn call(global: &Global, args: &CallArgs) -> Result<(), BoxError> {
    let body = parse_json(&args.body)?;
    let options = options(args.call_timeout, args.peer, &args.metadata)?;
    let service = args.join.connect().await?;
    // Learn the mesh's services from the peers just joined (the DHT is the fallback).
    service.registry().refresh().await?;
    let result = match wrong_verb(&service, &args.service, &args.endpoint, false).await {
        Some(message) => Err(message.into()),
        None => service
            .client()
            .call_with::<_, serde_json::Value>(&args.service, &args.endpoint, &body, options)
            .await
            .map_err(BoxError::from),
    };
    service.stop().await?;
    let reply = result?;
    if global.json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    Ok(())
}

pub(crate) async fn stream(args: &StreamArgs) -> Result<(), BoxError> {
    let single = args.body.as_deref().map(parse_json).transpose()?;
    let options = options(args.call_timeout, args.peer, &[])?;
    let service = args.join.connect().await?;
    service.registry().refresh().await?;
    let client = service.client().clone();
    let result = async {
        if let Some(message) = wrong_verb(&service, &args.service, &args.endpoint, true).await {
            return Err(message.into());
        }
        let mut call = match &single {
            Some(body) => {
                client
                    .server_stream::<serde_json::Value, serde_json::Value>(
                        &args.service,
                        &args.endpoint,
                        body,
                        options,
                    )
                    .await?
            }
            None => {
                let mut call = client
                    .stream::<serde_json::Value, serde_json::Value>(
                        &args.service,
                        &args.endpoint,
                        options,
                    )
                    .await?;
                // Requests from standard input, read on a blocking thread.
                let (tx, mut rx) =
                    tokio::sync::mpsc::channel::<Result<serde_json::Value, String>>(64);
                std::thread::spawn(move || {
                    for line in std::io::stdin().lock().lines() {
                        let Ok(line) = line else { break };
                        if line.trim().is_empty() {
                            continue;
                        }
                        let value = serde_json::from_str(&line)
                            .map_err(|e| format!("invalid JSON line ({e}): {line}"));
                        if tx.blocking_send(value).is_err() {
                            break;
                        }
                    }
                });
                while let Some(value) = rx.recv().await {
                    call.send(&value?).await?;
                }
                call.close_send().await?;
                call
            }
        };
        while let Some(reply) = call.recv().await {
            println!("{}", serde_json::to_string(&reply?)?);
        }
        Ok::<(), BoxError>(())
    }
    .await;
    service.stop().await?;
    result
}
