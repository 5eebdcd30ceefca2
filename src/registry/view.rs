//! What one node knows of the mesh's services: a pure data structure, fed verified messages.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use super::{Endpoint, Event, Node, Service, wire};
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

/// The services known to one node.
#[derive(Debug, Default)]
pub(crate) struct View {
    peers: HashMap<PeerId, PeerEntry>,
}

fn instance(peer: PeerId, addrs: &[Multiaddr], record: &wire::ServiceRecord) -> Service {
    Service {
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
        nodes: vec![Node {
            peer_id: peer,
            addresses: addrs.to_vec(),
            metadata: record.node_metadata.clone(),
        }],
    }
}

impl View {
    /// Applies an announcement. Returns the changes, or `None` if it was not newer than what
    /// the view holds (a replay or a reordering), in which case nothing changed.
    pub(crate) fn announce(
        &mut self,
        peer: PeerId,
        announced: Announced,
        now: Instant,
    ) -> Option<Vec<Event>> {
        let Announced {
            seq,
            ttl,
            addrs,
            services,
            signed,
        } = announced;
        if self.peers.get(&peer).is_some_and(|e| e.seq >= seq) {
            return None;
        }
        let old = self.peers.remove(&peer);
        let mut events = Vec::new();
        let key = |r: &wire::ServiceRecord| (r.name.clone(), r.version.clone());
        let old_services: BTreeMap<_, _> = old
            .as_ref()
            .map(|o| o.services.iter().map(|r| (key(r), r)).collect())
            .unwrap_or_default();
        let old_addrs = old.as_ref().map(|o| o.addrs.clone()).unwrap_or_default();
        for record in &services {
            match old_services.get(&key(record)) {
                None => events.push(Event::Created(instance(peer, &addrs, record))),
                Some(previous) if *previous != record || old_addrs != addrs => {
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
        self.peers.insert(
            peer,
            PeerEntry {
                seq,
                expires: now + ttl,
                addrs,
                services,
                signed,
            },
        );
        Some(events)
    }

    /// Forgets `peer`'s services because it left (`seq` newer than its last announcement).
    pub(crate) fn leave(&mut self, peer: PeerId, seq: u64, now: Instant) -> Option<Vec<Event>> {
        if self.peers.get(&peer).is_some_and(|e| e.seq >= seq) {
            return None;
        }
        Some(self.tombstone(peer, seq, now))
    }

    /// Forgets `peer`'s services because it was found unreachable. Its last sequence number is
    /// kept, so a replay of an older announcement cannot bring it back.
    pub(crate) fn down(&mut self, peer: PeerId, now: Instant) -> Vec<Event> {
        let seq = self.peers.get(&peer).map_or(0, |e| e.seq);
        self.tombstone(peer, seq, now)
    }

    fn tombstone(&mut self, peer: PeerId, seq: u64, now: Instant) -> Vec<Event> {
        let old = self.peers.insert(
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
        let expired: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(p, _)| *p)
            .collect();
        let mut events = Vec::new();
        for peer in expired {
            if let Some(old) = self.peers.remove(&peer) {
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

    /// Every version of `name`, each with its nodes, sorted by version.
    pub(crate) fn service(&self, name: &str) -> Vec<Service> {
        let mut versions: BTreeMap<String, Service> = BTreeMap::new();
        let mut peers: Vec<_> = self.peers.iter().collect();
        peers.sort_by_key(|(p, _)| **p);
        for (peer, entry) in peers {
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
        versions.into_values().collect()
    }

    /// Every service name known.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .peers
            .values()
            .flat_map(|e| e.services.iter().map(|r| r.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The signed announcements held, optionally only those listing `name`.
    pub(crate) fn signed(&self, name: Option<&str>) -> Vec<Vec<u8>> {
        self.peers
            .values()
            .filter(|e| !e.signed.is_empty())
            .filter(|e| name.is_none_or(|n| e.services.iter().any(|r| r.name == n)))
            .map(|e| e.signed.clone())
            .collect()
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
        view.announce(peer, ann(5, TTL, vec![record("a", "1")]), now);
        assert!(view.announce(peer, ann(5, TTL, vec![]), now).is_none());
        assert!(view.announce(peer, ann(4, TTL, vec![]), now).is_none());
        assert!(view.leave(peer, 4, now).is_none());
        assert_eq!(view.service("a").len(), 1);
        // Down keeps the sequence number: the old announcement cannot come back.
        view.down(peer, now);
        assert!(
            view.announce(peer, ann(5, TTL, vec![record("a", "1")]), now)
                .is_none()
        );
        assert!(view.service("a").is_empty());
        // A restarted peer announces with a higher sequence number and is back.
        assert!(
            view.announce(peer, ann(6, TTL, vec![record("a", "1")]), now)
                .is_some()
        );
    }

    #[test]
    fn versions_group_nodes_and_entries_expire() {
        let mut view = View::default();
        let now = Instant::now();
        let (p1, p2, p3) = (PeerId::random(), PeerId::random(), PeerId::random());
        view.announce(p1, ann(1, TTL, vec![record("a", "1")]), now);
        view.announce(p2, ann(1, TTL, vec![record("a", "1")]), now);
        view.announce(p3, ann(1, TTL * 2, vec![record("a", "2")]), now);
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
}
