//! The same snapshot through Kubernetes: a claim of `local.stowage.dev` on
//! a node agent whose data directory is the fresh filesystem, 512 MiB
//! written into its image, then a VolumeSnapshot timed to `readyToUse`
//! (snapshot-controller, stowage's content job and the agent's cut, with
//! the job's polling), a claim restored from it and a clone of the source,
//! each timed to Bound.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use stowage::snapshot_api::{VolumeSnapshot, class_resource};

use crate::common;

const NAMESPACE: &str = "default";
const TIMEOUT: Duration = Duration::from_secs(300);

pub struct Timed {
    pub ready_s: f64,
    pub used_mib: f64,
    pub restore_s: f64,
    pub clone_s: f64,
}

/// What every measurement shares: the snapshot CRDs, snapshot-controller,
/// stowage's controller, and the classes.
pub struct Cluster {
    pub client: Client,
    _children: Vec<tokio::process::Child>,
}

impl Cluster {
    /// STOWAGE_SNAPSHOTTER: the directory scripts/build-snapshotter.sh
    /// printed (its bin/ and crd/).
    pub async fn start() -> anyhow::Result<Self> {
        let snapshotter = PathBuf::from(std::env::var("STOWAGE_SNAPSHOTTER").map_err(|_| {
            anyhow::anyhow!("STOWAGE_SNAPSHOTTER unset: run through `just bench-snapshot`")
        })?);
        let kubeconfig = PathBuf::from(std::env::var("KUBECONFIG")?);
        let client = common::client_for(&kubeconfig).await?;
        common::install_crds(&client).await?;
        common::ensure_namespace(&client, "stowage-system").await?;
        install_snapshot_crds(&client, &snapshotter).await?;
        // Their logs stay in target/bench/ for a look at where time went.
        let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        std::fs::create_dir_all(&logs)?;
        let quiet = |mut c: tokio::process::Command, name: &str| -> anyhow::Result<_> {
            let log = std::fs::File::create(logs.join(format!("bench-snapshot-{name}.log")))?;
            c.stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
            Ok(c)
        };
        let mut snapshot_controller =
            tokio::process::Command::new(snapshotter.join("bin/snapshot-controller"));
        snapshot_controller.arg(format!("--kubeconfig={}", kubeconfig.display()));
        snapshot_controller.arg("--leader-election=false");
        // Else it waits 30 s for VolumeGroupSnapshot CRDs before starting.
        snapshot_controller.arg("--feature-gates=CSIVolumeGroupSnapshot=false");
        let mut controller = tokio::process::Command::new(common::release_stowage()?);
        controller
            .args([
                "controller",
                "--leader-elect=false",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env(
                "RUST_LOG",
                std::env::var("STOWAGE_BENCH_LOG").unwrap_or("info".into()),
            );
        let children = vec![
            quiet(snapshot_controller, "snapshot-controller")?.spawn()?,
            quiet(controller, "controller")?.spawn()?,
        ];
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": { "name": "bench-snapshot" }, "provisioner": "local.stowage.dev",
            "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete",
        }))?;
        apply(
            &Api::<StorageClass>::all(client.clone()),
            "bench-snapshot",
            &class,
        )
        .await?;
        let snapshot_class = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": { "name": "bench-snapshot" }, "driver": "local.stowage.dev",
            "deletionPolicy": "Delete",
        });
        let classes = Api::<DynamicObject>::all_with(client.clone(), &class_resource());
        classes
            .patch(
                "bench-snapshot",
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&snapshot_class),
            )
            .await?;
        Ok(Cluster {
            client,
            _children: children,
        })
    }

    /// A node agent on `dir`, then the claim, snapshot, restore and clone.
    pub async fn measure(&self, node: &str, dir: &Path) -> anyhow::Result<Timed> {
        let mut agent = start_agent(&self.client, node, dir).await?;
        let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), NAMESPACE);
        let source = format!("{node}-source");
        let started = Instant::now();
        claims
            .create(&PostParams::default(), &claim(&source, node, None)?)
            .await?;
        let bound = wait_bound(&claims, &source).await?;
        let volume = bound.spec.and_then(|s| s.volume_name).unwrap_or_default();
        eprintln!(
            "{node}: source Bound in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        crate::write_volume(&dir.join("volumes").join(format!("{volume}.img")))?;

        let before = crate::used(dir)?;
        let snapshots = Api::<VolumeSnapshot>::namespaced(self.client.clone(), NAMESPACE);
        let snapshot: VolumeSnapshot = serde_json::from_value(json!({
            "metadata": { "name": node },
            "spec": { "volumeSnapshotClassName": "bench-snapshot",
                      "source": { "persistentVolumeClaimName": source } },
        }))?;
        let started = Instant::now();
        snapshots.create(&PostParams::default(), &snapshot).await?;
        wait_ready(&snapshots, node).await?;
        let ready_s = started.elapsed().as_secs_f64();
        let used_mib = (crate::used(dir)? - before) as f64 / crate::MIB as f64;

        let from_snapshot = json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": node });
        let restore_s =
            timed_claim(&claims, &format!("{node}-restored"), node, from_snapshot).await?;
        let from_claim = json!({ "kind": "PersistentVolumeClaim", "name": source });
        let clone_s = timed_claim(&claims, &format!("{node}-cloned"), node, from_claim).await?;

        snapshots.delete(node, &DeleteParams::default()).await?;
        for name in [format!("{node}-restored"), format!("{node}-cloned"), source] {
            claims.delete(&name, &DeleteParams::default()).await?;
        }
        // The agent removes the images before the filesystem is unmounted.
        wait_empty(&dir.join("volumes")).await;
        agent.kill().await?;
        Ok(Timed {
            ready_s,
            used_mib,
            restore_s,
            clone_s,
        })
    }
}

