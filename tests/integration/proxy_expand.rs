//! stowage in place of external-resizer for a driver nobody here wrote
//! (Kubernetes' CSI mock driver): ControllerExpandVolume, the claim's
//! resize states as kubelet reads them, `node_expansion_required`, an
//! infeasible request and the user's way back from it, and the
//! controller-expand Secret the PV names.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::external_driver::ExternalDriver;
use crate::fixtures::{claim, is_bound, wait, wait_for_event};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, unique_name};
use crate::proxy_attach::Scene;
use crate::proxy_driver::{apply, proxy_controller};
use crate::proxy_snapshot::recorded;

const MI: i64 = 1 << 20;

/// `allocatedResourceStatuses[storage]` of a claim, if any.
fn resize_status(c: &PersistentVolumeClaim) -> Option<String> {
    c.status
        .as_ref()?
        .allocated_resource_statuses
        .as_ref()?
        .get("storage")
        .cloned()
}

fn capacity(c: &PersistentVolumeClaim) -> Option<String> {
    Some(
        c.status
            .as_ref()?
            .capacity
            .as_ref()?
            .get("storage")?
            .0
            .clone(),
    )
}

async fn ask_for(claims: &Api<PersistentVolumeClaim>, name: &str, size: &str) {
    let patch = json!({ "spec": { "resources": { "requests": { "storage": size } } } });
    claims
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn driver_volumes_expand_through_controller_expand_volume() {
    let node = "expand-node";
    let kubeconfig = bare_cluster("proxy-expand", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let record = std::env::temp_dir().join(unique_name("stowage-expand-record"));
    let driver = ExternalDriver::mock("expand.mock.csi.stowage.test").with_args(&[
        "--node-expansion-required",
        &format!("--max-volume-size={}", 1024 * MI),
        &format!("--record={}", record.display()),
    ]);
    let _running = driver.start();
    Scene::install(&client, &driver, &[node]).await;
    let controller = proxy_controller(
        &kubeconfig,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        "proxy-expand-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "proxy-expand").await;
    let class = format!("{}-expandable", ns.name);
    let p = "csi.storage.k8s.io";
    apply(
        &Api::<StorageClass>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": { "name": class },
                "provisioner": driver.name, "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
                "allowVolumeExpansion": true,
                "parameters": {
                    format!("{p}/controller-expand-secret-name"): "expand-creds",
                    format!("{p}/controller-expand-secret-namespace"): "${pvc.namespace}",
                } }),
    )
    .await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "expand-creds" }, "stringData": { "token": "t" },
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let claims = ns.api::<PersistentVolumeClaim>();
    let pvs = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone());

    // A filesystem volume: the driver grows it and asks for the node's
    // part, so the claim waits for kubelet with the PV already grown.
    claim(&ns, "fs", &class, "16Mi", &["ReadWriteOnce"]).await;
    let bound = wait(&claims, "fs", "Bound", is_bound).await.unwrap();
    let pv = bound.spec.unwrap().volume_name.unwrap();
    let expand_ref = pvs.get(&pv).await.unwrap().spec.unwrap().csi.unwrap();
    assert_eq!(
        expand_ref
            .controller_expand_secret_ref
            .unwrap()
            .name
            .as_deref(),
        Some("expand-creds"),
        "the PV names the controller-expand Secret"
    );
    let handle = expand_ref.volume_handle;
    ask_for(&claims, "fs", "32Mi").await;
    let pending = |c: Option<&PersistentVolumeClaim>| {
        c.and_then(resize_status).as_deref() == Some("NodeResizePending")
    };
    let fs = wait(&claims, "fs", "NodeResizePending", pending)
        .await
        .unwrap();
    let conditions: Vec<_> = fs
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert_eq!(conditions, ["FileSystemResizePending"]);
    assert_eq!(
        capacity(&fs).as_deref(),
        Some("16Mi"),
        "kubelet's to finish"
    );
    let pv_size = pvs.get(&pv).await.unwrap().spec.unwrap().capacity.unwrap()["storage"]
        .0
        .clone();
    assert_eq!(pv_size, "32Mi");
    let held = driver.volume(&handle).await.expect("the driver holds it");
    assert_eq!(
        held.capacity_bytes,
        32 * MI,
        "ControllerExpandVolume reached the driver"
    );
    let asked = recorded(&record, "ControllerExpandVolume");
    assert!(!asked.is_empty(), "no ControllerExpandVolume recorded");
    for request in &asked {
        assert_eq!(
            request["secrets"],
            json!({ "token": "t" }),
            "the controller-expand Secret's data reached the driver"
        );
    }
    wait_for_event(&ns, "fs", "FileSystemResizeRequired").await;

    // A block volume: nothing for the node, the claim has its size at once.
    let block: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": "raw" },
        "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                  "resources": { "requests": { "storage": "16Mi" } } },
    }))
    .unwrap();
    claims.create(&PostParams::default(), &block).await.unwrap();
    wait(&claims, "raw", "Bound", is_bound).await;
    ask_for(&claims, "raw", "48Mi").await;
    let grown = |c: Option<&PersistentVolumeClaim>| c.and_then(capacity).as_deref() == Some("48Mi");
    let raw = wait(&claims, "raw", "its new capacity", grown)
        .await
        .unwrap();
    assert_eq!(resize_status(&raw), None, "nothing left to do");
    wait_for_event(&ns, "raw", "VolumeResizeSuccessful").await;

    // More than the driver has: infeasible, said on the claim; asking for
    // less (RecoverVolumeExpansionFailure) goes through.
    claim(&ns, "greedy", &class, "16Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "greedy", "Bound", is_bound).await;
    ask_for(&claims, "greedy", "2Gi").await;
    let infeasible = |c: Option<&PersistentVolumeClaim>| {
        c.and_then(resize_status).as_deref() == Some("ControllerResizeInfeasible")
    };
    wait(&claims, "greedy", "ControllerResizeInfeasible", infeasible).await;
    let note = wait_for_event(&ns, "greedy", "VolumeResizeFailed").await;
    assert!(note.contains("OutOfRange"), "{note}");
    ask_for(&claims, "greedy", "64Mi").await;
    let greedy_pv = claims
        .get("greedy")
        .await
        .unwrap()
        .spec
        .unwrap()
        .volume_name
        .unwrap();
    let greedy_handle = crate::fixtures::volume_handle(&client, &greedy_pv).await;
    let greedy = wait(&claims, "greedy", "NodeResizePending", pending)
        .await
        .unwrap();
    let allocated = greedy.status.unwrap().allocated_resources.unwrap()["storage"]
        .0
        .clone();
    assert_eq!(allocated, "64Mi", "worked towards the lower request");
    let held = driver.volume(&greedy_handle).await.unwrap();
    assert_eq!(held.capacity_bytes, 64 * MI);
    controller.stop();
}
