//! Snapshots, restores and clones through a `--csi-driver`: stowage does
//! csi-snapshotter's job beside the real snapshot-controller, and
//! external-provisioner's data sources, against Kubernetes' CSI mock driver,
//! as its ServiceAccount with the manifests' RBAC.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use stowage::snapshot_api::{VolumeSnapshot, VolumeSnapshotContent, class_resource};

use crate::external_driver::ExternalDriver;
use crate::fixtures::{claim, gone, is_bound, wait, wait_for_event};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, unique_name};
use crate::proxy_attach::Scene;
use crate::proxy_driver::{immediate_class, proxy_controller};
use crate::service_accounts::controller_account;
use crate::snapshotter;

/// The requests the driver recorded for `method`.
pub fn recorded(record: &std::path::Path, method: &str) -> Vec<Value> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["method"] == format!("/csi.v1.Controller/{method}"))
        .map(|l| l["request"].clone())
        .collect()
}

pub async fn snapshot_class(client: &Client, name: &str, driver: &str, policy: &str) {
    snapshot_class_with(client, name, driver, policy, json!({ "tier": "gold" })).await;
}

async fn snapshot_class_with(
    client: &Client,
    name: &str,
    driver: &str,
    policy: &str,
    parameters: Value,
) {
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
        "metadata": { "name": name },
        "driver": driver, "deletionPolicy": policy,
        "parameters": parameters,
    }))
    .unwrap();
    Api::<DynamicObject>::all_with(client.clone(), &class_resource())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
}

/// The content bound to `snapshot`, once snapshot-controller made it.
pub async fn content_of(ns: &TestNamespace, snapshot: &str) -> VolumeSnapshotContent {
    let snapshots = ns.api::<VolumeSnapshot>();
    let bound = wait(
        &snapshots,
        snapshot,
        "bound to a content",
        |s: Option<&VolumeSnapshot>| {
            s.and_then(|s| {
                s.status
                    .as_ref()?
                    .bound_volume_snapshot_content_name
                    .as_ref()
            })
            .is_some()
        },
    )
    .await
    .unwrap();
    let name = bound
        .status
        .unwrap()
        .bound_volume_snapshot_content_name
        .unwrap();
    Api::<VolumeSnapshotContent>::all(ns.client.clone())
        .get(&name)
        .await
        .unwrap()
}

/// Takes a snapshot of `claim` and waits until it is ready; returns it
/// and its content.
pub async fn snapshot(
    ns: &TestNamespace,
    name: &str,
    claim: &str,
    class: &str,
) -> (VolumeSnapshot, VolumeSnapshotContent) {
    request_snapshot(ns, name, claim, class).await;
    ready_snapshot(ns, name).await
}

/// Asks for a snapshot of `claim`.
pub async fn request_snapshot(ns: &TestNamespace, name: &str, claim: &str, class: &str) {
    let object: VolumeSnapshot = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": { "name": name },
        "spec": { "source": { "persistentVolumeClaimName": claim }, "volumeSnapshotClassName": class },
    }))
    .unwrap();
    ns.api::<VolumeSnapshot>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// The snapshot `name` once ready, and its content.
pub async fn ready_snapshot(
    ns: &TestNamespace,
    name: &str,
) -> (VolumeSnapshot, VolumeSnapshotContent) {
    let snapshots = ns.api::<VolumeSnapshot>();
    let ready = wait(
        &snapshots,
        name,
        "readyToUse",
        |s: Option<&VolumeSnapshot>| s.and_then(|s| s.status.as_ref()?.ready_to_use) == Some(true),
    )
    .await
    .unwrap();
    let content_name = ready
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.clone())
        .unwrap();
    let content = Api::<VolumeSnapshotContent>::all(ns.client.clone())
        .get(&content_name)
        .await
        .unwrap();
    (ready, content)
}

/// A claim of `class` and `size` that starts from `source` (kind,
/// apiGroup, name).
pub async fn claim_from(ns: &TestNamespace, name: &str, class: &str, size: &str, source: Value) {
    let object: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "storageClassName": class, "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": size } },
            "dataSource": source,
        },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

fn handle_of(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .unwrap()
        .csi
        .as_ref()
        .unwrap()
        .volume_handle
        .clone()
}

