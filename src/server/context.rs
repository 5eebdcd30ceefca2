//! [`Context`]: what a handler knows about the call it serves.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{Metadata, PeerId, client::CallOptions};

/// Metadata key carrying the trace id of a call chain.
pub const TRACE_ID: &str = "micromesh-trace-id";
/// Metadata key carrying the span id of the caller.
pub const PARENT_SPAN: &str = "micromesh-parent-span";

struct Inner {
    service: String,
    endpoint: String,
    peer: PeerId,
    metadata: Metadata,
    deadline: Option<Instant>,
    trace_id: String,
    span_id: String,
    roles: Vec<String>,
}

/// The call a handler serves: who called, with what metadata, until when. Cheap to clone.
///
/// The caller's [`PeerId`] is the one its connection was authenticated with: it cannot be
/// forged. [`Context::call_options`] carries the deadline and trace ids into the calls a
/// handler makes in turn, so deadlines cascade across hops.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Context {
    pub(crate) fn new(
        service: String,
        endpoint: String,
        peer: PeerId,
        metadata: Metadata,
        deadline: Option<Instant>,
        roles: Vec<String>,
    ) -> Self {
        let trace_id = metadata.get(TRACE_ID).map_or_else(random_id, str::to_owned);
        Self {
            inner: Arc::new(Inner {
                service,
                endpoint,
                peer,
                metadata,
                deadline,
                trace_id,
                span_id: random_id(),
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

    /// The trace id shared by every call in this chain.
    pub fn trace_id(&self) -> &str {
        &self.inner.trace_id
    }

    /// The id of this call's span; calls made with [`Context::call_options`] name it as their
    /// parent.
    pub fn span_id(&self) -> &str {
        &self.inner.span_id
    }

    /// Options for a call made while serving this one: the same deadline and trace id.
    pub fn call_options(&self) -> CallOptions {
        let mut options = CallOptions::default()
            .metadata(TRACE_ID, self.trace_id())
            .metadata(PARENT_SPAN, self.span_id());
        if let Some(deadline) = self.inner.deadline {
            options = options.deadline(deadline);
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
