//! One stack's run: idle claims one at a time, N claims at once, N pods,
//! teardown; and the figures it gives.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::Child;

use crate::common::{api_reads, api_writes, peak_rss_kib, percentile, total_delta};
use crate::driver::NODE;
use crate::stack::Stack;
use crate::watch::{Watches, sorted_ms};

/// Requests in flight while creating claims and pods, as a busy user would.
const CREATE_CONCURRENCY: usize = 32;
/// How long a phase may take before the stack is given up on.
const PHASE_LIMIT: Duration = Duration::from_secs(1800);

pub struct Figures {
    pub stack: Stack,
    pub idle_claims: usize,
    pub claims_per_s: f64,
    pub bound_p50: f64,
    pub bound_p99: f64,
    pub idle_p50: f64,
    pub idle_p99: f64,
    pub idle_lost: usize,
    pub burst_lost: usize,
    pub attach_p50: f64,
    pub attach_p99: f64,
    pub va_p50: f64,
    pub va_p99: f64,
    pub attach_per_s: f64,
    pub writes_per_volume: f64,
    pub reads_per_volume: f64,
    pub rss_mib: f64,
    pub teardown_s: f64,
}

/// The stack's namespace, StorageClass (of the same name) and APIs.
struct Scene {
    ns: String,
    client: Client,
    claims: Api<PersistentVolumeClaim>,
    pods: Api<Pod>,
    vas: Api<VolumeAttachment>,
}

pub async fn run_stack(
    client: &Client,
    stack: Stack,
    driver_name: &str,
    n: usize,
    idle_claims: usize,
    processes: &[Child],
) -> anyhow::Result<Figures> {
    let s = Scene::new(client, stack, driver_name).await?;
    let w = Watches::start(s.claims.clone(), s.vas.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let idle = s.idle(&w, idle_claims).await?;
    let writes_before = api_writes(client).await?;
    let reads_before = api_reads(client).await?;
    let (claims_per_s, bound_ms, pvs) = s.burst(&w, n).await?;
    let (attach_per_s, attach_ms) = s.attach(&w, &pvs).await?;
    let va_ms = w.attached.ms_since(&pvs, |p| w.va_seen.get(p).unwrap());
    let writes = total_delta(&writes_before, &api_writes(client).await?);
    let reads = total_delta(&reads_before, &api_reads(client).await?);
    let rss_kib: u64 = processes
        .iter()
        .filter_map(|c| c.id())
        .map(peak_rss_kib)
        .sum();
    let teardown_s = s.teardown(&pvs).await?;

    Ok(Figures {
        stack,
        idle_claims,
        claims_per_s,
        bound_p50: percentile(&bound_ms, 0.5),
        bound_p99: percentile(&bound_ms, 0.99),
        idle_p50: percentile(&idle, 0.5),
        idle_p99: percentile(&idle, 0.99),
        idle_lost: w.lost_count("idle-"),
        burst_lost: w.lost_count("claim-"),
        attach_p50: percentile(&attach_ms, 0.5),
        attach_p99: percentile(&attach_ms, 0.99),
        va_p50: percentile(&va_ms, 0.5),
        va_p99: percentile(&va_ms, 0.99),
        attach_per_s,
        writes_per_volume: writes / n as f64,
        reads_per_volume: reads / n as f64,
        rss_mib: rss_kib as f64 / 1024.0,
        teardown_s,
    })
}

fn claim(name: &str, class: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": "16Mi" } } },
    }))
    .unwrap()
}

fn pod(name: &str, claim: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "nodeName": NODE, "containers": [{ "name": "c", "image": "none" }],
                  "volumes": [{ "name": "d", "persistentVolumeClaim": { "claimName": claim } }] },
    }))
    .unwrap()
}

