//! [`Context`]: what a handler knows about the call it serves.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Metadata, PeerId,
    broker::PublishOptions,
    client::CallOptions,
    trace::{TRACEPARENT, TRACESTATE, TraceParent},
};

struct Inner {
    service: String,
    endpoint: String,
    peer: PeerId,
    metadata: Metadata,
    deadline: Option<Instant>,
    /// This call's span: a child of the caller's, or the root of a new trace.
    trace: TraceParent,
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    roles: Vec<String>,
}

/// The call a handler serves: who called, with what metadata, until when. Cheap to clone.
///
/// The caller's [`PeerId`] is the one its connection was authenticated with: it cannot be
/// forged. [`Context::call_options`] carries the deadline and the W3C trace context
/// (`traceparent`, `tracestate`; see [`crate::trace`]) into the calls a handler makes in turn,
/// so deadlines cascade across hops and a chain of calls is one trace;
/// [`Context::publish_options`] carries the trace into messages.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

impl Context {
    pub(crate) fn new(
        service: String,
        endpoint: String,
        peer: PeerId,
        metadata: Metadata,
        deadline: Option<Instant>,
        roles: Vec<String>,
        (trace, caller): (TraceParent, Option<TraceParent>),
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                service,
                endpoint,
                peer,
                metadata,
                deadline,
                trace_id: trace.trace_id(),
                span_id: trace.span_id(),
                parent_span_id: caller.map(|parent| parent.span_id()),
                trace,
                roles,
            }),
        }
    }

    /// The verified peer id of the caller.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer
    }

    /// The roles the caller holds through valid grants from issuers this node trusts (empty
    /// when this node trusts no issuer). See [`crate::auth`].
    pub fn roles(&self) -> &[String] {
        &self.inner.roles
    }

    /// Whether the caller holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.inner.roles.iter().any(|r| r == role)
    }

    /// The service the call was made to.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The caller's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// When the caller stops waiting, if it set a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// The time left before the deadline (zero once passed), if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The W3C trace id (32 hex digits) shared by every call in this chain: the caller's, from
    /// its `traceparent`, or a new one when it sent none (or an invalid one).
    pub fn trace_id(&self) -> &str {
        &self.inner.trace_id
    }

    /// The id of this call's span (16 hex digits); calls made with [`Context::call_options`]
    /// name it as their parent.
    pub fn span_id(&self) -> &str {
        &self.inner.span_id
    }

    /// The caller's span id, if it sent a valid `traceparent`.
    pub fn parent_span_id(&self) -> Option<&str> {
        self.inner.parent_span_id.as_deref()
    }

    /// This call's span as a `traceparent`, for calls and messages made while serving it.
    pub fn traceparent(&self) -> TraceParent {
        self.inner.trace
    }

    /// Options for a call made while serving this one: the same deadline and trace (this call's
    /// span as the `traceparent`, the caller's `tracestate` as it came).
    pub fn call_options(&self) -> CallOptions {
        let mut options =
            CallOptions::default().metadata(TRACEPARENT, self.inner.trace.to_string());
        if let Some(state) = self.inner.metadata.get(TRACESTATE) {
            options = options.metadata(TRACESTATE, state);
        }
        if let Some(deadline) = self.inner.deadline {
            options = options.deadline(deadline);
        }
        options
    }

    /// Options for a message published while serving this call: its headers carry the trace
    /// (`traceparent`, `tracestate`), so subscribers see the same trace id.
    pub fn publish_options(&self) -> PublishOptions {
        let mut options = PublishOptions::new().header(TRACEPARENT, self.inner.trace.to_string());
        if let Some(state) = self.inner.metadata.get(TRACESTATE) {
            options = options.header(TRACESTATE, state);
        }
        options
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("service", &self.inner.service)
            .field("endpoint", &self.inner.endpoint)
            .field("peer", &self.inner.peer)
            .field("remaining", &self.remaining())
            .field("trace_id", &self.inner.trace_id)
            .finish_non_exhaustive()
    }
}
