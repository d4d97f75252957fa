//! `just bench-compare N PLUGIN`: stowage against the CSI sidecars it
//! replaces, in one run, on the same control plane and the same driver
//! (csi-driver-host-path's `hostpathplugin`, `--enable-attach`, CSIDriver
//! `attachRequired: true`). Not a test: it prints figures and writes them to
//! target/bench/compare-N.{md,csv}.
//!
//! Stacks, one after another, each with a fresh driver instance:
//! - `sidecars-default`: external-provisioner + external-attacher at their
//!   default flags (kube-controller-manager's binder binds the claims);
//! - `sidecars-raised`: the same with the API budget and workers of stowage
//!   (no client-side rate limit, at least 16 workers);
//! - `stowage`: `stowage controller --csi-driver`.
//!
//! Per stack: 10 single claims one at a time on the idle cluster, then N
//! claims at once to all Bound, then N pods on the one Node object (which
//! kube-controller-manager's attach-detach controller turns into
//! VolumeAttachments) to all attached, then teardown.
//!
//! Run under `scripts/cluster.sh run` (KUBECONFIG set) with
//! STOWAGE_SIDECARS naming the directory scripts/build-sidecars.sh prints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass, VolumeAttachment};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

#[path = "common/mod.rs"]
mod common;
use common::{api_reads, api_writes, peak_rss_kib, percentile, total_delta};

const DRIVER: &str = "hostpath.csi.k8s.io";
const NODE: &str = "bench-hostpath";
const TOPOLOGY_KEY: &str = "topology.hostpath.csi/node";
const IDLE_CLAIMS: usize = 30;
/// Requests in flight while creating claims and pods, as a busy user would.
const CREATE_CONCURRENCY: usize = 32;
/// stowage's default `--workers`.
const STOWAGE_WORKERS: u32 = 16;
/// What stands for "no client-side rate limit" in client-go's flags.
const UNLIMITED_QPS: u32 = 100_000;

#[derive(Clone, Copy, PartialEq)]
enum Stack {
    SidecarsDefault,
    SidecarsRaised,
    Stowage,
}

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::SidecarsDefault => "sidecars-default",
            Stack::SidecarsRaised => "sidecars-raised",
            Stack::Stowage => "stowage",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Stack::SidecarsDefault => {
                "external-provisioner v6.4.0 + external-attacher v4.13.0, default flags (QPS 5, burst 10; 100 and 10 workers)"
            }
            Stack::SidecarsRaised => {
                "the same sidecars, QPS/burst 100000 (unlimited, as stowage), 100 and 16 workers"
            }
            Stack::Stowage => "stowage controller --csi-driver (no client-side limit, 16 workers)",
        }
    }
}

struct Figures {
    stack: Stack,
    claims_per_s: f64,
    bound_p50: f64,
    bound_p99: f64,
    idle_p50: f64,
    idle_p99: f64,
    attach_p50: f64,
    attach_p99: f64,
    va_p50: f64,
    va_p99: f64,
    attach_per_s: f64,
    writes_per_volume: f64,
    reads_per_volume: f64,
    rss_mib: f64,
    teardown_s: f64,
}

/// When each object (by name) first reached the state a watcher looks for.
#[derive(Clone, Default)]
struct Reached {
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

