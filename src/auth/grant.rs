//! Grants and revocations: the signed statements that give peers roles, and take them back.
//!
//! Both have a fixed binary layout, specified byte by byte in `protocols/auth.md`, and both
//! are signed by their issuer's ed25519 key over `micromesh/auth/1\0` followed by every byte
//! before the signature. Decoding checks the layout, the limits and the signature; whether the
//! issuer is trusted, the network right, the time inside the grant's window, the grant not
//! revoked and its subject the peer presenting it is for [`Auth`](super::Auth) to decide.

use std::{
    fmt,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use libp2p::identity::{PublicKey, ed25519};

use crate::{Identity, PeerId};

/// Domain separation: what a grant or revocation signature covers starts with these bytes.
pub const SIGNING_CONTEXT: &[u8] = b"micromesh/auth/1\0";
/// The format version this implementation writes and reads.
pub(crate) const FORMAT: u8 = 1;
/// The most roles one grant carries.
pub const MAX_ROLES: usize = 32;
/// The longest role name, in bytes.
pub(crate) const MAX_ROLE: usize = 64;
/// The longest network name a grant names (the node's own limit).
pub(crate) const MAX_NETWORK: usize = 64;
/// The longest subject peer id, in bytes (an ed25519 peer id is 38).
pub(crate) const MAX_SUBJECT: usize = 64;
/// The largest encoded grant: every field at its limit.
pub const MAX_GRANT: usize =
    3 + MAX_NETWORK + 16 + 32 + 1 + MAX_SUBJECT + 16 + 1 + MAX_ROLES * (1 + MAX_ROLE) + 64;
/// The size of an encoded revocation, less its network name.
const REVOCATION_FIXED: usize = 3 + 16 + 32 + 16 + 64;
/// The largest encoded revocation.
pub const MAX_REVOCATION: usize = REVOCATION_FIXED + MAX_NETWORK;

const KIND_GRANT: u8 = 1;
const KIND_REVOCATION: u8 = 2;
const SIGNATURE: usize = 64;

/// Why bytes are not a grant or revocation, or why one cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes do not follow the layout of `protocols/auth.md`.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// "grant" or "revocation".
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The signature does not verify with the issuer key the statement names.
    #[error("the {0}'s signature does not verify with its issuer's key")]
    Signature(&'static str),
    /// A field is out of its limits (when issuing).
    #[error("{0}")]
    Invalid(String),
    /// Only the issuer of a grant can revoke it.
    #[error("grant {grant} was issued by {issuer}, not by {revoker}")]
    NotIssuer {
        /// The grant.
        grant: GrantId,
        /// Its issuer.
        issuer: Box<PeerId>,
        /// Who tried to revoke it.
        revoker: Box<PeerId>,
    },
    /// The text is not base64url.
    #[error("not a base64url {what}: {reason}")]
    Text {
        /// "grant" or "revocation".
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The random 16-byte id of a grant; a revocation names it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub [u8; 16]);

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrantId({self})")
    }
}

/// Checks a role name: 1 to [`MAX_ROLE`] bytes of `A–Z a–z 0–9 _ . : -`.
pub(crate) fn check_role(role: &str) -> Result<(), String> {
    let ok = !role.is_empty()
        && role.len() <= MAX_ROLE
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a role is 1 to {MAX_ROLE} characters of A-Z a-z 0-9 _ . : -, got {role:?}"
        ))
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn time_of(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The message an issuer signs: the domain, then the statement's bytes before the signature.
fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    message.extend_from_slice(SIGNING_CONTEXT);
    message.extend_from_slice(body);
    message
}

/// A statement signed by an issuer: `subject` holds `roles` on `network` from `not_before`
/// until `expires`.
///
/// Made with [`Grant::builder`], read back with [`Grant::decode`] or from text with
/// [`str::parse`]; [`Grant::to_bytes`] and the `Display` form (base64url) are what travels.
///
/// ```
/// use std::time::Duration;
/// use micromesh::{Identity, auth::Grant};
///
/// let issuer = Identity::generate();
/// let subject = Identity::generate().peer_id();
/// let grant = Grant::builder(subject)
///     .role("billing.admin")
///     .valid_for(Duration::from_secs(30 * 24 * 3600))
///     .sign(&issuer, "demo")?;
/// let again: Grant = grant.to_string().parse()?;
/// assert_eq!(again, grant);
/// assert_eq!(again.roles(), ["billing.admin"]);
/// assert_eq!(again.issuer(), issuer.peer_id());
/// # Ok::<(), micromesh::auth::GrantError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    id: GrantId,
    network: String,
    issuer: [u8; 32],
    subject: PeerId,
    roles: Vec<String>,
    not_before: u64,
    expires: u64,
    bytes: Vec<u8>,
}

