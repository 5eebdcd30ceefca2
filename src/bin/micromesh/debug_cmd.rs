//! `micromesh health`, `micromesh stats` and `micromesh logs`: a service's debug endpoints.

use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::Args;
use micromesh::{
    PeerId, Service,
    client::CallOptions,
    debug::{self, Health, LogRecord, LogRequest, Stats},
};

use crate::cli::{BoxError, Global, Join, date_time, print_table};

#[derive(Args, Debug)]
pub(crate) struct HealthArgs {
    /// The service name.
    name: String,
    /// Ask only this instance.
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<PeerId>,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// The service name.
    name: String,
    /// Ask only this instance.
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<PeerId>,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    /// The service name.
    name: String,
    /// The instance to read (needed when the service runs on more than one node).
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<PeerId>,
    /// The least severe level shown: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    level: String,
    /// How many recent records to show first.
    #[arg(long, short = 'n', default_value_t = 100)]
    limit: u32,
    /// Go on showing records as they are logged, until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    #[command(flatten)]
    join: Join,
}

/// The instances of `name` (or the one asked for).
async fn instances(
    service: &Service,
    name: &str,
    peer: Option<PeerId>,
) -> Result<Vec<PeerId>, BoxError> {
    service.registry().refresh().await?;
    let entries = service.registry().get_service(name).await?;
    let mut peers: Vec<PeerId> = entries
        .iter()
        .flat_map(|entry| entry.nodes.iter().map(|node| node.peer_id))
        .collect();
    peers.sort();
    peers.dedup();
    if peers.is_empty() {
        return Err(format!("no instance of {name} found").into());
    }
    match peer {
        Some(peer) if peers.contains(&peer) => Ok(vec![peer]),
        Some(peer) => Err(format!("{name} does not run on {peer}").into()),
        None => Ok(peers),
    }
}

fn options(join: &Join, peer: PeerId) -> CallOptions {
    CallOptions::default()
        .peer(peer)
        .timeout(join.timeout)
        .retries(0)
}

pub(crate) async fn health(global: &Global, args: &HealthArgs) -> Result<(), BoxError> {
    let service = args.join.connect().await?;
    let result = async {
        let peers = instances(&service, &args.name, args.peer).await?;
        let mut answers = Vec::new();
        for peer in peers {
            let started = Instant::now();
            let answer = service
                .client()
                .call_with::<_, Health>(&args.name, debug::HEALTH, &(), options(&args.join, peer))
                .await;
            answers.push((peer, answer, started.elapsed()));
        }
        Ok::<_, BoxError>(answers)
    }
    .await;
    service.stop().await?;
    let answers = result?;
    let healthy = answers
        .iter()
        .all(|(_, answer, _)| answer.as_ref().is_ok_and(Health::is_serving));
    if global.json {
        let list: Vec<_> = answers
            .iter()
            .map(|(peer, answer, took)| match answer {
                Ok(health) => serde_json::json!({
                    "peer": peer.to_string(),
                    "status": health.status,
                    "version": health.version,
                    "latency_ms": took.as_secs_f64() * 1e3,
                }),
                Err(e) => serde_json::json!({
                    "peer": peer.to_string(),
                    "status": "unreachable",
                    "error": e.to_string(),
                }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let rows: Vec<Vec<String>> = answers
            .iter()
            .map(|(peer, answer, took)| match answer {
                Ok(health) => vec![
                    peer.to_string(),
                    health.version.clone(),
                    health.status.clone(),
                    format!("{:.1} ms", took.as_secs_f64() * 1e3),
                ],
                Err(e) => vec![
                    peer.to_string(),
                    "-".into(),
                    format!("unreachable: {e}"),
                    "-".into(),
                ],
            })
            .collect();
        print_table(&["PEER", "VERSION", "STATUS", "LATENCY"], &rows);
    }
    if healthy {
        Ok(())
    } else {
        Err(format!("not every instance of {} is serving", args.name).into())
    }
}

pub(crate) async fn stats(global: &Global, args: &StatsArgs) -> Result<(), BoxError> {
    let service = args.join.connect().await?;
    let result = async {
        let peers = instances(&service, &args.name, args.peer).await?;
        let mut answers = Vec::new();
        for peer in peers {
            let stats = service
                .client()
                .call_with::<_, Stats>(&args.name, debug::STATS, &(), options(&args.join, peer))
                .await
                .map_err(|e| format!("{peer}: {e}"))?;
            answers.push(stats);
        }
        Ok::<_, BoxError>(answers)
    }
    .await;
    service.stop().await?;
    let answers = result?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&answers)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answers
        .iter()
        .map(|s| {
            vec![
                s.peer_id.clone(),
                s.version.clone(),
                uptime(Duration::from_secs(s.uptime_secs)),
                s.memory_bytes.map_or("-".into(), |b| {
                    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
                }),
                s.threads.map_or("-".into(), |t| t.to_string()),
                s.requests.to_string(),
                s.errors.to_string(),
                s.in_flight.to_string(),
                s.connections.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "PEER",
            "VERSION",
            "UPTIME",
            "MEMORY",
            "THREADS",
            "REQUESTS",
            "ERRORS",
            "IN FLIGHT",
            "CONNECTIONS",
        ],
        &rows,
    );
    Ok(())
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

pub(crate) async fn logs(global: &Global, args: &LogsArgs) -> Result<(), BoxError> {
    if debug::parse_level(&args.level).is_none() {
        return Err(format!(
            "unknown log level {:?}; use error, warn, info, debug or trace",
            args.level
        )
        .into());
    }
    let service = args.join.connect().await?;
    let result = async {
        let peers = instances(&service, &args.name, args.peer).await?;
        let peer = match peers.as_slice() {
            [peer] => *peer,
            many => {
                let list: Vec<String> = many.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "{} runs on {} nodes; pick one with --peer: {}",
                    args.name,
                    many.len(),
                    list.join(", ")
                )
                .into());
            }
        };
        let request = LogRequest::new(Some(&args.level), Some(args.limit), args.follow);
        // Following has no end but the user's: only the first answer is bounded.
        let options = CallOptions::default()
            .peer(peer)
            .retries(0)
            .timeout(if args.follow {
                Duration::from_secs(365 * 86400)
            } else {
                args.join.timeout
            });
        let mut call = service
            .client()
            .server_stream::<_, LogRecord>(&args.name, debug::LOG, &request, options)
            .await?;
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            let record = tokio::select! {
                record = call.recv() => record,
                _ = &mut interrupted => break,
            };
            match record {
                Some(Ok(record)) => print_record(global.json, &record)?,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
        }
        Ok::<_, BoxError>(())
    }
    .await;
    service.stop().await?;
    result
}

fn print_record(json: bool, record: &LogRecord) -> Result<(), BoxError> {
    if json {
        println!("{}", serde_json::to_string(record)?);
        return Ok(());
    }
    let at = UNIX_EPOCH + Duration::from_millis(record.time_unix_ms);
    let mut line = format!(
        "{} {:5} {}: {}",
        date_time(at),
        record.level,
        record.target,
        record.message
    );
    for (key, value) in &record.fields {
        line.push_str(&format!(" {key}={value}"));
    }
    println!("{line}");
    Ok(())
}
