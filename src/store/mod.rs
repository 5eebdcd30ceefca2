//! The store: a replicated, persistent key-value store on the mesh's DHT, with no database
//! server.
//!
//! Records live in Kademlia under the network's private protocol, on the
//! [`replication`](crate::node::Builder::replication) peers closest to each key (default 5),
//! and on the disk of each of them (a redb file in the node's data directory). A write
//! succeeds once [`Config::write_quorum`] peers besides the writer hold the record (default 3;
//! fewer when the mesh has fewer peers); a read asks until [`Config::read_quorum`] copies are
//! found on other peers (default 3) and returns the newest. With the defaults a record
//! survives the loss of any two of its holders, and a read overlaps every acknowledged write.
//!
//! Every record is signed by its writer and carries a version (microseconds on the writer's
//! clock, kept increasing by the writer). Every node checks a record before it keeps it —
//! signature, place, size, expiry — and keeps only the newest version (ties broken by writer
//! id), so no peer can forge or roll back another's record, and concurrent writers converge on
//! one winner everywhere. A delete is a tombstone that wins over older writes. The wire format
//! is specified in `protocols/store.md`.
//!
//! Keys live in a database and a table (go-micro's namespaces); [`Store::table`] gives a view
//! of another one. [`Store::list`] works across the mesh: each table keeps an index in 8
//! shards, which are DHT records whose holders merge the entries they receive.
//!
//! ```
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use micromesh::{Service, node::Preset, store::WriteOptions};
//!
//! let service = Service::builder("kv").preset(Preset::Local).build().await?;
//! let users = service.store().table("app", "users")?;
//! users.write("alice", b"admin".to_vec()).await?;
//! users
//!     .write_with("session", b"42".to_vec(), WriteOptions::new().ttl(Duration::from_secs(60)))
//!     .await?;
//! let alice = users.read("alice").await?.expect("just written");
//! assert_eq!(alice.value, b"admin");
//! assert_eq!(users.list(Default::default()).await?, vec!["alice", "session"]);
//! users.delete("alice").await?;
//! assert!(users.read("alice").await?.is_none());
//! service.stop().await?;
//! # Ok(())
//! # }
//! ```

pub(crate) mod local;

pub(crate) use self::local::Keeper;
pub(crate) mod persist;
pub(crate) mod record;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering as AtomicOrdering},
    },
    time::{Duration, SystemTime},
};

use futures::{StreamExt as _, future};

pub use self::persist::OpenError;
use self::record::{Checked, Header};
use crate::{Metadata, PeerId, node::Node};

/// The largest value a record may carry: 1 MiB.
pub const MAX_VALUE_SIZE: usize = record::MAX_VALUE;
/// The longest key, in bytes.
pub const MAX_KEY_SIZE: usize = record::MAX_KEY;

/// Store settings.
///
/// ```
/// use std::time::Duration;
/// let config = micromesh::store::Config::default()
///     .write_quorum(2)
///     .read_quorum(2)
///     .timeout(Duration::from_secs(20));
/// assert_eq!(config.database_name(), "micromesh");
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    write_quorum: usize,
    read_quorum: usize,
    timeout: Duration,
    tombstone_retention: Duration,
    database: String,
    table: String,
    capacity: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            write_quorum: 3,
            read_quorum: 3,
            timeout: Duration::from_secs(30),
            tombstone_retention: Duration::from_secs(7 * 24 * 3600),
            database: "micromesh".into(),
            table: "default".into(),
            capacity: 256 * 1024 * 1024,
        }
    }
}

impl Config {
    /// The most bytes of records (keys and values) this node keeps for the mesh, in memory and
    /// in its data directory. A replica that is full refuses new records, so a write fails when
    /// too few replicas can take it. Default is 256 MiB.
    pub fn capacity(mut self, bytes: u64) -> Self {
        self.capacity = bytes;
        self
    }

    /// The capacity set with [`Config::capacity`].
    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// How many peers besides the writer must hold a record before a write succeeds. Capped at
    /// the number of peers the node knows; a node alone keeps its writes locally. Default 3.
    pub fn write_quorum(mut self, peers: usize) -> Self {
        self.write_quorum = peers.max(1);
        self
    }

