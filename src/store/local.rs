//! The node's local record store: Kademlia's `RecordStore`, checking every record before it
//! keeps it, merging index shards, bounded in size, and persisted by [`Disk`].
//!
//! Kademlia hands every record it receives, and every record this node publishes, to
//! [`RecordStore::put`]. A record that fails its checks, or is older than the version held, is
//! refused: Kademlia then answers the sender with an error instead of an acknowledgement, so a
//! write quorum counts only replicas that really hold the record.

use std::{
    borrow::Cow,
    cmp::Ordering,
    collections::{BTreeMap, HashMap, HashSet, hash_map},
    iter,
    path::Path,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use libp2p::{
    PeerId,
    kad::{
        ProviderRecord, Record, RecordKey,
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
    },
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use crate::node::records::Records;

use super::{
    OpenError,
    persist::{Disk, Loaded},
    record::{self, Checked, KeyKind},
};

/// Limits and counters of a [`LocalStore`].
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// The most bytes (keys and values) the store keeps.
    pub(crate) max_bytes: u64,
    /// Records refused because they failed a check or were older than the one held.
    pub(crate) rejected: Counter,
    /// Records refused because the store was full.
    pub(crate) full: Counter,
    /// Bytes held.
    pub(crate) bytes: Gauge,
}

pub(crate) struct LocalStore {
    local: PeerId,
    network: String,
    records: HashMap<RecordKey, Record>,
    /// The header of the version held, for every data record.
    heads: HashMap<RecordKey, Checked>,
    /// The entries of every index shard held, by key.
    shards: HashMap<RecordKey, BTreeMap<String, Checked>>,
    bytes: u64,
    limits: Limits,
    providers: MemoryStore,
    /// The keys each other peer provides here, so that a peer that leaves the mesh can be
    /// forgotten at once ([`LocalStore::forget_provider`]).
    provided_by: HashMap<PeerId, HashSet<RecordKey>>,
    disk: Option<Disk>,
    /// Why the last refused record was refused, for the error of a local write.
    last_refusal: Option<String>,
    /// Decides whether a record's writer may write its table.
    auth: crate::auth::Auth,
}

fn size_of(record: &Record) -> u64 {
    (record.key.as_ref().len() + record.value.len()) as u64
}

/// Why a record was not stored, for the log.
enum Refusal {
    Invalid(record::Invalid),
    /// The writer may not write the table (auth rules).
    Forbidden(String),
    Older,
    Full,
}

impl LocalStore {
    /// A store for `local`, empty or filled from what `disk` held.
    pub(crate) fn new(
        local: PeerId,
        network: String,
        limits: Limits,
        disk: Option<(Disk, Loaded)>,
        auth: crate::auth::Auth,
    ) -> Self {
        let providers = MemoryStore::with_config(
            local,
            MemoryStoreConfig {
                max_records: 0,
                max_value_bytes: 0,
                max_provided_keys: 10_000,
                max_providers_per_key: libp2p::kad::K_VALUE.get(),
            },
        );
        let mut this = Self {
            local,
            network,
            records: HashMap::new(),
            heads: HashMap::new(),
            shards: HashMap::new(),
            bytes: 0,
            limits,
            providers,
            provided_by: HashMap::new(),
            disk: None,
            last_refusal: None,
            auth,
        };
        if let Some((disk, loaded)) = disk {
            this.load(&disk, loaded);
            this.disk = Some(disk);
        }
        this
    }

    fn load(&mut self, disk: &Disk, loaded: Loaded) {
        let (mut kept, mut dropped) = (0usize, 0usize);
        for record in loaded.records {
            let key = record.key.clone();
            match self.insert(record) {
                Ok(_) => kept += 1,
                Err(Refusal::Invalid(record::Invalid::Expired)) => {
                    disk.remove_record(&key);
                }
                Err(Refusal::Invalid(e)) => {
                    // Kept on disk, not served: a record that fails its checks after a
                    // restart points at a damaged file or a changed format.
                    tracing::warn!(key = %String::from_utf8_lossy(key.as_ref()), "record on disk fails its checks ({e}); left on disk, not served");
                    dropped += 1;
                }
                Err(Refusal::Forbidden(reason)) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key.as_ref()), "record on disk is not authorised by this node's rules ({reason}); left on disk, not served");
                    dropped += 1;
                }
                Err(Refusal::Older | Refusal::Full) => dropped += 1,
            }
        }
        let now = Instant::now();
        for provider in loaded.providers {
            // This node's own announcements are made again by the services it runs now; an
            // old one would announce a service that may be gone.
            if provider.provider == self.local || provider.is_expired(now) {
                disk.remove_provider(&provider.key, &provider.provider);
                continue;
            }
            let _ = self.hold_provider(provider);
        }
        if kept + dropped > 0 || loaded.undecodable > 0 {
            tracing::info!(
                records = kept,
                refused = dropped,
                undecodable = loaded.undecodable,
                "record store loaded from disk"
            );
        }
    }

    /// Checks `record` and keeps it if it is new; does not touch the disk. `Ok(false)`: the
    /// same version was held already.
    fn insert(&mut self, mut record: Record) -> Result<bool, Refusal> {
        let now = SystemTime::now();
        match record::kind_of(record.key.as_ref()) {
            None => Err(Refusal::Invalid(record::Invalid::WrongKey)),
            Some(KeyKind::Record) => {
                let (checked, _) =
                    record::check_record(&self.network, record.key.as_ref(), &record.value, now)
                        .map_err(Refusal::Invalid)?;
                if checked.is_expired(now) {
                    return Err(Refusal::Invalid(record::Invalid::Expired));
                }
                self.authorize(&checked)?;
                if let Some(held) = self.heads.get(&record.key) {
                    match checked.precedence(held) {
                        Ordering::Less => return Err(Refusal::Older),
                        Ordering::Equal => return Ok(false),
                        Ordering::Greater => {}
                    }
                }
                record.expires = checked.expires().and_then(record::deadline_of);
                let key = record.key.clone();
                self.replace(record)?;
                self.heads.insert(key, checked);
                Ok(true)
            }
            Some(KeyKind::Shard) => self.merge_shard(record, now),
        }
    }
}

