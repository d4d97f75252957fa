//! external-snapshotter's part of a cluster with snapshots: its
//! VolumeSnapshot CRDs and its snapshot-controller (the add-on that binds
//! VolumeSnapshots to contents), built by scripts/build-snapshotter.sh at
//! the release tests/snapshotter/go.mod pins; and Gateway API's
//! ReferenceGrant CRD, pinned there too.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::{conditions, wait::await_condition};
use kube::{Api, Client};

use crate::harness::{built_by, repo_root};

/// snapshot-controller, killed when dropped.
pub struct SnapshotController {
    child: Child,
}

impl Drop for SnapshotController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs the VolumeSnapshot CRDs (once established) and starts
/// snapshot-controller against `kubeconfig`, its log under
/// target/test-logs/.
pub async fn start(client: &Client, kubeconfig: &Path, log_name: &str) -> SnapshotController {
    let dir = built_by("scripts/build-snapshotter.sh");
    for kind in [
        "volumesnapshotclasses",
        "volumesnapshotcontents",
        "volumesnapshots",
    ] {
        install_crd(client, &dir, kind, "snapshot.storage.k8s.io").await;
    }
    let log = repo_root()
        .join("target/test-logs")
        .join(format!("{log_name}-{}.log", std::process::id()));
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let log = std::fs::File::create(&log).unwrap();
    let child = Command::new(dir.join("bin/snapshot-controller"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--leader-election=false")
        // No VolumeGroupSnapshot CRDs here: without this it waits 30 s
        // for them before it starts.
        .arg("--feature-gates=CSIVolumeGroupSnapshot=false")
        .arg("--v=4")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting snapshot-controller");
    SnapshotController { child }
}

/// Installs Gateway API's ReferenceGrant CRD (the release
/// tests/snapshotter/go.mod pins), once established.
pub async fn install_reference_grant_crd(client: &Client) {
    let dir = built_by("scripts/build-snapshotter.sh");
    install_crd(client, &dir, "referencegrants", "gateway.networking.k8s.io").await;
}

/// Applies `crd/<plural>.yaml` of `dir` and waits until it is established.
async fn install_crd(client: &Client, dir: &Path, plural: &str, group: &str) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let path = dir.join("crd").join(format!("{plural}.yaml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let name = format!("{plural}.{group}");
    crds.patch(
        &name,
        &PatchParams::apply("stowage-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
    let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established after 30s"))
        .unwrap();
}