impl Scene {
    async fn new(client: &Client, stack: Stack, driver_name: &str) -> anyhow::Result<Self> {
        let ns = format!("compare-{}", stack.name());
        let nsobj: Namespace = serde_json::from_value(json!({ "metadata": { "name": ns } }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &nsobj)
            .await?;
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": { "name": ns }, "provisioner": driver_name,
            "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
        }))?;
        Api::<StorageClass>::all(client.clone())
            .create(&PostParams::default(), &class)
            .await?;
        Ok(Scene {
            claims: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client.clone(), &ns),
            vas: Api::all(client.clone()),
            client: client.clone(),
            ns,
        })
    }

    /// `count` claims on the idle cluster, each created once the one before
    /// is Bound: milliseconds from create to Bound, sorted.
    async fn idle(&self, w: &Watches, count: usize) -> anyhow::Result<Vec<f64>> {
        let mut idle = Vec::new();
        for i in 0..count {
            let name = format!("idle-{i:03}");
            let t = Instant::now();
            self.claims
                .create(&PostParams::default(), &claim(&name, &self.ns))
                .await?;
            w.bound
                .wait_for(std::slice::from_ref(&name), Duration::from_secs(120))
                .await
                .map_err(|e| anyhow::anyhow!("idle claim {name} not Bound: {e}"))?;
            idle.push(w.bound.get(&name).unwrap().duration_since(t).as_secs_f64() * 1000.0);
        }
        Ok(sorted_ms(idle))
    }

    /// `n` claims at once to all Bound: claims/s, create→Bound in ms
    /// (sorted), and the claims' PV names in the claims' order.
    async fn burst(&self, w: &Watches, n: usize) -> anyhow::Result<(f64, Vec<f64>, Vec<String>)> {
        let names: Vec<String> = (0..n).map(|i| format!("claim-{i:05}")).collect();
        let start = Instant::now();
        let created: HashMap<String, (Instant, String)> = futures::stream::iter(names.clone())
            .map(|name| {
                let claims = self.claims.clone();
                let class = self.ns.clone();
                async move {
                    let t = Instant::now();
                    let made = claims
                        .create(&PostParams::default(), &claim(&name, &class))
                        .await
                        .expect("creating claim");
                    (name, (t, made.uid().unwrap()))
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect()
            .await;
        w.bound
            .wait_for(&names, PHASE_LIMIT)
            .await
            .map_err(|e| anyhow::anyhow!("claims not Bound: {e}"))?;
        let claims_per_s = n as f64 / w.bound.last(&names).duration_since(start).as_secs_f64();
        let bound_ms = w.bound.ms_since(&names, |n| created[n].0);
        let pvs = names
            .iter()
            .map(|n| format!("pvc-{}", created[n].1))
            .collect();
        Ok((claims_per_s, bound_ms, pvs))
    }

    /// A pod on NODE for each claim `claim-i` (PV `pvs[i]`): kcm creates a
    /// VolumeAttachment for each. Attaches/s and pod→attached in ms, sorted.
    async fn attach(&self, w: &Watches, pvs: &[String]) -> anyhow::Result<(f64, Vec<f64>)> {
        let start = Instant::now();
        let pod_created: HashMap<String, Instant> =
            futures::stream::iter(pvs.iter().cloned().enumerate())
                .map(|(i, pv)| {
                    let pods = self.pods.clone();
                    let name = format!("claim-{i:05}");
                    async move {
                        let t = Instant::now();
                        pods.create(&PostParams::default(), &pod(&name, &name))
                            .await
                            .expect("creating pod");
                        (pv, t)
                    }
                })
                .buffer_unordered(CREATE_CONCURRENCY)
                .collect()
                .await;
        w.attached
            .wait_for(pvs, PHASE_LIMIT)
            .await
            .map_err(|e| anyhow::anyhow!("volumes not attached: {e}"))?;
        let per_s = pvs.len() as f64 / w.attached.last(pvs).duration_since(start).as_secs_f64();
        Ok((per_s, w.attached.ms_since(pvs, |p| pod_created[p])))
    }

    /// Through the same stack: detach, then delete every volume. Seconds.
    async fn teardown(&self, pvs: &[String]) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.pods
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &ListParams::default(),
            )
            .await?;
        wait_until_none("VolumeAttachments", || async {
            let left = self.vas.list(&ListParams::default()).await?;
            Ok(left
                .items
                .iter()
                .filter(|va| {
                    va.spec
                        .source
                        .persistent_volume_name
                        .as_ref()
                        .is_some_and(|pv| pvs.contains(pv))
                })
                .count())
        })
        .await?;
        self.claims
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        let pv_api = Api::<PersistentVolume>::all(self.client.clone());
        wait_until_none("PersistentVolumes", || async {
            let left = pv_api.list(&ListParams::default()).await?;
            Ok(left
                .items
                .iter()
                .filter(|pv| {
                    pv.spec
                        .as_ref()
                        .and_then(|s| s.storage_class_name.as_deref())
                        == Some(self.ns.as_str())
                })
                .count())
        })
        .await?;
        Ok(start.elapsed().as_secs_f64())
    }
}

async fn wait_until_none<F, Fut>(what: &str, count: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let deadline = Instant::now() + PHASE_LIMIT;
    loop {
        let left = count().await?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} {what} still there after {PHASE_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
