//! The DHT records a node keeps, as a seam: Kademlia's record store belongs to the component
//! that decides what a record is (the [store](crate::store)), not to the node.
//!
//! The node runs Kademlia with whatever [`Records`] it is given at build time. Without one it
//! keeps provider records only and refuses every data record, so a bare node never holds
//! records nobody checked.

use std::borrow::Cow;

use libp2p::{
    PeerId,
    kad::{
        ProviderRecord, Record, RecordKey,
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
    },
};

/// What Kademlia keeps on this node: data records (checked and kept by their owner) and
/// provider records. Object-safe mirror of Kademlia's `RecordStore`, plus what the node needs.
pub(crate) trait Records: Send + 'static {
    /// The record held under `key`.
    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>>;
    /// Keeps a record, or refuses it (Kademlia then answers the sender with an error).
    fn put(&mut self, record: Record) -> store::Result<()>;
    /// Drops the record under `key`.
    fn remove(&mut self, key: &RecordKey);
    /// Every record held (for Kademlia's republication).
    fn records(&self) -> Vec<Record>;
    /// Keeps a provider record.
    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()>;
    /// The providers of `key`.
    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord>;
    /// The provider records of this node itself.
    fn provided(&self) -> Vec<ProviderRecord>;
    /// Drops one provider record.
    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId);
    /// Drops every provider record of `peer` (it left the mesh). Returns how many.
    fn forget_provider(&mut self, peer: &PeerId) -> usize;
    /// Why the last record was refused, in words, for the error of a local write.
    fn take_refusal(&mut self) -> Option<String>;
}

/// The records of a node with no record keeper: provider records only.
pub(crate) struct ProvidersOnly {
    providers: MemoryStore,
}

impl ProvidersOnly {
    pub(crate) fn new(local: PeerId) -> Self {
        Self {
            providers: MemoryStore::with_config(
                local,
                MemoryStoreConfig {
                    max_records: 0,
                    max_value_bytes: 0,
                    max_provided_keys: 10_000,
                    max_providers_per_key: libp2p::kad::K_VALUE.get(),
                },
            ),
        }
    }
}

impl Records for ProvidersOnly {
    fn get(&self, _: &RecordKey) -> Option<Cow<'_, Record>> {
        None
    }

    fn put(&mut self, _: Record) -> store::Result<()> {
        Err(store::Error::MaxRecords)
    }

    fn remove(&mut self, _: &RecordKey) {}

    fn records(&self) -> Vec<Record> {
        Vec::new()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.providers.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.providers(key)
    }

    fn provided(&self) -> Vec<ProviderRecord> {
        self.providers.provided().map(Cow::into_owned).collect()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        self.providers.remove_provider(key, provider);
    }

    fn forget_provider(&mut self, _: &PeerId) -> usize {
        // Without an index the records age out (10 minutes); nodes with a store forget at once.
        0
    }

    fn take_refusal(&mut self) -> Option<String> {
        Some("this node keeps no records: it runs no store".into())
    }
}

/// Kademlia's view of a node's [`Records`].
pub(crate) struct Store(pub(crate) Box<dyn Records>);

impl Store {
    /// Drops every provider record of `peer`; see [`Records::forget_provider`].
    pub(crate) fn forget_provider(&mut self, peer: &PeerId) -> usize {
        self.0.forget_provider(peer)
    }

    /// Why the last record was refused; see [`Records::take_refusal`].
    pub(crate) fn take_refusal(&mut self) -> Option<String> {
        self.0.take_refusal()
    }
}

impl RecordStore for Store {
    type RecordsIter<'a> = std::vec::IntoIter<Cow<'a, Record>>;
    type ProvidedIter<'a> = std::vec::IntoIter<Cow<'a, ProviderRecord>>;

    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        self.0.get(key)
    }

    fn put(&mut self, record: Record) -> store::Result<()> {
        self.0.put(record)
    }

    fn remove(&mut self, key: &RecordKey) {
        self.0.remove(key);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.0
            .records()
            .into_iter()
            .map(Cow::Owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.0.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.0.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.0
            .provided()
            .into_iter()
            .map(Cow::Owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        self.0.remove_provider(key, provider);
    }
}
