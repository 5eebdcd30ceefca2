//! The crate-wide error: every module's error converts into it, so `?` works across components.

/// A boxed error from user code (hooks, handlers).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Any micromesh error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// From the node (transports, connections, DHT, gossip).
    #[error(transparent)]
    Node(#[from] crate::node::Error),
    /// The debug HTTP endpoint could not start.
    #[error(transparent)]
    Debug(#[from] crate::debug::Error),
    /// From the registry.
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    /// From the broker.
    #[error(transparent)]
    Broker(#[from] crate::broker::Error),
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// From a call.
    #[error(transparent)]
    Call(#[from] crate::client::Error),
    /// From the selector.
    #[error(transparent)]
    Selector(#[from] crate::selector::Error),
    /// From loading or storing the identity.
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    /// An auth configuration that cannot be used (a grant for another peer, too many grants).
    #[error(transparent)]
    Auth(#[from] crate::auth::Error),
    /// The configuration cannot be read, or does not fit the service's options.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The record store in the data directory could not be opened.
    #[error(transparent)]
    RecordStore(#[from] crate::store::OpenError),
    /// A lifecycle hook failed.
    #[error("the {stage} hook failed: {source}")]
    Hook {
        /// `before_start`, `after_start`, `before_stop` or `after_stop`.
        stage: &'static str,
        /// The hook's error.
        #[source]
        source: BoxError,
    },
    /// A graceful shutdown did not finish within its deadline; the node was stopped hard.
    #[error("the service did not stop within {0:?}; it was stopped without waiting further")]
    ShutdownTimeout(std::time::Duration),
    /// A file system or other I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the shutdown signal failed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
}
