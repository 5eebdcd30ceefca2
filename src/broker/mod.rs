//! The broker: typed publish/subscribe over gossipsub, with queue groups. No broker process
//! anywhere: every node is its own broker.
//!
//! - **Broadcast** ([`Broker::subscribe`]): every subscriber of a topic gets every message
//!   published on it. Messages travel on gossipsub, signed by their publisher; each subscriber
//!   checks them (and runs the topic's [validation hook](Broker::set_validator)) before it
//!   forwards them, so an invalid message goes no further than the first honest node, and its
//!   sender's gossipsub score drops. Each subscriber hands a publisher's messages to its handler
//!   once each, in publish order.
//! - **Queue groups** ([`SubscribeOptions::group`]): each message goes to exactly one live member
//!   of each group subscribed to the topic. The publisher delivers it to a member directly and
//!   waits for the member's acknowledgement (its handler returned `Ok`); if the member fails,
//!   refuses, disappears or does not answer within the ack timeout, the publisher redelivers it
//!   to another member. The guarantee is at-least-once while the publisher runs: a member that
//!   handled a message but whose acknowledgement was lost gets a duplicate elsewhere, which its
//!   handler can recognise by [`Event::id`] and [`Event::attempt`].
//!
//! `protocols/broker.md` specifies the wire format and the delivery guarantees exactly.
//!
//! ```
//! use micromesh::broker::{Broker, Event};
//! use micromesh::node::{Node, Preset};
//! use micromesh::Status;
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug)]
//! struct Order { id: u64 }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder().preset(Preset::Local).build().await?;
//! let broker = Broker::start(node, Default::default())?;
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1);
//! let _subscription = broker
//!     .subscribe("orders", move |event: Event<Order>| {
//!         let tx = tx.clone();
//!         async move {
//!             tx.send(event.body.id).await.ok();
//!             Ok::<_, Status>(())
//!         }
//!     })
//!     .await?;
//! // A local subscriber hears its own node's messages too.
//! broker.publish("orders", &Order { id: 7 }).await?;
//! assert_eq!(rx.recv().await, Some(7));
//! # Ok(()) }
//! ```

mod discovery;
mod order;
pub(crate) mod queue;
pub(crate) mod wire;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::FutureExt as _;
use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

pub use crate::node::gossip::Validation;
use crate::{
    Metadata, PeerId, Status,
    codec::{self, Codec, ContentType},
    node::{self, Node, gossip},
};

use self::{order::Reorder, wire::Envelope};

/// The content type of [`Broker::publish_raw`] bodies.
pub const RAW_CONTENT_TYPE: &str = "application/octet-stream";
/// The longest queue group name, in bytes.
pub const MAX_GROUP_LEN: usize = 64;

/// The prefix of the gossip topics that announce queue-group membership.
const MEMBERSHIP_PREFIX: &str = "_queue/";
/// How long the publisher trusts its view of the queue groups.
const MEMBERSHIP_CACHE: Duration = Duration::from_millis(200);
/// The most publishers whose order a subscription tracks.
const MAX_TRACKED_PUBLISHERS: usize = 10_000;

/// Errors of the broker.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic name is not acceptable.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The queue group name is not acceptable.
    #[error("invalid queue group {group:?}: {reason}")]
    InvalidGroup {
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
    /// A header is not acceptable.
    #[error("invalid headers: {0}")]
    InvalidHeaders(String),
    /// The message is larger than the topic allows.
    #[error(
        "a message of {size} bytes (body and headers) exceeds the limit of {max} bytes on topic {topic:?}"
    )]
    TooLarge {
        /// The topic.
        topic: String,
        /// The encoded message's size.
        size: usize,
        /// The topic's limit.
        max: usize,
    },
    /// Nobody subscribed to the topic could be found within the wait.
    #[error(
        "no subscribers of topic {topic:?} found within {waited:?}; the message was not sent \
         (use PublishOptions::allow_no_subscribers to send it anyway)"
    )]
    NoSubscribers {
        /// The topic.
        topic: String,
        /// How long the publish waited.
        waited: Duration,
    },
    /// This node's own validation hook of the topic did not accept the message, so it was not
    /// sent: every other node with the same hook would reject it.
    #[error("the validation hook of topic {topic:?} did not accept the message ({verdict:?})")]
    Rejected {
        /// The topic.
        topic: String,
        /// The hook's verdict.
        verdict: Validation,
    },
    /// This node's auth rules do not let it publish on the topic; every other node with the
    /// same rules would refuse the message.
    #[error("publishing on topic {topic:?} is not allowed: {reason}")]
    Forbidden {
        /// The topic.
        topic: String,
        /// Why (the rule or default policy that denied it).
        reason: String,
    },
    /// The queue of undelivered queue-group messages is full.
    #[error("{capacity} queue-group deliveries are pending; try again later")]
    OutboxFull {
        /// The outbox's capacity.
        capacity: usize,
    },
    /// The body could not be encoded.
    #[error(transparent)]
    Codec(#[from] codec::Error),
    /// A broker already serves queue groups on this node.
    #[error("a broker is already running on this node; use that one")]
    AlreadyRunning,
    /// The node failed or has stopped.
    #[error(transparent)]
    Node(#[from] node::Error),
}

/// The broker's settings.
///
/// ```
/// use std::time::Duration;
/// use micromesh::broker::Config;
///
/// let config = Config::default()
///     .topic_limit("thumbnails", 256 * 1024)
///     .wait_for_subscribers(Duration::from_secs(2));
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    max_message_size: usize,
    topic_limits: HashMap<String, usize>,
    wait_for_subscribers: Duration,
    reorder_window: Duration,
    queue_capacity: usize,
    ack_timeout: Duration,
    max_attempts: u32,
    redelivery_deadline: Duration,
    outbox_capacity: usize,
    max_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message_size: (1 << 20) - 8 * 1024,
            topic_limits: HashMap::new(),
            wait_for_subscribers: Duration::from_secs(5),
            reorder_window: Duration::from_secs(5),
            queue_capacity: 1024,
            ack_timeout: Duration::from_secs(30),
            max_attempts: 10,
            redelivery_deadline: Duration::from_secs(120),
            outbox_capacity: 10_000,
            max_in_flight: 256,
        }
    }
}

