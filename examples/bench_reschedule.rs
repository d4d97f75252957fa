//! `just bench-reschedule PODS NODES`: PODS pods, each with a
//! `WaitForFirstConsumer` claim of a random size, over NODES simulated
//! nodes of random free space (Node objects and a `stowage node` agent
//! each, no kubelet: pods stay Pending once placed), scheduled by the real
//! kube-scheduler; once with CSIStorageCapacity published (CSIDriver
//! `storageCapacity: true`, `--enable-capacity`), once without. Prints how
//! many pods had their node given back (a `Rescheduling` event on their
//! claim) and the time until every pod is placed and every claim Bound,
//! or how many are not after five minutes.
//! Not a test. Sizes and free space come from a fixed seed, the same for
//! both runs, which use nodes of their own.
//!
//! Run under `scripts/cluster.sh run` (KUBECONFIG set), with
//! target/release/stowage built.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

#[path = "common/mod.rs"]
mod common;

const MIB: u64 = 1 << 20;
/// Claims are 50..500 MiB (55 GiB for 200), nodes offer 4..12 GiB (about
/// 80 GiB for 10): room enough in total, with some left over so that every
/// pod can fit somewhere, but not on every node.
const CLAIM_MIB: (u64, u64) = (50, 500);
const NODE_MIB: (u64, u64) = (4096, 12288);

/// xorshift64*: the same figures on every run, no dependency.
struct Rng(u64);

impl Rng {
    fn between(&mut self, (low, high): (u64, u64)) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        low + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (high - low + 1)
    }
}

struct Outcome {
    label: &'static str,
    pods: usize,
    rescheduled_pods: usize,
    reschedules: usize,
    /// Until every pod was placed and every claim Bound, or the deadline.
    seconds: f64,
    /// Pods not placed with a Bound claim by the deadline.
    stuck: usize,
}

/// How long one run may take: without capacity the scheduler can pick the
/// same full node for a pod again and again (the one with the fewest
/// pods), so "all placed" may never come.
const DEADLINE: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let pods: usize = args.next().unwrap_or_else(|| "200".into()).parse()?;
    let nodes: usize = args.next().unwrap_or_else(|| "10".into()).parse()?;
    let client = Client::try_default().await?;
    common::install_crds(&client).await?;
    common::ensure_namespace(&client, "stowage-system").await?;
    let data = std::env::temp_dir().join(format!("stowage-bench-resched-{}", std::process::id()));
    let mut outcomes = Vec::new();
    for capacity in [true, false] {
        outcomes.push(run(&client, &data, capacity, pods, nodes).await?);
    }
    let _ = std::fs::remove_dir_all(&data);
    let table = table(&outcomes, nodes);
    print!("{table}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("reschedule.txt"), table)?;
    Ok(())
}

fn table(outcomes: &[Outcome], nodes: usize) -> String {
    let mut t = format!(
        "WaitForFirstConsumer pods over {nodes} simulated nodes, sizes {}..{} MiB, free {}..{} MiB\n\n\
         | capacity tracking | pods | pods rescheduled | reschedules | all placed + Bound | not placed after {} s |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
        CLAIM_MIB.0,
        CLAIM_MIB.1,
        NODE_MIB.0,
        NODE_MIB.1,
        DEADLINE.as_secs()
    );
    for o in outcomes {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            o.label,
            o.pods,
            o.rescheduled_pods,
            o.reschedules,
            if o.stuck == 0 {
                format!("{:.1} s", o.seconds)
            } else {
                "never".to_string()
            },
            o.stuck
        ));
    }
    t
}

