//! Freezing a mounted filesystem (FIFREEZE) for the moment its image is
//! copied: what the filesystem wrote is flushed and nothing changes until
//! the guard drops and thaws it, so a snapshot of a volume in use is
//! consistent, as a filesystem freeze makes it for LVM or a cloud disk.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::loop_device;
use super::mounts;
use super::process::{HostError, io};

// _IOWR('X', 119, int) and _IOWR('X', 120, int), from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen filesystem, thawed when dropped.
pub struct Frozen {
    dir: std::fs::File,
    at: PathBuf,
}

/// Freezes the filesystem mounted at `mount_point`.
pub fn freeze(mount_point: &Path) -> Result<Frozen, HostError> {
    let dir = std::fs::File::open(mount_point).map_err(io("opening", mount_point))?;
    // SAFETY: an open descriptor and an ioctl that takes no argument memory.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
        return Err(io("freezing", mount_point)(std::io::Error::last_os_error()));
    }
    Ok(Frozen {
        dir,
        at: mount_point.to_path_buf(),
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as in freeze.
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) } != 0 {
            tracing::error!(mount = %self.at.display(), error = %std::io::Error::last_os_error(), "thawing a frozen filesystem failed");
        }
    }
}

/// Where the filesystem inside `image` is mounted (through its loop
/// device), if it is: a block volume, or one not staged, has none.
pub fn filesystem_mount_of(image: &Path) -> Result<Option<PathBuf>, HostError> {
    let all =
        mounts::current().map_err(io("reading mountinfo", Path::new("/proc/self/mountinfo")))?;
    Ok(all
        .into_iter()
        .filter(|m| m.source.starts_with("/dev/loop") && m.root == "/")
        .find(|m| {
            Path::new(&m.source)
                .file_name()
                .and_then(loop_device::backing_file)
                .is_some_and(|b| b == image)
        })
        .map(|m| m.mount_point))
}
