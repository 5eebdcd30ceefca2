//! Config: layered, typed, watched configuration, with a layer that the mesh's authorised
//! peers set for every node.
//!
//! A [`Config`] merges its sources by precedence, each later one winning over the earlier for
//! the paths it sets:
//!
//! 1. **defaults** given in code ([`Builder::default_value`]);
//! 2. **files** in TOML, YAML or JSON ([`Builder::file`]), watched: an edit applies within a
//!    fraction of a second;
//! 3. **the environment**: `MICROMESH_NETWORK` sets `network`, `MICROMESH_AUTH__DEFAULT_POLICY`
//!    sets `auth.default_policy` (`__` nests; [`Builder::env`] picks the prefix), read once
//!    when the config is built;
//! 4. **overrides** given in code, e.g. from command-line flags ([`Builder::set`]);
//! 5. **the mesh**: values that peers set with [`Config::set_in_mesh`]. Each is a signed,
//!    versioned record in the store's reserved table ([`MESH_DATABASE`]/[`MESH_TABLE`]), the
//!    newest version wins everywhere, and a write needs the auth rules' leave for
//!    `config:<path>` on every node (the writer, the record's holders and every receiver). A
//!    change reaches every node of the mesh in a gossip message; a node that missed it catches
//!    up from the store, and a restarted node starts from the values it last knew (kept in its
//!    data directory), without a peer. Every [`Service`](crate::Service) attaches its config
//!    ([`Service::config`](crate::Service::config)) to the mesh.
//!
//! Paths are dot-separated keys, `auth.rules` or `greeter.greeting`. [`Config::get`] reads a
//! typed value and [`Config::scan`] the whole tree into a struct, with serde; text from files
//! and the environment converts to numbers and booleans where the type asks for one.
//! [`Config::watch`] is a stream of a path's new values: one per change of the value (a change
//! elsewhere, or a rewrite with the same value, makes none).
//!
//! **Bad input.** A file that does not parse (or is gone) keeps its last good contents, and a
//! mesh value that fails its checks is not taken: the error is logged, counted
//! ([`Config::errors`], and `micromesh_config_errors_total` on a service's metrics) and
//! reported to every watcher, whose stream goes on. A value of the wrong type for a watcher is
//! reported to that watcher, which keeps its last good value.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use micromesh::config::Config;
//!
//! let dir = tempfile::tempdir()?;
//! let file = dir.path().join("app.toml");
//! std::fs::write(&file, "[greeter]\ngreeting = \"hello\"\nretries = 3\n")?;
//!
//! let config = Config::builder()
//!     .default_value("greeter.retries", 1)?
//!     .default_value("greeter.punctuation", "!")?
//!     .file(&file)
//!     .set("greeter.greeting", "hi")?
//!     .build()?;
//! assert_eq!(config.get::<String>("greeter.greeting")?, "hi"); // the override wins
//! assert_eq!(config.get::<u32>("greeter.retries")?, 3); // the file beats the default
//! assert_eq!(config.get::<String>("greeter.punctuation")?, "!");
//! assert!(config.get::<u32>("greeter.missing").is_err());
//!
//! #[derive(serde::Deserialize)]
//! struct Greeter { greeting: String, retries: u32 }
//! let greeter: Greeter = config.get("greeter")?;
//! assert_eq!((greeter.greeting.as_str(), greeter.retries), ("hi", 3));
//! # Ok(()) }
//! ```

mod files;
mod mesh;
mod settings;

