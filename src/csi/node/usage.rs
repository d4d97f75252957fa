//! NodeGetVolumeStats and NodeExpandVolume: the calls on a volume already
//! staged or published, at a path kubelet gives.

use tokio::process::Command;

use super::{Data, NodeService, io_err, mountinfo};
use crate::csi::{CsiError, required};
use crate::host::beneath::fd_path;
use crate::host::filesystem::{self, Contents};
use crate::host::process::run;
use crate::host::statvfs::statvfs;
use crate::host::{loop_device, mounts};
use crate::proto::csi::v1::{self as csi, volume_capability::AccessType};

impl NodeService {
    /// NodeGetVolumeStats: usage of a mounted filesystem, the size of a
    /// published block device, and whether the path is mounted.
    pub(super) async fn volume_stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, CsiError> {
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let data = self.data(id)?;
        let (at, fd) = self.existing_path(&req.volume_path, "volume_path")?;
        let path = at.path.clone();
        // The descriptor's own file, whatever the path names by now.
        let meta = std::fs::metadata(fd_path(&fd)).map_err(io_err("reading", &path))?;
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
            let st = statvfs(&fd_path(&fd)).map_err(io_err("statvfs", &path))?;
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
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    /// NodeExpandVolume: the image grown to the size asked, its loop
    /// device refreshed, and the filesystem on it grown.
    pub(super) async fn expand(
        &self,
        req: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse, CsiError> {
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let _guard = self.locks.lock(id).await;
        let data = self.data(id)?;
        let (at, _fd) = self.existing_path(&req.volume_path, "volume_path")?;
        let path = at.path;
        let Data::Image(image) = data else {
            return Ok(csi::NodeExpandVolumeResponse { capacity_bytes: 0 });
        };
        let wanted = req.capacity_range.map_or(0, |r| r.required_bytes);
        if wanted < 0 {
            return Err(CsiError::InvalidArgument(
                "capacity_range.required_bytes must not be negative".into(),
            ));
        }
        let current = std::fs::metadata(&image)
            .map_err(|e| CsiError::Internal(format!("reading {}: {e}", image.display())))?
            .len() as i64;
        crate::backend::local::room::measure(&self.store, self.room)
            .map_err(|e| CsiError::Internal(format!("measuring the data directory: {e}")))?
            .check_growth(current, wanted)
            .map_err(CsiError::CannotGrow)?;
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
                Contents::Filesystem(fs) => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "{} holds a {fs} filesystem, which stowage cannot grow",
                        dev.display()
                    )));
                }
                Contents::Empty => {}
            }
        }
        tracing::info!(volume = id, bytes = size, "volume expanded");
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: size,
        })
    }
}
