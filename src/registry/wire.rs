//! The registry's wire format (`protocols/registry.md`): signed messages in CBOR.
//!
//! Every message is self-certifying: its body names the peer it speaks for, and the signature
//! by that peer's key covers the body and the network name. A node may therefore relay other
//! nodes' announcements (the sync protocol does), and no node can announce for another.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Identity, Metadata, Multiaddr, PeerId, identity};

/// The largest signed message accepted, in bytes.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The most service records one announcement carries.
pub(crate) const MAX_SERVICES: usize = 128;
/// The most endpoints one service record carries.
pub(crate) const MAX_ENDPOINTS: usize = 256;
/// The longest name (service, version, endpoint, type), in bytes.
pub(crate) const MAX_NAME: usize = 256;
/// The most metadata entries in one map.
pub(crate) const MAX_METADATA_ENTRIES: usize = 64;
/// The longest metadata key and value, in bytes.
pub(crate) const MAX_METADATA_KEY: usize = 128;
pub(crate) const MAX_METADATA_VALUE: usize = 1024;
/// The most addresses of one node, and the longest one in bytes.
pub(crate) const MAX_ADDRS: usize = 32;
pub(crate) const MAX_ADDR_BYTES: usize = 256;
/// Accepted time-to-live range.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);
pub(crate) const MAX_TTL: Duration = Duration::from_secs(3600);

/// What a signed message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Body {
    /// `peer` runs these services; forget them after `ttl_ms` without a newer announcement.
    Announce {
        #[serde(with = "serde_bytes")]
        peer: Vec<u8>,
        seq: u64,
        ttl_ms: u64,
        addrs: Vec<serde_bytes::ByteBuf>,
        services: Vec<ServiceRecord>,
    },
    /// `peer` is leaving: forget its services now.
    Leave {
        #[serde(with = "serde_bytes")]
        peer: Vec<u8>,
        seq: u64,
    },
    /// `reporter` lost its connection to `peer` and could not reach it again. Receivers check
    /// for themselves before they act on it.
    Suspect {
        #[serde(with = "serde_bytes")]
        reporter: Vec<u8>,
        #[serde(with = "serde_bytes")]
        peer: Vec<u8>,
    },
}

/// One service a node runs, as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServiceRecord {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) metadata: Metadata,
    pub(crate) endpoints: Vec<EndpointRecord>,
    pub(crate) node_metadata: Metadata,
}

/// One endpoint of a service, as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EndpointRecord {
    pub(crate) name: String,
    pub(crate) request: String,
    pub(crate) response: String,
    pub(crate) metadata: Metadata,
}

#[derive(Serialize)]
struct Signed<'a> {
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    #[serde(with = "serde_bytes")]
    sig: &'a [u8],
    /// The signer's [grants](crate::auth::Grant), outside the signature (each is signed by its
    /// issuer and names its subject); omitted when there are none.
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    g: &'a [serde_bytes::ByteBuf],
}

#[derive(Deserialize)]
struct SignedOwned {
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    sig: Vec<u8>,
    #[serde(default)]
    g: Vec<serde_bytes::ByteBuf>,
}

/// Why a message was refused. The reason names the metric label it is counted under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("message of {0} bytes is larger than {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("invalid content: {0}")]
    Invalid(String),
    #[error("published by another peer than its signer")]
    WrongPublisher,
}

impl Rejection {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Invalid(_) => "invalid",
            Self::WrongPublisher => "wrong_publisher",
        }
    }
}

/// A message whose signature and limits were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    /// The peer whose key signed it.
    pub(crate) signer: PeerId,
    pub(crate) body: Body,
    /// The grants the message carries (unchecked: the registry checks them against the rules).
    pub(crate) grants: Vec<serde_bytes::ByteBuf>,
}

fn signing_input(network: &str, body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(32 + network.len() + body.len());
    input.extend_from_slice(b"micromesh-registry-v1:");
    input.extend_from_slice(network.as_bytes());
    input.push(b':');
    input.extend_from_slice(body);
    input
}