    /// How many copies from other peers a read collects (besides this node's own, if it holds
    /// one) before it answers with the newest; it answers earlier when the lookup finds no
    /// more. Default 3.
    pub fn read_quorum(mut self, copies: usize) -> Self {
        self.read_quorum = copies.max(1);
        self
    }

    /// How long one read, write, delete or list may take. Default 30 s.
    ///
    /// A holder that refuses a record (it holds a newer version) does not answer at all with
    /// libp2p-kad 0.49: the writer learns of it at Kademlia's 10 s stream timeout, then writes
    /// again above the newest version. The default leaves room for that.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a delete's tombstone is kept, so that it wins over older copies still on their
    /// way. Default 7 days.
    pub fn tombstone_retention(mut self, retention: Duration) -> Self {
        self.tombstone_retention = retention;
        self
    }

    /// The database of [`Service::store`](crate::Service::store). Default `"micromesh"`.
    pub fn database(mut self, name: impl Into<String>) -> Self {
        self.database = name.into();
        self
    }

    /// The table of [`Service::store`](crate::Service::store). Default `"default"`.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// The configured database name.
    pub fn database_name(&self) -> &str {
        &self.database
    }

    /// The configured table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database, table or key name is not acceptable.
    #[error("{0}")]
    InvalidName(String),
    /// The value is larger than [`MAX_VALUE_SIZE`], or the metadata than its limit.
    #[error("{what} of {key:?} is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The key.
        key: String,
        /// `"the value"` or `"the metadata"`.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Too few peers took the record (or the table's index entry). Some may hold it.
    #[error(
        "writing {key:?} reached {reached} of the {needed} peers it needed{detail}; the write may be partly applied, retry it"
    )]
    Quorum {
        /// The key.
        key: String,
        /// Peers that acknowledged.
        reached: usize,
        /// Peers needed.
        needed: usize,
        /// More about why.
        detail: String,
    },
    /// This node's auth rules do not let it write the table; every replica with the same rules
    /// would refuse the record.
    #[error("writing {key:?} in {database}/{table} is not allowed: {reason}")]
    Forbidden {
        /// The database.
        database: String,
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// Why (the rule or default policy that denied it).
        reason: String,
    },
    /// This node's own record store refused the record, e.g. because it is full.
    #[error("cannot write {key:?}: {reason}")]
    Refused {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The operation did not finish within [`Config::timeout`].
    #[error("{op} of {key:?} timed out after {after:?}")]
    Timeout {
        /// `"read"`, `"write"`, `"delete"` or `"list"`.
        op: &'static str,
        /// The key, or the prefix for a list.
        key: String,
        /// The timeout.
        after: Duration,
    },
    /// The node failed or has stopped.
    #[error(transparent)]
    Node(#[from] crate::node::Error),
}

/// A record read from the store.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The metadata written with it.
    pub metadata: Metadata,
    /// When it expires, if it was written with a TTL.
    pub expires: Option<SystemTime>,
    /// Its version: microseconds since the Unix epoch on the writer's clock.
    pub version: u64,
    /// The peer that wrote (and signed) it.
    pub writer: PeerId,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("metadata", &self.metadata)
            .field("expires", &self.expires)
            .field("version", &self.version)
            .field("writer", &self.writer)
            .finish()
    }
}

/// Options of [`Store::write_with`].
///
/// ```
/// use std::time::Duration;
/// let options = micromesh::store::WriteOptions::new()
///     .ttl(Duration::from_secs(3600))
///     .metadata("owner", "billing");
/// # let _ = options;
/// ```
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    ttl: Option<Duration>,
    metadata: Metadata,
}

impl WriteOptions {
    /// No TTL, no metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// The record expires this long after the write, everywhere.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }
}

/// Options of [`Store::list`] and [`Store::read_prefix`]: which keys, in key order.
///
/// ```
/// let page = micromesh::store::ListOptions::new().prefix("user/").offset(20).limit(10);
/// # let _ = page;
/// ```
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    prefix: String,
    limit: Option<usize>,
    offset: usize,
}

