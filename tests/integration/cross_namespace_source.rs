//! Data sources in another namespace through a `--csi-driver`, as
//! external-provisioner's CrossNamespaceVolumeDataSource gate has them:
//! refused with the flag off, then refused until a Gateway API
//! ReferenceGrant in the source's namespace allows it (first without the
//! ReferenceGrant CRD at all, which the controller picks up when it comes),
//! then restored and cloned without a restart, the source protected in its
//! own namespace. Against Kubernetes' CSI mock driver and
//! the real snapshot-controller, as the controller's ServiceAccount with
//! the manifests' RBAC.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use stowage::snapshot_api::VolumeSnapshot;

use crate::external_driver::{ExternalDriver, Running};
use crate::fixtures::{claim, gone, wait, wait_for_note};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, unique_name};
use crate::proxy_attach::Scene;
use crate::proxy_driver::{immediate_class, proxy_controller};
use crate::proxy_snapshot::{bound_handle, recorded, snapshot, snapshot_class};
use crate::service_accounts::controller_account;
use crate::snapshotter;

const FLAG: &str = "--cross-namespace-data-sources";
const SNAPSHOT_FINALIZER: &str =
    "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection";
const CLONING: &str = "provisioner.storage.kubernetes.io/cloning-protection";

/// A claim in `ns` whose `dataSourceRef` names `source` in `from`.
async fn claim_across(ns: &TestNamespace, name: &str, class: &str, from: &str, mut source: Value) {
    source["namespace"] = json!(from);
    let object: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "storageClassName": class, "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "1Gi" } },
            "dataSourceRef": source,
        },
    }))
    .unwrap();
    let created = ns
        .api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    // Dropped without kube-apiserver's CrossNamespaceVolumeDataSource gate.
    let kept = created.spec.unwrap().data_source_ref.unwrap().namespace;
    assert_eq!(kept.as_deref(), Some(from), "the API server dropped it");
}

/// A ReferenceGrant in `ns` letting claims of `from` refer to `to`.
async fn grant(ns: &TestNamespace, name: &str, from: &str, to: Value) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1beta1", "ReferenceGrant"),
        "referencegrants",
    );
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": { "name": name },
        "spec": {
            "from": [{ "group": "", "kind": "PersistentVolumeClaim", "namespace": from }],
            "to": [to],
        },
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(ns.client.clone(), &ns.name, &resource)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

async fn assert_pending(ns: &TestNamespace, name: &str) {
    let claim = ns.api::<PersistentVolumeClaim>().get(name).await.unwrap();
    let phase = claim.status.and_then(|s| s.phase);
    let volume = claim.spec.and_then(|s| s.volume_name);
    assert_eq!(
        (phase.as_deref(), volume),
        (Some("Pending"), None),
        "{name}"
    );
}

/// The two namespaces, the driver's class and its record of calls.
struct Across {
    sources: TestNamespace,
    users: TestNamespace,
    class: String,
    record: std::path::PathBuf,
}

#[tokio::test]
async fn a_source_in_another_namespace_needs_the_flag_and_a_reference_grant() {
    let node = "xns-node";
    let kubeconfig = bare_cluster("cross-namespace", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let record = std::env::temp_dir().join(unique_name("stowage-xns-record"));
    let record_arg = format!("--record={}", record.display());
    let driver = ExternalDriver::mock("xns.csi.stowage.test").with_args(&[&record_arg]);
    let running = driver.start();
    Scene::install(&client, &driver, &[node]).await;
    let _snapshot_controller =
        snapshotter::start(&client, &kubeconfig, "cross-namespace-snapshot-controller").await;
    let as_controller = controller_account(&kubeconfig, &client).await;
    let start = |extra: &[&str], log: &str| {
        let mut args = vec!["--serve-local=false"];
        args.extend_from_slice(extra);
        proxy_controller(&as_controller, &driver.name, &driver.socket, &args, log)
    };
    let users = TestNamespace::new_with(client.clone(), "xns-b").await;
    let class = format!("{}-c", users.name);
    let at = Across {
        sources: TestNamespace::new_with(client.clone(), "xns-a").await,
        class: immediate_class(&client, &class, &driver.name, json!({})).await,
        users,
        record,
    };
    let snapshots = format!("{}-snap", at.users.name);
    snapshot_class(&client, &snapshots, &driver.name, "Delete").await;

    let controller = start(&[], "cross-namespace-flag-off");
    claim(&at.sources, "source", &at.class, "1Gi", &["ReadWriteOnce"]).await;
    let source_handle = bound_handle(&at.sources, "source").await;
    let (_, content) = snapshot(&at.sources, "snap", "source", &snapshots).await;
    let snapshot_handle = content.status.unwrap().snapshot_handle.unwrap();
    claim_across(
        &at.users,
        "restored",
        &at.class,
        &at.sources.name,
        from_snap(),
    )
    .await;

    // (1) Flag off: refused, saying which flag.
    let note = wait_for_note(&at.users, "restored", "ProvisioningFailed", FLAG).await;
    assert!(note.contains("another namespace"), "{note}");
    assert_pending(&at.users, "restored").await;
    controller.stop();

    // (2) Flag on, no ReferenceGrant CRD: refused, saying to install it.
    let controller = start(&[FLAG], "cross-namespace-flag-on");
    let installing = "install Gateway API";
    let note = wait_for_note(&at.users, "restored", "ProvisioningFailed", installing).await;
    assert!(note.contains("ReferenceGrant"), "{note}");

    // (3) The CRD, picked up without a restart.
    snapshotter::install_reference_grant_crd(&client).await;
    let watching = controller.logged("ReferenceGrants served", Duration::from_secs(60));
    assert!(
        watching.await,
        "the controller never watched ReferenceGrants"
    );
    refused_without_a_grant(&at).await;
    restored_once_granted(&at, &running, &snapshot_handle).await;
    clone_across(&at, &source_handle, &running).await;
    controller.stop();
    let _ = std::fs::remove_file(&at.record);
}

fn from_snap() -> Value {
    json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "snap" })
}

