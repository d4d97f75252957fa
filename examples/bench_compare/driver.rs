//! The CSI driver both stacks drive: Kubernetes' CSI mock driver by default,
//! csi-driver-host-path's `hostpathplugin` when a binary is given.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The one Node object the benchmark's pods run on (no kubelet behind it).
pub const NODE: &str = "bench-csi-node";

/// Which driver, and its binary.
pub enum Driver {
    /// `mock-csi-driver` (tests/csi-mock): volumes in memory, attach
    /// required, one node whose ID is the driver name and whose topology
    /// segment is fixed by the mock.
    Mock(PathBuf),
    /// `hostpathplugin --enable-attach`: volumes under a state directory.
    HostPath(PathBuf),
}

impl Driver {
    /// The mock from `STOWAGE_MOCK_DRIVER` (what the justfile recipe sets
    /// from scripts/build-mock-driver.sh), or hostpathplugin at `plugin`.
    pub fn from_args(plugin: Option<String>) -> anyhow::Result<Self> {
        let driver = match plugin {
            Some(path) => Driver::HostPath(PathBuf::from(path)),
            None => Driver::Mock(PathBuf::from(
                std::env::var("STOWAGE_MOCK_DRIVER").map_err(|_| {
                    anyhow::anyhow!(
                        "set STOWAGE_MOCK_DRIVER to scripts/build-mock-driver.sh's directory \
                         + /mock-csi-driver, or name a hostpathplugin binary"
                    )
                })?,
            )),
        };
        let binary = driver.binary();
        anyhow::ensure!(binary.exists(), "{} does not exist", binary.display());
        Ok(driver)
    }

    fn binary(&self) -> &Path {
        match self {
            Driver::Mock(b) | Driver::HostPath(b) => b,
        }
    }

    /// The CSI driver name: the StorageClass provisioner, the attacher.
    pub fn name(&self) -> &'static str {
        match self {
            // The mock's own default name (service.Name).
            Driver::Mock(_) => "io.kubernetes.storage.mock",
            Driver::HostPath(_) => "hostpath.csi.k8s.io",
        }
    }

    /// What the driver calls NODE (CSINode's nodeID): the mock publishes to
    /// one node ID only, its driver name.
    pub fn node_id(&self) -> &'static str {
        match self {
            Driver::Mock(_) => self.name(),
            Driver::HostPath(_) => NODE,
        }
    }

    /// The topology segment the driver reports for NODE, which the Node's
    /// labels and CSINode's topologyKeys must match.
    pub fn topology(&self) -> (&'static str, &'static str) {
        match self {
            Driver::Mock(_) => ("io.kubernetes.storage.mock/node", "some-mock-node"),
            Driver::HostPath(_) => ("topology.hostpath.csi/node", NODE),
        }
    }

    /// For the report's title.
    pub fn describe(&self) -> &'static str {
        match self {
            Driver::Mock(_) => "Kubernetes' CSI mock driver",
            Driver::HostPath(_) => "csi-driver-host-path",
        }
    }

    /// For log file names.
    pub fn short(&self) -> &'static str {
        match self {
            Driver::Mock(_) => "mock-csi-driver",
            Driver::HostPath(_) => "hostpathplugin",
        }
    }

    /// A fresh instance serving on `socket` (state, if any, under `work`),
    /// with attach and topology on; returns once the socket exists.
    pub async fn start(&self, socket: &Path, work: &Path, log: Stdio) -> anyhow::Result<Child> {
        let mut command = Command::new(self.binary());
        command.arg(format!("--endpoint=unix://{}", socket.display()));
        match self {
            // Attach is always on in the mock; topology is not.
            Driver::Mock(_) => command
                .arg(format!("--name={}", self.name()))
                .arg("--enable-topology"),
            Driver::HostPath(_) => command
                .arg(format!("--drivername={}", self.name()))
                .arg(format!("--nodeid={}", self.node_id()))
                .arg(format!("--statedir={}", work.join("state").display()))
                .arg("--enable-attach"),
        };
        // The mock logs each call to stderr, with the time.
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        for _ in 0..100 {
            if socket.exists() {
                return Ok(child);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("{} never created {}", self.short(), socket.display())
    }
}
