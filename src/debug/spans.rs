//! The process's recent call spans, for `Debug.Trace`: a [`tracing_subscriber::Layer`] that
//! keeps every finished span carrying W3C ids (the client and server spans of calls) in a
//! bounded ring.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    sync::{Mutex, OnceLock},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{Subscriber, field::Field, span};
use tracing_subscriber::{
    Layer,
    filter::{LevelFilter, filter_fn},
    layer::Context,
    registry::LookupSpan,
};

/// Spans kept.
pub const CAPACITY: usize = 1024;
/// The longest attribute value kept, in bytes; longer ones are cut.
const MAX_TEXT: usize = 512;
/// The most attributes kept per span (call spans have 6).
const MAX_ATTRIBUTES: usize = 16;

/// The field that marks a span as one `Debug.Trace` keeps: its W3C trace id.
const TRACE_ID: &str = "trace_id";

/// One finished span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SpanRecord {
    /// The W3C trace id: 32 hex digits.
    pub trace_id: String,
    /// This span's id: 16 hex digits.
    pub span_id: String,
    /// The id of the span it is a child of, if it has a parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// The span's name (`call` for calls).
    pub name: String,
    /// `client` or `server` for calls (OpenTelemetry's span kind), else `internal`.
    pub kind: String,
    /// When it started, in microseconds since the Unix epoch.
    pub start_unix_us: u64,
    /// How long it lasted, in microseconds.
    pub duration_us: u64,
    /// Its other fields, as text: for calls OpenTelemetry's RPC attributes (`rpc.service`,
    /// `rpc.method`, `rpc.response.status_code`, …) and the peer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl SpanRecord {
    /// The attribute `name`, if the span has it.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }
}

/// What `Debug.Trace` is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TraceRequest {
    /// Only the spans of this trace (32 hex digits).
    #[serde(default)]
    pub trace_id: Option<String>,
    /// How many recent spans to send (at most [`CAPACITY`]); default 100.
    #[serde(default)]
    pub limit: Option<u32>,
}

impl TraceRequest {
    /// The most recent `limit` spans, of one trace or of all.
    pub fn new(trace_id: Option<&str>, limit: Option<u32>) -> Self {
        Self {
            trace_id: trace_id.map(str::to_owned),
            limit,
        }
    }
}

/// A finished span as the ring keeps it: field names are the call sites' own, the values in
/// one buffer, and the [`SpanRecord`] is made only when asked for.
pub(crate) struct Kept {
    pub(crate) name: &'static str,
    pub(crate) start_unix_us: u64,
    pub(crate) duration_us: u64,
    fields: Fields,
}

/// Where a span layer puts the spans that end: the ring of `Debug.Trace`, or an exporter.
pub(crate) trait Sink: Send + Sync + 'static {
    fn keep(&self, span: Kept);
}

impl Kept {
    /// A span with these fields (`trace_id`, `span_id`, `parent_span_id`, `otel.kind`, and
    /// attributes): for tests of what consumes spans.
    #[cfg(test)]
    pub(crate) fn new(
        name: &'static str,
        start_unix_us: u64,
        duration_us: u64,
        fields: &[(&'static str, &str)],
    ) -> Self {
        let mut kept = Fields::default();
        for (name, value) in fields {
            kept.keep(name, |text| text.push_str(value));
        }
        Self {
            name,
            start_unix_us,
            duration_us,
            fields: kept,
        }
    }

    pub(crate) fn trace_id(&self) -> &str {
        self.fields.get(self.fields.trace_id).unwrap_or_default()
    }

    pub(crate) fn span_id(&self) -> &str {
        self.fields.get(self.fields.span_id).unwrap_or_default()
    }

    pub(crate) fn parent_span_id(&self) -> Option<&str> {
        self.fields.get(self.fields.parent_span_id)
    }

    pub(crate) fn kind(&self) -> Option<&str> {
        self.fields.get(self.fields.kind)
    }

    /// The other fields, in the order they were first recorded.
    pub(crate) fn attributes(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.fields.attributes[..self.fields.attribute_count]
            .iter()
            .map(|(name, range)| (*name, &self.fields.text[range.0 as usize..range.1 as usize]))
    }

    #[cfg(feature = "otel")]
    pub(crate) fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    fn to_record(&self) -> SpanRecord {
        SpanRecord {
            trace_id: self.trace_id().to_owned(),
            span_id: self.span_id().to_owned(),
            parent_span_id: self.parent_span_id().map(str::to_owned),
            name: self.name.to_owned(),
            kind: self.kind().unwrap_or("internal").to_owned(),
            start_unix_us: self.start_unix_us,
            duration_us: self.duration_us,
            attributes: self
                .attributes()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
        }
    }
}

pub(crate) struct Ring {
    spans: Mutex<VecDeque<Kept>>,
}

static RING: OnceLock<Ring> = OnceLock::new();

/// The ring, if a span layer was made in this process.
pub(crate) fn ring() -> Option<&'static Ring> {
    RING.get()
}

impl Sink for &'static Ring {
    fn keep(&self, span: Kept) {
        self.push(span);
    }
}