use std::{
    fmt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use ::config as layered;
use futures::{Stream, StreamExt as _, stream::BoxStream};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::watch;

pub(crate) use self::settings::follow_auth;
pub use self::{
    mesh::{MAX_MESH_VALUE, MESH_DATABASE, MESH_TABLE, MESH_TOPIC},
    settings::{AuthSettings, Settings},
};

/// The environment prefix of [`Builder::env`] by default: `MICROMESH_`.
pub const ENV_PREFIX: &str = "MICROMESH";
/// The longest path, in bytes.
pub const MAX_PATH: usize = 256;

/// Errors of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file cannot be read or does not parse. The file keeps its last good contents.
    #[error("config file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Nothing is set at the path.
    #[error("{path:?} is not set in the configuration")]
    Missing {
        /// The path.
        path: String,
    },
    /// The value at the path is not of the type asked for.
    #[error("{path:?} has the wrong type: {reason}")]
    Type {
        /// The path.
        path: String,
        /// What does not fit.
        reason: String,
    },
    /// A path is not acceptable: 1 to [`MAX_PATH`] bytes of dot-separated keys of
    /// `A-Z a-z 0-9 _ -`.
    #[error("invalid config path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A value cannot be represented (it does not serialise, or is larger than
    /// [`MAX_MESH_VALUE`] for the mesh).
    #[error("invalid value for {path:?}: {reason}")]
    InvalidValue {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// This node's auth rules do not allow setting the path in the mesh (`config:<path>`).
    /// Nothing was written. As a status: 403.
    #[error("setting {path:?} in the mesh is not allowed: {reason}")]
    Forbidden {
        /// The path.
        path: String,
        /// The rule or default policy that denied it.
        reason: String,
    },
    /// A value from the mesh was not taken: bad signature or encoding, or its writer is not
    /// allowed to set the path here.
    #[error("a mesh value of {path:?} from {writer} was refused: {reason}")]
    Refused {
        /// The path (empty when the message did not decode far enough to name one).
        path: String,
        /// The peer that wrote (or sent) it.
        writer: String,
        /// Why.
        reason: String,
    },
    /// The configuration has no mesh layer: it belongs to no running service.
    #[error("this configuration is not attached to a service's node, so it has no mesh layer")]
    NoMesh,
    /// The configuration is already the mesh layer of another service.
    #[error("this configuration is already attached to a service's node")]
    AlreadyAttached,
    /// Writing to or reading from the mesh's store failed.
    #[error("the mesh's store: {0}")]
    Store(String),
}

impl Error {
    /// The error as a [`Status`](crate::Status): 403 for [`Error::Forbidden`], 404 for
    /// [`Error::Missing`], 400 for bad paths and values, 500 otherwise.
    pub fn status(&self) -> crate::Status {
        use crate::status::Code;
        let code = match self {
            Self::Forbidden { .. } => Code::Forbidden,
            Self::Missing { .. } => Code::NotFound,
            Self::InvalidPath { .. } | Self::InvalidValue { .. } | Self::Type { .. } => {
                Code::BadRequest
            }
            _ => Code::Internal,
        };
        crate::Status::new(code, self.to_string())
    }
}

/// Checks a path: dot-separated keys of `A-Z a-z 0-9 _ -`, at most [`MAX_PATH`] bytes.
///
/// ```
/// use micromesh::config::check_path;
/// assert!(check_path("auth.rules").is_ok());
/// assert!(check_path("greeter..greeting").is_err());
/// assert!(check_path("a b").is_err());
/// ```
///
/// # Errors
///
/// [`Error::InvalidPath`] naming what is wrong.
pub fn check_path(path: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Error::InvalidPath {
        path: path.chars().take(MAX_PATH).collect(),
        reason: reason.into(),
    };
    if path.is_empty() {
        return Err(invalid("a path cannot be empty"));
    }
    if path.len() > MAX_PATH {
        return Err(invalid("a path is at most 256 bytes"));
    }
    for key in path.split('.') {
        if key.is_empty() {
            return Err(invalid("a path is keys separated by single dots"));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid("a key is made of A-Z a-z 0-9 _ -"));
        }
    }
    Ok(())
}

/// The parsed sources, each kept at its last good contents.
struct Layers {
    defaults: layered::Config,
    files: Vec<files::FileLayer>,
    env: layered::Config,
    overrides: layered::Config,
    mesh: layered::Config,
}

impl Layers {
    /// Merges the layers by precedence.
    fn merge(&self) -> Result<layered::Config, layered::ConfigError> {
        let mut builder = layered::Config::builder().add_source(self.defaults.clone());
        for file in &self.files {
            builder = builder.add_source(file.contents.clone());
        }
        builder
            .add_source(self.env.clone())
            .add_source(self.overrides.clone())
            .add_source(self.mesh.clone())
            .build()
    }
}

/// The merged configuration at one moment, and the last error of any source.
#[derive(Clone)]
struct Snapshot {
    merged: layered::Config,
    /// The merged tree as JSON: what watchers compare.
    tree: serde_json::Value,
    /// The last error any source reported, numbered: watchers report each number once.
    error: Option<(u64, Error)>,
}

impl Snapshot {
    fn at(&self, path: &str) -> Option<&serde_json::Value> {
        path.split('.')
            .try_fold(&self.tree, |node, key| node.as_object()?.get(key))
    }
}

