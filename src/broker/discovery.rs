//! Finding a topic's subscribers before publishing on it.
//!
//! A publisher can only send to subscribers it knows: gossipsub sends to connected peers that
//! announced the topic, and queue-group messages go to connected members of each group. A node
//! that just joined knows neither. So before its first message on a topic, a publisher runs a
//! *discovery round*: it looks up the topic's providers in the DHT (every subscriber, broadcast
//! or queue group, provides the topic's key), connects to those it is not connected to, and
//! waits until each of them has told it what it subscribes to (gossipsub does so right after a
//! connection opens). Only then does it know both kinds of subscribers; publishing as soon as
//! the first of them turned up is how a publish used to reach only the broadcast subscribers or
//! only the queue groups.
//!
//! Rounds are shared: every publish waiting on a topic waits for the same round. A topic
//! discovered once is refreshed in the background (at most every [`REFRESH`]) so that later
//! subscribers are found without making publishes wait.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use futures::{
    FutureExt as _, StreamExt as _,
    future::{BoxFuture, Shared},
};
use tokio::sync::broadcast::error::RecvError;

use super::{MEMBERSHIP_PREFIX, discovery_key, parse_membership_topic};
use crate::{
    PeerId,
    node::{Event, Node},
};

/// How often a topic already discovered is looked up again, in the background.
pub(super) const REFRESH: Duration = Duration::from_secs(10);
/// How soon a round follows one that found nobody, while a publish waits for a subscriber.
const RETRY: Duration = Duration::from_millis(500);
/// How many providers one round connects to at most, and how many at once. The DHT returns
/// at most 20 providers per peer asked.
const MAX_DIALS: usize = 32;
const CONCURRENT_DIALS: usize = 8;
/// How long one dial of a round may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a round waits for the subscriptions of the providers it connected to. A provider
/// that says nothing of the topic by then has unsubscribed (its DHT record outlives it).
const SUBSCRIPTION_GRACE: Duration = Duration::from_secs(1);

type Round = Shared<BoxFuture<'static, ()>>;

#[derive(Default)]
struct Topic {
    /// When the last round ended.
    ended: Option<Instant>,
    /// The round under way.
    running: Option<Round>,
}

type Topics = Mutex<HashMap<String, Topic>>;

/// The discovery rounds of one broker, per topic.
#[derive(Default)]
pub(super) struct Discovery {
    topics: Arc<Topics>,
}

impl Discovery {
    /// What a publish on `topic` waits for before it sends: the first round on the topic
    /// (started if need be), or nothing when a round has ended already. In that case a stale
    /// topic is refreshed in the background.
    pub(super) fn before_publish(&self, node: &Node, topic: &str) -> Option<Round> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let state = topics.entry(topic.to_owned()).or_default();
        match state.ended {
            None => Some(self.start(state, node, topic, None)),
            Some(ended) => {
                if ended.elapsed() >= REFRESH {
                    drop(self.start(state, node, topic, None));
                }
                None
            }
        }
    }

    /// Starts a background round on `topic` unless one ended within [`REFRESH`]: what a new
    /// subscription does, to connect to the topic's other subscribers.
    pub(super) fn refresh(&self, node: &Node, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let state = topics.entry(topic.to_owned()).or_default();
        if state.ended.is_none_or(|ended| ended.elapsed() >= REFRESH) {
            drop(self.start(state, node, topic, None));
        }
    }

    /// A round to wait for when a publish found nobody: the one under way, or a new one no
    /// sooner than [`RETRY`] after the last.
    pub(super) fn retry(&self, node: &Node, topic: &str) -> Round {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let state = topics.entry(topic.to_owned()).or_default();
        let not_before = state.ended.map(|ended| ended + RETRY);
        self.start(state, node, topic, not_before)
    }

    /// Starts a round on `topic` unless one runs, and returns the running one.
    fn start(
        &self,
        state: &mut Topic,
        node: &Node,
        topic: &str,
        not_before: Option<Instant>,
    ) -> Round {
        if let Some(running) = &state.running {
            return running.clone();
        }
        let topics = Arc::downgrade(&self.topics);
        let name = topic.to_owned();
        let round = run(node.clone(), topic.to_owned(), not_before)
            .map(move |()| ended(&topics, &name))
            .boxed()
            .shared();
        state.running = Some(round.clone());
        // The round runs whether or not anybody waits for it.
        node.spawn_task("broker", round.clone());
        round
    }
}