impl LocalStore {
    /// Whether the writer of a checked record or entry may write its table, with the grants it
    /// carries, at the time it wrote it (its version). A revoked grant authorises nothing.
    fn authorize(&self, checked: &record::Checked) -> Result<(), Refusal> {
        super::authorize_writer(&self.auth, checked).map_err(Refusal::Forbidden)
    }

    /// Puts `record` in place of the one under its key, within the size bound.
    fn replace(&mut self, record: Record) -> Result<(), Refusal> {
        let old = self.records.get(&record.key).map_or(0, size_of);
        let new_total = self.bytes - old + size_of(&record);
        if new_total > self.limits.max_bytes {
            return Err(Refusal::Full);
        }
        self.bytes = new_total;
        self.limits
            .bytes
            .set(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        self.records.insert(record.key.clone(), record);
        Ok(())
    }

    /// Merges the entries of an incoming index shard into the one held: per key, the entry
    /// that takes precedence stays. Expired entries are dropped.
    fn merge_shard(&mut self, mut record: Record, now: SystemTime) -> Result<bool, Refusal> {
        let incoming = record::decode_shard(&record.value).map_err(Refusal::Invalid)?;
        let mut held = self.shards.get(&record.key).cloned().unwrap_or_default();
        let mut changed = !self.records.contains_key(&record.key);
        for entry in incoming {
            // Entries already held need no second signature check.
            if record::peek_key(&entry)
                .and_then(|key| held.get(&key))
                .is_some_and(|h| h.entry == entry)
            {
                continue;
            }
            let checked = record::check_shard_entry(&self.network, record.key.as_ref(), entry, now)
                .map_err(Refusal::Invalid)?;
            if checked.is_expired(now) {
                continue;
            }
            self.authorize(&checked)?;
            match held.get(&checked.header.key) {
                Some(h) if checked.precedence(h) != Ordering::Greater => {}
                _ => {
                    held.insert(checked.header.key.clone(), checked);
                    changed = true;
                }
            }
        }
        let before = held.len();
        held.retain(|_, c| !c.is_expired(now));
        changed |= held.len() != before;
        if !changed {
            return Ok(false);
        }
        let value = record::encode_shard(held.values());
        if value.len() > record::MAX_SHARD {
            return Err(Refusal::Invalid(record::Invalid::Limit(format!(
                "the index shard would exceed {} bytes",
                record::MAX_SHARD
            ))));
        }
        record.value = value;
        // A merged shard has no single publisher; with none, Kademlia replicates it like any
        // other node's record and never ignores a copy sent back to this node.
        record.publisher = None;
        record.expires = None;
        let key = record.key.clone();
        self.replace(record)?;
        self.shards.insert(key, held);
        Ok(true)
    }
}

impl LocalStore {
    /// The version held for a data record, if any.
    pub(crate) fn revision(&self, key: &RecordKey) -> Option<u64> {
        self.heads.get(key).map(|c| c.header.revision)
    }