struct Inner {
    layers: Mutex<Layers>,
    state: watch::Sender<Arc<Snapshot>>,
    errors: prometheus_client::metrics::counter::Counter,
    error_seq: AtomicU64,
    /// Keeps the file watcher running; dropped with the config.
    watcher: Mutex<Option<files::Watcher>>,
    /// The mesh layer, once a service's node carries it.
    mesh: OnceLock<mesh::Link>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Layers> {
        self.layers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the mesh layer and publishes the new merge.
    fn replace_mesh(&self, contents: layered::Config) {
        let mut layers = self.lock();
        layers.mesh = contents;
        self.publish(&layers);
    }

    fn replace_file(&self, index: usize, contents: layered::Config) {
        let mut layers = self.lock();
        layers.files[index].contents = contents;
        self.publish(&layers);
    }

    /// Merges and publishes, while the layers are locked (so snapshots go out in order).
    fn publish(&self, layers: &Layers) {
        match snapshot_of(layers) {
            Ok((merged, tree)) => {
                self.state.send_modify(|state| {
                    *state = Arc::new(Snapshot {
                        merged,
                        tree,
                        error: state.error.clone(),
                    });
                });
            }
            Err(e) => self.report(Error::Type {
                path: String::new(),
                reason: format!("the sources do not merge: {e}"),
            }),
        }
    }

    /// Logs, counts and reports an error of a source to every watcher.
    fn report(&self, error: Error) {
        tracing::warn!("configuration: {error}; the last good configuration stays");
        self.errors.inc();
        let seq = self.error_seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.state.send_modify(|state| {
            let mut next = Snapshot::clone(state);
            next.error = Some((seq, error));
            *state = Arc::new(next);
        });
    }
}

fn snapshot_of(layers: &Layers) -> Result<(layered::Config, serde_json::Value), String> {
    let merged = layers.merge().map_err(|e| e.to_string())?;
    let tree = merged
        .clone()
        .try_deserialize::<serde_json::Value>()
        .map_err(|e| e.to_string())?;
    Ok((merged, tree))
}

/// A layered configuration. Cheap to clone: clones share the sources and the watchers.
///
/// Made by [`Config::builder`]; see the [module docs](self).
#[derive(Clone)]
pub struct Config {
    inner: Arc<Inner>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("files", &self.files())
            .field("mesh", &self.inner.mesh.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    /// A configuration with no sources yet but the mesh (once a service carries it).
    fn default() -> Self {
        Builder::default()
            .build()
            .expect("a configuration without files always builds")
    }
}

impl Config {
    /// A builder of a configuration's sources.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.state.borrow().clone()
    }

    /// The value at `path`, as `T`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPath`], [`Error::Missing`] when nothing is set there, [`Error::Type`]
    /// when the value is not a `T`.
    ///
    /// ```
    /// # fn main() -> Result<(), micromesh::config::Error> {
    /// let config = micromesh::config::Config::builder().set("limits.connections", 200)?.build()?;
    /// assert_eq!(config.get::<u32>("limits.connections")?, 200);
    /// assert_eq!(config.get::<String>("limits.connections")?, "200");
    /// assert!(matches!(
    ///     config.get::<Vec<u32>>("limits.connections"),
    ///     Err(micromesh::config::Error::Type { .. })
    /// ));
    /// # Ok(()) }
    /// ```
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        check_path(path)?;
        get_from(&self.snapshot().merged, path)
    }