impl Config {
    /// The largest message (envelope: body, headers and about 40 bytes) on any topic. Default
    /// is 1 MiB − 8 KiB, which fits the node's default gossip limit of 1 MiB with the gossip
    /// framing and signature.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// A smaller limit for one topic. Publishes above it fail with [`Error::TooLarge`]; a
    /// subscriber with the same setting rejects larger messages from others.
    pub fn topic_limit(mut self, topic: impl Into<String>, bytes: usize) -> Self {
        self.topic_limits.insert(topic.into(), bytes);
        self
    }

    /// How long a publish waits for a subscriber to be found when none is known. Default 5 s.
    pub fn wait_for_subscribers(mut self, wait: Duration) -> Self {
        self.wait_for_subscribers = wait;
        self
    }

    /// How long a subscriber holds a publisher's message waiting for an earlier one that has
    /// not arrived. Default 5 s: gossipsub abandons a message that waited that long in a send
    /// queue, so an earlier message that has not come by then is not coming.
    pub fn reorder_window(mut self, window: Duration) -> Self {
        self.reorder_window = window;
        self
    }

    /// The default queue of each subscription: messages waiting for the handler. Beyond it,
    /// messages are dropped and counted. Default 1024.
    pub fn queue_capacity(mut self, messages: usize) -> Self {
        self.queue_capacity = messages.max(1);
        self
    }

    /// How long a publisher waits for a queue-group member's acknowledgement before it
    /// redelivers to another member. Default 30 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// How many delivery attempts a queue-group message gets, and for how long, before it is
    /// given up (counted as dead-lettered and logged). Default 10 attempts within 120 s.
    pub fn redelivery(mut self, max_attempts: u32, deadline: Duration) -> Self {
        self.max_attempts = max_attempts.max(1);
        self.redelivery_deadline = deadline;
        self
    }

    /// The most queue-group deliveries pending (not yet acknowledged) at once; publishes beyond
    /// fail with [`Error::OutboxFull`]. Default 10,000.
    pub fn outbox_capacity(mut self, deliveries: usize) -> Self {
        self.outbox_capacity = deliveries.max(1);
        self
    }

    fn limit(&self, topic: &str) -> usize {
        self.topic_limits
            .get(topic)
            .copied()
            .unwrap_or(self.max_message_size)
            .min(self.max_message_size)
    }
}

/// Options of one publish.
///
/// ```
/// use micromesh::broker::PublishOptions;
/// use micromesh::codec::ContentType;
///
/// let options = PublishOptions::new()
///     .header("trace-id", "4bf92f35")
///     .content_type(ContentType::Json)
///     .allow_no_subscribers();
/// ```
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    headers: Metadata,
    content_type: ContentType,
    wait: Option<Duration>,
    allow_no_subscribers: bool,
}

impl PublishOptions {
    /// The defaults: CBOR, no headers, wait for subscribers as configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Sets all headers.
    pub fn headers(mut self, headers: Metadata) -> Self {
        self.headers = headers;
        self
    }

    /// The codec of the body. Default CBOR.
    pub fn content_type(mut self, content_type: ContentType) -> Self {
        self.content_type = content_type;
        self
    }

    /// How long to wait for a subscriber when none is known yet (overrides the broker's
    /// setting; zero fails at once).
    pub fn wait_for_subscribers(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Sends the message even when no subscriber is known: fire and forget. It reaches the
    /// subscribers gossipsub knows of, possibly none.
    pub fn allow_no_subscribers(mut self) -> Self {
        self.allow_no_subscribers = true;
        self
    }
}

/// Options of one subscription.
///
/// ```
/// use micromesh::broker::SubscribeOptions;
///
/// let options = SubscribeOptions::new().group("billing").queue_capacity(64);
/// ```
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    group: Option<String>,
    queue_capacity: Option<usize>,
}

impl SubscribeOptions {
    /// A broadcast subscription with the broker's queue size.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins queue group `group` of the topic: each message goes to one member of the group.
    /// Names are 1 to [`MAX_GROUP_LEN`] bytes of ASCII letters, digits, `.`, `_` and `-`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The queue of messages waiting for the handler; beyond it messages are dropped (broadcast)
    /// or refused for redelivery to another member (queue groups).
    pub fn queue_capacity(mut self, messages: usize) -> Self {
        self.queue_capacity = Some(messages.max(1));
        self
    }
}

/// What a publish reached, from [`Broker::publish`].
///
/// Broadcast subscribers further away than this node's connected peers get the message from
/// them, so `subscribers` counts the ones this node sent to, not all of them.
#[non_exhaustive]
pub struct Published {
    /// The message's identity.
    pub id: MessageId,
    /// The broadcast subscribers this node sent the message to: its own subscriptions and its
    /// connected peers that subscribe to the topic.
    pub subscribers: usize,
    /// The queue groups the message is being delivered to, one member of each.
    pub groups: Vec<String>,
    deliveries: Vec<oneshot::Receiver<GroupDelivery>>,
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("id", &self.id)
            .field("subscribers", &self.subscribers)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl Published {
    /// Waits until the delivery to each queue group has ended (a member acknowledged the
    /// message, or it was given up after every attempt), and says how each ended, in the order
    /// of [`Published::groups`]. Returns at once when the topic has no queue groups.
    ///
    /// # Cancel safety
    ///
    /// Cancelling loses the report, not the deliveries: they go on in the background.
    pub async fn delivered(self) -> Vec<GroupDelivery> {
        let mut outcomes = Vec::with_capacity(self.groups.len());
        for (group, delivery) in self.groups.into_iter().zip(self.deliveries) {
            outcomes.push(delivery.await.unwrap_or_else(|_| GroupDelivery {
                group,
                member: None,
                attempts: 0,
                error: Some("the broker stopped".into()),
            }));
        }
        outcomes
    }
}

/// How the delivery of one message to one queue group ended, from [`Published::delivered`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupDelivery {
    /// The queue group.
    pub group: String,
    /// The member whose handler took the message; `None` when it was given up.
    pub member: Option<PeerId>,
    /// How many members it was offered to.
    pub attempts: u32,
    /// Why it was given up: the last failure. `None` when a member took it.
    pub error: Option<String>,
}

