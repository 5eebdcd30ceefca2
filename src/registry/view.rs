//! What one node knows of the mesh's services: a pure data structure, fed verified messages.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Endpoint, Entry, Event, Instance, wire};
use crate::{Multiaddr, PeerId};

/// What one peer runs, from its latest announcement.
#[derive(Debug, Clone)]
struct PeerEntry {
    seq: u64,
    expires: Instant,
    addrs: Vec<Multiaddr>,
    services: Vec<wire::ServiceRecord>,
    /// The signed announcement as received, for the sync protocol (empty once left or down).
    signed: Vec<u8>,
}

/// An announcement to apply, as decoded and checked.
#[derive(Debug, Clone)]
pub(crate) struct Announced {
    pub(crate) seq: u64,
    pub(crate) ttl: Duration,
    pub(crate) addrs: Vec<Multiaddr>,
    pub(crate) services: Vec<wire::ServiceRecord>,
    /// The signed bytes, kept for the sync protocol.
    pub(crate) signed: Vec<u8>,
}

fn instance(peer: PeerId, addrs: &[Multiaddr], record: &wire::ServiceRecord) -> Entry {
    Entry {
        name: record.name.clone(),
        version: record.version.clone(),
        metadata: record.metadata.clone(),
        endpoints: record
            .endpoints
            .iter()
            .map(|e| Endpoint {
                name: e.name.clone(),
                request: e.request.clone(),
                response: e.response.clone(),
                metadata: e.metadata.clone(),
            })
            .collect(),
        nodes: vec![Instance {
            peer_id: peer,
            addresses: addrs.to_vec(),
            metadata: record.node_metadata.clone(),
        }],
    }
}

/// The services known to one node.
///
/// Reads cost what the service asked for, not what the mesh holds: each name keeps the set of
/// peers that run it, and a snapshot of its versions and nodes (shared, built on the first
/// read after a change), so a call by name neither scans nor copies the view. Entries expire
/// from a queue ordered by time, not by scanning every peer.
#[derive(Debug)]
pub(crate) struct View {
    peers: HashMap<PeerId, PeerEntry>,
    /// The peers that run each service name.
    by_name: HashMap<String, BTreeSet<PeerId>>,
    /// Each name's versions and nodes, as last read; dropped when a peer running it changes.
    snapshots: HashMap<String, Arc<Vec<Entry>>>,
    /// When each entry expires, soonest first.
    expiries: BTreeSet<(Instant, PeerId)>,
    /// The most peers (entries and tombstones) the view holds.
    max_peers: usize,
}

impl Default for View {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MAX_PEERS)
    }
}

/// How many peers a view holds by default.
pub(crate) const DEFAULT_MAX_PEERS: usize = 100_000;

/// Why an announcement or leave changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unchanged {
    /// Not newer than what the view holds: a replay or a reordering.
    Stale,
    /// A new peer, and the view holds as many as it may.
    Full,
}

impl View {
    /// An empty view of at most `max_peers` peers.
    pub(crate) fn with_capacity(max_peers: usize) -> Self {
        Self {
            peers: HashMap::new(),
            by_name: HashMap::new(),
            snapshots: HashMap::new(),
            expiries: BTreeSet::new(),
            max_peers: max_peers.max(1),
        }
    }

    /// Replaces `peer`'s entry, keeping the name and expiry indexes in step. Returns the old one.
    fn put(&mut self, peer: PeerId, entry: PeerEntry) -> Option<PeerEntry> {
        for record in &entry.services {
            self.by_name
                .entry(record.name.clone())
                .or_default()
                .insert(peer);
            self.snapshots.remove(&record.name);
        }
        self.expiries.insert((entry.expires, peer));
        let expires = entry.expires;
        let names: Vec<String> = entry.services.iter().map(|r| r.name.clone()).collect();
        let old = self.peers.insert(peer, entry);
        if let Some(old) = &old {
            self.unindex(peer, old, Some((expires, &names)));
        }
        old
    }

