//! `micromesh health`, `micromesh stats`, `micromesh logs` and `micromesh trace`: a service's
//! debug endpoints.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    time::{Duration, Instant, UNIX_EPOCH},
};

use clap::Args;
use micromesh::{
    PeerId, Service,
    client::CallOptions,
    debug::{self, Health, LogRecord, LogRequest, SpanRecord, Stats, TraceRequest},
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

#[derive(Args, Debug)]
pub(crate) struct TraceArgs {
    /// The service name.
    name: String,
    /// Ask only this instance.
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<PeerId>,
    /// Only the spans of this trace (32 hex digits, as in a `traceparent`).
    #[arg(long = "trace-id", value_name = "ID")]
    trace_id: Option<String>,
    /// How many recent spans to ask each instance for.
    #[arg(long, short = 'n', default_value_t = 100)]
    limit: u32,
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

pub(crate) async fn trace(global: &Global, args: &TraceArgs) -> Result<(), BoxError> {
    if let Some(id) = &args.trace_id
        && !micromesh::trace::is_trace_id(id)
    {
        return Err(format!("{id:?} is not a trace id: 32 lower-case hex digits").into());
    }
    let service = args.join.connect().await?;
    let result = async {
        let peers = instances(&service, &args.name, args.peer).await?;
        let request = TraceRequest::new(args.trace_id.as_deref(), Some(args.limit));
        let mut spans = Vec::new();
        for peer in peers {
            let answer = service
                .client()
                .call_with::<_, Vec<SpanRecord>>(
                    &args.name,
                    debug::TRACE,
                    &request,
                    options(&args.join, peer),
                )
                .await
                .map_err(|e| format!("{peer}: {e}"))?;
            spans.extend(answer);
        }
        Ok::<_, BoxError>(spans)
    }
    .await;
    service.stop().await?;
    let mut spans = result?;
    // Services of one process share its spans: each once.
    let mut seen = HashSet::new();
    spans.retain(|s| seen.insert((s.trace_id.clone(), s.span_id.clone())));
    spans.sort_by_key(|s| s.start_unix_us);
    if global.json {
        println!("{}", serde_json::to_string_pretty(&spans)?);
        return Ok(());
    }
    if spans.is_empty() {
        println!("no spans recorded");
        return Ok(());
    }
    print!("{}", render_traces(&spans));
    Ok(())
}

/// Spans grouped by trace, oldest trace first, each as a tree of calls:
///
/// ```text
/// trace 4bf92f3577b34da6a3ce929d0e0e4736  2026-12-05 21:40:01 UTC  2 spans  2.31 ms
///   client greeter/Greeter.Hello  200  2.31 ms  peer 12D3KooW…
///     server greeter/Greeter.Hello  200  1.20 ms  peer 12D3KooW…
/// ```
pub(crate) fn render_traces(spans: &[SpanRecord]) -> String {
    let mut traces: BTreeMap<&str, Vec<&SpanRecord>> = BTreeMap::new();
    for span in spans {
        traces.entry(&span.trace_id).or_default().push(span);
    }
    let mut traces: Vec<(&str, Vec<&SpanRecord>)> = traces.into_iter().collect();
    traces.sort_by_key(|(_, spans)| spans.iter().map(|s| s.start_unix_us).min());
    let mut out = String::new();
    for (trace_id, mut spans) in traces {
        spans.sort_by_key(|s| s.start_unix_us);
        let start = spans[0].start_unix_us;
        let end = spans
            .iter()
            .map(|s| s.start_unix_us + s.duration_us)
            .max()
            .unwrap_or(start);
        let _ = writeln!(
            out,
            "trace {trace_id}  {}  {} span{}  {}",
            date_time(UNIX_EPOCH + Duration::from_micros(start)),
            spans.len(),
            if spans.len() == 1 { "" } else { "s" },
            millis(end - start),
        );
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        // Spans whose parent is not here (the trace's root, or a caller outside this
        // process) start a tree.
        let roots = spans
            .iter()
            .filter(|s| s.parent_span_id.as_deref().is_none_or(|p| !ids.contains(p)));
        for root in roots {
            render_span(&mut out, root, &spans, 1);
        }
    }
    out
}

fn render_span(out: &mut String, span: &SpanRecord, all: &[&SpanRecord], depth: usize) {
    let attribute = |name| span.attribute(name).unwrap_or("?");
    let what = match span.name.as_str() {
        "call" => format!(
            "{}/{}  {}",
            attribute("rpc.service"),
            attribute("rpc.method"),
            attribute("rpc.response.status_code"),
        ),
        name => name.to_owned(),
    };
    let mut line = format!(
        "{:indent$}{} {what}  {}",
        "",
        span.kind,
        millis(span.duration_us),
        indent = depth * 2,
    );
    if let Some(peer) = span.attribute("peer") {
        let _ = write!(line, "  peer {peer}");
    }
    let _ = writeln!(out, "{line}");
    // Depth is bounded: spans come from peers, and a cycle of parents must not recurse forever.
    if depth >= 32 {
        return;
    }
    for child in all
        .iter()
        .filter(|s| s.parent_span_id.as_deref() == Some(span.span_id.as_str()))
    {
        render_span(out, child, all, depth + 1);
    }
}

fn millis(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, kind: &str, start: u64, took: u64) -> SpanRecord {
        serde_json::from_value(serde_json::json!({
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_id": id,
            "parent_span_id": parent,
            "name": "call",
            "kind": kind,
            "start_unix_us": start,
            "duration_us": took,
            "attributes": {
                "rpc.service": "greeter",
                "rpc.method": "Greeter.Hello",
                "rpc.response.status_code": "200",
                "peer": "12D3KooWpeer",
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_trace_renders_as_a_tree_of_calls() {
        let spans = [
            span("00000000000000a1", None, "client", 1_000, 2_310),
            span(
                "00000000000000a2",
                Some("00000000000000a1"),
                "server",
                1_500,
                1_200,
            ),
            span(
                "00000000000000a3",
                Some("00000000000000a2"),
                "client",
                1_600,
                500,
            ),
        ];
        let text = render_traces(&spans);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("trace 4bf92f3577b34da6a3ce929d0e0e4736  1970-01-01"));
        assert!(lines[0].ends_with("3 spans  2.31 ms"), "{text}");
        assert_eq!(
            lines[1],
            "  client greeter/Greeter.Hello  200  2.31 ms  peer 12D3KooWpeer"
        );
        assert!(lines[2].starts_with("    server greeter/Greeter.Hello  200  1.20 ms"));
        assert!(lines[3].starts_with("      client "));
    }

    #[test]
    fn a_cycle_of_parents_does_not_recurse_forever() {
        let spans = [
            span("00000000000000a1", Some("00000000000000a2"), "client", 1, 1),
            span("00000000000000a2", Some("00000000000000a1"), "server", 2, 1),
            span("00000000000000a3", None, "client", 3, 1),
        ];
        // Neither of the two in a cycle is a root; the one root renders.
        assert_eq!(render_traces(&spans).lines().count(), 2);
    }
}
