//! The auth exchange (`protocols/auth.md`): two peers tell each other their grants and the
//! revocations they know, on a stream of `/micromesh/<network>/auth/1.0.0`.
//!
//! A node starts an exchange when it connects to a peer and has something to tell (grants or
//! revocations), when a server needs the grants of a caller that has not presented them, and
//! when it learns new revocations (it passes them to every connected peer, which pass them on:
//! a revocation floods the mesh). Each side sends one `Hello` frame and reads one.

use std::{sync::Arc, time::Duration};

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::{broadcast, mpsc};

use futures::{FutureExt as _, future::BoxFuture};

use super::{Auth, Exchanger, MAX_PRESENTED, MAX_REVOCATIONS, Presentation, Revocation};
use crate::{
    PeerId,
    node::{Event, Node, WeakNode},
    transport::frame,
};

/// How long one exchange may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `Hello` frame: every grant and revocation at its limit, and framing.
pub(crate) const MAX_HELLO: usize = MAX_PRESENTED * (super::grant::MAX_GRANT + 4)
    + MAX_REVOCATIONS * (super::grant::MAX_REVOCATION + 4)
    + 128;

/// The auth protocol of a network.
pub(crate) fn protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/auth/1.0.0"))
        .expect("network names are protocol-safe")
}

/// One side's message: its grants, revocations, and the digest of every revocation it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    #[serde(rename = "g", default)]
    pub(crate) grants: Vec<ByteBuf>,
    #[serde(rename = "r", default)]
    pub(crate) revocations: Vec<ByteBuf>,
    #[serde(rename = "d", with = "serde_bytes")]
    pub(crate) digest: Vec<u8>,
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let hello: Self = ciborium::de::from_reader_with_recursion_limit(bytes, 8)
            .map_err(|e| format!("not an auth hello: {e}"))?;
        if hello.grants.len() > MAX_PRESENTED {
            return Err(format!("more than {MAX_PRESENTED} grants"));
        }
        if hello.revocations.len() > MAX_REVOCATIONS {
            return Err(format!("more than {MAX_REVOCATIONS} revocations"));
        }
        Ok(hello)
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot open an auth stream: {0}")]
    Open(#[from] crate::node::OpenError),
    #[error("auth stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("auth stream: {0}")]
    Read(#[from] frame::ReadError),
    #[error("{0}")]
    Invalid(String),
    #[error("the node has stopped")]
    Stopped,
}

/// The exchange of one node: what the auth policy needs to talk to peers. Cheap to clone.
///
/// The node's auth holds it, so it holds the node weakly.
#[derive(Clone)]
pub(crate) struct Handle {
    node: WeakNode,
    protocol: StreamProtocol,
}

impl Exchanger for Handle {
    fn ask(
        &self,
        auth: &Auth,
        peer: PeerId,
    ) -> BoxFuture<'static, Result<Arc<Presentation>, String>> {
        let (handle, auth) = (self.clone(), auth.clone());
        async move {
            match tokio::time::timeout(TIMEOUT, handle.exchange(&auth, peer, Vec::new())).await {
                Ok(Ok(grants)) => Ok(grants),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            }
        }
        .boxed()
    }

    fn spread(&self, auth: &Auth, revocation: Revocation) -> BoxFuture<'static, usize> {
        let (handle, auth) = (self.clone(), auth.clone());
        async move { handle.spread_now(&auth, &revocation).await }.boxed()
    }

    fn push_all(&self, auth: &Auth) {
        for peer in self.peers() {
            spawn_exchange(self, auth, peer, Vec::new());
        }
    }
}

impl Handle {
    fn peers(&self) -> Vec<PeerId> {
        self.node
            .upgrade()
            .map(|node| node.connected_peers())
            .unwrap_or_default()
    }

    /// Exchanges with `peer`, sending `revocations`; returns what it presented.
    pub(crate) async fn exchange(
        &self,
        auth: &Auth,
        peer: PeerId,
        revocations: Vec<Revocation>,
    ) -> Result<Arc<Presentation>, Error> {
        self.exchange_reply(auth, peer, revocations)
            .await
            .map(|(grants, _)| grants)
    }

    /// As [`Handle::exchange`], also returning the peer's answer.
    async fn exchange_reply(
        &self,
        auth: &Auth,
        peer: PeerId,
        revocations: Vec<Revocation>,
    ) -> Result<(Arc<Presentation>, Hello), Error> {
        let node = self.node.upgrade().ok_or(Error::Stopped)?;
        let mut stream = node.open_stream(peer, self.protocol.clone()).await?;
        drop(node);
        let hello = hello_of(auth, revocations);
        frame::write(&mut stream, &hello.encode()).await?;
        let reply = frame::read(&mut stream, MAX_HELLO).await?;
        let reply = Hello::decode(&reply).map_err(Error::Invalid)?;
        let grants = auth.record_presented(peer, &reply.grants);
        learn(self, auth, peer, &reply.revocations);
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
        Ok((grants, reply))
    }

