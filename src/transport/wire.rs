//! The RPC frames (`protocols/rpc.md`).

use serde::{Deserialize, Serialize};

use super::frame;
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

/// The CBOR a data frame begins with: a map of one entry, whose key is the text `"data"`.
const DATA_KEY: [u8; 6] = [0xa1, 0x64, b'd', b'a', b't', b'a'];

impl Frame {
    /// The frame's payload (without its length prefix).
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.put(&mut buf).expect("test frames are small");
        buf.split_off(4)
    }

    /// Appends the frame, length prefix first, to `buf`: what goes on the wire.
    pub(crate) fn put(&self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        if let Self::Data(body) = self {
            return put_data(buf, body);
        }
        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        ciborium::into_writer(self, &mut *buf).expect("writing CBOR to a Vec cannot fail");
        let prefix = frame::prefix(buf.len() - start - 4)?;
        buf[start..start + 4].copy_from_slice(&prefix);
        Ok(())
    }

    /// Decodes a frame's payload: exactly one CBOR item. ([`read`] takes data frames apart
    /// itself, without a copy.)
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut reader = bytes;
        let frame = ciborium::de::from_reader_with_recursion_limit(&mut reader, 16)
            .map_err(|e| e.to_string())?;
        if !reader.is_empty() {
            return Err(format!(
                "{} bytes after the frame's CBOR item",
                reader.len()
            ));
        }
        Ok(frame)
    }
}

/// The shortest CBOR head of a byte string of `len` bytes (RFC 8949 §3.1), and its length.
fn bytes_head(len: usize) -> ([u8; 9], usize) {
    let len = len as u64;
    let mut head = [0u8; 9];
    let used = match len {
        0..=23 => {
            head[0] = 0x40 | len as u8;
            1
        }
        24..=0xff => {
            head[..2].copy_from_slice(&[0x58, len as u8]);
            2
        }
        0x100..=0xffff => {
            head[0] = 0x59;
            head[1..3].copy_from_slice(&(len as u16).to_be_bytes());
            3
        }
        0x1_0000..=0xffff_ffff => {
            head[0] = 0x5a;
            head[1..5].copy_from_slice(&(len as u32).to_be_bytes());
            5
        }
        _ => {
            head[0] = 0x5b;
            head[1..9].copy_from_slice(&len.to_be_bytes());
            9
        }
    };
    (head, used)
}

/// Appends a data frame carrying `body`, length prefix first, to `buf`: the bytes of
/// `Frame::Data(body.to_vec()).put(buf)`, with the body copied once.
pub(crate) fn put_data(buf: &mut Vec<u8>, body: &[u8]) -> std::io::Result<()> {
    let (head, used) = bytes_head(body.len());
    let prefix = frame::prefix(DATA_KEY.len() + used + body.len())?;
    buf.reserve(prefix.len() + DATA_KEY.len() + used + body.len());
    buf.extend_from_slice(&prefix);
    buf.extend_from_slice(&DATA_KEY);
    buf.extend_from_slice(&head[..used]);
    buf.extend_from_slice(body);
    Ok(())
}

/// Room kept in front of a body framed in place: length prefix, key, and the longest head.
const BODY_ROOM: usize = 4 + DATA_KEY.len() + 9;

/// A data frame whose body was encoded straight into the frame's buffer: the framing is filled
/// in before the body afterwards, so the body is never copied.
pub(crate) struct DataFrame {
    buf: Vec<u8>,
    start: usize,
}

impl DataFrame {
    /// A buffer to append a body to.
    pub(crate) fn buffer() -> Vec<u8> {
        vec![0; BODY_ROOM]
    }

    /// The length of the body appended to a [`DataFrame::buffer`].
    pub(crate) fn body_len(buf: &[u8]) -> usize {
        buf.len() - BODY_ROOM
    }

    /// Frames the body appended to a [`DataFrame::buffer`].
    pub(crate) fn new(mut buf: Vec<u8>) -> std::io::Result<Self> {
        let len = Self::body_len(&buf);
        let (head, used) = bytes_head(len);
        let start = BODY_ROOM - used - DATA_KEY.len() - 4;
        let prefix = frame::prefix(DATA_KEY.len() + used + len)?;
        buf[start..start + 4].copy_from_slice(&prefix);
        buf[start + 4..start + 4 + DATA_KEY.len()].copy_from_slice(&DATA_KEY);
        buf[BODY_ROOM - used..BODY_ROOM].copy_from_slice(&head[..used]);
        Ok(Self { buf, start })
    }