    /// Why the last refused record was refused.
    pub(crate) fn take_refusal(&mut self) -> Option<String> {
        self.last_refusal.take()
    }
}

/// A [`Keeper`] that does not keep the records alive.
#[derive(Clone)]
pub(crate) struct WeakKeeper(std::sync::Weak<Mutex<LocalStore>>);

impl WeakKeeper {
    /// The version of the data record held under `key`, if any (and the node still runs).
    pub(crate) fn revision(&self, key: &RecordKey) -> Option<u64> {
        let records = self.0.upgrade()?;
        let guard = records.lock().unwrap_or_else(|e| e.into_inner());
        guard.revision(key)
    }
}

/// A node's records, shared by Kademlia (which runs in the node's event loop and reaches them
/// through [`Records`]) and the store component (which reads the versions it holds). Cheap to
/// clone.
#[derive(Clone)]
pub(crate) struct Keeper(Arc<Mutex<LocalStore>>);

impl Keeper {
    /// The records of node `local` on `network`, loaded from `data_dir` when there is one.
    pub(crate) fn open(
        local: PeerId,
        network: String,
        data_dir: Option<&Path>,
        limits: Limits,
        auth: crate::auth::Auth,
    ) -> Result<Self, OpenError> {
        let disk = data_dir.map(Disk::open).transpose()?;
        Ok(Self(Arc::new(Mutex::new(LocalStore::new(
            local, network, limits, disk, auth,
        )))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalStore> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that does not keep the records alive: they belong to the node (its event loop
    /// drops them, and closes their database, when it stops).
    pub(crate) fn downgrade(&self) -> WeakKeeper {
        WeakKeeper(Arc::downgrade(&self.0))
    }

    /// Registers the records' counters in `node`'s metrics (`micromesh_store_*`).
    pub(crate) fn register_metrics(&self, node: &crate::node::Node) {
        let limits = self.lock().limits.clone();
        node.register_metrics("store", |r| {
            r.register(
                "rejected",
                "DHT records refused: failed checks (signature, size, key, expiry, auth) or older than the held version",
                limits.rejected,
            );
            r.register(
                "full",
                "DHT records refused because the local record store was full",
                limits.full,
            );
            r.register(
                "bytes",
                "Bytes of DHT records held by the local record store",
                limits.bytes,
            );
        });
    }
}

impl Limits {
    /// A capacity of `max_bytes`, with fresh counters.
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            rejected: Counter::default(),
            full: Counter::default(),
            bytes: Gauge::default(),
        }
    }
}

impl Records for Keeper {
    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        self.lock().get(key).map(|r| Cow::Owned(r.into_owned()))
    }

    fn put(&mut self, record: Record) -> store::Result<()> {
        self.lock().put(record)
    }

    fn remove(&mut self, key: &RecordKey) {
        self.lock().remove(key);
    }

    fn records(&self) -> Vec<Record> {
        self.lock().records().map(Cow::into_owned).collect()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.lock().add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.lock().providers(key)
    }

    fn provided(&self) -> Vec<ProviderRecord> {
        self.lock().provided().map(Cow::into_owned).collect()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        self.lock().remove_provider(key, provider);
    }

    fn forget_provider(&mut self, peer: &PeerId) -> usize {
        self.lock().forget_provider(peer)
    }

    fn take_refusal(&mut self) -> Option<String> {
        self.lock().take_refusal()
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        // Dropping the disk commits what is queued before the database closes.
        self.disk.take();
    }
}

impl RecordStore for LocalStore {
    type RecordsIter<'a> =
        iter::Map<hash_map::Values<'a, RecordKey, Record>, fn(&'a Record) -> Cow<'a, Record>>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.records.get(k).map(Cow::Borrowed)
    }

