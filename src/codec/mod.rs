//! Codecs: how request and response bodies are encoded.
//!
//! Every call carries the content type of its body, and a server answers in the codec the
//! caller used: a JSON caller (the CLI, a gateway) and a CBOR caller (a Rust service) are
//! served by the same handler. CBOR (`application/cbor`, via `ciborium`) is the default:
//! compact, schemaless, and maintained. JSON is `application/json`.
//!
//! ```
//! use micromesh::codec::{Codec, ContentType};
//!
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Hello { name: String }
//!
//! let hello = Hello { name: "Ada".into() };
//! for codec in [ContentType::Cbor, ContentType::Json] {
//!     let bytes = codec.encode(&hello)?;
//!     assert_eq!(codec.decode::<Hello>(&bytes)?, hello);
//! }
//! assert_eq!(ContentType::Json.encode(&hello)?, br#"{"name":"Ada"}"#);
//! # Ok::<(), micromesh::codec::Error>(())
//! ```

use serde::{Serialize, de::DeserializeOwned};

/// The deepest nesting a CBOR body may have; deeper input is refused, not recursed into.
pub const MAX_DEPTH: usize = 128;

/// Errors of encoding and decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The value could not be encoded.
    #[error("cannot encode as {content_type}: {reason}")]
    Encode {
        /// The content type.
        content_type: &'static str,
        /// Why.
        reason: String,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("cannot decode {content_type}: {reason}")]
    Decode {
        /// The content type.
        content_type: &'static str,
        /// Why.
        reason: String,
    },
    /// No codec for this content type.
    #[error("unsupported content type {0:?}; use application/cbor or application/json")]
    Unsupported(String),
}

/// A codec: serde types to bytes and back.
pub trait Codec {
    /// The MIME type carried with every body.
    fn content_type(&self) -> &'static str;

    /// Encodes a value.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the value cannot be represented (a map with non-string keys in
    /// JSON, say).
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, Error>;

    /// Encodes a value at the end of `buf`, for callers that frame it in place. The default
    /// encodes, then copies; the built-in codecs write into `buf` directly. On error `buf` may
    /// hold part of the encoding.
    ///
    /// ```
    /// use micromesh::codec::{Codec as _, ContentType};
    ///
    /// let mut buf = b"head:".to_vec();
    /// ContentType::Json.encode_into(&[1, 2], &mut buf)?;
    /// assert_eq!(buf, b"head:[1,2]");
    /// # Ok::<(), micromesh::codec::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Codec::encode`].
    fn encode_into<T: Serialize + ?Sized>(
        &self,
        value: &T,
        buf: &mut Vec<u8>,
    ) -> Result<(), Error> {
        buf.extend_from_slice(&self.encode(value)?);
        Ok(())
    }

    /// Decodes untrusted bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] for malformed input, a different shape, or nesting deeper than
    /// [`MAX_DEPTH`].
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, Error>;
}

/// The built-in codecs, chosen by content type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ContentType {
    /// `application/cbor` (the default).
    #[default]
    Cbor,
    /// `application/json`.
    Json,
}

impl ContentType {
    /// The codec for a MIME type (parameters such as `; charset=utf-8` are ignored).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for any other type.
    pub fn from_mime(mime: &str) -> Result<Self, Error> {
        let essence = mime.split(';').next().unwrap_or("").trim();
        match essence {
            "application/cbor" => Ok(Self::Cbor),
            "application/json" => Ok(Self::Json),
            other => Err(Error::Unsupported(other.to_owned())),
        }
    }
}

impl Codec for ContentType {
    fn content_type(&self) -> &'static str {
        match self {
            Self::Cbor => "application/cbor",
            Self::Json => "application/json",
        }
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.encode_into(value, &mut out)?;
        Ok(out)
    }

    fn encode_into<T: Serialize + ?Sized>(
        &self,
        value: &T,
        buf: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let reason = |e: &dyn std::fmt::Display| Error::Encode {
            content_type: self.content_type(),
            reason: e.to_string(),
        };
        match self {
            Self::Cbor => ciborium::into_writer(value, &mut *buf).map_err(|e| reason(&e)),
            Self::Json => serde_json::to_writer(&mut *buf, value).map_err(|e| reason(&e)),
        }
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, Error> {
        let reason = |e: &dyn std::fmt::Display| Error::Decode {
            content_type: self.content_type(),
            reason: e.to_string(),
        };
        match self {
            Self::Cbor => {
                let mut reader = bytes;
                let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_DEPTH)
                    .map_err(|e| reason(&e))?;
                if !reader.is_empty() {
                    return Err(reason(&format!("{} trailing bytes", reader.len())));
                }
                Ok(value)
            }
            // serde_json refuses nesting deeper than 128 by itself.
            Self::Json => serde_json::from_slice(bytes).map_err(|e| reason(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for codec in [ContentType::Cbor, ContentType::Json] {
            assert!(codec.decode::<String>(b"").is_err());
            assert!(codec.decode::<u32>(b"\xff\xfe\xfd").is_err());
        }
        // 100,000 nested CBOR arrays, and a 4 GiB length prefix with a tiny body.
        let bomb = vec![0x81u8; 100_000];
        assert!(
            ContentType::Cbor
                .decode::<serde_json::Value>(&bomb)
                .is_err()
        );
        assert!(
            ContentType::Cbor
                .decode::<Vec<u8>>(b"\x5a\xff\xff\xff\xffabc")
                .is_err()
        );
        let deep = "[".repeat(10_000);
        assert!(
            ContentType::Json
                .decode::<serde_json::Value>(deep.as_bytes())
                .is_err()
        );
        // Trailing bytes after a complete CBOR value are refused.
        assert!(ContentType::Cbor.decode::<u8>(b"\x01\x02").is_err());
    }

    #[test]
    fn mime_types() {
        assert_eq!(
            ContentType::from_mime("application/json; charset=utf-8").unwrap(),
            ContentType::Json
        );
        assert_eq!(
            ContentType::from_mime("application/cbor").unwrap(),
            ContentType::Cbor
        );
        assert!(matches!(
            ContentType::from_mime("text/xml"),
            Err(Error::Unsupported(_))
        ));
    }
}
