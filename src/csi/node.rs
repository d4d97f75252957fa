//! CSI Node for local volumes: stage attaches the image to a loop device and
//! mounts it (or, for Block, only attaches); publish bind-mounts into the
//! pod. Every call checks mountinfo first and runs under the volume's lock,
//! so kubelet's retries are harmless.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::process::Command;
use tonic::{Request, Response};

mod capability;
mod usage;

use super::{CsiError, CsiResult, VolumeLocks, ext4, required};
use crate::backend::local::{self, FsType, Store};
use crate::host::HostError;
use crate::host::beneath::{Beneath, fd_path};
use crate::host::filesystem::{self, Contents};
use crate::host::process::run;
use crate::host::{loop_device, mounts, paths};
use crate::proto::csi::v1::{self as csi, node_server::Node, volume_capability::AccessType};
use capability::{fs_type, mount_flags, required_capability};

pub struct NodeService {
    pub store: Store,
    /// What this node may promise to volumes: NodeExpandVolume grows an
    /// image only within it.
    pub room: crate::backend::local::room::Policy,
    pub node: String,
    /// Target and staging paths must lie under this directory.
    pub kubelet_dir: PathBuf,
    /// Which paths under it are accepted.
    pub paths: paths::Layout,
    pub locks: VolumeLocks,
    /// Told of every stage refused for doubt about what a device holds.
    pub refusals: Option<std::sync::Arc<dyn StageRefusals>>,
}

/// Someone to tell when NodeStage refuses a device it is unsure of (blkid
/// failed, two signatures, another filesystem than asked for): kubelet's
/// FailedMount event names only the pod, and the pod is often gone by the
/// time someone looks for why the volume never mounted.
pub trait StageRefusals: Send + Sync {
    fn refused(&self, volume_id: &str, message: &str);
}

/// Where a volume's data is on this node.
enum Data {
    Image(PathBuf),
    Dir(PathBuf),
}

