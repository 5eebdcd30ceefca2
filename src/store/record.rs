//! The store's wire format (`protocols/store.md`): signed records, index entries and index
//! shards, all CBOR, and the DHT keys they live under.
//!
//! Every record is signed by its writer over its header; the header names the record's place
//! (database, table, key), its version and expiry, and the SHA-256 of its value. Any node can
//! therefore check a record it is handed, and an index entry (the header and signature without
//! the value) proves that the record exists without carrying it.

use std::{
    cmp::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Identity, Metadata, PeerId, identity};

/// The header version this implementation writes and reads.
pub(crate) const VERSION: u8 = 1;
/// Domain separation: what a store signature covers starts with these bytes, then the network
/// name and a zero byte, then the header.
pub(crate) const SIGNING_CONTEXT: &[u8] = b"micromesh/store/1\0";
/// The largest value a record carries.
pub(crate) const MAX_VALUE: usize = 1024 * 1024;
/// The longest key, in bytes of UTF-8.
pub(crate) const MAX_KEY: usize = 1024;
/// The longest database or table name.
pub(crate) const MAX_NAME: usize = 64;
/// The largest metadata, counted as the sum of its keys' and values' lengths.
pub(crate) const MAX_METADATA: usize = 4096;
/// The largest encoded index shard.
pub(crate) const MAX_SHARD: usize = 1024 * 1024;
/// The number of index shards of every table.
pub(crate) const SHARDS: u8 = 8;
/// How far ahead of the receiver's clock a version may be.
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The largest encoded record: a full value, the largest header, framing.
pub(crate) const MAX_RECORD: usize = MAX_VALUE
    + MAX_KEY
    + MAX_METADATA
    + 2 * MAX_NAME
    + 512
    + crate::auth::MAX_PRESENTED * (crate::auth::MAX_GRANT + 8);

/// What a writer signs: everything about a record but its value, which the digest stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Header {
    #[serde(rename = "v")]
    pub(crate) version: u8,
    #[serde(rename = "d")]
    pub(crate) database: String,
    #[serde(rename = "t")]
    pub(crate) table: String,
    #[serde(rename = "k")]
    pub(crate) key: String,
    /// The record's version: microseconds since the Unix epoch on the writer's clock, kept
    /// increasing by the writer. The higher version wins.
    #[serde(rename = "n")]
    pub(crate) revision: u64,
    /// When the record expires, in milliseconds since the Unix epoch.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub(crate) expires_ms: Option<u64>,
    #[serde(rename = "m", default, skip_serializing_if = "Metadata::is_empty")]
    pub(crate) metadata: Metadata,
    /// A tombstone: the key was deleted at this version.
    #[serde(rename = "z", default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) deleted: bool,
    /// The value's length in bytes.
    #[serde(rename = "l")]
    pub(crate) value_len: u64,
    /// SHA-256 of the value.
    #[serde(rename = "h", with = "serde_bytes")]
    pub(crate) value_digest: Vec<u8>,
}

/// A header with its writer and signature: an index entry, or a record without its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The encoded [`Header`], exactly as signed.
    #[serde(rename = "h", with = "serde_bytes")]
    pub(crate) header: Vec<u8>,
    /// The writer's peer id (bytes).
    #[serde(rename = "w", with = "serde_bytes")]
    pub(crate) writer: Vec<u8>,
    /// The writer's ed25519 signature of [`signed_message`].
    #[serde(rename = "s", with = "serde_bytes")]
    pub(crate) signature: Vec<u8>,
    /// The writer's [grants](crate::auth::Grant), which give it the roles the holders' rules
    /// may ask for. Outside the signature: each grant is signed by its issuer and names the
    /// writer.
    #[serde(rename = "g", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) grants: Vec<serde_bytes::ByteBuf>,
}

/// A record as stored in the DHT: the signed header and the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SignedRecord {
    #[serde(rename = "h", with = "serde_bytes")]
    header: Vec<u8>,
    #[serde(rename = "w", with = "serde_bytes")]
    writer: Vec<u8>,
    #[serde(rename = "s", with = "serde_bytes")]
    signature: Vec<u8>,
    #[serde(rename = "b", with = "serde_bytes")]
    value: Vec<u8>,
    #[serde(rename = "g", default, skip_serializing_if = "Vec::is_empty")]
    grants: Vec<serde_bytes::ByteBuf>,
}

/// One index shard of a table: the newest entry of every key that hashes to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Shard {
    #[serde(rename = "v")]
    version: u8,
    #[serde(rename = "e")]
    entries: Vec<Entry>,
}