impl Ring {
    fn push(&self, span: Kept) {
        let evicted = {
            let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
            let evicted = if spans.len() == CAPACITY {
                spans.pop_front()
            } else {
                None
            };
            spans.push_back(span);
            evicted
        };
        // Freed outside the lock, which is held for two pointer moves only.
        drop(evicted);
    }

    /// The last `limit` spans (of `trace_id` only, if given), in the order they ended.
    pub(crate) fn recent(&self, trace_id: Option<&str>, limit: usize) -> Vec<SpanRecord> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut recent: Vec<SpanRecord> = spans
            .iter()
            .rev()
            .filter(|s| trace_id.is_none_or(|id| s.trace_id() == id))
            .take(limit)
            .map(Kept::to_record)
            .collect();
        recent.reverse();
        recent
    }
}

/// The layer that keeps the process's recent call spans for `Debug.Trace`
/// (`micromesh trace NAME`). Without it in the process's subscriber, `Debug.Trace` answers 501.
///
/// It keeps every span that has a `trace_id` field once that span closes: micromesh's client
/// and server spans of calls (debug level, target `micromesh`), and a program's own spans that
/// record W3C ids the same way. It filters for itself, so it sees those spans whatever level
/// the program logs at, as long as the program's filter is a per-layer one
/// ([`Layer::with_filter`]) rather than a global one, which would hide them from every layer.
///
/// ```
/// use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt as _,
///     util::SubscriberInitExt as _};
///
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer().with_filter(EnvFilter::new("info")))
///     .with(micromesh::debug::trace_layer())
///     .init();
/// ```
pub fn trace_layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let ring = RING.get_or_init(|| Ring {
        spans: Mutex::new(VecDeque::with_capacity(CAPACITY)),
    });
    span_layer(ring)
}

/// A layer that hands every finished span carrying W3C ids to `sink`.
pub(crate) fn span_layer<S, K: Sink>(sink: K) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    SpanLayer { sink }.with_filter(
        filter_fn(|metadata| metadata.is_span() && metadata.fields().field(TRACE_ID).is_some())
            .with_max_level_hint(LevelFilter::DEBUG),
    )
}

struct SpanLayer<K> {
    sink: K,
}

/// What is known of a span while it is open, by the layer of sink `K` (each span layer of a
/// subscriber keeps its own: the `Debug.Trace` ring and an exporter may both be there).
struct Open<K> {
    started: Instant,
    start_unix_us: u64,
    fields: Fields,
    sink: std::marker::PhantomData<fn() -> K>,
}

impl<S, K: Sink> Layer<S> for SpanLayer<K>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut open = Open::<K> {
            started: Instant::now(),
            start_unix_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            fields: Fields::default(),
            sink: std::marker::PhantomData,
        };
        attrs.record(&mut open.fields);
        span.extensions_mut().insert(open);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(open) = span.extensions_mut().get_mut::<Open<K>>() {
            values.record(&mut open.fields);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open<K>>() else {
            return;
        };
        // A span whose ids were never recorded (its subscriber disabled them, or it ended
        // before they were known) is not part of any trace.
        if open.fields.trace_id.is_none() || open.fields.span_id.is_none() {
            return;
        }
        self.sink.keep(Kept {
            name: span.name(),
            start_unix_us: open.start_unix_us,
            duration_us: open.started.elapsed().as_micros() as u64,
            fields: open.fields,
        });
    }
}

/// The most bytes of field values one span keeps; values beyond are dropped.
const MAX_SPAN_TEXT: usize = 4096;

/// A span's fields: their values back to back in one buffer, and where each one is. Two
/// allocations per span, whatever its number of fields.
struct Fields {
    text: String,
    trace_id: Option<(u32, u32)>,
    span_id: Option<(u32, u32)>,
    parent_span_id: Option<(u32, u32)>,
    kind: Option<(u32, u32)>,
    /// In place: no allocation of their own.
    attributes: [(&'static str, (u32, u32)); MAX_ATTRIBUTES],
    attribute_count: usize,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            text: String::with_capacity(256),
            trace_id: None,
            span_id: None,
            parent_span_id: None,
            kind: None,
            attributes: [("", (0, 0)); MAX_ATTRIBUTES],
            attribute_count: 0,
        }
    }
}

impl Fields {
    fn get(&self, range: Option<(u32, u32)>) -> Option<&str> {
        range.map(|(start, end)| &self.text[start as usize..end as usize])
    }