    fn put(&mut self, record: Record) -> store::Result<()> {
        // A record this node keeps is one it can keep across a restart: while the disk is far
        // behind, it is refused (its writer counts one replica fewer) rather than held in
        // memory only or waited for.
        if self.disk.as_ref().is_some_and(|disk| !disk.has_room()) {
            self.limits.full.inc();
            self.last_refusal = Some(format!(
                "this node's disk is {} writes behind; try again shortly",
                super::persist::QUEUE
            ));
            return Err(store::Error::MaxRecords);
        }
        let key = record.key.clone();
        match self.insert(record) {
            Ok(changed) => {
                if changed
                    && let (Some(disk), Some(stored)) = (&self.disk, self.records.get(&key))
                    && disk.put_record(stored).is_err()
                {
                    // Checked above; another record may have filled the queue since (there is
                    // none: the store is behind one lock). Kept in memory, logged.
                    tracing::warn!("a record could not be queued for the disk");
                }
                Ok(())
            }
            Err(refusal) => {
                let name = String::from_utf8_lossy(key.as_ref()).into_owned();
                let (reason, error) = match refusal {
                    Refusal::Invalid(e) => {
                        self.limits.rejected.inc();
                        tracing::debug!(key = %name, "record refused: {e}");
                        (
                            format!("the record fails its checks ({e})"),
                            store::Error::ValueTooLarge,
                        )
                    }
                    Refusal::Forbidden(reason) => {
                        self.limits.rejected.inc();
                        tracing::debug!(key = %name, "record refused: {reason}");
                        (reason, store::Error::ValueTooLarge)
                    }
                    Refusal::Older => {
                        self.limits.rejected.inc();
                        tracing::debug!(key = %name, "record refused: a newer version is held");
                        (
                            "a newer version is held".to_owned(),
                            store::Error::MaxRecords,
                        )
                    }
                    Refusal::Full => {
                        self.limits.full.inc();
                        tracing::warn!(key = %name, max_bytes = self.limits.max_bytes, "record refused: the record store is full");
                        (
                            format!(
                                "the record store is full ({} of {} bytes used; raise the node's store capacity)",
                                self.bytes, self.limits.max_bytes
                            ),
                            store::Error::MaxRecords,
                        )
                    }
                };
                self.last_refusal = Some(reason);
                Err(error)
            }
        }
    }

    fn remove(&mut self, k: &RecordKey) {
        if let Some(record) = self.records.remove(k) {
            self.bytes -= size_of(&record);
            self.limits
                .bytes
                .set(i64::try_from(self.bytes).unwrap_or(i64::MAX));
            self.heads.remove(k);
            self.shards.remove(k);
            if let Some(disk) = &self.disk {
                disk.remove_record(k);
            }
        }
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.records.values().map(Cow::Borrowed)
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        if self.hold_provider(record.clone())?
            && let Some(disk) = &self.disk
        {
            disk.put_provider(&record);
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.providers.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.providers.remove_provider(k, p);
        if let hash_map::Entry::Occupied(mut keys) = self.provided_by.entry(*p) {
            keys.get_mut().remove(k);
            if keys.get().is_empty() {
                keys.remove();
            }
        }
        if let Some(disk) = &self.disk {
            disk.remove_provider(k, p);
        }
    }
}

impl LocalStore {
    /// Keeps a provider record in memory and indexes it by provider. Returns whether it is held:
    /// a key's list of providers is bounded, and a full list ignores newcomers.
    fn hold_provider(&mut self, record: ProviderRecord) -> store::Result<bool> {
        let (key, provider) = (record.key.clone(), record.provider);
        self.providers.add_provider(record)?;
        let held = self
            .providers
            .providers(&key)
            .iter()
            .any(|p| p.provider == provider);
        if held && provider != self.local {
            self.provided_by.entry(provider).or_default().insert(key);
        }
        Ok(held)
    }

