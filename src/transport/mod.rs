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
pub(crate) mod metrics;
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
    pub(crate) max_message: usize,
    pub(crate) max_calls_per_peer: usize,
    pub(crate) max_calls: usize,
    pub(crate) head_timeout: Duration,
    pub(crate) stream_buffer: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) call_metrics: bool,
}

impl Config {
    /// The largest message (one request, one response, or one stream message), in bytes after
    /// encoding. Default is 4 MiB.
    pub fn max_message(mut self, value: usize) -> Self {
        self.max_message = value;
        self
    }

    /// The most calls one node serves at once from one peer; more get 429. Default is 256.
    pub fn max_calls_per_peer(mut self, value: usize) -> Self {
        self.max_calls_per_peer = value;
        self
    }

    /// The most calls one node serves at once in total; more get 503. Default is 4,096.
    pub fn max_calls(mut self, value: usize) -> Self {
        self.max_calls = value;
        self
    }

    /// How long a caller may take to send the head of a call. Default is 10 s.
    pub fn head_timeout(mut self, value: Duration) -> Self {
        self.head_timeout = value;
        self
    }

    /// How many stream messages are buffered per direction before the sender waits. Default
    /// is 32.
    pub fn stream_buffer(mut self, value: usize) -> Self {
        self.stream_buffer = value;
        self
    }

    /// How long the stream of a finished unary call stays open for the next call to the same
    /// peer. A server closes a stream that carried no call for this long; a client closes one
    /// within a quarter of this after. An open stream keeps its connection open, so a
    /// connection that carried calls outlives the node's connection idle timeout by up to
    /// this much. Zero turns reuse off: every call then opens a stream of its own. Default
    /// is 30 s.
    pub fn idle_timeout(mut self, value: Duration) -> Self {
        self.idle_timeout = value;
        self
    }

    /// Whether calls are counted and timed in the `rpc_server_*` and `rpc_client_*` metrics
    /// (see [`crate::debug`]). Default is on; off saves a few label lookups per call.
    pub fn call_metrics(mut self, on: bool) -> Self {
        self.call_metrics = on;
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
            call_metrics: true,
        }
    }
}
