//! The node's identity: one ed25519 key pair, kept in the data directory.
//!
//! A micromesh node *is* its key. The [`PeerId`] derived from the public key names the node
//! everywhere: every connection is authenticated by it (TLS or Noise), gossip messages are
//! signed by it, and later the auth component grants roles to it.
//!
//! [`Identity::load_or_create`] keeps the key in `<data dir>/identity.key`. The file is created
//! on first start with owner-only permissions and reused on every start after. A file that
//! exists but cannot be read or decoded is an error: micromesh never silently replaces an
//! identity, because a new key is a different node to the rest of the mesh.
//!
//! ```
//! use micromesh::Identity;
//!
//! let dir = tempfile::tempdir()?;
//! let first = Identity::load_or_create(dir.path())?;
//! let again = Identity::load_or_create(dir.path())?;
//! assert_eq!(first.peer_id(), again.peer_id());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt, fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use libp2p::identity::{Keypair, PublicKey};

use crate::PeerId;

/// The file name of the identity key inside a data directory.
pub const KEY_FILE: &str = "identity.key";

/// Errors of loading or storing an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key file exists but could not be read, or could not be written.
    #[error("cannot {action} identity key file {path}")]
    Io {
        /// What was being done: "read", "create", "write".
        action: &'static str,
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The key file exists but does not hold an ed25519 key in libp2p's key encoding.
    #[error(
        "identity key file {path} is corrupt; restore it from a backup, or move it away to start \
         this node with a new identity (the mesh will see a different peer)"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// Why decoding failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The bytes given are not a valid ed25519 secret key; the source says why.
    #[error("not an ed25519 secret key in libp2p's key encoding")]
    InvalidKey(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// An ed25519 key pair whose public half is this node's [`PeerId`].
///
/// Cheap to clone. The secret never leaves the process unless you call
/// [`Identity::to_protobuf_encoding`].
#[derive(Clone)]
pub struct Identity {
    keypair: Keypair,
}

impl Identity {
    /// Generates a fresh random identity that lives only in memory.
    ///
    /// ```
    /// let a = micromesh::Identity::generate();
    /// let b = micromesh::Identity::generate();
    /// assert_ne!(a.peer_id(), b.peer_id());
    /// ```
    pub fn generate() -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// Derives an identity from a 32-byte ed25519 secret key (for deterministic tests).
    ///
    /// ```
    /// let a = micromesh::Identity::from_secret_bytes([7; 32]);
    /// let b = micromesh::Identity::from_secret_bytes([7; 32]);
    /// assert_eq!(a.peer_id(), b.peer_id());
    /// ```
    pub fn from_secret_bytes(mut secret: [u8; 32]) -> Self {
        let keypair = Keypair::ed25519_from_bytes(&mut secret)
            .expect("any 32 bytes are a valid ed25519 secret key");
        Self { keypair }
    }

    /// Loads the identity kept in `data_dir`, creating the directory and a new key on the first
    /// start.
    ///
    /// The directory is created with mode `0700` and the key file with `0600` on Unix.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory or key file cannot be read or created, and
    /// [`Error::Corrupt`] if the key file exists but does not decode. Neither case ever falls
    /// back to a new identity.
    pub fn load_or_create(data_dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = data_dir.as_ref();
        let path = dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => Self::decode_file(&path, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_private_dir(dir).map_err(|source| Error::Io {
                    action: "create the directory of",
                    path: path.clone(),
                    source,
                })?;
                let identity = Self::generate();
                identity.write_new(&path)?;
                tracing::info!(peer = %identity.peer_id(), path = %path.display(), "created a new identity");
                Ok(identity)
            }
            Err(source) => Err(Error::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Loads an identity from a key file written by [`Identity::load_or_create`] (or any
    /// libp2p tool that writes protobuf-encoded ed25519 keys).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file cannot be read, [`Error::Corrupt`] if it does not decode.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|source| Error::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        Self::decode_file(path, &bytes)
    }

    /// Decodes libp2p's protobuf key encoding, accepting ed25519 keys only.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] if the bytes are not an ed25519 key pair.
    pub fn from_protobuf_encoding(bytes: &[u8]) -> Result<Self, Error> {
        let keypair =
            Keypair::from_protobuf_encoding(bytes).map_err(|e| Error::InvalidKey(e.into()))?;
        if keypair.clone().try_into_ed25519().is_err() {
            return Err(Error::InvalidKey(
                format!(
                    "a {:?} key, but micromesh identities are ed25519",
                    keypair.key_type()
                )
                .into(),
            ));
        }
        Ok(Self { keypair })
    }

    /// Encodes the key pair (secret included) in libp2p's protobuf key encoding.
    pub fn to_protobuf_encoding(&self) -> Vec<u8> {
        self.keypair
            .to_protobuf_encoding()
            .expect("ed25519 keys always encode")
    }

    /// The peer id: the multihash of the public key, and this node's name on the mesh.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The 32 bytes of the ed25519 public key.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.keypair
            .public()
            .try_into_ed25519()
            .expect("identities are ed25519")
            .to_bytes()
    }

    /// Signs `message` with the secret key (a 64-byte ed25519 signature).
    ///
    /// ```
    /// let id = micromesh::Identity::generate();
    /// let sig = id.sign(b"hello");
    /// assert!(micromesh::identity::verify(&id.peer_id(), b"hello", &sig));
    /// assert!(!micromesh::identity::verify(&id.peer_id(), b"hullo", &sig));
    /// ```
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.keypair
            .sign(message)
            .expect("ed25519 signing cannot fail")
    }

    pub(crate) fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    fn decode_file(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        warn_if_readable_by_others(path);
        Self::from_protobuf_encoding(bytes).map_err(|e| Error::Corrupt {
            path: path.to_owned(),
            source: match e {
                Error::InvalidKey(source) => source,
                other => other.into(),
            },
        })
    }

    fn write_new(&self, path: &Path) -> Result<(), Error> {
        write_private_file(path, &self.to_protobuf_encoding())
    }

    /// Writes the key to a new file at `path` (owner-only permissions on Unix), in the format
    /// [`Identity::load`] reads. Never replaces an existing file.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("issuer.key");
    /// let id = micromesh::Identity::generate();
    /// id.save(&path)?;
    /// assert_eq!(micromesh::Identity::load(&path)?.peer_id(), id.peer_id());
    /// assert!(id.save(&path).is_err(), "an existing file is kept");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists or cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.write_new(path.as_ref())
    }
}

/// Creates `path` anew with owner-only permissions (on Unix) and writes a secret into it.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io_err = |action| {
        move |source| Error::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_err("create"))?;
    file.write_all(bytes).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("write"))?;
    Ok(())
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