    async fn wait_for(&self, names: &[String], limit: Duration) -> anyhow::Result<()> {
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

    fn get(&self, name: &str) -> Option<Instant> {
        self.at.lock().unwrap().get(name).copied()
    }

    /// When the last of `names` got there (all of them have).
    fn last(&self, names: &[String]) -> Instant {
        names.iter().filter_map(|n| self.get(n)).max().unwrap()
    }

    /// Milliseconds from `since(name)` to getting there, sorted.
    fn ms_since(&self, names: &[String], since: impl Fn(&str) -> Instant) -> Vec<f64> {
        sorted_ms(
            names
                .iter()
                .map(|n| self.get(n).unwrap().duration_since(since(n)).as_secs_f64() * 1000.0)
                .collect(),
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().unwrap_or_else(|| "100".into()).parse()?;
    let plugin = PathBuf::from(args.next().ok_or_else(|| {
        anyhow::anyhow!(
            "usage: bench_compare N PATH/TO/hostpathplugin (csi-driver-host-path's cmd/hostpathplugin)"
        )
    })?);
    anyhow::ensure!(plugin.exists(), "{} does not exist", plugin.display());
    let sidecars = PathBuf::from(std::env::var("STOWAGE_SIDECARS").map_err(|_| {
        anyhow::anyhow!("set STOWAGE_SIDECARS to the directory scripts/build-sidecars.sh prints")
    })?);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stowage = common::release_stowage()?;
    let kubeconfig = std::env::var("KUBECONFIG")
        .map_err(|_| anyhow::anyhow!("run me under scripts/cluster.sh run"))?;
    let client = Client::try_default().await?;
    let out = root.join("target/bench");
    std::fs::create_dir_all(out.join("logs"))?;

    set_up_cluster(&client).await?;
    let heartbeat = tokio::spawn(keep_node_ready(client.clone()));

    let mut results = Vec::new();
    // STOWAGE_BENCH_STACKS=stowage (comma-separated names) runs a subset,
    // for a quick look at one stack; the comparison wants all three.
    let only = std::env::var("STOWAGE_BENCH_STACKS").ok();
    let stacks = [
        Stack::SidecarsDefault,
        Stack::SidecarsRaised,
        Stack::Stowage,
    ]
    .into_iter()
    .filter(|s| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == s.name()))
    });
    for stack in stacks {
        eprintln!("== {} ({n} claims)", stack.name());
        let work = std::env::temp_dir().join(format!(
            "stowage-compare-{}-{}",
            std::process::id(),
            stack.name()
        ));
        std::fs::create_dir_all(&work)?;
        let socket = work.join("csi.sock");
        let log = |name: &str| -> anyhow::Result<Stdio> {
            Ok(std::fs::File::create(
                out.join("logs")
                    .join(format!("compare-{n}-{}-{name}.log", stack.name())),
            )?
            .into())
        };
        let _driver = Command::new(&plugin)
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--drivername={DRIVER}"))
            .arg(format!("--nodeid={NODE}"))
            .arg(format!("--statedir={}", work.join("state").display()))
            .arg("--enable-attach")
            .stdout(Stdio::null())
            .stderr(log("hostpathplugin")?)
            .kill_on_drop(true)
            .spawn()?;
        wait_for_socket(&socket).await?;
        let processes = start_stack(stack, &stowage, &sidecars, &socket, &kubeconfig, &log)?;
        let figures = run_stack(&client, stack, n, &processes).await;
        drop(processes);
        let _ = std::fs::remove_dir_all(&work);
        results.push(figures?);
    }
    heartbeat.abort();

    let (markdown, csv) = report(n, &results);
    print!("{markdown}");
    std::fs::write(out.join(format!("compare-{n}.md")), &markdown)?;
    std::fs::write(out.join(format!("compare-{n}.csv")), &csv)?;
    eprintln!("written: target/bench/compare-{n}.md and .csv");
    Ok(())
}

/// What kubelet and the driver's deployment would have set up: the
/// CSIDriver, a Node with the driver's topology label whose volumes the
/// attach-detach controller manages, its CSINode, and stowage's CRDs.
async fn set_up_cluster(client: &Client) -> anyhow::Result<()> {
    let apply = PatchParams::apply("bench-compare").force();
    let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone());
    for crd in stowage::crd::all() {
        crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd))
            .await?;
    }
    let driver: CSIDriver = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": DRIVER },
        "spec": { "attachRequired": true, "podInfoOnMount": false },
    }))?;
    Api::<CSIDriver>::all(client.clone())
        .patch(DRIVER, &apply, &Patch::Apply(&driver))
        .await?;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": NODE,
            "labels": { "kubernetes.io/hostname": NODE, TOPOLOGY_KEY: NODE },
            "annotations": { "volumes.kubernetes.io/controller-managed-attach-detach": "true" } },
    }))?;
    Api::<Node>::all(client.clone())
        .patch(NODE, &apply, &Patch::Apply(&node))
        .await?;
    mark_ready(client).await?;
    let csinode: CSINode = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": { "name": NODE },
        "spec": { "drivers": [{ "name": DRIVER, "nodeID": NODE, "topologyKeys": [TOPOLOGY_KEY] }] },
    }))?;
    Api::<CSINode>::all(client.clone())
        .patch(NODE, &apply, &Patch::Apply(&csinode))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

