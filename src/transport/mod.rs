//! The RPC transport: libp2p streams carrying length-prefixed CBOR frames.
//!
//! Calls of every shape (unary, server stream, client stream, bidirectional) use the same
//! protocol, `/micromesh/<network>/rpc/2.0.0` (specified in `protocols/rpc.md`): the caller
//! sends a head frame, data frames and an end frame; the server sends data frames and a
//! trailer with the final [`Status`](crate::Status). End-of-stream is an explicit frame in both
//! directions, so a call can never end in an ambiguous EOF. Streams go straight from the
//! connection to the handler's task: no call ever runs on the swarm's event loop.
//!
//! The stream of a successful unary call stays open, and the caller's next unary call to the
//! same peer starts on it at once ([`Config::idle_timeout`]): one call at a time per stream, as
//! many streams as calls in flight. A call on a kept stream costs one muxer frame each way, and
//! no stream negotiation.
//!
//! Every frame is limited in size ([`Config::max_message`]); a larger one is refused with a
//! clear status before its body is read, and the connection keeps serving other calls.

pub(crate) mod frame;
pub(crate) mod wire;

use std::time::Duration;

use libp2p::StreamProtocol;

/// The RPC protocol of a network.
pub(crate) fn protocol(network: &str) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/micromesh/{network}/rpc/2.0.0"))
        .expect("network names are protocol-safe")
}

/// Limits of the transport, on both the calling and the serving side.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The largest message (one request, one response, or one stream message), in bytes after
    /// encoding. Default is 4 MiB.
    pub max_message: usize,
    /// The most calls one node serves at once from one peer; more get 429. Default is 256.
    pub max_calls_per_peer: usize,
    /// The most calls one node serves at once in total; more get 503. Default is 4,096.
    pub max_calls: usize,
    /// How long a caller may take to send the head of a call. Default is 10 s.
    pub head_timeout: Duration,
    /// How many stream messages are buffered per direction before the sender waits. Default
    /// is 32.
    pub stream_buffer: usize,
    /// How long the stream of a finished unary call stays open for the next call to the same
    /// peer. A server closes a stream that carried no call for this long; a client closes one
    /// within a quarter of this after. An open stream keeps its connection open, so a
    /// connection that carried calls outlives the node's connection idle timeout by up to
    /// this much. Zero turns reuse off: every call then opens a stream of its own. Default
    /// is 30 s.
    pub idle_timeout: Duration,
}

impl Config {
    /// Sets [`Config::max_message`].
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Sets [`Config::max_calls_per_peer`].
    pub fn max_calls_per_peer(mut self, calls: usize) -> Self {
        self.max_calls_per_peer = calls;
        self
    }

    /// Sets [`Config::max_calls`].
    pub fn max_calls(mut self, calls: usize) -> Self {
        self.max_calls = calls;
        self
    }

    /// Sets [`Config::head_timeout`].
    pub fn head_timeout(mut self, timeout: Duration) -> Self {
        self.head_timeout = timeout;
        self
    }

    /// Sets [`Config::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`Config::stream_buffer`].
    pub fn stream_buffer(mut self, messages: usize) -> Self {
        self.stream_buffer = messages;
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message: 4 * 1024 * 1024,
            max_calls_per_peer: 256,
            max_calls: 4096,
            head_timeout: Duration::from_secs(10),
            stream_buffer: 32,
            idle_timeout: Duration::from_secs(30),
        }
    }
}