    /// Drops `peer`'s entry and its indexes.
    fn take(&mut self, peer: PeerId) -> Option<PeerEntry> {
        let old = self.peers.remove(&peer)?;
        self.unindex(peer, &old, None);
        Some(old)
    }

    /// Removes what `old` put in the indexes and the entry now held (its expiry and names,
    /// if there is one) does not.
    fn unindex(&mut self, peer: PeerId, old: &PeerEntry, current: Option<(Instant, &[String])>) {
        if current.is_none_or(|(expires, _)| expires != old.expires) {
            self.expiries.remove(&(old.expires, peer));
        }
        for record in &old.services {
            self.snapshots.remove(&record.name);
            let still = current.is_some_and(|(_, names)| names.contains(&record.name));
            if !still && let Some(peers) = self.by_name.get_mut(&record.name) {
                peers.remove(&peer);
                if peers.is_empty() {
                    self.by_name.remove(&record.name);
                }
            }
        }
    }

    /// Makes room for a new peer: drops the tombstone that expires first, if the view is full.
    fn room_for(&mut self, peer: &PeerId) -> bool {
        if self.peers.len() < self.max_peers || self.peers.contains_key(peer) {
            return true;
        }
        let tombstone = self
            .expiries
            .iter()
            .find(|(_, p)| self.peers.get(p).is_some_and(|e| e.services.is_empty()))
            .map(|(_, p)| *p);
        match tombstone {
            Some(p) => {
                self.take(p);
                true
            }
            None => false,
        }
    }

    /// Applies an announcement. Returns the changes, or why nothing changed.
    pub(crate) fn announce(
        &mut self,
        peer: PeerId,
        announced: Announced,
        now: Instant,
    ) -> Result<Vec<Event>, Unchanged> {
        let Announced {
            seq,
            ttl,
            addrs,
            services,
            signed,
        } = announced;
        if self.peers.get(&peer).is_some_and(|e| e.seq >= seq) {
            return Err(Unchanged::Stale);
        }
        if !self.room_for(&peer) {
            return Err(Unchanged::Full);
        }
        let mut events = Vec::new();
        let key = |r: &wire::ServiceRecord| (r.name.clone(), r.version.clone());
        let old = self.peers.get(&peer);
        let old_services: BTreeMap<_, _> = old
            .map(|o| o.services.iter().map(|r| (key(r), r.clone())).collect())
            .unwrap_or_default();
        let old_addrs = old.map(|o| o.addrs.clone()).unwrap_or_default();
        for record in &services {
            match old_services.get(&key(record)) {
                None => events.push(Event::Created(instance(peer, &addrs, record))),
                Some(previous) if previous != record || old_addrs != addrs => {
                    events.push(Event::Updated(instance(peer, &addrs, record)));
                }
                Some(_) => {}
            }
        }
        for (k, record) in &old_services {
            if !services.iter().any(|r| key(r) == *k) {
                events.push(Event::Deleted(instance(peer, &old_addrs, record)));
            }
        }
        self.put(
            peer,
            PeerEntry {
                seq,
                expires: now + ttl,
                addrs,
                services,
                signed,
            },
        );
        Ok(events)
    }

    /// Forgets `peer`'s services because it left (`seq` newer than its last announcement).
    pub(crate) fn leave(
        &mut self,
        peer: PeerId,
        seq: u64,
        now: Instant,
    ) -> Result<Vec<Event>, Unchanged> {
        if self.peers.get(&peer).is_some_and(|e| e.seq >= seq) {
            return Err(Unchanged::Stale);
        }
        if !self.room_for(&peer) {
            return Err(Unchanged::Full);
        }
        Ok(self.tombstone(peer, seq, now))
    }

    /// Forgets `peer`'s services because it was found unreachable. Its last sequence number is
    /// kept, so a replay of an older announcement cannot bring it back.
    pub(crate) fn down(&mut self, peer: PeerId, now: Instant) -> Vec<Event> {
        match self.peers.get(&peer) {
            Some(entry) => {
                let seq = entry.seq;
                self.tombstone(peer, seq, now)
            }
            None => Vec::new(),
        }
    }

