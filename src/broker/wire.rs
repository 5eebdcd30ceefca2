//! The broker's wire format (`protocols/broker.md`): message envelopes, queue deliveries and
//! their acknowledgements, all CBOR.
//!
//! Every broadcast message travels in a gossip frame signed by its publisher (checked by the
//! node, `protocols/README.md`), and a queue delivery travels on a stream of a connection authenticated by the publisher's key, so the
//! envelope itself carries no signature.

use serde::{Deserialize, Serialize};

use crate::Metadata;

/// The envelope version this implementation writes and reads.
pub(crate) const VERSION: u8 = 1;
/// The most headers one message carries.
pub(crate) const MAX_HEADERS: usize = 64;
/// The longest header key and value, in bytes.
pub(crate) const MAX_HEADER_KEY: usize = 128;
pub(crate) const MAX_HEADER_VALUE: usize = 4096;
/// The longest content type, in bytes.
pub(crate) const MAX_CONTENT_TYPE: usize = 128;
/// The longest acknowledgement detail, in bytes (longer details are cut).
pub(crate) const MAX_ACK_DETAIL: usize = 1024;
/// The largest acknowledgement frame.
pub(crate) const MAX_ACK_BYTES: usize = 4096;

/// One published message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    #[serde(rename = "v")]
    pub(crate) version: u8,
    /// The publisher's epoch: random, chosen when its broker started.
    #[serde(rename = "e")]
    pub(crate) epoch: u64,
    /// The message's number among the publisher's messages on this topic in this epoch, from 0.
    #[serde(rename = "s")]
    pub(crate) seq: u64,
    /// When it was published, in milliseconds since the Unix epoch (publisher's clock).
    #[serde(rename = "t")]
    pub(crate) time_ms: u64,
    /// The body's MIME type.
    #[serde(rename = "c")]
    pub(crate) content_type: String,
    #[serde(rename = "h", default, skip_serializing_if = "Metadata::is_empty")]
    pub(crate) headers: Metadata,
    /// Shared, so that every local subscriber, hook and queue group gets the body without a
    /// copy.
    #[serde(rename = "b")]
    pub(crate) body: bytes::Bytes,
    /// The publisher's [grants](crate::auth::Grant), for receivers whose rules ask for roles.
    #[serde(rename = "g", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) grants: Vec<serde_bytes::ByteBuf>,
}

/// Why bytes are not an acceptable envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    #[error("not a broker envelope: {0}")]
    Malformed(String),
    #[error("unsupported envelope version {0}")]
    Version(u8),
    #[error("{0}")]
    Limit(String),
}

impl Envelope {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 64);
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// The length of [`Envelope::encode`]'s output, without writing (or copying) it.
    pub(crate) fn encoded_len(&self) -> usize {
        let mut counter = Counter(0);
        ciborium::into_writer(self, &mut counter).expect("counting cannot fail");
        counter.0
    }

    /// Decodes and checks untrusted bytes.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Invalid> {
        let envelope: Self = decode_exact(bytes).map_err(Invalid::Malformed)?;
        envelope.check()?;
        Ok(envelope)
    }

    /// Checks the version and the limits of a decoded envelope.
    fn check(&self) -> Result<(), Invalid> {
        if self.version != VERSION {
            return Err(Invalid::Version(self.version));
        }
        check_headers(&self.headers).map_err(Invalid::Limit)?;
        if self.grants.len() > crate::auth::MAX_PRESENTED {
            return Err(Invalid::Limit(format!(
                "a message carries at most {} grants",
                crate::auth::MAX_PRESENTED
            )));
        }
        if self.content_type.is_empty() || self.content_type.len() > MAX_CONTENT_TYPE {
            return Err(Invalid::Limit(format!(
                "a content type is 1 to {MAX_CONTENT_TYPE} bytes"
            )));
        }
        Ok(())
    }
}

/// Checks the header limits; used on publish and on receipt.
pub(crate) fn check_headers(headers: &Metadata) -> Result<(), String> {
    if headers.len() > MAX_HEADERS {
        return Err(format!(
            "a message has at most {MAX_HEADERS} headers, this one has {}",
            headers.len()
        ));
    }
    for (key, value) in headers.iter() {
        if key.is_empty() || key.len() > MAX_HEADER_KEY {
            return Err(format!("a header key is 1 to {MAX_HEADER_KEY} bytes"));
        }
        if value.len() > MAX_HEADER_VALUE {
            return Err(format!(
                "header {key:?} has {} bytes, the limit is {MAX_HEADER_VALUE}",
                value.len()
            ));
        }
    }
    Ok(())
}

/// A queue-group delivery: publisher to the chosen member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Deliver {
    #[serde(rename = "t")]
    pub(crate) topic: String,
    #[serde(rename = "g")]
    pub(crate) group: String,
    /// 1 for the first attempt, counting up with every redelivery.
    #[serde(rename = "a")]
    pub(crate) attempt: u32,
    #[serde(rename = "m")]
    pub(crate) message: Envelope,
}

