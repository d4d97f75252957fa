//! What kubelet and the driver's deployment would have set up, and the
//! heartbeat kubelet would post.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::driver::{Driver, NODE};

/// The CSIDriver (attach required), a Node with the driver's topology label
/// whose volumes the attach-detach controller manages, its CSINode, and
/// stowage's CRDs.
pub async fn set_up(client: &Client, driver: &Driver) -> anyhow::Result<()> {
    let apply = PatchParams::apply("bench-compare").force();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in stowage::crd::all() {
        crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd))
            .await?;
    }
    let name = driver.name();
    let csidriver: CSIDriver = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": name },
        "spec": { "attachRequired": true, "podInfoOnMount": false },
    }))?;
    Api::<CSIDriver>::all(client.clone())
        .patch(name, &apply, &Patch::Apply(&csidriver))
        .await?;
    let (key, value) = driver.topology();
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": NODE,
            "labels": { "kubernetes.io/hostname": NODE, key: value },
            "annotations": { "volumes.kubernetes.io/controller-managed-attach-detach": "true" } },
    }))?;
    Api::<Node>::all(client.clone())
        .patch(NODE, &apply, &Patch::Apply(&node))
        .await?;
    mark_ready(client).await?;
    let csinode: CSINode = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": { "name": NODE },
        "spec": { "drivers": [{ "name": name, "nodeID": driver.node_id(), "topologyKeys": [key] }] },
    }))?;
    Api::<CSINode>::all(client.clone())
        .patch(NODE, &apply, &Patch::Apply(&csinode))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

async fn mark_ready(client: &Client) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({ "status": {
        "capacity": { "cpu": "64", "memory": "256Gi", "pods": "10000" },
        "allocatable": { "cpu": "64", "memory": "256Gi", "pods": "10000" },
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "benchmark node", "lastHeartbeatTime": now, "lastTransitionTime": now }],
    }});
    Api::<Node>::all(client.clone())
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// No kubelet posts this Node's status: without a heartbeat the node
/// lifecycle controller would taint it and evict the pods mid-run.
pub async fn keep_node_ready(client: Client) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Err(e) = mark_ready(&client).await {
            eprintln!("node heartbeat: {e}");
        }
    }
}
