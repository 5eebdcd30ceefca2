//! Relays found through the mesh (libp2p's "autorelay").
//!
//! A node behind a NAT cannot be dialled, so it listens through relays: it reserves a slot on
//! a peer that offers circuit-relay service and listens on `<relay>/p2p-circuit`, an address
//! others reach it at (and from which DCUtR upgrades them to a direct connection). No relay is
//! configured: the candidates are the connected peers whose identify lists the relay's HOP
//! protocol, which public micromesh nodes offer by default
//! ([`Builder::relay_server`](super::Builder::relay_server)).
//!
//! The node keeps [`Builder::auto_relays`](super::Builder::auto_relays) reservations while
//! AutoNAT has not found it publicly reachable, replaces one whose relay leaves, and gives them
//! all up once it is found reachable. A reservation still being granted is given up only once
//! granted: `libp2p-relay` 0.22's client panics when a reservation it no longer listens for is
//! accepted.
//!
//! Each node picks its relays at random among the candidates, so that the nodes behind NATs
//! spread over the public ones.

use std::collections::HashMap;

use libp2p::{Multiaddr, PeerId, core::transport::ListenerId, multiaddr::Protocol};
use rand::seq::IndexedRandom as _;

/// The relays this node listens through, and the connected peers that could be one.
#[derive(Debug)]
pub(crate) struct AutoRelay {
    /// How many reservations to keep; 0 turns the mechanism off.
    wanted: usize,
    /// Connected peers offering relay service, with the address to reach each.
    candidates: HashMap<PeerId, Multiaddr>,
    /// The relays listened through, with their listeners and whether the relay granted the
    /// reservation yet.
    active: HashMap<PeerId, (ListenerId, bool)>,
    /// Whether AutoNAT found this node publicly reachable.
    public: bool,
}

/// What the event loop must do for [`AutoRelay`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Listen on this relayed address (`<relay address>/p2p/<relay>/p2p-circuit`).
    Listen(PeerId, Multiaddr),
    /// Stop listening through a relay.
    Stop(ListenerId),
}

impl AutoRelay {
    /// Keeps `wanted` reservations while the node is not known to be reachable.
    pub(crate) fn new(wanted: usize) -> Self {
        Self {
            wanted,
            candidates: HashMap::new(),
            active: HashMap::new(),
            public: false,
        }
    }

    /// A connected peer identified itself: `relay` says whether it offers relay service, and
    /// `addr` is an address it listens on, as it reported it (the relayed listen address goes
    /// through it).
    pub(crate) fn on_identified(
        &mut self,
        peer: PeerId,
        relay: bool,
        addr: Option<Multiaddr>,
    ) -> Vec<Action> {
        match (relay, addr) {
            (true, Some(addr)) if !is_relayed(&addr) => {
                self.candidates.insert(peer, addr);
            }
            _ => {
                self.candidates.remove(&peer);
            }
        }
        self.fill()
    }

    /// The last connection to `peer` closed. Its circuit listener, if any, closes by itself.
    pub(crate) fn on_disconnected(&mut self, peer: &PeerId) {
        self.candidates.remove(peer);
    }

    /// A listener closed: if it was a relay's, another relay takes its place. A relay that
    /// refused or broke the reservation (`failed`) is not asked again while connected.
    pub(crate) fn on_listener_closed(&mut self, listener: ListenerId, failed: bool) -> Vec<Action> {
        let Some(relay) = self.relay_of(listener) else {
            return Vec::new();
        };
        self.active.remove(&relay);
        if failed {
            self.candidates.remove(&relay);
        }
        self.fill()
    }

    /// A listen request failed at once: the relay is not used.
    pub(crate) fn on_listen_failed(&mut self, relay: &PeerId) {
        self.candidates.remove(relay);
    }

    /// The node asked to listen through `relay` on `listener`.
    pub(crate) fn on_listening(&mut self, relay: PeerId, listener: ListenerId) {
        self.active.insert(relay, (listener, false));
    }

    /// A listener got an address: if it is a relay's, the relay granted the reservation, which
    /// a node found reachable meanwhile now gives up.
    pub(crate) fn on_granted(&mut self, listener: ListenerId) -> Vec<Action> {
        let Some(relay) = self.relay_of(listener) else {
            return Vec::new();
        };
        if self.public {
            self.active.remove(&relay);
            return vec![Action::Stop(listener)];
        }
        self.active.insert(relay, (listener, true));
        Vec::new()
    }

    /// AutoNAT's verdict changed: a reachable node gives up its relays (those granted; the
    /// others once granted), an unreachable one takes some.
    pub(crate) fn on_reachability(&mut self, public: bool) -> Vec<Action> {
        self.public = public;
        if public {
            let mut stops = Vec::new();
            self.active.retain(|_, (listener, granted)| {
                if *granted {
                    stops.push(Action::Stop(*listener));
                }
                !*granted
            });
            return stops;
        }
        self.fill()
    }

