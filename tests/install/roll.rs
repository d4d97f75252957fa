//! A rolling update watched from outside: a workload that must not notice
//! it (claims created all along, a pod writing and syncing every 100 ms),
//! the Lease changing hands, and the rollouts' progress.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::fixtures::claim;
use crate::harness::TestNamespace;

pub const NAMESPACE: &str = "stowage-system";

/// Claims created one after another until stopped, and when each was
/// first seen Bound.
pub struct ClaimLoad {
    created: Arc<Mutex<Vec<(String, Instant)>>>,
    bound: Arc<Mutex<BTreeMap<String, Instant>>>,
    stop: tokio::sync::watch::Sender<bool>,
    creator: JoinHandle<()>,
    watcher: JoinHandle<()>,
}

impl ClaimLoad {
    pub fn start(ns: &TestNamespace, class: &str, prefix: &str) -> Self {
        let bound = Arc::new(Mutex::new(BTreeMap::new()));
        let created = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let watcher = {
            let bound = bound.clone();
            let api = ns.api::<PersistentVolumeClaim>();
            tokio::spawn(async move {
                let mut claims = watcher(api, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(Ok(c)) = claims.next().await {
                    if crate::fixtures::is_bound(Some(&c)) {
                        bound
                            .lock()
                            .unwrap()
                            .entry(c.name_any())
                            .or_insert_with(Instant::now);
                    }
                }
            })
        };
        let creator = {
            let created = created.clone();
            let ns = TestNamespace {
                client: ns.client.clone(),
                name: ns.name.clone(),
            };
            let (class, prefix) = (class.to_string(), prefix.to_string());
            tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("{prefix}-{i}");
                    let at = Instant::now();
                    claim(&ns, &name, &class, "16Mi", &["ReadWriteOnce"]).await;
                    created.lock().unwrap().push((name, at));
                    tokio::select! {
                        _ = stopped.changed() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            })
        };
        ClaimLoad {
            created,
            bound,
            stop,
            creator,
            watcher,
        }
    }

