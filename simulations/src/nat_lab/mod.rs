//! `nat-lab`: micromesh across NATs, in Linux network namespaces (root only).
//!
//! ```text
//! micromesh-simulations nat-lab [--out DIR] [--kinds none,home,...] [--calls N]
//!                               [--stream-mib M] [--direct-wait SECONDS] [--delay-ms D]
//! ```
//!
//! Builds the lab of [`net`]: an internet with two ordinary micromesh nodes on it, and for
//! every NAT kind two hosts (sides `a` and `b`) behind routers of that kind. A server runs on
//! every `b` host; then, for every pair of kinds, a fresh client node on the `a` host calls the
//! server by name, knowing only the two public nodes' addresses. No relay or rendezvous server
//! is configured anywhere: the public nodes relay because AutoNAT finds them reachable, NATed
//! nodes find them through the mesh, and DCUtR punches holes.
//!
//! For every pair the lab records whether a call connects, the path (direct or relayed) at the
//! first call and at the end, the time from the client's start to its first answer and to a
//! direct connection, and whether a run of calls and a stream complete. It writes the matrix to
//! `DIR/nat-matrix.json` and `DIR/nat-matrix.md` (default `target/nat-lab`) and fails when a
//! pair does not connect or loses a call or a byte of the stream: the targets are every pair
//! connected, nothing cut by relay limits.
//!
//! With `--delay-ms D` every host and the internet's nodes hold the packets they receive D ms
//! ([`delay`]): a round trip of 2·D, 4·D through a relay.
//!
//! The lab deletes its namespaces and stops its processes when it ends, also on failure.

mod delay;
pub(crate) mod net;
pub(crate) mod peer;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, Lines},
    process::{Child, ChildStdout},
};

use net::{Kind, Lab};

/// How long a node of the lab may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(45);

struct Options {
    out: PathBuf,
    kinds: Vec<Kind>,
    calls: u64,
    stream_mib: u64,
    direct_wait: u64,
    delay_ms: u64,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            out: PathBuf::from("target/nat-lab"),
            kinds: Kind::ALL.to_vec(),
            calls: 1_000,
            stream_mib: 10,
            direct_wait: 5,
            delay_ms: 0,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("nat-lab: {flag} needs a value"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("nat-lab: {flag} takes a number, got {value:?}"))
            };
            match flag.as_str() {
                "--out" => options.out = PathBuf::from(value),
                "--kinds" => {
                    options.kinds = value
                        .split(',')
                        .map(Kind::parse)
                        .collect::<Result<_, _>>()?;
                }
                "--calls" => options.calls = number()?,
                "--stream-mib" => options.stream_mib = number()?,
                "--direct-wait" => options.direct_wait = number()?,
                "--delay-ms" => options.delay_ms = number()?,
                other => return Err(format!("nat-lab: unknown option {other}")),
            }
        }
        Ok(options)
    }
}

/// A process of the lab, killed when dropped.
struct Peer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    name: String,
}

impl Peer {
    fn spawn(namespace: &str, exe: &Path, args: &[String], name: &str) -> Result<Peer, String> {
        let mut child = net::command_in(namespace, exe)
            .arg("nat-peer")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        Ok(Peer {
            child,
            lines: BufReader::new(stdout).lines(),
            name: name.to_owned(),
        })
    }

    /// The next JSON line the peer prints, within `within`.
    async fn line(&mut self, within: Duration) -> Result<Value, String> {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .map_err(|_| format!("{} said nothing in {within:?}", self.name))?
            .map_err(|e| format!("{}: {e}", self.name))?
            .ok_or_else(|| format!("{} exited without a word (see its stderr above)", self.name))?;
        serde_json::from_str(&line).map_err(|e| format!("{}: {e} in {line:?}", self.name))
    }

