//! The record store on disk: a redb database in the node's data directory.
//!
//! The swarm task never waits for the disk. Changes go to a writer thread that commits them
//! in batches (one durable transaction per batch, so a burst of writes costs one `fsync`).
//! When the writer falls [`QUEUE`] changes behind, new records are refused (their writer hears
//! so, and the write counts one replica fewer) rather than queued without bound or waited for.
//! Dropping the [`Disk`] commits what is queued and closes the database, so a node that stops,
//! gracefully or by its task being aborted, leaves every record it accepted on disk.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, UNIX_EPOCH},
};

use libp2p::{
    Multiaddr, PeerId,
    kad::{ProviderRecord, Record, RecordKey},
};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use super::record::{deadline_of, unix_ms, wall_clock_of};

/// The file name of the record store inside a data directory.
pub(crate) const FILE_NAME: &str = "store.redb";

/// Changes queued for the writer thread before new records are refused.
pub(crate) const QUEUE: usize = 16_384;
/// Changes that must not be lost to a full queue (removals, provider records) may go this far
/// beyond it; past that, they are dropped and logged.
const HARD_LIMIT: usize = 2 * QUEUE;
/// The most changes one transaction commits.
const BATCH: usize = 4096;

const RECORDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("records");
const PROVIDERS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("providers");

/// Why the record store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database file is damaged. It is left as it is, for inspection or repair.
    #[error("the record store {path} is corrupt ({reason}); move it away to start empty")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        reason: String,
    },
    /// The database could not be opened or read.
    #[error("cannot open the record store {path}: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// What a record looks like on disk.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    #[serde(rename = "p", default, with = "serde_bytes")]
    publisher: Option<Vec<u8>>,
    #[serde(rename = "v", with = "serde_bytes")]
    value: Vec<u8>,
}

/// What a provider record looks like on disk.
#[derive(Serialize, Deserialize)]
struct StoredProvider {
    #[serde(rename = "k", with = "serde_bytes")]
    key: Vec<u8>,
    #[serde(rename = "p", with = "serde_bytes")]
    provider: Vec<u8>,
    /// Expiry in milliseconds since the Unix epoch.
    #[serde(rename = "e", default)]
    expires_ms: Option<u64>,
    #[serde(rename = "a", default)]
    addresses: Vec<serde_bytes::ByteBuf>,
}

enum Op {
    PutRecord(Vec<u8>, Vec<u8>),
    RemoveRecord(Vec<u8>),
    PutProvider(Vec<u8>, Vec<u8>),
    RemoveProvider(Vec<u8>),
}

/// What was on disk when the store opened.
#[derive(Default)]
pub(crate) struct Loaded {
    pub(crate) records: Vec<Record>,
    pub(crate) providers: Vec<ProviderRecord>,
    /// Entries that could not be decoded: reported, and left on disk untouched.
    pub(crate) undecodable: usize,
}

/// The changes waiting for the writer, shared with it.
#[derive(Default)]
struct Queue {
    ops: VecDeque<Op>,
    /// The handle was dropped: the writer commits what is left and ends.
    closed: bool,
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// The handle of the writer thread.
pub(crate) struct Disk {
    queue: Shared,
    writer: Option<thread::JoinHandle<()>>,
}

/// The disk writer is [`QUEUE`] changes behind: a new record cannot be queued.
#[derive(Debug)]
pub(crate) struct Behind;

fn provider_key(key: &RecordKey, provider: &PeerId) -> Vec<u8> {
    let key = key.as_ref();
    let mut out = Vec::with_capacity(2 + key.len() + 40);
    out.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&provider.to_bytes());
    out
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("encoding into a Vec cannot fail");
    out
}

fn classify(path: &Path, e: impl std::fmt::Display) -> OpenError {
    let reason = e.to_string();
    let lower = reason.to_ascii_lowercase();
    if lower.contains("corrupt") || lower.contains("not a redb database") {
        OpenError::Corrupt {
            path: path.to_owned(),
            reason,
        }
    } else {
        OpenError::Open {
            path: path.to_owned(),
            reason,
        }
    }
}

impl Disk {
    /// Opens (or creates) the store in `dir` and reads everything in it.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Loaded), OpenError> {
        let path = dir.join(FILE_NAME);
        std::fs::create_dir_all(dir).map_err(|e| classify(&path, e))?;
        let db = redb::Database::create(&path).map_err(|e| classify(&path, e))?;
        let txn = db.begin_write().map_err(|e| classify(&path, e))?;
        txn.open_table(RECORDS).map_err(|e| classify(&path, e))?;
        txn.open_table(PROVIDERS).map_err(|e| classify(&path, e))?;
        txn.commit().map_err(|e| classify(&path, e))?;

