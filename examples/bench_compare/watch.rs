//! When each claim and volume reached the state a phase waits for, from
//! watches opened before the phase starts, so that no transition is missed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// When each object (by name) first reached the state a watcher looks for.
#[derive(Clone, Default)]
pub struct Reached {
    at: Arc<Mutex<HashMap<String, Instant>>>,
    changed: Arc<Notify>,
}

impl Reached {
    fn record(&self, name: String) {
        let mut at = self.at.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(e) = at.entry(name) {
            e.insert(Instant::now());
            self.changed.notify_waiters();
        }
    }

    pub async fn wait_for(&self, names: &[String], limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            {
                let at = self.at.lock().unwrap();
                let missing = names.iter().filter(|n| !at.contains_key(*n)).count();
                if missing == 0 {
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("{missing} of {} not there after {limit:?}", names.len());
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    pub fn get(&self, name: &str) -> Option<Instant> {
        self.at.lock().unwrap().get(name).copied()
    }

    /// When the last of `names` got there (all of them have).
    pub fn last(&self, names: &[String]) -> Instant {
        names.iter().filter_map(|n| self.get(n)).max().unwrap()
    }

    /// Milliseconds from `since(name)` to getting there, sorted.
    pub fn ms_since(&self, names: &[String], since: impl Fn(&str) -> Instant) -> Vec<f64> {
        sorted_ms(
            names
                .iter()
                .map(|n| self.get(n).unwrap().duration_since(since(n)).as_secs_f64() * 1000.0)
                .collect(),
        )
    }
}

pub fn sorted_ms(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Watches on the stack's claims and on every VolumeAttachment.
pub struct Watches {
    /// Claims first seen Bound.
    pub bound: Reached,
    /// Claims kube-controller-manager ever set to Lost (it does when a claim
    /// names a PV its own cache lacks): names, counted per phase.
    lost: Arc<Mutex<BTreeSet<String>>>,
    /// Volumes (PV names) whose VolumeAttachment was first seen attached.
    pub attached: Reached,
    /// When each volume's VolumeAttachment was first seen: the attacher's
    /// own share of pod→attached, without kcm's attach-detach controller.
    pub va_seen: Reached,
    tasks: Vec<JoinHandle<()>>,
}

impl Watches {
    pub fn start(claims: Api<PersistentVolumeClaim>, vas: Api<VolumeAttachment>) -> Self {
        let (bound, attached, va_seen) =
            (Reached::default(), Reached::default(), Reached::default());
        let lost = Arc::new(Mutex::new(BTreeSet::new()));
        let claim_task = {
            let (bound, lost) = (bound.clone(), lost.clone());
            tokio::spawn(async move {
                let mut stream = watcher(claims, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(Ok(claim)) = stream.next().await {
                    match claim.status.as_ref().and_then(|s| s.phase.as_deref()) {
                        Some("Bound") => bound.record(claim.name_any()),
                        Some("Lost") => {
                            lost.lock().unwrap().insert(claim.name_any());
                        }
                        _ => {}
                    }
                }
            })
        };
        let va_task = {
            let (attached, va_seen) = (attached.clone(), va_seen.clone());
            tokio::spawn(async move {
                let mut stream = watcher(vas, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(Ok(va)) = stream.next().await {
                    let Some(pv) = va.spec.source.persistent_volume_name.clone() else {
                        continue;
                    };
                    va_seen.record(pv.clone());
                    if va.status.as_ref().is_some_and(|s| s.attached) {
                        attached.record(pv);
                    }
                }
            })
        };
        Watches {
            bound,
            lost,
            attached,
            va_seen,
            tasks: vec![claim_task, va_task],
        }
    }

    /// Claims ever Lost whose names start with `prefix`.
    pub fn lost_count(&self, prefix: &str) -> usize {
        let lost = self.lost.lock().unwrap();
        lost.iter().filter(|n| n.starts_with(prefix)).count()
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
