//! The signed frame every gossip message travels in.
//!
//! Gossipsub can sign messages itself (`StrictSign`), but it checks the signature of every copy
//! a node receives, before its duplicate check: in a mesh each message arrives about once per
//! mesh peer, so a node verifies each message half a dozen times, and those checks were a third
//! of all the CPU gossip used. micromesh therefore publishes gossipsub messages without
//! gossipsub's author fields, puts its own signed frame in the data, and names each message by
//! the SHA-256 of its frame. Gossipsub drops the copies by that id, and the node checks the
//! signature once, on the first copy, before it delivers or forwards the message.
//!
//! The id covers the signature, so a forger cannot claim a real message's id without sending
//! that message's exact bytes, and a copy that differs in any byte is a different message, which
//! fails its own check. Layout and test vectors: `protocols/README.md`, "Gossip frames".

use libp2p::identity::{PublicKey, ed25519};
use sha2::{Digest as _, Sha256};

use crate::{Identity, PeerId};

/// The frame layout's version, its first byte.
pub(crate) const VERSION: u8 = 1;
/// Version, public key, sequence number and signature: the bytes a frame adds to its payload.
pub(crate) const OVERHEAD: usize = HEADER + SIGNATURE;
const HEADER: usize = 1 + 32 + 8;
const SIGNATURE: usize = 64;
/// What every signature starts with, so that no other signed micromesh object can pass for a
/// gossip frame.
const DOMAIN: &[u8] = b"micromesh-gossip/1\0";

/// Why a received frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Error {
    /// Fewer bytes than the fixed fields need.
    #[error("the frame is {0} bytes, shorter than its {OVERHEAD} bytes of fixed fields")]
    TooShort(usize),
    /// A layout this node does not know.
    #[error("unknown gossip frame version {0}")]
    UnknownVersion(u8),
    /// The 32 key bytes are not an ed25519 public key.
    #[error("the publisher's key is not an ed25519 public key")]
    BadKey,
    /// The signature does not match the key, topic, sequence number and payload.
    #[error("the signature does not match the publisher's key")]
    BadSignature,
}

/// A frame whose signature was checked.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) publisher: PeerId,
    pub(crate) sequence: u64,
    pub(crate) payload: Vec<u8>,
}

/// Frames `payload` for the gossipsub topic `wire_topic`, signed by `identity`.
pub(crate) fn seal(
    identity: &Identity,
    wire_topic: &str,
    sequence: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(OVERHEAD + payload.len());
    frame.push(VERSION);
    frame.extend_from_slice(&identity.public_key_bytes());
    frame.extend_from_slice(&sequence.to_be_bytes());
    let signature = identity.sign(&signed_bytes(wire_topic, &frame, payload));
    frame.extend_from_slice(&signature);
    frame.extend_from_slice(payload);
    frame
}

/// Checks a frame received on `wire_topic` and takes it apart.
pub(crate) fn open(wire_topic: &str, mut frame: Vec<u8>) -> Result<Verified, Error> {
    if frame.len() < OVERHEAD {
        return Err(Error::TooShort(frame.len()));
    }
    if frame[0] != VERSION {
        return Err(Error::UnknownVersion(frame[0]));
    }
    let key: [u8; 32] = frame[1..33].try_into().expect("32 bytes");
    let key = ed25519::PublicKey::try_from_bytes(&key).map_err(|_| Error::BadKey)?;
    let key = PublicKey::from(key);
    let sequence = u64::from_be_bytes(frame[33..HEADER].try_into().expect("8 bytes"));
    let (header, rest) = frame.split_at(HEADER);
    let (signature, payload) = rest.split_at(SIGNATURE);
    if !key.verify(&signed_bytes(wire_topic, header, payload), signature) {
        return Err(Error::BadSignature);
    }
    let publisher = key.to_peer_id();
    frame.drain(..OVERHEAD);
    Ok(Verified {
        publisher,
        sequence,
        payload: frame,
    })
}

/// The gossipsub message id of a frame: its SHA-256.
pub(crate) fn message_id(frame: &[u8]) -> Vec<u8> {
    Sha256::digest(frame).to_vec()
}

/// What the signature covers: the domain, the topic (length first), the frame's header and the
/// payload.
fn signed_bytes(wire_topic: &str, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let topic_len = u32::try_from(wire_topic.len()).unwrap_or(u32::MAX);
    let mut signed =
        Vec::with_capacity(DOMAIN.len() + 4 + wire_topic.len() + header.len() + payload.len());
    signed.extend_from_slice(DOMAIN);
    signed.extend_from_slice(&topic_len.to_be_bytes());
    signed.extend_from_slice(wire_topic.as_bytes());
    signed.extend_from_slice(header);
    signed.extend_from_slice(payload);
    signed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex, vector_after};

    const SPEC: &str = include_str!("../../protocols/README.md");
    const TOPIC: &str = "/micromesh/main/orders";

    fn alice() -> Identity {
        Identity::from_secret_bytes([7; 32])
    }

    #[test]
    fn frames_match_the_spec_vectors() {
        let frame = seal(&alice(), TOPIC, 1, b"hello");
        assert_eq!(hex(&frame), hex(&vector_after(SPEC, "Frame vector")));
        assert_eq!(
            hex(&message_id(&frame)),
            hex(&vector_after(SPEC, "Message id vector"))
        );
        let opened = open(TOPIC, frame).unwrap();
        assert_eq!(opened.publisher, alice().peer_id());
        assert_eq!(opened.sequence, 1);
        assert_eq!(opened.payload, b"hello");
    }

    #[test]
    fn any_changed_byte_fails_the_check() {
        let frame = seal(&alice(), TOPIC, 9, b"pay me");
        for i in 0..frame.len() {
            let mut tampered = frame.clone();
            tampered[i] ^= 0x01;
            let err = open(TOPIC, tampered).unwrap_err();
            let expected = match i {
                0 => Error::UnknownVersion(VERSION ^ 0x01),
                _ => Error::BadSignature,
            };
            // A flipped key bit may also give bytes that are no curve point.
            assert!(
                err == expected || (err == Error::BadKey && (1..33).contains(&i)),
                "byte {i}: {err:?}"
            );
        }
    }

    #[test]
    fn a_frame_is_bound_to_its_topic_and_its_signer() {
        let frame = seal(&alice(), TOPIC, 1, b"hello");
        assert_eq!(
            open("/micromesh/main/other", frame.clone()).unwrap_err(),
            Error::BadSignature
        );
        // Mallory signs, but names Alice's key.
        let mallory = Identity::from_secret_bytes([8; 32]);
        let mut forged = seal(&mallory, TOPIC, 1, b"hello");
        forged[1..33].copy_from_slice(&alice().public_key_bytes());
        assert_eq!(open(TOPIC, forged).unwrap_err(), Error::BadSignature);
    }

    #[test]
    fn short_and_empty_frames_are_refused() {
        for len in [0, 1, 40, OVERHEAD - 1] {
            assert_eq!(
                open(TOPIC, vec![VERSION; len]).unwrap_err(),
                Error::TooShort(len)
            );
        }
        let empty = seal(&alice(), TOPIC, 0, b"");
        assert_eq!(empty.len(), OVERHEAD);
        assert!(open(TOPIC, empty).unwrap().payload.is_empty());
    }
}
