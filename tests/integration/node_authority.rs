//! A node agent speaks for its own node only. With the manifests' RBAC and
//! admission policy applied, and real tokens of stowage-node bound to Pods
//! on node-a (as kubelet binds the agent's), every write to node-b's
//! Volumes and StorageNode is refused by the API server, the agent's own
//! writes go through, and a status the agent forges on its own Volume
//! never points a PV at other data nor makes the controller delete
//! another Volume.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use stowage::crd::{StorageNode, VOLUME_FINALIZER, Volume};

use crate::fixtures::{claim, gone, is_bound, storage_class, wait};
use crate::harness::{Process, TestNamespace, bare_cluster, client_for_path, unique_name};
use crate::service_accounts::{
    NODE_ACCOUNT, client_with_token, install_node_identity, node_agent_client, token,
};

const CLUSTER: &str = "node-authority";
const NODES: [&str; 2] = ["node-a", "node-b"];

/// A Volume of `node` as the controller writes one, with no claim (so the
/// controller leaves it alone).
async fn volume_on(admin: &Client, node: &str) -> String {
    let name = unique_name(&format!("vol-{node}"));
    let volume: Volume = serde_json::from_value(json!({
        "metadata": { "name": name, "finalizers": [VOLUME_FINALIZER],
                      "labels": { "stowage.dev/node": node } },
        "spec": { "driver": "local.stowage.dev", "capacityBytes": 1_048_576,
                  "accessModes": ["ReadWriteOnce"], "node": node,
                  "parameters": { "layout": "dir" } },
    }))
    .unwrap();
    Api::<Volume>::all(admin.clone())
        .create(&PostParams::default(), &volume)
        .await
        .expect("creating Volume");
    name
}

/// The status code and message of a refused call; panics if it succeeded.
fn refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> (u16, String) {
    match result {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("{what}: expected the API server to refuse, got {other:?}"),
    }
}