/// Checks an ed25519 `signature` of `message` against the key that `peer` names.
///
/// Returns `false` for a wrong signature, and for a peer id that does not embed an ed25519
/// public key (micromesh peer ids always do).
pub fn verify(peer: &PeerId, message: &[u8], signature: &[u8]) -> bool {
    public_key_of(peer).is_some_and(|key| key.verify(message, signature))
}

/// Recovers the public key embedded in an ed25519 peer id.
pub(crate) fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let multihash = peer.as_ref();
    // Ed25519 peer ids use the identity multihash (code 0), whose digest is the key itself.
    if multihash.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(multihash.digest()).ok()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "identity key file is readable by other users; run `chmod 600` on it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_with_owner_only_permissions_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested/data");
        let a = Identity::load_or_create(&data).unwrap();
        let b = Identity::load_or_create(&data).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(data.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = fs::metadata(&data).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, b"not a key").unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
        // The file was left as it was.
        assert_eq!(fs::read(&path).unwrap(), b"not a key");
    }

    #[test]
    fn truncated_key_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(dir.path()).unwrap();
        let bytes = id.to_protobuf_encoding();
        fs::write(dir.path().join(KEY_FILE), &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(Error::Corrupt { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_key_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the key file should be: reading it fails with an I/O error.
        fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Io { action: "read", .. }), "{err}");
    }

    #[test]
    fn signatures_verify_against_the_peer_id() {
        let id = Identity::from_secret_bytes([1; 32]);
        let other = Identity::from_secret_bytes([2; 32]);
        let sig = id.sign(b"msg");
        assert!(verify(&id.peer_id(), b"msg", &sig));
        assert!(!verify(&other.peer_id(), b"msg", &sig));
        assert!(!verify(&id.peer_id(), b"msg", &sig[..63]));
        assert_eq!(
            public_key_of(&id.peer_id())
                .unwrap()
                .try_into_ed25519()
                .unwrap()
                .to_bytes(),
            id.public_key_bytes()
        );
    }
}
