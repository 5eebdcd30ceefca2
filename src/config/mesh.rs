//! The mesh layer: configuration values that authorised peers set for every node.
//!
//! A value is a record of the store's reserved table, signed by its writer and versioned like
//! every record; its change travels in a gossip message that carries the same signed record,
//! so every receiver checks it exactly as a record holder would. The wire format is in
//! `protocols/config.md`.

use std::{
    cmp::Ordering,
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{Error, Inner, MeshValue, Weak, check_path};
use crate::{
    auth::Auth,
    node::{Node, WeakNode, gossip::Validation},
    store::{
        Store,
        record::{self, Checked},
    },
};

/// The database of the configuration's reserved table: `_micromesh`.
pub const MESH_DATABASE: &str = crate::store::CONFIG_DATABASE;
/// The configuration's reserved table, `config`: one record per path set in the mesh.
pub const MESH_TABLE: &str = crate::store::CONFIG_TABLE;
/// The gossip topic that carries changes of the mesh layer (reserved: users cannot subscribe).
pub const MESH_TOPIC: &str = "_config";
/// The largest value the mesh layer takes, as JSON: 64 KiB.
pub const MAX_MESH_VALUE: usize = 64 * 1024;

/// The name of the file, in the node's data directory, that keeps the last known mesh values.
const CACHE_FILE: &str = "config-mesh.json";
/// How often a node fetches the whole mesh layer from the store, besides when it joins.
const CATCH_UP_EVERY: Duration = Duration::from_secs(300);
/// How long a writer waits for a peer subscribed to [`MESH_TOPIC`] before announcing a change
/// (a client that just joined has not heard its peers' subscriptions yet).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(2);

/// A change as gossiped: the path, and the record as the store holds it.
#[derive(Serialize, Deserialize)]
struct Announcement {
    #[serde(rename = "p")]
    path: String,
    #[serde(rename = "r", with = "serde_bytes")]
    record: Vec<u8>,
}

impl Announcement {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(self, &mut bytes).expect("writing to a Vec cannot fail");
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > record::MAX_RECORD + super::MAX_PATH + 64 {
            return Err(format!("{} bytes is too large", bytes.len()));
        }
        ciborium::from_reader(bytes).map_err(|e| format!("malformed: {e}"))
    }
}

/// A value the mesh layer holds: the checked record, its value and its signed bytes.
#[derive(Clone, Debug)]
struct Known {
    checked: Checked,
    value: Option<serde_json::Value>,
    record: Vec<u8>,
}

/// Checks a record of `path` as every node does: decoding, signature, place, size, the value
/// being JSON, and the writer being allowed `config:<path>` by this node's rules.
fn check(network: &str, auth: &Auth, path: &str, bytes: &[u8]) -> Result<Known, Error> {
    let refused = |writer: String, reason: String| Error::Refused {
        path: path.into(),
        writer,
        reason,
    };
    check_path(path).map_err(|e| refused("?".into(), e.to_string()))?;
    let dht_key = record::record_key(MESH_DATABASE, MESH_TABLE, path);
    let (checked, value) = record::check_record(network, &dht_key, bytes, SystemTime::now())
        .map_err(|e| refused("?".into(), e.to_string()))?;
    let writer = checked.writer.to_string();
    crate::store::authorize_writer(auth, &checked)
        .map_err(|reason| refused(writer.clone(), reason))?;
    let value = if checked.header.deleted {
        None
    } else {
        if value.len() > MAX_MESH_VALUE {
            return Err(refused(
                writer,
                format!("a value is at most {MAX_MESH_VALUE} bytes"),
            ));
        }
        Some(
            serde_json::from_slice(&value)
                .map_err(|e| refused(writer, format!("the value is not JSON: {e}")))?,
        )
    };
    Ok(Known {
        checked,
        value,
        record: bytes.to_vec(),
    })
}

/// A node's mesh layer.
pub(super) struct Link {
    node: WeakNode,
    store: Store,
    network: String,
    auth: Auth,
    known: Mutex<BTreeMap<String, Known>>,
    cache: Option<PathBuf>,
}