/// Why bytes are not an acceptable record, entry or shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("unsupported header version {0}")]
    Version(u8),
    #[error("bad signature")]
    Signature,
    #[error("stored under the wrong DHT key")]
    WrongKey,
    #[error("the value does not match the signed digest")]
    Digest,
    #[error("{0}")]
    Limit(String),
    #[error("version is more than {}s ahead of this node's clock", MAX_CLOCK_SKEW.as_secs())]
    FromTheFuture,
    #[error("expired")]
    Expired,
}

/// A checked header, its writer and the signed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    pub(crate) header: Header,
    pub(crate) writer: PeerId,
    pub(crate) entry: Entry,
}

impl Checked {
    /// The total order of versions of one key: higher revision, then higher writer id, then
    /// the greater signed header. Every node orders the same records the same way.
    pub(crate) fn precedence(&self, other: &Checked) -> Ordering {
        self.header
            .revision
            .cmp(&other.header.revision)
            .then_with(|| self.entry.writer.cmp(&other.entry.writer))
            .then_with(|| self.entry.header.cmp(&other.entry.header))
    }

    /// Whether the record has expired at `now`.
    pub(crate) fn is_expired(&self, now: SystemTime) -> bool {
        self.header.expires_ms.is_some_and(|x| x <= unix_ms(now))
    }

    /// When the record expires.
    pub(crate) fn expires(&self) -> Option<SystemTime> {
        self.header
            .expires_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }
}

/// The DHT key of a record.
pub(crate) fn record_key(database: &str, table: &str, key: &str) -> Vec<u8> {
    format!("r/{database}/{table}/{key}").into_bytes()
}

/// The DHT key of a table's index shard.
pub(crate) fn shard_key(database: &str, table: &str, shard: u8) -> Vec<u8> {
    format!("i/{database}/{table}/{shard}").into_bytes()
}

/// The index shard a key belongs to: the first byte of its SHA-256, modulo [`SHARDS`].
pub(crate) fn shard_of(key: &str) -> u8 {
    Sha256::digest(key.as_bytes())[0] % SHARDS
}

/// What a DHT key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Record,
    Shard,
}

/// Classifies a DHT key by its prefix; `None` for keys the store does not use.
pub(crate) fn kind_of(dht_key: &[u8]) -> Option<KeyKind> {
    match dht_key {
        [b'r', b'/', ..] => Some(KeyKind::Record),
        [b'i', b'/', ..] => Some(KeyKind::Shard),
        _ => None,
    }
}

/// Checks a database or table name: 1 to 64 bytes of `A–Z a–z 0–9 _ . -`.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a {what} name is 1 to {MAX_NAME} characters of A-Z a-z 0-9 _ . -, got {name:?}"
        ))
    }
}

/// Checks a key: 1 to [`MAX_KEY`] bytes.
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!(
            "a key is 1 to {MAX_KEY} bytes, got {} bytes",
            key.len()
        ));
    }
    Ok(())
}

/// Checks metadata against [`MAX_METADATA`].
pub(crate) fn check_metadata(metadata: &Metadata) -> Result<(), String> {
    let size: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_METADATA {
        return Err(format!(
            "metadata holds {size} bytes, the limit is {MAX_METADATA}"
        ));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A wall-clock time as a monotonic deadline; a time already past is now (so it counts as
/// expired at once, never as "no expiry").
pub(crate) fn deadline_of(at: SystemTime) -> Option<std::time::Instant> {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    std::time::Instant::now().checked_add(left)
}

/// A monotonic deadline as wall-clock time.
pub(crate) fn wall_clock_of(at: std::time::Instant) -> SystemTime {
    SystemTime::now() + at.saturating_duration_since(std::time::Instant::now())
}

/// Microseconds since the Unix epoch.
pub(crate) fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("encoding into a Vec cannot fail");
    out
}

/// Decodes untrusted CBOR; the store's structures nest three levels at most.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Invalid> {
    ciborium::de::from_reader_with_recursion_limit(bytes, 16)
        .map_err(|e| Invalid::Malformed(e.to_string()))
}

/// What a signature covers: [`SIGNING_CONTEXT`], the network name, a zero byte, the header.
/// A record signed for one network is therefore invalid on every other.
pub(crate) fn signed_message(network: &str, header: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + network.len() + 1 + header.len());
    message.extend_from_slice(SIGNING_CONTEXT);
    message.extend_from_slice(network.as_bytes());
    message.push(0);
    message.extend_from_slice(header);
    message
}

