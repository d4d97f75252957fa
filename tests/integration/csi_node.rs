//! `stowage csi` on a socket of its own, driven through its Node and
//! Controller services like kubelet and a provisioner would, with helpers
//! to look at mounts and loop devices.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stowage::proto::csi::v1 as csi;
use stowage::proto::csi::v1::controller_client::ControllerClient;
use stowage::proto::csi::v1::node_client::NodeClient;
use stowage::proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use tonic::transport::Channel;

use crate::harness::{Process, csi_server_with_env, unique_name};
use crate::node_socket::connect;

pub const MIB: i64 = 1 << 20;

/// `stowage csi` on a socket of its own, with clients for both services.
pub(crate) struct CsiNode {
    server: Option<Process>,
    work: PathBuf,
    pub node: NodeClient<Channel>,
    pub controller: ControllerClient<Channel>,
}

pub fn capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

impl CsiNode {
    pub async fn start(log_name: &str, extra: &[&str]) -> Self {
        Self::start_with_tools(log_name, extra, None).await
    }

    /// With `tools` (a directory of fake programs) ahead on the server's
    /// PATH.
    pub async fn start_with_tools(log_name: &str, extra: &[&str], tools: Option<&Path>) -> Self {
        let work = std::env::temp_dir().join(unique_name("stowage-node-calls"));
        let kubelet = work.join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        let socket = work.join("csi.sock");
        let path = tools.map(|t| format!("{}:{}", t.display(), std::env::var("PATH").unwrap()));
        let env: Vec<(&str, &str)> = path.iter().map(|p| ("PATH", p.as_str())).collect();
        let server = csi_server_with_env(
            &socket,
            &work.join("data"),
            &kubelet,
            "n",
            extra,
            &env,
            log_name,
        );
        let channel = connect(&socket).await;
        CsiNode {
            server: Some(server),
            work,
            node: NodeClient::new(channel.clone()),
            controller: ControllerClient::new(channel),
        }
    }

    pub fn image(&self, id: &str) -> PathBuf {
        self.work.join(format!("data/volumes/{id}.img"))
    }

    pub fn staging(&self, id: &str) -> PathBuf {
        self.work.join(format!(
            "kubelet/plugins/kubernetes.io/csi/x/{id}/globalmount"
        ))
    }

    pub fn target(&self, id: &str, pod: &str) -> PathBuf {
        self.work.join(format!(
            "kubelet/pods/{pod}/volumes/kubernetes.io~csi/{id}/mount"
        ))
    }

    /// An ext4 image volume of `bytes`.
    pub async fn create(&mut self, id: &str, bytes: i64) {
        self.controller
            .create_volume(csi::CreateVolumeRequest {
                name: id.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability()],
                ..Default::default()
            })
            .await
            .expect("CreateVolume");
    }

    pub fn stage_request(&self, id: &str) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self.staging(id).to_str().unwrap().into(),
            volume_capability: Some(capability()),
            ..Default::default()
        }
    }

    pub fn unstage_request(&self, id: &str) -> csi::NodeUnstageVolumeRequest {
        csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self.staging(id).to_str().unwrap().into(),
        }
    }

    pub fn publish_request(
        &self,
        id: &str,
        target: &Path,
        readonly: bool,
    ) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self.staging(id).to_str().unwrap().into(),
            target_path: target.to_str().unwrap().into(),
            volume_capability: Some(capability()),
            readonly,
            ..Default::default()
        }
    }

    pub async fn stage(&mut self, id: &str) {
        let request = self.stage_request(id);
        self.node
            .node_stage_volume(request)
            .await
            .expect("NodeStageVolume");
    }

    pub async fn unstage(&mut self, id: &str) {
        let request = self.unstage_request(id);
        self.node
            .node_unstage_volume(request)
            .await
            .expect("NodeUnstageVolume");
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.to_str().unwrap().into(),
            })
            .await
            .expect("NodeUnpublishVolume");
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        self.server.as_ref().map(Process::log).unwrap_or_default()
    }

    /// Stops the server; everything must have been torn down by then.
    pub async fn finish(mut self) {
        self.server.take().unwrap().stop();
        let work = self.work.to_str().unwrap().to_string();
        wait_until("no mount under the test directory", || {
            !std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&work)
        })
        .await;
        wait_until("no loop device on the test's images", || {
            !tool("losetup", &["-a"]).contains(&work)
        })
        .await;
    }
}

/// A failed test leaves mounts and loop devices behind; they go here, so
/// that the machine (shared with other test runs) stays clean.
impl Drop for CsiNode {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        let work = self.work.to_str().unwrap();
        let mut mounted: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(work))
            .collect();
        mounted.reverse();
        for mount in mounted {
            let _ = Command::new("umount").arg(&mount).status();
        }
        let loops = Command::new("losetup").arg("-a").output();
        for line in loops
            .map(|o| o.stdout)
            .unwrap_or_default()
            .split(|b| *b == b'\n')
        {
            let line = String::from_utf8_lossy(line);
            if let Some((dev, _)) = line.split_once(':').filter(|_| line.contains(work)) {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// How many mounts sit exactly at `path`.
pub fn mounts_at(path: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .count()
}

/// The mount options of the mount at `path`.
pub fn mount_options(path: &Path) -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .and_then(|l| l.split(' ').nth(5).map(String::from))
        .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()))
}

/// The loop devices backed by `image`.
pub fn loops_of(image: &Path) -> Vec<String> {
    let out = tool("losetup", &["--associated", image.to_str().unwrap()]);
    out.lines()
        .filter_map(|l| l.split(':').next())
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect()
}

/// Runs a tool the test needs; a missing one fails the test, naming the
/// package to install.
pub fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("running {name}: {e}; install util-linux and e2fsprogs (e2fsck, tune2fs, debugfs, dumpe2fs)")
    });
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` for up to 10 s (a detached loop device can take a moment to
/// let go of its file); fails naming `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}