impl Link {
    pub(super) fn new(node: &Node, store: Store, data_dir: Option<&Path>) -> Self {
        Self {
            node: node.downgrade(),
            store,
            network: node.network().to_owned(),
            auth: node.auth().clone(),
            known: Mutex::new(BTreeMap::new()),
            cache: data_dir.map(|dir| dir.join(CACHE_FILE)),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the last known values, listens for changes and starts catching up.
    pub(super) async fn start(&self, inner: &Arc<Inner>, node: &Node) {
        self.load(inner);
        let (network, auth) = (self.network.clone(), self.auth.clone());
        let validator: crate::node::gossip::Validator = Arc::new(move |message| {
            let verdict = Announcement::decode(&message.data)
                .map_err(|reason| Error::Refused {
                    path: String::new(),
                    writer: message.source.to_string(),
                    reason,
                })
                .and_then(|a| check(&network, &auth, &a.path, &a.record));
            match verdict {
                Ok(_) => Validation::Accept,
                Err(e) => {
                    tracing::debug!("configuration change refused: {e}");
                    Validation::Reject
                }
            }
        });
        let subscription = match node.subscribe_unchecked(MESH_TOPIC).await {
            Ok(subscription) => subscription,
            Err(e) => {
                tracing::warn!("the configuration's mesh layer cannot hear changes: {e}");
                return;
            }
        };
        if let Err(e) = node.set_validator(MESH_TOPIC, Some(validator)).await {
            tracing::warn!("the configuration's mesh layer cannot check changes: {e}");
        }
        let weak = Weak(Arc::downgrade(inner));
        node.spawn_task("config", hear_changes(subscription, weak.clone()));
        node.spawn_task("config", catch_up(node.downgrade(), weak));
    }

    /// Takes a record of `path` if it passes the checks and is newer than the one held.
    /// Returns whether it changed the layer, and the record's version.
    fn accept(&self, inner: &Inner, path: &str, bytes: &[u8]) -> Result<(bool, u64), Error> {
        let incoming = check(&self.network, &self.auth, path, bytes)?;
        let version = incoming.checked.header.revision;
        let mut known = self.known();
        if let Some(held) = known.get(path)
            && incoming.checked.precedence(&held.checked) != Ordering::Greater
        {
            return Ok((false, version));
        }
        tracing::debug!(path, version, writer = %incoming.checked.writer, "mesh configuration changed");
        known.insert(path.to_owned(), incoming);
        let mut tree = serde_json::Map::new();
        for (path, held) in known.iter() {
            if let Some(value) = &held.value {
                super::insert(&mut tree, path, value)?;
            }
        }
        inner.replace_mesh(super::from_json(&tree));
        self.save(&known);
        Ok((true, version))
    }

    /// Writes (or, with `None`, deletes) `path` in the store, applies it here and announces it.
    pub(super) async fn set(
        &self,
        inner: &Inner,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<u64, Error> {
        if let Some(json) = &json
            && json.len() > MAX_MESH_VALUE
        {
            return Err(Error::InvalidValue {
                path: path.into(),
                reason: format!(
                    "{} bytes of JSON; the mesh takes at most {MAX_MESH_VALUE}",
                    json.len()
                ),
            });
        }
        self.auth
            .authorize_self(&[crate::auth::Resource::config(path)])
            .map_err(|denied| Error::Forbidden {
                path: path.into(),
                reason: denied.reason,
            })?;
        let record = self
            .store
            .write_signed(path, json)
            .await
            .map_err(|e| match e {
                crate::store::Error::Forbidden { reason, .. } => Error::Forbidden {
                    path: path.into(),
                    reason,
                },
                other => Error::Store(other.to_string()),
            })?;
        let (_, version) = self.accept(inner, path, &record)?;
        if let Some(node) = self.node.upgrade() {
            announce(&node, path, record).await;
        }
        Ok(version)
    }

    /// Reads every path of the table (and every path held, whose deletion the table's index
    /// no longer lists) and takes what is newer. Returns how many values changed.
    pub(super) async fn sync(&self, inner: &Inner) -> Result<usize, Error> {
        let listed = self
            .store
            .list(crate::store::ListOptions::new())
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        let mut paths: Vec<String> = self.known().keys().cloned().collect();
        paths.extend(listed);
        paths.sort();
        paths.dedup();
        let mut changed = 0;
        for path in paths {
            let record = match self.store.read_signed(&path).await {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(path, "mesh configuration not read: {e}");
                    continue;
                }
            };
            match self.accept(inner, &path, &record) {
                Ok((true, _)) => changed += 1,
                Ok((false, _)) => {}
                Err(e) => inner.report(e),
            }
        }
        Ok(changed)
    }

    pub(super) fn values(&self) -> Vec<MeshValue> {
        self.known()
            .iter()
            .filter_map(|(path, held)| {
                Some(MeshValue {
                    path: path.clone(),
                    value: held.value.clone()?,
                    version: held.checked.header.revision,
                    writer: held.checked.writer,
                })
            })
            .collect()
    }

    /// Loads the values kept in the data directory; each is checked again.
    fn load(&self, inner: &Inner) {
        let Some(file) = &self.cache else {
            return;
        };
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                inner.report(Error::File {
                    path: file.clone(),
                    reason: e.to_string(),
                });
                return;
            }
        };
        let saved: BTreeMap<String, String> = match serde_json::from_str(&text) {
            Ok(saved) => saved,
            Err(e) => {
                inner.report(Error::File {
                    path: file.clone(),
                    reason: format!("not the mesh configuration's cache: {e}"),
                });
                return;
            }
        };
        for (path, encoded) in saved {
            let record = match data_encoding::BASE64.decode(encoded.as_bytes()) {
                Ok(record) => record,
                Err(e) => {
                    inner.report(Error::File {
                        path: file.clone(),
                        reason: format!("{path}: {e}"),
                    });
                    continue;
                }
            };
            if let Err(e) = self.accept(inner, &path, &record) {
                inner.report(e);
            }
        }
    }