/// Builds and signs a header; returns the index entry of the record.
pub(crate) fn sign(identity: &Identity, network: &str, header: &Header) -> Entry {
    let header = encode(header);
    Entry {
        signature: identity.sign(&signed_message(network, &header)),
        writer: identity.peer_id().to_bytes(),
        header,
        grants: Vec::new(),
    }
}

/// The digest a header carries for `value`.
pub(crate) fn digest(value: &[u8]) -> Vec<u8> {
    Sha256::digest(value).to_vec()
}

/// Encodes a record for the DHT.
pub(crate) fn encode_record(entry: &Entry, value: &[u8]) -> Vec<u8> {
    encode(&SignedRecord {
        header: entry.header.clone(),
        writer: entry.writer.clone(),
        signature: entry.signature.clone(),
        value: value.to_vec(),
        grants: entry.grants.clone(),
    })
}

/// Re-encodes a record with `grants` attached (fault injection in tests).
#[cfg(feature = "testing")]
pub(crate) fn attach_grants(
    bytes: &[u8],
    grants: &[crate::auth::Grant],
) -> Result<Vec<u8>, Invalid> {
    let mut record: SignedRecord = decode(bytes)?;
    record.grants = grants
        .iter()
        .map(|g| serde_bytes::ByteBuf::from(g.to_bytes().to_vec()))
        .collect();
    Ok(encode(&record))
}

/// Checks an entry's signature and header, and that it belongs under `dht_key` (a record key
/// when `shard` is false, else the key's shard).
fn check_entry(
    network: &str,
    entry: Entry,
    dht_key: &[u8],
    shard: bool,
    now: SystemTime,
) -> Result<Checked, Invalid> {
    check_entry_with(network, entry, dht_key, shard, now, true)
}

/// As [`check_entry`]; `verify_signature: false` skips the signature check only.
fn check_entry_with(
    network: &str,
    entry: Entry,
    dht_key: &[u8],
    shard: bool,
    now: SystemTime,
    verify_signature: bool,
) -> Result<Checked, Invalid> {
    let writer = PeerId::from_bytes(&entry.writer)
        .map_err(|e| Invalid::Malformed(format!("writer: {e}")))?;
    if entry.grants.len() > crate::auth::MAX_PRESENTED {
        return Err(Invalid::Limit(format!(
            "an entry carries at most {} grants",
            crate::auth::MAX_PRESENTED
        )));
    }
    if verify_signature
        && !identity::verify(
            &writer,
            &signed_message(network, &entry.header),
            &entry.signature,
        )
    {
        return Err(Invalid::Signature);
    }
    let header: Header = decode(&entry.header)?;
    if header.version != VERSION {
        return Err(Invalid::Version(header.version));
    }
    check_name("database", &header.database).map_err(Invalid::Limit)?;
    check_name("table", &header.table).map_err(Invalid::Limit)?;
    check_key(&header.key).map_err(Invalid::Limit)?;
    check_metadata(&header.metadata).map_err(Invalid::Limit)?;
    if header.value_len > MAX_VALUE as u64 {
        return Err(Invalid::Limit(format!(
            "a value is at most {MAX_VALUE} bytes, this one has {}",
            header.value_len
        )));
    }
    if header.value_digest.len() != 32 || (header.deleted && header.value_len != 0) {
        return Err(Invalid::Malformed("bad value digest or tombstone".into()));
    }
    let expected = if shard {
        shard_key(&header.database, &header.table, shard_of(&header.key))
    } else {
        record_key(&header.database, &header.table, &header.key)
    };
    if expected != dht_key {
        return Err(Invalid::WrongKey);
    }
    let skew_limit = unix_us(now + MAX_CLOCK_SKEW);
    if header.revision > skew_limit {
        return Err(Invalid::FromTheFuture);
    }
    Ok(Checked {
        header,
        writer,
        entry,
    })
}

/// Decodes and checks a record stored under `dht_key`: signature, limits, place, value digest
/// and clock skew. Expiry is left to the caller ([`Checked::is_expired`]).
pub(crate) fn check_record(
    network: &str,
    dht_key: &[u8],
    bytes: &[u8],
    now: SystemTime,
) -> Result<(Checked, Vec<u8>), Invalid> {
    if bytes.len() > MAX_RECORD {
        return Err(Invalid::Limit(format!(
            "a record is at most {MAX_RECORD} bytes, this one has {}",
            bytes.len()
        )));
    }
    let record: SignedRecord = decode(bytes)?;
    let checked = check_entry(
        network,
        Entry {
            header: record.header,
            writer: record.writer,
            signature: record.signature,
            grants: record.grants,
        },
        dht_key,
        false,
        now,
    )?;
    if checked.header.value_len != record.value.len() as u64
        || checked.header.value_digest != digest(&record.value)
    {
        return Err(Invalid::Digest);
    }
    Ok((checked, record.value))
}

