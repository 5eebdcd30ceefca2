//! Auth in one process: an issuer grants a role, rules guard a service, a topic and a table,
//! and a revocation ends the grant everywhere.
//!
//! ```text
//! cargo run --example auth
//! ```
//!
//! Three nodes on the in-memory transport share one policy: only the role `auditor` may call
//! `ledger`'s `Ledger.*` endpoints, publish on `audits`, or write the `ledger/entries` table.
//! The auditor's call, message and write go through. The stranger's call is refused with 403
//! by the ledger before its handler runs; its publish and write are refused by its own node,
//! which applies the same rules every other node would (and would they be sent anyway, every
//! receiving node refuses them). Then the issuer revokes the auditor's grant: the revocation
//! spreads, and the same call is refused with 401.

use std::time::Duration;

use micromesh::{
    Context, Identity, Service, Status,
    auth::{self, Grant, Revocation},
    client::CallOptions,
    node::Preset,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // The issuer is just an identity whose key the nodes trust.
    let issuer = Identity::generate();
    let policy = auth::Config::new()
        .trust(issuer.peer_id())
        .rule("deny endpoint:ledger/Ledger.* any 0".parse()?)
        .rule("allow endpoint:ledger/Ledger.* role:auditor 10".parse()?)
        .rule("deny topic:audits any 0".parse()?)
        .rule("allow topic:audits role:auditor 10".parse()?)
        .rule("deny table:ledger/entries any 0".parse()?)
        .rule("allow table:ledger/entries role:auditor 10".parse()?);

    let ledger = Service::builder("ledger")
        .preset(Preset::Local)
        .network("auth-demo")
        .auth(policy.clone())
        .handle(
            "Ledger.Balance",
            |ctx: Context, account: String| async move {
                println!(
                    "  (handler) {} with roles {:?} asked for {account}",
                    short(&ctx.peer_id().to_string()),
                    ctx.roles()
                );
                Ok::<_, Status>(1_250u64)
            },
        )
        .build()
        .await?;
    let addr = ledger.node().listen_addrs().await?.remove(0);

    let auditor_id = Identity::generate();
    let grant = Grant::builder(auditor_id.peer_id())
        .role("auditor")
        .valid_for(Duration::from_secs(3600))
        .sign(&issuer, "auth-demo")?;
    println!(
        "issued grant {} to {}: roles {:?}",
        grant.id(),
        short(&grant.subject().to_string()),
        grant.roles()
    );
    let auditor = member(
        "auditor",
        auditor_id,
        policy.clone().grant(grant.clone()),
        &addr,
    )
    .await?;
    let stranger = member("stranger", Identity::generate(), policy, &addr).await?;

    let to_ledger = || {
        CallOptions::default()
            .peer(ledger.peer_id())
            .timeout(Duration::from_secs(10))
    };
    for (who, service) in [("auditor", &auditor), ("stranger", &stranger)] {
        let balance = service
            .client()
            .call_with::<_, u64>("ledger", "Ledger.Balance", &"acme", to_ledger())
            .await;
        match balance {
            Ok(b) => println!("{who}: Ledger.Balance -> {b}"),
            Err(e) => println!("{who}: Ledger.Balance refused: {}", e.status()),
        }
        match service
            .broker()
            .publish_raw(
                "audits",
                b"checked".to_vec(),
                micromesh::broker::PublishOptions::new().allow_no_subscribers(),
            )
            .await
        {
            Ok(_) => println!("{who}: published on audits"),
            Err(e) => println!("{who}: publish refused: {e}"),
        }
        match service
            .store()
            .table("ledger", "entries")?
            .write("2026-11", b"ok".to_vec())
            .await
        {
            Ok(_) => println!("{who}: wrote ledger/entries"),
            Err(e) => println!("{who}: write refused: {e}"),
        }
    }

    // The issuer revokes the grant through any node; it floods the mesh.
    let reached = stranger
        .auth()
        .revoke(Revocation::of(&grant, &issuer)?)
        .await?;
    println!("revoked grant {} (handed to {reached} peer(s))", grant.id());
    let ledger_auth = ledger.auth().clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !ledger_auth.is_revoked(&grant) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| "the revocation did not reach the ledger within 10 s")?;
    match auditor
        .client()
        .call_with::<_, u64>("ledger", "Ledger.Balance", &"acme", to_ledger())
        .await
    {
        Ok(b) => println!("auditor after revocation: {b} (unexpected)"),
        Err(e) => println!("auditor after revocation: refused: {}", e.status()),
    }

    for service in [stranger, auditor, ledger] {
        service.stop().await?;
    }
    Ok(())
}

async fn member(
    name: &str,
    identity: Identity,
    policy: auth::Config,
    bootstrap: &micromesh::Multiaddr,
) -> Result<Service, micromesh::Error> {
    Service::builder(name)
        .preset(Preset::Local)
        .network("auth-demo")
        .identity(identity)
        .auth(policy)
        .register(false)
        .bootstrap(bootstrap.clone())
        .build()
        .await
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(8)..]
}
