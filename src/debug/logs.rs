//! The process's recent log records, for `Debug.Log`: a [`tracing_subscriber::Layer`] that keeps
//! the last records in a bounded ring and hands new ones to followers.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    sync::{Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{Layer, layer::Context};

/// Records kept.
pub const CAPACITY: usize = 1024;
/// The longest message or field value kept, in bytes; longer ones are cut.
const MAX_TEXT: usize = 2048;
/// The most fields kept per record.
const MAX_FIELDS: usize = 32;

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogRecord {
    /// When, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module (or target) that logged it.
    pub target: String,
    /// The message.
    pub message: String,
    /// The other fields, as text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

impl LogRecord {
    /// The record a follower gets in place of `n` records it was too slow to take.
    pub(crate) fn missed(n: u64) -> Self {
        Self {
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            level: "WARN".into(),
            target: "micromesh::debug".into(),
            message: format!("{n} log records were missed: the reader fell behind"),
            fields: BTreeMap::new(),
        }
    }
}

/// What `Debug.Log` is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogRequest {
    /// The least severe level wanted (`error` … `trace`); default `info`.
    #[serde(default)]
    pub level: Option<String>,
    /// How many recent records to send first (at most [`CAPACITY`]); default 100.
    #[serde(default)]
    pub limit: Option<u32>,
    /// Go on sending new records as they are logged, until the caller ends the call.
    #[serde(default)]
    pub follow: bool,
}

impl LogRequest {
    /// Recent records at `level` or more severe.
    pub fn new(level: Option<&str>, limit: Option<u32>, follow: bool) -> Self {
        Self {
            level: level.map(str::to_owned),
            limit,
            follow,
        }
    }
}

/// Parses a level name, as `RUST_LOG` spells them (any case).
pub fn parse_level(name: &str) -> Option<Level> {
    name.parse().ok()
}

pub(crate) struct Ring {
    records: Mutex<VecDeque<LogRecord>>,
    new: broadcast::Sender<LogRecord>,
}

static RING: OnceLock<Ring> = OnceLock::new();

/// The ring, if a [`LogLayer`] was made in this process.
pub(crate) fn ring() -> Option<&'static Ring> {
    RING.get()
}

impl Ring {
    fn push(&self, record: LogRecord) {
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            if records.len() == CAPACITY {
                records.pop_front();
            }
            records.push_back(record.clone());
        }
        // Nobody following is fine.
        let _ = self.new.send(record);
    }

    /// The last `limit` records at `level` or more severe, oldest first, and a receiver of
    /// the ones logged from now on.
    pub(crate) fn recent(
        &self,
        level: Level,
        limit: usize,
    ) -> (Vec<LogRecord>, broadcast::Receiver<LogRecord>) {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        // Subscribed under the lock: no record falls between the two.
        let follow = self.new.subscribe();
        let mut recent: Vec<LogRecord> = records
            .iter()
            .rev()
            .filter(|r| severe_enough(r, level))
            .take(limit)
            .cloned()
            .collect();
        recent.reverse();
        (recent, follow)
    }
}

/// Whether `record` is at `level` or more severe.
pub(crate) fn severe_enough(record: &LogRecord, level: Level) -> bool {
    record.level.parse::<Level>().is_ok_and(|own| own <= level)
}

/// A [`tracing_subscriber::Layer`] that keeps the process's recent log records for
/// `Debug.Log` (`micromesh logs NAME`). Add it to the subscriber the program installs; every
/// service of the process serves the same records. See [`log_layer`].
#[derive(Debug, Clone, Copy)]
pub struct LogLayer {
    _private: (),
}

/// The layer that keeps recent log records for `Debug.Log`. Without it in the process's
/// subscriber, `Debug.Log` answers 501.
///
/// ```
/// use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};
///
/// tracing_subscriber::registry()
///     .with(EnvFilter::new("info"))
///     .with(tracing_subscriber::fmt::layer())
///     .with(micromesh::debug::log_layer())
///     .init();
/// ```
pub fn log_layer() -> LogLayer {
    RING.get_or_init(|| Ring {
        records: Mutex::new(VecDeque::with_capacity(CAPACITY)),
        new: broadcast::channel(CAPACITY).0,
    });
    LogLayer { _private: () }
}

impl<S: Subscriber> Layer<S> for LogLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let Some(ring) = RING.get() else { return };
        let mut visitor = Visitor::default();
        event.record(&mut visitor);
        let metadata = event.metadata();
        ring.push(LogRecord {
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            level: metadata.level().to_string(),
            target: metadata.target().to_owned(),
            message: visitor.message,
            fields: visitor.fields,
        });
    }
}

/// Cuts `text` to at most `max` bytes (at a character boundary) and marks the cut with `…`.
pub(crate) fn shorten(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
}

#[derive(Default)]
struct Visitor {
    message: String,
    fields: BTreeMap<String, String>,
}

impl tracing::field::Visit for Visitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.keep(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.keep(field, text);
    }
}

impl Visitor {
    fn keep(&mut self, field: &Field, mut text: String) {
        shorten(&mut text, MAX_TEXT);
        if field.name() == "message" {
            self.message = text;
        } else if self.fields.len() < MAX_FIELDS {
            self.fields.insert(field.name().to_owned(), text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn records_are_kept_bounded_filtered_and_followed() {
        let subscriber = tracing_subscriber::registry().with(log_layer());
        tracing::subscriber::with_default(subscriber, || {
            let ring = ring().unwrap();
            let (_, mut follow) = ring.recent(Level::TRACE, 0);
            tracing::info!(peer = "abc", "hello {}", "there");
            tracing::debug!("quiet");
            tracing::warn!(long = %"x".repeat(10_000), "loud");
            let (recent, _) = ring.recent(Level::INFO, 10);
            let ours: Vec<_> = recent
                .iter()
                .filter(|r| r.target.ends_with("logs::tests"))
                .collect();
            assert_eq!(ours.len(), 2, "{ours:?}");
            assert_eq!(ours[0].message, "hello there");
            assert_eq!(ours[0].fields["peer"], "abc");
            assert_eq!(ours[1].level, "WARN");
            assert!(ours[1].fields["long"].len() <= MAX_TEXT + '…'.len_utf8());
            assert_eq!(follow.try_recv().unwrap().message, "hello there");
            for i in 0..CAPACITY + 10 {
                tracing::error!("flood {i}");
            }
            let (recent, _) = ring.recent(Level::TRACE, usize::MAX);
            assert_eq!(recent.len(), CAPACITY);
            assert_eq!(
                recent.last().unwrap().message,
                format!("flood {}", CAPACITY + 9)
            );
        });
    }
}