async fn timed_claim(
    claims: &Api<PersistentVolumeClaim>,
    name: &str,
    node: &str,
    source: Value,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    claims
        .create(&PostParams::default(), &claim(name, node, Some(source))?)
        .await?;
    wait_bound(claims, name).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// A 1 GiB claim placed on `node` as kube-scheduler would place it.
fn claim(name: &str, node: &str, source: Option<Value>) -> anyhow::Result<PersistentVolumeClaim> {
    let mut claim = json!({
        "metadata": { "name": name, "annotations": { "volume.kubernetes.io/selected-node": node } },
        "spec": { "storageClassName": "bench-snapshot", "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": "1Gi" } } },
    });
    if let Some(source) = source {
        claim["spec"]["dataSource"] = source;
    }
    Ok(serde_json::from_value(claim)?)
}

async fn wait_bound(
    claims: &Api<PersistentVolumeClaim>,
    name: &str,
) -> anyhow::Result<PersistentVolumeClaim> {
    poll(name, "Bound", || async {
        let c = claims.get(name).await?;
        let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        Ok(bound.then_some(c))
    })
    .await
}

async fn wait_ready(snapshots: &Api<VolumeSnapshot>, name: &str) -> anyhow::Result<()> {
    poll(name, "readyToUse", || async {
        let s = snapshots.get(name).await?;
        Ok(s.status
            .and_then(|s| s.ready_to_use)
            .unwrap_or(false)
            .then_some(()))
    })
    .await
}

/// Asks every 20 ms until `check` gives something, or TIMEOUT.
async fn poll<T, F, Fut>(name: &str, what: &str, check: F) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(found) = check().await? {
            return Ok(found);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: not {what} after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_empty(dir: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn start_agent(
    client: &Client,
    node: &str,
    dir: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let obj: Node = serde_json::from_value(json!({ "metadata": { "name": node, "labels": {
        "kubernetes.io/hostname": node, "topology.stowage.dev/node": node } } }))?;
    apply(&Api::<Node>::all(client.clone()), node, &obj).await?;
    let kubelet = dir.with_extension("kubelet");
    std::fs::create_dir_all(&kubelet)?;
    let agent = tokio::process::Command::new(common::release_stowage()?)
        .args(["node", "--node-name", node, "--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--kubelet-dir")
        .arg(&kubelet)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // Its StorageNode says it is there.
    let nodes = Api::<stowage::crd::StorageNode>::all(client.clone());
    poll(node, "reported", || async {
        Ok(nodes.get_opt(node).await?.map(|_| ()))
    })
    .await?;
    Ok(agent)
}

async fn apply<K>(api: &Api<K>, name: &str, object: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("bench").force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

async fn install_snapshot_crds(client: &Client, snapshotter: &Path) -> anyhow::Result<()> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for kind in [
        "volumesnapshotclasses",
        "volumesnapshotcontents",
        "volumesnapshots",
    ] {
        let text = std::fs::read_to_string(snapshotter.join("crd").join(format!("{kind}.yaml")))?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
        apply(&crds, &format!("{kind}.snapshot.storage.k8s.io"), &crd).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}
