//! Queue groups: the publisher delivers each message to one member of each group and waits
//! for its acknowledgement, redelivering to another member on failure.
//!
//! Delivery runs on the queue protocol of the network (`/micromesh/<network>/broker/1.0.0`):
//! one stream per delivery attempt, carrying one `Deliver` frame from the publisher and one
//! `Ack` frame back (`protocols/broker.md`).

use std::{
    collections::HashSet,
    sync::{Arc, Weak, atomic::Ordering},
    time::{Duration, Instant},
};

use libp2p::StreamProtocol;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{
    Error, GroupDelivery, Inner, Message, QueueItem,
    wire::{self, Ack, Deliver, Envelope},
};
use crate::{PeerId, transport::frame};

/// How many deliveries to this node's members are served at once.
pub(crate) const MAX_SERVING: usize = 256;
/// How long a member waits for the delivery frame once a stream is open.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The first and the longest pause before a group whose every member failed is tried again.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The queue protocol of `network`.
pub(crate) fn protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/broker/1.0.0"))
        .expect("starts with a slash")
}

/// The publisher's pending queue-group deliveries.
pub(crate) struct Outbox {
    capacity: usize,
    pending: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
}

impl Outbox {
    pub(crate) fn new(capacity: usize, max_in_flight: usize) -> Self {
        Self {
            capacity,
            pending: Arc::new(Semaphore::new(capacity)),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// Reserves room for `n` deliveries, all or none.
    pub(crate) fn reserve(&self, n: usize) -> Result<Vec<OwnedSemaphorePermit>, Error> {
        let mut permits = Vec::with_capacity(n);
        for _ in 0..n {
            match self.pending.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => {
                    return Err(Error::OutboxFull {
                        capacity: self.capacity,
                    });
                }
            }
        }
        Ok(permits)
    }

    pub(crate) fn pending(&self) -> usize {
        self.capacity - self.pending.available_permits()
    }

    pub(crate) async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pending() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Delivers one message to one member of `group`, redelivering until a member acknowledges it
/// or the attempts or the deadline run out, and reports how it ended.
pub(crate) async fn deliver(
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
    topic: String,
    group: String,
    envelope: Envelope,
    report: oneshot::Sender<GroupDelivery>,
) {
    let (member, attempts, error) = attempt_delivery(&inner, &topic, &group, &envelope).await;
    // Nobody may be waiting for the report.
    let _ = report.send(GroupDelivery {
        group,
        member,
        attempts,
        error,
    });
}

/// The member that took the message (or `None`), the attempts made, and the last failure.
async fn attempt_delivery(
    inner: &Arc<Inner>,
    topic: &str,
    group: &str,
    envelope: &Envelope,
) -> (Option<PeerId>, u32, Option<String>) {
    let config = &inner.config;
    let deadline = Instant::now() + config.redelivery_deadline;
    let me = inner.node.peer_id();
    let mut tried: HashSet<PeerId> = HashSet::new();
    let mut attempt = 0u32;
    let mut backoff = FIRST_BACKOFF;
    let mut last_error = String::from("no member of the group was found");
    loop {
        if attempt >= config.max_attempts || Instant::now() >= deadline {
            inner.metrics.dead_lettered.inc();
            tracing::warn!(
                %topic, %group, seq = envelope.seq, attempts = attempt,
                "queue-group message given up: {last_error}"
            );
            return (None, attempt, Some(last_error));
        }
        let members = match inner.group_members(topic, group, attempt > 0).await {
            Ok(members) => members,
            Err(e) => {
                tracing::debug!("cannot list queue-group members: {e}");
                return (None, attempt, Some(e.to_string()));
            }
        };
        let candidates: Vec<PeerId> = members
            .iter()
            .copied()
            .filter(|m| !tried.contains(m))
            .collect();
        if candidates.is_empty() {
            // Nobody left to try: wait for members to appear, or to recover.
            tried.clear();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        let peer = inner.pick(topic, group, &candidates);
        attempt += 1;
        if attempt > 1 {
            inner.metrics.redelivered.inc();
        }
        let outcome = {
            let _flight = inner.in_flight().await;
            let delivery = Deliver {
                topic: topic.to_owned(),
                group: group.to_owned(),
                attempt,
                message: envelope.clone(),
            };
            let send = async {
                if peer == me {
                    deliver_locally(inner, me, delivery).await
                } else {
                    send(&inner.node, peer, &delivery).await
                }
            };
            match tokio::time::timeout(config.ack_timeout, send).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!(
                    "no acknowledgement within {:?}",
                    config.ack_timeout
                )),
            }
        };
        match outcome {
            Ok(()) => return (Some(peer), attempt, None),
            Err(reason) => {
                tracing::debug!(%topic, %group, %peer, attempt, "queue delivery failed: {reason}");
                last_error = format!("{peer}: {reason}");
                tried.insert(peer);
            }
        }
    }
}

/// Sends one delivery to a member and reads its acknowledgement.
pub(crate) async fn send(
    node: &crate::node::Node,
    peer: PeerId,
    delivery: &Deliver,
) -> Result<(), String> {
    let protocol = protocol(node.network());
    let mut stream = node
        .open_stream(peer, protocol)
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    frame::write(&mut stream, &delivery.encode())
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let ack = frame::read(&mut stream, wire::MAX_ACK_BYTES)
        .await
        .map_err(|e| format!("no acknowledgement: {e}"))?;
    let ack = Ack::decode(&ack).map_err(|e| format!("bad acknowledgement: {e}"))?;
    if ack.code == 200 {
        Ok(())
    } else {
        Err(format!("refused with {}: {}", ack.code, ack.detail))
    }
}

async fn deliver_locally(inner: &Inner, me: PeerId, delivery: Deliver) -> Result<(), String> {
    let message = Message::from_envelope(
        &delivery.topic,
        me,
        delivery.message,
        Some(delivery.group.clone()),
        delivery.attempt,
    );
    match hand_to_member(inner, &delivery.topic, &delivery.group, message).await {
        Ack { code: 200, .. } => Ok(()),
        Ack { code, detail } => Err(format!("refused with {code}: {detail}")),
    }
}

/// Gives a message to a local member of the group and waits for its handler.
async fn hand_to_member(inner: &Inner, topic: &str, group: &str, message: Message) -> Ack {
    let members: Vec<mpsc::Sender<QueueItem>> = {
        let local = inner.local.lock().unwrap_or_else(|e| e.into_inner());
        match local.groups.get(&(topic.to_owned(), group.to_owned())) {
            Some(members) => members.iter().map(|(_, q)| q.clone()).collect(),
            None => {
                return Ack::refuse(404, format!("not a member of group {group:?} of {topic:?}"));
            }
        }
    };
    let (ack, result) = oneshot::channel();
    let mut item = QueueItem { message, ack };
    let mut queued = false;
    for member in members {
        match member.try_send(item) {
            Ok(()) => {
                queued = true;
                break;
            }
            Err(
                mpsc::error::TrySendError::Full(back) | mpsc::error::TrySendError::Closed(back),
            ) => {
                item = back;
            }
        }
    }
    if !queued {
        inner.metrics.dropped.inc();
        return Ack::refuse(429, "every local member's queue is full");
    }
    match result.await {
        Ok(Ok(())) => Ack::ok(),
        Ok(Err(status)) => Ack::refuse(status.code().as_u16(), status.detail()),
        Err(_) => Ack::refuse(503, "the member unsubscribed"),
    }
}

/// Serves deliveries to this node's members until the broker is gone.
pub(crate) async fn serve(
    broker: Weak<Inner>,
    mut inbound: mpsc::Receiver<(PeerId, libp2p::Stream)>,
) {
    // Deliveries served at once: beyond, streams wait in the node's bounded inbound queue, and
    // beyond that the node refuses them (the publisher redelivers elsewhere).
    let slots = Arc::new(Semaphore::new(MAX_SERVING));
    while let Some((peer, stream)) = inbound.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(inner) = broker.upgrade() else {
            return;
        };
        inner.serving.fetch_add(1, Ordering::AcqRel);
        let node = inner.node.clone();
        node.spawn_task("broker", async move {
            let _slot = slot;
            if let Err(e) = serve_one(&inner, peer, stream).await {
                tracing::debug!(%peer, "queue delivery stream failed: {e}");
            }
            inner.serving.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn serve_one(inner: &Inner, peer: PeerId, mut stream: libp2p::Stream) -> std::io::Result<()> {
    // The frame limit leaves room for the delivery's topic and group names.
    let max = inner.config.max_message_size + 1024;
    let frame = match tokio::time::timeout(READ_TIMEOUT, frame::read(&mut stream, max)).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(frame::ReadError::TooLarge { size, max })) => {
            let ack = Ack::refuse(
                413,
                format!("a delivery of {size} bytes exceeds {max} bytes"),
            );
            return frame::write(&mut stream, &ack.encode()).await;
        }
        Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    let ack = match Deliver::decode(&frame) {
        Err(e) => {
            inner.metrics.rejected.inc();
            Ack::refuse(400, e.to_string())
        }
        Ok(delivery) if frame.len() > inner.config.limit(&delivery.topic) + 1024 => {
            inner.metrics.rejected.inc();
            Ack::refuse(413, format!("messages on {:?} are limited", delivery.topic))
        }
        Ok(delivery)
            if let Err(denied) = super::authorize_publisher(
                inner.node.auth(),
                peer,
                &delivery.topic,
                &delivery.message,
            ) =>
        {
            inner.metrics.rejected.inc();
            Ack::refuse(denied.code, denied.reason)
        }
        Ok(delivery) => {
            let message = Message::from_envelope(
                &delivery.topic,
                peer,
                delivery.message,
                Some(delivery.group.clone()),
                delivery.attempt,
            );
            hand_to_member(inner, &delivery.topic, &delivery.group, message).await
        }
    };
    frame::write(&mut stream, &ack.encode()).await
}

impl Inner {
    /// The members of one group: connected peers announcing it, and this node if it has one.
    async fn group_members(
        &self,
        topic: &str,
        group: &str,
        fresh: bool,
    ) -> Result<Vec<PeerId>, Error> {
        let mut members = self
            .members(topic, fresh)
            .await?
            .remove(group)
            .unwrap_or_default();
        let local = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .contains_key(&(topic.to_owned(), group.to_owned()));
        if local {
            members.push(self.node.peer_id());
        }
        Ok(members)
    }

    /// Round robin over `candidates`, per group.
    fn pick(&self, topic: &str, group: &str, candidates: &[PeerId]) -> PeerId {
        let mut counters = self.round_robin.lock().unwrap_or_else(|e| e.into_inner());
        let counter = counters
            .entry((topic.to_owned(), group.to_owned()))
            .or_insert(0);
        let peer = candidates[*counter % candidates.len()];
        *counter = counter.wrapping_add(1);
        peer
    }

    async fn in_flight(&self) -> Option<OwnedSemaphorePermit> {
        self.outbox.in_flight.clone().acquire_owned().await.ok()
    }
}