    /// Drops every provider record of `peer`: it has left the mesh, and lookups should not be
    /// sent to it. Returns how many were dropped.
    pub(crate) fn forget_provider(&mut self, peer: &PeerId) -> usize {
        let keys = self.provided_by.remove(peer).unwrap_or_default();
        for key in &keys {
            self.providers.remove_provider(key, peer);
            if let Some(disk) = &self.disk {
                disk.remove_provider(key, peer);
            }
        }
        keys.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use libp2p::kad::{ProviderRecord, Record, RecordKey, store::RecordStore as _};

    use super::{Limits, LocalStore};
    use crate::{
        Identity, Metadata,
        store::{
            persist::Disk,
            record::{self, Header},
        },
    };

    const NET: &str = "test";

    fn limits(max_bytes: u64) -> Limits {
        Limits {
            max_bytes,
            rejected: Default::default(),
            full: Default::default(),
            bytes: Default::default(),
        }
    }

    fn record(id: &Identity, key: &str, value: &[u8], version: u64, deleted: bool) -> Record {
        let header = Header {
            version: record::VERSION,
            database: "db".into(),
            table: "t".into(),
            key: key.into(),
            revision: version,
            expires_ms: None,
            metadata: Metadata::new(),
            deleted,
            value_len: value.len() as u64,
            value_digest: record::digest(value),
        };
        let entry = record::sign(id, NET, &header);
        Record::new(
            record::record_key("db", "t", key),
            record::encode_record(&entry, value),
        )
    }

    fn test_auth(id: &Identity) -> crate::auth::Auth {
        crate::auth::Auth::detached(id.peer_id(), NET, crate::auth::Config::default())
    }

    fn open(dir: &std::path::Path, id: &Identity, max_bytes: u64) -> LocalStore {
        let disk = Disk::open(dir).expect("opens");
        LocalStore::new(
            id.peer_id(),
            NET.into(),
            limits(max_bytes),
            Some(disk),
            test_auth(id),
        )
    }

    #[test]
    fn records_and_providers_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate();
        let other = Identity::generate().peer_id();
        let provided = RecordKey::new(&b"/micromesh/registry/greeter");
        {
            let mut store = open(dir.path(), &id, 1 << 20);
            store.put(record(&id, "a", b"1", 10, false)).unwrap();
            store.put(record(&id, "a", b"2", 11, false)).unwrap();
            store.put(record(&id, "b", b"x", 10, false)).unwrap();
            store.remove(&RecordKey::new(&record::record_key("db", "t", "b")));
            store
                .add_provider(ProviderRecord {
                    key: provided.clone(),
                    provider: other,
                    expires: Some(Instant::now() + Duration::from_secs(600)),
                    addresses: vec!["/memory/7".parse().unwrap()],
                })
                .unwrap();
            // An announcement that expired while the node was down is not kept either.
            store
                .add_provider(ProviderRecord {
                    key: RecordKey::new(&b"/micromesh/registry/gone"),
                    provider: other,
                    expires: Instant::now().checked_add(Duration::from_millis(1)),
                    addresses: Vec::new(),
                })
                .unwrap();
            // This node's own announcement is not kept across a restart.
            store
                .add_provider(ProviderRecord::new(
                    provided.clone(),
                    id.peer_id(),
                    Vec::new(),
                ))
                .unwrap();
        }
        // Let the short-lived announcement expire before the store opens again.
        std::thread::sleep(Duration::from_millis(5));
        let store = open(dir.path(), &id, 1 << 20);
        let a = store
            .get(&RecordKey::new(&record::record_key("db", "t", "a")))
            .expect("a is back");
        let (checked, value) =
            record::check_record(NET, a.key.as_ref(), &a.value, SystemTime::now()).unwrap();
        assert_eq!((checked.header.revision, value.as_slice()), (11, &b"2"[..]));
        assert!(
            store
                .get(&RecordKey::new(&record::record_key("db", "t", "b")))
                .is_none()
        );
        assert!(
            store
                .providers(&RecordKey::new(&b"/micromesh/registry/gone"))
                .is_empty()
        );
        let providers = store.providers(&provided);
        assert_eq!(providers.len(), 1);
        assert_eq!(providers[0].provider, other);
        assert_eq!(providers[0].addresses.len(), 1);
    }

    #[test]
    fn older_invalid_and_oversized_puts_are_refused() {
        let id = Identity::generate();
        let mut store =
            LocalStore::new(id.peer_id(), NET.into(), limits(600), None, test_auth(&id));
        store.put(record(&id, "a", b"new", 20, false)).unwrap();
        // Older: refused; the same again: accepted, nothing changes.
        assert!(store.put(record(&id, "a", b"old", 19, false)).is_err());
        store.put(record(&id, "a", b"new", 20, false)).unwrap();
        // A tombstone wins over the write it follows.
        store.put(record(&id, "a", b"", 21, true)).unwrap();
        // Not a store key, or a record under another key.
        assert!(
            store
                .put(Record::new(b"x/y".to_vec(), b"v".to_vec()))
                .is_err()
        );
        let mut moved = record(&id, "a", b"v", 30, false);
        moved.key = RecordKey::new(&record::record_key("db", "t", "b"));
        assert!(store.put(moved).is_err());
        assert_eq!(store.limits.rejected.get(), 3);
        // Full: a record that does not fit is refused and counted.
        assert!(store.put(record(&id, "big", &[0; 700], 1, false)).is_err());
        assert_eq!(store.limits.full.get(), 1);
    }
}
