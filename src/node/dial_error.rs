//! Why a dial failed, in plain words.
//!
//! libp2p reports a failed dial as a tree of errors (one per address, each a chain of transport,
//! upgrade and I/O errors) whose `Display` repeats itself at every level. A user needs one
//! line per address: what happened, and what to check.

use std::{error::Error as StdError, io};

use libp2p::{Multiaddr, core::transport::TransportError, swarm::DialError};

/// One sentence (or, for several addresses, one clause per address) saying why `error`
/// happened and what to check.
pub(crate) fn explain(error: &DialError) -> String {
    match error {
        DialError::LocalPeerId { .. } => "the address is this node's own".into(),
        DialError::NoAddresses => "no address is known for the peer".into(),
        DialError::DialPeerConditionFalse(_) => "a connection to the peer already exists".into(),
        DialError::Aborted => "the dial was aborted".into(),
        DialError::WrongPeerId { obtained, .. } => format!(
            "reached peer {obtained} instead of the one the address names (is the peer id right?)"
        ),
        DialError::Denied { cause } => {
            format!(
                "refused by this node's connection limits: {}",
                innermost(cause)
            )
        }
        DialError::Transport(attempts) => match attempts.as_slice() {
            [] => "no address could be dialled".into(),
            [(_, e)] => transport(e),
            many => many
                .iter()
                .map(|(addr, e)| format!("{}: {}", without_peer(addr), transport(e)))
                .collect::<Vec<_>>()
                .join("; "),
        },
    }
}

/// `addr` without its `/p2p/<peer id>` suffix: the peer is named once, elsewhere.
pub(crate) fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(
        addr.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(_))
    ) {
        addr.pop();
    }
    addr
}

fn transport(error: &TransportError<io::Error>) -> String {
    match error {
        TransportError::MultiaddrNotSupported(_) => {
            "this node has no transport for such an address (QUIC with a pre-shared key, or a \
             protocol micromesh does not speak)"
                .into()
        }
        TransportError::Other(e) => io_cause(e),
    }
}

/// Walks an I/O error's chain for the first cause that says something a user can act on.
fn io_cause(error: &io::Error) -> String {
    let mut kinds = Vec::new();
    let mut texts = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            kinds.push(io.kind());
        }
        texts.push(e.to_string().to_lowercase());
        current = e.source();
    }
    let said = |needle: &str| texts.iter().any(|t| t.contains(needle));
    let kind = |k: io::ErrorKind| kinds.contains(&k);
    if kind(io::ErrorKind::ConnectionRefused) || said("connection refused") {
        "connection refused: nothing listens there (is a node running at that address?)".into()
    } else if kind(io::ErrorKind::TimedOut) || said("timed out") || said("timeout") {
        "no answer in time: the host may be down, or a firewall drops the packets (is a node \
         running there, and is the port open?)"
            .into()
    } else if kind(io::ErrorKind::HostUnreachable) || said("host unreachable") {
        "the host is unreachable".into()
    } else if kind(io::ErrorKind::NetworkUnreachable) || said("network unreachable") {
        "the network is unreachable from here".into()
    } else if kind(io::ErrorKind::AddrNotAvailable) || said("address not available") {
        "the address is not available on this host".into()
    } else if kind(io::ErrorKind::ConnectionReset) || said("connection reset") {
        "the remote reset the connection (a different network key, or not a micromesh node?)".into()
    } else if said("dns") || said("resolve") {
        format!("the name could not be resolved: {}", innermost(error))
    } else if said("noise") || said("tls") || said("handshake") || said("multistream") {
        format!(
            "the secure handshake failed (not a micromesh node, or a different pre-shared key?): {}",
            innermost(error)
        )
    } else {
        innermost(error)
    }
}

/// The deepest message of an error chain that is not empty.
fn innermost(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let s = e.to_string();
        if !s.trim().is_empty() {
            text = s;
        }
        current = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport_error(kind: io::ErrorKind, text: &str) -> DialError {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        DialError::Transport(vec![(
            addr,
            TransportError::Other(io::Error::new(kind, text.to_owned())),
        )])
    }

    #[test]
    fn refused_and_timed_out_dials_say_what_to_check() {
        let refused = explain(&transport_error(
            io::ErrorKind::ConnectionRefused,
            "os error",
        ));
        assert!(refused.starts_with("connection refused"), "{refused}");
        assert!(refused.contains("is a node running"), "{refused}");
        let timeout = explain(&transport_error(
            io::ErrorKind::Other,
            "Handshake with the remote timed out.",
        ));
        assert!(timeout.starts_with("no answer in time"), "{timeout}");
    }

    #[test]
    fn several_addresses_are_named_once_each_without_the_peer_suffix() {
        let peer = libp2p::PeerId::random();
        let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        let b: Multiaddr = format!("/ip4/127.0.0.1/udp/1/quic-v1/p2p/{peer}")
            .parse()
            .unwrap();
        let error = DialError::Transport(vec![
            (
                a,
                TransportError::Other(io::Error::from(io::ErrorKind::ConnectionRefused)),
            ),
            (b, TransportError::Other(io::Error::other("timed out"))),
        ]);
        let text = explain(&error);
        assert!(!text.contains(&peer.to_string()), "{text}");
        assert_eq!(text.matches("/ip4/127.0.0.1").count(), 2, "{text}");
        assert!(!text.contains(": :"), "{text}");
    }

    #[test]
    fn a_wrong_peer_id_says_so() {
        let obtained = libp2p::PeerId::random();
        let text = explain(&DialError::WrongPeerId {
            obtained,
            address: "/memory/1".parse().unwrap(),
        });
        assert!(text.contains("is the peer id right?"), "{text}");
    }
}
