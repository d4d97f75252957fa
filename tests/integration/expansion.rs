//! Volume expansion (external-resizer's job) against the real control
//! plane, up to the node: the fake nodes run node agents but no kubelet, so
//! an image volume stops at `FileSystemResizePending` here; real_node.rs
//! takes it through kubelet's NodeExpandVolume.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{claim, is_bound, storage_class, wait, wait_for_event};
use crate::harness::{Binder, TestNamespace, stack};

async fn expandable_class(ns: &TestNamespace, name: &str, params: &[(&str, &str)]) {
    storage_class(&ns.client, name, "Immediate", "Delete", params).await;
    Api::<StorageClass>::all(ns.client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "allowVolumeExpansion": true })),
        )
        .await
        .unwrap();
}

async fn request(
    claims: &Api<PersistentVolumeClaim>,
    name: &str,
    size: &str,
) -> kube::Result<PersistentVolumeClaim> {
    let patch = json!({ "spec": { "resources": { "requests": { "storage": size } } } });
    claims
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

fn resize_status(c: &PersistentVolumeClaim) -> Option<String> {
    c.status
        .as_ref()?
        .allocated_resource_statuses
        .as_ref()?
        .get("storage")
        .cloned()
}

fn has_condition(c: &PersistentVolumeClaim, type_: &str) -> bool {
    c.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn capacity(c: Option<&PersistentVolumeClaim>) -> Option<String> {
    Some(
        c?.status
            .as_ref()?
            .capacity
            .as_ref()?
            .get("storage")?
            .0
            .clone(),
    )
}

#[tokio::test]
async fn image_volumes_grow_up_to_the_node_and_wait_for_kubelet() {
    let stack = stack(Binder::Kcm);
    let ns = TestNamespace::new_with(stack.client().await, "grow").await;
    let class = format!("{}-grow", ns.name);
    expandable_class(&ns, &class, &[]).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    let uid = claim(&ns, "data", &class, "64Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, "data", "Bound", is_bound).await;
    let pv_name = format!("pvc-{uid}");

    // More than any node has: infeasible, and the event says how much fits.
    request(&claims, "data", "100Gi").await.unwrap();
    let note = wait_for_event(&ns, "data", "VolumeResizeFailed").await;
    assert!(
        note.contains("cannot grow the volume by") && note.contains("request at most"),
        "{note}"
    );
    let infeasible = wait(
        &claims,
        "data",
        "marked infeasible",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(resize_status).as_deref() == Some("ControllerResizeInfeasible")
        },
    )
    .await
    .unwrap();
    assert!(has_condition(&infeasible, "ControllerResizeError"));
    assert_eq!(capacity(Some(&infeasible)).as_deref(), Some("64Mi"));

    // Asking for less (allowed down to status.capacity) recovers.
    request(&claims, "data", "128Mi").await.unwrap();
    let pending = wait(
        &claims,
        "data",
        "waiting for the node",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(resize_status).as_deref() == Some("NodeResizePending")
        },
    )
    .await
    .unwrap();
    assert!(has_condition(&pending, "FileSystemResizePending"));
    assert!(!has_condition(&pending, "ControllerResizeError"));
    assert_eq!(
        capacity(Some(&pending)).as_deref(),
        Some("64Mi"),
        "the claim's capacity waits for kubelet"
    );
    wait_for_event(&ns, "data", "FileSystemResizeRequired").await;

    let pv = Api::<PersistentVolume>::all(ns.client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "128Mi");
    let volume = Api::<Volume>::all(ns.client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    assert_eq!(volume.spec.capacity_bytes, 128 << 20);
    assert_eq!(volume.status.unwrap().capacity_bytes, Some(128 << 20));
    let node = volume.spec.node.unwrap();
    let image = stack.volume_dir(&node).join(format!("{pv_name}.img"));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 128 << 20);

    // Shrinking is refused by the API server, which names the limit.
    let err = request(&claims, "data", "32Mi").await.unwrap_err();
    assert!(err.to_string().contains("status.capacity"), "{err}");
}

#[tokio::test]
async fn directory_volumes_finish_without_the_node() {
    let stack = stack(Binder::Kcm);
    let ns = TestNamespace::new_with(stack.client().await, "growdir").await;
    let class = format!("{}-dir", ns.name);
    expandable_class(&ns, &class, &[("layout", "dir")]).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    claim(&ns, "data", &class, "64Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "data", "Bound", is_bound).await;
    request(&claims, "data", "96Mi").await.unwrap();
    let done = wait(
        &claims,
        "data",
        "resized",
        |c: Option<&PersistentVolumeClaim>| capacity(c).as_deref() == Some("96Mi"),
    )
    .await
    .unwrap();
    assert_eq!(resize_status(&done), None);
    assert!(!has_condition(&done, "Resizing"));
    wait_for_event(&ns, "data", "VolumeResizeSuccessful").await;
}

#[tokio::test]
async fn classes_without_expansion_are_refused_by_the_api_server() {
    let stack = stack(Binder::Kcm);
    let ns = TestNamespace::new_with(stack.client().await, "nogrow").await;
    let class = format!("{}-fixed", ns.name);
    storage_class(&ns.client, &class, "Immediate", "Delete", &[]).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    claim(&ns, "data", &class, "32Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "data", "Bound", is_bound).await;
    let err = request(&claims, "data", "64Mi").await.unwrap_err();
    assert!(
        err.to_string().contains("must support resize"),
        "the admission plugin names the class as the fix: {err}"
    );
}
