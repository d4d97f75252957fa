//! The snapshot job's crash points: the controller dies right after a
//! driver's CreateSnapshot succeeded (before the content's status records
//! the handle), and right after its DeleteSnapshot succeeded (before
//! snapshot-controller's finalizer comes off). The driver is `stowage csi`
//! on a unix socket, so the snapshots it holds are files in its data
//! directory: exactly one is cut, and none is left.

use std::path::Path;

use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::snapshot_api::{CONTENT_FINALIZER, VolumeSnapshot, VolumeSnapshotContent};

use crate::crash::Armed;
use crate::crash_proxy::{SocketDriver, proxy_controller};
use crate::fixtures::{TIMEOUT, claim, gone, is_bound, wait};
use crate::harness::{TestNamespace, bare_cluster, client_for_path};
use crate::proxy_driver::{SOCKET_DRIVER, immediate_class};
use crate::proxy_snapshot::{content_of, ready_snapshot, request_snapshot, snapshot_class};
use crate::snapshotter;

/// The snapshot images the driver holds.
fn snapshot_files(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("snapshots"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".img"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn snapshots_killed_after_create_or_delete_snapshot_leak_nothing() {
    let kubeconfig = bare_cluster("crash-snapshot", &[]);
    let client = client_for_path(&kubeconfig).await;
    let SocketDriver {
        dir,
        socket,
        data,
        server,
    } = SocketDriver::start(&client, "crash-snapshot").await;
    let _snapshot_controller =
        snapshotter::start(&client, &kubeconfig, "crash-snapshot-snapshot-controller").await;
    let ns = TestNamespace::new_with(client.clone(), "crash-snapshot").await;
    let class = format!("{}-socket", ns.name);
    immediate_class(&client, &class, SOCKET_DRIVER, json!({})).await;
    let snapshot_class_name = format!("{}-delete", ns.name);
    snapshot_class(&client, &snapshot_class_name, SOCKET_DRIVER, "Delete").await;

    let ctl = proxy_controller(&kubeconfig, &socket, &[]);
    claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"]).await;
    wait(
        &ns.api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(),
        "data",
        "Bound",
        is_bound,
    )
    .await;
    ctl.stop();

    let created = Armed::new("controller-after-create-snapshot");
    let mut ctl = proxy_controller(&kubeconfig, &socket, &created.env());
    request_snapshot(&ns, "snap", "data", &snapshot_class_name).await;
    let created_log = created.assert_fired(&mut ctl).await;
    let uid = ns
        .api::<VolumeSnapshot>()
        .get("snap")
        .await
        .unwrap()
        .uid()
        .unwrap();
    let cut = format!("snapshot-{uid}.img");
    assert_eq!(
        snapshot_files(&data),
        std::slice::from_ref(&cut),
        "the driver cut nothing before the crash"
    );
    let content = content_of(&ns, "snap").await;
    assert_eq!(
        content
            .status
            .as_ref()
            .and_then(|s| s.snapshot_handle.clone()),
        None,
        "the crash came before the handle was recorded"
    );

    // The restarted controller asks for the same name: the same snapshot,
    // not a second one.
    let deleted = Armed::new("controller-after-delete-snapshot");
    let mut ctl = proxy_controller(&kubeconfig, &socket, &deleted.env());
    let (_, content) = ready_snapshot(&ns, "snap").await;
    assert_eq!(
        content
            .status
            .as_ref()
            .and_then(|s| s.snapshot_handle.clone()),
        Some(format!("snapshot-{uid}"))
    );
    assert_eq!(snapshot_files(&data), [cut]);

    ns.api::<VolumeSnapshot>()
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    let deleted_log = deleted.assert_fired(&mut ctl).await;
    assert!(
        snapshot_files(&data).is_empty(),
        "DeleteSnapshot did not reach the driver"
    );
    let contents = Api::<VolumeSnapshotContent>::all(client.clone());
    let held = contents.get(&content.name_any()).await.unwrap();
    assert!(
        held.finalizers().iter().any(|f| f == CONTENT_FINALIZER),
        "the crash came before the finalizer went: {held:?}"
    );

    let ctl = proxy_controller(&kubeconfig, &socket, &[]);
    both_gone_after_restart(&ns, &content.name_any(), "snap").await;
    assert!(snapshot_files(&data).is_empty());
    created_log.assert_kept();
    deleted_log.assert_kept();
    ctl.stop();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A content and its VolumeSnapshot, both gone once a restarted
/// controller has finished what the crash cut short.
pub async fn both_gone_after_restart(ns: &TestNamespace, content: &str, snapshot: &str) {
    let contents = Api::<VolumeSnapshotContent>::all(ns.client.clone());
    tokio::time::timeout(TIMEOUT, async {
        wait(&contents, content, "deleted after the restart", gone).await;
        let snapshots = ns.api::<VolumeSnapshot>();
        wait(&snapshots, snapshot, "deleted after the restart", gone).await;
    })
    .await
    .unwrap();
}
