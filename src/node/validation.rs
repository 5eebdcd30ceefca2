//! Gossip validation, off the event loop.
//!
//! Every gossip message of a subscribed topic is checked before gossipsub forwards it or a
//! subscriber sees it: its frame's signature, then the topic's validation hook (a component's
//! checks, then the application's). That work costs CPU (a signature check is tens of
//! microseconds) and runs user code, which may be slow or panic, so it does not run on the
//! event loop. Each topic has a worker task with a bounded queue: the event loop hands it the
//! message and goes on; the worker reports the verdict back, and the event loop tells gossipsub
//! (its manual validation mode) and delivers the message. A slow hook holds up its own topic
//! only: once the topic's queue is full, its further messages are ignored (dropped without
//! penalty to their sender) and counted, while every other protocol of the node runs on.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use libp2p::{PeerId, gossipsub::MessageId};
use tokio::sync::mpsc;

use super::{
    frame,
    gossip::{Message, Validation, Validator},
};

/// How many messages of one topic wait for its worker. Beyond, new ones are ignored.
pub(crate) const TOPIC_QUEUE: usize = 512;
/// How many verdicts wait for the event loop. A worker waits when it is full.
pub(crate) const VERDICT_QUEUE: usize = 4096;

/// The validation hooks of the node's topics, shared by the event loop and the workers.
pub(crate) type Hooks = Arc<RwLock<HashMap<String, Validator>>>;

/// A message handed to a topic's worker.
pub(crate) struct Pending {
    pub(crate) id: MessageId,
    pub(crate) via: PeerId,
    pub(crate) data: Vec<u8>,
}

/// A worker's verdict on a message.
pub(crate) struct Checked {
    pub(crate) id: MessageId,
    pub(crate) via: PeerId,
    pub(crate) verdict: Validation,
    /// The message to deliver, when it was accepted.
    pub(crate) message: Option<Message>,
}

/// Checks the messages of `topic` (`wire_topic` on the wire) until the event loop drops the
/// queue's sender (the node unsubscribed, or stopped).
pub(crate) async fn worker(
    topic: String,
    wire_topic: String,
    mut pending: mpsc::Receiver<Pending>,
    hooks: Hooks,
    verdicts: mpsc::Sender<Checked>,
) {
    while let Some(message) = pending.recv().await {
        let checked = run_blocking(|| check(&topic, &wire_topic, message, &hooks));
        if verdicts.send(checked).await.is_err() {
            break;
        }
    }
}

/// Runs `f`, which may block (user code), without holding up the runtime's other tasks: on a
/// multi-threaded runtime the worker thread hands its other tasks to the rest first.
fn run_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The signature check once per message (gossipsub hands over only the first copy), then the
/// topic's hook, which may panic: a panic ignores the message and is logged.
fn check(topic: &str, wire_topic: &str, pending: Pending, hooks: &Hooks) -> Checked {
    let Pending { id, via, data } = pending;
    let refused = |verdict| Checked {
        id: id.clone(),
        via,
        verdict,
        message: None,
    };
    let frame = match frame::open(wire_topic, data) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::debug!(peer = %via, %topic, "gossip message refused: {e}");
            return refused(Validation::Reject);
        }
    };
    let message = Message {
        topic: topic.to_owned(),
        source: frame.publisher,
        via,
        sequence: Some(frame.sequence),
        data: frame.payload,
    };
    let hook = hooks
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(topic)
        .cloned();
    if let Some(hook) = hook {
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&message)));
        match verdict {
            Ok(Validation::Accept) => {}
            Ok(other) => return refused(other),
            Err(_) => {
                tracing::error!(%topic, "a gossip validation hook panicked; message ignored");
                return refused(Validation::Ignore);
            }
        }
    }
    Checked {
        id,
        via,
        verdict: Validation::Accept,
        message: Some(message),
    }
}