/// Who subscribes to a topic, as one node sees it; from [`Broker::subscribers`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscribers {
    /// Broadcast subscribers.
    pub broadcast: Vec<PeerId>,
    /// Queue groups and their members.
    pub groups: BTreeMap<String, Vec<PeerId>>,
}

/// Identifies one message: its publisher, the publisher's epoch (one per broker start) and
/// its sequence number on the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// The publisher.
    pub publisher: PeerId,
    /// The publisher's epoch.
    pub epoch: u64,
    /// The message's number among the publisher's messages on the topic in this epoch.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:016x}/{}", self.publisher, self.epoch, self.seq)
    }
}

/// A received message with its body decoded as `T`. [`Message`] is the undecoded form.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event<T> {
    /// The topic.
    pub topic: String,
    /// The message's identity.
    pub id: MessageId,
    /// The publisher: its signature (broadcast) or its authenticated connection (queue group)
    /// was checked.
    pub publisher: PeerId,
    /// The publisher's headers.
    pub headers: Metadata,
    /// The body's MIME type.
    pub content_type: String,
    /// When it was published, by the publisher's clock.
    pub published_at: SystemTime,
    /// The queue group it was delivered to, for queue-group subscriptions.
    pub group: Option<String>,
    /// The delivery attempt: 1, or more for a queue-group redelivery.
    pub attempt: u32,
    /// The body.
    pub body: T,
}

/// A received message with its body as bytes, as validation hooks and raw subscriptions see it.
pub type Message = Event<bytes::Bytes>;

impl Message {
    /// Decodes the body with the codec of its content type.
    ///
    /// # Errors
    ///
    /// [`codec::Error`] for an unsupported content type or a body that does not decode as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, codec::Error> {
        ContentType::from_mime(&self.content_type)?.decode(&self.body)
    }

    fn with_body<T>(self, body: T) -> Event<T> {
        Event {
            topic: self.topic,
            id: self.id,
            publisher: self.publisher,
            headers: self.headers,
            content_type: self.content_type,
            published_at: self.published_at,
            group: self.group,
            attempt: self.attempt,
            body,
        }
    }

    fn from_envelope(
        topic: &str,
        publisher: PeerId,
        envelope: Envelope,
        group: Option<String>,
        attempt: u32,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            id: MessageId {
                publisher,
                epoch: envelope.epoch,
                seq: envelope.seq,
            },
            publisher,
            headers: envelope.headers,
            content_type: envelope.content_type,
            published_at: UNIX_EPOCH + Duration::from_millis(envelope.time_ms),
            group,
            attempt,
            body: envelope.body,
        }
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;
type DynHandler = Arc<dyn Fn(Message) -> HandlerFuture + Send + Sync>;
type UserValidator = Arc<dyn Fn(&Message) -> Validation + Send + Sync>;

/// Runs a handler; a panic becomes a 500.
async fn run_handler(handler: &DynHandler, message: Message) -> Result<(), Status> {
    let id = message.id;
    match std::panic::AssertUnwindSafe(handler(message))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(_) => {
            tracing::error!(message = %id, "a subscriber's handler panicked");
            Err(Status::internal("the handler panicked"))
        }
    }
}

/// A queue-group delivery handed to a local member.
pub(crate) struct QueueItem {
    message: Message,
    ack: oneshot::Sender<Result<(), Status>>,
}

/// A topic and one of its queue groups.
type GroupKey = (String, String);
/// Local subscriptions (by id) and their queues.
type Queues<T> = Vec<(u64, mpsc::Sender<T>)>;

#[derive(Default)]
struct Local {
    next_id: u64,
    broadcast: HashMap<String, Queues<Message>>,
    groups: HashMap<GroupKey, Queues<QueueItem>>,
    /// Local subscriptions per topic, for providing the topic in the DHT once.
    provided: HashMap<String, usize>,
}

/// The queue groups of topics, as seen by a publisher: topic → group → members.
type Membership = HashMap<String, BTreeMap<String, Vec<PeerId>>>;

#[derive(Clone, Default)]
struct Metrics {
    published: Counter,
    delivered: Counter,
    handler_errors: Counter,
    dropped: Counter,
    late: Counter,
    skipped: Counter,
    rejected: Counter,
    redelivered: Counter,
    dead_lettered: Counter,
}

impl Metrics {
    fn register(node: &Node) -> Self {
        let metrics = Self::default();
        node.register_metrics("broker", |r| {
            r.register(
                "published",
                "Messages published",
                metrics.published.clone(),
            );
            r.register(
                "delivered",
                "Messages handed to subscription handlers",
                metrics.delivered.clone(),
            );
            r.register(
                "handler_errors",
                "Handler calls that returned an error or panicked",
                metrics.handler_errors.clone(),
            );
            r.register(
                "dropped",
                "Messages dropped because a subscription's queue was full",
                metrics.dropped.clone(),
            );
            r.register(
                "late",
                "Broadcast messages dropped because they arrived after their place in the publisher's order was given up",
                metrics.late.clone(),
            );
            r.register(
                "skipped",
                "Sequence numbers given up by subscribers (messages lost or published before the subscription)",
                metrics.skipped.clone(),
            );
            r.register(
                "rejected",
                "Messages rejected by validation (malformed, too large, or by a validation hook)",
                metrics.rejected.clone(),
            );
            r.register(
                "redelivered",
                "Queue-group deliveries retried on another member",
                metrics.redelivered.clone(),
            );
            r.register(
                "dead_lettered",
                "Queue-group messages given up after every attempt",
                metrics.dead_lettered.clone(),
            );
        });
        metrics
    }
}

