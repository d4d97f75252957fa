//! The install as a user runs it, through scripts/install-local.sh: the
//! image imported into the node's containerd, then `kubectl apply -k` of
//! an overlay whose base is `manifests/`.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{RealNode, build_image_command, repo_root, upstream_binary};

pub const IMAGE: &str = "stowage.dev/stowage";

/// The local cluster's install.
pub struct Overlay {
    cluster_dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl Overlay {
    pub fn new(node: &RealNode) -> Self {
        Overlay {
            cluster_dir: node.kubeconfig.parent().unwrap().to_path_buf(),
            kubeconfig: node.kubeconfig.clone(),
            kubectl: upstream_binary("kubectl"),
        }
    }

    /// Builds the image for `tag` (scripts/build-image.sh) and imports it
    /// into the node's containerd.
    pub fn build_and_import(&self, tag: &str) {
        run(&mut build_image_command(Some(tag)));
        self.script("import", tag);
    }

    /// `kubectl apply -k` with `images: newTag` set to `tag`: the one knob
    /// users turn to upgrade.
    pub fn apply(&self, tag: &str) -> String {
        self.script("apply", tag)
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        run(Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args))
    }

    fn script(&self, cmd: &str, tag: &str) -> String {
        run(Command::new("bash")
            .arg(repo_root().join("scripts/install-local.sh"))
            .args([cmd, tag])
            .env("STOWAGE_CLUSTER_DIR", &self.cluster_dir))
    }
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