pub async fn bound_handle(ns: &TestNamespace, claim: &str) -> String {
    let bound = wait(&ns.api::<PersistentVolumeClaim>(), claim, "Bound", is_bound)
        .await
        .unwrap();
    let pv_name = bound.spec.unwrap().volume_name.unwrap();
    let pv = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(ns.client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    handle_of(&pv)
}

#[tokio::test]
async fn snapshots_restores_and_clones_go_through_the_driver() {
    let node = "snapshot-node";
    let kubeconfig = bare_cluster("proxy-snapshot", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let record = std::env::temp_dir().join(unique_name("stowage-snapshot-record"));
    let record_arg = format!("--record={}", record.display());
    let driver = ExternalDriver::mock("snapshot.csi.stowage.test").with_args(&[&record_arg]);
    let running = driver.start();
    Scene::install(&client, &driver, &[node]).await;
    let _snapshot_controller =
        snapshotter::start(&client, &kubeconfig, "proxy-snapshot-snapshot-controller").await;
    // As deployed: the manifests' RBAC, which this flow must find enough.
    let as_controller = controller_account(&kubeconfig, &client).await;
    let controller = proxy_controller(
        &as_controller,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        "proxy-snapshot-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "proxy-snapshot").await;
    let class = immediate_class(&client, &format!("{}-c", ns.name), &driver.name, json!({})).await;
    let deleting = format!("{}-delete", ns.name);
    let retaining = format!("{}-retain", ns.name);
    snapshot_class(&client, &deleting, &driver.name, "Delete").await;
    snapshot_class(&client, &retaining, &driver.name, "Retain").await;

    claim(&ns, "source", &class, "1Gi", &["ReadWriteOnce"]).await;
    let source_handle = bound_handle(&ns, "source").await;

    // The snapshot: cut once, by the VolumeSnapshot's UID, with the class's
    // parameters; its content says so and carries no annotation of ours.
    let (snap, content) = snapshot(&ns, "snap", "source", &deleting).await;
    let status = content.status.clone().unwrap();
    let snapshot_handle = status.snapshot_handle.clone().unwrap();
    assert!(status.creation_time.unwrap_or_default() > 0, "{status:?}");
    assert!(
        !content
            .annotations()
            .contains_key(stowage::snapshot_api::ANN_BEING_CREATED),
        "{:?}",
        content.annotations()
    );
    let cuts = recorded(&record, "CreateSnapshot");
    assert!(!cuts.is_empty());
    for cut in &cuts {
        assert_eq!(cut["name"], format!("snapshot-{}", snap.uid().unwrap()));
        assert_eq!(cut["source_volume_id"], source_handle);
        assert_eq!(cut["parameters"], json!({ "tier": "gold" }));
    }

    // Restore: CreateVolume from the snapshot; the snapshot is held only
    // while that is under way.
    let from_snapshot =
        json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "snap" });
    claim_from(&ns, "restored", &class, "1Gi", from_snapshot).await;
    bound_handle(&ns, "restored").await;
    let restores = recorded(&record, "CreateVolume");
    assert!(
        restores
            .iter()
            .any(|r| r["volume_content_source"]["snapshot"]["snapshot_id"] == snapshot_handle),
        "{restores:?}"
    );
    let snap = ns.api::<VolumeSnapshot>().get("snap").await.unwrap();
    assert!(
        !snap
            .finalizers()
            .iter()
            .any(|f| f.starts_with("provisioner.storage.kubernetes.io/")),
        "{:?}",
        snap.finalizers()
    );

    // Clone, its source deleted while the clone is in flight (the driver
    // stopped): the source claim is held until the clone is provisioned,
    // then goes; CreateVolume came from the source volume.
    const CLONING: &str = "provisioner.storage.kubernetes.io/cloning-protection";
    let claims = ns.api::<PersistentVolumeClaim>();
    running.pause();
    let from_claim = json!({ "kind": "PersistentVolumeClaim", "name": "source" });
    claim_from(&ns, "cloned", &class, "1Gi", from_claim).await;
    wait(
        &claims,
        "source",
        "protected",
        |c: Option<&PersistentVolumeClaim>| {
            c.is_some_and(|c| c.finalizers().iter().any(|f| f == CLONING))
        },
    )
    .await;
    claims
        .delete("source", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let held = claims.get("source").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some()
            && held.finalizers().iter().any(|f| f == CLONING),
        "the source went while its clone was in flight: {:?}",
        held.metadata
    );
    running.resume();
    bound_handle(&ns, "cloned").await;
    wait(&claims, "source", "gone", gone).await;
    let clones = recorded(&record, "CreateVolume");
    assert!(
        clones
            .iter()
            .any(|r| r["volume_content_source"]["volume"]["volume_id"] == source_handle),
        "{clones:?}"
    );

    // A source that does not exist is explained on the claim.
    let missing = json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "nowhere" });
    claim_from(&ns, "orphan", &class, "1Gi", missing).await;
    let note = wait_for_event(&ns, "orphan", "ProvisioningFailed").await;
    assert!(
        note.contains("VolumeSnapshot nowhere does not exist"),
        "{note}"
    );

    // Delete policy: the driver's snapshot goes with the VolumeSnapshot.
    let contents = Api::<VolumeSnapshotContent>::all(client.clone());
    ns.api::<VolumeSnapshot>()
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    wait(&contents, &content.name_any(), "gone", gone).await;
    let deleted = recorded(&record, "DeleteSnapshot");
    assert!(
        deleted.iter().any(|d| d["snapshot_id"] == snapshot_handle),
        "{deleted:?}"
    );

    // Retain policy: the content and the driver's snapshot stay.
    let (_, kept) = snapshot(&ns, "kept", "cloned", &retaining).await;
    let kept_handle = kept.status.clone().unwrap().snapshot_handle.unwrap();
    ns.api::<VolumeSnapshot>()
        .delete("kept", &DeleteParams::default())
        .await
        .unwrap();
    wait(&ns.api::<VolumeSnapshot>(), "kept", "gone", gone).await;
    assert!(contents.get_opt(&kept.name_any()).await.unwrap().is_some());
    assert!(
        !recorded(&record, "DeleteSnapshot")
            .iter()
            .any(|d| d["snapshot_id"] == kept_handle)
    );
    pre_provisioned_and_refused(&ns, &driver.name, &kept_handle, &record).await;
    controller.stop();
    let _ = std::fs::remove_file(&record);
}

