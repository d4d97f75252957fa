//! CSI Node for local volumes: stage attaches the image to a loop device and
//! mounts it (or, for Block, only attaches); publish bind-mounts into the
//! pod. Every call checks mountinfo first and runs under the volume's lock,
//! so kubelet's retries are harmless.

use std::path::{Path, PathBuf};

use tokio::process::Command;
use tonic::{Request, Response};

use super::{CsiError, CsiResult, VolumeLocks, check_capability, ext4, required};
use crate::backend::local::{self, FsType, Store, run};
use crate::node::filesystem::{self, Contents};
use crate::node::{loop_device, mounts, paths, statvfs};
use crate::proto::csi::v1::{self as csi, node_server::Node, volume_capability::AccessType};

pub struct NodeService {
    pub store: Store,
    pub node: String,
    /// Target and staging paths must lie under this directory.
    pub kubelet_dir: PathBuf,
    pub locks: VolumeLocks,
}

/// Where a volume's data is on this node.
enum Data {
    Image(PathBuf),
    Dir(PathBuf),
}

impl NodeService {
    fn data(&self, id: &str) -> Result<Data, CsiError> {
        local::validate_volume_id(id)?;
        let image = self.store.image_path(id)?;
        if image.is_file() {
            return Ok(Data::Image(image));
        }
        let dir = self.store.dir_path(id)?;
        if dir.is_dir() {
            return Ok(Data::Dir(dir));
        }
        Err(CsiError::NotFound(format!(
            "volume {id} does not exist on node {}",
            self.node
        )))
    }

    fn path(&self, requested: &str, field: &str) -> Result<PathBuf, CsiError> {
        paths::check(required(requested, field)?, &self.kubelet_dir)
            .map_err(|e| CsiError::InvalidArgument(format!("{field}: {e}")))
    }

