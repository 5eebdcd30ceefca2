//! Arguments shared by every verb, joining the mesh, and output helpers.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use micromesh::{
    Identity, Multiaddr, PeerId, Service,
    auth::{self, DefaultPolicy, Rule},
    node::{self, PreSharedKey},
};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    name = "micromesh",
    version,
    about = "Services on a peer-to-peer mesh, no servers needed"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options of every command: how it prints and logs.
#[derive(Args, Debug)]
pub(crate) struct Global {
    /// Print one JSON document (or one JSON value per line for streams) instead of text.
    #[arg(long, global = true, env = "MICROMESH_JSON")]
    pub(crate) json: bool,
    /// Log filter, as in RUST_LOG (e.g. `info`, `micromesh=debug`). Logs go to stderr.
    #[arg(long, global = true, env = "MICROMESH_LOG", value_name = "FILTER")]
    pub(crate) log: Option<String>,
    /// How log lines are written: `text` (colours only on a terminal) or `json` (one object
    /// per line, for log collectors).
    #[arg(
        long,
        global = true,
        env = "MICROMESH_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub(crate) log_format: LogFormat,
    /// Export call spans over OTLP/HTTP to this receiver, e.g. `http://127.0.0.1:4318` (an
    /// OpenTelemetry collector).
    #[cfg(feature = "otel")]
    #[arg(long, global = true, env = "MICROMESH_OTLP", value_name = "URL")]
    pub(crate) otlp: Option<String>,
}

/// What logging keeps alive until the program exits: the span exporter, which sends what it
/// still holds when dropped.
pub(crate) struct LoggingGuard {
    #[cfg(feature = "otel")]
    _exporter: Option<micromesh::debug::OtlpExporter>,
}

impl LoggingGuard {
    /// Ends logging's background work: the exporter sends the spans it still holds.
    pub(crate) fn finish(self) {}
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The mesh a command joins and who it is there: the options of `node` and of every command
/// that talks to the mesh.
#[derive(Args, Debug)]
#[command(next_help_heading = "Mesh and auth")]
pub(crate) struct Mesh {
    /// The mesh network to join; nodes of other networks are invisible.
    #[arg(long, env = "MICROMESH_NETWORK", default_value = node::DEFAULT_NETWORK)]
    pub(crate) network: String,
    /// A `swarm.key` file: join a network closed by this pre-shared key (TCP only).
    #[arg(long, env = "MICROMESH_SWARM_KEY", value_name = "FILE")]
    pub(crate) swarm_key: Option<PathBuf>,
    /// Act as this identity: a key file from `micromesh identity new` (clients otherwise use a
    /// fresh one; `node` otherwise uses its data directory's).
    #[arg(
        id = "identity-key",
        long = "key",
        short = 'k',
        env = "MICROMESH_KEY",
        value_name = "FILE"
    )]
    pub(crate) key: Option<PathBuf>,
    /// Trust grants and revocations signed by this issuer (repeatable).
    #[arg(
        id = "auth-trust",
        long = "trust",
        env = "MICROMESH_TRUST",
        value_delimiter = ',',
        value_name = "PEER_ID"
    )]
    pub(crate) trust: Vec<PeerId>,
    /// Present this grant, as text or a file holding it (repeatable); its subject must be this
    /// node's identity (see --key).
    #[arg(
        long = "grant",
        env = "MICROMESH_GRANT",
        value_delimiter = ',',
        value_name = "GRANT"
    )]
    pub(crate) grants: Vec<String>,
    /// An auth rule: `allow|deny <resource> <subject> [priority]`, e.g.
    /// `allow endpoint:greeter/Admin.* role:ops 10` (repeatable; `;` between rules in the
    /// environment variable).
    #[arg(
        id = "auth-rule",
        long = "rule",
        env = "MICROMESH_RULE",
        value_delimiter = ';',
        value_name = "RULE"
    )]
    pub(crate) rules: Vec<Rule>,
    /// A file of auth rules, one per line; `#` starts a comment.
    #[arg(long, env = "MICROMESH_RULES", value_name = "FILE")]
    pub(crate) rules_file: Option<PathBuf>,
    /// Deny what no rule allows (by default any peer of the network is allowed).
    #[arg(long, env = "MICROMESH_DENY_BY_DEFAULT")]
    pub(crate) deny_by_default: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run a node until interrupted (ctrl-c or SIGTERM); any node can be a bootstrap peer.
    Node(crate::node_cmd::NodeArgs),
    /// Join the mesh and list the peers found.
    Peers(crate::peers_cmd::PeersArgs),
    /// List the services the mesh knows: name, versions, node count.
    Services(crate::services_cmd::ServicesArgs),
    /// Show one service: versions, endpoints and nodes.
    Describe(crate::services_cmd::DescribeArgs),
    /// Call an endpoint with a JSON body and print the JSON reply.
    Call(crate::call_cmd::CallArgs),
    /// Call a streaming endpoint; print each reply as one JSON line.
    Stream(crate::call_cmd::StreamArgs),
    /// Publish a JSON message on a topic.
    Publish(crate::pubsub_cmd::PublishArgs),
    /// Subscribe to a topic (or join a queue group); print each message as one JSON line.
    Subscribe(crate::pubsub_cmd::SubscribeArgs),
    /// Read and write the mesh's replicated key-value store.
    #[command(subcommand)]
    Store(crate::store_cmd::StoreCommand),
    /// Read, set and watch configuration: a file's, the environment's and the mesh's.
    #[command(subcommand)]
    Config(crate::config_cmd::ConfigCommand),
    /// Make and inspect identities: key files, peer ids, X.509 certificates.
    #[command(subcommand)]
    Identity(crate::identity_cmd::IdentityCommand),
    /// Sign, inspect and revoke grants of roles.
    #[command(subcommand)]
    Grant(crate::grant_cmd::GrantCommand),
    /// Ask every instance of a service whether it is serving (exit 1 if one is not).
    Health(crate::debug_cmd::HealthArgs),
    /// Show a service's instances: uptime, memory, threads, calls, errors, connections.
    Stats(crate::debug_cmd::StatsArgs),
    /// Show a service's recent log records; `--follow` goes on as they are logged.
    Logs(crate::debug_cmd::LogsArgs),
    /// Show a service's recent call spans, as a tree per trace.
    Trace(crate::debug_cmd::TraceArgs),
    /// A live view of every service's endpoints: calls/s, errors, p50, p99 (q quits).
    Top(crate::top_cmd::TopArgs),
}