/// A snapshot made outside Kubernetes (the retained one), imported through
/// a pre-provisioned content: ready once ListSnapshots finds it. And a
/// class with a reserved key the sidecar does not know: the content's
/// `status.error` says which.
async fn pre_provisioned_and_refused(
    ns: &TestNamespace,
    driver: &str,
    handle: &str,
    record: &std::path::Path,
) {
    let content_name = format!("{}-imported", ns.name);
    let content: VolumeSnapshotContent = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": { "name": content_name },
        "spec": {
            "deletionPolicy": "Delete", "driver": driver,
            "source": { "snapshotHandle": handle },
            "volumeSnapshotRef": { "name": "imported", "namespace": ns.name },
        },
    }))
    .unwrap();
    let contents = Api::<VolumeSnapshotContent>::all(ns.client.clone());
    contents
        .create(&PostParams::default(), &content)
        .await
        .unwrap();
    let imported: VolumeSnapshot = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": { "name": "imported" },
        "spec": { "source": { "volumeSnapshotContentName": content_name } },
    }))
    .unwrap();
    ns.api::<VolumeSnapshot>()
        .create(&PostParams::default(), &imported)
        .await
        .unwrap();
    let (_, ready) = ready_snapshot(ns, "imported").await;
    assert_eq!(
        ready.status.and_then(|s| s.snapshot_handle).as_deref(),
        Some(handle)
    );
    let listed = recorded(record, "ListSnapshots");
    assert!(
        listed.iter().any(|l| l["snapshot_id"] == handle),
        "{listed:?}"
    );

    let wrong = format!("{}-wrong", ns.name);
    let reserved = json!({ "csi.storage.k8s.io/fstype": "ext4" });
    snapshot_class_with(&ns.client, &wrong, driver, "Delete", reserved).await;
    request_snapshot(ns, "refused", "cloned", &wrong).await;
    let content = content_of(ns, "refused").await;
    let refused = wait(
        &contents,
        &content.name_any(),
        "refused",
        |c: Option<&VolumeSnapshotContent>| {
            c.and_then(|c| c.status.as_ref()?.error.as_ref()?.message.clone())
                .is_some()
        },
    )
    .await
    .unwrap();
    let message = refused.status.unwrap().error.unwrap().message.unwrap();
    assert!(
        message.contains("csi.storage.k8s.io/fstype") && message.contains("remove it"),
        "{message}"
    );
}