    /// The value at `path` as `T`, or `None` when nothing is set there.
    ///
    /// # Errors
    ///
    /// As [`Config::get`], but for [`Error::Missing`].
    ///
    /// ```
    /// # fn main() -> Result<(), micromesh::config::Error> {
    /// let config = micromesh::config::Config::builder().set("retries", 3)?.build()?;
    /// assert_eq!(config.get_opt::<u32>("retries")?, Some(3));
    /// assert_eq!(config.get_opt::<u32>("timeout")?, None);
    /// # Ok(()) }
    /// ```
    pub fn get_opt<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, Error> {
        match self.get(path) {
            Ok(value) => Ok(Some(value)),
            Err(Error::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The value at `path` as JSON, if anything is set there.
    ///
    /// ```
    /// # fn main() -> Result<(), micromesh::config::Error> {
    /// let config = micromesh::config::Config::builder().set("auth.rules", ["deny service:x any"])?.build()?;
    /// assert_eq!(config.value("auth"), Some(serde_json::json!({ "rules": ["deny service:x any"] })));
    /// assert_eq!(config.value("auth.trust"), None);
    /// # Ok(()) }
    /// ```
    pub fn value(&self, path: &str) -> Option<serde_json::Value> {
        self.snapshot().at(path).cloned()
    }

    /// The whole configuration as JSON.
    pub fn tree(&self) -> serde_json::Value {
        self.snapshot().tree.clone()
    }

    /// The whole configuration, as `T`.
    ///
    /// # Errors
    ///
    /// [`Error::Type`] when it does not fit `T`.
    pub fn scan<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.scan_reporting_unknown().map(|(value, _)| value)
    }

    /// The whole configuration as `T`, and the paths `T` has no place for (misspelt keys, or
    /// keys meant for someone else).
    ///
    /// # Errors
    ///
    /// [`Error::Type`] when it does not fit `T`.
    ///
    /// ```
    /// # fn main() -> Result<(), micromesh::config::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Limits { connections: u32 }
    /// #[derive(serde::Deserialize)]
    /// struct App { limits: Limits }
    /// let config = micromesh::config::Config::builder()
    ///     .set("limits.connections", 10)?
    ///     .set("limits.conections", 20)?
    ///     .build()?;
    /// let (app, unknown) = config.scan_reporting_unknown::<App>()?;
    /// assert_eq!(app.limits.connections, 10);
    /// assert_eq!(unknown, ["limits.conections"]);
    /// # Ok(()) }
    /// ```
    pub fn scan_reporting_unknown<T: DeserializeOwned>(&self) -> Result<(T, Vec<String>), Error> {
        let merged = self.snapshot().merged.clone();
        let mut unknown = Vec::new();
        let value = serde_ignored::deserialize(merged, |path| unknown.push(path.to_string()))
            .map_err(|e: layered::ConfigError| Error::Type {
                path: String::new(),
                reason: e.to_string(),
            })?;
        Ok((value, unknown))
    }

    /// A stream of the new values at `path`: one item each time the value there changes
    /// (whichever source changed it), an [`Error::Missing`] item when it goes, and an error
    /// item for each error of a source or a new value that is not a `T` (the stream goes on).
    ///
    /// The stream holds no sources: it ends when every clone of the config is dropped.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt as _;
    /// let dir = tempfile::tempdir()?;
    /// let file = dir.path().join("app.yaml");
    /// std::fs::write(&file, "greeting: hello\n")?;
    /// let config = micromesh::config::Config::builder().file(&file).build()?;
    /// let mut greetings = config.watch::<String>("greeting");
    /// std::fs::write(&file, "greeting: bonjour\n")?;
    /// let next = tokio::time::timeout(std::time::Duration::from_secs(5), greetings.next()).await?;
    /// assert_eq!(next.expect("config alive")?, "bonjour");
    /// # Ok(()) }
    /// ```
    pub fn watch<T: DeserializeOwned + Send + 'static>(&self, path: &str) -> Watch<T> {
        if let Err(e) = check_path(path) {
            return Watch {
                stream: futures::stream::once(async move { Err(e) }).boxed(),
            };
        }
        let mut receiver = self.inner.state.subscribe();
        let start = receiver.borrow_and_update().clone();
        let state = WatchState {
            last_value: start.at(path).cloned(),
            last_error: start.error.as_ref().map_or(0, |(seq, _)| *seq),
            path: path.to_owned(),
            receiver,
            queue: std::collections::VecDeque::new(),
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(item) = state.queue.pop_front() {
                    return Some((item, state));
                }
                if state.receiver.changed().await.is_err() {
                    return None;
                }
                let snapshot = state.receiver.borrow_and_update().clone();
                state.step(&snapshot);
            }
        });
        Watch {
            stream: stream.boxed(),
        }
    }

    /// How many errors the sources reported (files that did not parse, mesh values refused).
    pub fn errors(&self) -> u64 {
        self.inner.errors.get()
    }

    /// The files read, in precedence order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.inner
            .lock()
            .files
            .iter()
            .map(|f| f.path.clone())
            .collect()
    }

    /// Sets `path` to `value` for every node of the mesh: writes it as a signed record to the
    /// store's configuration table and announces it to every node, whose watchers see it
    /// within a second or so. Returns the version written.
    ///
    /// # Errors
    ///
    /// [`Error::Forbidden`] when this node's rules do not allow `config:<path>` (nothing is
    /// written), [`Error::InvalidPath`], [`Error::InvalidValue`] above [`MAX_MESH_VALUE`]
    /// bytes of JSON, [`Error::Store`] when the store does not take it (when other nodes'
    /// rules refuse it, for example), [`Error::NoMesh`] when no service carries this config.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use micromesh::{Service, node::Preset};
    /// let service = Service::builder("app").preset(Preset::Local).build().await?;
    /// service.config().set_in_mesh("app.greeting", &"hello").await?;
    /// assert_eq!(service.config().get::<String>("app.greeting")?, "hello");
    /// service.stop().await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_in_mesh<T: Serialize + ?Sized>(
        &self,
        path: &str,
        value: &T,
    ) -> Result<u64, Error> {
        check_path(path)?;
        let json = serde_json::to_vec(value).map_err(|e| Error::InvalidValue {
            path: path.into(),
            reason: e.to_string(),
        })?;
        self.link()?.set(&self.inner, path, Some(json)).await
    }

    /// Removes `path` from the mesh layer on every node (a tombstone that wins over older
    /// values); the other sources show through again.
    ///
    /// # Errors
    ///
    /// As [`Config::set_in_mesh`].
    pub async fn unset_in_mesh(&self, path: &str) -> Result<u64, Error> {
        check_path(path)?;
        self.link()?.set(&self.inner, path, None).await
    }

    /// The paths set in the mesh layer, with their values, versions and writers.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use micromesh::{Service, node::Preset};
    /// let service = Service::builder("app").preset(Preset::Local).build().await?;
    /// let config = service.config();
    /// let version = config.set_in_mesh("app.mode", &"maintenance").await?;
    /// let values = config.mesh_values();
    /// assert_eq!((values[0].path.as_str(), values[0].version), ("app.mode", version));
    /// assert_eq!(values[0].writer, service.peer_id());
    /// config.unset_in_mesh("app.mode").await?;
    /// assert!(config.mesh_values().is_empty());
    /// assert!(config.value("app.mode").is_none());
    /// service.stop().await?;
    /// # Ok(()) }
    /// ```
    pub fn mesh_values(&self) -> Vec<MeshValue> {
        self.inner
            .mesh
            .get()
            .map(mesh::Link::values)
            .unwrap_or_default()
    }

    /// Fetches the mesh's configuration from the store now, instead of waiting for the next
    /// periodic catch-up (a node does one when it joins, and every few minutes). Returns how
    /// many values changed.
    ///
    /// # Errors
    ///
    /// [`Error::NoMesh`], [`Error::Store`].
    pub async fn sync_mesh(&self) -> Result<usize, Error> {
        self.link()?.sync(&self.inner).await
    }

    fn link(&self) -> Result<&mesh::Link, Error> {
        self.inner.mesh.get().ok_or(Error::NoMesh)
    }

    /// Makes `node` carry this configuration's mesh layer (done by the service).
    pub(crate) async fn attach(
        &self,
        node: &crate::node::Node,
        store: crate::store::Store,
        data_dir: Option<&Path>,
    ) -> Result<(), Error> {
        let link = mesh::Link::new(node, store, data_dir);
        if self.inner.mesh.set(link).is_err() {
            return Err(Error::AlreadyAttached);
        }
        let link = self.inner.mesh.get().expect("just set");
        link.start(&self.inner, node).await;
        node.register_metrics("config", |registry| {
            registry.register(
                "errors",
                "Errors of the configuration's sources: files that did not parse, mesh values refused",
                self.inner.errors.clone(),
            );
        });
        Ok(())
    }

    fn downgrade(&self) -> Weak {
        Weak(Arc::downgrade(&self.inner))
    }
}