/// One run: its nodes, agents and controller, its class and pods.
async fn run(
    client: &Client,
    data: &Path,
    capacity: bool,
    pods: usize,
    nodes: usize,
) -> anyhow::Result<Outcome> {
    let label = if capacity { "on" } else { "off" };
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let stowage = common::release_stowage()?;
    set_driver(client, capacity).await?;
    let mut children = Vec::new();
    for i in 0..nodes {
        let node = format!("resched-{label}-{i}");
        let free = rng.between(NODE_MIB) * MIB;
        create_node(client, &node, label).await?;
        children.push(agent(&stowage, data, &node, free)?);
    }
    children.push(
        tokio::process::Command::new(&stowage)
            .args([
                "controller",
                "--leader-elect=false",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .arg(format!("--enable-capacity={capacity}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    let ns = format!("resched-{label}");
    common::ensure_namespace(client, &ns).await?;
    let class = format!("resched-{label}");
    create_class(client, &class).await?;
    // Let every agent report and, with tracking on, every capacity appear.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let start = Instant::now();
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let pod_api = Api::<Pod>::namespaced(client.clone(), &ns);
    for i in 0..pods {
        let size = rng.between(CLAIM_MIB);
        claims
            .create(
                &PostParams::default(),
                &claim(&format!("c{i}"), &class, size),
            )
            .await?;
        pod_api
            .create(
                &PostParams::default(),
                &pod(&format!("p{i}"), &format!("c{i}"), label),
            )
            .await?;
    }
    let stuck = wait_all_placed_and_bound(&claims, &pod_api, pods).await?;
    let seconds = start.elapsed().as_secs_f64();
    let (rescheduled_pods, reschedules) = reschedules(client, &ns).await?;
    drop(children);
    Ok(Outcome {
        label,
        pods,
        rescheduled_pods,
        reschedules,
        seconds,
        stuck,
    })
}

async fn wait_all_placed_and_bound(
    claims: &Api<PersistentVolumeClaim>,
    pods: &Api<Pod>,
    n: usize,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let bound = claims
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .count();
        let placed = pods
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        if (bound == n && placed == n) || Instant::now() >= deadline {
            return Ok(n - bound.min(placed));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (claims with at least one Rescheduling event, all such events counted
/// by their series).
async fn reschedules(client: &Client, ns: &str) -> anyhow::Result<(usize, usize)> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut claims = BTreeSet::new();
    let mut total = 0;
    for e in events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Rescheduling"))
    {
        if let Some(name) = e.regarding.as_ref().and_then(|r| r.name.clone()) {
            claims.insert(name);
        }
        total += e.series.as_ref().map_or(1, |s| s.count.max(1) as usize);
    }
    Ok((claims.len(), total))
}

async fn set_driver(client: &Client, capacity: bool) -> anyhow::Result<()> {
    let driver: CSIDriver = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
        "metadata": { "name": "local.stowage.dev" },
        "spec": { "attachRequired": false, "storageCapacity": capacity,
                  "volumeLifecycleModes": ["Persistent"] },
    }))?;
    Api::<CSIDriver>::all(client.clone())
        .patch(
            "local.stowage.dev",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&driver),
        )
        .await?;
    Ok(())
}

/// A Node as kubelet registers it, Ready, labelled with the run it
/// belongs to; no kubelet behind it.
async fn create_node(client: &Client, name: &str, run: &str) -> anyhow::Result<()> {
    let api = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(json!({ "metadata": { "name": name, "labels": {
        "kubernetes.io/hostname": name, "topology.stowage.dev/node": name, "bench-run": run,
    }}}))?;
    api.create(&PostParams::default(), &node).await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({ "status": {
        "capacity": { "cpu": "64", "memory": "256Gi", "pods": "500" },
        "allocatable": { "cpu": "64", "memory": "256Gi", "pods": "500" },
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "simulated", "lastHeartbeatTime": now, "lastTransitionTime": now }],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

fn agent(
    stowage: &Path,
    data: &Path,
    node: &str,
    free: u64,
) -> anyhow::Result<tokio::process::Child> {
    let kubelet = data.join(format!("{node}-kubelet"));
    std::fs::create_dir_all(&kubelet)?;
    Ok(tokio::process::Command::new(stowage)
        .args(["node", "--node-name", node, "--capacity", &free.to_string()])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data.join(node))
        .arg("--kubelet-dir")
        .arg(kubelet)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

async fn create_class(client: &Client, name: &str) -> anyhow::Result<()> {
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": name },
        "provisioner": "local.stowage.dev",
        "volumeBindingMode": "WaitForFirstConsumer",
        "parameters": BTreeMap::from([("layout", "dir")]),
    }))?;
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await?;
    Ok(())
}

fn claim(name: &str, class: &str, mib: u64) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": format!("{mib}Mi") } } },
    }))
    .expect("claim literal")
}

/// A pod on this run's nodes only; it tolerates what a Node without
/// kubelet is tainted with.
fn pod(name: &str, claim: &str, run: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "nodeSelector": { "bench-run": run },
            "automountServiceAccountToken": false,
            "tolerations": [
                { "key": "node.kubernetes.io/unreachable", "operator": "Exists" },
                { "key": "node.kubernetes.io/not-ready", "operator": "Exists" },
            ],
            "containers": [{ "name": "c", "image": "stowage.dev/never-run:0" }],
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": claim } }],
        },
    }))
    .expect("pod literal")
}