    /// Waits until `more` claims beyond those bound now are Bound: the
    /// stack is provisioning, not just alive.
    pub async fn wait_for_more_bound(&self, more: usize, within: Duration) {
        let target = self.bound.lock().unwrap().len() + more;
        let deadline = Instant::now() + within;
        while self.bound.lock().unwrap().len() < target {
            assert!(
                Instant::now() < deadline,
                "fewer than {more} more claims Bound within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops creating, waits up to `within` after the last creation for
    /// every claim to be Bound, and returns each one's creation→Bound time.
    pub async fn finish(self, within: Duration) -> Vec<(String, Duration)> {
        let _ = self.stop.send(true);
        self.creator.await.unwrap();
        let created = self.created.lock().unwrap().clone();
        let deadline = Instant::now() + within;
        loop {
            let bound = self.bound.lock().unwrap().clone();
            let pending: Vec<&String> = created
                .iter()
                .map(|(n, _)| n)
                .filter(|n| !bound.contains_key(*n))
                .collect();
            if pending.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "claims not Bound {within:?} after the last was created: {pending:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.watcher.abort();
        let bound = self.bound.lock().unwrap().clone();
        created
            .into_iter()
            .map(|(n, at)| {
                let latency = bound[&n].saturating_duration_since(at);
                (n, latency)
            })
            .collect()
    }
}

/// When each holder of the Lease was first seen (None: released).
type Sightings = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

/// Who held the Lease when, from a watch: every write is seen, however
/// short the time between a release and the next acquisition.
pub struct LeaseWatch {
    seen: Sightings,
    task: JoinHandle<()>,
}

impl LeaseWatch {
    pub fn start(client: &Client) -> Self {
        let api = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
        let seen = Sightings::default();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let config = watcher::Config::default().fields("metadata.name=stowage-controller");
                let mut leases = watcher(api, config)
                    .default_backoff()
                    .applied_objects()
                    .boxed();
                while let Some(lease) = leases.next().await {
                    let Ok(lease) = lease else { continue };
                    let holder = lease.spec.and_then(|s| s.holder_identity);
                    let mut seen = seen.lock().unwrap();
                    if seen.last().map(|(_, h)| h) != Some(&holder) {
                        seen.push((Instant::now(), holder));
                    }
                }
            })
        };
        LeaseWatch { seen, task }
    }

    /// Each change of leader: (old, new, time without a leader between the
    /// old one's last sighting and the new one's first, whether the old one
    /// was seen releasing the Lease).
    pub fn handovers(&self) -> Vec<(String, String, Duration, bool)> {
        let seen = self.seen.lock().unwrap().clone();
        let mut out = Vec::new();
        let mut last: Option<(Instant, String)> = None;
        let mut released = false;
        for (i, (at, holder)) in seen.iter().enumerate() {
            match holder {
                Some(h) => {
                    if let Some((_, old)) = &last
                        && old != h
                    {
                        // The old leader was last seen just before this sample.
                        let until = seen.get(i.wrapping_sub(1)).map_or(*at, |(t, _)| *t);
                        let gap = if released {
                            at.saturating_duration_since(until)
                        } else {
                            Duration::ZERO
                        };
                        out.push((old.clone(), h.clone(), gap, released));
                    }
                    last = Some((*at, h.clone()));
                    released = false;
                }
                None => released = true,
            }
        }
        out
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls mountinfo every 20 ms and counts the samples in which `path` was
/// not a mount point.
pub struct MountWatch {
    missing: Arc<Mutex<u32>>,
    samples: Arc<Mutex<u32>>,
    task: JoinHandle<()>,
}

impl MountWatch {
    pub fn start(path: PathBuf) -> Self {
        let (missing, samples) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)));
        let task = {
            let (missing, samples) = (missing.clone(), samples.clone());
            tokio::spawn(async move {
                loop {
                    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                    let here = mounts
                        .lines()
                        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()));
                    *samples.lock().unwrap() += 1;
                    if !here {
                        *missing.lock().unwrap() += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        MountWatch {
            missing,
            samples,
            task,
        }
    }

    /// (samples taken, samples without the mount)
    pub fn finish(self) -> (u32, u32) {
        self.task.abort();
        let samples = *self.samples.lock().unwrap();
        let missing = *self.missing.lock().unwrap();
        (samples, missing)
    }
}

/// Waits until the controller Deployment and the node DaemonSet run only
/// pods of `image`, all ready.
pub async fn wait_rolled_out(client: &Client, image: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let problem = rollout_problem(client, image).await;
        let Some(problem) = problem else { return };
        assert!(
            Instant::now() < deadline,
            "not rolled out to {image} after {timeout:?}: {problem}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn rollout_problem(client: &Client, image: &str) -> Option<String> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE);
    let (d, ds) = match (
        deployments.get("stowage-controller").await,
        daemonsets.get("stowage-node").await,
    ) {
        (Ok(d), Ok(ds)) => (d, ds),
        (d, ds) => return Some(format!("{:?} / {:?}", d.err(), ds.err())),
    };
    let ds_status = ds.status.clone().unwrap_or_default();
    let d_status = d.status.clone().unwrap_or_default();
    if d_status.observed_generation < d.metadata.generation
        || d_status.updated_replicas != Some(2)
        || d_status.ready_replicas != Some(2)
        || d_status.replicas != Some(2)
    {
        return Some(format!("deployment {d_status:?}"));
    }
    if ds_status.observed_generation < ds.metadata.generation
        || ds_status.updated_number_scheduled != Some(1)
        || ds_status.number_ready != 1
    {
        return Some(format!("daemonset {ds_status:?}"));
    }
    let pods = match Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
    {
        Ok(pods) => pods,
        Err(e) => return Some(e.to_string()),
    };
    let stray: Vec<String> = pods
        .items
        .iter()
        .filter(|p| p.spec.as_ref().map(|s| s.containers[0].image.as_deref()) != Some(Some(image)))
        .map(|p| p.name_any())
        .collect();
    if pods.items.len() != 3 || !stray.is_empty() {
        return Some(format!(
            "{} pods, not yet on {image}: {stray:?}",
            pods.items.len()
        ));
    }
    None
}
