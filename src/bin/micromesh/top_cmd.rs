//! `micromesh top`: a live view of the mesh's services and endpoints: request rate, error rate,
//! p50 and p99, from every instance's `Debug.Stats`, refreshed every interval.

use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use clap::Args;
use micromesh::{
    PeerId, Service,
    client::CallOptions,
    debug::{self, EndpointStats, Stats},
};
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    layout::Constraint,
    style::{Modifier, Style},
    widgets::{Block, Row, Table},
};

use crate::cli::{BoxError, Global, Join, parse_duration, print_table};

#[derive(Args, Debug)]
pub(crate) struct TopArgs {
    /// How often to refresh (the rates are over this interval).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Print one view (rates over one interval) and exit, instead of the live view. The
    /// default when standard output is not a terminal.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    join: Join,
}

/// One line of the view: an endpoint of a service, over every instance that serves it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Line {
    pub(crate) service: String,
    pub(crate) endpoint: String,
    pub(crate) instances: usize,
    pub(crate) per_second: f64,
    /// Errors over calls, 0 to 1; `None` without calls.
    pub(crate) error_ratio: Option<f64>,
    pub(crate) p50: Option<Duration>,
    pub(crate) p99: Option<Duration>,
}

/// What the view shows at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) lines: Vec<Line>,
    pub(crate) services: usize,
    pub(crate) instances: usize,
    /// Instances that did not answer, with why.
    pub(crate) unreachable: Vec<String>,
}

/// The readings of every instance: (service, peer) → stats.
type Readings = HashMap<(String, PeerId), Stats>;

/// Reads `Debug.Stats` of every instance of every service.
async fn read(service: &Service, timeout: Duration) -> (Readings, Vec<String>) {
    let _ = service.registry().refresh().await;
    let mut readings = HashMap::new();
    let mut unreachable = Vec::new();
    let mut calls = Vec::new();
    for entry in service.registry().list_services() {
        for node in &entry.nodes {
            let (name, peer) = (entry.name.clone(), node.peer_id);
            let client = service.client().clone();
            calls.push(async move {
                let options = CallOptions::default()
                    .peer(peer)
                    .timeout(timeout)
                    .retries(0);
                let stats = client
                    .call_with::<_, Stats>(&name, debug::STATS, &(), options)
                    .await;
                (name, peer, stats)
            });
        }
    }
    for (name, peer, stats) in futures::future::join_all(calls).await {
        match stats {
            Ok(stats) => {
                readings.insert((name, peer), stats);
            }
            Err(e) => unreachable.push(format!("{name} on {peer}: {e}")),
        }
    }
    (readings, unreachable)
}

/// The view between two readings `elapsed` apart.
pub(crate) fn snapshot(
    before: &Readings,
    now: &Readings,
    elapsed: Duration,
    unreachable: Vec<String>,
) -> Snapshot {
    let mut by_endpoint: BTreeMap<(String, String), (usize, EndpointStats)> = BTreeMap::new();
    for ((service, peer), stats) in now {
        let earlier = before.get(&(service.clone(), *peer));
        for endpoint in &stats.endpoints {
            let window = match earlier
                .and_then(|e| e.endpoints.iter().find(|x| x.method == endpoint.method))
            {
                Some(then) => endpoint.since(then),
                // New since the last reading: everything it served is in the window.
                None if earlier.is_some() => endpoint.clone(),
                // First reading: no rate yet.
                None => endpoint.since(endpoint),
            };
            let slot = by_endpoint
                .entry((service.clone(), endpoint.method.clone()))
                .or_insert_with(|| (0, window.since(&window)));
            slot.0 += 1;
            slot.1 = add(&slot.1, &window);
        }
    }
    let seconds = elapsed.as_secs_f64().max(1e-3);
    let lines = by_endpoint
        .into_iter()
        .map(|((service, endpoint), (instances, window))| Line {
            service,
            endpoint,
            instances,
            per_second: window.calls as f64 / seconds,
            error_ratio: (window.calls > 0).then(|| window.errors as f64 / window.calls as f64),
            p50: window.latency_quantile(0.5).map(Duration::from_secs_f64),
            p99: window.latency_quantile(0.99).map(Duration::from_secs_f64),
        })
        .collect();
    let services: std::collections::HashSet<&String> = now.keys().map(|(s, _)| s).collect();
    Snapshot {
        lines,
        services: services.len(),
        instances: now.len(),
        unreachable,
    }
}

