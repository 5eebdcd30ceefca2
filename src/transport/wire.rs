//! The RPC frames (`protocols/rpc.md`).

use serde::{Deserialize, Serialize};

use crate::{Metadata, Status};

/// The shape of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CallKind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

/// The first frame of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) service: String,
    pub(crate) endpoint: String,
    pub(crate) content_type: String,
    pub(crate) metadata: Metadata,
    /// The time left for the call when it was sent, in milliseconds.
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) kind: CallKind,
}

/// The last frame from the server: the call's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Trailer {
    pub(crate) code: u16,
    pub(crate) id: String,
    pub(crate) detail: String,
    pub(crate) metadata: Metadata,
}

impl Trailer {
    pub(crate) fn status(&self) -> Status {
        Status::new(self.code.into(), self.detail.clone()).with_id(self.id.clone())
    }

    pub(crate) fn from_status(status: &Status, metadata: Metadata) -> Self {
        Self {
            code: status.code().as_u16(),
            id: status.id().to_owned(),
            detail: status.detail().to_owned(),
            metadata,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Frame {
    Head(Head),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    End,
    Trailer(Trailer),
}

impl Frame {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("writing CBOR to a Vec cannot fail");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        ciborium::de::from_reader_with_recursion_limit(bytes, 16).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_vectors::{hex, vector_after};

    fn vectors() -> Vec<(&'static str, Frame)> {
        vec![
            (
                "Head",
                Frame::Head(Head {
                    service: "greeter".into(),
                    endpoint: "Greeter.Hello".into(),
                    content_type: "application/json".into(),
                    metadata: [("trace-id", "7")].into_iter().collect(),
                    timeout_ms: Some(5000),
                    kind: CallKind::Unary,
                }),
            ),
            ("Data", Frame::Data(br#"{"name":"Ada"}"#.to_vec())),
            ("End", Frame::End),
            (
                "Trailer",
                Frame::Trailer(Trailer {
                    code: 404,
                    id: "micromesh.server".into(),
                    detail: "no endpoint Greeter.Bye".into(),
                    metadata: Metadata::new(),
                }),
            ),
        ]
    }

    #[test]
    fn the_spec_vectors_decode_and_reencode() {
        let spec = include_str!("../../protocols/rpc.md");
        for (name, frame) in vectors() {
            let bytes = vector_after(spec, &format!("Vector: {name}"));
            assert_eq!(
                hex(&frame.encode()),
                hex(&bytes),
                "{name}: the encoder changed"
            );
            assert_eq!(Frame::decode(&bytes).unwrap(), frame, "{name}");
        }
    }

    #[test]
    #[ignore = "prints the spec vectors; run with --ignored after a deliberate format change"]
    fn print_spec_vectors() {
        for (name, frame) in vectors() {
            println!("{name} {}", hex(&frame.encode()));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Frame::decode(b"").is_err());
        assert!(Frame::decode(b"\xa1\x64head\xf6").is_err());
        assert!(Frame::decode(&[0x81; 10_000]).is_err());
    }
}
