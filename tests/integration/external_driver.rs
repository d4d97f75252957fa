//! CSI drivers nobody here wrote, run as real processes on a unix socket for
//! the proxy tests: Kubernetes' own CSI mock driver (`mock-csi-driver`,
//! built by scripts/build-mock-driver.sh) and csi-driver-host-path's
//! `hostpathplugin` (a binary from `STOWAGE_HOSTPATHPLUGIN`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use stowage::proto::csi::v1 as csi;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::harness::{repo_root, unique_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock: volumes in
    /// memory, one node whose ID is the driver name.
    Mock,
    /// csi-driver-host-path with `--enable-attach`: volumes under a state
    /// directory.
    HostPath,
}

/// One driver: how to run it and what it calls its node and topology.
pub struct ExternalDriver {
    pub kind: Kind,
    binary: PathBuf,
    pub name: String,
    pub socket: PathBuf,
    dir: PathBuf,
    /// The driver's ID for the node (what its node plugin would put in
    /// CSINode).
    pub node_id: String,
    /// The topology segment the driver reports for its node.
    pub topology: (String, String),
    /// More command-line arguments for the driver.
    args: Vec<String>,
}

impl ExternalDriver {
    /// The Kubernetes CSI mock driver named `name`, with topology; its one
    /// node ID is `name`.
    pub fn mock(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name("stowage-csi-mock"));
        std::fs::create_dir_all(&dir).unwrap();
        ExternalDriver {
            kind: Kind::Mock,
            binary: mock_binary(),
            name: name.into(),
            socket: dir.join("csi.sock"),
            dir,
            node_id: name.into(),
            topology: (
                "io.kubernetes.storage.mock/node".into(),
                "some-mock-node".into(),
            ),
            args: Vec::new(),
        }
    }

    /// The same driver started with `args` as well.
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The driver's log: every call it was asked (the mock logs each one
    /// with its time to the microsecond).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        repo_root().join("target/test-logs").join(format!(
            "{}-{}.log",
            self.name,
            std::process::id()
        ))
    }

    /// csi-driver-host-path as `hostpath.csi.k8s.io` on node `node`.
    pub fn host_path(node: &str) -> Self {
        let path = std::env::var("STOWAGE_HOSTPATHPLUGIN").unwrap_or_else(|_| {
            panic!(
                "set STOWAGE_HOSTPATHPLUGIN to a hostpathplugin binary (csi-driver-host-path's \
                 cmd/hostpathplugin; the Go module proxy does not serve that module)"
            )
        });
        let binary = PathBuf::from(path);
        assert!(binary.exists(), "{} does not exist", binary.display());
        let dir = std::env::temp_dir().join(unique_name("stowage-hostpath"));
        std::fs::create_dir_all(&dir).unwrap();
        ExternalDriver {
            kind: Kind::HostPath,
            binary,
            name: "hostpath.csi.k8s.io".into(),
            socket: dir.join("csi.sock"),
            dir,
            node_id: node.into(),
            topology: ("topology.hostpath.csi/node".into(), node.into()),
            args: Vec::new(),
        }
    }

    /// external-attacher's finalizer for this driver.
    pub fn finalizer(&self) -> String {
        stowage::controller::attach::finalizer(&self.name)
    }

    /// Starts the driver; returns once its socket exists.
    pub fn start(&self) -> Running {
        let _ = std::fs::remove_file(&self.socket);
        let endpoint = format!("--endpoint=unix://{}", self.socket.display());
        let mut command = Command::new(&self.binary);
        command.arg(endpoint);
        match self.kind {
            Kind::Mock => command
                .arg(format!("--name={}", self.name))
                .arg("--enable-topology"),
            Kind::HostPath => command
                .arg(format!("--drivername={}", self.name))
                .arg(format!("--nodeid={}", self.node_id))
                .arg(format!("--statedir={}", self.dir.join("state").display()))
                .arg("--enable-attach"),
        };
        command.args(&self.args);
        let log = self.log_path();
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        let mut running = Running { child };
        for _ in 0..200 {
            if self.socket.exists() {
                return running;
            }
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("{} exited ({status}); see target/test-logs/", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} made no socket at {}", self.name, self.socket.display());
    }

    async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()))
    }

    /// CreateVolume straight to the driver, as a provisioner before stowage
    /// would have: returns the driver's handle.
    pub async fn create_volume(&self, name: &str) -> String {
        let mut client = csi::controller_client::ControllerClient::new(self.channel().await);
        let capability = single_node_mount();
        client
            .create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 16 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateVolume on {}: {e}", self.name))
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    /// ControllerPublishVolume straight to the driver: a publication
    /// Kubernetes does not know of.
    pub async fn publish(&self, handle: &str, node_id: &str) {
        let mut client = csi::controller_client::ControllerClient::new(self.channel().await);
        let capability = single_node_mount();
        client
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: handle.into(),
                node_id: node_id.into(),
                volume_capability: Some(capability),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerPublishVolume on {}: {e}", self.name));
    }

    /// ControllerUnpublishVolume straight to the driver: it forgets a
    /// publication behind Kubernetes' back.
    pub async fn unpublish(&self, handle: &str, node_id: &str) {
        let mut client = csi::controller_client::ControllerClient::new(self.channel().await);
        client
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: handle.into(),
                node_id: node_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerUnpublishVolume on {}: {e}", self.name));
    }

    /// The driver's volume `handle` as its own ListVolumes shows it (mock),
    /// or whether its state directory names it (host path): None if gone.
    pub async fn volume(&self, handle: &str) -> Option<csi::Volume> {
        if self.kind == Kind::HostPath {
            return holds(&self.dir, handle).then(|| csi::Volume {
                volume_id: handle.into(),
                ..Default::default()
            });
        }
        let mut client = csi::controller_client::ControllerClient::new(self.channel().await);
        let list = client
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap_or_else(|e| panic!("ListVolumes on {}: {e}", self.name))
            .into_inner();
        assert!(list.next_token.is_empty(), "ListVolumes paged: {list:?}");
        list.entries
            .into_iter()
            .filter_map(|e| e.volume)
            .find(|v| v.volume_id == handle)
    }

    /// The node IDs the driver has `handle` published to, as it records
    /// them (the mock keeps `<node ID>/dev` in the volume's context); None
    /// for a driver that does not show it.
    pub async fn published_to(&self, handle: &str) -> Option<Vec<String>> {
        if self.kind == Kind::HostPath {
            return None;
        }
        let volume = self
            .volume(handle)
            .await
            .unwrap_or_else(|| panic!("{} has no volume {handle}", self.name));
        Some(
            volume
                .volume_context
                .keys()
                .filter_map(|k| k.strip_suffix("/dev").map(str::to_string))
                .collect(),
        )
    }
}

impl Drop for ExternalDriver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running driver process, killed when dropped.
pub struct Running {
    child: Child,
}

impl Running {
    /// SIGSTOP: the driver hangs, its socket still there (calls time out).
    pub fn pause(&self) {
        signal(&self.child, libc::SIGSTOP);
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        signal(&self.child, libc::SIGCONT);
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid, which we have not reaped.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mock-csi-driver from scripts/build-mock-driver.sh (built on first use,
/// then cached in ~/.cache/stowage).
fn mock_binary() -> PathBuf {
    let bin = crate::harness::built_by("scripts/build-mock-driver.sh").join("mock-csi-driver");
    assert!(
        bin.is_file(),
        "{} missing after scripts/build-mock-driver.sh",
        bin.display()
    );
    bin
}

/// A mounted volume on one node, as the tests ask for it.
fn single_node_mount() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Whether a file or directory under `dir` has `handle` in its name.
pub fn holds(dir: &Path, handle: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name().to_string_lossy().contains(handle)
                || (e.path().is_dir() && holds(&e.path(), handle))
        })
}
