//! `kubectl apply -f manifests/` is what users run: the API server must
//! accept every object in it.

use std::process::Command;

use serde::Deserialize;

use crate::harness::{kubeconfig, repo_root, upstream_binary};

/// `kubectl apply --server-side --dry-run=server -f path`, after creating
/// the namespace for real (a dry run creates nothing, so the namespaced
/// objects need it). Returns what kubectl printed.
fn dry_run_apply(path: &std::path::Path) -> String {
    let kubectl = upstream_binary("kubectl");
    let ns = Command::new(&kubectl)
        .env("KUBECONFIG", kubeconfig())
        .args(["apply", "--server-side", "-f"])
        .arg(repo_root().join("manifests/00-namespace.yaml"))
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
        .arg(path)
        .output()
        .expect("running kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl apply failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn api_server_accepts_every_manifest() {
    let stdout = dry_run_apply(&repo_root().join("manifests"));
    for object in [
        "namespace/stowage-system",
        "customresourcedefinition.apiextensions.k8s.io/volumes.stowage.dev",
        "customresourcedefinition.apiextensions.k8s.io/storagenodes.stowage.dev",
        "deployment.apps/stowage-controller",
        "daemonset.apps/stowage-node",
        "csidriver.storage.k8s.io/local.stowage.dev",
        "clusterrole.rbac.authorization.k8s.io/stowage-node",
        "validatingadmissionpolicy.admissionregistration.k8s.io/stowage-node-authority",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/stowage-node-authority",
    ] {
        assert!(stdout.contains(object), "{object} not applied:\n{stdout}");
    }
    // Applied on its own, by those whose classes use Secrets.
    let optional = dry_run_apply(&repo_root().join("manifests/optional"));
    assert!(
        optional
            .contains("clusterrolebinding.rbac.authorization.k8s.io/stowage-controller-secrets"),
        "{optional}"
    );
    assert!(
        !stdout.contains("stowage-controller-secrets"),
        "`kubectl apply -f manifests/` must not grant reading Secrets:\n{stdout}"
    );
}

/// manifests/examples/ are what users copy to run stowage beside another
/// driver: the API server must accept them, and `stowage` must accept the
/// arguments they give it.
#[test]
fn api_server_and_stowage_accept_the_examples() {
    let examples = repo_root().join("manifests/examples");
    let stdout = dry_run_apply(&examples);
    assert!(
        stdout.contains("deployment.apps/csi-hostpath-controller"),
        "{stdout}"
    );

    let mut checked = 0;
    for file in std::fs::read_dir(&examples).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            let containers = &value["spec"]["template"]["spec"]["containers"];
            for container in containers.as_sequence().into_iter().flatten() {
                if !container["image"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("stowage.dev/stowage:")
                {
                    continue;
                }
                let args: Vec<String> = serde_yaml::from_value(container["args"].clone()).unwrap();
                // Parsing succeeds, so the run gets as far as the API server,
                // which this kubeconfig does not name.
                let run = Command::new(env!("CARGO_BIN_EXE_stowage"))
                    .args(&args)
                    .env("KUBECONFIG", "/nonexistent/kubeconfig")
                    .env_remove("KUBERNETES_SERVICE_HOST")
                    .output()
                    .expect("running stowage");
                // With --log-format=json the error is a log line on stdout.
                let output = format!(
                    "{}{}",
                    String::from_utf8_lossy(&run.stdout),
                    String::from_utf8_lossy(&run.stderr)
                );
                assert_ne!(run.status.code(), Some(2), "{args:?} rejected: {output}");
                assert!(
                    output.contains("cannot reach the Kubernetes API"),
                    "{args:?}: {output}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 0,
        "no stowage container found in manifests/examples"
    );
}

/// `kubectl apply -k manifests/` installs this release: every stowage image
/// the kustomization renders carries the crate's version, which is the tag
/// `just image` builds.
#[test]
fn the_kustomization_installs_this_release() {
    let out = Command::new(upstream_binary("kubectl"))
        .arg("kustomize")
        .arg(repo_root().join("manifests"))
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout);
    let images: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(images.len(), 2, "controller and node agent: {images:?}");
    let expected = format!("stowage.dev/stowage:{}", env!("CARGO_PKG_VERSION"));
    for image in images {
        assert_eq!(image, expected);
    }
    for kind in [
        "kind: CustomResourceDefinition",
        "kind: CSIDriver",
        "kind: DaemonSet",
    ] {
        assert!(
            rendered.contains(kind),
            "{kind} missing from the kustomization"
        );
    }
}
