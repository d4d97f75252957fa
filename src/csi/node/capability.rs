//! What a request's volume capability asks of NodeStage and NodePublish:
//! present and servable, its filesystem type, and mount flags stowage can
//! apply without making mounts it would not recognise.

use std::collections::HashMap;

use crate::backend::local::FsType;
use crate::csi::{CsiError, check_capability};
use crate::proto::csi::v1::{self as csi, volume_capability::AccessType};

/// The request's capability, present and one local volumes can serve.
pub(super) fn required_capability(
    cap: Option<&csi::VolumeCapability>,
) -> Result<&csi::VolumeCapability, CsiError> {
    let cap =
        cap.ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
    check_capability(cap)?;
    Ok(cap)
}

/// The capability's mount flags. Those that change what is mounted, or
/// where, rather than how (a bind, a move, a new loop device over ours, a
/// remount of something else) are refused: they would make mounts stowage
/// does not recognise as its own, and so could never unmount.
pub(super) fn mount_flags(cap: &csi::VolumeCapability) -> Result<Vec<String>, CsiError> {
    let Some(AccessType::Mount(m)) = &cap.access_type else {
        return Ok(Vec::new());
    };
    const REFUSED: [&str; 10] = [
        "bind",
        "rbind",
        "move",
        "remount",
        "loop",
        "offset",
        "sizelimit",
        "x-mount.",
        "helper",
        "make-",
    ];
    for option in m.mount_flags.iter().flat_map(|f| f.split(',')) {
        let name = option.split('=').next().unwrap_or("").to_ascii_lowercase();
        let bad = REFUSED
            .iter()
            .any(|r| name == *r || (r.ends_with(['.', '-']) && name.starts_with(r)))
            || option.contains('\0');
        if bad {
            return Err(CsiError::InvalidArgument(format!(
                "mount flag {option:?} is not allowed: stowage makes the mounts itself; \
                 remove it from the StorageClass or PersistentVolume mountOptions"
            )));
        }
    }
    Ok(m.mount_flags.clone())
}

pub(super) fn fs_type(
    cap: &csi::VolumeCapability,
    context: &HashMap<String, String>,
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
