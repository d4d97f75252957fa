//! The snapshot job's crash points on the local path: the controller dies
//! right after it recorded a snapshot Volume (before the content's status
//! names it), and right after that Volume was confirmed gone (before
//! snapshot-controller's finalizer comes off). The node agent keeps
//! running; its snapshot images are files in its data directory: exactly
//! one is cut, the restarted controller takes the same Volume, and none is
//! left at the end.

use std::path::Path;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use stowage::crd::Volume;
use stowage::snapshot_api::{CONTENT_FINALIZER, VolumeSnapshot, VolumeSnapshotContent};

use crate::crash::Armed;
use crate::crash_snapshot::both_gone_after_restart;
use crate::fixtures::{claim, is_bound, storage_class, wait};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, unique_name, wait_for_storage_nodes,
};
use crate::proxy_snapshot::{content_of, ready_snapshot, request_snapshot, snapshot_class};
use crate::snapshotter;

const NODE: &str = "crash-local-snapshot-node";

/// The snapshot Volumes' images the agent holds.
fn snapshot_images(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("volumes"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("snapshot-") && n.ends_with(".img"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn controller(kubeconfig: &Path, env: &[(&str, &str)]) -> Process {
    let args = [
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    Process::start(kubeconfig, &args, env, "crash-local-snapshot-controller")
}

#[tokio::test]
async fn local_snapshots_killed_after_recording_or_releasing_leak_nothing() {
    let kubeconfig = bare_cluster("crash-local-snapshot", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let data = std::env::temp_dir().join(unique_name("stowage-crash-local-snapshot"));
    let agent = Process::node(&kubeconfig, NODE, &data, "crash-local-snapshot-node");
    wait_for_storage_nodes(&kubeconfig, &[NODE]);
    let _snapshot_controller = snapshotter::start(
        &client,
        &kubeconfig,
        "crash-local-snapshot-snapshot-controller",
    )
    .await;
    let ns = TestNamespace::new_with(client.clone(), "crash-local-snapshot").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let snapshots_class = format!("{}-snap", ns.name);
    snapshot_class(&client, &snapshots_class, "local.stowage.dev", "Delete").await;
    let ctl = controller(&kubeconfig, &[]);
    claim(&ns, "source", &class, "32Mi", &["ReadWriteOnce"]).await;
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "source",
        "Bound",
        is_bound,
    )
    .await;
    ctl.stop();

    let recorded = Armed::new("controller-after-create-snapshot");
    let mut ctl = controller(&kubeconfig, &recorded.env());
    request_snapshot(&ns, "snap", "source", &snapshots_class).await;
    let recorded_log = recorded.assert_fired(&mut ctl).await;
    let uid = ns
        .api::<VolumeSnapshot>()
        .get("snap")
        .await
        .unwrap()
        .uid()
        .unwrap();
    let handle = format!("snapshot-{uid}");
    let volumes = Api::<Volume>::all(client.clone());
    assert!(
        volumes.get_opt(&handle).await.unwrap().is_some(),
        "the snapshot Volume was recorded before the crash"
    );
    let content = content_of(&ns, "snap").await;
    assert_eq!(
        content
            .status
            .as_ref()
            .and_then(|s| s.snapshot_handle.clone()),
        None,
        "the crash came before the content named it"
    );

    // The restarted controller finds the Volume it recorded: the same
    // snapshot, not a second one.
    let released = Armed::new("controller-after-delete-snapshot");
    let mut ctl = controller(&kubeconfig, &released.env());
    let (_, content) = ready_snapshot(&ns, "snap").await;
    recorded_log.assert_kept();
    assert_eq!(
        content
            .status
            .as_ref()
            .and_then(|s| s.snapshot_handle.clone()),
        Some(handle.clone())
    );
    let cut = format!("{handle}.img");
    assert_eq!(snapshot_images(&data), std::slice::from_ref(&cut));
    let snapshot_volumes = volumes
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|v| v.name_any().starts_with("snapshot-"))
        .count();
    assert_eq!(snapshot_volumes, 1, "one snapshot Volume");

    ns.api::<VolumeSnapshot>()
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    let released_log = released.assert_fired(&mut ctl).await;
    assert!(
        volumes.get_opt(&handle).await.unwrap().is_none(),
        "the snapshot Volume went before the crash"
    );
    assert!(snapshot_images(&data).is_empty(), "its image went with it");
    let contents = Api::<VolumeSnapshotContent>::all(client.clone());
    let held = contents.get(&content.name_any()).await.unwrap();
    assert!(
        held.finalizers().iter().any(|f| f == CONTENT_FINALIZER),
        "the crash came before the finalizer went: {held:?}"
    );

    let ctl = controller(&kubeconfig, &[]);
    both_gone_after_restart(&ns, &content.name_any(), "snap").await;
    released_log.assert_kept();
    assert!(snapshot_images(&data).is_empty());
    ctl.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
