//! Raw gossip: topics of the node's network, subscriptions with bounded queues.
//!
//! This is the layer under the broker: bytes in, bytes out, every message signed by its
//! publisher. Topic names are namespaced by the network (`/micromesh/<network>/<topic>` on the
//! wire), so two networks that share peers never see each other's messages, and nodes refuse to
//! track subscriptions to topics outside their network.

use std::{
    fmt,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use libp2p::gossipsub::{self, TopicHash, TopicSubscriptionFilter};
use tokio::sync::mpsc;

use super::{Command, Node};
use crate::PeerId;

/// The longest topic name a user may choose, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// The most topics one node tracks from one peer, and the most subscription changes one
/// message from a peer may carry. libp2p's default (100 topics) is too small for a mesh where
/// every service and every queue group has topics of its own.
pub(crate) const MAX_TRACKED_TOPICS: usize = 20_000;
pub(crate) const MAX_SUBSCRIPTIONS_PER_MESSAGE: usize = 2_000;

/// The gossipsub topic that carries `topic` in `network`.
pub(crate) fn wire_topic(network: &str, topic: &str) -> String {
    format!("{}{topic}", topic_prefix(network))
}

pub(crate) fn topic_prefix(network: &str) -> String {
    format!("/micromesh/{network}/")
}

/// Checks a topic name chosen by a user: 1 to [`MAX_TOPIC_LEN`] bytes, no control characters or
/// whitespace, not starting with `_` (reserved for micromesh's own topics).
pub(crate) fn check_user_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic name cannot be empty".into());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "a topic name is at most {MAX_TOPIC_LEN} bytes, this one has {}",
            topic.len()
        ));
    }
    if topic.starts_with('_') {
        return Err("topic names starting with `_` are reserved for micromesh".into());
    }
    if let Some(c) = topic.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("a topic name cannot contain {c:?}"));
    }
    Ok(())
}

/// Accepts subscriptions to topics of one network only, and at most a bounded number of them.
pub(crate) struct NetworkTopics {
    prefix: String,
}

impl NetworkTopics {
    pub(crate) fn new(network: &str) -> Self {
        Self {
            prefix: topic_prefix(network),
        }
    }

    fn ours(&self, topic: &TopicHash) -> bool {
        topic.as_str().starts_with(&self.prefix)
    }
}

impl TopicSubscriptionFilter for NetworkTopics {
    /// Used for our own subscriptions and, by the trait's default, for every subscription a
    /// peer announces: topics of other networks are not tracked.
    fn can_subscribe(&mut self, topic: &TopicHash) -> bool {
        self.ours(topic)
    }
}

/// The subscription filter the node's gossipsub runs with.
pub(crate) type Filter = gossipsub::MaxCountSubscriptionFilter<NetworkTopics>;

pub(crate) fn filter(network: &str) -> Filter {
    gossipsub::MaxCountSubscriptionFilter {
        filter: NetworkTopics::new(network),
        max_subscribed_topics: MAX_TRACKED_TOPICS,
        max_subscriptions_per_request: MAX_SUBSCRIPTIONS_PER_MESSAGE,
    }
}

/// A message received on a subscribed topic.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// The topic, as the subscriber named it (without the network prefix).
    pub topic: String,
    /// The publisher: its signature on the message was checked.
    pub source: PeerId,
    /// The peer this node received the message from (the publisher, or a peer that forwarded it).
    pub via: PeerId,
    /// The publisher's sequence number of this message.
    pub sequence: Option<u64>,
    /// The payload.
    pub data: Vec<u8>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("source", &self.source)
            .field("via", &self.via)
            .field("sequence", &self.sequence)
            .field("len", &self.data.len())
            .finish()
    }
}

/// What a topic's validation hook decides about a received message.
///
/// Gossipsub forwards a message only after it was accepted, so a rejected or ignored message
/// goes no further than the first honest node that sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// Valid: deliver it to local subscribers and forward it to the mesh.
    Accept,
    /// Invalid: drop it and penalise the peer that sent it (its gossipsub score drops).
    Reject,
    /// Drop it without penalty (for example, a valid message this node does not want).
    Ignore,
}

/// A validation hook of one topic. It runs for every message of the topic on the topic's
/// validation worker, off the event loop: a slow hook holds up its own topic only (whose
/// messages are dropped beyond a bounded queue), and a panic ignores the message.
pub(crate) type Validator = Arc<dyn Fn(&Message) -> Validation + Send + Sync>;

/// The sending half of a subscription, held by the event loop.
pub(crate) struct Subscriber {
    pub(crate) id: u64,
    pub(crate) queue: mpsc::Sender<Message>,
    pub(crate) dropped: Arc<AtomicU64>,
}

impl Subscriber {
    /// Queues `message`; a full queue drops it and counts the drop. Returns `false` once the
    /// subscription is gone.
    pub(crate) fn deliver(&self, message: Message) -> Delivery {
        match self.queue.try_send(message) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Delivery::Dropped
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Gone,
        }
    }
}

pub(crate) enum Delivery {
    Queued,
    Dropped,
    Gone,
}

/// Messages of one topic, from [`Node::subscribe`].
///
/// The queue is bounded: when the subscriber does not keep up, new messages are dropped and
/// counted ([`Subscription::dropped`]), and the node's memory stays bounded. Dropping the
/// subscription unsubscribes (when it was the node's last subscription to the topic).
pub struct Subscription {
    pub(crate) topic: String,
    pub(crate) id: u64,
    pub(crate) queue: mpsc::Receiver<Message>,
    pub(crate) dropped: Arc<AtomicU64>,
    pub(crate) node: Node,
}

impl Subscription {
    /// The topic, as given to [`Node::subscribe`].
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Waits for the next message. `None` once the node has stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a message is either returned or stays queued.
    pub async fn recv(&mut self) -> Option<Message> {
        self.queue.recv().await
    }

    /// Takes the next queued message without waiting, if there is one.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.queue.try_recv().ok()
    }

    /// How many messages were dropped because this subscription's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl futures::Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.queue.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // If the command queue is full the event loop notices the closed queue on the next
        // message for the topic, or at its next sweep.
        let _ = self.node.inner.commands.try_send(Command::Unsubscribe {
            topic: std::mem::take(&mut self.topic),
            id: self.id,
        });
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_topics_are_checked() {
        assert!(check_user_topic("orders.created").is_ok());
        assert!(check_user_topic("").is_err());
        assert!(check_user_topic("_registry").is_err());
        assert!(check_user_topic("a b").is_err());
        assert!(check_user_topic(&"x".repeat(MAX_TOPIC_LEN)).is_ok());
        assert!(check_user_topic(&"x".repeat(MAX_TOPIC_LEN + 1)).is_err());
    }

    #[test]
    fn filter_accepts_only_topics_of_the_network() {
        let mut f = NetworkTopics::new("blue");
        assert!(f.can_subscribe(&TopicHash::from_raw(wire_topic("blue", "x"))));
        assert!(!f.can_subscribe(&TopicHash::from_raw(wire_topic("green", "x"))));
        assert!(!f.can_subscribe(&TopicHash::from_raw("/micromesh/blue-x/y")));
    }
}