/// Admission policies take effect a moment after they are created: waits
/// until the agent's write to another node's Volume is refused by it.
async fn policy_enforced(admin: &Client, agent: &Client) {
    let probe = volume_on(admin, "node-b").await;
    let api = Api::<Volume>::all(agent.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = json!({ "status": { "phase": "Failed", "lastError": "probe" } });
        match api
            .patch_status(&probe, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("ValidatingAdmissionPolicy") => return,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "stowage-node-authority not enforced after 60s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn setup() -> (crate::harness::BareCluster, Client, Client) {
    let kubeconfig = bare_cluster(CLUSTER, &NODES);
    install_node_identity(&kubeconfig);
    let admin = client_for_path(&kubeconfig).await;
    let agent_a = node_agent_client(&kubeconfig, &admin, "node-a").await;
    policy_enforced(&admin, &agent_a).await;
    (kubeconfig, admin, agent_a)
}

#[tokio::test]
async fn a_node_agent_cannot_touch_another_nodes_volume() {
    let (_cluster, admin, agent_a) = setup().await;
    let theirs = volume_on(&admin, "node-b").await;
    let api = Api::<Volume>::all(agent_a.clone());
    let pp = PatchParams::default();

    let forged = json!({ "status": { "phase": "Ready", "observedGeneration": 1,
        "volumeHandle": "elsewhere", "capacityBytes": 1_i64 << 40 } });
    let (code, msg) = refused(
        api.patch_status(&theirs, &pp, &Patch::Merge(&forged)).await,
        "status of node-b's Volume",
    );
    assert_eq!(code, 403, "{msg}");
    assert!(
        msg.contains("may write only Volumes whose spec.node is node-a"),
        "{msg}"
    );
    // Dropping the finalizer would let the Volume go with its data kept.
    let release = json!({ "metadata": { "finalizers": null } });
    let (code, msg) = refused(
        api.patch(&theirs, &pp, &Patch::Merge(&release)).await,
        "finalizer of node-b's Volume",
    );
    assert_eq!(code, 403, "{msg}");
    // Neither replacing nor deleting is granted at all.
    let current = Api::<Volume>::all(admin.clone())
        .get(&theirs)
        .await
        .unwrap();
    let (code, msg) = refused(
        api.replace(&theirs, &PostParams::default(), &current).await,
        "update of a Volume",
    );
    assert!(code == 403 && msg.contains("cannot update"), "{code} {msg}");
    let (code, msg) = refused(
        api.delete(&theirs, &DeleteParams::default()).await,
        "delete of a Volume",
    );
    assert!(code == 403 && msg.contains("cannot delete"), "{code} {msg}");

    let after = Api::<Volume>::all(admin).get(&theirs).await.unwrap();
    assert!(after.status.is_none(), "{:?}", after.status);
    assert_eq!(
        after.metadata.finalizers,
        Some(vec![VOLUME_FINALIZER.into()])
    );
}

#[tokio::test]
async fn a_node_agent_may_only_report_on_and_release_its_own_volume() {
    let (_cluster, admin, agent_a) = setup().await;
    let mine = volume_on(&admin, "node-a").await;
    let api = Api::<Volume>::all(agent_a);
    let pp = PatchParams::default();

    let ready = json!({ "status": { "phase": "Ready", "observedGeneration": 1 } });
    api.patch_status(&mine, &pp, &Patch::Merge(&ready))
        .await
        .expect("reporting on its own Volume");

    // Everything but status and its finalizer is the controller's.
    let label = json!({ "metadata": { "labels": { "stowage.dev/node": "node-b" } } });
    let (code, msg) = refused(
        api.patch(&mine, &pp, &Patch::Merge(&label)).await,
        "relabelling",
    );
    assert!(
        code == 403 && msg.contains("only a Volume's status"),
        "{code} {msg}"
    );
    let foreign = json!({ "metadata": { "finalizers": [VOLUME_FINALIZER, "example.com/hold"] } });
    refused(
        api.patch(&mine, &pp, &Patch::Merge(&foreign)).await,
        "adding a finalizer",
    );
    let grow = json!({ "spec": { "capacityBytes": 1_i64 << 40 } });
    let (code, msg) = refused(api.patch(&mine, &pp, &Patch::Merge(&grow)).await, "growing");
    assert_eq!(code, 403, "{msg}");
    // Removing spec.node, then adding another: the CRD refuses the first.
    let remove = Patch::Json::<()>(
        serde_json::from_value(json!([{ "op": "remove", "path": "/spec/node" }])).unwrap(),
    );
    let (code, msg) = refused(api.patch(&mine, &pp, &remove).await, "removing spec.node");
    assert!(
        code == 422 && msg.contains("node is immutable"),
        "{code} {msg}"
    );

    let release = json!({ "metadata": { "finalizers": null } });
    api.patch(&mine, &pp, &Patch::Merge(&release))
        .await
        .expect("removing its finalizer from its own Volume");
    let after = Api::<Volume>::all(admin).get(&mine).await.unwrap();
    assert_eq!(after.spec.node.as_deref(), Some("node-a"));
    assert_eq!(after.labels()["stowage.dev/node"], "node-a");
}

fn storage_node(name: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "stowage.dev/v1alpha1", "kind": "StorageNode",
        "metadata": { "name": name },
        "spec": { "driver": "local.stowage.dev", "node": node },
    })
}

#[tokio::test]
async fn a_node_agent_speaks_only_for_its_own_storage_node() {
    let (_cluster, admin, agent_a) = setup().await;
    let api = Api::<StorageNode>::all(agent_a);
    let apply = PatchParams::apply("stowage-node");
    let (code, msg) = refused(
        api.patch(
            "node-b",
            &apply,
            &Patch::Apply(storage_node("node-b", "node-b")),
        )
        .await,
        "StorageNode node-b",
    );
    assert!(
        code == 403 && msg.contains("only the StorageNode node-a"),
        "{code} {msg}"
    );
    refused(
        api.patch(
            "node-a",
            &apply,
            &Patch::Apply(storage_node("node-a", "node-b")),
        )
        .await,
        "StorageNode node-a claiming node-b",
    );
    api.patch(
        "node-a",
        &apply,
        &Patch::Apply(storage_node("node-a", "node-a")),
    )
    .await
    .expect("its own StorageNode");
    let capacity = json!({ "apiVersion": "stowage.dev/v1alpha1", "kind": "StorageNode",
        "status": { "capacityBytes": 1_i64 << 50, "availableBytes": 1_i64 << 50, "dataDir": "/x" } });
    api.patch_status("node-a", &apply, &Patch::Apply(&capacity))
        .await
        .expect("its own capacity");

    // node-b's, made by its own agent (here: the admin), stays as it is.
    Api::<StorageNode>::all(admin.clone())
        .patch(
            "node-b",
            &apply,
            &Patch::Apply(storage_node("node-b", "node-b")),
        )
        .await
        .unwrap();
    let (code, msg) = refused(
        api.patch_status("node-b", &apply, &Patch::Apply(&capacity))
            .await,
        "capacity of node-b",
    );
    assert_eq!(code, 403, "{msg}");
    let b = Api::<StorageNode>::all(admin).get("node-b").await.unwrap();
    assert!(b.status.is_none(), "{:?}", b.status);
}

