//! `/healthz` of the controller: fails when a watch is stuck before its
//! list completes, or when the leader has stopped renewing its lease, so
//! that kubelet restarts a replica that would otherwise sit there
//! answering "ok" while doing nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::informer::{ProgressState, WatchProgress};
use super::leader::Renewals;
use crate::telemetry::Health;

/// The watches `/healthz` judges: the shared ones, known from the start,
/// and those a job opens later (VolumeSnapshotContents, once their CRD is
/// served).
#[derive(Clone)]
pub struct Watches(Arc<Mutex<Vec<Arc<WatchProgress>>>>);

impl Watches {
    pub fn new(watches: Vec<Arc<WatchProgress>>) -> Self {
        Watches(Arc::new(Mutex::new(watches)))
    }

    pub fn add(&self, watch: Arc<WatchProgress>) {
        self.0.lock().expect("watches poisoned").push(watch);
    }

    fn all(&self) -> Vec<Arc<WatchProgress>> {
        self.0.lock().expect("watches poisoned").clone()
    }
}

pub struct ControllerHealth {
    pub watches: Watches,
    /// Present when leader election is on.
    pub renewals: Option<(Arc<Renewals>, Duration)>,
    /// `--health-stall-timeout`.
    pub stall_timeout: Duration,
}

impl Health for ControllerHealth {
    fn healthy(&self) -> Result<(), String> {
        let watches = self.watches.all();
        let watches: Vec<_> = watches.iter().map(|w| (w.kind(), w.state())).collect();
        let leader = self
            .renewals
            .as_ref()
            .and_then(|(r, deadline)| Some((r.last()?, *deadline)));
        judge(&watches, leader, self.stall_timeout, Instant::now())
    }
}

/// Healthy unless a watch has neither a complete list nor delivered an
/// event for `stall_timeout`, or the lease this replica holds was last
/// renewed longer than its renew deadline ago. A quiet watch with a
/// complete list is fine: quiet clusters exist.
pub fn judge(
    watches: &[(&str, ProgressState)],
    leader: Option<(Instant, Duration)>,
    stall_timeout: Duration,
    now: Instant,
) -> Result<(), String> {
    let mut problems = Vec::new();
    for (kind, state) in watches {
        let quiet = now.saturating_duration_since(state.last_event);
        if !state.listed && quiet >= stall_timeout {
            problems.push(format!(
                "the {kind} watch has not completed its list and made no progress for {}s",
                quiet.as_secs()
            ));
        }
    }
    if let Some((renewed, deadline)) = leader {
        let since = now.saturating_duration_since(renewed);
        if since > deadline {
            problems.push(format!(
                "the leader lease was last renewed {}s ago (renew deadline {}s)",
                since.as_secs(),
                deadline.as_secs()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_watch_a_job_opens_later_is_judged_too() {
        let health = ControllerHealth {
            watches: Watches::new(Vec::new()),
            renewals: None,
            stall_timeout: STALL,
        };
        let contents = crate::controller::informer::Informer::<
            crate::snapshot_api::VolumeSnapshotContent,
        >::default();
        health.watches.add(contents.progress());
        assert_eq!(health.healthy(), Ok(()), "its list has just started");
        tokio::time::advance(STALL + Duration::from_secs(1)).await;
        let verdict = health.healthy().unwrap_err();
        assert!(verdict.contains("VolumeSnapshotContent watch"), "{verdict}");
    }

    const STALL: Duration = Duration::from_secs(60);

    fn state(secs_ago: u64, listed: bool, now: Instant) -> ProgressState {
        ProgressState {
            last_event: now - Duration::from_secs(secs_ago),
            listed,
        }
    }

    /// A moment late enough that every `now - secs_ago` exists.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// The verdict on a lone Node watch.
    fn one_watch(secs_ago: u64, listed: bool) -> Result<(), String> {
        let now = later();
        judge(&[("Node", state(secs_ago, listed, now))], None, STALL, now)
    }

    #[test]
    fn a_quiet_watch_with_its_list_is_healthy() {
        assert_eq!(one_watch(3000, true), Ok(()));
    }

    #[test]
    fn a_list_in_progress_is_healthy_while_it_moves() {
        assert_eq!(one_watch(59, false), Ok(()));
    }

    #[test]
    fn a_list_that_stopped_moving_is_unhealthy() {
        let now = later();
        let err = judge(
            &[
                ("Node", state(1, true, now)),
                ("PersistentVolumeClaim", state(61, false, now)),
            ],
            None,
            STALL,
            now,
        )
        .unwrap_err();
        assert!(err.contains("PersistentVolumeClaim watch"), "{err}");
        assert!(!err.contains("Node"), "{err}");
    }

    #[test]
    fn a_leader_behind_on_renewals_is_unhealthy() {
        let now = later();
        let deadline = Duration::from_secs(10);
        let renewed = |ago| Some((now - Duration::from_secs(ago), deadline));
        assert_eq!(judge(&[], renewed(9), STALL, now), Ok(()));
        let err = judge(&[], renewed(11), STALL, now).unwrap_err();
        assert!(err.contains("leader lease"), "{err}");
    }
}