    /// A path the volume should already be at (stats, expand): one that is
    /// not even absolute cannot be where the volume is, which the spec calls
    /// NotFound. Paths outside the kubelet directory stay InvalidArgument.
    fn existing_path(&self, requested: &str, field: &str) -> Result<PathBuf, CsiError> {
        match paths::check(required(requested, field)?, &self.kubelet_dir) {
            Ok(p) => Ok(p),
            Err(paths::PathError::NotAbsolute(p)) => {
                Err(CsiError::NotFound(format!("{field} {p:?} does not exist")))
            }
            Err(e) => Err(CsiError::InvalidArgument(format!("{field}: {e}"))),
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CsiError + use<> {
    let path = path.to_path_buf();
    move |source| CsiError::Local(local::LocalError::Io { op, path, source })
}

fn mountinfo() -> impl FnOnce(std::io::Error) -> CsiError {
    |e| CsiError::Internal(format!("reading /proc/self/mountinfo: {e}"))
}

/// The request's capability, present and one local volumes can serve.
fn required_capability(
    cap: Option<&csi::VolumeCapability>,
) -> Result<&csi::VolumeCapability, CsiError> {
    let cap =
        cap.ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
    check_capability(cap)?;
    Ok(cap)
}

fn mount_flags(cap: &csi::VolumeCapability) -> Vec<String> {
    match &cap.access_type {
        Some(AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    }
}

fn fs_type(
    cap: &csi::VolumeCapability,
    context: &std::collections::HashMap<String, String>,
) -> Result<FsType, CsiError> {
    let requested = match &cap.access_type {
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => m.fs_type.clone(),
        _ => context.get("fsType").cloned().unwrap_or_default(),
    };
    match requested.as_str() {
        "" | "ext4" => Ok(FsType::Ext4),
        "xfs" => Ok(FsType::Xfs),
        other => Err(CsiError::InvalidArgument(format!(
            "fs_type {other:?} is not supported; use ext4 or xfs"
        ))),
    }
}

/// Makes the loop device of one of our own images ready to mount as
/// `wanted`: formatted only when blkid is sure it holds nothing, an ext4
/// checked and grown, anything else left alone and refused.
async fn prepare_filesystem(dev: &Path, wanted: FsType) -> Result<(), CsiError> {
    let contents = filesystem::probe(dev).await?;
    filesystem::check_type(dev, &contents, wanted.as_str())?;
    match contents {
        Contents::Empty => {
            let mut mkfs = Command::new(format!("mkfs.{}", wanted.as_str()));
            mkfs.arg(if wanted == FsType::Xfs { "-f" } else { "-F" })
                .arg(dev);
            run(mkfs).await.map_err(CsiError::from)?;
        }
        Contents::Filesystem(_) if wanted == FsType::Ext4 => {
            ext4::e2fsck(dev, false).await?;
            ext4::grow_unmounted(dev).await?;
        }
        Contents::Filesystem(_) => {}
    }
    Ok(())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> CsiResult<csi::NodeStageVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let cap = required_capability(req.volume_capability.as_ref())?;
        let _guard = self.locks.lock(id).await;
        let data = self.data(id)?;
        let block = matches!(cap.access_type, Some(AccessType::Block(_)));
        match data {
            Data::Dir(_) if block => Err(CsiError::InvalidArgument(format!(
                "volume {id} is a directory: no block access"
            )))?,
            Data::Dir(dir) => {
                if mounts::mounted_at(&staging).map_err(mountinfo())?.is_none() {
                    tokio::fs::create_dir_all(&staging)
                        .await
                        .map_err(io_err("creating", &staging))?;
                    mounts::bind(&dir, &staging, false, &[])
                        .await
                        .map_err(CsiError::from)?;
                }
            }
            Data::Image(image) => {
                let dev = loop_device::attach(&image).await.map_err(CsiError::from)?;
                if block {
                    return Ok(Response::new(csi::NodeStageVolumeResponse {}));
                }
                if let Some(m) = mounts::mounted_at(&staging).map_err(mountinfo())? {
                    if Path::new(&m.source) == dev {
                        return Ok(Response::new(csi::NodeStageVolumeResponse {}));
                    }
                    Err(CsiError::FailedPrecondition(format!(
                        "{} is already a mount of {}",
                        staging.display(),
                        m.source
                    )))?;
                }
                let wanted = fs_type(cap, &req.volume_context)?;
                // A refused device is not left attached: nothing of ours
                // holds it until the user has looked.
                if let Err(e) = prepare_filesystem(&dev, wanted).await {
                    let _ = loop_device::detach(&image).await;
                    Err(e)?;
                }
                tokio::fs::create_dir_all(&staging)
                    .await
                    .map_err(io_err("creating", &staging))?;
                let options = mount_flags(cap);
                if let Err(e) = mounts::mount(&dev, &staging, Some(wanted.as_str()), &options).await
                {
                    let _ = loop_device::detach(&image).await;
                    Err(CsiError::from(e))?;
                }
            }
        }
        tracing::info!(volume = id, staging = %staging.display(), "volume staged");
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> CsiResult<csi::NodeUnstageVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        local::validate_volume_id(id).map_err(CsiError::from)?;
        let _guard = self.locks.lock(id).await;
        // The device behind the mount, found before unmounting: if the image
        // file is already gone, the backing-file lookup cannot find it.
        let mounted = mounts::mounted_at(&staging).map_err(mountinfo())?;
        mounts::unmount(&staging).await.map_err(CsiError::from)?;
        if let Some(dev) = mounted
            .map(|m| PathBuf::from(m.source))
            .filter(|d| loop_device::is_loop(d))
        {
            loop_device::detach_device(&dev)
                .await
                .map_err(CsiError::from)?;
        }
        let image = self.store.image_path(id).map_err(CsiError::from)?;
        loop_device::detach(&image).await.map_err(CsiError::from)?;
        tracing::info!(volume = id, "volume unstaged");
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> CsiResult<csi::NodePublishVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target = self.path(&req.target_path, "target_path")?;
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let cap = required_capability(req.volume_capability.as_ref())?;
        let _guard = self.locks.lock(id).await;
        let data = self.data(id)?;
        if mounts::mounted_at(&target).map_err(mountinfo())?.is_some() {
            return Ok(Response::new(csi::NodePublishVolumeResponse {}));
        }
        match (&cap.access_type, data) {
            (Some(AccessType::Block(_)), Data::Image(image)) => {
                let dev = loop_device::find(&image)
                    .await
                    .map_err(CsiError::from)?
                    .ok_or_else(|| {
                        CsiError::FailedPrecondition(format!("volume {id} is not staged"))
                    })?;
                if let Some(parent) = target.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(io_err("creating", parent))?;
                }
                if !target.exists() {
                    tokio::fs::File::create(&target)
                        .await
                        .map_err(io_err("creating", &target))?;
                }
                mounts::bind(&dev, &target, req.readonly, &[])
                    .await
                    .map_err(CsiError::from)?;
            }
            (Some(AccessType::Block(_)), Data::Dir(_)) => {
                Err(CsiError::InvalidArgument(format!(
                    "volume {id} is a directory: no block access"
                )))?;
            }
            (_, _) => {
                if mounts::mounted_at(&staging).map_err(mountinfo())?.is_none() {
                    Err(CsiError::FailedPrecondition(format!(
                        "volume {id} is not staged at {}",
                        staging.display()
                    )))?;
                }
                tokio::fs::create_dir_all(&target)
                    .await
                    .map_err(io_err("creating", &target))?;
                let options = mount_flags(cap);
                mounts::bind(&staging, &target, req.readonly, &options)
                    .await
                    .map_err(CsiError::from)?;
            }
        }
        tracing::info!(volume = id, target = %target.display(), "volume published");
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> CsiResult<csi::NodeUnpublishVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target = self.path(&req.target_path, "target_path")?;
        let _guard = self.locks.lock(id).await;
        mounts::unmount(&target).await.map_err(CsiError::from)?;
        let removed = match tokio::fs::symlink_metadata(&target).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir(&target).await,
            Ok(_) => tokio::fs::remove_file(&target).await,
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => Err(io_err("removing", &target)(e))?,
        }
        tracing::info!(volume = id, target = %target.display(), "volume unpublished");
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> CsiResult<csi::NodeGetVolumeStatsResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let data = self.data(id)?;
        let path = self.existing_path(&req.volume_path, "volume_path")?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|_| CsiError::NotFound(format!("{} does not exist", path.display())))?;
        use csi::volume_usage::Unit;
        let mounted = mounts::mounted_at(&path).map_err(mountinfo())?.is_some();
        let condition = match (&data, mounted) {
            (_, true) => csi::VolumeCondition {
                abnormal: false,
                message: "volume is mounted".into(),
            },
            (_, false) => csi::VolumeCondition {
                abnormal: true,
                message: format!("{} is not mounted", path.display()),
            },
        };
        let usage = if meta.is_file() || !meta.is_dir() {
            // A published block device: its size is all there is to say.
            let bytes = match &data {
                Data::Image(image) => tokio::fs::metadata(image)
                    .await
                    .map(|m| m.len() as i64)
                    .unwrap_or(0),
                Data::Dir(_) => 0,
            };
            vec![csi::VolumeUsage {
                available: 0,
                total: bytes,
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        } else {
            let st = statvfs(&path).map_err(io_err("statvfs", &path))?;
            vec![
                csi::VolumeUsage {
                    available: st.available_bytes,
                    total: st.total_bytes,
                    used: st.used_bytes,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: st.free_inodes,
                    total: st.total_inodes,
                    used: st.total_inodes - st.free_inodes,
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> CsiResult<csi::NodeExpandVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let _guard = self.locks.lock(id).await;
        let data = self.data(id)?;
        let path = self.existing_path(&req.volume_path, "volume_path")?;
        let Data::Image(image) = data else {
            return Ok(Response::new(csi::NodeExpandVolumeResponse {
                capacity_bytes: 0,
            }));
        };
        if !path.exists() {
            Err(CsiError::NotFound(format!(
                "{} does not exist",
                path.display()
            )))?;
        }
        let wanted = req.capacity_range.map_or(0, |r| r.required_bytes);
        if wanted < 0 {
            Err(CsiError::InvalidArgument(
                "capacity_range.required_bytes must not be negative".into(),
            ))?;
        }
        let size = self.store.grow(id, wanted).await.map_err(CsiError::from)?;
        let dev = loop_device::find(&image)
            .await
            .map_err(CsiError::from)?
            .ok_or_else(|| CsiError::FailedPrecondition(format!("volume {id} is not staged")))?;
        loop_device::refresh_size(&dev)
            .await
            .map_err(CsiError::from)?;
        let block = matches!(
            req.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        if !block {
            match filesystem::probe(&dev).await.map_err(CsiError::from)? {
                Contents::Filesystem(fs) if fs == "xfs" => {
                    let mut grow = Command::new("xfs_growfs");
                    grow.arg(&path);
                    run(grow).await.map_err(CsiError::from)?;
                }
                Contents::Filesystem(fs) if fs.starts_with("ext") => {
                    let mut grow = Command::new("resize2fs");
                    grow.arg(&dev);
                    run(grow).await.map_err(|e| {
                        CsiError::Internal(format!(
                            "{e} (growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE in the node agent)"
                        ))
                    })?;
                }
                Contents::Filesystem(fs) => Err(CsiError::FailedPrecondition(format!(
                    "{} holds a {fs} filesystem, which stowage cannot grow",
                    dev.display()
                )))?,
                Contents::Empty => {}
            }
        }
        tracing::info!(volume = id, bytes = size, "volume expanded");
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: size,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> CsiResult<csi::NodeGetCapabilitiesResponse> {
        use csi::node_service_capability::{Rpc, Type, rpc};
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> CsiResult<csi::NodeGetInfoResponse> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: [(local::TOPOLOGY_KEY.to_string(), self.node.clone())]
                    .into_iter()
                    .collect(),
            }),
        }))
    }
}