    /// The frame, length prefix first.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Reads one frame of at most `max` bytes: the read fails as [`frame::read`] does, the decoding
/// as [`Frame::decode`]. A data frame's body is read straight into its own buffer.
pub(crate) async fn read<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<Result<Frame, String>, frame::ReadError> {
    use futures::AsyncReadExt as _;

    let size = frame::read_len(stream, max).await?;
    let mut first = [0u8; DATA_KEY.len() + 9];
    let peeked = size.min(first.len());
    stream.read_exact(&mut first[..peeked]).await?;
    if let Some((at, len)) = data_head(&first[..peeked])
        && u64::try_from(size - at).ok() == Some(len)
    {
        let body = frame::read_to(stream, first[at..peeked].to_vec(), size - at).await?;
        return Ok(Ok(Frame::Data(body)));
    }
    let bytes = frame::read_to(stream, first[..peeked].to_vec(), size).await?;
    Ok(Frame::decode(&bytes))
}

/// Where the body of a data frame begins and how long it says it is, if `bytes` begins with a
/// data frame's key and a definite-length head; anything else is left to the general decoder.
fn data_head(bytes: &[u8]) -> Option<(usize, u64)> {
    let rest = bytes.strip_prefix(&DATA_KEY)?;
    let (&first, rest) = rest.split_first()?;
    let argument = |n: usize| -> Option<u64> {
        let mut be = [0u8; 8];
        be[8 - n..].copy_from_slice(rest.get(..n)?);
        Some(u64::from_be_bytes(be))
    };
    let (len, extra) = match first {
        0x40..=0x57 => (u64::from(first & 0x1f), 0),
        0x58 => (argument(1)?, 1),
        0x59 => (argument(2)?, 2),
        0x5a => (argument(4)?, 4),
        0x5b => (argument(8)?, 8),
        _ => return None,
    };
    Some((DATA_KEY.len() + 1 + extra, len))
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
        // A data frame whose body is shorter or longer than its head says, read from a stream.
        assert!(read_payload(b"\xa1\x64data\x43ab").is_err());
        assert!(read_payload(b"\xa1\x64data\x41ab").is_err());
        // Bytes after any other frame.
        let mut end = Frame::End.encode();
        end.push(0);
        assert!(read_payload(&end).is_err());
    }

    #[test]
    fn data_frames_are_the_cbor_of_the_general_encoder_at_every_length_boundary() {
        for len in [0, 1, 23, 24, 255, 256, 65_535, 65_536, 100_000] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut general = Vec::new();
            ciborium::into_writer(&Frame::Data(body.clone()), &mut general).unwrap();
            let mut framed = Vec::new();
            put_data(&mut framed, &body).unwrap();
            assert_eq!(framed[..4], (general.len() as u32).to_be_bytes(), "{len}");
            assert_eq!(framed[4..], general[..], "{len}");
            assert_eq!(Frame::decode(&general).unwrap(), Frame::Data(body), "{len}");
        }
        // Framed in place, and read back from a stream, at the same boundaries.
        for len in [0, 1, 23, 24, 255, 256, 65_535, 65_536] {
            let body: Vec<u8> = (0..len).map(|i| (i % 13) as u8).collect();
            let mut buf = DataFrame::buffer();
            buf.extend_from_slice(&body);
            assert_eq!(DataFrame::body_len(&buf), len);
            let framed = DataFrame::new(buf).unwrap();
            let mut expected = Vec::new();
            put_data(&mut expected, &body).unwrap();
            assert_eq!(framed.bytes(), &expected[..], "{len}");
            let mut stream = framed.bytes();
            let read = futures::executor::block_on(read(&mut stream, 1 << 20));
            assert_eq!(read.unwrap().unwrap(), Frame::Data(body), "{len}");
        }
        // Every other frame, and frames shorter than a data frame's head, read whole.
        for frame in [
            Frame::End,
            vectors().remove(0).1,
            vectors().pop().unwrap().1,
        ] {
            let mut buf = Vec::new();
            frame.put(&mut buf).unwrap();
            let read = futures::executor::block_on(read(&mut &buf[..], 1 << 20));
            assert_eq!(read.unwrap().unwrap(), frame);
        }
        // A data frame with a byte more than its head says is refused, not cut short; a
        // truncated one is an I/O error.
        let mut buf = Vec::new();
        put_data(&mut buf, b"abc").unwrap();
        let mut longer = buf.clone();
        longer[3] += 1;
        longer.push(b'd');
        let read_longer = futures::executor::block_on(read(&mut &longer[..], 100));
        assert!(read_longer.unwrap().is_err());
        let truncated = futures::executor::block_on(read(&mut &buf[..buf.len() - 1], 100));
        assert!(matches!(truncated, Err(frame::ReadError::Io(_))));

        // A longer head than needed is still CBOR, and means the same; an indefinite-length
        // body goes to the general decoder.
        for head in [
            &b"\x58\x03abc"[..],
            b"\x59\x00\x03abc",
            b"\x5a\x00\x00\x00\x03abc",
            b"\x5f\x42ab\x41c\xff",
        ] {
            let mut bytes = DATA_KEY.to_vec();
            bytes.extend_from_slice(head);
            assert_eq!(read_payload(&bytes), Ok(Frame::Data(b"abc".to_vec())));
            assert_eq!(Frame::decode(&bytes), Ok(Frame::Data(b"abc".to_vec())));
        }
    }

    /// Reads one frame carrying `payload` from a stream.
    fn read_payload(payload: &[u8]) -> Result<Frame, String> {
        let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(payload);
        futures::executor::block_on(read(&mut &framed[..], 1 << 20)).expect("the frame is whole")
    }
}