pub(crate) struct Inner {
    node: Node,
    config: Config,
    epoch: u64,
    seqs: Mutex<HashMap<String, u64>>,
    local: Mutex<Local>,
    validators: Arc<RwLock<HashMap<String, UserValidator>>>,
    validated_topics: Mutex<HashSet<String>>,
    membership: tokio::sync::Mutex<(Option<Instant>, Membership)>,
    round_robin: Mutex<HashMap<(String, String), usize>>,
    outbox: queue::Outbox,
    /// Deliveries to this node's members whose acknowledgement is not written yet.
    serving: std::sync::atomic::AtomicUsize,
    discovery: discovery::Discovery,
    metrics: Metrics,
}

/// A node's broker. Cheap to clone; every clone is the same broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("peer_id", &self.inner.node.peer_id())
            .field("epoch", &format_args!("{:016x}", self.inner.epoch))
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the broker of `node`: it serves queue-group deliveries to this node's members from
    /// now on. A [`Service`](crate::Service) starts one for its node
    /// ([`Service::broker`](crate::Service::broker)).
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRunning`] if a broker already runs on this node.
    pub fn start(node: Node, config: Config) -> Result<Self, Error> {
        let inbound = node
            .accept(queue::protocol(node.network()))
            .map_err(|_| Error::AlreadyRunning)?;
        let metrics = Metrics::register(&node);
        let inner = Arc::new(Inner {
            outbox: queue::Outbox::new(config.outbox_capacity, config.max_in_flight),
            node,
            config,
            epoch: rand::random(),
            seqs: Mutex::new(HashMap::new()),
            local: Mutex::new(Local::default()),
            validators: Arc::new(RwLock::new(HashMap::new())),
            validated_topics: Mutex::new(HashSet::new()),
            membership: tokio::sync::Mutex::new((None, HashMap::new())),
            round_robin: Mutex::new(HashMap::new()),
            serving: std::sync::atomic::AtomicUsize::new(0),
            discovery: discovery::Discovery::default(),
            metrics,
        });
        inner
            .node
            .spawn_task("broker", queue::serve(Arc::downgrade(&inner), inbound));
        Ok(Self { inner })
    }

    /// The node this broker runs on.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Publishes `message` on `topic`, encoded as CBOR. See [`Broker::publish_with`].
    ///
    /// # Errors
    ///
    /// As [`Broker::publish_with`].
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        message: &T,
    ) -> Result<Published, Error> {
        self.publish_with(topic, message, PublishOptions::default())
            .await
    }

    /// Publishes `message` on `topic`: to every broadcast subscriber, this node's included, and
    /// to one member of every queue group of the topic.
    ///
    /// Before its first message on a topic, a node looks the topic's subscribers up in the DHT
    /// and connects to them (later publishes refresh this in the background), so that a node
    /// that has just started reaches broadcast subscribers and queue groups alike. When still no
    /// subscriber is known, the publish keeps looking for up to the configured wait, then fails
    /// with [`Error::NoSubscribers`]: nothing is silently lost. With
    /// [`PublishOptions::allow_no_subscribers`] it sends at once instead, to whoever is known.
    ///
    /// The returned [`Published`] says what the message reached; queue-group messages are
    /// acknowledged after the publish returns ([`Published::delivered`] waits for this message's,
    /// [`Broker::flush`] for all).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopic`], [`Error::InvalidHeaders`], [`Error::TooLarge`] and
    /// [`Error::Rejected`] (checked before anything is sent), [`Error::NoSubscribers`], [`Error::OutboxFull`], [`Error::Codec`],
    /// [`Error::Node`].
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        message: &T,
        options: PublishOptions,
    ) -> Result<Published, Error> {
        let body = options.content_type.encode(message)?;
        let content_type = options.content_type.content_type();
        self.publish_encoded(topic, content_type, body.into(), options)
            .await
    }

    /// Publishes bytes as they are, with content type [`RAW_CONTENT_TYPE`]; subscribers get
    /// them with [`Broker::subscribe_raw`]. The options' content type is not used.
    ///
    /// # Errors
    ///
    /// As [`Broker::publish_with`].
    pub async fn publish_raw(
        &self,
        topic: &str,
        body: impl Into<Vec<u8>>,
        options: PublishOptions,
    ) -> Result<Published, Error> {
        self.publish_encoded(topic, RAW_CONTENT_TYPE, body.into().into(), options)
            .await
    }

    async fn publish_encoded(
        &self,
        topic: &str,
        content_type: &str,
        body: bytes::Bytes,
        options: PublishOptions,
    ) -> Result<Published, Error> {
        check_topic(topic)?;
        wire::check_headers(&options.headers).map_err(Error::InvalidHeaders)?;
        let inner = &self.inner;
        let auth = inner.node.auth();
        auth.authorize_self(&[crate::auth::Resource::topic(topic)])
            .map_err(|denied| Error::Forbidden {
                topic: topic.to_owned(),
                reason: denied.reason,
            })?;
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut envelope = Envelope {
            version: wire::VERSION,
            epoch: inner.epoch,
            seq: 0,
            time_ms,
            content_type: content_type.to_owned(),
            headers: options.headers,
            body,
            grants: auth.own_encoded(),
        };
        // Checked with a provisional number (the number is taken once every check passed, or a
        // refused message would leave a gap that subscribers wait on): the size cannot grow by
        // more than 8 bytes.
        let size = envelope.encoded_len() + 8;
        let max = inner.config.limit(topic);
        if size > max {
            return Err(Error::TooLarge {
                topic: topic.to_owned(),
                size,
                max,
            });
        }
        let hook = inner
            .validators
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .cloned();
        if let Some(hook) = hook {
            let me = inner.node.peer_id();
            let verdict = hook(&Message::from_envelope(
                topic,
                me,
                envelope.clone(),
                None,
                1,
            ));
            if verdict != Validation::Accept {
                return Err(Error::Rejected {
                    topic: topic.to_owned(),
                    verdict,
                });
            }
        }
        envelope.seq = {
            let mut seqs = inner.seqs.lock().unwrap_or_else(|e| e.into_inner());
            let seq = seqs.entry(topic.to_owned()).or_insert(0);
            let current = *seq;
            *seq += 1;
            current
        };
        let id = MessageId {
            publisher: inner.node.peer_id(),
            epoch: inner.epoch,
            seq: envelope.seq,
        };
        let wait = options.wait.unwrap_or(inner.config.wait_for_subscribers);
        let deadline = Instant::now() + wait;

        // A node that has not looked for the topic's subscribers yet does so first: otherwise it
        // would send to whichever kind of subscriber it happened to meet first.
        let mut discovered = false;
        if !options.allow_no_subscribers
            && let Some(round) = inner.discovery.before_publish(&inner.node, topic)
        {
            let _ = tokio::time::timeout_at(deadline.into(), round).await;
            discovered = true;
        }
        let local = self.deliver_locally(topic, &envelope);
        // Broadcast first: looking up queue groups may take a trip through the event loop, and
        // broadcast subscribers should not wait for it. The envelope is encoded once, and the
        // encoding handed over; a retry, when nobody was there, encodes it again.
        let mut remote = self.gossip(topic, envelope.encode()).await?;
        let mut groups = self.groups_of(topic, discovered).await?;
        while local == 0 && groups.is_empty() && remote.is_none() && !options.allow_no_subscribers {
            if Instant::now() >= deadline {
                return Err(Error::NoSubscribers {
                    topic: topic.to_owned(),
                    waited: wait,
                });
            }
            let round = inner.discovery.retry(&inner.node, topic);
            let _ = tokio::time::timeout_at(deadline.into(), round).await;
            remote = self.gossip(topic, envelope.encode()).await?;
            groups = self.groups_of(topic, true).await?;
        }
        let mut deliveries = Vec::with_capacity(groups.len());
        if !groups.is_empty() {
            let permits = inner.outbox.reserve(groups.len())?;
            for (permit, group) in permits.into_iter().zip(&groups) {
                let (report, delivered) = oneshot::channel();
                deliveries.push(delivered);
                inner.node.spawn_task(
                    "broker",
                    queue::deliver(
                        self.inner.clone(),
                        permit,
                        topic.to_owned(),
                        group.clone(),
                        envelope.clone(),
                        report,
                    ),
                );
            }
        }
        inner.metrics.published.inc();
        Ok(Published {
            id,
            subscribers: local + remote.unwrap_or(0),
            groups,
            deliveries,
        })
    }

    /// Sends on gossipsub; returns how many connected peers subscribe to the topic, or `None`
    /// when none does (nothing was sent).
    async fn gossip(&self, topic: &str, bytes: Vec<u8>) -> Result<Option<usize>, Error> {
        match self.inner.node.publish_unchecked(topic, bytes).await {
            Ok(subscribers) => Ok(Some(subscribers)),
            Err(node::Error::Publish {
                reason: node::PublishError::NoSubscribers,
                ..
            }) => Ok(None),
            Err(node::Error::Publish {
                reason: node::PublishError::TooLarge { size, max },
                ..
            }) => Err(Error::TooLarge {
                topic: topic.to_owned(),
                size,
                max,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Hands a message to this node's own broadcast subscribers; returns how many there are.
    fn deliver_locally(&self, topic: &str, envelope: &Envelope) -> usize {
        let mut local = self.inner.local.lock().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = local.broadcast.get_mut(topic) else {
            return 0;
        };
        let publisher = self.inner.node.peer_id();
        subscribers.retain(|(_, queue)| {
            let message = Message::from_envelope(topic, publisher, envelope.clone(), None, 1);
            match queue.try_send(message) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner.metrics.dropped.inc();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        subscribers.len()
    }

    /// The queue groups of `topic`, this node's own included.
    async fn groups_of(&self, topic: &str, fresh: bool) -> Result<Vec<String>, Error> {
        let mut groups: HashSet<String> = self
            .inner
            .members(topic, fresh)
            .await?
            .into_keys()
            .collect();
        let local = self.inner.local.lock().unwrap_or_else(|e| e.into_inner());
        groups.extend(
            local
                .groups
                .keys()
                .filter(|(t, _)| t == topic)
                .map(|(_, g)| g.clone()),
        );
        let mut groups: Vec<String> = groups.into_iter().collect();
        groups.sort();
        Ok(groups)
    }

    /// The subscribers of `topic` this node knows of: connected peers subscribed to it
    /// (broadcast), and the members of each queue group, this node included.
    ///
    /// # Errors
    ///
    /// [`Error::Node`] once the node has stopped.
    pub async fn subscribers(&self, topic: &str) -> Result<Subscribers, Error> {
        let mut broadcast = self.inner.node.topic_peers(topic).await?;
        let mut groups = self.inner.members(topic, true).await?;
        let me = self.inner.node.peer_id();
        let local = self.inner.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.broadcast.contains_key(topic) {
            broadcast.push(me);
        }
        for (t, group) in local.groups.keys() {
            if t == topic {
                groups.entry(group.clone()).or_default().push(me);
            }
        }
        broadcast.sort();
        Ok(Subscribers { broadcast, groups })
    }

    /// Waits until every queue-group message published so far was acknowledged or given up,
    /// and every delivery to this node's members was answered, or `timeout` passed. Returns
    /// whether both are done. [`Service::stop`](crate::Service::stop) calls it.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if !self.inner.outbox.wait_empty(timeout).await {
            return false;
        }
        loop {
            if self.inner.serving.load(Ordering::Acquire) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many queue-group deliveries are pending.
    pub fn pending(&self) -> usize {
        self.inner.outbox.pending()
    }

    /// Sets the validation hook of `topic`, replacing any earlier one. It runs on every message
    /// of the topic this node receives, before the message is delivered to local subscribers or
    /// forwarded to other nodes: [`Validation::Reject`] drops it and lowers the gossipsub score of
    /// the peer that sent it; [`Validation::Ignore`] drops it without penalty. The hook runs on
    /// the topic's validation worker, off the node's event loop: a slow or blocking hook holds
    /// up this topic only (beyond 512 waiting messages, new ones are dropped and counted in
    /// `micromesh_gossip_validation_overflow_total`), and a hook that panics drops the message.
    /// Malformed and oversized messages are rejected before any hook runs.
    ///
    /// ```
    /// # use micromesh::{node::{Node, Preset}, broker::{Broker, Message, Validation}};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let node = Node::builder().preset(Preset::Local).build().await?;
    /// # let broker = Broker::start(node, Default::default())?;
    /// broker.set_validator("prices", |message: &Message| {
    ///     match message.decode::<f64>() {
    ///         Ok(price) if price.is_finite() && price >= 0.0 => Validation::Accept,
    ///         _ => Validation::Reject,
    ///     }
    /// });
    /// # Ok(()) }
    /// ```
    pub fn set_validator<F>(&self, topic: &str, hook: F)
    where
        F: Fn(&Message) -> Validation + Send + Sync + 'static,
    {
        self.inner
            .validators
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), Arc::new(hook));
    }

    /// Removes the validation hook of `topic`.
    pub fn remove_validator(&self, topic: &str) {
        self.inner
            .validators
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
    }

    /// Subscribes to `topic` with a handler that gets each message decoded as `T`.
    ///
    /// # Errors
    ///
    /// As [`Broker::subscribe_with`].
    pub async fn subscribe<T, F, Fut>(&self, topic: &str, handler: F) -> Result<Subscription, Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        self.subscribe_with(topic, SubscribeOptions::default(), handler)
            .await
    }

    /// Subscribes to `topic`. The handler runs for one message at a time, in each publisher's
    /// order for broadcast subscriptions. A body that does not decode as `T` is counted as a
    /// failure and skipped (for a queue group: refused with 400, so another member with the
    /// right type may take it). Dropping the [`Subscription`] unsubscribes.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopic`], [`Error::InvalidGroup`], [`Error::Node`].
    pub async fn subscribe_with<T, F, Fut>(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription, Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let dynamic: DynHandler = Arc::new(move |message: Message| {
            let handler = handler.clone();
            Box::pin(async move {
                match message.decode::<T>() {
                    Ok(body) => handler(message.with_body(body)).await,
                    Err(e) => Err(Status::bad_request(e.to_string())),
                }
            })
        });
        self.subscribe_dyn(topic, options, dynamic).await
    }

    /// Subscribes to `topic` with a handler that gets the bodies undecoded.
    ///
    /// # Errors
    ///
    /// As [`Broker::subscribe_with`].
    pub async fn subscribe_raw<F, Fut>(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription, Error>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let dynamic: DynHandler = Arc::new(move |message| Box::pin(handler(message)));
        self.subscribe_dyn(topic, options, dynamic).await
    }

    async fn subscribe_dyn(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: DynHandler,
    ) -> Result<Subscription, Error> {
        check_topic(topic)?;
        if let Some(group) = &options.group {
            check_group(group)?;
        }
        let inner = &self.inner;
        let capacity = options
            .queue_capacity
            .unwrap_or(inner.config.queue_capacity);
        let stats = Arc::new(Counters::default());
        let (id, first_of_topic) = {
            let mut local = inner.local.lock().unwrap_or_else(|e| e.into_inner());
            local.next_id += 1;
            let id = local.next_id;
            let count = local.provided.entry(topic.to_owned()).or_insert(0);
            *count += 1;
            (id, *count == 1)
        };
        let registered = match &options.group {
            Some(group) => {
                self.join_group(id, topic, group, capacity, handler, &stats)
                    .await
            }
            None => {
                self.join_broadcast(id, topic, capacity, handler, &stats)
                    .await
            }
        };
        let close = match registered {
            Ok(close) => close,
            Err(e) => {
                self.inner.forget(id, topic, options.group.as_deref());
                return Err(e);
            }
        };
        if first_of_topic {
            // Publishers find subscribers through this record: it is in place (locally) before
            // `subscribe` returns, and spreads to the closest peers in the background.
            inner.node.start_providing(discovery_key(topic)).await?;
        }
        // Connect to the topic's other subscribers, so that messages reach this one through
        // them and queue-group deliveries find their members.
        inner.discovery.refresh(&inner.node, topic);
        Ok(Subscription {
            topic: topic.to_owned(),
            group: options.group,
            id,
            stats,
            close: Some(close),
            broker: self.inner.clone(),
        })
    }

    async fn join_broadcast(
        &self,
        id: u64,
        topic: &str,
        capacity: usize,
        handler: DynHandler,
        stats: &Arc<Counters>,
    ) -> Result<oneshot::Sender<()>, Error> {
        let inner = &self.inner;
        let first = inner
            .validated_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned());
        if first {
            let validator = self.node_validator(topic);
            inner.node.set_validator(topic, Some(validator)).await?;
        }
        let gossip = inner.node.subscribe_with_capacity(topic, capacity).await?;
        let (local_tx, local_rx) = mpsc::channel(capacity);
        inner
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .broadcast
            .entry(topic.to_owned())
            .or_default()
            .push((id, local_tx));
        let worker = BroadcastWorker {
            topic: topic.to_owned(),
            handler,
            stats: stats.clone(),
            metrics: inner.metrics.clone(),
            reorder: Reorder::new(
                inner.config.reorder_window,
                capacity,
                MAX_TRACKED_PUBLISHERS,
            ),
        };
        let (close, closed) = oneshot::channel();
        inner
            .node
            .spawn_task("broker", worker.run(gossip, local_rx, closed));
        Ok(close)
    }

    async fn join_group(
        &self,
        id: u64,
        topic: &str,
        group: &str,
        capacity: usize,
        handler: DynHandler,
        stats: &Arc<Counters>,
    ) -> Result<oneshot::Sender<()>, Error> {
        let inner = &self.inner;
        let membership = membership_topic(group, topic);
        // Nothing is ever published on a membership topic: anything that is, is an attack.
        inner
            .node
            .set_validator(
                &membership,
                Some(Arc::new(|_: &gossip::Message| Validation::Reject)),
            )
            .await?;
        let announcement = inner.node.subscribe_with_capacity(&membership, 1).await?;
        let (queue_tx, queue_rx) = mpsc::channel(capacity);
        inner
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .entry((topic.to_owned(), group.to_owned()))
            .or_default()
            .push((id, queue_tx));
        let stats = stats.clone();
        let metrics = inner.metrics.clone();
        let (close, mut closed) = oneshot::channel::<()>();
        inner.node.spawn_task("broker", async move {
            // Held for the subscription's life: it announces the membership.
            let announcement = announcement;
            let mut queue = queue_rx;
            loop {
                let item = tokio::select! {
                    biased;
                    _ = &mut closed => break,
                    item = queue.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                };
                let result = run_handler(&handler, item.message).await;
                match &result {
                    Ok(()) => {
                        stats.delivered.fetch_add(1, Ordering::Relaxed);
                        metrics.delivered.inc();
                    }
                    Err(_) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        metrics.handler_errors.inc();
                    }
                }
                let _ = item.ack.send(result);
            }
            // Deliveries still queued are refused (503): their publishers redeliver them to
            // another member.
            drop(announcement);
        });
        Ok(close)
    }

    /// The node-level hook of a broadcast topic: envelope checks, size limit, then the user's
    /// hook if any.
    fn node_validator(&self, topic: &str) -> gossip::Validator {
        let validators = self.inner.validators.clone();
        let auth = self.inner.node.auth().clone();
        let max = self.inner.config.limit(topic);
        let metrics = self.inner.metrics.clone();
        Arc::new(move |raw: &gossip::Message| {
            let verdict = validate(&validators, &auth, max, raw);
            if verdict == Validation::Reject {
                metrics.rejected.inc();
            }
            verdict
        })
    }
}