async fn mark_ready(client: &Client) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({ "status": {
        "capacity": { "cpu": "64", "memory": "256Gi", "pods": "10000" },
        "allocatable": { "cpu": "64", "memory": "256Gi", "pods": "10000" },
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "benchmark node", "lastHeartbeatTime": now, "lastTransitionTime": now }],
    }});
    Api::<Node>::all(client.clone())
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// No kubelet posts this Node's status: without a heartbeat the node
/// lifecycle controller would taint it and evict the pods mid-run.
async fn keep_node_ready(client: Client) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Err(e) = mark_ready(&client).await {
            eprintln!("node heartbeat: {e}");
        }
    }
}

async fn wait_for_socket(socket: &Path) -> anyhow::Result<()> {
    for _ in 0..100 {
        if socket.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("hostpathplugin never created {}", socket.display())
}

fn start_stack(
    stack: Stack,
    stowage: &Path,
    sidecars: &Path,
    socket: &Path,
    kubeconfig: &str,
    log: &dyn Fn(&str) -> anyhow::Result<Stdio>,
) -> anyhow::Result<Vec<Child>> {
    let spawn = |binary: PathBuf, args: Vec<String>, name: &str| -> anyhow::Result<Child> {
        anyhow::ensure!(
            binary.exists(),
            "{} missing: run scripts/build-sidecars.sh",
            binary.display()
        );
        Ok(Command::new(&binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log(name)?)
            .kill_on_drop(true)
            .spawn()?)
    };
    let common = |workers: u32, raised: bool| {
        let mut args = vec![
            format!("--csi-address={}", socket.display()),
            format!("--kubeconfig={kubeconfig}"),
            "--leader-election=false".to_string(),
            "--v=1".to_string(),
        ];
        if raised {
            args.push(format!("--kube-api-qps={UNLIMITED_QPS}"));
            args.push(format!("--kube-api-burst={UNLIMITED_QPS}"));
            args.push(format!("--worker-threads={workers}"));
        }
        args
    };
    Ok(match stack {
        Stack::SidecarsDefault | Stack::SidecarsRaised => {
            let raised = stack == Stack::SidecarsRaised;
            vec![
                spawn(
                    sidecars.join("csi-provisioner"),
                    common(100.max(STOWAGE_WORKERS), raised),
                    "csi-provisioner",
                )?,
                spawn(
                    sidecars.join("csi-attacher"),
                    common(10.max(STOWAGE_WORKERS), raised),
                    "csi-attacher",
                )?,
            ]
        }
        Stack::Stowage => vec![spawn(
            stowage.to_path_buf(),
            vec![
                "controller".into(),
                "--leader-elect=false".into(),
                "--metrics-addr=127.0.0.1:0".into(),
                format!("--csi-driver={DRIVER}=unix://{}", socket.display()),
            ],
            "stowage",
        )?],
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

fn sorted_ms(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

async fn run_stack(
    client: &Client,
    stack: Stack,
    n: usize,
    processes: &[Child],
) -> anyhow::Result<Figures> {
    let ns = format!("compare-{}", stack.name());
    let nsobj: Namespace = serde_json::from_value(json!({ "metadata": { "name": ns } }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &nsobj)
        .await?;
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": ns }, "provisioner": DRIVER,
        "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
    }))?;
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let vas = Api::<VolumeAttachment>::all(client.clone());

    // Watch first, so that no transition is missed.
    let bound = Reached::default();
    let watch = {
        let (claims, bound) = (claims.clone(), bound.clone());
        tokio::spawn(async move {
            let mut stream = watcher(claims, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(claim)) = stream.next().await {
                if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                    bound.record(claim.name_any());
                }
            }
        })
    };
    let attached = Reached::default();
    // When each VolumeAttachment was first seen: the attacher's own share
    // of pod→attached, without kcm's attach-detach controller.
    let va_seen = Reached::default();
    let watch_vas = {
        let (vas, attached, va_seen) = (vas.clone(), attached.clone(), va_seen.clone());
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
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Single claims on an idle cluster.
    let mut idle = Vec::new();
    for i in 0..IDLE_CLAIMS {
        let name = format!("idle-{i:02}");
        let t = Instant::now();
        claims
            .create(&PostParams::default(), &claim(&name, &ns))
            .await?;
        bound
            .wait_for(std::slice::from_ref(&name), Duration::from_secs(120))
            .await
            .map_err(|e| anyhow::anyhow!("{}: idle claim {name} not Bound: {e}", stack.name()))?;
        idle.push(bound.get(&name).unwrap().duration_since(t).as_secs_f64() * 1000.0);
    }
    let idle = sorted_ms(idle);

    // N claims at once.
    let writes_before = api_writes(client).await?;
    let reads_before = api_reads(client).await?;
    let names: Vec<String> = (0..n).map(|i| format!("claim-{i:05}")).collect();
    let start = Instant::now();
    let created: HashMap<String, (Instant, String)> = futures::stream::iter(names.clone())
        .map(|name| {
            let claims = claims.clone();
            let class = ns.clone();
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
    bound
        .wait_for(&names, Duration::from_secs(3600))
        .await
        .map_err(|e| anyhow::anyhow!("{}: claims not Bound: {e}", stack.name()))?;
    let claims_per_s = n as f64 / bound.last(&names).duration_since(start).as_secs_f64();
    let bound_ms = bound.ms_since(&names, |n| created[n].0);

    // N pods on the node: kcm creates a VolumeAttachment for each claim.
    let pvs: Vec<String> = names
        .iter()
        .map(|n| format!("pvc-{}", created[n].1))
        .collect();
    let attach_start = Instant::now();
    let pod_created: HashMap<String, Instant> = futures::stream::iter(names.clone())
        .map(|name| {
            let pods = pods.clone();
            let pv = format!("pvc-{}", created[&name].1);
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
    attached
        .wait_for(&pvs, Duration::from_secs(3600))
        .await
        .map_err(|e| anyhow::anyhow!("{}: volumes not attached: {e}", stack.name()))?;
    let attach_per_s = n as f64
        / attached
            .last(&pvs)
            .duration_since(attach_start)
            .as_secs_f64();
    let va_ms = attached.ms_since(&pvs, |p| va_seen.get(p).unwrap());
    let attach_ms = attached.ms_since(&pvs, |p| pod_created[p]);
    let writes = total_delta(&writes_before, &api_writes(client).await?);
    let reads = total_delta(&reads_before, &api_reads(client).await?);
    let rss_kib: u64 = processes
        .iter()
        .filter_map(|c| c.id())
        .map(peak_rss_kib)
        .sum();

    // Teardown through the same stack: detach, then delete every volume.
    let teardown = Instant::now();
    pods.delete_collection(
        &DeleteParams::default().grace_period(0),
        &ListParams::default(),
    )
    .await?;
    wait_until_none(
        || async {
            let left = vas.list(&ListParams::default()).await?;
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
        },
        "VolumeAttachments",
    )
    .await?;
    claims
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let pv_api = Api::<PersistentVolume>::all(client.clone());
    wait_until_none(
        || async {
            let left = pv_api.list(&ListParams::default()).await?;
            Ok(left
                .items
                .iter()
                .filter(|pv| {
                    pv.spec
                        .as_ref()
                        .and_then(|s| s.storage_class_name.as_deref())
                        == Some(ns.as_str())
                })
                .count())
        },
        "PersistentVolumes",
    )
    .await?;
    let teardown_s = teardown.elapsed().as_secs_f64();
    watch.abort();
    watch_vas.abort();

    Ok(Figures {
        stack,
        claims_per_s,
        bound_p50: percentile(&bound_ms, 0.5),
        bound_p99: percentile(&bound_ms, 0.99),
        idle_p50: percentile(&idle, 0.5),
        idle_p99: percentile(&idle, 0.99),
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

async fn wait_until_none<F, Fut>(count: F, what: &str) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let left = count().await?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} {what} still there after an hour"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn report(n: usize, results: &[Figures]) -> (String, String) {
    let mut md = format!(
        "## stowage vs CSI sidecars: {n} claims, csi-driver-host-path (attachRequired), one control plane\n\n"
    );
    for f in results {
        md.push_str(&format!("- `{}`: {}\n", f.stack.name(), f.stack.describe()));
    }
    // (markdown header, CSV header, value, decimals in the markdown)
    let columns = |f: &Figures| -> Vec<(&'static str, &'static str, f64, usize)> {
        vec![
            ("claims/s to all Bound", "claims_per_s", f.claims_per_s, 1),
            ("claim→Bound p50 ms", "bound_p50_ms", f.bound_p50, 0),
            ("p99 ms", "bound_p99_ms", f.bound_p99, 0),
            (
                "idle claim→Bound p50 ms",
                "idle_bound_p50_ms",
                f.idle_p50,
                0,
            ),
            ("idle p99 ms", "idle_bound_p99_ms", f.idle_p99, 0),
            ("attaches/s", "attach_per_s", f.attach_per_s, 1),
            ("pod→attached p50 ms", "attach_p50_ms", f.attach_p50, 0),
            ("p99 ms", "attach_p99_ms", f.attach_p99, 0),
            ("VA→attached p50 ms", "va_attach_p50_ms", f.va_p50, 0),
            ("p99 ms", "va_attach_p99_ms", f.va_p99, 0),
            (
                "API writes/volume",
                "api_writes_per_volume",
                f.writes_per_volume,
                1,
            ),
            (
                "API reads/volume",
                "api_reads_per_volume",
                f.reads_per_volume,
                1,
            ),
            ("peak RSS MiB (summed)", "peak_rss_mib", f.rss_mib, 1),
            ("teardown s", "teardown_s", f.teardown_s, 1),
        ]
    };
    let mut csv = String::new();
    if let Some(first) = results.first() {
        let cols = columns(first);
        md.push_str("\n| stack |");
        csv.push_str("stack,n");
        for (title, key, _, _) in &cols {
            md.push_str(&format!(" {title} |"));
            csv.push_str(&format!(",{key}"));
        }
        md.push_str(&format!("\n|---|{}\n", "---:|".repeat(cols.len())));
        csv.push('\n');
    }
    for f in results {
        md.push_str(&format!("| {} |", f.stack.name()));
        csv.push_str(&format!("{},{n}", f.stack.name()));
        for (_, _, value, decimals) in columns(f) {
            md.push_str(&format!(" {value:.decimals$} |"));
            csv.push_str(&format!(",{value:.2}"));
        }
        md.push('\n');
        csv.push('\n');
    }
    if let (Some(base), Some(raised), Some(ours)) = (
        results.iter().find(|f| f.stack == Stack::SidecarsDefault),
        results.iter().find(|f| f.stack == Stack::SidecarsRaised),
        results.iter().find(|f| f.stack == Stack::Stowage),
    ) {
        md.push_str(&format!(
            "\nstowage vs sidecars at defaults: {:.1}× claims/s, {:.1}× attaches/s, {:.2}× RSS\n\
             stowage vs sidecars at equal API budget: {:.1}× claims/s, {:.1}× attaches/s, {:.2}× RSS\n",
            ours.claims_per_s / base.claims_per_s,
            ours.attach_per_s / base.attach_per_s,
            ours.rss_mib / base.rss_mib,
            ours.claims_per_s / raised.claims_per_s,
            ours.attach_per_s / raised.attach_per_s,
            ours.rss_mib / raised.rss_mib,
        ));
    }
    md.push_str(
        "\nAPI requests are all clients' (kube-controller-manager's binder and attach-detach \
         controller included) from apiserver_request_total, over the N-claim and N-pod phases. \
         RSS is VmHWM of the stack's own processes (the driver and kube-controller-manager are \
         common to all stacks and left out).\n",
    );
    (md, csv)
}
