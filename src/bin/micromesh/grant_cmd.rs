//! `micromesh grant issue|show|revoke`: sign grants and revocations with an issuer key.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{Args, Subcommand};
use micromesh::{
    PeerId,
    auth::{Grant, Revocation},
};

use crate::cli::{BoxError, Global, Join, parse_duration};

#[derive(Subcommand, Debug)]
pub(crate) enum GrantCommand {
    /// Sign a grant: roles for a subject peer, for a time. Prints it as text (base64url).
    Issue(IssueArgs),
    /// Decode a grant and print its fields (the signature is checked).
    Show(ShowArgs),
    /// Sign a revocation of a grant; with --bootstrap, spread it to the mesh.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
pub(crate) struct IssueArgs {
    /// The issuer's key file (`micromesh identity new`); nodes must trust its peer id.
    #[arg(long, value_name = "FILE")]
    issuer: PathBuf,
    /// The peer the roles are for.
    #[arg(long, value_name = "PEER_ID")]
    subject: PeerId,
    /// A role to grant (repeatable, at least one).
    #[arg(long = "role", short = 'r', value_name = "ROLE", required = true)]
    roles: Vec<String>,
    /// How long the grant holds, e.g. 12h, 30d.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    valid_for: Duration,
    /// Write the grant to this file instead of printing it.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
    /// The network the grant is for: it gives roles on that network only.
    #[arg(long, env = "MICROMESH_NETWORK", default_value = micromesh::node::DEFAULT_NETWORK)]
    network: String,
}

#[derive(Args, Debug)]
pub(crate) struct ShowArgs {
    /// The grant: its text, or a file holding it.
    grant: String,
}

#[derive(Args, Debug)]
pub(crate) struct RevokeArgs {
    /// The issuer's key file: only a grant's issuer can revoke it.
    #[arg(long, value_name = "FILE")]
    issuer: PathBuf,
    /// The grant to revoke: its text, or a file holding it.
    grant: String,
    /// With `--bootstrap`, the revocation is handed to the mesh; without, it is only printed.
    #[command(flatten)]
    join: Join,
}

pub(crate) async fn run(global: &Global, command: &GrantCommand) -> Result<(), BoxError> {
    match command {
        GrantCommand::Issue(args) => issue(global, args),
        GrantCommand::Show(args) => show(global, args),
        GrantCommand::Revoke(args) => revoke(global, args).await,
    }
}

/// Reads a grant given as text or as the path of a file holding it.
pub(crate) fn read_grant(text_or_file: &str) -> Result<Grant, BoxError> {
    let text = match std::fs::read_to_string(text_or_file) {
        Ok(contents) => contents,
        Err(_) => text_or_file.to_owned(),
    };
    text.trim()
        .parse()
        .map_err(|e| format!("{text_or_file:?} is not a grant (or a file holding one): {e}").into())
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn describe(grant: &Grant) -> serde_json::Value {
    serde_json::json!({
        "grant": grant.to_string(),
        "id": grant.id().to_string(),
        "network": grant.network(),
        "issuer": grant.issuer().to_string(),
        "subject": grant.subject().to_string(),
        "roles": grant.roles(),
        "not_before": secs(grant.not_before()),
        "expires": secs(grant.expires()),
    })
}

fn print_fields(grant: &Grant) {
    println!("id          {}", grant.id());
    println!("network     {}", grant.network());
    println!("issuer      {}", grant.issuer());
    println!("subject     {}", grant.subject());
    println!("roles       {}", grant.roles().join(", "));
    println!("not before  {}", crate::cli::date_time(grant.not_before()));
    println!(
        "expires     {} ({})",
        crate::cli::date_time(grant.expires()),
        crate::cli::time_left(grant.expires())
    );
}

fn issue(global: &Global, args: &IssueArgs) -> Result<(), BoxError> {
    let issuer = crate::identity_cmd::load(&args.issuer)?;
    let grant = Grant::builder(args.subject)
        .roles(args.roles.iter().cloned())
        .valid_for(args.valid_for)
        .sign(&issuer, &args.network)?;
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{grant}\n"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if global.json {
        println!("{}", describe(&grant));
    } else {
        if args.out.is_none() {
            println!("{grant}");
        }
        eprintln!(
            "grant {} for {}: roles {} on network {}, until {} ({})",
            grant.id(),
            grant.subject(),
            grant.roles().join(", "),
            grant.network(),
            crate::cli::date_time(grant.expires()),
            crate::cli::time_left(grant.expires())
        );
    }
    Ok(())
}

fn show(global: &Global, args: &ShowArgs) -> Result<(), BoxError> {
    let grant = read_grant(&args.grant)?;
    if global.json {
        println!("{}", describe(&grant));
    } else {
        print_fields(&grant);
    }
    Ok(())
}

async fn revoke(global: &Global, args: &RevokeArgs) -> Result<(), BoxError> {
    let issuer = crate::identity_cmd::load(&args.issuer)?;
    let grant = read_grant(&args.grant)?;
    let revocation = Revocation::of(&grant, &issuer)?;
    let mut reached = None;
    if !args.join.bootstrap.is_empty() {
        // The issuer trusts itself: its node takes the revocation, then hands it to its peers.
        let service = args.join.connect_trusting(issuer.peer_id()).await?;
        // Only nodes that trust the issuer take a revocation and pass it on. A walk of the DHT
        // connects this client to the mesh beyond its bootstrap peer, which may trust nobody.
        if let Err(e) = tokio::time::timeout(args.join.timeout, service.node().bootstrap())
            .await
            .unwrap_or(Ok(()))
        {
            tracing::debug!("DHT walk incomplete: {e}");
        }
        let result = service.auth().revoke(revocation.clone()).await;
        service.stop().await?;
        let peers = result?;
        if peers == 0 {
            return Err("no peer took the revocation (do the nodes trust this issuer?)".into());
        }
        reached = Some(peers);
    }
    if global.json {
        println!(
            "{}",
            serde_json::json!({
                "revocation": revocation.to_string(),
                "grant_id": grant.id().to_string(),
                "until": secs(revocation.until()),
                "peers_reached": reached,
            })
        );
    } else {
        println!("{revocation}");
        match reached {
            Some(n) => eprintln!(
                "grant {} revoked; handed to {n} peer(s), which pass it on",
                grant.id()
            ),
            None => eprintln!(
                "grant {} revoked (not sent: give --bootstrap to spread it)",
                grant.id()
            ),
        }
    }
    Ok(())
}