fn validate(
    validators: &RwLock<HashMap<String, UserValidator>>,
    auth: &crate::auth::Auth,
    max: usize,
    raw: &gossip::Message,
) -> Validation {
    if raw.data.len() > max {
        return Validation::Reject;
    }
    let Ok(envelope) = Envelope::decode(&raw.data) else {
        return Validation::Reject;
    };
    if let Err(denied) = authorize_publisher(auth, raw.source, &raw.topic, &envelope) {
        tracing::debug!(publisher = %raw.source, topic = %raw.topic, "message refused: {denied}");
        return Validation::Reject;
    }
    let hook = validators
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&raw.topic)
        .cloned();
    match hook {
        Some(hook) => hook(&Message::from_envelope(
            &raw.topic, raw.source, envelope, None, 1,
        )),
        None => Validation::Accept,
    }
}

/// Whether `publisher` may publish on `topic`, with the grants its message carries.
fn authorize_publisher(
    auth: &crate::auth::Auth,
    publisher: PeerId,
    topic: &str,
    envelope: &Envelope,
) -> Result<(), crate::auth::Denied> {
    auth.authorize(
        crate::auth::Surface::Publish,
        publisher,
        crate::auth::Grants::Carried(&envelope.grants),
        &[crate::auth::Resource::topic(topic)],
        SystemTime::now(),
    )
    .map(drop)
}

