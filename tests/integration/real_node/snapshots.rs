//! A snapshot of a volume a running pod has mounted (its filesystem frozen
//! for the cut), then restored and cloned into new claims whose pods read
//! the bytes back: the snapshot has what was written before it, not what
//! came after.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

use super::pod;
use crate::fixtures::{claim, gone, phase, wait};
use crate::harness::TestNamespace;
use crate::proxy_snapshot::{claim_from, ready_snapshot, request_snapshot, snapshot_class};
use crate::snapshotter;

/// Runs `script` in a pod on `claim` to the end; panics unless it succeeds.
async fn run_pod(ns: &TestNamespace, name: &str, claim: &str, script: &str) {
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &pod(name, claim, script))
        .await
        .unwrap();
    let done = wait(&pods, name, "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "pod {name} ({script})"
    );
    pods.delete(name, &DeleteParams::default()).await.unwrap();
    wait(&pods, name, "deleted", gone).await;
}

pub async fn of_a_mounted_volume_restored_and_cloned(
    ns: &TestNamespace,
    client: &kube::Client,
    kubeconfig: &std::path::Path,
    class: &str,
) {
    let _snapshot_controller =
        snapshotter::start(client, kubeconfig, "real-node-snapshot-controller").await;
    let snapshots = format!("{}-snap", ns.name);
    snapshot_class(client, &snapshots, "local.stowage.dev", "Delete").await;
    claim(ns, "origin", class, "64Mi", &["ReadWriteOnce"]).await;
    let pods = ns.api::<Pod>();
    let holder = pod(
        "holder",
        "origin",
        "echo one > /data/file && sync && touch /data/written && sleep 3600",
    );
    pods.create(&PostParams::default(), &holder).await.unwrap();
    wait(&pods, "holder", "Running", |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    // The pod has written (a pod that checks, on the same volume).
    run_pod(
        ns,
        "check-written",
        "origin",
        "while [ ! -e /data/written ]; do sleep 1; done",
    )
    .await;

    request_snapshot(ns, "cut", "origin", &snapshots).await;
    ready_snapshot(ns, "cut").await;
    pods.delete("holder", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait(&pods, "holder", "deleted", gone).await;
    run_pod(ns, "overwrite", "origin", "echo two > /data/file && sync").await;

    let from_snapshot =
        json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "cut" });
    claim_from(ns, "restored", class, "64Mi", from_snapshot).await;
    run_pod(
        ns,
        "read-restored",
        "restored",
        "test \"$(cat /data/file)\" = one",
    )
    .await;
    let from_claim = json!({ "kind": "PersistentVolumeClaim", "name": "origin" });
    claim_from(ns, "cloned", class, "64Mi", from_claim).await;
    run_pod(
        ns,
        "read-cloned",
        "cloned",
        "test \"$(cat /data/file)\" = two",
    )
    .await;

    ns.api::<stowage::snapshot_api::VolumeSnapshot>()
        .delete("cut", &DeleteParams::default())
        .await
        .unwrap();
    let claims = ns.api::<PersistentVolumeClaim>();
    for name in ["restored", "cloned", "origin"] {
        claims.delete(name, &DeleteParams::default()).await.unwrap();
    }
}
