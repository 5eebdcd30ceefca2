//! The selector: which node of a service gets the next call.
//!
//! Candidates come from the registry; [`Filter`]s narrow them (version, metadata, endpoint,
//! health); a [`Strategy`] picks one. The default, [`Strategy::LatencyWeighted`], is the one
//! tower, Finagle and linkerd use: each peer's latency is a peak-sensitive moving average
//! (peak-EWMA) of ping round trips and of observed call latencies, multiplied by its
//! outstanding requests plus one; two random candidates are drawn and the cheaper wins (power
//! of two choices; with five candidates or fewer, all are compared). A small share of picks is
//! uniform, so slow nodes keep being measured.
//!
//! Failures count against a node: each adds a penalty to its latency that fades over time
//! (and halves with each success), and after
//! [`Config::eject_after`] failures in a row the node is ejected for a backoff that doubles
//! with each ejection (up to [`Config::max_ejection`]); one success clears it.
//!
//! The client tells the selector the outcome of every call with [`Selector::mark`] (or by
//! dropping the [`Selected`] guard, which counts the call as finished without a result).
//!
//! ```
//! use std::time::Duration;
//! use micromesh::selector::{Outcome, Selector, SelectOptions};
//! # use micromesh::registry::Entry;
//! # fn services() -> Vec<Entry> { Vec::new() }
//!
//! let selector = Selector::new(Default::default());
//! let candidates = services(); // from registry.get_service("greeter")
//! if let Ok(selected) = selector.select("greeter", &candidates, &SelectOptions::default()) {
//!     let peer = selected.peer_id();
//!     // ... call `peer` ...
//!     selected.finish(Outcome::Success(Duration::from_millis(3)));
//! }
//! ```

mod ewma;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use self::ewma::{PeakEwma, Penalty};
use crate::{Multiaddr, PeerId, registry::Entry};

/// How the selector picks among the candidates that pass the filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// Peak-EWMA latency times outstanding requests, power of two random choices.
    #[default]
    LatencyWeighted,
    /// Uniformly at random.
    Random,
    /// In turn, per service, across calls.
    RoundRobin,
    /// The fewest outstanding requests (ties broken at random).
    LeastOutstanding,
}

/// A condition every selected node must meet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Filter {
    /// The service version equals this.
    Version(String),
    /// The node's metadata (or else the service's) has this key with this value.
    Metadata(String, String),
    /// The service has this endpoint.
    Endpoint(String),
    /// The node is not ejected for failures. Always applied unless
    /// [`SelectOptions::include_unhealthy`] is set.
    Healthy,
}

/// Options of one selection.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SelectOptions {
    /// The strategy. Default is [`Strategy::LatencyWeighted`].
    pub strategy: Strategy,
    /// Filters, all of which must pass. Default is none.
    pub filters: Vec<Filter>,
    /// Also consider ejected nodes (when nothing else is left, say). Default is `false`.
    pub include_unhealthy: bool,
    /// Peers not to pick (those a retry already tried). Default is none.
    pub exclude: Vec<PeerId>,
}

impl SelectOptions {
    /// Sets the strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Adds a filter.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// Excludes a peer.
    pub fn exclude(mut self, peer: PeerId) -> Self {
        self.exclude.push(peer);
        self
    }
}

/// The result of a call, for [`Selector::mark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The call succeeded after this long.
    Success(Duration),
    /// The call failed (could not connect, timed out, or the node answered unavailable).
    Failure,
}

/// Errors of selection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service has no nodes at all.
    #[error("service {0:?} has no nodes")]
    NoNodes(String),
    /// Nodes exist, but the filters (or ejections) left none.
    #[error("no node of service {0:?} passes the filters")]
    NoneAvailable(String),
}

/// Selector settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
    pub(crate) failure_penalty: Duration,
    pub(crate) explore: f64,
    pub(crate) full_scan_max: usize,
    pub(crate) eject_after: u32,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
}

impl Config {
    /// The latency assumed for a peer never measured. Default is 5 ms.
    pub fn default_rtt(mut self, value: Duration) -> Self {
        self.default_rtt = value;
        self
    }

