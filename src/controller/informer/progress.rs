//! How far each watch has come, for `/healthz`.

use std::sync::Mutex;

use tokio::time::Instant;

/// How far a watch has come, for `/healthz`.
#[derive(Debug)]
pub struct WatchProgress {
    kind: String,
    state: Mutex<ProgressState>,
    /// Whether a list ever completed. Its own signal, not the store's
    /// `wait_until_ready`: that one remembers a single waiter's waker, and
    /// each job's `Controller` waits on it too.
    listed_once: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, Clone, Copy)]
pub struct ProgressState {
    /// When the watch last delivered an event.
    pub last_event: Instant,
    /// Whether the cache holds a complete list (false during a list).
    pub listed: bool,
}

impl WatchProgress {
    pub(super) fn new(kind: String) -> Self {
        WatchProgress {
            kind,
            state: Mutex::new(ProgressState {
                last_event: Instant::now(),
                listed: false,
            }),
            listed_once: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Resolves once the cache has held a complete list.
    pub async fn listed(&self) {
        let mut listed = self.listed_once.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = listed.wait_for(|l| *l).await;
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn state(&self) -> ProgressState {
        *self.state.lock().expect("progress lock poisoned")
    }

    /// A list (re)starts. The watcher says so before every attempt, also
    /// when the last one failed: only the first of a row starts the stall
    /// clock, or a list that fails forever would look busy.
    pub(super) fn list_started(&self) {
        let mut state = self.state.lock().expect("progress lock poisoned");
        if state.listed {
            *state = ProgressState {
                last_event: Instant::now(),
                listed: false,
            };
        }
    }

    pub(super) fn advanced(&self, listed: bool) {
        *self.state.lock().expect("progress lock poisoned") = ProgressState {
            last_event: Instant::now(),
            listed,
        };
        if listed {
            self.listed_once
                .send_if_modified(|l| !std::mem::replace(l, true));
        }
    }
}