fn add(a: &EndpointStats, b: &EndpointStats) -> EndpointStats {
    let len = a.latency_buckets.len().max(b.latency_buckets.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    let mut sum = b.clone();
    sum.calls = a.calls + b.calls;
    sum.errors = a.errors + b.errors;
    sum.latency_buckets = (0..len)
        .map(|i| at(&a.latency_buckets, i) + at(&b.latency_buckets, i))
        .collect();
    sum
}

fn duration(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(1) => format!("{:.0} µs", d.as_secs_f64() * 1e6),
        Some(d) if d < Duration::from_secs(1) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

/// The columns of a line, as text.
fn cells(line: &Line) -> Vec<String> {
    vec![
        line.service.clone(),
        line.endpoint.clone(),
        line.instances.to_string(),
        format!("{:.1}", line.per_second),
        line.error_ratio
            .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
        duration(line.p50),
        duration(line.p99),
    ]
}

const HEADER: [&str; 7] = [
    "SERVICE",
    "ENDPOINT",
    "INSTANCES",
    "CALLS/S",
    "ERRORS",
    "P50",
    "P99",
];

/// Draws the view.
pub(crate) fn render(frame: &mut Frame<'_>, snapshot: &Snapshot, interval: Duration) {
    let rows = snapshot.lines.iter().map(|line| Row::new(cells(line)));
    let widths = [
        Constraint::Min(12),
        Constraint::Min(16),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(9),
    ];
    let mut title = format!(
        " micromesh top: {} services, {} instances, every {:?}; q quits ",
        snapshot.services, snapshot.instances, interval
    );
    if !snapshot.unreachable.is_empty() {
        title.push_str(&format!("({} unreachable) ", snapshot.unreachable.len()));
    }
    let table = Table::new(rows, widths)
        .header(Row::new(HEADER).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(title));
    frame.render_widget(table, frame.area());
}

pub(crate) async fn run(global: &Global, args: &TopArgs) -> Result<(), BoxError> {
    let service = args.join.connect().await?;
    let result = if args.once || global.json || !std::io::stdout().is_terminal() {
        once(global, args, &service).await
    } else {
        live(args, &service).await
    };
    service.stop().await?;
    result
}

async fn once(global: &Global, args: &TopArgs, service: &Service) -> Result<(), BoxError> {
    let (before, _) = read(service, args.join.timeout).await;
    let started = Instant::now();
    tokio::time::sleep(args.interval).await;
    let (now, unreachable) = read(service, args.join.timeout).await;
    let view = snapshot(&before, &now, started.elapsed(), unreachable);
    if global.json {
        let lines: Vec<_> = view
            .lines
            .iter()
            .map(|l| {
                serde_json::json!({
                    "service": l.service,
                    "endpoint": l.endpoint,
                    "instances": l.instances,
                    "calls_per_second": l.per_second,
                    "error_ratio": l.error_ratio,
                    "p50_ms": l.p50.map(|d| d.as_secs_f64() * 1e3),
                    "p99_ms": l.p99.map(|d| d.as_secs_f64() * 1e3),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "services": view.services,
                "instances": view.instances,
                "endpoints": lines,
                "unreachable": view.unreachable,
            }))?
        );
    } else {
        let rows: Vec<Vec<String>> = view.lines.iter().map(cells).collect();
        print_table(&HEADER, &rows);
        for line in &view.unreachable {
            eprintln!("unreachable: {line}");
        }
    }
    Ok(())
}

async fn live(args: &TopArgs, service: &Service) -> Result<(), BoxError> {
    let mut terminal = ratatui::init();
    let outcome = async {
        let (mut before, _) = read(service, args.join.timeout).await;
        let mut taken = Instant::now();
        let mut view = Snapshot::default();
        loop {
            terminal.draw(|frame| render(frame, &view, args.interval))?;
            // Keys are read on a blocking thread for up to one interval.
            let interval = args.interval;
            let quit = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                let deadline = Instant::now() + interval;
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    if !event::poll(left)? {
                        break;
                    }
                    if let Event::Key(key) = event::read()? {
                        let ctrl_c = key.code == KeyCode::Char('c')
                            && key.modifiers.contains(KeyModifiers::CONTROL);
                        if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                            return Ok(true);
                        }
                    }
                }
                Ok(false)
            })
            .await??;
            if quit {
                return Ok::<_, BoxError>(());
            }
            let (now, unreachable) = read(service, args.join.timeout).await;
            view = snapshot(&before, &now, taken.elapsed(), unreachable);
            before = now;
            taken = Instant::now();
        }
    }
    .await;
    ratatui::restore();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{Terminal, backend::TestBackend};

    fn stats(service: &str, peer: PeerId, calls: u64, errors: u64, slow: u64) -> Stats {
        let mut buckets = vec![0u64; 22];
        buckets[3] = calls - slow; // 40–80 µs
        buckets[12] = slow; // 20–41 ms
        serde_json::from_value(serde_json::json!({
            "service": service, "version": "1", "peer_id": peer.to_string(),
            "started_unix_ms": 0, "uptime_secs": 10, "memory_bytes": null, "threads": null,
            "requests": calls, "errors": errors, "in_flight": 0, "connections": 1,
            "endpoints": [{
                "method": "Greeter.Hello", "calls": calls, "errors": errors,
                "latency_buckets": buckets,
            }],
        }))
        .unwrap()
    }

    #[test]
    fn rates_and_quantiles_over_instances_render_as_a_table() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let before: Readings = [
            (("greeter".into(), a), stats("greeter", a, 100, 0, 0)),
            (("greeter".into(), b), stats("greeter", b, 100, 0, 0)),
        ]
        .into();
        // In 2 s: 300 calls on a, 100 on b; 4 errors; 8 slow ones (2 %).
        let now: Readings = [
            (("greeter".into(), a), stats("greeter", a, 400, 4, 4)),
            (("greeter".into(), b), stats("greeter", b, 200, 0, 4)),
        ]
        .into();
        let view = snapshot(&before, &now, Duration::from_secs(2), vec![]);
        assert_eq!(view.services, 1);
        assert_eq!(view.instances, 2);
        let line = &view.lines[0];
        assert_eq!(
            (line.service.as_str(), line.endpoint.as_str()),
            ("greeter", "Greeter.Hello")
        );
        assert_eq!(line.instances, 2);
        assert!((line.per_second - 200.0).abs() < 1e-9, "{line:?}");
        assert_eq!(line.error_ratio, Some(0.01));
        assert!(line.p50.unwrap() < Duration::from_micros(80), "{line:?}");
        assert!(line.p99.unwrap() > Duration::from_millis(20), "{line:?}");

        let mut terminal = Terminal::new(TestBackend::new(90, 5)).unwrap();
        terminal
            .draw(|frame| render(frame, &view, Duration::from_secs(1)))
            .unwrap();
        let screen: Vec<String> = terminal
            .backend()
            .buffer()
            .content
            .chunks(90)
            .map(|row| row.iter().map(|cell| cell.symbol()).collect())
            .collect();
        assert!(screen[0].contains("1 services, 2 instances"), "{screen:#?}");
        assert!(
            screen[1].contains("SERVICE") && screen[1].contains("P99"),
            "{screen:#?}"
        );
        let row = &screen[2];
        for expected in ["greeter", "Greeter.Hello", "200.0", "1.0%"] {
            assert!(row.contains(expected), "{expected} not in {row:?}");
        }
        assert!(row.contains(" µs") && row.contains(" ms"), "{row:?}");
    }

    #[test]
    fn a_first_reading_has_no_rate_and_a_restart_starts_over() {
        let a = PeerId::random();
        let now: Readings = [(("greeter".into(), a), stats("greeter", a, 50, 0, 0))].into();
        let first = snapshot(&Readings::new(), &now, Duration::from_secs(1), vec![]);
        assert_eq!(first.lines[0].per_second, 0.0);
        assert_eq!(first.lines[0].p50, None);
        let before: Readings = [(("greeter".into(), a), stats("greeter", a, 900, 0, 0))].into();
        let restarted = snapshot(&before, &now, Duration::from_secs(1), vec![]);
        assert_eq!(restarted.lines[0].per_second, 50.0);
    }
}
