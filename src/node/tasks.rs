//! The tasks of a node and its components: every one has an owner and a span.
//!
//! A component spawns its background work with [`Node::spawn_task`](super::Node::spawn_task),
//! never with a bare `tokio::spawn`. The node's supervisor holds every task's handle: a task
//! that panics is logged and remembered (tests fail on it, see
//! [`Node::task_panics`](super::Node::task_panics)), and every task still running when the node
//! stops is aborted with it, so no work outlives its node. Each task runs inside a span naming
//! the node and the component.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use futures::{StreamExt as _, stream::FuturesUnordered};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::Instrument as _;

/// A task that panicked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskPanic {
    /// The component that spawned it (`registry`, `broker`, …).
    pub component: &'static str,
    /// The panic's message.
    pub message: String,
}

/// Handles of tasks spawned since the supervisor last looked.
#[derive(Default)]
struct Pending {
    handles: Vec<(&'static str, JoinHandle<()>)>,
    stopped: bool,
}

/// The owner of a node's tasks. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Tasks {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    panics: Arc<Mutex<Vec<TaskPanic>>>,
    span: tracing::Span,
}

impl Tasks {
    /// An owner whose tasks run inside `span` (the node's).
    pub(crate) fn new(span: tracing::Span) -> Self {
        Self {
            pending: Arc::default(),
            wake: Arc::new(Notify::new()),
            panics: Arc::default(),
            span,
        }
    }

    /// Spawns `task` for `component`. After the node stopped, the task is not started.
    pub(crate) fn spawn<F>(&self, component: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let span = tracing::debug_span!(parent: &self.span, "task", component);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.stopped {
            return;
        }
        let handle = tokio::spawn(task.instrument(span));
        pending.handles.push((component, handle));
        drop(pending);
        self.wake.notify_one();
    }

    /// The tasks that panicked so far.
    pub(crate) fn panics(&self) -> Vec<TaskPanic> {
        self.panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Watches every task until `stopped` completes, then aborts those still running.
    pub(crate) async fn supervise(self, stopped: impl Future<Output = ()>) {
        let mut running = FuturesUnordered::new();
        let mut aborts = HashMap::new();
        tokio::pin!(stopped);
        loop {
            let new = std::mem::take(
                &mut self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handles,
            );
            for (component, handle) in new {
                aborts.insert(handle.id(), handle.abort_handle());
                running.push(async move {
                    let id = handle.id();
                    (component, id, handle.await)
                });
            }
            tokio::select! {
                () = &mut stopped => break,
                () = self.wake.notified() => {}
                Some((component, id, result)) = running.next(), if !running.is_empty() => {
                    aborts.remove(&id);
                    if let Err(e) = result
                        && e.is_panic()
                    {
                        let message = panic_message(e.into_panic());
                        tracing::error!(component, "a task panicked: {message}");
                        self.panics
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(TaskPanic { component, message });
                    }
                }
            }
        }
        let left = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.stopped = true;
            std::mem::take(&mut pending.handles)
        };
        for abort in aborts.into_values() {
            abort.abort();
        }
        for (_, handle) in left {
            handle.abort();
        }
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::Tasks;

    #[tokio::test]
    async fn tasks_end_with_their_owner_and_panics_are_kept() {
        let tasks = Tasks::new(tracing::Span::none());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let supervisor = tokio::spawn(tasks.clone().supervise(async move {
            let _ = stopped.await;
        }));
        let held = Arc::new(());
        let in_task = held.clone();
        tasks.spawn("forever", async move {
            let _held = in_task;
            std::future::pending::<()>().await;
        });
        tasks.spawn("buggy", async { panic!("broken") });
        let reported = async {
            while tasks.panics().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reported)
            .await
            .expect("the panic is reported");
        assert_eq!(tasks.panics()[0].component, "buggy");
        assert_eq!(Arc::strong_count(&held), 2, "the endless task runs");
        stop.send(()).unwrap();
        supervisor.await.unwrap();
        // Aborted: its future (and what it held) is dropped.
        let released = async {
            while Arc::strong_count(&held) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), released)
            .await
            .expect("the endless task is aborted");
        // After the owner stopped, nothing new starts.
        let late = held.clone();
        tasks.spawn("late", async move { drop(late) });
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