    /// How fast old latency samples fade (the EWMA's time constant). Default is 10 s.
    pub fn decay(mut self, value: Duration) -> Self {
        self.decay = value;
        self
    }

    /// The penalty each failure adds to a node's latency; it fades with `decay`, and each
    /// success halves it. Default is 1 s.
    pub fn failure_penalty(mut self, value: Duration) -> Self {
        self.failure_penalty = value;
        self
    }

    /// The share of latency-weighted picks that are uniform, so that every node keeps being
    /// measured. Default is 0.05.
    pub fn explore(mut self, value: f64) -> Self {
        self.explore = value;
        self
    }

    /// Up to this many candidates, latency-weighted selection compares every one; above it,
    /// two chosen at random (power of two choices). Default is 5.
    pub fn full_scan_max(mut self, value: usize) -> Self {
        self.full_scan_max = value;
        self
    }

    /// Consecutive failures that eject a node. Default is 5.
    pub fn eject_after(mut self, value: u32) -> Self {
        self.eject_after = value;
        self
    }

    /// The first ejection's length; each further one doubles it. Default is 1 s.
    pub fn base_ejection(mut self, value: Duration) -> Self {
        self.base_ejection = value;
        self
    }

    /// The longest ejection. Default is 60 s.
    pub fn max_ejection(mut self, value: Duration) -> Self {
        self.max_ejection = value;
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_rtt: Duration::from_millis(5),
            decay: Duration::from_secs(10),
            failure_penalty: Duration::from_secs(1),
            explore: 0.05,
            full_scan_max: 5,
            eject_after: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct PeerStats {
    latency: PeakEwma,
    penalty: Penalty,
    outstanding: u32,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl PeerStats {
    fn new(config: &Config, now: Instant) -> Self {
        Self {
            latency: PeakEwma::new(config.default_rtt, config.decay, now),
            penalty: Penalty::new(config.decay, now),
            outstanding: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// The expected wait: latency plus the fading failure penalty, times the queue ahead.
    fn cost(&self, now: Instant) -> f64 {
        (self.latency.get().as_secs_f64() + self.penalty.get(now)) * f64::from(self.outstanding + 1)
    }
}

#[derive(Default)]
struct State {
    peers: HashMap<PeerId, PeerStats>,
    round_robin: HashMap<String, usize>,
}

/// Picks nodes and learns from outcomes. Cheap to clone; clones share what they learned.
#[derive(Clone)]
pub struct Selector {
    config: Arc<Config>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for Selector {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

/// A candidate that passed the filters.
struct Candidate<'a> {
    peer: PeerId,
    addresses: &'a [Multiaddr],
    version: &'a str,
}

/// The node a selection settled on.
struct Chosen {
    peer: PeerId,
    addresses: Vec<Multiaddr>,
    version: String,
}

/// Above this many candidates a selection samples them instead of scanning them all.
const SAMPLE_ABOVE: usize = 64;
/// How many candidates a sample looks at before it falls back to the scan.
const SAMPLE_TRIES: usize = 32;

/// Whether `node` of `service` may be picked now: not excluded, through every filter, and not
/// ejected (unless the options take unhealthy nodes).
fn eligible_now(
    state: &State,
    options: &SelectOptions,
    service: &Entry,
    node: &crate::registry::Instance,
    now: Instant,
) -> bool {
    !options.exclude.contains(&node.peer_id)
        && options.filters.iter().all(|f| passes(f, service, node))
        && (options.include_unhealthy
            || !state
                .peers
                .get(&node.peer_id)
                .is_some_and(|p| p.ejected(now)))
}

fn passes(filter: &Filter, service: &Entry, node: &crate::registry::Instance) -> bool {
    match filter {
        Filter::Version(v) => service.version == *v,
        Filter::Metadata(k, v) => {
            node.metadata.get(k).or_else(|| service.metadata.get(k)) == Some(v.as_str())
        }
        Filter::Endpoint(e) => service.has_endpoint(e),
        Filter::Healthy => true,
    }
}

impl Selector {
    /// A selector with these settings.
    pub fn new(config: Config) -> Self {
        Self {
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks a node of `service` from `candidates` (the versions the registry returned).
    ///
    /// The returned guard counts as an outstanding request until it is finished or dropped.
    ///
    /// # Errors
    ///
    /// [`Error::NoNodes`] when there are no candidates at all, [`Error::NoneAvailable`] when
    /// the filters, exclusions and ejections leave none.
    pub fn select(
        &self,
        service: &str,
        candidates: &[Entry],
        options: &SelectOptions,
    ) -> Result<Selected, Error> {
        self.select_at(service, candidates, options, Instant::now())
    }

    pub(crate) fn select_at(
        &self,
        service: &str,
        candidates: &[Entry],
        options: &SelectOptions,
        now: Instant,
    ) -> Result<Selected, Error> {
        let total: usize = candidates.iter().map(|s| s.nodes.len()).sum();
        if total == 0 {
            return Err(Error::NoNodes(service.to_owned()));
        }
        let mut state = self.state();
        // Many candidates: sample a few at random instead of scanning them all, so that a
        // call costs the same among ten instances as among ten thousand. The sample falls back
        // to the scan when it finds too few eligible ones (strict filters, most ejected).
        if total > SAMPLE_ABOVE
            && let Some(chosen) = self.sample(&mut state, service, candidates, total, options, now)
        {
            return Ok(self.guard(&mut state, chosen, now));
        }
        let mut eligible: Vec<Candidate<'_>> = Vec::new();
        let mut seen = HashSet::new();
        for s in candidates {
            for node in &s.nodes {
                if !eligible_now(&state, options, s, node, now) || !seen.insert(node.peer_id) {
                    continue;
                }
                eligible.push(Candidate {
                    peer: node.peer_id,
                    addresses: &node.addresses,
                    version: &s.version,
                });
            }
        }
        if eligible.is_empty() {
            return Err(Error::NoneAvailable(service.to_owned()));
        }
        // A stable order, so that round robin cycles the same way on every call.
        eligible.sort_by_key(|c| c.peer);
        let index = match options.strategy {
            Strategy::Random => rand::random_range(0..eligible.len()),
            Strategy::RoundRobin => {
                let counter = state.round_robin.entry(service.to_owned()).or_default();
                let index = *counter % eligible.len();
                *counter = counter.wrapping_add(1);
                index
            }
            Strategy::LeastOutstanding => {
                let outstanding =
                    |c: &Candidate<'_>| state.peers.get(&c.peer).map_or(0, |p| p.outstanding);
                let least = eligible.iter().map(outstanding).min().unwrap_or(0);
                let ties: Vec<usize> = (0..eligible.len())
                    .filter(|&i| outstanding(&eligible[i]) == least)
                    .collect();
                ties[rand::random_range(0..ties.len())]
            }
            Strategy::LatencyWeighted => {
                let n = eligible.len();
                if n > 1 && rand::random::<f64>() < self.config.explore {
                    rand::random_range(0..n)
                } else {
                    // Few candidates: compare them all. Many: two random choices, which keeps
                    // many independent clients from herding onto one node.
                    let choices: Vec<usize> = if n <= self.config.full_scan_max {
                        // From a random start, so that ties are broken at random.
                        let start = rand::random_range(0..n);
                        (0..n).map(|i| (start + i) % n).collect()
                    } else {
                        let a = rand::random_range(0..n);
                        let mut b = rand::random_range(0..n - 1);
                        if b >= a {
                            b += 1;
                        }
                        vec![a, b]
                    };
                    let config = &self.config;
                    let mut best = (f64::INFINITY, 0);
                    for i in choices {
                        let cost = state
                            .peers
                            .entry(eligible[i].peer)
                            .or_insert_with(|| PeerStats::new(config, now))
                            .cost(now);
                        if cost < best.0 {
                            best = (cost, i);
                        }
                    }
                    best.1
                }
            }
        };
        let chosen = &eligible[index];
        let chosen = Chosen {
            peer: chosen.peer,
            addresses: chosen.addresses.to_vec(),
            version: chosen.version.to_owned(),
        };
        Ok(self.guard(&mut state, chosen, now))
    }

    /// Picks among `total` candidates by sampling: random, or the cheaper of two random ones
    /// (latency-weighted), or the next in turn (round robin). `None` when the strategy needs
    /// every candidate (least outstanding) or the samples found too few eligible ones.
    fn sample(
        &self,
        state: &mut State,
        service: &str,
        candidates: &[Entry],
        total: usize,
        options: &SelectOptions,
        now: Instant,
    ) -> Option<Chosen> {
        let at = |mut i: usize| -> (&Entry, &crate::registry::Instance) {
            for s in candidates {
                if i < s.nodes.len() {
                    return (s, &s.nodes[i]);
                }
                i -= s.nodes.len();
            }
            unreachable!("an index below the total")
        };
        let chosen = |s: &Entry, node: &crate::registry::Instance| Chosen {
            peer: node.peer_id,
            addresses: node.addresses.clone(),
            version: s.version.clone(),
        };
        let wanted = match options.strategy {
            Strategy::LeastOutstanding => return None,
            Strategy::RoundRobin => {
                let first = *state.round_robin.entry(service.to_owned()).or_default();
                for step in 0..SAMPLE_TRIES {
                    let (s, node) = at((first + step) % total);
                    if eligible_now(state, options, s, node, now) {
                        let counter = state.round_robin.entry(service.to_owned()).or_default();
                        *counter = (first + step + 1) % total;
                        return Some(chosen(s, node));
                    }
                }
                return None;
            }
            Strategy::Random => 1,
            Strategy::LatencyWeighted if rand::random::<f64>() < self.config.explore => 1,
            Strategy::LatencyWeighted => 2,
        };
        let mut picked: Vec<(&Entry, &crate::registry::Instance)> = Vec::with_capacity(2);
        for _ in 0..SAMPLE_TRIES {
            let (s, node) = at(rand::random_range(0..total));
            if picked.iter().any(|(_, n)| n.peer_id == node.peer_id)
                || !eligible_now(state, options, s, node, now)
            {
                continue;
            }
            picked.push((s, node));
            if picked.len() == wanted {
                break;
            }
        }
        let config = &self.config;
        let best = picked.into_iter().min_by(|(_, a), (_, b)| {
            let mut cost = |peer: PeerId| {
                state
                    .peers
                    .entry(peer)
                    .or_insert_with(|| PeerStats::new(config, now))
                    .cost(now)
            };
            let (a, b) = (cost(a.peer_id), cost(b.peer_id));
            a.total_cmp(&b)
        })?;
        Some(chosen(best.0, best.1))
    }

    /// Counts the chosen peer's outstanding request, in a guard that gives it back.
    fn guard(&self, state: &mut State, chosen: Chosen, now: Instant) -> Selected {
        let config = &self.config;
        state
            .peers
            .entry(chosen.peer)
            .or_insert_with(|| PeerStats::new(config, now))
            .outstanding += 1;
        Selected {
            peer: chosen.peer,
            addresses: chosen.addresses,
            version: chosen.version,
            started: now,
            selector: Some(self.clone()),
        }
    }

    /// Forgets what was learned of `peer` (it left the mesh, or its connection closed), unless
    /// a call to it is still counted or it is ejected for now.
    pub(crate) fn forget(&self, peer: &PeerId) {
        let now = Instant::now();
        let mut state = self.state();
        if state
            .peers
            .get(peer)
            .is_some_and(|p| p.outstanding == 0 && !p.ejected(now))
        {
            state.peers.remove(peer);
        }
    }

    /// How many peers the selector keeps statistics for.
    pub fn tracked_peers(&self) -> usize {
        self.state().peers.len()
    }

    /// Records the outcome of a call to `peer` that was not made through a [`Selected`] guard.
    pub fn mark(&self, peer: PeerId, outcome: Outcome) {
        self.record(peer, Some(outcome), false, Instant::now());
    }

    /// Feeds the node's ping round trips into the latencies, and forgets peers whose
    /// connections closed, until the node stops.
    pub fn follow(&self, node: &crate::node::Node) {
        let selector = self.clone();
        let mut events = node.events();
        node.spawn_task("selector", async move {
            loop {
                match events.recv().await {
                    Ok(crate::node::Event::PeerRtt { peer_id, rtt }) => {
                        selector.observe_rtt(peer_id, rtt)
                    }
                    // What was learned of a peer goes with its connection: a node keeps no
                    // state of peers it no longer talks to.
                    Ok(
                        crate::node::Event::PeerDisconnected { peer_id }
                        | crate::node::Event::PeerLeft { peer_id },
                    ) => selector.forget(&peer_id),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    /// Feeds a ping round trip into `peer`'s latency.
    pub fn observe_rtt(&self, peer: PeerId, rtt: Duration) {
        let now = Instant::now();
        let config = &self.config;
        self.state()
            .peers
            .entry(peer)
            .or_insert_with(|| PeerStats::new(config, now))
            .latency
            .observe(rtt, now);
    }

    fn record(&self, peer: PeerId, outcome: Option<Outcome>, finished: bool, now: Instant) {
        let config = &self.config;
        let mut state = self.state();
        let stats = state
            .peers
            .entry(peer)
            .or_insert_with(|| PeerStats::new(config, now));
        if finished {
            stats.outstanding = stats.outstanding.saturating_sub(1);
        }
        match outcome {
            Some(Outcome::Success(latency)) => {
                stats.latency.observe(latency, now);
                stats.penalty.halve(now);
                stats.consecutive_failures = 0;
                stats.ejections = 0;
                stats.ejected_until = None;
            }
            Some(Outcome::Failure) => {
                stats.penalty.add(config.failure_penalty, now);
                stats.consecutive_failures += 1;
                if stats.consecutive_failures >= config.eject_after {
                    let backoff = config
                        .base_ejection
                        .saturating_mul(1 << stats.ejections.min(16))
                        .min(config.max_ejection);
                    stats.ejections += 1;
                    stats.consecutive_failures = 0;
                    stats.ejected_until = Some(now + backoff);
                    tracing::debug!(%peer, ?backoff, "ejected after repeated failures");
                }
            }
            None => {}
        }
    }

    /// What the selector knows of `peer`.
    pub fn stats(&self, peer: &PeerId) -> Option<PeerStatsView> {
        let now = Instant::now();
        self.state().peers.get(peer).map(|p| PeerStatsView {
            latency: p.latency.get() + Duration::from_secs_f64(p.penalty.get(now)),
            outstanding: p.outstanding,
            ejected: p.ejected(now),
        })
    }

    /// Whether `peer` is currently ejected.
    pub fn is_ejected(&self, peer: &PeerId) -> bool {
        self.stats(peer).is_some_and(|s| s.ejected)
    }
}

/// A snapshot of what the selector knows of one peer.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PeerStatsView {
    /// The current peak-EWMA latency estimate plus any failure penalty.
    pub latency: Duration,
    /// Calls in flight.
    pub outstanding: u32,
    /// Whether it is ejected for failures.
    pub ejected: bool,
}

/// The node picked for one call. Counts as an outstanding request until
/// [`Selected::finish`] reports the outcome or the guard is dropped.
#[must_use = "report the call's outcome with `finish`"]
pub struct Selected {
    peer: PeerId,
    addresses: Vec<Multiaddr>,
    version: String,
    started: Instant,
    selector: Option<Selector>,
}

impl fmt::Debug for Selected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selected")
            .field("peer", &self.peer)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Selected {
    /// The node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The addresses the node announced.
    pub fn addresses(&self) -> &[Multiaddr] {
        &self.addresses
    }

    /// The version of the service on this node.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// When the selection was made.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Reports the call's outcome and ends the outstanding request.
    pub fn finish(self, outcome: Outcome) {
        self.finish_at(outcome, Instant::now());
    }

    pub(crate) fn finish_at(mut self, outcome: Outcome, now: Instant) {
        if let Some(selector) = self.selector.take() {
            selector.record(self.peer, Some(outcome), true, now);
        }
    }
}

impl Drop for Selected {
    fn drop(&mut self) {
        if let Some(selector) = self.selector.take() {
            selector.record(self.peer, None, true, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
