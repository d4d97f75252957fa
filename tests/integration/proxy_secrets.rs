//! The standard `csi.storage.k8s.io/*-secret-*` class parameters through
//! `--csi-driver`: templates resolved per claim onto the PV's secret
//! references, and a provisioner Secret that does not exist yet explained on
//! the claim, then used once it is created.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::fixtures::{claim, is_bound, wait, wait_for_event};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, csi_server, unique_name};
use crate::proxy_driver::proxy_controller;

const DRIVER: &str = "secrets.stowage.dev";

#[tokio::test]
async fn secret_templates_reach_the_pv_and_a_missing_secret_is_explained() {
    let kubeconfig = bare_cluster("proxy-secrets", &[]);
    let client = client_for_path(&kubeconfig).await;
    let dir = std::env::temp_dir().join(unique_name("stowage-proxy-secrets"));
    let (socket, kubelet) = (dir.join("csi.sock"), dir.join("kubelet"));
    std::fs::create_dir_all(&kubelet).unwrap();
    let server = csi_server(
        &socket,
        &dir.join("data"),
        &kubelet,
        "secrets-node",
        &["--driver-name", DRIVER],
        "proxy-secrets-server",
    );
    let controller = proxy_controller(
        &kubeconfig,
        DRIVER,
        &socket,
        &["--serve-local=false"],
        "proxy-secrets-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "proxy-secrets").await;
    let class = format!("{}-c", ns.name);
    let p = "csi.storage.k8s.io";
    let sc: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": class },
        "provisioner": DRIVER,
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Delete",
        "parameters": {
            format!("{p}/provisioner-secret-name"): "${pvc.name}-creds",
            format!("{p}/provisioner-secret-namespace"): "${pvc.namespace}",
            format!("{p}/node-stage-secret-name"): "stage-${pv.name}",
            format!("{p}/node-stage-secret-namespace"): ns.name,
            format!("{p}/node-publish-secret-name"): "publish",
            format!("{p}/node-publish-secret-namespace"): "${pvc.namespace}",
        },
    }))
    .unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();

    // No Secret "data-creds" yet: the claim says which one it waits for.
    let uid = claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let note = wait_for_event(&ns, "data", "ProvisioningFailed").await;
    assert!(
        note.contains("data-creds") && note.contains(&ns.name),
        "the event names the missing Secret: {note}"
    );

    // Created: provisioning resumes with no further action.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "data-creds" },
    }))
    .unwrap();
    let mut secret = secret;
    secret.data = Some(
        [("password".to_string(), ByteString(b"s3cret".to_vec()))]
            .into_iter()
            .collect(),
    );
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "data",
        "Bound",
        is_bound,
    )
    .await;

    let pv_name = format!("pvc-{uid}");
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    let csi = pv.spec.unwrap().csi.unwrap();
    let stage = csi.node_stage_secret_ref.expect("nodeStageSecretRef");
    assert_eq!(
        (stage.name.as_deref(), stage.namespace.as_deref()),
        (
            Some(format!("stage-{pv_name}").as_str()),
            Some(ns.name.as_str())
        )
    );
    let publish = csi.node_publish_secret_ref.expect("nodePublishSecretRef");
    assert_eq!(
        (publish.name.as_deref(), publish.namespace.as_deref()),
        (Some("publish"), Some(ns.name.as_str()))
    );
    assert!(
        csi.controller_publish_secret_ref.is_none() && csi.controller_expand_secret_ref.is_none(),
        "references the class does not configure"
    );
    controller.stop();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