/// Builds a [`Grant`]. Made by [`Grant::builder`].
#[derive(Debug, Clone)]
pub struct GrantBuilder {
    subject: PeerId,
    roles: Vec<String>,
    not_before: Option<SystemTime>,
    valid_for: Duration,
}

impl GrantBuilder {
    /// Adds a role (1 to 64 characters of `A–Z a–z 0–9 _ . : -`; at most 32 roles).
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.roles.push(role.into());
        self
    }

    /// Adds several roles.
    pub fn roles<I: IntoIterator<Item = S>, S: Into<String>>(mut self, roles: I) -> Self {
        self.roles.extend(roles.into_iter().map(Into::into));
        self
    }

    /// When the grant starts to hold (default: now). Times are whole seconds.
    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }

    /// How long the grant holds from its start (default: 30 days).
    pub fn valid_for(mut self, duration: Duration) -> Self {
        self.valid_for = duration;
        self
    }

    /// Signs the grant with `issuer`'s key, for the mesh network `network`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if a role, the network name, or the validity is out of its limits.
    pub fn sign(self, issuer: &Identity, network: &str) -> Result<Grant, Error> {
        let mut id = [0; 16];
        rand::fill(&mut id);
        self.sign_with_id(issuer, network, id)
    }

    /// As [`GrantBuilder::sign`], with the id given (for test vectors).
    pub(crate) fn sign_with_id(
        self,
        issuer: &Identity,
        network: &str,
        id: [u8; 16],
    ) -> Result<Grant, Error> {
        let not_before = unix_secs(self.not_before.unwrap_or_else(SystemTime::now));
        let expires = not_before.saturating_add(self.valid_for.as_secs());
        if expires <= not_before {
            return Err(Error::Invalid(
                "a grant must be valid for at least one second".into(),
            ));
        }
        if self.roles.is_empty() || self.roles.len() > MAX_ROLES {
            return Err(Error::Invalid(format!(
                "a grant carries 1 to {MAX_ROLES} roles, got {}",
                self.roles.len()
            )));
        }
        for role in &self.roles {
            check_role(role).map_err(Error::Invalid)?;
        }
        check_network(network).map_err(Error::Invalid)?;
        let subject = self.subject.to_bytes();
        if subject.len() > MAX_SUBJECT {
            return Err(Error::Invalid(format!(
                "a subject peer id is at most {MAX_SUBJECT} bytes"
            )));
        }
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(&[FORMAT, KIND_GRANT, network.len() as u8]);
        body.extend_from_slice(network.as_bytes());
        body.extend_from_slice(&id);
        body.extend_from_slice(&issuer.public_key_bytes());
        body.push(subject.len() as u8);
        body.extend_from_slice(&subject);
        body.extend_from_slice(&not_before.to_be_bytes());
        body.extend_from_slice(&expires.to_be_bytes());
        body.push(self.roles.len() as u8);
        for role in &self.roles {
            body.push(role.len() as u8);
            body.extend_from_slice(role.as_bytes());
        }
        let signature = issuer.sign(&signed_message(&body));
        body.extend_from_slice(&signature);
        Grant::decode(&body)
    }
}

fn check_network(network: &str) -> Result<(), String> {
    if network.is_empty() || network.len() > MAX_NETWORK {
        return Err(format!("a network name is 1 to {MAX_NETWORK} bytes"));
    }
    Ok(())
}