    /// Keeps the values in the data directory (written whole, then renamed into place).
    fn save(&self, known: &BTreeMap<String, Known>) {
        let Some(file) = &self.cache else {
            return;
        };
        let saved: BTreeMap<&str, String> = known
            .iter()
            .map(|(path, held)| (path.as_str(), data_encoding::BASE64.encode(&held.record)))
            .collect();
        let text = serde_json::to_string_pretty(&saved).expect("strings serialise");
        let temporary = file.with_extension("json.new");
        let written =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, file));
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), "cannot keep the mesh configuration: {e}");
        }
    }
}

/// Announces a change to the peers subscribed to [`MESH_TOPIC`]; with none yet, waits a
/// little for them (peers that miss it catch up from the store).
async fn announce(node: &Node, path: &str, record: Vec<u8>) {
    let message = Announcement {
        path: path.to_owned(),
        record,
    }
    .encode();
    if node.connected_count() > 0 {
        let deadline = tokio::time::Instant::now() + ANNOUNCE_WAIT;
        while node
            .topic_peers(MESH_TOPIC)
            .await
            .is_ok_and(|p| p.is_empty())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    match node.publish_unchecked(MESH_TOPIC, message).await {
        Ok(_) => {}
        Err(e) => tracing::debug!(path, "configuration change not announced: {e}"),
    }
}

/// Takes the changes other nodes announce.
async fn hear_changes(mut subscription: crate::node::Subscription, config: Weak) {
    while let Some(message) = subscription.recv().await {
        let Some(config) = config.upgrade() else {
            return;
        };
        let Some(link) = config.inner.mesh.get() else {
            return;
        };
        let result = Announcement::decode(&message.data)
            .map_err(|reason| Error::Refused {
                path: String::new(),
                writer: message.source.to_string(),
                reason,
            })
            .and_then(|a| link.accept(&config.inner, &a.path, &a.record));
        if let Err(e) = result {
            config.inner.report(e);
        }
    }
}

/// Fetches the whole layer from the store once the node has a peer, and every
/// [`CATCH_UP_EVERY`] after.
async fn catch_up(node: WeakNode, config: Weak) {
    let Some(mut events) = node.upgrade().map(|n| n.events()) else {
        return;
    };
    loop {
        // Wait for a peer: a node alone has nothing to catch up with. Subscribed before the
        // count is read, so a connection in between is not missed.
        loop {
            match node.upgrade() {
                Some(node) if node.connected_count() > 0 => break,
                Some(node) => drop(node),
                None => return,
            }
            match events.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
        // Not at once: a short-lived client (a command-line tool) is gone before, and nodes that
        // start together spread their catch-ups.
        let pause = Duration::from_millis(rand::random_range(1_000..3_000));
        tokio::time::sleep(pause).await;
        // A node that just joined may not reach the records' holders yet: a few tries.
        for attempt in 1..=5 {
            let Some(config) = config.upgrade() else {
                return;
            };
            let Some(link) = config.inner.mesh.get() else {
                return;
            };
            match link.sync(&config.inner).await {
                Ok(changed) => {
                    if changed > 0 {
                        tracing::debug!(changed, "mesh configuration caught up");
                    }
                    break;
                }
                Err(e) => tracing::debug!(attempt, "mesh configuration not caught up: {e}"),
            }
            drop(config);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        tokio::time::sleep(CATCH_UP_EVERY).await;
        // Events queued meanwhile are old news.
        events = events.resubscribe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Identity, Metadata,
        store::record::{Header, VERSION, digest, encode_record, sign},
        test_vectors::{hex, vector_after},
    };

    const SPEC: &str = include_str!("../../protocols/config.md");
    const NET: &str = "default";

    fn auth(rules: &[&str]) -> Auth {
        let mut config = crate::auth::Config::new();
        for rule in rules {
            config = config.rule(rule.parse().unwrap());
        }
        Auth::new(Identity::generate().peer_id(), NET.into(), config).unwrap()
    }

    fn announcement() -> Vec<u8> {
        let writer = Identity::from_secret_bytes([7; 32]);
        let value = br#""hi""#;
        let header = Header {
            version: VERSION,
            database: MESH_DATABASE.into(),
            table: MESH_TABLE.into(),
            key: "greeter.greeting".into(),
            revision: 1_767_225_600_000_000,
            expires_ms: None,
            metadata: Metadata::new(),
            deleted: false,
            value_len: value.len() as u64,
            value_digest: digest(value),
        };
        let record = encode_record(&sign(&writer, NET, &header), value);
        Announcement {
            path: "greeter.greeting".into(),
            record,
        }
        .encode()
    }

    #[test]
    fn the_spec_vector_is_what_a_writer_announces_and_every_node_checks_it() {
        let vector = vector_after(SPEC, "Vector: announcement");
        assert_eq!(hex(&announcement()), hex(&vector));
        let decoded = Announcement::decode(&vector).unwrap();
        assert_eq!(decoded.path, "greeter.greeting");
        let known = check(NET, &auth(&[]), &decoded.path, &decoded.record).unwrap();
        assert_eq!(known.value, Some(serde_json::json!("hi")));
        assert_eq!(
            known.checked.writer,
            Identity::from_secret_bytes([7; 32]).peer_id()
        );

        // A node whose rules do not allow the writer refuses it.
        let denied = check(
            NET,
            &auth(&["deny config:greeter.* any"]),
            &decoded.path,
            &decoded.record,
        );
        assert!(matches!(denied, Err(Error::Refused { .. })), "{denied:?}");
        // Another path than the record's, another network: refused.
        assert!(check(NET, &auth(&[]), "greeter.other", &decoded.record).is_err());
        assert!(check("other", &auth(&[]), &decoded.path, &decoded.record).is_err());
        // Truncated or garbage bytes are an error, never a panic.
        for cut in 0..vector.len() {
            if let Ok(a) = Announcement::decode(&vector[..cut]) {
                assert!(check(NET, &auth(&[]), &a.path, &a.record).is_err());
            }
        }
    }
}