/// One round: look up the providers, connect to the ones not connected, and wait until each
/// provider's subscription is known. Failures are logged: a round only widens what the publisher knows.
async fn run(node: Node, topic: String, not_before: Option<Instant>) {
    if let Some(at) = not_before {
        tokio::time::sleep_until(at.into()).await;
    }
    // Subscribed before the first dial, so that no subscription announced after it is missed.
    let mut events = node.events();
    let me = node.peer_id();
    match node.providers(discovery_key(&topic)).await {
        Ok(providers) => {
            let others: Vec<PeerId> = providers.into_iter().filter(|p| *p != me).collect();
            let (connected, unconnected): (Vec<PeerId>, Vec<PeerId>) =
                others.into_iter().partition(|p| node.is_connected(p));
            let unconnected = unconnected.into_iter().take(MAX_DIALS);
            let reached: HashSet<PeerId> = futures::stream::iter(unconnected)
                .map(|peer| {
                    let node = node.clone();
                    async move {
                        match tokio::time::timeout(DIAL_TIMEOUT, node.probe(peer, Vec::new())).await
                        {
                            Ok(Ok(())) => Some(peer),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "cannot reach a topic subscriber: {e}");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "no connection to a topic subscriber in time");
                                None
                            }
                        }
                    }
                })
                .buffer_unordered(CONCURRENT_DIALS)
                .filter_map(std::future::ready)
                .collect()
                .await;
            // Connected providers may not have told this node of their subscription yet either
            // (they subscribed a moment ago).
            let waiting = reached.into_iter().chain(connected).collect();
            wait_for_subscriptions(&node, &topic, waiting, &mut events).await;
        }
        Err(e) => tracing::debug!(%topic, "cannot look up the topic's subscribers: {e}"),
    }
}

/// Records the end of the round on `topic` (unless the broker is gone).
fn ended(topics: &Weak<Topics>, topic: &str) {
    let Some(topics) = topics.upgrade() else {
        return;
    };
    let mut topics = topics.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(state) = topics.get_mut(topic) {
        state.ended = Some(Instant::now());
        state.running = None;
    }
}

/// Waits until every peer of `waiting` announced a subscription to `topic` (broadcast, or a
/// queue group of it), for at most [`SUBSCRIPTION_GRACE`].
async fn wait_for_subscriptions(
    node: &Node,
    topic: &str,
    mut waiting: HashSet<PeerId>,
    events: &mut tokio::sync::broadcast::Receiver<Event>,
) {
    let concerns =
        |t: &str| t == topic || parse_membership_topic(t).is_some_and(|(_, t)| t == topic);
    let grace = tokio::time::sleep(SUBSCRIPTION_GRACE);
    tokio::pin!(grace);
    let mut check_state = true;
    while !waiting.is_empty() {
        if check_state {
            // What the node knows already (subscriptions that arrived before the events were
            // subscribed to, or events lost by a lagging receiver).
            check_state = false;
            for peer in node.topic_peers(topic).await.unwrap_or_default() {
                waiting.remove(&peer);
            }
            for (t, peer) in node
                .topics_with_prefix(MEMBERSHIP_PREFIX)
                .await
                .unwrap_or_default()
            {
                if concerns(&t) {
                    waiting.remove(&peer);
                }
            }
            continue;
        }
        tokio::select! {
            event = events.recv() => match event {
                Ok(Event::PeerSubscribed { peer_id, topic: t }) if concerns(&t) => {
                    waiting.remove(&peer_id);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => check_state = true,
                Err(RecvError::Closed) => return,
            },
            () = &mut grace => {
                tracing::debug!(%topic, silent = waiting.len(), "providers that announced no subscription to the topic");
                return;
            }
        }
    }
}