    /// Hands `revocation` to every connected peer and waits for their answers; returns how
    /// many hold it now (their digest matches this node's, or they listed it).
    async fn spread_now(&self, auth: &Auth, revocation: &Revocation) -> usize {
        let exchanges = self.peers().into_iter().map(|peer| async move {
            let exchange = self.exchange_reply(auth, peer, vec![revocation.clone()]);
            match tokio::time::timeout(TIMEOUT, exchange).await {
                Ok(Ok((_, reply))) => {
                    reply.digest == auth.revocation_digest()
                        || reply
                            .revocations
                            .iter()
                            .any(|r| r.as_slice() == revocation.to_bytes())
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "handing over a revocation failed: {e}");
                    false
                }
                Err(_) => false,
            }
        });
        futures::future::join_all(exchanges)
            .await
            .into_iter()
            .filter(|held| *held)
            .count()
    }

    /// Passes new revocations to every connected peer but `except` (which sent them).
    fn push_revocations(&self, auth: &Auth, revocations: Vec<Revocation>, except: Option<PeerId>) {
        for peer in self.peers() {
            if Some(peer) != except {
                spawn_exchange(self, auth, peer, revocations.clone());
            }
        }
    }
}

fn hello_of(auth: &Auth, revocations: Vec<Revocation>) -> Hello {
    Hello {
        grants: auth.own_encoded(),
        revocations: revocations
            .iter()
            .map(|r| ByteBuf::from(r.to_bytes().to_vec()))
            .collect(),
        digest: auth.revocation_digest().to_vec(),
    }
}

fn spawn_exchange(handle: &Handle, auth: &Auth, peer: PeerId, revocations: Vec<Revocation>) {
    let Some(node) = handle.node.upgrade() else {
        return;
    };
    let (task, auth) = (handle.clone(), auth.clone());
    node.spawn_task("auth", async move {
        let exchange = task.exchange(&auth, peer, revocations);
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(%peer, "auth exchange failed: {e}"),
            Err(_) => tracing::debug!(%peer, "auth exchange timed out"),
        }
    });
}

/// Takes the revocations a peer sent; passes the new ones on to every other peer.
fn learn(handle: &Handle, auth: &Auth, from: PeerId, revocations: &[ByteBuf]) {
    let mut new = Vec::new();
    for bytes in revocations {
        match Revocation::decode(bytes) {
            Ok(revocation) => match auth.learn_revocation(revocation.clone()) {
                Ok(true) => new.push(revocation),
                Ok(false) => {}
                Err(e) => tracing::debug!(peer = %from, "revocation not taken: {e}"),
            },
            Err(e) => tracing::debug!(peer = %from, "invalid revocation: {e}"),
        }
    }
    if !new.is_empty() {
        handle.push_revocations(auth, new, Some(from));
    }
}

/// Answers one inbound exchange.
async fn serve(
    handle: &Handle,
    auth: &Auth,
    peer: PeerId,
    mut stream: libp2p::Stream,
) -> Result<(), Error> {
    let hello = frame::read(&mut stream, MAX_HELLO).await?;
    let hello = Hello::decode(&hello).map_err(Error::Invalid)?;
    auth.record_presented(peer, &hello.grants);
    learn(handle, auth, peer, &hello.revocations);
    let ours = auth.revocation_digest();
    let revocations = if hello.digest != ours {
        auth.revocations()
    } else {
        Vec::new()
    };
    frame::write(&mut stream, &hello_of(auth, revocations).encode()).await?;
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
    Ok(())
}

/// Starts the exchange of `node`'s auth: it serves the auth protocol, exchanges with every
/// peer that connects, and is what the policy asks when it needs to talk to peers.
///
/// # Errors
///
/// When the protocol is served already (an exchange runs on this node).
pub(crate) fn start(node: &Node) -> Result<(), crate::node::streams::AlreadyAccepted> {
    let protocol = protocol(node.network());
    let inbound = node.accept(protocol.clone())?;
    // Subscribed before the exchange is attached, so that no connection after it is missed.
    let events = node.events();
    let handle = Handle {
        node: node.downgrade(),
        protocol,
    };
    let auth = node.auth().clone();
    auth.attach(Arc::new(handle.clone()));
    node.spawn_task("auth", run(node.clone(), handle, auth, inbound, events));
    Ok(())
}

/// Serves inbound exchanges and starts one with every peer that connects, while the node runs.
async fn run(
    node: Node,
    handle: Handle,
    auth: Auth,
    mut inbound: mpsc::Receiver<(PeerId, libp2p::Stream)>,
    mut events: broadcast::Receiver<Event>,
) {
    loop {
        tokio::select! {
            next = inbound.recv() => {
                let Some((peer, stream)) = next else { break };
                let (task, auth) = (handle.clone(), auth.clone());
                node.spawn_task("auth", async move {
                    match tokio::time::timeout(TIMEOUT, serve(&task, &auth, peer, stream)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, "auth exchange failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "auth exchange timed out"),
                    }
                });
            }
            event = events.recv() => match event {
                Ok(Event::PeerConnected { peer_id, .. }) => {
                    let revocations = auth.revocations();
                    if !revocations.is_empty() || !auth.own_encoded().is_empty() {
                        spawn_exchange(&handle, &auth, peer_id, revocations);
                    }
                }
                Ok(Event::PeerDisconnected { peer_id }) => auth.forget(&peer_id),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_limits_are_checked() {
        // protocols/auth.md states these.
        assert_eq!(MAX_HELLO, 852_752);
        assert_eq!(super::super::MAX_GRANT, 2_341);
        let hello = Hello {
            grants: vec![ByteBuf::from(vec![1]); MAX_PRESENTED + 1],
            ..Hello::default()
        };
        assert!(
            Hello::decode(&hello.encode())
                .unwrap_err()
                .contains("grants")
        );
        assert!(Hello::decode(b"\xff\x00").is_err());
        let fine = Hello {
            digest: vec![0; 32],
            ..Hello::default()
        };
        assert_eq!(Hello::decode(&fine.encode()).unwrap(), fine);
    }
}
