//! `layout: dir` volumes: a plain directory on the node, bind-mounted into
//! the pod, with no image, loop device or filesystem of its own.

use std::path::Path;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use stowage::crd::Volume;

use super::pod;
use crate::fixtures::{claim, gone, phase, storage_class, wait};
use crate::harness::TestNamespace;

pub async fn dir_volume_in_a_pod(ns: &TestNamespace, data: &Path) {
    let class = format!("{}-dir", ns.name);
    storage_class(
        &ns.client,
        &class,
        "WaitForFirstConsumer",
        "Delete",
        &[("layout", "dir")],
    )
    .await;
    let uid = claim(ns, "plain", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let pods = ns.api::<Pod>();
    pods.create(
        &PostParams::default(),
        &pod("dir-writer", "plain", "echo in-a-dir > /data/f && sync"),
    )
    .await
    .unwrap();
    let done = wait(&pods, "dir-writer", "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "the pod could not write to its dir volume: {:?}",
        done.and_then(|p| p.status)
    );

    // What the pod wrote is a file in the volume's directory on the node.
    let pv = format!("pvc-{uid}");
    let dir = data.join("volumes").join(&pv);
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    assert_eq!(
        std::fs::read_to_string(dir.join("f")).unwrap_or_default(),
        "in-a-dir\n",
        "the pod's file in {}",
        dir.display()
    );
    assert!(
        !data.join("volumes").join(format!("{pv}.img")).exists(),
        "a dir volume got an image"
    );

    pods.delete("dir-writer", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pods, "dir-writer", "deleted", gone).await;
    ns.api::<PersistentVolumeClaim>()
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    wait(&Api::<Volume>::all(ns.client.clone()), &pv, "deleted", gone).await;
    assert!(!dir.exists(), "{} left behind", dir.display());
}
