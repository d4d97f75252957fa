//! Snapshots of `local.stowage.dev` volumes through VolumeSnapshots (the
//! real snapshot-controller beside stowage): the snapshot is a Volume on
//! the source's node that its agent cuts; restores and clones are made on
//! that node from it. What each image holds is read with debugfs: the
//! snapshot has what was written before it and not after. Block claims,
//! which have no filesystem, are compared byte for byte.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;
use stowage::snapshot_api::{VolumeSnapshot, VolumeSnapshotContent};

use crate::crash::{read_from_image, write_into_image};
use crate::fixtures::{claim, gone, is_bound, storage_class, wait};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, unique_name, wait_for_storage_nodes,
};
use crate::proxy_snapshot::{claim_from, snapshot, snapshot_class};
use crate::service_accounts::controller_account;
use crate::snapshotter;

const NODE: &str = "snapshot-local-node";

async fn bound_volume(ns: &TestNamespace, claim: &str) -> String {
    let bound = wait(&ns.api::<PersistentVolumeClaim>(), claim, "Bound", is_bound)
        .await
        .unwrap();
    bound.spec.unwrap().volume_name.unwrap()
}

#[tokio::test]
async fn local_volumes_snapshot_restore_and_clone_on_their_node() {
    let kubeconfig = bare_cluster("local-snapshot", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let data = std::env::temp_dir().join(unique_name("stowage-local-snapshot"));
    let agent = Process::node(&kubeconfig, NODE, &data, "local-snapshot-node");
    wait_for_storage_nodes(&kubeconfig, &[NODE]);
    let _snapshot_controller =
        snapshotter::start(&client, &kubeconfig, "local-snapshot-snapshot-controller").await;
    // As deployed: the manifests' RBAC, which this flow must find enough.
    let as_controller = controller_account(&kubeconfig, &client).await;
    let controller = Process::controller(&as_controller, "local-snapshot-controller");
    let ns = TestNamespace::new_with(client.clone(), "local-snapshot").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let snapshots_class = format!("{}-snap", ns.name);
    snapshot_class(&client, &snapshots_class, "local.stowage.dev", "Delete").await;
    let image = |volume: &str| data.join("volumes").join(format!("{volume}.img"));

    claim(&ns, "source", &class, "64Mi", &["ReadWriteOnce"]).await;
    let source = bound_volume(&ns, "source").await;
    write_into_image(&image(&source), "before", "one");

    let (snap, content) = snapshot(&ns, "snap", "source", &snapshots_class).await;
    let content_name = content.name_any();
    let handle = content.status.unwrap().snapshot_handle.unwrap();
    assert_eq!(handle, format!("snapshot-{}", snap.uid().unwrap()));
    let volumes = Api::<Volume>::all(client.clone());
    let cut = volumes.get(&handle).await.unwrap();
    assert_eq!(cut.spec.node.as_deref(), Some(NODE));
    write_into_image(&image(&source), "after", "two");

    let from_snapshot =
        json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "snap" });
    claim_from(&ns, "restored", &class, "64Mi", from_snapshot).await;
    let restored = bound_volume(&ns, "restored").await;
    assert_eq!(read_from_image(&image(&restored), "before"), "one");
    assert_eq!(
        read_from_image(&image(&restored), "after"),
        "",
        "written after the snapshot"
    );
    assert_eq!(
        volumes.get(&restored).await.unwrap().spec.node.as_deref(),
        Some(NODE)
    );

    let from_claim = json!({ "kind": "PersistentVolumeClaim", "name": "source" });
    claim_from(&ns, "cloned", &class, "64Mi", from_claim).await;
    let cloned = bound_volume(&ns, "cloned").await;
    assert_eq!(read_from_image(&image(&cloned), "before"), "one");
    assert_eq!(read_from_image(&image(&cloned), "after"), "two");

    // Delete policy: the snapshot Volume and its image go with the
    // VolumeSnapshot.
    ns.api::<VolumeSnapshot>()
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    wait(&volumes, &handle, "gone", gone).await;
    assert!(!image(&handle).exists(), "the snapshot's image is left");
    // The content lets go only once the API server confirms the Volume
    // gone (a read the controller's own RBAC must allow).
    let contents = Api::<VolumeSnapshotContent>::all(client.clone());
    wait(&contents, &content_name, "gone", gone).await;
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// `len` bytes of a raw image at `offset`.
fn raw_at(image: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn write_raw(image: &std::path::Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

/// A Block claim has no filesystem to freeze or read: the snapshot, its
/// restore and a clone are compared byte for byte.
#[tokio::test]
async fn block_volumes_snapshot_restore_and_clone_byte_for_byte() {
    const BLOCK_NODE: &str = "snapshot-block-node";
    const AT: u64 = 5 << 20;
    let kubeconfig = bare_cluster("local-snapshot-block", &[BLOCK_NODE]);
    let client = client_for_path(&kubeconfig).await;
    let data = std::env::temp_dir().join(unique_name("stowage-block-snapshot"));
    let agent = Process::node(&kubeconfig, BLOCK_NODE, &data, "local-snapshot-block-node");
    wait_for_storage_nodes(&kubeconfig, &[BLOCK_NODE]);
    let _snapshot_controller = snapshotter::start(
        &client,
        &kubeconfig,
        "local-snapshot-block-snapshot-controller",
    )
    .await;
    let controller = Process::controller(&kubeconfig, "local-snapshot-block-controller");
    let ns = TestNamespace::new_with(client.clone(), "local-snapshot-block").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let snapshots_class = format!("{}-snap", ns.name);
    snapshot_class(&client, &snapshots_class, "local.stowage.dev", "Delete").await;
    let image = |volume: &str| data.join("volumes").join(format!("{volume}.img"));
    let block_claim = |name: &str, source: Option<serde_json::Value>| -> PersistentVolumeClaim {
        let mut claim = json!({
            "metadata": { "name": name },
            "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"],
                      "volumeMode": "Block", "resources": { "requests": { "storage": "32Mi" } } },
        });
        if let Some(source) = source {
            claim["spec"]["dataSource"] = source;
        }
        serde_json::from_value(claim).unwrap()
    };
    let claims = ns.api::<PersistentVolumeClaim>();
    let create = |claim: PersistentVolumeClaim| {
        let claims = claims.clone();
        async move { claims.create(&Default::default(), &claim).await.unwrap() }
    };

    create(block_claim("raw", None)).await;
    let source = bound_volume(&ns, "raw").await;
    write_raw(&image(&source), AT, b"before the cut");
    let (_, content) = snapshot(&ns, "raw-snap", "raw", &snapshots_class).await;
    assert!(content.status.unwrap().ready_to_use.unwrap_or(false));
    write_raw(&image(&source), AT, b"after the cut!");

    let from_snapshot = json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "raw-snap" });
    create(block_claim("raw-restored", Some(from_snapshot))).await;
    let restored = bound_volume(&ns, "raw-restored").await;
    assert_eq!(raw_at(&image(&restored), AT, 14), b"before the cut");
    let from_claim = json!({ "kind": "PersistentVolumeClaim", "name": "raw" });
    create(block_claim("raw-cloned", Some(from_claim))).await;
    let cloned = bound_volume(&ns, "raw-cloned").await;
    assert_eq!(raw_at(&image(&cloned), AT, 14), b"after the cut!");
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