fn to_snap() -> Value {
    json!({ "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap" })
}

/// A claim made now is refused with an event naming the grant to create;
/// a grant for another namespace's claims allows nothing.
async fn refused_without_a_grant(at: &Across) {
    claim_across(&at.users, "later", &at.class, &at.sources.name, from_snap()).await;
    let note = wait_for_note(&at.users, "later", "ProvisioningFailed", "isn't allowed").await;
    for part in [
        format!("in namespace {}", at.sources.name),
        format!("namespace: {}}}", at.users.name),
        "kind: VolumeSnapshot, name: snap".to_string(),
    ] {
        assert!(note.contains(&part), "{note} (want {part})");
    }
    grant(&at.sources, "for-others", &at.sources.name, to_snap()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_pending(&at.users, "restored").await;
    assert_pending(&at.users, "later").await;
}

/// Once granted, both claims are restored from the snapshot in its
/// namespace, which is protected while the driver works (stopped
/// meanwhile) and released after.
async fn restored_once_granted(at: &Across, running: &Running, snapshot_handle: &str) {
    running.pause();
    grant(&at.sources, "restore", &at.users.name, to_snap()).await;
    let snapshots = at.sources.api::<VolumeSnapshot>();
    let protected = |s: Option<&VolumeSnapshot>| {
        s.is_some_and(|s| s.finalizers().iter().any(|f| f == SNAPSHOT_FINALIZER))
    };
    assert!(
        wait(&snapshots, "snap", "protected", protected)
            .await
            .is_some()
    );
    running.resume();
    bound_handle(&at.users, "restored").await;
    bound_handle(&at.users, "later").await;
    let restores = recorded(&at.record, "CreateVolume");
    let from_snapshot: BTreeSet<_> = restores
        .iter()
        .filter(|r| r["volume_content_source"]["snapshot"]["snapshot_id"] == snapshot_handle)
        .map(|r| r["name"].to_string())
        .collect();
    assert_eq!(from_snapshot.len(), 2, "{restores:?}");
    let released = |s: Option<&VolumeSnapshot>| {
        s.is_some_and(|s| !s.finalizers().iter().any(|f| f == SNAPSHOT_FINALIZER))
    };
    wait(&snapshots, "snap", "released", released).await;
}

/// A clone of `source` from the users' namespace, granted for every claim
/// (a grant without a name): the source, deleted while the clone is in
/// flight, stays until the clone is provisioned.
async fn clone_across(at: &Across, source_handle: &str, running: &Running) {
    let (sources, users) = (&at.sources, &at.users);
    let to_claims = json!({ "group": "", "kind": "PersistentVolumeClaim" });
    grant(sources, "clone", &users.name, to_claims).await;
    running.pause();
    let from_claim = json!({ "kind": "PersistentVolumeClaim", "name": "source" });
    claim_across(users, "cloned", &at.class, &sources.name, from_claim).await;
    let claims = sources.api::<PersistentVolumeClaim>();
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = claims.get("source").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some()
            && held.finalizers().iter().any(|f| f == CLONING),
        "the source went while its clone in another namespace was in flight: {:?}",
        held.metadata
    );
    running.resume();
    bound_handle(users, "cloned").await;
    wait(&claims, "source", "gone", gone).await;
    let clones = recorded(&at.record, "CreateVolume");
    assert!(
        clones
            .iter()
            .any(|r| r["volume_content_source"]["volume"]["volume_id"] == source_handle),
        "{clones:?}"
    );
}