impl Inner {
    /// Remote members of the queue groups of `topic` (from the gossip subscriptions of
    /// connected peers), cached for [`MEMBERSHIP_CACHE`] unless `fresh`.
    async fn members(
        &self,
        topic: &str,
        fresh: bool,
    ) -> Result<BTreeMap<String, Vec<PeerId>>, Error> {
        let mut cache = self.membership.lock().await;
        let stale = cache
            .0
            .is_none_or(|at| fresh || at.elapsed() > MEMBERSHIP_CACHE);
        if stale {
            let mut membership = Membership::new();
            for (wire, peer) in self.node.topics_with_prefix(MEMBERSHIP_PREFIX).await? {
                if let Some((group, topic)) = parse_membership_topic(&wire) {
                    membership
                        .entry(topic.to_owned())
                        .or_default()
                        .entry(group.to_owned())
                        .or_default()
                        .push(peer);
                }
            }
            for groups in membership.values_mut() {
                for peers in groups.values_mut() {
                    peers.sort();
                }
            }
            *cache = (Some(Instant::now()), membership);
        }
        Ok(cache.1.get(topic).cloned().unwrap_or_default())
    }

    /// Forgets local registration `id`.
    fn forget(&self, id: u64, topic: &str, group: Option<&str>) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        match group {
            Some(group) => {
                let key = (topic.to_owned(), group.to_owned());
                if let Some(members) = local.groups.get_mut(&key) {
                    members.retain(|(i, _)| *i != id);
                    if members.is_empty() {
                        local.groups.remove(&key);
                    }
                }
            }
            None => {
                if let Some(subscribers) = local.broadcast.get_mut(topic) {
                    subscribers.retain(|(i, _)| *i != id);
                    if subscribers.is_empty() {
                        local.broadcast.remove(topic);
                    }
                }
            }
        }
        if let Some(count) = local.provided.get_mut(topic) {
            *count -= 1;
            if *count == 0 {
                local.provided.remove(topic);
                self.node.stop_providing_now(discovery_key(topic));
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    late: AtomicU64,
    skipped: AtomicU64,
    gossip_dropped: RwLock<Option<Arc<AtomicU64>>>,
}

/// Counts of one subscription, from [`Subscription::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Messages the handler took (returned `Ok`).
    pub delivered: u64,
    /// Messages whose handler failed, panicked, or whose body did not decode.
    pub failed: u64,
    /// Messages dropped because the subscription's queue was full.
    pub dropped: u64,
    /// Broadcast messages dropped because they arrived after their place in the publisher's
    /// order had been given up.
    pub late: u64,
    /// Sequence numbers given up: messages lost on the way, or published before the
    /// subscription started.
    pub skipped: u64,
}

/// A subscription: the handler runs until it is dropped or [`Subscription::unsubscribe`]d.
pub struct Subscription {
    topic: String,
    group: Option<String>,
    id: u64,
    stats: Arc<Counters>,
    /// Dropped to stop the worker: it finishes the message in hand, then exits.
    close: Option<oneshot::Sender<()>>,
    broker: Arc<Inner>,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The queue group, for a queue-group subscription.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The subscription's counts so far.
    pub fn stats(&self) -> SubscriptionStats {
        let s = &self.stats;
        let gossip_dropped = s
            .gossip_dropped
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |d| d.load(Ordering::Relaxed));
        SubscriptionStats {
            delivered: s.delivered.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed) + gossip_dropped,
            late: s.late.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
        }
    }

    /// Unsubscribes: the handler gets no further messages (one running finishes).
    pub fn unsubscribe(self) {
        drop(self);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.close.take());
        self.broker
            .forget(self.id, &self.topic, self.group.as_deref());
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Runs one broadcast subscription: gossip and local messages, reordered per publisher, one
/// handler call at a time.
struct BroadcastWorker {
    topic: String,
    handler: DynHandler,
    stats: Arc<Counters>,
    metrics: Metrics,
    reorder: Reorder<Message>,
}

