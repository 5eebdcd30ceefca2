//! Streams kept open between unary calls.
//!
//! After a unary call that succeeded, both sides keep its stream open (`protocols/rpc.md`,
//! "Reusing a stream"), and the next call to the same peer starts on it at once: no stream to
//! open, no protocol to negotiate, no work for the connection's handler. A stream is taken by
//! one call at a time, so a slow call never holds up another, and a call that is abandoned
//! takes its stream with it: dropping the stream tells the server to drop the handler.
//!
//! A kept stream is used only while it is on the connection a new stream would be opened on
//! (a direct connection before a relayed one, the newest first), and only while it has been
//! idle for less than [`Config::idle_timeout`](crate::transport::Config::idle_timeout).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use libp2p::{Stream, swarm::ConnectionId};

use crate::PeerId;

/// The most idle streams kept per peer: enough for 64 calls in flight to one peer to reuse
/// theirs; beyond that, a stream is closed after its call.
pub(crate) const MAX_IDLE_PER_PEER: usize = 64;

struct Idle {
    stream: Stream,
    connection: ConnectionId,
    since: Instant,
}

/// The idle streams of a client, per peer.
pub(crate) struct Pool {
    by_peer: Mutex<HashMap<PeerId, Vec<Idle>>>,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool whose streams are closed once idle for `idle_timeout`, by a task that ends with
    /// the pool.
    pub(crate) fn new(idle_timeout: Duration, node: &crate::node::Node) -> Arc<Self> {
        let pool = Arc::new(Self {
            by_peer: Mutex::new(HashMap::new()),
            idle_timeout,
        });
        // Without the sweep, a peer called once would keep its streams, and so its
        // connection, for as long as the client lives.
        let weak = Arc::downgrade(&pool);
        let every = (idle_timeout / 4).max(Duration::from_millis(50));
        node.spawn_task("client", async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.sweep();
            }
        });
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Vec<Idle>>> {
        self.by_peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle stream to `peer` on connection `best`, if there is one.
    /// Streams on other connections, or idle for too long, are closed.
    pub(crate) fn take(&self, peer: &PeerId, best: ConnectionId) -> Option<Stream> {
        let mut by_peer = self.lock();
        let idle = by_peer.get_mut(peer)?;
        let now = Instant::now();
        let found = loop {
            match idle.pop() {
                None => break None,
                Some(s) if s.connection == best && now - s.since < self.idle_timeout => {
                    break Some(s.stream);
                }
                // Dropping the stream closes it; the server's task for it ends.
                Some(_) => {}
            }
        };
        if idle.is_empty() {
            by_peer.remove(peer);
        }
        found
    }

    /// Keeps the stream of a finished call to `peer` for the next call.
    pub(crate) fn put(&self, peer: PeerId, connection: ConnectionId, stream: Stream) {
        if self.idle_timeout.is_zero() {
            return;
        }
        let mut by_peer = self.lock();
        let idle = by_peer.entry(peer).or_default();
        if idle.len() < MAX_IDLE_PER_PEER {
            idle.push(Idle {
                stream,
                connection,
                since: Instant::now(),
            });
        }
    }

    /// Closes the streams idle for too long.
    fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.idle_timeout;
        self.lock().retain(|_, idle| {
            idle.retain(|s| now - s.since < timeout);
            !idle.is_empty()
        });
    }
}