    /// Closes the peer's stdin, which stops it, and waits for it to exit.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

pub(crate) async fn run(args: &[String]) -> Result<Value, String> {
    let options = Options::parse(args)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let began = Instant::now();
    let (lab, hosts) = Lab::build(&options.kinds, &["a", "b"])?;
    let built = began.elapsed();
    let outcome = match delay_links(&options, &exe, &hosts).await {
        Ok(delayers) => {
            let outcome = measure(&options, &exe, &hosts).await;
            for delayer in delayers {
                delayer.stop().await;
            }
            outcome
        }
        Err(e) => Err(e),
    };
    drop(lab);
    let rows = outcome?;
    let failures: Vec<String> = rows.iter().filter_map(failure).collect();
    // Hole punching may fail where it could succeed: reported, not a failure of the lab.
    let direct_missed: Vec<String> = rows
        .iter()
        .filter(|r| r["direct_possible"] == true && r["final_path"] != "direct")
        .map(|r| format!("{} → {}", r["client"], r["server"]))
        .collect();
    if !direct_missed.is_empty() {
        eprintln!(
            "nat-lab: relayed although a direct path was possible: {}",
            direct_missed.join(", ")
        );
    }
    let report = json!({
        "scenario": "nat-lab",
        "lab_built_ms": built.as_secs_f64() * 1e3,
        "lab_ran_s": began.elapsed().as_secs_f64(),
        "calls_per_pair": options.calls,
        "link_delay_ms": options.delay_ms,
        "stream_mib_per_pair": options.stream_mib,
        "pairs": rows,
        "failures": failures,
        "direct_missed": direct_missed,
    });
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("cannot create {}: {e}", options.out.display()))?;
    let json_path = options.out.join("nat-matrix.json");
    let md_path = options.out.join("nat-matrix.md");
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(
        &json_path,
        serde_json::to_string_pretty(&report).expect("JSON"),
    )?;
    write(&md_path, markdown(&report))?;
    eprintln!(
        "nat-lab: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    if !failures.is_empty() {
        return Err(format!(
            "nat-lab: {} pair(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        ));
    }
    Ok(report)
}

/// Why a pair missed the lab's targets, if it did.
fn failure(row: &Value) -> Option<String> {
    let pair = format!("{} → {}", row["client"], row["server"]);
    if row["connected"] != true {
        return Some(format!("{pair}: no call connected ({})", row["error"]));
    }
    if row["calls_ok"] != row["calls"] {
        return Some(format!(
            "{pair}: {} of {} calls answered ({})",
            row["calls_ok"], row["calls"], row["call_error"]
        ));
    }
    if row["stream_ok"] != true {
        return Some(format!(
            "{pair}: the stream failed ({})",
            row["stream_error"]
        ));
    }
    None
}

/// Starts a delayer in every host and in the internet, and sends what they receive through it.
async fn delay_links(
    options: &Options,
    exe: &Path,
    hosts: &[Vec<net::Host>],
) -> Result<Vec<Peer>, String> {
    if options.delay_ms == 0 {
        return Ok(Vec::new());
    }
    let mut delayers = Vec::new();
    let ingress = std::iter::once((net::INTERNET, "br0")).chain(
        hosts
            .iter()
            .flatten()
            .map(|h| (h.namespace.as_str(), "eth0")),
    );
    for (namespace, device) in ingress {
        let args = [
            "delay".to_owned(),
            "--ms".to_owned(),
            options.delay_ms.to_string(),
        ];
        let mut delayer = Peer::spawn(namespace, exe, &args, &format!("delayer in {namespace}"))?;
        delayer.line(READY_WITHIN).await?;
        net::delay_ingress(namespace, device, delay::QUEUE)?;
        delayers.push(delayer);
    }
    Ok(delayers)
}

async fn measure(
    options: &Options,
    exe: &Path,
    hosts: &[Vec<net::Host>],
) -> Result<Vec<Value>, String> {
    // Two ordinary nodes on the internet: each one's AutoNAT needs another to dial it back.
    let mut first = Peer::spawn(
        net::INTERNET,
        exe,
        &["public".into(), "--port".into(), "4001".into()],
        "public node 1",
    )?;
    let first_addr = first.line(READY_WITHIN).await?["address"]
        .as_str()
        .ok_or("public node 1 gave no address")?
        .to_owned();
    let mut second = Peer::spawn(
        net::INTERNET,
        exe,
        &[
            "public".into(),
            "--port".into(),
            "4002".into(),
            "--bootstrap".into(),
            first_addr.clone(),
        ],
        "public node 2",
    )?;
    let second_addr = second.line(READY_WITHIN).await?["address"]
        .as_str()
        .ok_or("public node 2 gave no address")?
        .to_owned();
    let bootstrap = [
        "--bootstrap".to_owned(),
        first_addr,
        "--bootstrap".to_owned(),
        second_addr,
    ];

    // A server behind every kind of NAT, all starting at once.
    let mut servers = Vec::new();
    for of_kind in hosts {
        let host = &of_kind[1];
        let mut args = vec![
            "server".to_owned(),
            "--name".to_owned(),
            service_name(host.kind),
        ];
        args.extend(bootstrap.iter().cloned());
        let name = format!("server behind {}", host.kind.name());
        servers.push((host.kind, Peer::spawn(&host.namespace, exe, &args, &name)?));
    }
    let mut ready = Vec::new();
    for (kind, server) in &mut servers {
        let line = server.line(READY_WITHIN).await?;
        eprintln!("nat-lab: server behind {} ready: {line}", kind.name());
        ready.push((*kind, line["reachable_via"].clone()));
    }

    let mut rows = Vec::new();
    for of_kind in hosts {
        let client_host = &of_kind[0];
        for (server_kind, reachable_via) in &ready {
            let mut args = vec![
                "client".to_owned(),
                "--target".to_owned(),
                service_name(*server_kind),
                "--calls".to_owned(),
                options.calls.to_string(),
                "--stream-mib".to_owned(),
                options.stream_mib.to_string(),
                "--direct-wait".to_owned(),
                options.direct_wait.to_string(),
            ];
            args.extend(bootstrap.iter().cloned());
            let name = format!(
                "client behind {} → {}",
                client_host.kind.name(),
                server_kind.name()
            );
            let mut client = Peer::spawn(&client_host.namespace, exe, &args, &name)?;
            let mut row = client.line(Duration::from_secs(300)).await?;
            client.stop().await;
            row["client"] = json!(client_host.kind.name());
            row["server"] = json!(server_kind.name());
            row["server_reachable_via"] = reachable_via.clone();
            row["direct_possible"] = json!(Kind::direct_possible(client_host.kind, *server_kind));
            eprintln!("nat-lab: {name}: {row}");
            rows.push(row);
        }
    }
    for (_, server) in servers {
        server.stop().await;
    }
    second.stop().await;
    first.stop().await;
    Ok(rows)
}

fn service_name(kind: Kind) -> String {
    format!("lab-{}", kind.name())
}

/// The matrix as a markdown table: one row per client kind, one column per server kind.
fn markdown(report: &Value) -> String {
    let pairs = report["pairs"].as_array().cloned().unwrap_or_default();
    let mut kinds: Vec<String> = Vec::new();
    for pair in &pairs {
        let kind = pair["server"].as_str().unwrap_or_default().to_owned();
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let mut text = format!(
        "Each cell: the path at the end (direct, or relayed by a public micromesh node), then \
         milliseconds from the client's start to its first answer; ✗ marks a pair that did not \
         connect or lost a call or stream bytes. Link delay: {} ms each way.\n\n| client ↓ server → |",
        report["link_delay_ms"]
    );
    for kind in &kinds {
        text.push_str(&format!(" {kind} |"));
    }
    text.push_str("\n|---|");
    text.push_str(&"---|".repeat(kinds.len()));
    text.push('\n');
    for client in &kinds {
        text.push_str(&format!("| **{client}** |"));
        for server in &kinds {
            let cell = pairs
                .iter()
                .find(|p| p["client"] == client.as_str() && p["server"] == server.as_str())
                .map(|p| {
                    if failure(p).is_some() {
                        "✗".to_owned()
                    } else {
                        format!(
                            "{}, {:.0} ms",
                            p["final_path"].as_str().unwrap_or("?"),
                            p["first_call_ms"].as_f64().unwrap_or(f64::NAN)
                        )
                    }
                })
                .unwrap_or_default();
            text.push_str(&format!(" {cell} |"));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(client: &str, server: &str, calls_ok: u64) -> Value {
        json!({
            "client": client, "server": server, "connected": true, "calls": 1000,
            "calls_ok": calls_ok, "stream_ok": true, "final_path": "direct", "first_call_ms": 12.3,
        })
    }

    #[test]
    fn a_direct_path_is_expected_unless_a_symmetric_nat_faces_a_filtering_one() {
        use Kind::*;
        for kind in Kind::ALL {
            assert!(Kind::direct_possible(None, kind));
            assert!(Kind::direct_possible(FullCone, kind));
        }
        assert!(Kind::direct_possible(Home, Cgnat));
        assert!(!Kind::direct_possible(Corporate, Home));
        assert!(!Kind::direct_possible(Cgnat, Corporate));
        assert!(!Kind::direct_possible(Corporate, Corporate));
    }

    #[test]
    fn a_pair_fails_when_it_loses_a_call_and_the_matrix_marks_it() {
        assert_eq!(failure(&row("home", "none", 1000)), Option::None);
        let lost = row("home", "home", 999);
        assert!(failure(&lost).unwrap().contains("999 of 1000"));
        let report = json!({
            "link_delay_ms": 0,
            "pairs": [row("home", "none", 1000), lost, row("none", "none", 1000), row("none", "home", 1000)],
        });
        let table = markdown(&report);
        assert!(
            table.contains("| **home** | direct, 12 ms | ✗ |"),
            "{table}"
        );
        assert!(
            table.contains("| **none** | direct, 12 ms | direct, 12 ms |"),
            "{table}"
        );
    }

    #[test]
    fn options_are_checked() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let options =
            Options::parse(&args(&["--kinds", "home,cgnat", "--delay-ms", "20"])).unwrap();
        assert_eq!(options.kinds, [Kind::Home, Kind::Cgnat]);
        assert_eq!(options.delay_ms, 20);
        assert!(Options::parse(&args(&["--kinds", "moon"])).is_err());
        assert!(Options::parse(&args(&["--calls"])).is_err());
        assert!(Options::parse(&args(&["--calls", "many"])).is_err());
    }
}