    fn relay_of(&self, listener: ListenerId) -> Option<PeerId> {
        self.active
            .iter()
            .find_map(|(peer, (l, _))| (*l == listener).then_some(*peer))
    }

    fn fill(&mut self) -> Vec<Action> {
        if self.public || self.wanted == 0 {
            return Vec::new();
        }
        let free: Vec<(&PeerId, &Multiaddr)> = self
            .candidates
            .iter()
            .filter(|(peer, _)| !self.active.contains_key(peer))
            .collect();
        let wanted = self.wanted.saturating_sub(self.active.len());
        free.sample(&mut rand::rng(), wanted)
            .map(|&(&peer, addr)| {
                let circuit = addr
                    .clone()
                    .with_p2p(peer)
                    .unwrap_or_else(|a| a)
                    .with(Protocol::P2pCircuit);
                Action::Listen(peer, circuit)
            })
            .collect()
    }
}

/// Whether `addr` goes through a relay.
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/{port}").parse().unwrap()
    }

    fn listens(actions: &[Action]) -> Vec<PeerId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Listen(peer, circuit) => {
                    assert!(is_relayed(circuit), "{circuit}");
                    Some(*peer)
                }
                Action::Stop(_) => None,
            })
            .collect()
    }

    #[test]
    fn keeps_the_wanted_number_of_relays_and_replaces_a_lost_one() {
        let mut relays = AutoRelay::new(2);
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let mut listening = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            for p in listens(&relays.on_identified(*peer, true, Some(addr(4000 + i as u16)))) {
                let id = ListenerId::next();
                relays.on_listening(p, id);
                listening.push((p, id));
            }
        }
        assert_eq!(listening.len(), 2, "two relays, not three");
        // A peer that offers no relay service is no candidate.
        assert!(
            relays
                .on_identified(PeerId::random(), false, Some(addr(1)))
                .is_empty()
        );
        // The first relay's listener closes: the third peer takes its place.
        let (lost, id) = listening[0];
        relays.on_disconnected(&lost);
        let replacement = listens(&relays.on_listener_closed(id, false));
        assert_eq!(replacement.len(), 1);
        assert!(!listening.iter().any(|(p, _)| *p == replacement[0]));
    }

    #[test]
    fn a_reachable_node_gives_its_relays_up_and_takes_none() {
        let mut relays = AutoRelay::new(1);
        let peer = PeerId::random();
        assert_eq!(
            listens(&relays.on_identified(peer, true, Some(addr(1)))),
            [peer]
        );
        let id = ListenerId::next();
        relays.on_listening(peer, id);
        assert!(relays.on_granted(id).is_empty());
        assert_eq!(relays.on_reachability(true), [Action::Stop(id)]);
        assert!(
            relays
                .on_identified(PeerId::random(), true, Some(addr(2)))
                .is_empty()
        );
        // Unreachable again: the relays are back.
        assert_eq!(listens(&relays.on_reachability(false)).len(), 1);
    }

    #[test]
    fn a_reservation_being_granted_is_given_up_once_granted() {
        let mut relays = AutoRelay::new(1);
        let peer = PeerId::random();
        assert_eq!(
            listens(&relays.on_identified(peer, true, Some(addr(1)))),
            [peer]
        );
        let id = ListenerId::next();
        relays.on_listening(peer, id);
        assert!(relays.on_reachability(true).is_empty(), "not granted yet");
        assert_eq!(relays.on_granted(id), [Action::Stop(id)]);
        assert!(relays.on_granted(id).is_empty(), "given up already");
    }

    #[test]
    fn a_relayed_address_is_no_way_to_a_relay() {
        let mut relays = AutoRelay::new(1);
        let via: Multiaddr = format!("{}/p2p/{}/p2p-circuit", addr(1), PeerId::random())
            .parse()
            .unwrap();
        assert!(
            relays
                .on_identified(PeerId::random(), true, Some(via))
                .is_empty()
        );
        assert!(AutoRelay::new(0).on_reachability(false).is_empty());
    }

    #[test]
    fn a_relay_that_refuses_is_not_asked_again() {
        let mut relays = AutoRelay::new(1);
        let (refuses, other) = (PeerId::random(), PeerId::random());
        assert_eq!(
            listens(&relays.on_identified(refuses, true, Some(addr(1)))),
            [refuses]
        );
        let id = ListenerId::next();
        relays.on_listening(refuses, id);
        assert!(
            relays.on_identified(other, true, Some(addr(2))).is_empty(),
            "one relay is enough"
        );
        assert_eq!(listens(&relays.on_listener_closed(id, true)), [other]);
        // An unknown listener (not a relay's) changes nothing.
        assert!(
            relays
                .on_listener_closed(ListenerId::next(), true)
                .is_empty()
        );
    }
}