/// A configuration held weakly, by its background tasks.
#[derive(Clone)]
struct Weak(std::sync::Weak<Inner>);

impl Weak {
    fn upgrade(&self) -> Option<Config> {
        self.0.upgrade().map(|inner| Config { inner })
    }
}

/// A value of the mesh layer.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct MeshValue {
    /// The path.
    pub path: String,
    /// The value.
    pub value: serde_json::Value,
    /// Its version (microseconds since the Unix epoch on the writer's clock).
    pub version: u64,
    /// The peer that set it.
    pub writer: crate::PeerId,
}

fn get_from<T: DeserializeOwned>(merged: &layered::Config, path: &str) -> Result<T, Error> {
    merged.get::<T>(path).map_err(|e| match e {
        layered::ConfigError::NotFound(_) => Error::Missing { path: path.into() },
        other => Error::Type {
            path: path.into(),
            reason: other.to_string(),
        },
    })
}

/// What a [`Watch`] remembers between changes.
struct WatchState<T> {
    path: String,
    receiver: watch::Receiver<Arc<Snapshot>>,
    last_value: Option<serde_json::Value>,
    last_error: u64,
    queue: std::collections::VecDeque<Result<T, Error>>,
}

impl<T: DeserializeOwned> WatchState<T> {
    /// Queues what a new snapshot brings: a new error, and a new value at the path.
    fn step(&mut self, snapshot: &Snapshot) {
        if let Some((seq, error)) = &snapshot.error
            && *seq > self.last_error
        {
            self.last_error = *seq;
            self.queue.push_back(Err(error.clone()));
        }
        let value = snapshot.at(&self.path);
        if value != self.last_value.as_ref() {
            self.last_value = value.cloned();
            self.queue.push_back(match value {
                None => Err(Error::Missing {
                    path: self.path.clone(),
                }),
                Some(_) => get_from(&snapshot.merged, &self.path),
            });
        }
    }
}