/// The key an entry's header names, without checking the signature: to find the entry held
/// for the same key before paying for a signature check.
pub(crate) fn peek_key(entry: &Entry) -> Option<String> {
    decode::<Header>(&entry.header).ok().map(|h| h.key)
}

/// Decodes a shard without checking its entries (see [`check_shard_entry`]).
pub(crate) fn decode_shard(bytes: &[u8]) -> Result<Vec<Entry>, Invalid> {
    if bytes.len() > MAX_SHARD {
        return Err(Invalid::Limit(format!(
            "an index shard is at most {MAX_SHARD} bytes, this one has {}",
            bytes.len()
        )));
    }
    let shard: Shard = decode(bytes)?;
    if shard.version != VERSION {
        return Err(Invalid::Version(shard.version));
    }
    Ok(shard.entries)
}

/// Checks one entry of the shard stored under `dht_key`.
pub(crate) fn check_shard_entry(
    network: &str,
    dht_key: &[u8],
    entry: Entry,
    now: SystemTime,
) -> Result<Checked, Invalid> {
    check_entry(network, entry, dht_key, true, now)
}

/// As [`check_shard_entry`] for an entry whose signature this node already checked: the
/// caller knows the exact entry (see [`Entry::fingerprint`]) passed before.
pub(crate) fn check_shard_entry_verified(
    network: &str,
    dht_key: &[u8],
    entry: Entry,
    now: SystemTime,
) -> Result<Checked, Invalid> {
    check_entry_with(network, entry, dht_key, true, now, false)
}

impl Entry {
    /// SHA-256 over the header, writer and signature (each length-prefixed): names this exact
    /// entry, for remembering which entries passed their signature check.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in [&self.header, &self.writer, &self.signature] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }
}

