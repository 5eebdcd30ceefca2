//! `micromesh identity new|show|cert`: make and inspect peer identities.

use std::{
    fs,
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand};
use micromesh::{Identity, auth::Certificate};

use crate::cli::{BoxError, Global};

#[derive(Subcommand, Debug)]
pub(crate) enum IdentityCommand {
    /// Create a new identity key file (owner-only permissions) and print its peer id.
    New(NewArgs),
    /// Print the peer id and public key of an identity (`--key FILE`).
    Show(KeyArg),
    /// Print an identity (`--key FILE`) as an X.509 certificate (PEM) for other TLS software;
    /// optionally write the certificate and its private key to files.
    Cert(CertArgs),
}

#[derive(Args, Debug)]
pub(crate) struct KeyArg {
    /// The identity's key file (`micromesh identity new`).
    #[arg(
        id = "identity-key",
        long = "key",
        short = 'k',
        env = "MICROMESH_KEY",
        value_name = "FILE"
    )]
    key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct NewArgs {
    /// Where to write the key file.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing file (its identity is lost).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CertArgs {
    #[command(flatten)]
    key: KeyArg,
    /// Write the certificate (PEM) here instead of printing it.
    #[arg(long, value_name = "FILE")]
    cert_out: Option<PathBuf>,
    /// Write the private key (PKCS#8 PEM, owner-only permissions) here. Secret: whoever holds
    /// it is this peer.
    #[arg(long, value_name = "FILE")]
    key_out: Option<PathBuf>,
}

pub(crate) fn run(global: &Global, command: &IdentityCommand) -> Result<(), BoxError> {
    match command {
        IdentityCommand::New(args) => new(global, args),
        IdentityCommand::Show(key) => show(global, key),
        IdentityCommand::Cert(args) => cert(global, args),
    }
}

fn new(global: &Global, args: &NewArgs) -> Result<(), BoxError> {
    if args.out.exists() && !args.force {
        return Err(format!(
            "{} exists; pass --force to replace it (its identity would be lost)",
            args.out.display()
        )
        .into());
    }
    if args.force {
        let _ = fs::remove_file(&args.out);
    }
    let identity = Identity::generate();
    identity.save(&args.out)?;
    if global.json {
        println!(
            "{}",
            serde_json::json!({
                "peer_id": identity.peer_id().to_string(),
                "key_file": args.out.display().to_string(),
            })
        );
    } else {
        println!("{}", identity.peer_id());
        eprintln!("wrote {}", args.out.display());
    }
    Ok(())
}

pub(crate) fn load(path: &Path) -> Result<Identity, BoxError> {
    Ok(Identity::load(path)?)
}

/// The identity of `--key`, which these verbs need.
fn given(key: &KeyArg) -> Result<Identity, BoxError> {
    match &key.key {
        Some(path) => load(path),
        None => Err(
            "give the identity's key file with --key FILE (a node keeps it in \
             <data dir>/identity.key)"
                .into(),
        ),
    }
}

fn show(global: &Global, key: &KeyArg) -> Result<(), BoxError> {
    let identity = given(key)?;
    let public = data_encoding::BASE64URL_NOPAD.encode(&identity.public_key_bytes());
    if global.json {
        println!(
            "{}",
            serde_json::json!({
                "peer_id": identity.peer_id().to_string(),
                "public_key": public,
                "key_type": "ed25519",
            })
        );
    } else {
        println!("peer id     {}", identity.peer_id());
        println!("public key  {public} (ed25519, base64url)");
    }
    Ok(())
}

fn cert(global: &Global, args: &CertArgs) -> Result<(), BoxError> {
    let identity = given(&args.key)?;
    let cert = Certificate::new(&identity)?;
    if let Some(path) = &args.key_out {
        let _ = fs::remove_file(path);
        cert.save_private_key(path)?;
    }
    match &args.cert_out {
        Some(path) => fs::write(path, cert.pem())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        None if !global.json => print!("{}", cert.pem()),
        None => {}
    }
    if global.json {
        println!(
            "{}",
            serde_json::json!({
                "peer_id": identity.peer_id().to_string(),
                "certificate": cert.pem(),
            })
        );
    }
    Ok(())
}
