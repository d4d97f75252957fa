//! The controller as a process: leader election between replicas, claims
//! deleted mid-provisioning.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::{Volume, VolumePhase};

use crate::crash::{self, Armed, assert_image, files_for};
use crate::fixtures::{claim, gone, is_bound, storage_class, wait};
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

/// The riskier window: the node agent HAS made the data and reported the
/// Volume Ready, and the controller dies just before it would create the
/// PV; the claim is deleted while it is down. The restarted controller
/// must never create the PV, and must delete the Volume so that the node
/// removes the image.
#[tokio::test]
async fn claim_deleted_between_ready_data_and_its_pv_leaks_nothing() {
    let node = "window-node";
    let kubeconfig = bare_cluster("window", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "window").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let data = std::env::temp_dir().join(unique_name("stowage-window"));
    let agent = Process::node(&kubeconfig, node, &data, "window-node");
    let armed = Armed::new("controller-before-pv-created");
    let mut controller = crash::controller(&kubeconfig, &armed.env(), "window-controller");
    let uid = claim(&ns, "doomed", &class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let crash_log = armed.assert_fired(&mut controller).await;
    let name = format!("pvc-{uid}");
    let volumes = Api::<Volume>::all(client.clone());
    let phase = volumes.get(&name).await.unwrap().status.map(|s| s.phase);
    assert_eq!(
        phase,
        Some(VolumePhase::Ready),
        "the node's report came first"
    );
    let image = data.join("volumes").join(format!("{name}.img"));
    assert_image(&image, 20 << 20, "ext4", "data before the PV");

    let pvs_seen = watch_for_pv(&client, &name).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    claims
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    wait(&claims, "doomed", "deleted", gone).await;
    let controller = crash::controller(&kubeconfig, &[], "window-controller");
    wait(&volumes, &name, "deleted", gone).await;
    // The Volume gone is the controller's doing: by now a PV it made would
    // have been seen.
    let seen = pvs_seen.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "a PV was created for a deleted claim: {seen:?}"
    );
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&name)
        .await
        .unwrap();
    assert!(pv.is_none(), "a PV outlived the claim: {pv:?}");
    assert!(
        controller
            .logged(
                "claim deleted before its PV existed",
                Duration::from_secs(10)
            )
            .await,
        "the restarted controller did not say why the Volume went"
    );
    let left = files_for(&data.join("volumes"), &uid);
    assert!(left.is_empty(), "data left behind: {left:?}");
    crash_log.assert_kept();
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// Every event about the PV `name` from now on (once the watch is open).
async fn watch_for_pv(client: &kube::Client, name: &str) -> Arc<Mutex<Vec<String>>> {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(Api::<PersistentVolume>::all(client.clone()), config).boxed();
    let (open, opened) = tokio::sync::oneshot::channel();
    let record = seen.clone();
    tokio::spawn(async move {
        let mut open = Some(open);
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::InitDone) => drop(open.take().map(|o| o.send(()))),
                Ok(Event::Init) => {}
                Ok(Event::Apply(pv) | Event::InitApply(pv)) => {
                    record.lock().unwrap().push(describe("written", &pv))
                }
                Ok(Event::Delete(pv)) => record.lock().unwrap().push(describe("deleted", &pv)),
                Err(e) => record.lock().unwrap().push(format!("watch failed: {e}")),
            }
        }
    });
    opened.await.expect("PV watch never opened");
    seen
}

fn describe(what: &str, pv: &PersistentVolume) -> String {
    let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
    format!("{what} {} (phase {phase:?})", pv.name_any())
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

    steal_lease_and_see_the_leader_stop(&leases, &mut second, &ns.name).await;
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// Someone else takes the lease: the leader must stop acting, and exit
/// non-zero saying why (README).
async fn steal_lease_and_see_the_leader_stop(
    leases: &Api<Lease>,
    leader: &mut Process,
    namespace: &str,
) {
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
    let code = leader.exit_code_within(Duration::from_secs(20)).await;
    assert_eq!(code, Some(1), "leader's exit (None: kept running)");
    let why = format!(
        "lost the leader lease {}/stowage-controller: another replica holds it now",
        namespace
    );
    assert!(leader.log().contains(&why), "log lacks '{why}'");
}
