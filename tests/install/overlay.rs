//! The install as a user runs it: stowage's image imported into the node's
//! containerd, then `kubectl apply -k` of a kustomization that takes
//! `manifests/` as its base. The overlay changes only what this local
//! cluster needs: where its API server is for pods, where its kubelet keeps
//! its root, and that images are never pulled (there is no registry).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{RealNode, repo_root, upstream_binary};

pub const IMAGE: &str = "stowage.dev/stowage";

/// A cluster's settings, from the `env` file scripts/cluster.sh writes.
pub struct ClusterEnv {
    pub api_port: String,
    pub pod_gateway: String,
    pub containerd_socket: PathBuf,
    pub data_dir: PathBuf,
}

impl ClusterEnv {
    pub fn read(node: &RealNode) -> Self {
        let dir = node.kubeconfig.parent().unwrap();
        let text = std::fs::read_to_string(dir.join("env")).expect("reading the cluster's env");
        let get = |key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
                .unwrap_or_else(|| panic!("{key} missing from {}/env", dir.display()))
        };
        ClusterEnv {
            api_port: get("STOWAGE_API_PORT"),
            pod_gateway: get("STOWAGE_POD_GATEWAY"),
            containerd_socket: get("STOWAGE_CONTAINERD_SOCKET").into(),
            data_dir: dir.join("node/stowage-data"),
        }
    }
}

/// Builds the image for `tag` (scripts/build-image.sh) and imports it into
/// the node's containerd, as `ctr images import` would on any node.
pub fn build_and_import(env: &ClusterEnv, tag: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/build-image.sh"))
        .arg(tag)
        .output()
        .expect("running scripts/build-image.sh");
    assert!(
        out.status.success(),
        "building the image failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive = repo_root().join(format!("target/image/stowage-{tag}.tar"));
    assert!(archive.is_file(), "{} missing", archive.display());
    run(Command::new("ctr")
        .arg("--address")
        .arg(&env.containerd_socket)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(&archive));
    archive
}

/// A kustomization directory on top of `manifests/`.
pub struct Overlay {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    env: ClusterEnv,
    kubelet_dir: PathBuf,
}

impl Overlay {
    pub fn new(node: &RealNode) -> Self {
        let dir = repo_root().join(format!("target/install-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Overlay {
            dir,
            kubeconfig: node.kubeconfig.clone(),
            kubectl: upstream_binary("kubectl"),
            env: ClusterEnv::read(node),
            kubelet_dir: node.kubelet_dir.clone(),
        }
    }

    pub fn env(&self) -> &ClusterEnv {
        &self.env
    }

    /// `kubectl apply -k` with `images: newTag` set to `tag`: the one knob
    /// users turn to upgrade.
    pub fn apply(&self, tag: &str) -> String {
        std::fs::write(self.dir.join("kustomization.yaml"), self.kustomization(tag)).unwrap();
        self.kubectl(&["apply", "-k", self.dir.to_str().unwrap()])
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        run(Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args))
    }

    fn kustomization(&self, tag: &str) -> String {
        let base = relative(&self.dir, &repo_root().join("manifests"));
        let env = format!(
            r#"
    - op: add
      path: /spec/template/spec/containers/0/env/-
      value: {{name: KUBERNETES_SERVICE_HOST, value: "{gw}"}}
    - op: add
      path: /spec/template/spec/containers/0/env/-
      value: {{name: KUBERNETES_SERVICE_PORT, value: "{port}"}}
    - op: add
      path: /spec/template/spec/containers/0/imagePullPolicy
      value: Never"#,
            gw = self.env.pod_gateway,
            port = self.env.api_port,
        );
        let (kubelet, data) = (self.kubelet_dir.display(), self.env.data_dir.display());
        format!(
            r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: {IMAGE}
    newTag: "{tag}"
patches:
  - target: {{kind: Deployment, name: stowage-controller}}
    patch: |-{env}
  - target: {{kind: DaemonSet, name: stowage-node}}
    patch: |-{env}
    - op: test
      path: /spec/template/spec/volumes/0/name
      value: kubelet
    - op: replace
      path: /spec/template/spec/volumes/0/hostPath/path
      value: {kubelet}
    - op: replace
      path: /spec/template/spec/containers/0/volumeMounts/0/mountPath
      value: {kubelet}
    - op: test
      path: /spec/template/spec/volumes/1/name
      value: data
    - op: replace
      path: /spec/template/spec/volumes/1/hostPath/path
      value: {data}
    - op: replace
      path: /spec/template/spec/containers/0/volumeMounts/1/mountPath
      value: {data}
    - op: test
      path: /spec/template/spec/containers/0/env/2/name
      value: STOWAGE_DATA_DIR
    - op: replace
      path: /spec/template/spec/containers/0/env/2/value
      value: {data}
    - op: test
      path: /spec/template/spec/containers/0/env/3/name
      value: KUBELET_DIR
    - op: replace
      path: /spec/template/spec/containers/0/env/3/value
      value: {kubelet}
"#
        )
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `to` relative to `from` (both absolute, under the repository).
fn relative(from: &Path, to: &Path) -> String {
    let root = repo_root();
    let up = from.strip_prefix(root).unwrap().components().count();
    let down = to.strip_prefix(root).unwrap();
    format!("{}{}", "../".repeat(up), down.display())
}

pub fn run(command: &mut Command) -> String {
    let out = command.output().expect("running a command");
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