    fn tombstone(&mut self, peer: PeerId, seq: u64, now: Instant) -> Vec<Event> {
        let old = self.put(
            peer,
            PeerEntry {
                seq,
                // Tombstones are kept for a while so that late replays stay refused.
                expires: now + wire::MAX_TTL,
                addrs: Vec::new(),
                services: Vec::new(),
                signed: Vec::new(),
            },
        );
        old.map(|o| {
            o.services
                .iter()
                .map(|r| Event::Deleted(instance(peer, &o.addrs, r)))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Drops entries whose time to live has passed.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(&(at, peer)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            let due = self.peers.get(&peer).is_some_and(|e| e.expires == at);
            if due && let Some(old) = self.take(peer) {
                events.extend(
                    old.services
                        .iter()
                        .map(|r| Event::Deleted(instance(peer, &old.addrs, r))),
                );
            }
        }
        events
    }

    /// Whether `peer` currently has services in the view.
    pub(crate) fn has_services(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|e| !e.services.is_empty())
    }

    /// The addresses `peer` announced.
    pub(crate) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .get(peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// Every version of `name`, each with its nodes (in peer order), sorted by version: a
    /// shared snapshot, rebuilt only after a change to a peer that runs the name.
    pub(crate) fn service(&mut self, name: &str) -> Arc<Vec<Entry>> {
        if let Some(snapshot) = self.snapshots.get(name) {
            return snapshot.clone();
        }
        let mut versions: BTreeMap<String, Entry> = BTreeMap::new();
        for peer in self.by_name.get(name).into_iter().flatten() {
            let Some(entry) = self.peers.get(peer) else {
                continue;
            };
            for record in entry.services.iter().filter(|r| r.name == name) {
                let found = instance(*peer, &entry.addrs, record);
                match versions.get_mut(&record.version) {
                    Some(service) => service.nodes.extend(found.nodes),
                    None => {
                        versions.insert(record.version.clone(), found);
                    }
                }
            }
        }
        let snapshot = Arc::new(versions.into_values().collect::<Vec<_>>());
        if !snapshot.is_empty() {
            self.snapshots.insert(name.to_owned(), snapshot.clone());
        }
        snapshot
    }

    /// Every service name known, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort();
        names
    }

    /// How many peers the view holds (entries and tombstones).
    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }

