//! The installed CRDs and the running binary out of step, as after an image
//! upgrade without the CRDs or a rollback that leaves newer CRDs behind.

use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{claim, is_bound, wait};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, repo_root, unique_name,
};

const VOLUMES: &str = "volumes.stowage.dev";

/// Changes the schema of the installed Volume CRD in place.
async fn edit_volume_schema(client: &Client, edit: impl FnOnce(&mut JSONSchemaProps)) {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut crd = api.get(VOLUMES).await.unwrap();
    let schema = crd.spec.versions[0]
        .schema
        .as_mut()
        .unwrap()
        .open_api_v3_schema
        .as_mut()
        .unwrap();
    edit(schema);
    api.replace(VOLUMES, &PostParams::default(), &crd)
        .await
        .unwrap();
}

fn part<'a>(schema: &'a mut JSONSchemaProps, name: &str) -> &'a mut JSONSchemaProps {
    schema.properties.as_mut().unwrap().get_mut(name).unwrap()
}

fn log_of(name: &str) -> String {
    let path = repo_root().join(format!(
        "target/test-logs/{name}-{}.log",
        std::process::id()
    ));
    std::fs::read_to_string(&path).unwrap_or_default()
}

/// A newer CRD: a field the binary does not know, on a Volume it manages,
/// survives provisioning, the node agent's status writes and an expansion.
/// An older one: both roles refuse to start, naming the missing field.
#[tokio::test]
async fn crd_skew_newer_keeps_unknown_fields_older_stops_both_roles() {
    let node = "crd-newer-node";
    let kubeconfig = bare_cluster("crd-skew", &[node, "crd-older-node"]);
    let client = client_for_path(&kubeconfig).await;
    let extra =
        || -> JSONSchemaProps { serde_json::from_value(json!({ "type": "string" })).unwrap() };
    edit_volume_schema(&client, |s| {
        let spec = part(s, "spec").properties.as_mut().unwrap();
        spec.insert("futureField".into(), extra());
        let status = part(s, "status").properties.as_mut().unwrap();
        status.insert("futureStatus".into(), extra());
    })
    .await;

    let data = std::env::temp_dir().join(unique_name("stowage-crd-newer"));
    let agent = Process::node(&kubeconfig, node, &data, "crd-newer-node");
    let controller = Process::controller(&kubeconfig, "crd-newer-controller");
    let ns = TestNamespace::new_with(client.clone(), "crd-newer").await;
    let class = format!("{}-c", ns.name);
    let sc: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "metadata": { "name": class },
        "provisioner": "local.stowage.dev",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": true,
        "parameters": { "layout": "dir" },
    }))
    .unwrap();
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(client.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    let uid = claim(&ns, "c", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let claims = ns.api::<PersistentVolumeClaim>();
    wait(&claims, "c", "Bound", is_bound).await;

    let volumes = Api::<Volume>::all(client.clone());
    let name = format!("pvc-{uid}");
    let params = PatchParams::default();
    volumes
        .patch(
            &name,
            &params,
            &Patch::Merge(json!({ "spec": { "futureField": "kept" } })),
        )
        .await
        .unwrap();
    volumes
        .patch_status(
            &name,
            &params,
            &Patch::Merge(json!({ "status": { "futureStatus": "kept" } })),
        )
        .await
        .unwrap();
    claims
        .patch(
            "c",
            &params,
            &Patch::Merge(
                json!({ "spec": { "resources": { "requests": { "storage": "32Mi" } } } }),
            ),
        )
        .await
        .unwrap();
    let grown = wait(
        &claims,
        "c",
        "grown to 32Mi",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| {
                c.status
                    .as_ref()?
                    .capacity
                    .as_ref()?
                    .get("storage")
                    .cloned()
            })
            .is_some_and(|q| q.0 == "32Mi")
        },
    )
    .await;
    assert!(grown.is_some());

    let raw = Api::<kube::api::DynamicObject>::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<Volume>(&()),
    )
    .get(&name)
    .await
    .unwrap();
    assert_eq!(raw.data["spec"]["futureField"], "kept", "{:?}", raw.data);
    assert_eq!(raw.data["status"]["futureStatus"], "kept", "{:?}", raw.data);
    assert_eq!(raw.data["spec"]["capacityBytes"], 32 * 1024 * 1024);
    let _ = std::fs::remove_dir_all(&data);
    controller.stop();
    agent.stop();

    // Then the CRD loses a field this build writes.
    // An older CRD has neither the field nor the rule that freezes it.
    edit_volume_schema(&client, |s| {
        let spec = part(s, "spec");
        spec.properties.as_mut().unwrap().remove("reclaimPolicy");
        if let Some(rules) = spec.x_kubernetes_validations.as_mut() {
            rules.retain(|r| r.field_path.as_deref() != Some(".reclaimPolicy"));
        }
    })
    .await;

    let mut controller = Process::controller(&kubeconfig, "crd-older-controller");
    assert!(
        controller.exited_within(Duration::from_secs(60)).await,
        "the controller ran against a CRD that would drop spec.reclaimPolicy"
    );
    let data = std::env::temp_dir().join(unique_name("stowage-crd-older"));
    let mut agent = Process::node(&kubeconfig, "crd-older-node", &data, "crd-older-node");
    assert!(
        agent.exited_within(Duration::from_secs(60)).await,
        "the node agent ran against a CRD that would drop spec.reclaimPolicy"
    );
    for log in ["crd-older-controller", "crd-older-node"] {
        let text = log_of(log);
        assert!(
            text.contains("is older than stowage") && text.contains("spec.reclaimPolicy"),
            "{log} did not name the missing field:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&data);
}