/// Reads the fields of a statement in order, failing with a clear reason.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn fail(&self, reason: impl Into<String>) -> Error {
        Error::Malformed {
            what: self.what,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.fail(format!("it ends inside its {field}")));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self, field: &str) -> Result<u8, Error> {
        Ok(self.take(1, field)?[0])
    }

    fn u64(&mut self, field: &str) -> Result<u64, Error> {
        let bytes = self.take(8, field)?;
        Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], Error> {
        Ok(self.take(N, field)?.try_into().expect("N bytes"))
    }

    /// A string with a one-byte length, 1 to `max` bytes.
    fn string(&mut self, field: &str, max: usize) -> Result<String, Error> {
        let len = usize::from(self.byte(field)?);
        if len == 0 || len > max {
            return Err(self.fail(format!("its {field} is {len} bytes, allowed 1 to {max}")));
        }
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.fail(format!("its {field} is not UTF-8")))
    }

    /// The header: format version and kind.
    fn header(&mut self, kind: u8) -> Result<(), Error> {
        let format = self.byte("format")?;
        if format != FORMAT {
            return Err(self.fail(format!("unsupported format version {format}")));
        }
        let found = self.byte("kind")?;
        if found != kind {
            return Err(self.fail(format!("kind {found}, expected {kind}")));
        }
        Ok(())
    }

    /// The signature, which must end the bytes, verified over everything before it.
    fn signature(&mut self, issuer: &[u8; 32]) -> Result<(), Error> {
        let body_end = self.at;
        let signature = self.take(SIGNATURE, "signature")?;
        if self.at != self.bytes.len() {
            return Err(self.fail(format!(
                "{} bytes follow the signature",
                self.bytes.len() - self.at
            )));
        }
        let key = ed25519::PublicKey::try_from_bytes(issuer)
            .map_err(|_| self.fail("its issuer key is not an ed25519 public key"))?;
        if !key.verify(&signed_message(&self.bytes[..body_end]), signature) {
            return Err(Error::Signature(self.what));
        }
        Ok(())
    }
}

/// The peer id of a raw ed25519 public key.
pub(crate) fn peer_of_key(key: &[u8; 32]) -> PeerId {
    ed25519::PublicKey::try_from_bytes(key)
        .map(|k| PublicKey::from(k).to_peer_id())
        .unwrap_or_else(|_| PeerId::from_multihash(Default::default()).expect("empty identity"))
}

impl Grant {
    /// Starts a grant for `subject`.
    pub fn builder(subject: PeerId) -> GrantBuilder {
        GrantBuilder {
            subject,
            roles: Vec::new(),
            not_before: None,
            valid_for: Duration::from_secs(30 * 24 * 3600),
        }
    }

    /// Decodes untrusted bytes: layout, limits and the issuer's signature.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] or [`Error::Signature`].
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader {
            what: "grant",
            bytes,
            at: 0,
        };
        if bytes.len() > MAX_GRANT {
            return Err(r.fail(format!("{} bytes, the limit is {MAX_GRANT}", bytes.len())));
        }
        r.header(KIND_GRANT)?;
        let network = r.string("network", MAX_NETWORK)?;
        let id = GrantId(r.array("id")?);
        let issuer: [u8; 32] = r.array("issuer")?;
        let subject_len = usize::from(r.byte("subject")?);
        if subject_len == 0 || subject_len > MAX_SUBJECT {
            return Err(r.fail(format!("its subject is {subject_len} bytes")));
        }
        let subject = PeerId::from_bytes(r.take(subject_len, "subject")?)
            .map_err(|e| r.fail(format!("its subject is not a peer id: {e}")))?;
        let not_before = r.u64("not-before")?;
        let expires = r.u64("expiry")?;
        if expires <= not_before {
            return Err(r.fail("it expires before it starts"));
        }
        let count = usize::from(r.byte("role count")?);
        if count == 0 || count > MAX_ROLES {
            return Err(r.fail(format!("it has {count} roles, allowed 1 to {MAX_ROLES}")));
        }
        let mut roles = Vec::with_capacity(count);
        for _ in 0..count {
            let role = r.string("role", MAX_ROLE)?;
            check_role(&role).map_err(|e| r.fail(e))?;
            roles.push(role);
        }
        r.signature(&issuer)?;
        Ok(Self {
            id,
            network,
            issuer,
            subject,
            roles,
            not_before,
            expires,
            bytes: bytes.to_vec(),
        })
    }

    /// The grant's id.
    pub fn id(&self) -> GrantId {
        self.id
    }

    /// The network the grant is for: it means nothing on any other.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The issuer's peer id (its ed25519 key).
    pub fn issuer(&self) -> PeerId {
        peer_of_key(&self.issuer)
    }

    pub(crate) fn issuer_key(&self) -> &[u8; 32] {
        &self.issuer
    }

    /// The peer the roles are granted to; the grant is worth nothing to any other peer.
    pub fn subject(&self) -> PeerId {
        self.subject
    }

    /// The roles granted.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// When the grant starts to hold.
    pub fn not_before(&self) -> SystemTime {
        time_of(self.not_before)
    }

    /// When the grant stops holding.
    pub fn expires(&self) -> SystemTime {
        time_of(self.expires)
    }

    /// Whether the grant's window holds `at` (from not-before, up to but not including expiry).
    pub fn is_valid_at(&self, at: SystemTime) -> bool {
        let at = unix_secs(at);
        self.not_before <= at && at < self.expires
    }

    /// The encoded, signed grant.
    pub fn to_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Display for Grant {
    /// The grant as unpadded base64url text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE64URL_NOPAD.encode(&self.bytes))
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("id", &self.id)
            .field("network", &self.network)
            .field("issuer", &self.issuer())
            .field("subject", &self.subject)
            .field("roles", &self.roles)
            .field("not_before", &self.not_before)
            .field("expires", &self.expires)
            .finish()
    }
}

