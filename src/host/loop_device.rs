//! Loop devices for image files, through losetup(8). A device is looked up
//! by its backing file before a new one is attached, so retries never leak.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::process::{HostError, output, run};

fn losetup(args: &[&str], path: &Path) -> Command {
    let mut cmd = Command::new("losetup");
    cmd.args(args).arg(path);
    cmd
}

/// The loop devices backed by `image`.
pub async fn find_all(image: &Path) -> Result<Vec<PathBuf>, HostError> {
    // "/dev/loop3: [2049]:1234 (/path/img)"
    let text = output(losetup(&["--associated"], image)).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect())
}

/// The loop device backed by `image`, if one is attached.
pub async fn find(image: &Path) -> Result<Option<PathBuf>, HostError> {
    Ok(find_all(image).await?.into_iter().next())
}

/// Attaches `image` to a free loop device, or returns the one it has. A
/// device we detached while something (udev's probe, a racing blkid) still
/// had it open is only marked to clear itself on the last close, yet still
/// lists the image: it would vanish under the caller, so it does not count.
pub async fn attach(image: &Path) -> Result<PathBuf, HostError> {
    if let Some(dev) = find_all(image).await?.into_iter().find(|d| !clearing(d)) {
        return Ok(dev);
    }
    let dev = output(losetup(&["--find", "--show"], image)).await?;
    Ok(PathBuf::from(dev.trim()))
}

/// Detaches every loop device backed by `image`. The kernel may finish a
/// detach only when the device's last user closes it; a device already on
/// its way out answers ENXIO, which counts as done.
pub async fn detach(image: &Path) -> Result<(), HostError> {
    for dev in find_all(image).await? {
        detach_device(&dev).await?;
    }
    Ok(())
}

pub async fn detach_device(dev: &Path) -> Result<(), HostError> {
    match run(losetup(&["--detach"], dev)).await {
        Ok(()) => Ok(()),
        Err(HostError::Command { stderr, .. }) if stderr.contains("No such device or address") => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub fn is_loop(dev: &Path) -> bool {
    dev.to_str().is_some_and(|d| d.starts_with("/dev/loop"))
}

/// Makes the device see a grown backing file.
pub async fn refresh_size(dev: &Path) -> Result<(), HostError> {
    run(losetup(&["--set-capacity"], dev)).await
}

/// The file behind loop device `name` ("loop3"), from sysfs, or None if it
/// is not attached. A file deleted since shows without its " (deleted)".
pub fn backing_file(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let sys = Path::new("/sys/block").join(name).join("loop/backing_file");
    let text = std::fs::read_to_string(sys).ok()?;
    let text = text.trim_end_matches('\n');
    Some(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(text),
    ))
}

/// Whether a loop device is marked to detach on its last close and is not
/// mounted (a mounted one is still in use, and attaching a second device
/// to its image would let two filesystems write one image).
fn clearing(dev: &Path) -> bool {
    let marked = dev
        .file_name()
        .map(|n| Path::new("/sys/block").join(n).join("loop/autoclear"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .is_some_and(|v| v.trim() == "1");
    marked
        && super::mounts::current()
            .is_ok_and(|all| !all.iter().any(|m| Path::new(&m.source) == dev))
}
