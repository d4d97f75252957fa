//! When reconciles may act, and how the controller stops.
//!
//! Jobs run, and drain their watches, from the start; what they may not do
//! is act before this replica leads with complete caches, or after it
//! stopped leading. Every reconcile passes the `Gate` first: it waits there
//! while the replica is not ready, and turns back once it is stopping.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Not leader yet, or caches still loading.
    #[default]
    Waiting,
    Open,
    /// Stopping: nothing more may start.
    Closed,
}

#[derive(Debug, Clone, Copy, Default)]
struct GateState {
    phase: Phase,
    /// Reconciles past the gate and not finished.
    in_flight: usize,
}

/// Lets reconciles through only while this replica may act. It starts
/// waiting, with nothing in flight.
#[derive(Clone, Default)]
pub struct Gate {
    state: Arc<watch::Sender<GateState>>,
}

/// A reconcile that passed the gate; the gate counts it until it drops.
pub struct Pass {
    state: Arc<watch::Sender<GateState>>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.state.send_modify(|s| s.in_flight -= 1);
    }
}

impl Gate {
    /// Lets reconciles act (unless the gate was closed meanwhile).
    pub fn open(&self) {
        self.state.send_if_modified(|s| {
            let waiting = s.phase == Phase::Waiting;
            if waiting {
                s.phase = Phase::Open;
            }
            waiting
        });
    }

    /// Stops letting reconciles through; those waiting turn back.
    pub fn close(&self) {
        self.state.send_modify(|s| s.phase = Phase::Closed);
    }

    pub fn is_open(&self) -> bool {
        self.state.borrow().phase == Phase::Open
    }

    /// Waits until reconciles may act: Some while it is open, None once it
    /// is closed.
    pub async fn enter(&self) -> Option<Pass> {
        let mut changes = self.state.subscribe();
        loop {
            // Checked and counted in one step, so that `drained` never
            // misses a reconcile that entered as the gate closed.
            let mut phase = Phase::Waiting;
            self.state.send_if_modified(|s| {
                phase = s.phase;
                if s.phase == Phase::Open {
                    s.in_flight += 1;
                }
                false
            });
            match phase {
                Phase::Open => {
                    return Some(Pass {
                        state: self.state.clone(),
                    });
                }
                Phase::Closed => return None,
                Phase::Waiting => {
                    if changes.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits for the reconciles past the gate to finish, up to `timeout`;
    /// false if some were still running then.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let mut changes = self.state.subscribe();
        let idle = async {
            while changes.borrow_and_update().in_flight > 0 {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }
}

/// The process was asked to stop (SIGTERM, Ctrl-C).
#[derive(Clone, Default)]
pub struct Shutdown {
    requested: Arc<watch::Sender<bool>>,
}

impl Shutdown {
    /// Requested on SIGTERM or SIGINT. The handlers are in place when this
    /// returns, so a signal from then on is never the default "die at once".
    pub fn on_signals() -> std::io::Result<Self> {
        let signal = crate::telemetry::stop_signals()?;
        let shutdown = Shutdown::default();
        let requested = shutdown.clone();
        tokio::spawn(async move {
            let name = signal.await;
            tracing::info!("{name}: stopping");
            requested.request();
        });
        Ok(shutdown)
    }

    pub fn request(&self) {
        self.requested.send_replace(true);
    }

    /// Resolves once a stop was requested.
    pub fn requested(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut changes = self.requested.subscribe();
        async move {
            while !*changes.borrow_and_update() {
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reconcile gone to wait at `gate`: whether it was let through.
    async fn waiting_at(gate: &Gate) -> tokio::task::JoinHandle<bool> {
        let gate = gate.clone();
        let waiting = tokio::spawn(async move { gate.enter().await.is_some() });
        tokio::task::yield_now().await;
        waiting
    }

    #[tokio::test]
    async fn reconciles_wait_at_a_closed_gate_until_it_opens() {
        let gate = Gate::default();
        let waiting = waiting_at(&gate).await;
        assert!(!waiting.is_finished(), "passed a gate that was not open");
        gate.open();
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn closing_turns_back_the_waiting_and_the_next() {
        let gate = Gate::default();
        let waiting = waiting_at(&gate).await;
        gate.close();
        assert!(!waiting.await.unwrap());
        gate.open();
        assert!(gate.enter().await.is_none(), "a closed gate reopened");
    }

    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_reconciles_in_flight() {
        let gate = Gate::default();
        gate.open();
        let pass = gate.enter().await.unwrap();
        gate.close();
        assert!(!gate.drained(Duration::from_secs(1)).await);
        drop(pass);
        assert!(gate.drained(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn shutdown_resolves_for_every_waiter() {
        let shutdown = Shutdown::default();
        let (a, b) = (shutdown.requested(), shutdown.requested());
        shutdown.request();
        a.await;
        b.await;
        shutdown.requested().await;
    }
}
