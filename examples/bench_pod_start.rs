//! `just bench-pod-start N`: N pods, one after another, each with a fresh
//! `WaitForFirstConsumer` claim, on the local control plane's real kubelet
//! node. Measures pod creation → Running (scheduling, provisioning, binding,
//! staging, publishing, container start) and prints p50/p90/max. Not a test.
//!
//! Run under `STOWAGE_WITH_NODE=1 scripts/cluster.sh run`. Starts `stowage
//! node` and `stowage controller` from target/release.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

#[path = "common/mod.rs"]
mod common;
use common::percentile;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "20".into())
        .parse()?;
    let fs_type = std::env::var("STOWAGE_BENCH_FSTYPE").unwrap_or_else(|_| "ext4".into());
    let node = std::env::var("STOWAGE_NODE_NAME")
        .map_err(|_| anyhow::anyhow!("run me under STOWAGE_WITH_NODE=1 scripts/cluster.sh run"))?;
    let kubelet_dir = std::env::var("STOWAGE_KUBELET_DIR")?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stowage = common::release_stowage()?;
    let client = Client::try_default().await?;

    let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone());
    for crd in stowage::crd::all() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    let driver: CSIDriver = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("manifests/30-csidriver.yaml"),
    )?)?;
    Api::<CSIDriver>::all(client.clone())
        .patch(
            &driver.name_any(),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&driver),
        )
        .await?;
    // The CSIDriver has storageCapacity: the controller publishes there.
    common::ensure_namespace(&client, "stowage-system").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let data = std::env::temp_dir().join(format!("stowage-bench-pods-{}", std::process::id()));
    let spawn = |args: &[&str]| {
        tokio::process::Command::new(&stowage)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    };
    let data_arg = data.to_string_lossy().into_owned();
    let agent = spawn(&[
        "node",
        "--node-name",
        &node,
        "--data-dir",
        &data_arg,
        "--kubelet-dir",
        &kubelet_dir,
        "--capacity",
        "20Gi",
        "--metrics-addr",
        "127.0.0.1:0",
    ])?;
    let controller = spawn(&[
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
    ])?;

    // Measure from a registered driver, as a user would.
    let csinodes = Api::<CSINode>::all(client.clone());
    let registered = async {
        loop {
            if let Ok(Some(n)) = csinodes.get_opt(&node).await
                && n.spec.drivers.iter().any(|d| d.name == "local.stowage.dev")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), registered)
        .await
        .map_err(|_| anyhow::anyhow!("kubelet never registered local.stowage.dev on {node}"))?;

    let ns = format!("bench-pods-{}", std::process::id());
    let nsobj: Namespace = serde_json::from_value(json!({ "metadata": { "name": ns } }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &nsobj)
        .await?;
    // The API server creates the default ServiceAccount a moment later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": ns },
        "provisioner": "local.stowage.dev",
        "volumeBindingMode": "WaitForFirstConsumer",
        "parameters": { "fsType": fs_type },
    }))?;
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);

    let mut to_running = Vec::new();
    let mut to_bound = Vec::new();
    for i in 0..n {
        let name = format!("pod-{i:03}");
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "storageClassName": ns, "accessModes": ["ReadWriteOnce"],
                      "resources": { "requests": { "storage": "64Mi" } } },
        }))?;
        claims.create(&PostParams::default(), &claim).await?;
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": {
                "hostNetwork": true,
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 0,
                "containers": [{
                    "name": "c", "image": "stowage.dev/busybox:1", "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", "echo hi > /data/hi && exec sleep 3600"],
                    "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                }],
                "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": name } }],
            },
        }))?;
        // Watch before creating, so the transition is not missed.
        let mut pod_events = watcher(
            pods.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .applied_objects()
        .boxed();
        let mut claim_events = watcher(
            claims.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .applied_objects()
        .boxed();
        let created = Instant::now();
        pods.create(&PostParams::default(), &pod).await?;
        let bound = async {
            while let Some(c) = claim_events.try_next().await? {
                if c.status.and_then(|s| s.phase).as_deref() == Some("Bound") {
                    return anyhow::Ok(created.elapsed());
                }
            }
            anyhow::bail!("claim watch ended")
        };
        let running = async {
            while let Some(p) = pod_events.try_next().await? {
                match p.status.and_then(|s| s.phase).as_deref() {
                    Some("Running") => return anyhow::Ok(created.elapsed()),
                    Some("Failed") => anyhow::bail!("pod {name} failed"),
                    _ => {}
                }
            }
            anyhow::bail!("pod watch ended")
        };
        let (bound, running) = tokio::time::timeout(Duration::from_secs(120), async {
            tokio::try_join!(bound, running)
        })
        .await
        .map_err(|_| anyhow::anyhow!("pod {name} not Running after 120s"))??;
        to_bound.push(bound.as_secs_f64() * 1000.0);
        to_running.push(running.as_secs_f64() * 1000.0);
        eprintln!(
            "{name}: claim Bound {:.0} ms, pod Running {:.0} ms",
            bound.as_secs_f64() * 1000.0,
            running.as_secs_f64() * 1000.0
        );
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await?;
        claims.delete(&name, &DeleteParams::default()).await?;
    }
    // Everything torn down before the agent goes, so nothing is left mounted.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pods.list(&Default::default()).await?.items.is_empty()
        || !Api::<stowage::crd::Volume>::all(client.clone())
            .list(&Default::default())
            .await?
            .items
            .is_empty()
    {
        anyhow::ensure!(Instant::now() < deadline, "pods or volumes left after 120s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    to_bound.sort_by(f64::total_cmp);
    to_running.sort_by(f64::total_cmp);
    let mut report = format!(
        "stowage pod start benchmark: {n} pods one after another, each with a fresh \
         WaitForFirstConsumer {fs_type} image volume, real kubelet + containerd\n"
    );
    for (what, v) in [
        ("pod created -> claim Bound", &to_bound),
        ("pod created -> Running    ", &to_running),
    ] {
        report.push_str(&format!(
            "{what}  p50 {:.0} ms  p90 {:.0} ms  max {:.0} ms\n",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 1.0)
        ));
    }
    print!("{report}");
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("pod-start-{n}.txt")), &report)?;
    drop((agent, controller));
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