        let mut loaded = Loaded::default();
        let read = db.begin_read().map_err(|e| classify(&path, e))?;
        let records = read.open_table(RECORDS).map_err(|e| classify(&path, e))?;
        for row in records.iter().map_err(|e| classify(&path, e))? {
            let (key, value) = row.map_err(|e| classify(&path, e))?;
            match ciborium::from_reader::<StoredRecord, _>(value.value()) {
                Ok(stored) => loaded.records.push(Record {
                    key: RecordKey::new(&key.value()),
                    value: stored.value,
                    publisher: stored.publisher.and_then(|p| PeerId::from_bytes(&p).ok()),
                    expires: None,
                }),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "undecodable record on disk, left in place: {e}");
                    loaded.undecodable += 1;
                }
            }
        }
        let providers = read.open_table(PROVIDERS).map_err(|e| classify(&path, e))?;
        for row in providers.iter().map_err(|e| classify(&path, e))? {
            let (_, value) = row.map_err(|e| classify(&path, e))?;
            let decoded = ciborium::from_reader::<StoredProvider, _>(value.value())
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    Ok(ProviderRecord {
                        key: RecordKey::new(&p.key),
                        provider: PeerId::from_bytes(&p.provider).map_err(|e| e.to_string())?,
                        expires: p
                            .expires_ms
                            .and_then(|ms| deadline_of(UNIX_EPOCH + Duration::from_millis(ms))),
                        addresses: p
                            .addresses
                            .into_iter()
                            .filter_map(|a| Multiaddr::try_from(a.into_vec()).ok())
                            .collect(),
                    })
                });
            match decoded {
                Ok(record) => loaded.providers.push(record),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "undecodable provider record on disk, left in place: {e}");
                    loaded.undecodable += 1;
                }
            }
        }
        drop(records);
        drop(providers);
        drop(read);

        let queue: Shared = Arc::default();
        let shared = queue.clone();
        let writer = thread::Builder::new()
            .name("micromesh-store".into())
            .spawn(move || write_loop(&db, &path, &shared))
            .map_err(|e| OpenError::Open {
                path: dir.join(FILE_NAME),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok((
            Self {
                queue,
                writer: Some(writer),
            },
            loaded,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `op` if fewer than `limit` changes wait. Never waits for the writer.
    fn send(&self, op: Op, limit: usize) -> Result<(), Behind> {
        let mut queue = self.lock();
        if queue.ops.len() >= limit {
            return Err(Behind);
        }
        queue.ops.push_back(op);
        drop(queue);
        self.queue.1.notify_one();
        Ok(())
    }

    /// Queues a change that must not be refused: a removal, a provider record.
    fn send_soon(&self, op: Op) {
        if self.send(op, HARD_LIMIT).is_err() {
            tracing::warn!(
                "the record store's disk is {HARD_LIMIT} changes behind; a change was not saved"
            );
        }
    }

    /// Whether a new record can be queued now.
    pub(crate) fn has_room(&self) -> bool {
        self.lock().ops.len() < QUEUE
    }

    /// Queues a record for the disk, or says the disk is too far behind to take it.
    pub(crate) fn put_record(&self, record: &Record) -> Result<(), Behind> {
        let stored = StoredRecord {
            publisher: record.publisher.map(|p| p.to_bytes()),
            value: record.value.clone(),
        };
        self.send(Op::PutRecord(record.key.to_vec(), encode(&stored)), QUEUE)
    }

    pub(crate) fn remove_record(&self, key: &RecordKey) {
        self.send_soon(Op::RemoveRecord(key.to_vec()));
    }

    pub(crate) fn put_provider(&self, record: &ProviderRecord) {
        let stored = StoredProvider {
            key: record.key.to_vec(),
            provider: record.provider.to_bytes(),
            expires_ms: record.expires.map(|at| unix_ms(wall_clock_of(at))),
            addresses: record
                .addresses
                .iter()
                .map(|a| serde_bytes::ByteBuf::from(a.to_vec()))
                .collect(),
        };
        self.send_soon(Op::PutProvider(
            provider_key(&record.key, &record.provider),
            encode(&stored),
        ));
    }

    pub(crate) fn remove_provider(&self, key: &RecordKey, provider: &PeerId) {
        self.send_soon(Op::RemoveProvider(provider_key(key, provider)));
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.queue.1.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Commits the queued changes in batches until the handle is dropped and nothing is left.
fn write_loop(db: &redb::Database, path: &Path, shared: &Shared) {
    let (queue, ready) = &**shared;
    loop {
        let batch: Vec<Op> = {
            let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
            while queue.ops.is_empty() && !queue.closed {
                queue = ready.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            if queue.ops.is_empty() {
                return;
            }
            let n = queue.ops.len().min(BATCH);
            queue.ops.drain(..n).collect()
        };
        if let Err(e) = apply(db, &batch) {
            tracing::error!(path = %path.display(), "record store write failed: {e}");
        }
    }
}

fn apply(db: &redb::Database, batch: &[Op]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut records = txn.open_table(RECORDS)?;
        let mut providers = txn.open_table(PROVIDERS)?;
        for op in batch {
            match op {
                Op::PutRecord(k, v) => {
                    records.insert(k.as_slice(), v.as_slice())?;
                }
                Op::RemoveRecord(k) => {
                    records.remove(k.as_slice())?;
                }
                Op::PutProvider(k, v) => {
                    providers.insert(k.as_slice(), v.as_slice())?;
                }
                Op::RemoveProvider(k) => {
                    providers.remove(k.as_slice())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}