fn to_cbor(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

/// Encodes and signs `body` as `identity`, carrying `grants`.
pub(crate) fn sign(
    identity: &Identity,
    network: &str,
    body: &Body,
    grants: &[serde_bytes::ByteBuf],
) -> Vec<u8> {
    let body = to_cbor(body);
    let sig = identity.sign(&signing_input(network, &body));
    to_cbor(&Signed {
        body: &body,
        sig: &sig,
        g: grants,
    })
}

/// Decodes a signed message from untrusted bytes, checks its size, shape, limits and
/// signature, and that the signer is the peer the message speaks for.
pub(crate) fn verify(network: &str, bytes: &[u8]) -> Result<Verified, Rejection> {
    verify_signed(network, bytes, None)
}

/// As [`verify`], for a message that arrived on gossip in a frame signed by `publisher`: the
/// frame's signature already covers these bytes, so the message must be `publisher`'s own
/// (else [`Rejection::WrongPublisher`]) and its own signature is not checked a second time.
/// Its limits are.
pub(crate) fn verify_published(
    network: &str,
    bytes: &[u8],
    publisher: PeerId,
) -> Result<Verified, Rejection> {
    verify_signed(network, bytes, Some(publisher))
}

fn verify_signed(
    network: &str,
    bytes: &[u8],
    publisher: Option<PeerId>,
) -> Result<Verified, Rejection> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::TooLarge(bytes.len()));
    }
    let signed: SignedOwned = ciborium::de::from_reader_with_recursion_limit(bytes, 32)
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    let body: Body = ciborium::de::from_reader_with_recursion_limit(&signed.body[..], 32)
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    let speaker = match &body {
        Body::Announce { peer, .. } | Body::Leave { peer, .. } => peer,
        Body::Suspect { reporter, .. } => reporter,
    };
    let signer =
        PeerId::from_bytes(speaker).map_err(|e| Rejection::Malformed(format!("peer id: {e}")))?;
    match publisher {
        Some(publisher) if publisher != signer => return Err(Rejection::WrongPublisher),
        Some(_) => {}
        None => {
            if !identity::verify(&signer, &signing_input(network, &signed.body), &signed.sig) {
                return Err(Rejection::BadSignature);
            }
        }
    }
    check_limits(&body)?;
    if signed.g.len() > crate::auth::MAX_PRESENTED {
        return Err(Rejection::Invalid(format!(
            "more than {} grants",
            crate::auth::MAX_PRESENTED
        )));
    }
    Ok(Verified {
        signer,
        body,
        grants: signed.g,
    })
}