impl ListOptions {
    /// Every key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys that start with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// At most `n` keys.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Skip the first `n` keys.
    pub fn offset(mut self, n: usize) -> Self {
        self.offset = n;
        self
    }
}

struct Inner {
    node: Node,
    /// This node's own records, when it keeps them (a node started by a
    /// [`Service`](crate::Service) does).
    keeper: Option<local::WeakKeeper>,
    config: Config,
    /// The last version this node wrote, so that its versions only grow.
    last_version: AtomicU64,
    /// Fingerprints of index entries whose signatures `list` checked: a table listed again
    /// costs no second check of the same entries. Bounded by [`VERIFIED_CACHE`].
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// The most index-entry fingerprints a store remembers; the set starts over beyond.
const VERIFIED_CACHE: usize = 200_000;

/// A handle on one table of the mesh's store. Cheap to clone.
///
/// [`Service::store`](crate::Service::store) gives one on the configured database and table;
/// [`Store::table`] gives a view of another. See the [module docs](self).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    database: String,
    table: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("database", &self.database)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// What a write puts: a value, or a tombstone.
enum Change {
    Put(Vec<u8>, WriteOptions),
    Delete,
}

impl Store {
    /// A store on `node`'s DHT with `config`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] if the configured database or table name is invalid.
    ///
    /// A node built on its own keeps no records (it has no record keeper): its writes and reads
    /// go to the records of other peers. A [`Service`](crate::Service) runs a store whose node
    /// keeps records too.
    pub fn new(node: Node, config: Config) -> Result<Self, Error> {
        Self::with_keeper(node, None, config)
    }

