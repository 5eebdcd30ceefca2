//! W3C Trace Context: the `traceparent` and `tracestate` that carry a trace across calls and
//! messages, in call metadata and in message headers.
//!
//! A call's [`Context`](crate::Context) continues the trace its caller sent (or starts one);
//! [`Context::call_options`](crate::Context::call_options) and
//! [`Context::publish_options`](crate::Context::publish_options) pass it on, so every call of a
//! chain and every message published inside it share one trace id, which OpenTelemetry and any
//! other W3C-conformant tracer read as they are.
//!
//! ```
//! use micromesh::trace::TraceParent;
//!
//! let parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
//!     .expect("valid");
//! assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! let child = parent.child();
//! assert_eq!(child.trace_id(), parent.trace_id());
//! assert_ne!(child.span_id(), parent.span_id());
//! assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
//! ```

use std::fmt;

/// The metadata key (and message header) of the trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key (and message header) of vendors' trace state, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";

/// A `traceparent`: trace id, the id of the span that sent it, and the trace flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// A new trace, sampled (flags `01`), with a random trace id and span id.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero(rand::random::<[u8; 16]>()),
            span_id: nonzero(rand::random::<[u8; 8]>()),
            flags: 0x01,
        }
    }

    /// A span in the same trace, its parent this one: a new span id, the same trace id and
    /// flags.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(rand::random::<[u8; 8]>()),
            ..*self
        }
    }

    /// The span a call or message continues from a `traceparent` header: a child of the one
    /// it names, or a new root when there is none or it is not valid; and the parent, if any.
    pub(crate) fn continuing(header: Option<&str>) -> (Self, Option<Self>) {
        let parent = header.and_then(Self::parse);
        let own = parent.as_ref().map_or_else(Self::new_root, Self::child);
        (own, parent)
    }

    /// Parses a `traceparent` header of version `00`: `None` for anything else (wrong length,
    /// upper-case or non-hex digits, an all-zero id, version `ff`), as the W3C spec asks
    /// receivers to do. Later versions are read by their first four fields.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let mut parts = text.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let version = hex::<1>(version)?[0];
        if version == 0xff || (version == 0 && (parts.next().is_some() || text.len() != 55)) {
            return None;
        }
        let trace_id = hex::<16>(trace_id)?;
        let span_id = hex::<8>(span_id)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: hex::<1>(flags)?[0],
        })
    }

    /// The trace id: 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id: 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        to_hex(&self.span_id)
    }

    /// The trace id as hex, written where it is displayed (no allocation).
    pub(crate) fn trace_id_hex(&self) -> Hex<16> {
        Hex(self.trace_id)
    }

    /// The span id as hex, written where it is displayed (no allocation).
    pub(crate) fn span_id_hex(&self) -> Hex<8> {
        Hex(self.span_id)
    }

    /// Whether the caller sampled the trace (flag `01`).
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }
}

/// The header form: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        data_encoding::HEXLOWER.encode_mut(&self.trace_id, &mut text[3..35]);
        text[35] = b'-';
        data_encoding::HEXLOWER.encode_mut(&self.span_id, &mut text[36..52]);
        text[52] = b'-';
        data_encoding::HEXLOWER.encode_mut(&[self.flags], &mut text[53..]);
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

/// Bytes displayed as lower-case hex, without allocating.
pub(crate) struct Hex<const N: usize>([u8; N]);

impl<const N: usize> fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 64];
        let text = &mut text[..2 * N];
        data_encoding::HEXLOWER.encode_mut(&self.0, text);
        f.write_str(std::str::from_utf8(text).map_err(|_| fmt::Error)?)
    }
}

/// Whether `text` is a trace id: 32 lower-case hex digits, not all zero.
pub fn is_trace_id(text: &str) -> bool {
    hex::<16>(text).is_some_and(|id| id != [0; 16])
}

fn nonzero<const N: usize>(mut bytes: [u8; N]) -> [u8; N] {
    if bytes == [0; N] {
        bytes[N - 1] = 1;
    }
    bytes
}

/// Exactly `2 * N` lower-case hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_example_round_trips_and_bad_headers_are_refused() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(text).unwrap();
        assert_eq!(parent.to_string(), text);
        assert_eq!(parent.span_id(), "00f067aa0ba902b7");
        assert!(parent.sampled());
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?}");
        }
        assert!(is_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(!is_trace_id("00000000000000000000000000000000"));
        assert!(!is_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736"));
        // A later version may append fields; its first four are read.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert_eq!(
            TraceParent::parse(later).unwrap().trace_id(),
            parent.trace_id()
        );
    }

    #[test]
    fn roots_and_children() {
        let root = TraceParent::new_root();
        assert!(root.sampled());
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_ne!(TraceParent::new_root().trace_id(), root.trace_id());
    }
}