/// How a short-lived client joins the mesh.
#[derive(Args, Debug)]
pub(crate) struct Join {
    /// A peer to join through, e.g. `/ip4/192.0.2.1/udp/4001/quic-v1/p2p/12D3…` (repeatable).
    #[arg(
        long = "bootstrap",
        short = 'b',
        env = "MICROMESH_BOOTSTRAP",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub(crate) bootstrap: Vec<Multiaddr>,
    /// How long to wait for the mesh to answer.
    #[arg(long, env = "MICROMESH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
    /// How long connecting to one peer may take. Over QUIC, a dial to an address where nothing
    /// listens fails only after this.
    #[arg(
        long,
        env = "MICROMESH_CONNECT_TIMEOUT",
        default_value = "3s",
        value_parser = parse_duration
    )]
    pub(crate) connect_timeout: Duration,
    #[command(flatten)]
    pub(crate) mesh: Mesh,
}

impl Join {
    /// Starts a client (no listeners, no mDNS/UPnP/AutoNAT, not registered as a service) and
    /// connects it to every bootstrap peer. Fails when none can be reached.
    pub(crate) async fn connect(&self) -> Result<Service, BoxError> {
        self.connect_listening(&[]).await
    }

    /// As [`Join::connect`], listening on `listen` so that peers can dial back (a subscriber
    /// must be reachable by publishers); no addresses means no listener.
    pub(crate) async fn connect_listening(
        &self,
        listen: &[Multiaddr],
    ) -> Result<Service, BoxError> {
        self.connect_with(listen, self.mesh.auth_config()?).await
    }

    /// As [`Join::connect`], also trusting `issuer` (the issuer's own tools).
    pub(crate) async fn connect_trusting(&self, issuer: PeerId) -> Result<Service, BoxError> {
        self.connect_with(&[], self.mesh.auth_config()?.trust(issuer))
            .await
    }

    async fn connect_with(
        &self,
        listen: &[Multiaddr],
        auth: auth::Config,
    ) -> Result<Service, BoxError> {
        if self.bootstrap.is_empty() {
            return Err(
                "no peer to join through: give --bootstrap MULTIADDR (or MICROMESH_BOOTSTRAP), \
                 the address a `micromesh node` prints"
                    .into(),
            );
        }
        let key = self.mesh.pre_shared_key()?;
        let timeout = self.timeout;
        let connect_timeout = self.connect_timeout.min(timeout);
        let listen = listen.to_vec();
        let mut builder = Service::builder("micromesh-cli");
        if let Some(identity) = self.mesh.identity()? {
            builder = builder.identity(identity);
        }
        let service = builder
            .network(self.mesh.network.clone())
            .auth(auth)
            .register(false)
            .configure_node(move |mut node| {
                if let Some(key) = key {
                    node = node.pre_shared_key(key);
                }
                node = node.no_listen();
                for addr in listen {
                    node = node.listen(addr);
                }
                node.mdns(false)
                    .upnp(false)
                    .autonat(false)
                    .memory_limit(None)
                    .dial_timeout(timeout)
                    .connection_timeout(connect_timeout)
            })
            .build()
            .await?;
        let node = service.node();
        let dials = self.bootstrap.iter().map(|addr| node.dial(addr.clone()));
        let results = futures::future::join_all(dials).await;
        if results.iter().all(Result::is_err) {
            let lines: Vec<String> = self
                .bootstrap
                .iter()
                .zip(results)
                .filter_map(|(addr, result)| result.err().map(|e| (addr, e)))
                .map(|(addr, e)| format!("  {addr}: {}", dial_failure(&e)))
                .collect();
            service.stop().await?;
            return Err(format!(
                "cannot join the mesh: no bootstrap peer could be reached\n{}",
                lines.join("\n")
            )
            .into());
        }
        Ok(service)
    }
}