fn from_text(what: &'static str, text: &str) -> Result<Vec<u8>, Error> {
    data_encoding::BASE64URL_NOPAD
        .decode(text.trim().as_bytes())
        .map_err(|e| Error::Text {
            what,
            reason: e.to_string(),
        })
}

impl FromStr for Grant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::decode(&from_text("grant", s)?)
    }
}

/// An issuer's signed statement that one of its grants no longer holds.
///
/// A revocation is kept until the revoked grant would have expired (`until`); after that the
/// grant's own expiry refuses it.
///
/// ```
/// use micromesh::{Identity, auth::{Grant, Revocation}};
///
/// let issuer = Identity::generate();
/// let grant = Grant::builder(Identity::generate().peer_id()).role("ops").sign(&issuer, "demo")?;
/// let revocation = Revocation::of(&grant, &issuer)?;
/// assert_eq!(revocation.grant_id(), grant.id());
/// let again: Revocation = revocation.to_string().parse()?;
/// assert_eq!(again, revocation);
///
/// // Only the issuer can revoke.
/// assert!(Revocation::of(&grant, &Identity::generate()).is_err());
/// # Ok::<(), micromesh::auth::GrantError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Revocation {
    network: String,
    grant: GrantId,
    issuer: [u8; 32],
    revoked_at: u64,
    until: u64,
    bytes: Vec<u8>,
}

impl Revocation {
    /// Revokes `grant`, signed by its issuer.
    ///
    /// # Errors
    ///
    /// [`Error::NotIssuer`] if `issuer` did not issue the grant.
    pub fn of(grant: &Grant, issuer: &Identity) -> Result<Self, Error> {
        Self::of_at(grant, issuer, SystemTime::now())
    }

    /// As [`Revocation::of`], revoked at the time given (for test vectors).
    pub(crate) fn of_at(grant: &Grant, issuer: &Identity, at: SystemTime) -> Result<Self, Error> {
        if &issuer.public_key_bytes() != grant.issuer_key() {
            return Err(Error::NotIssuer {
                grant: grant.id(),
                issuer: Box::new(grant.issuer()),
                revoker: Box::new(issuer.peer_id()),
            });
        }
        let network = grant.network();
        let mut body = Vec::with_capacity(REVOCATION_FIXED + network.len());
        body.extend_from_slice(&[FORMAT, KIND_REVOCATION, network.len() as u8]);
        body.extend_from_slice(network.as_bytes());
        body.extend_from_slice(&grant.id().0);
        body.extend_from_slice(grant.issuer_key());
        body.extend_from_slice(&unix_secs(at).to_be_bytes());
        body.extend_from_slice(&grant.expires.to_be_bytes());
        let signature = issuer.sign(&signed_message(&body));
        body.extend_from_slice(&signature);
        Self::decode(&body)
    }

    /// Decodes untrusted bytes: layout and the issuer's signature.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] or [`Error::Signature`].
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader {
            what: "revocation",
            bytes,
            at: 0,
        };
        if bytes.len() > MAX_REVOCATION {
            return Err(r.fail(format!(
                "{} bytes, the limit is {MAX_REVOCATION}",
                bytes.len()
            )));
        }
        r.header(KIND_REVOCATION)?;
        let network = r.string("network", MAX_NETWORK)?;
        let grant = GrantId(r.array("grant id")?);
        let issuer: [u8; 32] = r.array("issuer")?;
        let revoked_at = r.u64("revocation time")?;
        let until = r.u64("until")?;
        r.signature(&issuer)?;
        Ok(Self {
            network,
            grant,
            issuer,
            revoked_at,
            until,
            bytes: bytes.to_vec(),
        })
    }

    /// The revoked grant's id.
    pub fn grant_id(&self) -> GrantId {
        self.grant
    }

    /// The network of the revoked grant.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The issuer of the revoked grant (only it can revoke).
    pub fn issuer(&self) -> PeerId {
        peer_of_key(&self.issuer)
    }

    pub(crate) fn issuer_key(&self) -> &[u8; 32] {
        &self.issuer
    }

    /// When the issuer revoked the grant.
    pub fn revoked_at(&self) -> SystemTime {
        time_of(self.revoked_at)
    }

    /// When the revoked grant expires anyway: the revocation is kept until then.
    pub fn until(&self) -> SystemTime {
        time_of(self.until)
    }

    /// The encoded, signed revocation.
    pub fn to_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Display for Revocation {
    /// The revocation as unpadded base64url text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE64URL_NOPAD.encode(&self.bytes))
    }
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field("grant", &self.grant)
            .field("network", &self.network)
            .field("issuer", &self.issuer())
            .field("revoked_at", &self.revoked_at)
            .field("until", &self.until)
            .finish()
    }
}