fn check_name(what: &str, s: &str) -> Result<(), Rejection> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(Rejection::Invalid(format!(
            "{what} must be 1 to {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

fn check_metadata(md: &Metadata) -> Result<(), Rejection> {
    if md.len() > MAX_METADATA_ENTRIES {
        return Err(Rejection::Invalid(format!(
            "more than {MAX_METADATA_ENTRIES} metadata entries"
        )));
    }
    for (k, v) in md.iter() {
        if k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE {
            return Err(Rejection::Invalid("metadata entry too long".into()));
        }
    }
    Ok(())
}

fn check_limits(body: &Body) -> Result<(), Rejection> {
    match body {
        Body::Announce {
            ttl_ms,
            addrs,
            services,
            ..
        } => {
            let ttl = Duration::from_millis(*ttl_ms);
            if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                return Err(Rejection::Invalid(format!("ttl {ttl:?} out of range")));
            }
            if addrs.len() > MAX_ADDRS || services.len() > MAX_SERVICES {
                return Err(Rejection::Invalid("too many addresses or services".into()));
            }
            for addr in addrs {
                if addr.len() > MAX_ADDR_BYTES || Multiaddr::try_from(addr.to_vec()).is_err() {
                    return Err(Rejection::Invalid("invalid address".into()));
                }
            }
            for service in services {
                check_name("a service name", &service.name)?;
                check_name("a version", &service.version)?;
                check_metadata(&service.metadata)?;
                check_metadata(&service.node_metadata)?;
                if service.endpoints.len() > MAX_ENDPOINTS {
                    return Err(Rejection::Invalid("too many endpoints".into()));
                }
                for endpoint in &service.endpoints {
                    check_name("an endpoint name", &endpoint.name)?;
                    if endpoint.request.len() > MAX_NAME || endpoint.response.len() > MAX_NAME {
                        return Err(Rejection::Invalid("type name too long".into()));
                    }
                    check_metadata(&endpoint.metadata)?;
                }
            }
            let mut seen = std::collections::HashSet::new();
            if !services.iter().all(|s| seen.insert((&s.name, &s.version))) {
                return Err(Rejection::Invalid(
                    "a service version is listed twice".into(),
                ));
            }
            Ok(())
        }
        Body::Leave { .. } => Ok(()),
        Body::Suspect { peer, .. } => PeerId::from_bytes(peer)
            .map(drop)
            .map_err(|e| Rejection::Malformed(format!("suspect peer id: {e}"))),
    }
}

/// The sync protocol's request: every announcement the responder holds, or those of one
/// service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SyncRequest {
    pub(crate) service: Option<String>,
}

/// The largest sync request and response, in bytes.
pub(crate) const MAX_SYNC_REQUEST: usize = 1024;
pub(crate) const MAX_SYNC_RESPONSE: usize = 4 * 1024 * 1024;

pub(crate) fn encode_sync_request(request: &SyncRequest) -> Vec<u8> {
    to_cbor(request)
}

pub(crate) fn decode_sync_request(bytes: &[u8]) -> Result<SyncRequest, Rejection> {
    let request: SyncRequest = ciborium::de::from_reader_with_recursion_limit(bytes, 8)
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    if let Some(name) = &request.service {
        check_name("a service name", name)?;
    }
    Ok(request)
}

/// A sync response: the signed messages, each as it was signed.
pub(crate) fn encode_sync_response(messages: &[&[u8]]) -> Vec<u8> {
    let list: Vec<&serde_bytes::Bytes> = messages
        .iter()
        .map(|m| serde_bytes::Bytes::new(m))
        .collect();
    to_cbor(&list)
}

pub(crate) fn decode_sync_response(bytes: &[u8]) -> Result<Vec<serde_bytes::ByteBuf>, Rejection> {
    if bytes.len() > MAX_SYNC_RESPONSE {
        return Err(Rejection::TooLarge(bytes.len()));
    }
    ciborium::de::from_reader_with_recursion_limit(bytes, 8)
        .map_err(|e| Rejection::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex, vector_after};

    fn vector_identity() -> Identity {
        Identity::from_secret_bytes([1; 32])
    }

    fn vector_body() -> Body {
        let peer = vector_identity().peer_id();
        Body::Announce {
            peer: peer.to_bytes(),
            seq: 7,
            ttl_ms: 30_000,
            addrs: vec![serde_bytes::ByteBuf::from(
                "/ip4/127.0.0.1/tcp/4001"
                    .parse::<Multiaddr>()
                    .unwrap()
                    .to_vec(),
            )],
            services: vec![ServiceRecord {
                name: "greeter".into(),
                version: "1.0.0".into(),
                metadata: [("region", "eu")].into_iter().collect(),
                endpoints: vec![EndpointRecord {
                    name: "Greeter.Hello".into(),
                    request: "HelloRequest".into(),
                    response: "HelloReply".into(),
                    metadata: Metadata::new(),
                }],
                node_metadata: Metadata::new(),
            }],
        }
    }

    fn spec_vector(marker: &str) -> Vec<u8> {
        vector_after(include_str!("../../protocols/registry.md"), marker)
    }

    #[test]
    fn the_spec_vectors_decode_and_reencode() {
        let network = "main";
        let signed = sign(&vector_identity(), network, &vector_body(), &[]);
        let spec = include_str!("../../protocols/registry.md");
        assert!(spec.contains(&vector_identity().peer_id().to_string()));
        let from_spec = spec_vector("Vector 1");
        assert_eq!(
            hex(&signed),
            hex(&from_spec),
            "the encoder no longer produces the spec's bytes"
        );
        let verified = verify(network, &from_spec).unwrap();
        assert_eq!(verified.signer, vector_identity().peer_id());
        assert_eq!(verified.body, vector_body());
        // The same bytes are not valid on another network.
        assert_eq!(verify("other", &from_spec), Err(Rejection::BadSignature));

        let leave = spec_vector("Vector 2");
        let verified = verify(network, &leave).unwrap();
        assert_eq!(
            verified.body,
            Body::Leave {
                peer: vector_identity().peer_id().to_bytes(),
                seq: 8
            }
        );
        assert_eq!(
            hex(&leave),
            hex(&sign(
                &vector_identity(),
                network,
                &Body::Leave {
                    peer: vector_identity().peer_id().to_bytes(),
                    seq: 8
                },
                &[]
            ))
        );
    }

    #[test]
    fn nobody_announces_for_another_peer() {
        let mallory = Identity::from_secret_bytes([9; 32]);
        // Mallory signs a body that names the vector peer.
        let forged = sign(&mallory, "main", &vector_body(), &[]);
        assert_eq!(verify("main", &forged), Err(Rejection::BadSignature));
    }

    #[test]
    fn tampering_is_detected() {
        let signed = sign(&vector_identity(), "main", &vector_body(), &[]);
        for i in 0..signed.len() {
            let mut bad = signed.clone();
            bad[i] ^= 0x01;
            assert!(
                verify("main", &bad).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
        for len in 0..signed.len() {
            assert!(
                verify("main", &signed[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let id = vector_identity();
        let mut body = vector_body();
        if let Body::Announce { services, .. } = &mut body {
            services[0].name = "x".repeat(MAX_NAME + 1);
        }
        assert!(matches!(
            verify("main", &sign(&id, "main", &body, &[])),
            Err(Rejection::Invalid(_))
        ));
        let mut body = vector_body();
        if let Body::Announce { ttl_ms, .. } = &mut body {
            *ttl_ms = 0;
        }
        assert!(matches!(
            verify("main", &sign(&id, "main", &body, &[])),
            Err(Rejection::Invalid(_))
        ));
        let mut body = vector_body();
        if let Body::Announce { services, .. } = &mut body {
            services.push(services[0].clone());
        }
        assert!(matches!(
            verify("main", &sign(&id, "main", &body, &[])),
            Err(Rejection::Invalid(_))
        ));
        assert!(matches!(
            verify("main", &vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(Rejection::TooLarge(_))
        ));
        // Deeply nested CBOR is refused without exhausting the stack.
        let bomb = vec![0x81u8; 100_000];
        assert!(matches!(
            verify("main", &bomb[..MAX_MESSAGE_BYTES]),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    #[ignore = "prints the spec vectors; run with --ignored after a deliberate format change"]
    fn print_spec_vectors() {
        println!("peer id {}", vector_identity().peer_id());
        println!(
            "{}",
            hex(&sign(&vector_identity(), "main", &vector_body(), &[]))
        );
        println!(
            "{}",
            hex(&sign(
                &vector_identity(),
                "main",
                &Body::Leave {
                    peer: vector_identity().peer_id().to_bytes(),
                    seq: 8
                },
                &[]
            ))
        );
    }
}