/// Why a dial failed, without repeating the address it names.
fn dial_failure(error: &node::Error) -> String {
    match error {
        node::Error::Dial { reason, .. } => reason.clone(),
        node::Error::DialTimeout { timeout, .. } => format!(
            "no connection within {timeout:?} (is a node running there, and is the port open?)"
        ),
        other => other.to_string(),
    }
}

impl Mesh {
    /// The identity given with `--key`, if any.
    pub(crate) fn identity(&self) -> Result<Option<Identity>, BoxError> {
        match &self.key {
            Some(path) => Ok(Some(Identity::load(path)?)),
            None => Ok(None),
        }
    }

    /// The auth configuration of `--trust`, `--grant`, `--rule`, `--rules-file` and
    /// `--deny-by-default`.
    pub(crate) fn auth_config(&self) -> Result<auth::Config, BoxError> {
        let mut config = auth::Config::new().rules_from(self.rules.iter().cloned());
        for issuer in &self.trust {
            config = config.trust(*issuer);
        }
        if let Some(path) = &self.rules_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read rules file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                let rule: Rule = line
                    .parse()
                    .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
                config = config.rule(rule);
            }
        }
        for grant in &self.grants {
            config = config.grant(crate::grant_cmd::read_grant(grant)?);
        }
        if self.deny_by_default {
            config = config.default_policy(DefaultPolicy::Deny);
        }
        Ok(config)
    }

    pub(crate) fn pre_shared_key(&self) -> Result<Option<PreSharedKey>, BoxError> {
        let Some(path) = &self.swarm_key else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read swarm key {}: {e}", path.display()))?;
        Ok(Some(text.parse()?))
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`, or a number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 5m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?}: use ms, s, m, h or d"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub(crate) fn init_logging(cli: &Cli) -> Result<LoggingGuard, BoxError> {
    // kad warns "Failed to trigger bootstrap: No known peers" whenever a node starts alone,
    // which is how every mesh starts; its real failures surface through micromesh's errors.
    let default = match cli.command {
        Command::Node(_) => "info,libp2p_kad=error",
        _ => "warn,libp2p_kad=error",
    };
    let filter = cli
        .global
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::{fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let kept_filter = tracing_subscriber::EnvFilter::new(filter.to_string());
    // The node's recent records are kept for `Debug.Log` (`micromesh logs`), its call spans for
    // `Debug.Trace` (`micromesh trace`). Filters are per layer: the span layer sees calls
    // whatever the log level.
    #[cfg(feature = "otel")]
    let (otlp, exporter) = match &cli.global.otlp {
        Some(endpoint) => {
            let service = match cli.command {
                Command::Node(_) => "micromesh-node",
                _ => "micromesh-cli",
            };
            let (layer, exporter) = micromesh::debug::otlp_layer(
                micromesh::debug::OtlpConfig::new(endpoint).service_name(service),
            )?;
            (Some(layer), Some(exporter))
        }
        None => (None, None),
    };
    #[cfg(not(feature = "otel"))]
    let otlp: Option<tracing_subscriber::layer::Identity> = None;
    let kept = tracing_subscriber::registry()
        .with(micromesh::debug::log_layer().with_filter(kept_filter))
        .with(micromesh::debug::trace_layer())
        .with(otlp);
    match cli.global.log_format {
        LogFormat::Text => kept
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .init(),
        LogFormat::Json => kept
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init(),
    }
    Ok(LoggingGuard {
        #[cfg(feature = "otel")]
        _exporter: exporter,
    })
}

/// An error and its sources, joined by ": ".
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// A time as people read it, in UTC: `2026-12-04 21:51:53 UTC`.
pub(crate) fn date_time(at: std::time::SystemTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from(at)
        .format(&format)
        .unwrap_or_else(|_| "an unrepresentable time".into())
}

/// How long until `at`, roughly: `29 days 23 h left`, `5 min left`, `expired`.
pub(crate) fn time_left(at: std::time::SystemTime) -> String {
    let Ok(left) = at.duration_since(std::time::SystemTime::now()) else {
        return "expired".into();
    };
    let s = left.as_secs();
    let (days, hours, minutes) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    let text = match (days, hours, minutes) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, m) => format!("{m} min"),
        (0, h, m) => format!("{h} h {m} min"),
        (1, h, _) => format!("1 day {h} h"),
        (d, h, _) => format!("{d} days {h} h"),
    };
    format!("{text} left")
}

/// Prints rows as aligned columns under a header.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_dates_and_time_left() {
        use std::time::{SystemTime, UNIX_EPOCH};
        assert_eq!(
            date_time(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14 22:13:20 UTC"
        );
        let now = SystemTime::now();
        assert_eq!(time_left(now - Duration::from_secs(1)), "expired");
        assert_eq!(
            time_left(now + Duration::from_secs(30 * 86_400 + 90)),
            "30 days 0 h left"
        );
        assert_eq!(
            time_left(now + Duration::from_secs(3 * 60 + 30)),
            "3 min left"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
