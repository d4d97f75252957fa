//! `kubectl apply -f manifests/` is what users run: the API server must
//! accept every object in it.

use std::process::Command;

use crate::harness::{kubeconfig, repo_root, upstream_binary};

#[test]
fn api_server_accepts_every_manifest() {
    let manifests = repo_root().join("manifests");
    // A dry run creates nothing, so the namespaced objects need their
    // namespace for real.
    let kubectl = upstream_binary("kubectl");
    let ns = Command::new(&kubectl)
        .env("KUBECONFIG", kubeconfig())
        .args(["apply", "--server-side", "-f"])
        .arg(manifests.join("00-namespace.yaml"))
        .output()
        .expect("running kubectl");
    assert!(
        ns.status.success(),
        "{}",
        String::from_utf8_lossy(&ns.stderr)
    );
    let out = Command::new(&kubectl)
        .env("KUBECONFIG", kubeconfig())
        .args(["apply", "--server-side", "--dry-run=server", "-f"])
        .arg(&manifests)
        .output()
        .expect("running kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for object in [
        "namespace/stowage-system",
        "customresourcedefinition.apiextensions.k8s.io/volumes.stowage.dev",
        "customresourcedefinition.apiextensions.k8s.io/storagenodes.stowage.dev",
        "deployment.apps/stowage-controller",
        "daemonset.apps/stowage-node",
        "csidriver.storage.k8s.io/local.stowage.dev",
        "clusterrole.rbac.authorization.k8s.io/stowage-node",
    ] {
        assert!(stdout.contains(object), "{object} not applied:\n{stdout}");
    }
}
