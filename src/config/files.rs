//! Configuration files: read by their extension, watched, reloaded after a short quiet time.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use ::config as layered;
use notify::{EventKind, RecursiveMode, Watcher as _, event::AccessKind, event::AccessMode};

use super::{Error, Weak};

/// How long a file must be quiet after a change before it is read again: editors write a
/// file in several steps (truncate, write, rename), and only the last state counts.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// How many file events wait for the reloading thread at most.
const EVENT_QUEUE: usize = 1024;

/// One file's last good contents.
pub(super) struct FileLayer {
    pub(super) path: PathBuf,
    pub(super) contents: layered::Config,
}

impl FileLayer {
    /// Reads and parses `path`.
    pub(super) fn read(path: &Path) -> Result<Self, Error> {
        let file_error = |reason: String| Error::File {
            path: path.to_path_buf(),
            reason,
        };
        let format = format_of(path).ok_or_else(|| {
            file_error("unknown format: name the file .toml, .yaml, .yml or .json".into())
        })?;
        // Read the text first: the error of a missing file then says so plainly.
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let contents = layered::Config::builder()
            .add_source(layered::File::from_str(&text, format))
            .build()
            .map_err(|e| file_error(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            contents,
        })
    }
}

fn format_of(path: &Path) -> Option<layered::FileFormat> {
    match path.extension()?.to_str()? {
        "toml" => Some(layered::FileFormat::Toml),
        "yaml" | "yml" => Some(layered::FileFormat::Yaml),
        "json" => Some(layered::FileFormat::Json),
        _ => None,
    }
}

/// Watches the directories of the configuration's files and reloads a file when it changes.
pub(super) struct Watcher {
    _watcher: notify::RecommendedWatcher,
}

impl Watcher {
    /// Starts watching `paths` (the files, in layer order) for `config`. A thread reloads the
    /// files that changed; it ends when the watcher is dropped (with the configuration).
    pub(super) fn start(paths: &[PathBuf], config: Weak) -> Result<Self, Error> {
        let watch_error = |path: &Path, e: &dyn std::fmt::Display| Error::File {
            path: path.to_path_buf(),
            reason: format!("cannot watch it: {e}"),
        };
        // Bounded: a flood of events (a directory of busy files) drops the excess and marks
        // the overflow, after which every file is read again.
        let (events, received) = mpsc::sync_channel::<notify::Event>(EVENT_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let overflow = overflowed.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && changes_contents(&event.kind)
                    && let Err(mpsc::TrySendError::Full(_)) = events.try_send(event)
                {
                    overflow.store(true, Ordering::Relaxed);
                }
            })
            .map_err(|e| watch_error(&paths[0], &e))?;
        // Editors replace files by renaming a new one over them: watch the directories, which
        // see that, and pick the events of the files.
        let absolute: Vec<PathBuf> = paths
            .iter()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
            .collect();
        let directories: BTreeSet<PathBuf> = absolute
            .iter()
            .map(|p| {
                p.parent()
                    .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
            })
            .collect();
        for directory in &directories {
            watcher
                .watch(directory, RecursiveMode::NonRecursive)
                .map_err(|e| watch_error(directory, &e))?;
        }
        let files = paths.to_vec();
        std::thread::Builder::new()
            .name("micromesh-config".into())
            .spawn(move || reload_on_change(&received, &overflowed, &absolute, &files, &config))
            .map_err(|e| watch_error(&paths[0], &e))?;
        Ok(Self { _watcher: watcher })
    }
}

/// Whether an event may change a file's contents (opening and reading one does not).
fn changes_contents(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Modify(notify::event::ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

fn reload_on_change(
    received: &mpsc::Receiver<notify::Event>,
    overflowed: &AtomicBool,
    absolute: &[PathBuf],
    files: &[PathBuf],
    config: &Weak,
) {
    let touched = |event: &notify::Event, into: &mut BTreeSet<usize>| {
        for path in &event.paths {
            for (i, file) in absolute.iter().enumerate() {
                if path == file {
                    into.insert(i);
                }
            }
        }
    };
    while let Ok(event) = received.recv() {
        let mut changed = BTreeSet::new();
        touched(&event, &mut changed);
        loop {
            match received.recv_timeout(DEBOUNCE) {
                Ok(event) => touched(&event, &mut changed),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if overflowed.swap(false, Ordering::Relaxed) {
            changed.extend(0..files.len());
        }
        let Some(config) = config.upgrade() else {
            return;
        };
        for i in changed {
            match FileLayer::read(&files[i]) {
                Ok(layer) => {
                    tracing::debug!(file = %files[i].display(), "configuration file reloaded");
                    config.inner.replace_file(i, layer.contents);
                }
                Err(e) => config.inner.report(e),
            }
        }
    }
}