impl BroadcastWorker {
    async fn run(
        mut self,
        mut gossip: gossip::Subscription,
        mut local: mpsc::Receiver<Message>,
        mut closed: oneshot::Receiver<()>,
    ) {
        *self
            .stats
            .gossip_dropped
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(gossip.dropped.clone());
        loop {
            let deadline = self.reorder.next_deadline();
            let ready = tokio::select! {
                biased;
                _ = &mut closed => return,
                received = gossip.recv() => match received {
                    Some(raw) => match Envelope::decode(&raw.data) {
                        Ok(envelope) => self.push(raw.source, envelope),
                        // The node's validation hook let through only valid envelopes.
                        Err(_) => Vec::new(),
                    },
                    None => return,
                },
                received = local.recv() => match received {
                    Some(message) => {
                        let key = (message.publisher, message.id.epoch);
                        let seq = message.id.seq;
                        self.reorder.push(key, seq, message, Instant::now())
                    }
                    None => return,
                },
                _ = sleep_until(deadline) => self.reorder.expire(Instant::now()),
            };
            self.count_order();
            for message in ready {
                match run_handler(&self.handler, message).await {
                    Ok(()) => {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                        self.metrics.delivered.inc();
                    }
                    Err(status) => {
                        tracing::debug!(topic = %self.topic, "subscriber handler failed: {status}");
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        self.metrics.handler_errors.inc();
                    }
                }
            }
        }
    }

