//! The agent's `/healthz` (alive) and `/readyz` (acting on this node).

use std::path::PathBuf;
use std::sync::Mutex;

use crate::host::mounts;
use crate::host::statvfs::statvfs;
use crate::telemetry::Health;

/// Liveness: the socket kubelet uses is there and the data directory answers
/// (what CSI Probe would check).
pub(super) struct NodeHealth {
    pub socket: PathBuf,
    pub data_dir: PathBuf,
}

impl Health for NodeHealth {
    fn healthy(&self) -> Result<(), String> {
        if !self.socket.exists() {
            return Err(format!("socket {} is gone", self.socket.display()));
        }
        statvfs(&self.data_dir)
            .map_err(|e| format!("data directory {}: {e}", self.data_dir.display()))?;
        Ok(())
    }
}

/// Readiness: this agent acts on the node (holds the data directory, serves
/// kubelet's socket), and mounts it makes reach kubelet and the pods.
pub(super) struct NodeReadiness {
    pub kubelet_dir: PathBuf,
    /// Why the agent does not act on the node, or None while it does.
    pub idle: Mutex<Option<String>>,
}

impl NodeReadiness {
    pub fn idle(&self, why: &str) {
        *self.idle.lock().expect("readiness poisoned") = Some(why.to_string());
    }

    pub fn acting(&self) {
        *self.idle.lock().expect("readiness poisoned") = None;
    }

    pub fn kubelet_dir_problem(&self) -> Result<(), String> {
        let dir = &self.kubelet_dir;
        if !dir.is_dir() {
            return Err(format!(
                "kubelet directory {} is missing: mount the node's kubelet root there \
                 (hostPath /var/lib/kubelet), or point --kubelet-dir at it",
                dir.display()
            ));
        }
        let mounts = mounts::current().map_err(|e| format!("reading mountinfo: {e}"))?;
        match mounts::holding(&mounts, dir) {
            Some(m) if m.shared => Ok(()),
            Some(m) => Err(format!(
                "kubelet directory {} (on mount {}) is not a shared mount, so volumes \
                 mounted here would never reach kubelet or the pods: mount it with \
                 mountPropagation: Bidirectional, and make the host path shared \
                 (kubelet does so for its root; else `mount --make-rshared`)",
                dir.display(),
                m.mount_point.display()
            )),
            None => Err(format!("no mount holds {}", dir.display())),
        }
    }
}

impl Health for NodeReadiness {
    fn healthy(&self) -> Result<(), String> {
        let idle = self.idle.lock().expect("readiness poisoned").clone();
        match (idle, self.kubelet_dir_problem()) {
            (None, kubelet) => kubelet,
            (Some(why), Ok(())) => Err(format!("not acting on this node: {why}")),
            (Some(why), Err(kubelet)) => Err(format!("not acting on this node: {why}; {kubelet}")),
        }
    }
}
