//! VolumeAttributesClass through stowage in place of external-provisioner
//! and external-resizer, against Kubernetes' CSI mock driver: the class's
//! parameters as CreateVolume's `mutable_parameters`, ControllerModifyVolume
//! when the claim names another class, `modifyVolumeStatus` while a class
//! is missing or wrong, the controller-modify Secret, and a clear refusal
//! for `local.stowage.dev`.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::VolumeAttributesClass;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::external_driver::ExternalDriver;
use crate::fixtures::{is_bound, wait, wait_for_event};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, unique_name};
use crate::proxy_attach::Scene;
use crate::proxy_driver::{apply, immediate_class, proxy_controller};
use crate::proxy_snapshot::recorded;
use crate::service_accounts::{apply_manifest, controller_account};

fn current(c: &PersistentVolumeClaim) -> Option<&str> {
    c.status
        .as_ref()?
        .current_volume_attributes_class_name
        .as_deref()
}

/// (target, status) of the claim's `modifyVolumeStatus`.
fn attempt(c: &PersistentVolumeClaim) -> Option<(String, String)> {
    let m = c.status.as_ref()?.modify_volume_status.as_ref()?;
    Some((
        m.target_volume_attributes_class_name.clone()?,
        m.status.clone(),
    ))
}

async fn name_class(claims: &Api<PersistentVolumeClaim>, claim: &str, class: &str) {
    let patch = json!({ "spec": { "volumeAttributesClassName": class } });
    claims
        .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The driver's log lines for `method` that carry `text`.
fn calls(driver: &ExternalDriver, method: &str, text: &str) -> usize {
    driver
        .log()
        .lines()
        .filter(|l| l.contains(method) && l.contains(text))
        .count()
}

#[tokio::test]
async fn volume_attributes_classes_reach_the_driver_and_change_through_modify_volume() {
    let node = "vac-node";
    let kubeconfig = bare_cluster("proxy-modify", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let record = std::env::temp_dir().join(unique_name("stowage-modify-record"));
    let driver = ExternalDriver::mock("vac.mock.csi.stowage.test")
        .with_args(&[&format!("--record={}", record.display())]);
    let _running = driver.start();
    Scene::install(&client, &driver, &[node]).await;
    // As deployed, with Secrets readable (the class names one).
    let as_controller = controller_account(&kubeconfig, &client).await;
    apply_manifest(&kubeconfig, "optional/controller-secrets.yaml", &[]);
    let controller = proxy_controller(
        &as_controller,
        &driver.name,
        &driver.socket,
        &[],
        "proxy-modify-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "proxy-modify").await;
    let vacs = Api::<VolumeAttributesClass>::all(client.clone());
    let vac = |name: &str, driver: &str, iops: &str| {
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttributesClass",
                "metadata": { "name": name }, "driverName": driver, "parameters": { "iops": iops } })
    };
    let (gold, silver, late, foreign) = (
        format!("{}-gold", ns.name),
        format!("{}-silver", ns.name),
        format!("{}-late", ns.name),
        format!("{}-foreign", ns.name),
    );
    apply(&vacs, vac(&gold, &driver.name, "3000")).await;
    apply(&vacs, vac(&silver, &driver.name, "1500")).await;
    apply(&vacs, vac(&foreign, "other.csi.k8s.io", "9")).await;
    // The controller-modify Secret, as external-provisioner 6.2 records
    // it on the PV and external-resizer reads it from there.
    let class = immediate_class(
        &client,
        &format!("{}-class", ns.name),
        &driver.name,
        json!({ "csi.storage.k8s.io/controller-modify-secret-name": "modify-creds",
                "csi.storage.k8s.io/controller-modify-secret-namespace": "${pvc.namespace}" }),
    )
    .await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "modify-creds" }, "stringData": { "token": "m" },
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let claims = ns.api::<PersistentVolumeClaim>();
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let with_class = |name: &str, storage_class: &str| -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "storageClassName": storage_class, "accessModes": ["ReadWriteOnce"],
                      "volumeAttributesClassName": gold,
                      "resources": { "requests": { "storage": "16Mi" } } },
        }))
        .unwrap()
    };

    // Provisioned with the class: its parameters are CreateVolume's
    // mutable_parameters, the PV and the claim carry its name.
    claims
        .create(&PostParams::default(), &with_class("data", &class))
        .await
        .unwrap();
    let bound = wait(&claims, "data", "Bound", is_bound).await.unwrap();
    assert_eq!(current(&bound), Some(gold.as_str()));
    let pv_name = bound.spec.unwrap().volume_name.unwrap();
    let pv_class = |pv: PersistentVolume| pv.spec.unwrap().volume_attributes_class_name;
    assert_eq!(
        pv_class(pvs.get(&pv_name).await.unwrap()),
        Some(gold.clone())
    );
    assert!(
        calls(&driver, "/csi.v1.Controller/CreateVolume", "\"3000\"") >= 1,
        "CreateVolume without the class's parameters:\n{}",
        driver.log()
    );

    // Another class: ControllerModifyVolume, then the PV and the claim.
    name_class(&claims, "data", &silver).await;
    let moved = |c: Option<&PersistentVolumeClaim>| c.and_then(current) == Some(silver.as_str());
    let data = wait(&claims, "data", "the new class", moved).await.unwrap();
    assert_eq!(attempt(&data), None, "modifyVolumeStatus cleared");
    assert_eq!(
        pv_class(pvs.get(&pv_name).await.unwrap()),
        Some(silver.clone())
    );
    // At least once: a pass woken by our own status write may ask again
    // before the caches show the outcome, which the driver answers alike.
    let modified = calls(
        &driver,
        "/csi.v1.Controller/ControllerModifyVolume",
        "\"1500\"",
    );
    assert!(
        modified >= 1,
        "no ControllerModifyVolume:\n{}",
        driver.log()
    );
    wait_for_event(&ns, "data", "VolumeModifySuccessful").await;
    let annotations = pvs
        .get(&pv_name)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap();
    assert_eq!(
        (
            annotations["volume.kubernetes.io/controller-modify-secret-name"].as_str(),
            annotations["volume.kubernetes.io/controller-modify-secret-namespace"].as_str()
        ),
        ("modify-creds", ns.name.as_str())
    );
    let asked = recorded(&record, "ControllerModifyVolume");
    assert!(!asked.is_empty(), "no ControllerModifyVolume recorded");
    for request in &asked {
        assert_eq!(request["secrets"], json!({ "token": "m" }), "{request}");
    }

    // A class that does not exist yet: Pending, then applied once made.
    name_class(&claims, "data", &late).await;
    let pending = |c: Option<&PersistentVolumeClaim>| {
        c.and_then(attempt) == Some((late.clone(), "Pending".to_string()))
    };
    wait(&claims, "data", "Pending", pending).await;
    let note = wait_for_event(&ns, "data", "VolumeModifyFailed").await;
    assert!(note.contains("does not exist"), "{note}");
    apply(&vacs, vac(&late, &driver.name, "700")).await;
    let arrived = |c: Option<&PersistentVolumeClaim>| c.and_then(current) == Some(late.as_str());
    wait(&claims, "data", "the class once it exists", arrived).await;

    // Another driver's class: Infeasible, the volume keeps its class.
    name_class(&claims, "data", &foreign).await;
    let infeasible = |c: Option<&PersistentVolumeClaim>| {
        c.and_then(attempt) == Some((foreign.clone(), "Infeasible".to_string()))
    };
    let data = wait(&claims, "data", "Infeasible", infeasible)
        .await
        .unwrap();
    assert_eq!(current(&data), Some(late.as_str()));
    assert_eq!(
        pv_class(pvs.get(&pv_name).await.unwrap()),
        Some(late.clone())
    );

    // local.stowage.dev has nothing mutable: refused at provisioning.
    let local = immediate_class(
        &client,
        &format!("{}-local", ns.name),
        "local.stowage.dev",
        json!({}),
    )
    .await;
    claims
        .create(&PostParams::default(), &with_class("local", &local))
        .await
        .unwrap();
    let note = wait_for_event(&ns, "local", "ProvisioningFailed").await;
    assert!(note.contains("takes no VolumeAttributesClass"), "{note}");
    controller.stop();
}