/// Encodes a shard; entries are written in key order.
pub(crate) fn encode_shard<'a>(entries: impl IntoIterator<Item = &'a Checked>) -> Vec<u8> {
    let mut entries: Vec<&Checked> = entries.into_iter().collect();
    entries.sort_by(|a, b| a.header.key.cmp(&b.header.key));
    encode(&Shard {
        version: VERSION,
        entries: entries.into_iter().map(|c| c.entry.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex, vector_after};

    const SPEC: &str = include_str!("../../protocols/store.md");
    const NET: &str = "default";

    #[test]
    fn the_record_limit_is_the_one_the_spec_names() {
        assert_eq!(MAX_RECORD, 1_091_920);
    }

    fn fixed_identity() -> Identity {
        Identity::from_secret_bytes([7; 32])
    }

    fn header(key: &str, value: &[u8]) -> Header {
        Header {
            version: VERSION,
            database: "app".into(),
            table: "users".into(),
            key: key.into(),
            revision: 1_767_225_600_000_000,
            expires_ms: None,
            metadata: Metadata::new(),
            deleted: false,
            value_len: value.len() as u64,
            value_digest: digest(value),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    #[test]
    fn the_spec_vectors_decode_check_and_reencode() {
        let id = fixed_identity();
        let entry = sign(&id, NET, &header("alice", b"hi"));
        let record = encode_record(&entry, b"hi");
        let vector = vector_after(SPEC, "Vector 1");
        assert_eq!(hex(&record), hex(&vector), "record vector");
        let (checked, value) =
            check_record(NET, &record_key("app", "users", "alice"), &vector, now())
                .expect("the vector checks");
        assert_eq!(value, b"hi");
        assert_eq!(checked.writer, id.peer_id());
        assert_eq!(checked.header.key, "alice");

        let mut tomb = header("bob", b"");
        tomb.deleted = true;
        tomb.expires_ms = Some(1_767_830_400_000);
        let tomb = check_shard_entry(
            NET,
            &shard_key("app", "users", shard_of("bob")),
            sign(&id, NET, &tomb),
            now(),
        )
        .expect("tombstone entry checks");
        let alice = check_shard_entry(
            NET,
            &shard_key("app", "users", shard_of("alice")),
            entry,
            now(),
        )
        .expect("entry checks");
        let shard = encode_shard([&tomb]);
        assert_eq!(hex(&shard), hex(&vector_after(SPEC, "Vector 2")), "shard");
        let decoded = decode_shard(&shard).expect("decodes");
        assert_eq!(decoded, vec![tomb.entry.clone()]);
        assert_eq!(
            shard_of("alice"),
            3,
            "the spec names the shard of \"alice\""
        );
        assert_eq!(shard_of("bob"), 1, "the spec names the shard of \"bob\"");
        assert_eq!(alice.header.revision, tomb.header.revision);
    }

    #[test]
    fn tampering_is_detected() {
        let id = fixed_identity();
        let entry = sign(&id, NET, &header("alice", b"hi"));
        let key = record_key("app", "users", "alice");
        // Another value under the same signature.
        let forged = encode_record(&entry, b"ho");
        assert_eq!(
            check_record(NET, &key, &forged, now()),
            Err(Invalid::Digest)
        );
        // The same record moved to another key.
        let moved = encode_record(&entry, b"hi");
        assert_eq!(
            check_record(NET, &record_key("app", "users", "mallory"), &moved, now()),
            Err(Invalid::WrongKey)
        );
        // A header changed after signing.
        let mut other = header("alice", b"hi");
        other.revision += 1;
        let mut tampered = entry.clone();
        tampered.header = encode(&other);
        assert_eq!(
            check_record(NET, &key, &encode_record(&tampered, b"hi"), now()),
            Err(Invalid::Signature)
        );
        // Someone else's signature under this writer's name.
        let mallory = Identity::from_secret_bytes([9; 32]);
        let mut impostor = sign(&mallory, NET, &header("alice", b"hi"));
        impostor.writer = id.peer_id().to_bytes();
        assert_eq!(
            check_record(NET, &key, &encode_record(&impostor, b"hi"), now()),
            Err(Invalid::Signature)
        );
        // The same record on another network.
        assert_eq!(
            check_record("other", &key, &encode_record(&entry, b"hi"), now()),
            Err(Invalid::Signature)
        );
        // Garbage.
        assert!(matches!(
            check_record(NET, &key, b"\xff\x00garbage", now()),
            Err(Invalid::Malformed(_))
        ));
        // A version far in the future.
        let mut future = header("alice", b"hi");
        future.revision = unix_us(now() + Duration::from_secs(3600));
        assert_eq!(
            check_record(
                NET,
                &key,
                &encode_record(&sign(&id, NET, &future), b"hi"),
                now()
            ),
            Err(Invalid::FromTheFuture)
        );
    }

    #[test]
    fn fingerprints_name_exact_entries_and_skipping_the_signature_skips_nothing_else() {
        let id = fixed_identity();
        let entry = sign(&id, NET, &header("alice", b"hi"));
        let mut other = entry.clone();
        other.header = encode(&header("alice", b"ho"));
        assert_ne!(entry.fingerprint(), other.fingerprint());
        let mut resigned = entry.clone();
        resigned.signature[0] ^= 1;
        assert_ne!(entry.fingerprint(), resigned.fingerprint());
        assert_eq!(entry.fingerprint(), entry.clone().fingerprint());
        let wrong_shard = shard_key("app", "users", (shard_of("alice") + 1) % SHARDS);
        assert_eq!(
            check_shard_entry_verified(NET, &wrong_shard, entry, now()),
            Err(Invalid::WrongKey)
        );
    }

    #[test]
    fn precedence_is_total_and_deterministic() {
        let a = Identity::from_secret_bytes([1; 32]);
        let b = Identity::from_secret_bytes([2; 32]);
        let key = record_key("app", "users", "k");
        let check = |id: &Identity, revision: u64, value: &[u8]| {
            let mut h = header("k", value);
            h.revision = revision;
            check_record(NET, &key, &encode_record(&sign(id, NET, &h), value), now())
                .expect("valid")
                .0
        };
        let older = check(&a, 10, b"x");
        let newer = check(&b, 11, b"y");
        assert_eq!(newer.precedence(&older), Ordering::Greater);
        // Equal revisions: the writer id decides, the same way in both directions.
        let x = check(&a, 12, b"x");
        let y = check(&b, 12, b"y");
        assert_eq!(x.precedence(&y), y.precedence(&x).reverse());
        assert_ne!(x.precedence(&y), Ordering::Equal);
        assert_eq!(x.precedence(&x), Ordering::Equal);
    }
}