/// The new values of one path of a [`Config`], from [`Config::watch`].
#[must_use = "streams do nothing unless polled"]
pub struct Watch<T> {
    stream: BoxStream<'static, Result<T, Error>>,
}

impl<T> fmt::Debug for Watch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl<T> Stream for Watch<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.poll_next_unpin(cx)
    }
}

/// The sources of a [`Config`]. Made by [`Config::builder`].
#[must_use = "a builder does nothing until `build` is called"]
#[derive(Debug, Default)]
pub struct Builder {
    defaults: serde_json::Map<String, serde_json::Value>,
    files: Vec<PathBuf>,
    env: Option<String>,
    env_vars: Option<Vec<(String, String)>>,
    list_keys: Vec<String>,
    overrides: serde_json::Map<String, serde_json::Value>,
}

impl Builder {
    /// Sets a default: the value of `path` when no other source sets it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPath`], or [`Error::InvalidValue`] when `value` does not serialise.
    pub fn default_value<T: Serialize>(mut self, path: &str, value: T) -> Result<Self, Error> {
        insert(&mut self.defaults, path, value)?;
        Ok(self)
    }

    /// Reads a file, TOML, YAML or JSON by its extension (`.toml`, `.yaml`/`.yml`, `.json`),
    /// and watches it. Later files win over earlier ones.
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.files.push(path.as_ref().to_path_buf());
        self
    }

    /// Reads the environment variables that start with `prefix` and `_`: `PREFIX_A__B` sets
    /// `a.b` (keys in lower case). A value converts to a number or boolean where the reader
    /// asks for one; the keys of [`Builder::env_list`] split on commas.
    pub fn env(mut self, prefix: &str) -> Self {
        self.env = Some(prefix.to_owned());
        self
    }

    /// As [`Builder::env`], with `vars` standing for the process's environment: for tests, or
    /// for a program that reads its variables from elsewhere.
    ///
    /// ```
    /// # fn main() -> Result<(), micromesh::config::Error> {
    /// let config = micromesh::config::Config::builder()
    ///     .env_vars("APP", [("APP_LIMITS__CONNECTIONS", "50"), ("APP_LISTEN", "a,b"), ("OTHER", "x")])
    ///     .build()?;
    /// assert_eq!(config.get::<u32>("limits.connections")?, 50);
    /// assert_eq!(config.get::<Vec<String>>("listen")?, ["a", "b"]);
    /// assert!(config.get_opt::<String>("other")?.is_none());
    /// # Ok(()) }
    /// ```
    pub fn env_vars<K: Into<String>, V: Into<String>>(
        mut self,
        prefix: &str,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env = Some(prefix.to_owned());
        self.env_vars = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Names paths whose environment values are comma-separated lists (the [`Settings`]
    /// lists are always: `listen`, `bootstrap`, `advertise`, `auth.trust`, `auth.rules`).
    pub fn env_list(mut self, path: &str) -> Self {
        self.list_keys.push(path.to_owned());
        self
    }

    /// Sets an override: wins over defaults, files and the environment (command-line flags).
    ///
    /// # Errors
    ///
    /// As [`Builder::default_value`].
    pub fn set<T: Serialize>(mut self, path: &str, value: T) -> Result<Self, Error> {
        insert(&mut self.overrides, path, value)?;
        Ok(self)
    }

    /// Reads the sources and starts watching the files.
    ///
    /// # Errors
    ///
    /// [`Error::File`] when a file cannot be read or does not parse: a configuration starts
    /// from good files only (later bad edits keep the last good contents).
    pub fn build(self) -> Result<Config, Error> {
        let mut files = Vec::with_capacity(self.files.len());
        for path in &self.files {
            files.push(files::FileLayer::read(path)?);
        }
        let env = match &self.env {
            Some(prefix) => {
                let mut environment = layered::Environment::with_prefix(prefix)
                    .prefix_separator("_")
                    .separator("__")
                    .list_separator(",")
                    .try_parsing(true)
                    .ignore_empty(true);
                if let Some(vars) = &self.env_vars {
                    environment = environment.source(Some(vars.iter().cloned().collect()));
                }
                for key in settings::LIST_KEYS
                    .iter()
                    .copied()
                    .chain(self.list_keys.iter().map(String::as_str))
                {
                    environment = environment.with_list_parse_key(key);
                }
                layered::Config::builder()
                    .add_source(environment)
                    .build()
                    .map_err(|e| Error::Type {
                        path: String::new(),
                        reason: format!("the environment: {e}"),
                    })?
            }
            None => layered::Config::default(),
        };
        let layers = Layers {
            defaults: from_json(&self.defaults),
            files,
            env,
            overrides: from_json(&self.overrides),
            mesh: layered::Config::default(),
        };
        let (merged, tree) = snapshot_of(&layers).map_err(|reason| Error::Type {
            path: String::new(),
            reason: format!("the sources do not merge: {reason}"),
        })?;
        let (state, _) = watch::channel(Arc::new(Snapshot {
            merged,
            tree,
            error: None,
        }));
        let watched: Vec<PathBuf> = layers.files.iter().map(|f| f.path.clone()).collect();
        let config = Config {
            inner: Arc::new(Inner {
                layers: Mutex::new(layers),
                state,
                errors: Default::default(),
                error_seq: AtomicU64::new(0),
                watcher: Mutex::new(None),
                mesh: OnceLock::new(),
            }),
        };
        if !watched.is_empty() {
            let watcher = files::Watcher::start(&watched, config.downgrade())?;
            *config
                .inner
                .watcher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(watcher);
        }
        Ok(config)
    }
}

/// Puts `value` at `path` in a JSON tree, making the tables on the way.
fn insert<T: Serialize>(
    tree: &mut serde_json::Map<String, serde_json::Value>,
    path: &str,
    value: T,
) -> Result<(), Error> {
    check_path(path)?;
    let value = serde_json::to_value(value).map_err(|e| Error::InvalidValue {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let mut keys = path.split('.').peekable();
    let mut node = tree;
    while let Some(key) = keys.next() {
        if keys.peek().is_none() {
            node.insert(key.to_owned(), value);
            return Ok(());
        }
        let next = node
            .entry(key.to_owned())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !next.is_object() {
            *next = serde_json::Value::Object(Default::default());
        }
        node = next.as_object_mut().expect("made an object just above");
    }
    Ok(())
}

/// A layer of a JSON tree (which always parses).
fn from_json(tree: &serde_json::Map<String, serde_json::Value>) -> layered::Config {
    let text = serde_json::Value::Object(tree.clone()).to_string();
    layered::Config::builder()
        .add_source(layered::File::from_str(&text, layered::FileFormat::Json))
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_source_wins_and_a_shorter_list_replaces_a_longer_one() {
        let config = Config::builder()
            .default_value("listen", ["a", "b", "c"])
            .unwrap()
            .default_value("auth.default_policy", "deny")
            .unwrap()
            .set("listen", ["x"])
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(config.get::<Vec<String>>("listen").unwrap(), ["x"]);
        assert_eq!(config.get::<String>("auth.default_policy").unwrap(), "deny");
    }

    #[test]
    fn paths_are_checked() {
        for bad in ["", ".", "a.", ".a", "a..b", "a b", "a/b", &"k".repeat(300)] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "a.b", "auth.default_policy", "x-y.Z_9"] {
            check_path(good).unwrap();
        }
    }
}