    /// A store whose node keeps its records in `keeper`.
    pub(crate) fn with_keeper(
        node: Node,
        keeper: Option<local::Keeper>,
        config: Config,
    ) -> Result<Self, Error> {
        record::check_name("database", &config.database).map_err(Error::InvalidName)?;
        record::check_name("table", &config.table).map_err(Error::InvalidName)?;
        if let Some(keeper) = &keeper {
            keeper.register_metrics(&node);
        }
        let keeper = keeper.map(|k| k.downgrade());
        Ok(Self {
            database: config.database.clone(),
            table: config.table.clone(),
            inner: Arc::new(Inner {
                node,
                keeper,
                config,
                last_version: AtomicU64::new(0),
                verified: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// A view of another database and table, on the same node and settings.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] unless both names are 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// let orders = service.store().table("shop", "orders")?;
    /// assert_eq!((orders.database(), orders.table_name()), ("shop", "orders"));
    /// assert!(service.store().table("shop", "bad/name").is_err());
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn table(&self, database: &str, table: &str) -> Result<Self, Error> {
        record::check_name("database", database).map_err(Error::InvalidName)?;
        record::check_name("table", table).map_err(Error::InvalidName)?;
        Ok(Self {
            inner: self.inner.clone(),
            database: database.into(),
            table: table.into(),
        })
    }

    /// The database of this view.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The table of this view.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Writes `value` under `key`, replacing what is there.
    ///
    /// Returns the version written.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad key, [`Error::TooLarge`] for a value over
    /// [`MAX_VALUE_SIZE`], [`Error::Quorum`] if too few peers took it, [`Error::Timeout`].
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// let store = service.store();
    /// let first = store.write("counter", b"1".to_vec()).await?;
    /// let second = store.write("counter", b"2".to_vec()).await?;
    /// assert!(second > first, "versions only grow");
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write(&self, key: &str, value: Vec<u8>) -> Result<u64, Error> {
        self.write_with(key, value, WriteOptions::default()).await
    }

    /// Writes `value` under `key` with a TTL and metadata.
    ///
    /// # Errors
    ///
    /// As [`Store::write`].
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// use std::time::Duration;
    /// use micromesh::store::WriteOptions;
    /// let store = service.store();
    /// let options = WriteOptions::new().ttl(Duration::from_secs(60)).metadata("by", "docs");
    /// store.write_with("session", b"token".to_vec(), options).await?;
    /// assert!(store.read("session").await?.expect("written").expires.is_some());
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write_with(
        &self,
        key: &str,
        value: Vec<u8>,
        options: WriteOptions,
    ) -> Result<u64, Error> {
        record::check_key(key).map_err(Error::InvalidName)?;
        if value.len() > MAX_VALUE_SIZE {
            return Err(Error::TooLarge {
                key: key.into(),
                what: "the value",
                size: value.len(),
                limit: MAX_VALUE_SIZE,
            });
        }
        if let Err(e) = record::check_metadata(&options.metadata) {
            tracing::debug!("{e}");
            let size = options
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum();
            return Err(Error::TooLarge {
                key: key.into(),
                what: "the metadata",
                size,
                limit: record::MAX_METADATA,
            });
        }
        self.timed("write", key, self.change(key, Change::Put(value, options)))
            .await
            .map(|(version, _)| version)
    }

    /// Deletes `key`: writes a tombstone that wins over every older version.
    ///
    /// # Errors
    ///
    /// As [`Store::write`].
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// let store = service.store();
    /// store.write("gone", b"soon".to_vec()).await?;
    /// store.delete("gone").await?;
    /// assert!(store.read("gone").await?.is_none());
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        record::check_key(key).map_err(Error::InvalidName)?;
        self.timed("delete", key, self.change(key, Change::Delete))
            .await
            .map(drop)
    }

    /// Reads `key`: the newest version among the copies found, or `None` if there is none,
    /// it was deleted, or it expired.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad key, [`Error::Timeout`], [`Error::Node`].
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// use micromesh::store::WriteOptions;
    /// let store = service.store();
    /// store
    ///     .write_with("user", b"ada".to_vec(), WriteOptions::new().metadata("role", "admin"))
    ///     .await?;
    /// let record = store.read("user").await?.expect("written");
    /// assert_eq!(record.value, b"ada");
    /// assert_eq!(record.metadata.get("role"), Some("admin"));
    /// assert_eq!(record.writer, service.peer_id());
    /// assert!(store.read("nobody").await?.is_none());
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn read(&self, key: &str) -> Result<Option<Record>, Error> {
        record::check_key(key).map_err(Error::InvalidName)?;
        self.timed("read", key, self.read_newest(key)).await
    }

    /// Reads every live record whose key matches `options`, in key order.
    ///
    /// # Errors
    ///
    /// As [`Store::list`] and [`Store::read`].
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// use micromesh::store::ListOptions;
    /// let store = service.store();
    /// for (key, value) in [("fruit/apple", "red"), ("fruit/kiwi", "green"), ("veg/leek", "white")] {
    ///     store.write(key, value.as_bytes().to_vec()).await?;
    /// }
    /// let fruit = store.read_prefix(ListOptions::new().prefix("fruit/")).await?;
    /// let values: Vec<&[u8]> = fruit.iter().map(|r| r.value.as_slice()).collect();
    /// assert_eq!(values, [&b"red"[..], &b"green"[..]]);
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn read_prefix(&self, options: ListOptions) -> Result<Vec<Record>, Error> {
        let keys = self.list(options).await?;
        let reads = futures::stream::iter(keys.iter().map(|key| self.read(key)))
            .buffered(16)
            .collect::<Vec<_>>()
            .await;
        let mut records = Vec::with_capacity(reads.len());
        for read in reads {
            if let Some(record) = read? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Lists the live keys of this table across the mesh, in key order, with a prefix, offset
    /// and limit.
    ///
    /// The keys come from the table's index (`protocols/store.md`): a key shows once its write
    /// succeeded, and goes when it is deleted or expires.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], [`Error::Node`].
    ///
    /// ```
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// # let service = micromesh::Service::builder("kv").preset(micromesh::node::Preset::Local).build().await?;
    /// use micromesh::store::ListOptions;
    /// let store = service.store();
    /// for key in ["a", "b", "c", "d"] {
    ///     store.write(key, Vec::new()).await?;
    /// }
    /// assert_eq!(store.list(ListOptions::new().offset(1).limit(2)).await?, ["b", "c"]);
    /// # service.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list(&self, options: ListOptions) -> Result<Vec<String>, Error> {
        let prefix = options.prefix.clone();
        self.timed("list", &prefix, self.list_keys(options)).await
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let after = self.inner.config.timeout;
        tokio::time::timeout(after, work)
            .await
            .map_err(|_| Error::Timeout {
                op,
                key: key.into(),
                after,
            })?
    }

    fn node(&self) -> &Node {
        &self.inner.node
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.inner
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A version above every version this node wrote and above `at_least`.
    fn next_version(&self, at_least: u64) -> u64 {
        let now = record::unix_us(SystemTime::now());
        let mut last = self.inner.last_version.load(AtomicOrdering::Relaxed);
        loop {
            let next = now.max(last + 1).max(at_least);
            match self.inner.last_version.compare_exchange_weak(
                last,
                next,
                AtomicOrdering::Relaxed,
                AtomicOrdering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    /// Writes `value` under `key` (or deletes it, with `None`) and returns the signed record
    /// as stored, for components that pass it on (the configuration's mesh layer).
    pub(crate) async fn write_signed(
        &self,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, Error> {
        record::check_key(key).map_err(Error::InvalidName)?;
        let (op, change) = match value {
            Some(value) => ("write", Change::Put(value, WriteOptions::default())),
            None => ("delete", Change::Delete),
        };
        self.timed(op, key, self.change(key, change))
            .await
            .map(|(_, bytes)| bytes)
    }

    /// The newest valid copy of `key` as signed bytes, tombstones included, with the copies
    /// whose writer this node's rules do not allow left out.
    pub(crate) async fn read_signed(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        record::check_key(key).map_err(Error::InvalidName)?;
        self.timed("read", key, async {
            Ok(self
                .newest_with_bytes(key)
                .await?
                .map(|(_, _, bytes)| bytes))
        })
        .await
    }

    async fn change(&self, key: &str, change: Change) -> Result<(u64, Vec<u8>), Error> {
        // Above the version this node holds, if it is a holder.
        let held = self
            .inner
            .keeper
            .as_ref()
            .and_then(|keeper| {
                keeper.revision(&libp2p::kad::RecordKey::new(&record::record_key(
                    &self.database,
                    &self.table,
                    key,
                )))
            })
            .map_or(0, |revision| revision + 1);
        let version = self.next_version(held);
        match self.put(key, &change, version).await {
            Err(Error::Quorum { .. }) => {
                // Holders refuse a version older than theirs: a writer with a clock ahead wrote
                // last. Write again above the newest version found, once.
                let newest = self.newest(key).await?.map(|(c, _)| c.header.revision);
                match newest {
                    Some(n) if n >= version => {
                        let version = self.next_version(n + 1);
                        self.put(key, &change, version).await
                    }
                    _ => self.put(key, &change, version).await,
                }
            }
            other => other,
        }
    }

    async fn put(&self, key: &str, change: &Change, version: u64) -> Result<(u64, Vec<u8>), Error> {
        let config = &self.inner.config;
        let auth = self.node().auth();
        auth.authorize_self(&[resource_of(&self.database, &self.table, key)])
            .map_err(|denied| Error::Forbidden {
                database: self.database.clone(),
                table: self.table.clone(),
                key: key.into(),
                reason: denied.reason,
            })?;
        let (value, expires_ms, metadata, deleted) = match change {
            Change::Put(value, options) => (
                value.as_slice(),
                options
                    .ttl
                    .map(|ttl| record::unix_ms(SystemTime::now() + ttl)),
                options.metadata.clone(),
                false,
            ),
            Change::Delete => (
                &[][..],
                Some(record::unix_ms(
                    SystemTime::now() + config.tombstone_retention,
                )),
                Metadata::new(),
                true,
            ),
        };
        let header = Header {
            version: record::VERSION,
            database: self.database.clone(),
            table: self.table.clone(),
            key: key.into(),
            revision: version,
            expires_ms,
            metadata,
            deleted,
            value_len: value.len() as u64,
            value_digest: record::digest(value),
        };
        let identity = self.node().identity();
        let mut entry = record::sign(identity, self.node().network(), &header);
        entry.grants = auth.own_encoded();
        let record_bytes = record::encode_record(&entry, value);
        let signed = record_bytes.clone();
        let index_entry = Checked {
            header,
            writer: identity.peer_id(),
            entry,
        };
        let shard = record::shard_key(&self.database, &self.table, record::shard_of(key));
        let index_bytes = record::encode_shard([&index_entry]);
        let dht_key = record::record_key(&self.database, &self.table, key);
        let quorum = config.write_quorum;
        let (stored, indexed) = future::join(
            self.node().put_record(dht_key, record_bytes, quorum),
            self.node().put_record(shard, index_bytes, quorum),
        )
        .await;
        for (result, what) in [(stored, ""), (indexed, " (the table index)")] {
            match result {
                Ok(_) => {}
                Err(crate::node::Error::Quorum { reached, quorum }) => {
                    return Err(Error::Quorum {
                        key: key.into(),
                        reached,
                        needed: quorum,
                        detail: format!(
                            "{what}: peers refuse a record when they hold a newer version, fail its checks, or are full"
                        ),
                    });
                }
                Err(crate::node::Error::RecordRefused(reason)) => {
                    return Err(Error::Refused {
                        key: key.into(),
                        reason,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((version, signed))
    }

    /// The newest valid copy of `key` found, tombstones and expired copies included. Peers
    /// that returned an older or invalid copy are sent the newest one (read repair).
    async fn newest(&self, key: &str) -> Result<Option<(Checked, Vec<u8>)>, Error> {
        Ok(self
            .newest_with_bytes(key)
            .await?
            .map(|(checked, value, _)| (checked, value)))
    }

    /// As [`Store::newest`], with the record's signed bytes. In the configuration's table, a
    /// copy whose writer this node's rules do not allow is ignored like an invalid one.
    async fn newest_with_bytes(
        &self,
        key: &str,
    ) -> Result<Option<(Checked, Vec<u8>, Vec<u8>)>, Error> {
        let dht_key = record::record_key(&self.database, &self.table, key);
        let found = self
            .node()
            .get_records(dht_key.clone(), self.inner.config.read_quorum)
            .await?;
        let now = SystemTime::now();
        let network = self.node().network();
        let mut best: Option<(Checked, Vec<u8>, usize)> = None;
        let mut copies = Vec::with_capacity(found.len());
        for (i, copy) in found.iter().enumerate() {
            let checked = record::check_record(network, &dht_key, &copy.value, now)
                .map_err(|e| e.to_string())
                .and_then(|(checked, value)| {
                    self.authorize_reserved(&checked)?;
                    Ok((checked, value))
                });
            match checked {
                Ok((checked, value)) => {
                    if best
                        .as_ref()
                        .is_none_or(|(b, _, _)| checked.precedence(b).is_gt())
                    {
                        best = Some((checked.clone(), value, i));
                    }
                    copies.push(Some(checked));
                }
                Err(e) => {
                    tracing::debug!(peer = ?copy.peer, key, "invalid copy ignored: {e}");
                    copies.push(None);
                }
            }
        }
        let Some((checked, value, i)) = best else {
            return Ok(None);
        };
        let stale: Vec<PeerId> = found
            .iter()
            .zip(&copies)
            .filter(|(_, c)| c.as_ref().is_none_or(|c| c.precedence(&checked).is_lt()))
            .filter_map(|(f, _)| f.peer)
            .collect();
        if !stale.is_empty() {
            tracing::debug!(key, peers = stale.len(), "read repair");
            self.node()
                .put_record_to(dht_key, found[i].value.clone(), stale)
                .await?;
        }
        Ok(Some((checked, value, found[i].value.clone())))
    }

    /// Whether this node's rules let the writer of a record of a reserved table (the
    /// configuration's) write it; records of other tables pass.
    fn authorize_reserved(&self, checked: &Checked) -> Result<(), String> {
        if !is_config_table(&checked.header.database, &checked.header.table) {
            return Ok(());
        }
        authorize_writer(self.node().auth(), checked)
    }

    async fn read_newest(&self, key: &str) -> Result<Option<Record>, Error> {
        let Some((checked, value)) = self.newest(key).await? else {
            return Ok(None);
        };
        if checked.header.deleted || checked.is_expired(SystemTime::now()) {
            return Ok(None);
        }
        Ok(Some(Record {
            expires: checked.expires(),
            key: checked.header.key,
            value,
            metadata: checked.header.metadata,
            version: checked.header.revision,
            writer: checked.writer,
        }))
    }

    async fn list_keys(&self, options: ListOptions) -> Result<Vec<String>, Error> {
        let want = self.inner.config.read_quorum;
        let lookups = (0..record::SHARDS).map(|shard| {
            let key = record::shard_key(&self.database, &self.table, shard);
            async move {
                let found = self.node().get_records(key.clone(), want).await?;
                Ok::<_, Error>((key, found))
            }
        });
        let shards = future::try_join_all(lookups).await?;
        let now = SystemTime::now();
        let mut newest: BTreeMap<String, Checked> = BTreeMap::new();
        for (shard_key, copies) in shards {
            // Copies of a shard mostly repeat each other: check each distinct entry once.
            let mut seen = HashSet::new();
            for copy in copies {
                let entries = match record::decode_shard(&copy.value) {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::debug!(peer = ?copy.peer, "invalid index shard ignored: {e}");
                        continue;
                    }
                };
                for entry in entries {
                    if !seen.insert(entry.signature.clone()) {
                        continue;
                    }
                    // Keys outside the prefix are not listed: no need to check them.
                    if !record::peek_key(&entry).is_some_and(|k| k.starts_with(&options.prefix)) {
                        continue;
                    }
                    let fingerprint = entry.fingerprint();
                    let known = self.verified().contains(&fingerprint);
                    let network = self.node().network();
                    let checked = if known {
                        record::check_shard_entry_verified(network, &shard_key, entry, now)
                    } else {
                        record::check_shard_entry(network, &shard_key, entry, now)
                    };
                    let Ok(checked) = checked else {
                        continue;
                    };
                    if !known {
                        let mut verified = self.verified();
                        if verified.len() >= VERIFIED_CACHE {
                            verified.clear();
                        }
                        verified.insert(fingerprint);
                    }
                    if !checked.header.key.starts_with(&options.prefix) {
                        continue;
                    }
                    match newest.get(&checked.header.key) {
                        Some(held) if checked.precedence(held).is_le() => {}
                        _ => {
                            newest.insert(checked.header.key.clone(), checked);
                        }
                    }
                }
            }
        }
        Ok(newest
            .into_values()
            .filter(|c| !c.header.deleted && !c.is_expired(now))
            .map(|c| c.header.key)
            .skip(options.offset)
            .take(options.limit.unwrap_or(usize::MAX))
            .collect())
    }
}

/// The database of the table reserved for the configuration's mesh layer
/// ([`crate::config::MESH_DATABASE`]).
pub(crate) const CONFIG_DATABASE: &str = "_micromesh";
/// The table reserved for the configuration's mesh layer ([`crate::config::MESH_TABLE`]):
/// writes in it are checked against `config:<key>` rather than the table.
pub(crate) const CONFIG_TABLE: &str = "config";

/// Whether a table is the configuration's reserved one.
pub(crate) fn is_config_table(database: &str, table: &str) -> bool {
    database == CONFIG_DATABASE && table == CONFIG_TABLE
}

/// Whether `auth`'s rules let the writer of `checked` write it, with the grants the record
/// carries, at the time it wrote it (its version). A revoked grant authorises nothing. Returns
/// the reason of a refusal.
pub(crate) fn authorize_writer(auth: &crate::auth::Auth, checked: &Checked) -> Result<(), String> {
    let header = &checked.header;
    let written = std::time::UNIX_EPOCH + Duration::from_micros(header.revision);
    auth.authorize(
        crate::auth::Surface::Write,
        checked.writer,
        crate::auth::Grants::Carried(&checked.entry.grants),
        &[resource_of(&header.database, &header.table, &header.key)],
        written,
    )
    .map(drop)
    .map_err(|denied| denied.reason)
}

/// What auth rules a write of `key` in `database/table` is checked against: `config:<key>` in
/// the configuration's table, `table:<database>/<table>` in every other.
pub(crate) fn resource_of(database: &str, table: &str, key: &str) -> crate::auth::Resource {
    if is_config_table(database, table) {
        crate::auth::Resource::config(key)
    } else {
        crate::auth::Resource::table(database, table)
    }
}