    /// Appends the value `write` writes, cut at [`MAX_TEXT`], as the value of `name`.
    fn keep(&mut self, name: &'static str, write: impl FnOnce(&mut String)) {
        let start = self.text.len();
        write(&mut self.text);
        if self.text.len() - start > MAX_TEXT {
            let mut cut = start + MAX_TEXT;
            while !self.text.is_char_boundary(cut) {
                cut -= 1;
            }
            self.text.truncate(cut);
            self.text.push('…');
        }
        if self.text.len() > MAX_SPAN_TEXT {
            self.text.truncate(start);
            return;
        }
        let range = (start as u32, self.text.len() as u32);
        match name {
            TRACE_ID => self.trace_id = Some(range),
            "span_id" => self.span_id = Some(range),
            "parent_span_id" => self.parent_span_id = Some(range),
            "otel.kind" => self.kind = Some(range),
            name => {
                let count = self.attribute_count;
                match self.attributes[..count]
                    .iter_mut()
                    .find(|(n, _)| *n == name)
                {
                    Some((_, value)) => *value = range,
                    None if count < MAX_ATTRIBUTES => {
                        self.attributes[count] = (name, range);
                        self.attribute_count += 1;
                    }
                    None => self.text.truncate(start),
                }
            }
        }
    }
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.keep(field.name(), |text| text.push_str(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.keep(field.name(), |text| {
            let _ = write!(text, "{value}");
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.keep(field.name(), |text| {
            let _ = write!(text, "{value}");
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.keep(field.name(), |text| {
            let _ = write!(text, "{value}");
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.keep(field.name(), |text| {
            let _ = write!(text, "{value:?}");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn a_span_keeps_a_bounded_number_of_attributes_and_bytes() {
        let mut fields = Fields::default();
        let names: Vec<&'static str> = (0..40)
            .map(|i| &*Box::leak(format!("a{i}").into_boxed_str()))
            .collect();
        for name in &names {
            fields.keep(name, |text| text.push_str(&"v".repeat(200)));
        }
        fields.keep("a0", |text| text.push_str("again"));
        fields.keep(TRACE_ID, |text| text.push('t'));
        fields.keep("span_id", |text| text.push('s'));
        let kept = Kept {
            name: "many",
            start_unix_us: 0,
            duration_us: 0,
            fields,
        };
        let attributes: Vec<_> = kept.attributes().collect();
        assert!(attributes.len() <= MAX_ATTRIBUTES);
        assert_eq!(
            attributes[0],
            ("a0", "again"),
            "a later value replaces the first"
        );
        assert!(kept.fields.text.len() <= MAX_SPAN_TEXT);
        assert_eq!((kept.trace_id(), kept.span_id()), ("t", "s"));
    }

    #[test]
    fn spans_with_ids_are_kept_bounded_and_found_by_trace() {
        let subscriber = tracing_subscriber::registry().with(trace_layer());
        tracing::subscriber::with_default(subscriber, || {
            let ring = ring().unwrap();
            let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
            {
                let outer = tracing::debug_span!(
                    "call",
                    otel.kind = "client",
                    rpc.method = "Greeter.Hello",
                    rpc.response.status_code = tracing::field::Empty,
                    trace_id = trace,
                    span_id = "00f067aa0ba902b7",
                    long = %"x".repeat(10_000),
                );
                let _entered = outer.enter();
                // No ids: not part of a trace, not kept.
                let _plain = tracing::info_span!("work", trace_id = tracing::field::Empty);
                outer.record("rpc.response.status_code", 200u64);
            }
            let spans = ring.recent(Some(trace), 10);
            assert_eq!(spans.len(), 1, "{spans:?}");
            let span = &spans[0];
            assert_eq!(span.kind, "client");
            assert_eq!(span.name, "call");
            assert_eq!(span.attribute("rpc.method"), Some("Greeter.Hello"));
            assert_eq!(span.attribute("rpc.response.status_code"), Some("200"));
            assert_eq!(span.parent_span_id, None);
            assert!(span.attributes["long"].len() <= MAX_TEXT + '…'.len_utf8());
            assert!(
                ring.recent(Some("0af7651916cd43dd8448eb211c80319c"), 10)
                    .is_empty()
            );

            for i in 0..CAPACITY + 10 {
                let _span = tracing::debug_span!(
                    "flood",
                    trace_id = "0af7651916cd43dd8448eb211c80319c",
                    span_id = i
                );
            }
            let all = ring.recent(None, usize::MAX);
            assert_eq!(all.len(), CAPACITY);
            assert_eq!(all.last().unwrap().span_id, (CAPACITY + 9).to_string());
            assert_eq!(ring.recent(None, 3).len(), 3);
        });
    }
}