/// A token of stowage-node that no Pod is bound to (so no node is named)
/// writes nothing, not even to a Volume it could otherwise claim.
#[tokio::test]
async fn a_node_agent_token_without_a_node_writes_nothing() {
    let (kubeconfig, admin, _) = setup().await;
    let unbound = client_with_token(&kubeconfig, &token(&admin, NODE_ACCOUNT, None).await).await;
    let mine = volume_on(&admin, "node-a").await;
    let status = json!({ "status": { "phase": "Ready" } });
    let (code, msg) = refused(
        Api::<Volume>::all(unbound)
            .patch_status(&mine, &PatchParams::default(), &Patch::Merge(&status))
            .await,
        "unbound token",
    );
    assert!(code == 403 && msg.contains("names none"), "{code} {msg}");
}

/// The agent on node-a reports room for volumes, as it does on start.
async fn room_on_node_a(agent_a: &Client) {
    let apply = PatchParams::apply("stowage-node");
    let nodes = Api::<StorageNode>::all(agent_a.clone());
    nodes
        .patch(
            "node-a",
            &apply,
            &Patch::Apply(storage_node("node-a", "node-a")),
        )
        .await
        .unwrap();
    let room = json!({ "apiVersion": "stowage.dev/v1alpha1", "kind": "StorageNode",
        "status": { "capacityBytes": 1_i64 << 32, "availableBytes": 1_i64 << 32, "dataDir": "/x" } });
    nodes
        .patch_status("node-a", &apply, &Patch::Apply(&room))
        .await
        .unwrap();
}

/// The agent on node-a reports its Volume Ready and lies: another volume's
/// handle, attributes, node-b's topology, a petabyte. The PV the controller
/// makes follows the spec and the class, and the reclaim deletes that
/// Volume and no other.
#[tokio::test]
async fn a_forged_status_neither_redirects_a_pv_nor_deletes_another_volume() {
    let (kubeconfig, admin, agent_a) = setup().await;
    let victim = volume_on(&admin, "node-b").await;
    room_on_node_a(&agent_a).await;
    let controller = Process::controller(&kubeconfig, "node-authority-controller");
    let ns = TestNamespace::new_with(admin.clone(), "forged").await;
    let class = format!("{}-dir", ns.name);
    storage_class(&admin, &class, "Immediate", "Delete", &[("layout", "dir")]).await;
    let uid = claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let name = format!("pvc-{uid}");
    let volumes = Api::<Volume>::all(admin.clone());
    let written = wait(&volumes, &name, "written", |v: Option<&Volume>| v.is_some())
        .await
        .unwrap();
    assert_eq!(written.spec.node.as_deref(), Some("node-a"));

    let forged = json!({ "status": {
        "phase": "Ready", "observedGeneration": written.metadata.generation,
        "volumeHandle": victim, "capacityBytes": 1_i64 << 50,
        "volumeContext": { "layout": "image", "share": "//elsewhere/data" },
        "topology": { "topology.stowage.dev/node": "node-b" },
    }});
    Api::<Volume>::all(agent_a.clone())
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("the agent reports on its own Volume");
    let claims = ns.api::<PersistentVolumeClaim>();
    wait(&claims, "data", "Bound", is_bound).await;
    let pvs = Api::<PersistentVolume>::all(admin.clone());
    let pv = pvs.get(&name).await.unwrap();
    let spec = pv.spec.as_ref().unwrap();
    let csi = spec.csi.as_ref().unwrap();
    assert_eq!(csi.volume_handle, name, "the PV follows a forged handle");
    assert_eq!(
        csi.volume_attributes,
        Some([("layout".to_string(), "dir".to_string())].into())
    );
    assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "16Mi");
    let affinity = serde_json::to_value(&spec.node_affinity).unwrap();
    assert_eq!(
        affinity["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"],
        json!(["node-a"])
    );

    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(&volumes, &name, "being deleted", |v: Option<&Volume>| {
        v.is_some_and(|v| v.metadata.deletion_timestamp.is_some())
    })
    .await;
    let release = json!({ "metadata": { "finalizers": null } });
    Api::<Volume>::all(agent_a)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&release))
        .await
        .expect("the agent releases its own deleted Volume");
    wait(&pvs, &name, "deleted", gone).await;
    let victim = volumes
        .get(&victim)
        .await
        .expect("the other Volume is kept");
    assert!(victim.metadata.deletion_timestamp.is_none());
    controller.stop();
}