/// A request path that is wrong is the caller's mistake; one that cannot
/// be opened for another reason is ours.
fn path_error(field: &str, e: paths::PathError) -> CsiError {
    match e {
        paths::PathError::Io { .. } => CsiError::Internal(format!("{field}: {e}")),
        e => CsiError::InvalidArgument(format!("{field}: {e}")),
    }
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

    /// A request path, opened beneath the kubelet directory without
    /// following symlinks; its missing directories made when `create`.
    fn path(
        &self,
        requested: &str,
        field: &str,
        role: paths::Role,
        create: bool,
    ) -> Result<Beneath, CsiError> {
        let requested = required(requested, field)?;
        paths::resolve(requested, &self.kubelet_dir, self.paths, role, create)
            .map_err(|e| path_error(field, e))
    }

    /// `path` without creating anything: None when a directory on the way
    /// is missing (so nothing can be mounted there).
    fn path_if_there(
        &self,
        requested: &str,
        field: &str,
        role: paths::Role,
    ) -> Result<Option<Beneath>, CsiError> {
        let requested = required(requested, field)?;
        match paths::resolve(requested, &self.kubelet_dir, self.paths, role, false) {
            Ok(at) => Ok(Some(at)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(path_error(field, e)),
        }
    }

    /// Refuses a path kubelet could not have sent for `role`, before any
    /// lock is taken or anything on the host is looked at.
    fn check_path(&self, requested: &str, field: &str, role: paths::Role) -> Result<(), CsiError> {
        paths::check_only(requested, &self.kubelet_dir, self.paths, role)
            .map_err(|e| path_error(field, e))
    }

    /// A path the volume should already be at (stats, expand), and what is
    /// there: one that is not even absolute, or does not exist, cannot be
    /// where the volume is, which the spec calls NotFound. Paths outside
    /// the kubelet directory stay InvalidArgument.
    fn existing_path(&self, requested: &str, field: &str) -> Result<(Beneath, OwnedFd), CsiError> {
        let requested = required(requested, field)?;
        let not_found = || CsiError::NotFound(format!("{field} {requested:?} does not exist"));
        let at = match paths::resolve(
            requested,
            &self.kubelet_dir,
            self.paths,
            paths::Role::Volume,
            false,
        ) {
            Ok(at) => at,
            Err(paths::PathError::NotAbsolute(_)) => return Err(not_found()),
            Err(e) if e.is_missing() => return Err(not_found()),
            Err(e) => return Err(path_error(field, e)),
        };
        let opened = at
            .open()
            .map_err(|e| path_error(field, paths::opening(requested, &self.kubelet_dir, e)))?;
        Ok((at, opened.ok_or_else(not_found)?))
    }

    /// Publishes a filesystem volume: a bind of its staging mount, reached
    /// through a descriptor opened on the mount itself.
    async fn publish_mount(
        &self,
        id: &str,
        req: &csi::NodePublishVolumeRequest,
        target: &Beneath,
        cap: &csi::VolumeCapability,
    ) -> Result<(), CsiError> {
        let field = "staging_target_path";
        let not_staged = || {
            CsiError::FailedPrecondition(format!(
                "volume {id} is not staged at {}",
                req.staging_target_path
            ))
        };
        let staging = self
            .path_if_there(&req.staging_target_path, field, paths::Role::Staging)?
            .ok_or_else(not_staged)?;
        if mounts::mounted_at(&staging.path)
            .map_err(mountinfo())?
            .is_none()
        {
            return Err(not_staged());
        }
        let source = staging
            .open()
            .map_err(io_err("opening", &staging.path))?
            .ok_or_else(not_staged)?;
        let fd = target.mkdir().map_err(creating(target, "target_path"))?;
        let options = mount_flags(cap)?;
        mounts::bind(&fd_path(&source), target, &fd, req.readonly, &options)
            .await
            .map_err(CsiError::from)
    }

    /// Recognises the mounts stowage makes of volume `id` (and no others,
    /// which it never unmounts).
    fn made_by_us(&self, id: &str) -> Result<impl Fn(&mounts::Mount) -> bool + use<>, CsiError> {
        local::validate_volume_id(id)?;
        let root = paths::canonical_root(self.store.root());
        let (image, dir) = (root.join(format!("{id}.img")), root.join(id));
        Ok(move |m: &mounts::Mount| mounts::made_from(m, &image, &dir))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CsiError + use<> {
    let path = path.to_path_buf();
    move |source| CsiError::Host(HostError::Io { op, path, source })
}

/// Making the final component of a request path: a symlink or a
/// non-directory there is the request's mistake.
fn creating(at: &Beneath, field: &str) -> impl FnOnce(std::io::Error) -> CsiError + use<> {
    let (path, field) = (at.path.clone(), field.to_string());
    move |e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR | libc::EISDIR | libc::EEXIST) => {
            CsiError::InvalidArgument(format!(
                "{field}: {} exists and is not what kubelet makes there (a symlink, or a \
                 file where a directory belongs): {e}",
                path.display()
            ))
        }
        _ => io_err("creating", &path)(e),
    }
}

fn mountinfo() -> impl FnOnce(std::io::Error) -> CsiError {
    |e| CsiError::Internal(format!("reading /proc/self/mountinfo: {e}"))
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
        let field = "staging_target_path";
        self.check_path(&req.staging_target_path, field, paths::Role::Staging)?;
        let cap = required_capability(req.volume_capability.as_ref())?;
        let options = mount_flags(cap)?;
        let _guard = self.locks.lock(id).await;
        let data = self.data(id)?;
        let staging = self.path(&req.staging_target_path, field, paths::Role::Staging, true)?;
        let block = matches!(cap.access_type, Some(AccessType::Block(_)));
        match data {
            Data::Dir(_) if block => Err(CsiError::InvalidArgument(format!(
                "volume {id} is a directory: no block access"
            )))?,
            Data::Dir(dir) => {
                if mounts::mounted_at(&staging.path)
                    .map_err(mountinfo())?
                    .is_none()
                {
                    let fd = staging.mkdir().map_err(creating(&staging, field))?;
                    mounts::bind(&dir, &staging, &fd, false, &[])
                        .await
                        .map_err(CsiError::from)?;
                }
            }
            Data::Image(image) => {
                let dev = loop_device::attach(&image).await.map_err(CsiError::from)?;
                if block {
                    return Ok(Response::new(csi::NodeStageVolumeResponse {}));
                }
                if let Some(m) = mounts::mounted_at(&staging.path).map_err(mountinfo())? {
                    if Path::new(&m.source) == dev {
                        return Ok(Response::new(csi::NodeStageVolumeResponse {}));
                    }
                    Err(CsiError::FailedPrecondition(format!(
                        "{} is already a mount of {}",
                        staging.path.display(),
                        m.source
                    )))?;
                }
                // Checking or formatting a device mounted elsewhere would
                // harm the mount that is there.
                let all = mounts::current().map_err(mountinfo())?;
                if let Some(m) = all.iter().find(|m| Path::new(&m.source) == dev) {
                    Err(CsiError::FailedPrecondition(format!(
                        "volume {id} is already mounted at {} (staged or published \
                         there); unpublish and unstage it there first",
                        m.mount_point.display()
                    )))?;
                }
                let wanted = fs_type(cap, &req.volume_context)?;
                // A refused device is not left attached: nothing of ours
                // holds it until the user has looked.
                let mounted = async {
                    prepare_filesystem(&dev, wanted).await?;
                    let fd = staging.mkdir().map_err(creating(&staging, field))?;
                    mounts::mount_on(&dev, &fd, Some(wanted.as_str()), &options)
                        .await
                        .map_err(CsiError::from)
                };
                if let Err(e) = mounted.await {
                    let _ = loop_device::detach(&image).await;
                    if let (CsiError::Probe(_), Some(told)) = (&e, &self.refusals) {
                        told.refused(id, &e.to_string());
                    }
                    Err(e)?;
                }
            }
        }
        tracing::info!(volume = id, staging = %staging.path.display(), "volume staged");
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> CsiResult<csi::NodeUnstageVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let field = "staging_target_path";
        self.check_path(&req.staging_target_path, field, paths::Role::Staging)?;
        let ours = self.made_by_us(id)?;
        let _guard = self.locks.lock(id).await;
        if let Some(staging) =
            self.path_if_there(&req.staging_target_path, field, paths::Role::Staging)?
        {
            // The device behind the mount, found before unmounting: if
            // the image file is already gone, the backing-file lookup
            // cannot find it.
            let mounted = mounts::mounted_at(&staging.path).map_err(mountinfo())?;
            mounts::unmount(&staging, ours).map_err(CsiError::from)?;
            if let Some(dev) = mounted
                .map(|m| PathBuf::from(m.source))
                .filter(|d| loop_device::is_loop(d))
            {
                loop_device::detach_device(&dev)
                    .await
                    .map_err(CsiError::from)?;
            }
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
        for (value, field, role) in [
            (&req.target_path, "target_path", paths::Role::Target),
            (
                &req.staging_target_path,
                "staging_target_path",
                paths::Role::Staging,
            ),
        ] {
            self.check_path(value, field, role)?;
        }
        let cap = required_capability(req.volume_capability.as_ref())?;
        mount_flags(cap)?;
        let _guard = self.locks.lock(id).await;
        let data = self.data(id)?;
        let target = self.path(&req.target_path, "target_path", paths::Role::Target, true)?;
        if mounts::mounted_at(&target.path)
            .map_err(mountinfo())?
            .is_some()
        {
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
                let fd = target
                    .create_file()
                    .map_err(creating(&target, "target_path"))?;
                mounts::bind(&dev, &target, &fd, req.readonly, &[])
                    .await
                    .map_err(CsiError::from)?;
            }
            (Some(AccessType::Block(_)), Data::Dir(_)) => {
                Err(CsiError::InvalidArgument(format!(
                    "volume {id} is a directory: no block access"
                )))?;
            }
            (_, _) => self.publish_mount(id, &req, &target, cap).await?,
        }
        tracing::info!(volume = id, target = %target.path.display(), "volume published");
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> CsiResult<csi::NodeUnpublishVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let field = "target_path";
        self.check_path(&req.target_path, field, paths::Role::Target)?;
        let ours = self.made_by_us(id)?;
        let _guard = self.locks.lock(id).await;
        // Its directory gone, nothing is mounted there or left to remove.
        let Some(target) = self.path_if_there(&req.target_path, field, paths::Role::Target)? else {
            return Ok(Response::new(csi::NodeUnpublishVolumeResponse {}));
        };
        mounts::unmount(&target, ours).map_err(CsiError::from)?;
        target.remove().map_err(io_err("removing", &target.path))?;
        tracing::info!(volume = id, target = %target.path.display(), "volume unpublished");
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> CsiResult<csi::NodeGetVolumeStatsResponse> {
        Ok(Response::new(
            self.volume_stats(request.into_inner()).await?,
        ))
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> CsiResult<csi::NodeExpandVolumeResponse> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
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