    /// The signed announcements held, optionally only those listing `name`.
    pub(crate) fn signed(&self, name: Option<&str>) -> Vec<Vec<u8>> {
        let signed = |peer: &PeerId| {
            self.peers
                .get(peer)
                .filter(|e| !e.signed.is_empty())
                .map(|e| e.signed.clone())
        };
        match name {
            Some(name) => self
                .by_name
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(signed)
                .collect(),
            None => self.peers.keys().filter_map(signed).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn record(name: &str, version: &str) -> wire::ServiceRecord {
        wire::ServiceRecord {
            name: name.into(),
            version: version.into(),
            metadata: Metadata::new(),
            endpoints: Vec::new(),
            node_metadata: Metadata::new(),
        }
    }

    const TTL: Duration = Duration::from_secs(30);

    fn ann(seq: u64, ttl: Duration, services: Vec<wire::ServiceRecord>) -> Announced {
        Announced {
            seq,
            ttl,
            addrs: Vec::new(),
            services,
            signed: vec![1],
        }
    }

    #[test]
    fn create_update_delete_in_order() {
        let mut view = View::default();
        let peer = PeerId::random();
        let now = Instant::now();
        let events = view
            .announce(peer, ann(1, TTL, vec![record("a", "1")]), now)
            .unwrap();
        assert!(matches!(&events[..], [Event::Created(s)] if s.name == "a"));
        let mut changed = record("a", "1");
        changed.metadata.insert("k", "v");
        let events = view
            .announce(peer, ann(2, TTL, vec![changed]), now)
            .unwrap();
        assert!(matches!(&events[..], [Event::Updated(s)] if s.metadata.get("k") == Some("v")));
        let events = view.leave(peer, 3, now).unwrap();
        assert!(matches!(&events[..], [Event::Deleted(s)] if s.name == "a"));
        assert!(view.service("a").is_empty());
    }

    #[test]
    fn old_and_replayed_announcements_change_nothing() {
        let mut view = View::default();
        let peer = PeerId::random();
        let now = Instant::now();
        view.announce(peer, ann(5, TTL, vec![record("a", "1")]), now)
            .unwrap();
        assert!(view.announce(peer, ann(5, TTL, vec![]), now).is_err());
        assert!(view.announce(peer, ann(4, TTL, vec![]), now).is_err());
        assert!(view.leave(peer, 4, now).is_err());
        assert_eq!(view.service("a").len(), 1);
        // Down keeps the sequence number: the old announcement cannot come back.
        view.down(peer, now);
        assert!(
            view.announce(peer, ann(5, TTL, vec![record("a", "1")]), now)
                .is_err()
        );
        assert!(view.service("a").is_empty());
        // A restarted peer announces with a higher sequence number and is back.
        assert!(
            view.announce(peer, ann(6, TTL, vec![record("a", "1")]), now)
                .is_ok()
        );
    }

    #[test]
    fn versions_group_nodes_and_entries_expire() {
        let mut view = View::default();
        let now = Instant::now();
        let (p1, p2, p3) = (PeerId::random(), PeerId::random(), PeerId::random());
        view.announce(p1, ann(1, TTL, vec![record("a", "1")]), now)
            .unwrap();
        view.announce(p2, ann(1, TTL, vec![record("a", "1")]), now)
            .unwrap();
        view.announce(p3, ann(1, TTL * 2, vec![record("a", "2")]), now)
            .unwrap();
        let service = view.service("a");
        assert_eq!(service.len(), 2);
        assert_eq!(service[0].version, "1");
        assert_eq!(service[0].nodes.len(), 2);
        assert_eq!(service[1].nodes[0].peer_id, p3);
        let events = view.expire(now + TTL);
        assert_eq!(events.len(), 2);
        assert_eq!(view.service("a").len(), 1);
        assert_eq!(view.names(), vec!["a".to_owned()]);
    }

    #[test]
    fn a_full_view_takes_no_new_peer_but_makes_room_from_tombstones() {
        let mut view = View::with_capacity(2);
        let now = Instant::now();
        let (p1, p2, p3) = (PeerId::random(), PeerId::random(), PeerId::random());
        view.announce(p1, ann(1, TTL, vec![record("a", "1")]), now)
            .unwrap();
        view.announce(p2, ann(1, TTL, vec![record("b", "1")]), now)
            .unwrap();
        assert_eq!(
            view.announce(p3, ann(1, TTL, vec![record("c", "1")]), now)
                .unwrap_err(),
            Unchanged::Full
        );
        // Known peers still update.
        view.announce(p1, ann(2, TTL, vec![record("a", "2")]), now)
            .unwrap();
        // A tombstone gives its place up.
        view.down(p2, now);
        view.announce(p3, ann(1, TTL, vec![record("c", "1")]), now)
            .unwrap();
        assert_eq!(view.len(), 2);
        assert_eq!(view.names(), vec!["a".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn snapshots_are_shared_until_a_change() {
        let mut view = View::default();
        let now = Instant::now();
        let (p1, p2) = (PeerId::random(), PeerId::random());
        view.announce(p1, ann(1, TTL, vec![record("a", "1")]), now)
            .unwrap();
        let first = view.service("a");
        assert!(
            Arc::ptr_eq(&first, &view.service("a")),
            "no rebuild without a change"
        );
        // Another service's change leaves it alone.
        view.announce(p2, ann(1, TTL, vec![record("b", "1")]), now)
            .unwrap();
        assert!(Arc::ptr_eq(&first, &view.service("a")));
        view.announce(p2, ann(2, TTL, vec![record("a", "1")]), now)
            .unwrap();
        let second = view.service("a");
        assert_eq!(second[0].nodes.len(), 2);
        assert!(view.service("b").is_empty());
    }
}
