//! The controller as a process: leader election between replicas, claims
//! deleted mid-provisioning.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{claim, is_bound, storage_class, wait};
use crate::harness::{Process, TestNamespace, bare_cluster, client_for_path, unique_name};

/// The Volume is written but its node agent is down, so no data exists
/// yet; the claim is deleted. Once the agent is back, nothing is left.
#[tokio::test]
async fn claim_deleted_mid_provisioning_leaks_nothing() {
    let node = "inflight-node";
    let kubeconfig = bare_cluster("inflight", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "inflight").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let data = std::env::temp_dir().join(unique_name("stowage-inflight"));
    let data_arg = data.to_str().unwrap().to_string();
    let node_args = [
        "node",
        "--node-name",
        node,
        "--data-dir",
        &data_arg,
        "--capacity",
        "1Gi",
        "--metrics-addr",
        "127.0.0.1:0",
    ];

    // The agent must have reported its capacity once for the node to be chosen.
    let agent = Process::start(&kubeconfig, &node_args, &[], "inflight-node");
    let nodes = Api::<stowage::crd::StorageNode>::all(client.clone());
    wait(
        &nodes,
        node,
        "reported",
        |n: Option<&stowage::crd::StorageNode>| n.is_some_and(|n| n.status.is_some()),
    )
    .await;
    agent.stop();

    let controller = Process::controller(&kubeconfig, "inflight-controller");
    let uid = claim(&ns, "doomed", &class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let volume_name = format!("pvc-{uid}");
    let volumes = Api::<Volume>::all(client.clone());
    wait(&volumes, &volume_name, "written", |v: Option<&Volume>| {
        v.is_some()
    })
    .await;

    ns.api::<PersistentVolumeClaim>()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    // The Volume is marked for deletion at once, and waits for its node.
    wait(
        &volumes,
        &volume_name,
        "being deleted",
        |v: Option<&Volume>| v.is_some_and(|v| v.metadata.deletion_timestamp.is_some()),
    )
    .await;
    let agent = Process::start(&kubeconfig, &node_args, &[], "inflight-node");
    wait(&volumes, &volume_name, "deleted", |v: Option<&Volume>| {
        v.is_none()
    })
    .await;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&volume_name)
        .await
        .unwrap();
    assert!(pv.is_none(), "a PV was created for a deleted claim");
    let left: Vec<_> = std::fs::read_dir(data.join("volumes"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "data left behind: {left:?}");
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// Two replicas: the standby does nothing until the leader goes; a leader
/// that loses its Lease stops at once.
#[tokio::test]
async fn standby_takes_over_and_a_leader_that_loses_its_lease_stops() {
    let node = "leader-node";
    let kubeconfig = bare_cluster("leader", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "leader").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let data = std::env::temp_dir().join(unique_name("stowage-leader"));
    let data_arg = data.to_str().unwrap().to_string();
    let agent = Process::start(
        &kubeconfig,
        &[
            "node",
            "--node-name",
            node,
            "--data-dir",
            &data_arg,
            "--capacity",
            "1Gi",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
        "leader-node",
    );
    let replica = |id: &str| {
        Process::start(
            &kubeconfig,
            &[
                "controller",
                "--leader-election-namespace",
                &ns.name,
                "--identity",
                id,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[],
            &format!("leader-{id}"),
        )
    };
    let leases = ns.api::<Lease>();
    let holder_is = |id: &'static str| {
        move |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref()?.holder_identity.as_deref()) == Some(id)
        }
    };

    let first = replica("first");
    wait(
        &leases,
        "stowage-controller",
        "held by first",
        holder_is("first"),
    )
    .await;
    let mut second = replica("second");
    let claims = ns.api::<PersistentVolumeClaim>();
    claim(&ns, "one", &class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, "one", "Bound", is_bound).await;
    let lease = leases.get("stowage-controller").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("first"),
        "standby took the lease"
    );

    // Graceful stop releases the lease; the standby takes over and works.
    first.stop();
    wait(
        &leases,
        "stowage-controller",
        "held by second",
        holder_is("second"),
    )
    .await;
    claim(&ns, "two", &class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, "two", "Bound", is_bound).await;

    // Someone else takes the lease: the leader must stop acting.
    let steal = json!({ "spec": {
        "holderIdentity": "intruder",
        "leaseDurationSeconds": 3600,
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()),
    }});
    leases
        .patch(
            "stowage-controller",
            &PatchParams::default(),
            &Patch::Merge(&steal),
        )
        .await
        .unwrap();
    assert!(
        second.exited_within(Duration::from_secs(20)).await,
        "leader kept running after losing its lease"
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
