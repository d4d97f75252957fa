//! The scheduler never leaves a pod on a node that cannot hold its volume:
//! with CSIStorageCapacity published (CSIDriver `storageCapacity: true`)
//! kube-scheduler picks a node with room on the first try; without it,
//! stowage gives the claim back (removes `volume.kubernetes.io/selected-node`)
//! and the scheduler picks again.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use stowage::crd::Volume;

use crate::fixtures::{claim, events, is_bound, storage_class, wait, wait_for_stowage_event};
use crate::harness::TestNamespace;
use crate::multi_node::{MultiNode, consumer, hold, scheduled_node};

const FULL: &str = "cap-full";
const ROOMY: &str = "cap-roomy";
const NODES: [(&str, &str); 2] = [(FULL, "200Mi"), (ROOMY, "2Gi")];
const SELECTED: &str = "volume.kubernetes.io/selected-node";

fn selected(claim: &PersistentVolumeClaim) -> Option<String> {
    claim.annotations().get(SELECTED).cloned()
}

async fn volume_node(ns: &TestNamespace, claim: &PersistentVolumeClaim) -> Option<String> {
    let name = format!("pvc-{}", claim.uid().unwrap());
    Api::<Volume>::all(ns.client.clone())
        .get(&name)
        .await
        .unwrap()
        .spec
        .node
}

/// The pod prefers the full node, which cannot hold its 500Mi claim: with
/// capacity published the scheduler never picks it, and the claim binds on
/// the other node without ever being given back. The published figures
/// follow the volume, and go with the class.
#[tokio::test]
async fn with_capacity_published_a_pod_goes_where_its_volume_fits_on_the_first_try() {
    let stack = MultiNode::start(
        "capacity-on",
        &NODES,
        true,
        &["--capacity-poll-interval", "5s"],
    )
    .await;
    let ns = TestNamespace::new_with(stack.client.clone(), "capacity-on").await;
    let class = format!("{}-wffc", ns.name);
    storage_class(&ns.client, &class, "WaitForFirstConsumer", "Delete", &[]).await;
    // What a new ext4 volume can get on each node.
    stack
        .wait_capacities(&class, &[(FULL, "200Mi"), (ROOMY, "2Gi")])
        .await;

    claim(&ns, "data", &class, "500Mi", &["ReadWriteOnce"]).await;
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &consumer("app", "data", Some(FULL)))
        .await
        .unwrap();
    assert_eq!(scheduled_node(&pods, "app").await, ROOMY);
    let claims = ns.api::<PersistentVolumeClaim>();
    let bound = wait(&claims, "data", "Bound", is_bound).await.unwrap();
    assert_eq!(selected(&bound).as_deref(), Some(ROOMY));
    assert_eq!(volume_node(&ns, &bound).await.as_deref(), Some(ROOMY));
    let reasons: Vec<_> = events(&ns, "data")
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(
        !reasons
            .iter()
            .any(|r| r == "Rescheduling" || r == "ProvisioningFailed"),
        "the scheduler's first choice failed: {reasons:?}"
    );
    // 2Gi less the 500Mi promised.
    stack
        .wait_capacities(&class, &[(FULL, "200Mi"), (ROOMY, "1548Mi")])
        .await;

    Api::<StorageClass>::all(ns.client.clone())
        .delete(&class, &DeleteParams::default())
        .await
        .unwrap();
    stack.wait_capacities(&class, &[]).await;
}

/// Without capacity tracking the scheduler cannot know: the pod's first
/// placement (the full node, the only one open then) is given back with a
/// Rescheduling event, and once only the other node is open, the claim
/// binds there; no volume is ever made on the full node.
#[tokio::test]
async fn without_capacity_tracking_a_full_node_gives_the_claim_back_to_the_scheduler() {
    let stack = MultiNode::start("capacity-off", &NODES, false, &[]).await;
    let ns = TestNamespace::new_with(stack.client.clone(), "capacity-off").await;
    let class = format!("{}-wffc", ns.name);
    storage_class(&ns.client, &class, "WaitForFirstConsumer", "Delete", &[]).await;

    hold(&stack.client, ROOMY, true).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    let made = claim(&ns, "data", &class, "500Mi", &["ReadWriteOnce"]).await;
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &consumer("app", "data", None))
        .await
        .unwrap();
    let note = wait_for_stowage_event(&ns, "data", "Rescheduling").await;
    assert!(
        note.contains(FULL) && note.contains(SELECTED) && note.contains("cannot hold"),
        "{note}"
    );
    // Only the other node is open now: the scheduler's next pick, once
    // the claim is given back, cannot be the full node again (without
    // capacity it has no reason to avoid it, and may pick it for ever).
    hold(&stack.client, FULL, true).await;
    hold(&stack.client, ROOMY, false).await;

    let bound = wait(&claims, "data", "Bound", is_bound).await.unwrap();
    assert_eq!(selected(&bound).as_deref(), Some(ROOMY));
    assert_eq!(volume_node(&ns, &bound).await.as_deref(), Some(ROOMY));
    assert_eq!(scheduled_node(&pods, "app").await, ROOMY);
    assert_eq!(bound.uid(), made.uid());
    assert!(
        stack.capacities().await.is_empty(),
        "published with --enable-capacity=false"
    );
}