impl Deliver {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.message.body.len() + 128);
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Invalid> {
        let deliver: Self = decode_exact(bytes).map_err(Invalid::Malformed)?;
        deliver.message.check()?;
        Ok(deliver)
    }
}

/// The member's answer to a delivery: a status code (200: handled) and a detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ack {
    #[serde(rename = "c")]
    pub(crate) code: u16,
    #[serde(rename = "d", default, skip_serializing_if = "String::is_empty")]
    pub(crate) detail: String,
}

impl Ack {
    pub(crate) fn ok() -> Self {
        Self {
            code: 200,
            detail: String::new(),
        }
    }

    pub(crate) fn refuse(code: u16, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_ACK_DETAIL {
            let mut cut = MAX_ACK_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Self { code, detail }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Invalid> {
        decode_exact(bytes).map_err(Invalid::Malformed)
    }
}

/// A writer that only counts what it is given.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut reader = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, 16)
        .map_err(|e| e.to_string())?;
    if !reader.is_empty() {
        return Err(format!("{} trailing bytes", reader.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex, vector_after};

    const SPEC: &str = include_str!("../../protocols/broker.md");

    fn vector(marker: &str, actual: &[u8]) -> Vec<u8> {
        let expected = vector_after(SPEC, marker);
        assert_eq!(hex(actual), hex(&expected), "{marker}");
        expected
    }

    fn example() -> Envelope {
        Envelope {
            version: 1,
            epoch: 0x0102_0304_0506_0708,
            seq: 7,
            time_ms: 1_700_000_000_000,
            content_type: "application/json".into(),
            headers: [("trace", "abc")].into_iter().collect(),
            body: bytes::Bytes::from_static(br#"{"id":1}"#),
            grants: Vec::new(),
        }
    }

    #[test]
    fn envelopes_match_the_spec_vectors() {
        let envelope = example();
        let bytes = vector("Vector: Envelope", &envelope.encode());
        assert_eq!(Envelope::decode(&bytes).unwrap(), envelope);

        let deliver = Deliver {
            topic: "orders".into(),
            group: "billing".into(),
            attempt: 2,
            message: Envelope {
                headers: Metadata::new(),
                ..envelope
            },
        };
        let bytes = vector("Vector: Deliver", &deliver.encode());
        assert_eq!(Deliver::decode(&bytes).unwrap(), deliver);

        let ack = Ack::refuse(503, "busy");
        let bytes = vector("Vector: Ack refused", &ack.encode());
        assert_eq!(Ack::decode(&bytes).unwrap(), ack);
        let bytes = vector("Vector: Ack handled", &Ack::ok().encode());
        assert_eq!(Ack::decode(&bytes).unwrap(), Ack::ok());
    }

    #[test]
    fn the_counted_length_is_the_encoded_length() {
        for len in [0, 23, 24, 255, 256, 65_535, 65_536] {
            for seq in [0, 23, 24, u64::from(u32::MAX) + 1] {
                let mut envelope = Envelope {
                    body: vec![7u8; len].into(),
                    seq,
                    ..example()
                };
                assert_eq!(
                    envelope.encoded_len(),
                    envelope.encode().len(),
                    "{len} {seq}"
                );
                envelope.headers = Metadata::new();
                envelope.grants = Vec::new();
                assert_eq!(
                    envelope.encoded_len(),
                    envelope.encode().len(),
                    "{len} {seq}"
                );
            }
        }
    }

    #[test]
    fn bad_envelopes_are_refused() {
        assert!(matches!(
            Envelope::decode(b"\xff\x00"),
            Err(Invalid::Malformed(_))
        ));
        let mut e = example();
        e.version = 2;
        assert_eq!(Envelope::decode(&e.encode()), Err(Invalid::Version(2)));
        let mut e = example();
        e.headers = (0..=MAX_HEADERS).map(|i| (format!("k{i}"), "v")).collect();
        assert!(matches!(
            Envelope::decode(&e.encode()),
            Err(Invalid::Limit(_))
        ));
        let mut e = example();
        e.headers = [("k", "v".repeat(MAX_HEADER_VALUE + 1))]
            .into_iter()
            .collect();
        assert!(matches!(
            Envelope::decode(&e.encode()),
            Err(Invalid::Limit(_))
        ));
        let mut e = example();
        e.content_type = String::new();
        assert!(matches!(
            Envelope::decode(&e.encode()),
            Err(Invalid::Limit(_))
        ));
        let mut bytes = example().encode();
        bytes.push(0);
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(Invalid::Malformed(_))
        ));
        // A byte string announcing 4 GiB in a 20-byte message: an error, not an allocation.
        let huge = b"\xa1\x61b\x5b\x00\x00\x00\x01\x00\x00\x00\x00abc";
        assert!(Envelope::decode(huge).is_err());
    }

    #[test]
    fn long_ack_details_are_cut_at_a_char_boundary() {
        let ack = Ack::refuse(500, "é".repeat(MAX_ACK_DETAIL));
        assert!(ack.detail.len() <= MAX_ACK_DETAIL);
        assert!(ack.encode().len() < MAX_ACK_BYTES);
    }
}