impl FromStr for Revocation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::decode(&from_text("revocation", s)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex, vector_after};

    const SPEC: &str = include_str!("../../protocols/auth.md");

    fn issuer() -> Identity {
        Identity::from_secret_bytes([1; 32])
    }

    fn vector_grant() -> Grant {
        Grant::builder(Identity::from_secret_bytes([2; 32]).peer_id())
            .roles(["admin", "billing.read"])
            .not_before(time_of(1_700_000_000))
            .valid_for(Duration::from_secs(30 * 24 * 3600))
            .sign_with_id(&issuer(), "main", [0x11; 16])
            .unwrap()
    }

    #[test]
    fn grants_and_revocations_match_the_spec_vectors() {
        let grant = vector_grant();
        let bytes = vector_after(SPEC, "Vector: grant");
        assert_eq!(hex(grant.to_bytes()), hex(&bytes));
        let decoded = Grant::decode(&bytes).unwrap();
        assert_eq!(decoded, grant);
        assert_eq!(decoded.roles(), ["admin", "billing.read"]);
        assert_eq!(
            decoded.issuer().to_string(),
            "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"
        );
        assert_eq!(decoded.to_string().parse::<Grant>().unwrap(), grant);

        let revocation = Revocation::of_at(&grant, &issuer(), time_of(1_700_100_000)).unwrap();
        let bytes = vector_after(SPEC, "Vector: revocation");
        assert_eq!(hex(revocation.to_bytes()), hex(&bytes));
        let decoded = Revocation::decode(&bytes).unwrap();
        assert_eq!(decoded, revocation);
        assert_eq!(decoded.grant_id(), grant.id());
        assert_eq!(decoded.until(), grant.expires());
    }

    #[test]
    fn tampered_truncated_and_padded_statements_are_refused() {
        let bytes = vector_grant().to_bytes().to_vec();
        // Every single-byte change is caught: by the layout checks or by the signature.
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x01;
            assert!(
                Grant::decode(&changed).is_err(),
                "byte {i} changed went unnoticed"
            );
        }
        for len in 0..bytes.len() {
            assert!(Grant::decode(&bytes[..len]).is_err());
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            Grant::decode(&padded),
            Err(Error::Malformed { .. })
        ));
        // A revocation is not a grant, and the other way round.
        let revocation = Revocation::of(&vector_grant(), &issuer()).unwrap();
        assert!(Grant::decode(revocation.to_bytes()).is_err());
        assert!(Revocation::decode(&bytes).is_err());
        assert!("not base64!".parse::<Grant>().is_err());
    }

    #[test]
    fn issuing_checks_its_limits() {
        let subject = Identity::generate().peer_id();
        let issuer = issuer();
        assert!(
            Grant::builder(subject).sign(&issuer, "main").is_err(),
            "no roles"
        );
        assert!(
            Grant::builder(subject)
                .role("bad role")
                .sign(&issuer, "main")
                .is_err()
        );
        assert!(
            Grant::builder(subject)
                .roles((0..=MAX_ROLES).map(|i| format!("r{i}")))
                .sign(&issuer, "main")
                .is_err()
        );
        assert!(
            Grant::builder(subject)
                .role("a")
                .valid_for(Duration::ZERO)
                .sign(&issuer, "main")
                .is_err()
        );
        let big = Grant::builder(subject)
            .roles((0..MAX_ROLES).map(|i| format!("{i:0>64}")))
            .sign(&issuer, &"n".repeat(MAX_NETWORK))
            .unwrap();
        assert!(big.to_bytes().len() <= MAX_GRANT);
    }
}
