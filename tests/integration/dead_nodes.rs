//! Nodes that stop answering, and nodes deleted from the cluster: nothing
//! waits on them silently.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use stowage::crd::{StorageNode, Volume};

use crate::fixtures::{
    TIMEOUT, claim, gone, is_bound, storage_class, wait, wait_for_stowage_event,
};
use crate::harness::TestNamespace;
use crate::multi_node::MultiNode;

const SELECTED: &str = "volume.kubernetes.io/selected-node";

/// A claim the scheduler placed on `node` (set as kube-scheduler does).
async fn placed_claim(
    ns: &TestNamespace,
    name: &str,
    class: &str,
    node: &str,
) -> PersistentVolumeClaim {
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": { SELECTED: node } },
        "spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "50Mi" } },
        },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await
        .unwrap()
}

fn ready_condition(n: Option<&StorageNode>) -> Option<(String, String)> {
    let c = n?
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((format!("{:?}", c.status), c.reason.clone()))
}

/// Events about a cluster-scoped object (posted in `default`).
async fn cluster_events(client: &Client, name: &str) -> Vec<(String, String)> {
    let list = Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

async fn wait_cluster_event(client: &Client, name: &str, reason: &str) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let events = cluster_events(client, name).await;
        if let Some((_, note)) = events.iter().find(|(r, _)| r == reason) {
            return note.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event on {name}: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The agent of `silent` stops. A claim already given a Volume there is
/// told it waits on a silent node; once the heartbeat is older than the
/// timeout, the StorageNode reads Ready=False HeartbeatExpired, its
/// capacity is no longer published, a claim the scheduler puts there goes
/// back to the scheduler, and a new Immediate claim lands on the live node
/// although the silent one has more room. When the agent is back, the
/// condition clears and the waiting claim binds.
#[tokio::test]
async fn a_node_whose_agent_stopped_gets_no_new_volumes_and_its_claims_are_told() {
    const LIVE: &str = "live-a";
    const SILENT: &str = "silent-b";
    let mut stack = MultiNode::start(
        "dead-node",
        &[(LIVE, "1Gi"), (SILENT, "4Gi")],
        true,
        &["--node-heartbeat-timeout", "10s"],
    )
    .await;
    let ns = TestNamespace::new_with(stack.client.clone(), "dead-node").await;
    let wffc = format!("{}-wffc", ns.name);
    let immediate = format!("{}-now", ns.name);
    storage_class(&ns.client, &wffc, "WaitForFirstConsumer", "Delete", &[]).await;
    storage_class(&ns.client, &immediate, "Immediate", "Delete", &[]).await;
    stack
        .wait_capacities(&immediate, &[(LIVE, "1Gi"), (SILENT, "4Gi")])
        .await;

    stack.stop_agent(SILENT);
    let stuck = placed_claim(&ns, "stuck", &wffc, SILENT).await;
    let volume_name = format!("pvc-{}", stuck.uid().unwrap());
    let volumes = Api::<Volume>::all(ns.client.clone());
    let volume = wait(&volumes, &volume_name, "written", |v: Option<&Volume>| {
        v.is_some()
    })
    .await
    .unwrap();
    assert_eq!(volume.spec.node.as_deref(), Some(SILENT));

    let nodes = Api::<StorageNode>::all(ns.client.clone());
    wait(
        &nodes,
        SILENT,
        "marked silent",
        |n: Option<&StorageNode>| {
            ready_condition(n) == Some(("False".into(), "HeartbeatExpired".into()))
        },
    )
    .await;
    let note = wait_for_stowage_event(&ns, "stuck", "NodeHeartbeatExpired").await;
    assert!(
        note.contains(SILENT) && note.contains("last reported"),
        "{note}"
    );
    let on_node = wait_cluster_event(&ns.client, SILENT, "NodeHeartbeatExpired").await;
    assert!(on_node.contains("--node-heartbeat-timeout"), "{on_node}");
    stack.wait_capacities(&immediate, &[(LIVE, "1Gi")]).await;

    placed_claim(&ns, "late", &wffc, SILENT).await;
    let note = wait_for_stowage_event(&ns, "late", "Rescheduling").await;
    assert!(note.contains(SILENT), "{note}");
    let claims = ns.api::<PersistentVolumeClaim>();
    let late = claims.get("late").await.unwrap();
    assert_eq!(late.annotations().get(SELECTED), None);

    let fresh = claim(&ns, "fresh", &immediate, "50Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "fresh", "Bound", is_bound).await;
    let placed = volumes
        .get(&format!("pvc-{}", fresh.uid().unwrap()))
        .await
        .unwrap();
    assert_eq!(placed.spec.node.as_deref(), Some(LIVE));

    stack.restart_agent(SILENT, "4Gi");
    wait(&nodes, SILENT, "ready again", |n: Option<&StorageNode>| {
        n.is_some() && ready_condition(n).is_none()
    })
    .await;
    wait(&claims, "stuck", "Bound", is_bound).await;
}

/// A Node deleted from the cluster takes its StorageNode (owned by the
/// Node) and its capacity with it; its volume's PV is told, `stowage
/// release-node` refuses while the Node exists and releases afterwards,
/// and deleting the claim then removes the PV and the Volume.
#[tokio::test]
async fn a_deleted_node_takes_its_storage_node_and_its_volumes_can_be_released() {
    const KEEP: &str = "keep";
    const DOOMED: &str = "doomed";
    let mut stack =
        MultiNode::start("deleted-node", &[(KEEP, "1Gi"), (DOOMED, "1Gi")], true, &[]).await;
    let ns = TestNamespace::new_with(stack.client.clone(), "deleted-node").await;
    let class = format!("{}-wffc", ns.name);
    storage_class(&ns.client, &class, "WaitForFirstConsumer", "Delete", &[]).await;
    stack
        .wait_capacities(&class, &[(DOOMED, "1Gi"), (KEEP, "1Gi")])
        .await;
    let storage_nodes = Api::<StorageNode>::all(ns.client.clone());
    let node = wait(
        &storage_nodes,
        DOOMED,
        "owned by its Node",
        |n: Option<&StorageNode>| {
            n.is_some_and(|n| {
                n.owner_references()
                    .iter()
                    .any(|o| o.kind == "Node" && o.name == DOOMED)
            })
        },
    )
    .await
    .unwrap();
    assert_eq!(node.owner_references().len(), 1);

    let data = placed_claim(&ns, "data", &class, DOOMED).await;
    let name = format!("pvc-{}", data.uid().unwrap());
    let claims = ns.api::<PersistentVolumeClaim>();
    wait(&claims, "data", "Bound", is_bound).await;

    let (ok, out) = release_node(&stack, DOOMED);
    assert!(!ok && out.contains("still exists"), "{out}");

    stack.stop_agent(DOOMED);
    Api::<Node>::all(ns.client.clone())
        .delete(DOOMED, &DeleteParams::default())
        .await
        .unwrap();
    wait(&storage_nodes, DOOMED, "collected with its Node", gone).await;
    stack.wait_capacities(&class, &[(KEEP, "1Gi")]).await;
    let note = wait_cluster_event(&ns.client, &name, "NodeDeleted").await;
    assert!(note.contains("stowage release-node doomed"), "{note}");

    let (ok, out) = release_node(&stack, DOOMED);
    assert!(
        ok && out.contains(&format!("volume {name} released")),
        "{out}"
    );
    let volumes = Api::<Volume>::all(ns.client.clone());
    let released = volumes.get(&name).await.unwrap();
    assert_eq!(
        released
            .annotations()
            .get("stowage.dev/release-node")
            .map(String::as_str),
        Some(DOOMED)
    );
    // Nothing happens to a released volume while its claim is there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(volumes.get_opt(&name).await.unwrap().is_some());

    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(&volumes, &name, "deleted", gone).await;
    wait(
        &Api::<PersistentVolume>::all(ns.client.clone()),
        &name,
        "deleted",
        gone,
    )
    .await;
}

/// `stowage release-node NODE` against the stack's cluster: (success,
/// stdout and stderr).
fn release_node(stack: &MultiNode, node: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .env("KUBECONFIG", &*stack.cluster)
        .args(["release-node", node])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