    fn push(&mut self, source: PeerId, envelope: Envelope) -> Vec<Message> {
        let key = (source, envelope.epoch);
        let seq = envelope.seq;
        let message = Message::from_envelope(&self.topic, source, envelope, None, 1);
        self.reorder.push(key, seq, message, Instant::now())
    }

    fn count_order(&mut self) {
        let counts = std::mem::take(&mut self.reorder.counts);
        if counts.late > 0 {
            self.stats.late.fetch_add(counts.late, Ordering::Relaxed);
            self.metrics.late.inc_by(counts.late);
        }
        if counts.skipped > 0 {
            self.stats
                .skipped
                .fetch_add(counts.skipped, Ordering::Relaxed);
            self.metrics.skipped.inc_by(counts.skipped);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The DHT key under which the subscribers of `topic` are providers.
fn discovery_key(topic: &str) -> Vec<u8> {
    format!("/micromesh/broker/topic/{topic}").into_bytes()
}

/// The gossip topic whose subscribers are the members of queue group `group` of `topic`.
fn membership_topic(group: &str, topic: &str) -> String {
    format!("{MEMBERSHIP_PREFIX}{group}/{topic}")
}

fn parse_membership_topic(wire: &str) -> Option<(&str, &str)> {
    wire.strip_prefix(MEMBERSHIP_PREFIX)?.split_once('/')
}

fn check_topic(topic: &str) -> Result<(), Error> {
    gossip::check_user_topic(topic).map_err(|reason| Error::InvalidTopic {
        topic: topic.to_owned(),
        reason,
    })
}

fn check_group(group: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Error::InvalidGroup {
        group: group.to_owned(),
        reason: reason.to_owned(),
    };
    if group.is_empty() || group.len() > MAX_GROUP_LEN {
        return Err(invalid("a group name is 1 to 64 bytes"));
    }
    if !group
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "a group name has only ASCII letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_topics_round_trip() {
        let wire = membership_topic("billing", "orders/eu");
        assert_eq!(wire, "_queue/billing/orders/eu");
        assert_eq!(
            parse_membership_topic(&wire),
            Some(("billing", "orders/eu"))
        );
        assert_eq!(parse_membership_topic("orders"), None);
    }

    #[test]
    fn group_names_are_checked() {
        assert!(check_group("billing-2.eu_west").is_ok());
        assert!(check_group("").is_err());
        assert!(check_group("a/b").is_err());
        assert!(check_group(&"g".repeat(MAX_GROUP_LEN + 1)).is_err());
    }

    #[test]
    fn topic_limits_never_exceed_the_message_limit() {
        let config = Config::default()
            .max_message_size(1000)
            .topic_limit("small", 100)
            .topic_limit("big", 5000);
        assert_eq!(config.limit("small"), 100);
        assert_eq!(config.limit("big"), 1000);
        assert_eq!(config.limit("other"), 1000);
    }
}
