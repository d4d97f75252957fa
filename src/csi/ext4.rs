//! ext4 before it is mounted at NodeStage: checked (`e2fsck -p`) and, if
//! its image grew while it was not staged, grown offline.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::CsiError;
use crate::host::loop_device;
use crate::host::process::{output, run};

/// `e2fsck -p`, preening: repairs what is safe to repair (exit 1 means it
/// did). `force` (`-f`) checks a filesystem that looks clean too.
pub(super) async fn e2fsck(dev: &Path, force: bool) -> Result<(), CsiError> {
    let mode = if force { "-f -p" } else { "-p" };
    let status = Command::new("e2fsck")
        .args(mode.split(' '))
        .arg(dev)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| CsiError::Internal(format!("e2fsck: {e}")))?
        .status;
    if !matches!(status.code(), Some(0 | 1)) {
        Err(CsiError::Internal(format!(
            "e2fsck {mode} {} failed ({status}); the filesystem needs a manual repair",
            dev.display()
        )))?;
    }
    Ok(())
}

/// Bytes of the ext4 filesystem on `dev` (block count × block size).
async fn ext4_bytes(dev: &Path) -> Result<u64, CsiError> {
    let mut dumpe2fs = Command::new("dumpe2fs");
    dumpe2fs.arg("-h").arg(dev);
    let header = output(dumpe2fs).await.map_err(CsiError::from)?;
    let field = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .ok_or_else(|| CsiError::Internal(format!("dumpe2fs -h {}: no {name}", dev.display())))
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// Grows an ext4 that is smaller than its device (the image grew while the
/// volume was not staged) before it is mounted. Offline, resize2fs needs no
/// CAP_SYS_RESOURCE, which growing a mounted ext4 does; NodeExpandVolume
/// then finds nothing left to do. resize2fs insists on a full check first.
pub(super) async fn grow_unmounted(dev: &Path) -> Result<(), CsiError> {
    loop_device::refresh_size(dev)
        .await
        .map_err(CsiError::from)?;
    let mut blockdev = Command::new("blockdev");
    blockdev.arg("--getsize64").arg(dev);
    let device: u64 = output(blockdev)
        .await
        .map_err(CsiError::from)?
        .trim()
        .parse()
        .map_err(|e| CsiError::Internal(format!("blockdev --getsize64: {e}")))?;
    let fs = ext4_bytes(dev).await?;
    if device <= fs {
        return Ok(());
    }
    e2fsck(dev, true).await?;
    let mut grow = Command::new("resize2fs");
    grow.arg(dev);
    run(grow).await.map_err(CsiError::from)?;
    tracing::info!(device = %dev.display(), from = fs, to = device, "ext4 grown before mounting");
    Ok(())
}
