//! `local.stowage.dev`: a volume is a sparse image file formatted ext4 or xfs
//! on one node (or a plain directory with `layout: dir`). The node agent of
//! that node creates and deletes it; the controller only records intent.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::compact_map::StringMap;
use crate::host::HostError;
use crate::host::process::{io, run};

pub mod room;
pub mod snapshots;

pub const DRIVER_NAME: &str = "local.stowage.dev";
/// Topology key every node-local volume is pinned by.
pub const TOPOLOGY_KEY: &str = "topology.stowage.dev/node";

const MIB: i64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Smallest image the filesystem can be made on (xfs refuses < 300 MiB).
    pub fn min_bytes(self) -> i64 {
        match self {
            FsType::Ext4 => 16 * MIB,
            FsType::Xfs => 300 * MIB,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// A sparse image file with a filesystem: size enforced, Block mode works.
    #[default]
    Image,
    /// A plain directory: no size enforcement, Filesystem mode only.
    Dir,
}

/// StorageClass parameters of `local.stowage.dev`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parameters {
    /// `fsType` (or the standard `csi.storage.k8s.io/fstype`): ext4 (default) or xfs.
    pub fs_type: FsType,
    /// `layout`: image (default) or dir.
    pub layout: Layout,
    /// `preallocate`: "true" allocates every block of the image when it is
    /// made and when it grows, so the data filesystem cannot fill up under
    /// the volume; "false" (default) leaves it sparse. Images only.
    pub preallocate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    #[error(
        "unknown StorageClass parameter {0:?}: {DRIVER_NAME} accepts fsType (ext4 or xfs), layout (image or dir) and preallocate (true or false)"
    )]
    Unknown(String),
    #[error("StorageClass parameter {key}: {value:?} is not supported; use ext4 or xfs")]
    FsType { key: String, value: String },
    #[error("StorageClass parameter layout: {0:?} is not supported; use image or dir")]
    Layout(String),
    #[error("StorageClass parameter preallocate: {0:?} is not a boolean; use true or false")]
    Preallocate(String),
    #[error(
        "StorageClass parameter preallocate: a directory has no blocks to allocate; remove it or use layout image"
    )]
    PreallocateDir,
}

/// Keys with this prefix are Kubernetes' own (secrets, fstype) and are
/// accepted by every driver.
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

impl Parameters {
    pub fn parse(params: &impl StringMap) -> Result<Self, ParameterError> {
        let mut out = Parameters::default();
        for (key, value) in params.iter() {
            match key.as_str() {
                "fsType" | "csi.storage.k8s.io/fstype" => {
                    out.fs_type = match value.to_ascii_lowercase().as_str() {
                        "" | "ext4" => FsType::Ext4,
                        "xfs" => FsType::Xfs,
                        _ => {
                            return Err(ParameterError::FsType {
                                key: key.clone(),
                                value: value.clone(),
                            });
                        }
                    }
                }
                "layout" => {
                    out.layout = match value.as_str() {
                        "image" => Layout::Image,
                        "dir" => Layout::Dir,
                        _ => return Err(ParameterError::Layout(value.clone())),
                    }
                }
                "preallocate" => {
                    out.preallocate = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(ParameterError::Preallocate(value.clone())),
                    }
                }
                k if k.starts_with(RESERVED_PREFIX) => {}
                _ => return Err(ParameterError::Unknown(key.clone())),
            }
        }
        if out.preallocate && out.layout == Layout::Dir {
            return Err(ParameterError::PreallocateDir);
        }
        Ok(out)
    }

    /// The size actually created for a request: whole MiB, at least what
    /// the filesystem needs. None when rounding up leaves the range of a
    /// CSI size (int64): such a request can never be met.
    pub fn checked_allocated_bytes(&self, requested: i64) -> Option<i64> {
        let rounded = (requested.max(0) as u64)
            .div_ceil(MIB as u64)
            .checked_mul(MIB as u64)
            .and_then(|b| i64::try_from(b).ok())?;
        Some(match self.layout {
            Layout::Image => rounded.max(self.fs_type.min_bytes()),
            Layout::Dir => rounded,
        })
    }

    /// `checked_allocated_bytes`, with a size that cannot be met saturated
    /// to i64::MAX: more than any node has room for, so it waits for room
    /// (and says so) instead of wrapping round to a tiny volume.
    pub fn allocated_bytes(&self, requested: i64) -> i64 {
        self.checked_allocated_bytes(requested).unwrap_or(i64::MAX)
    }

    /// Whether growing the data leaves work for the node's NodeExpandVolume
    /// (a loop device to refresh, a filesystem to grow). Directories have
    /// neither.
    pub fn needs_node_expansion(&self) -> bool {
        self.layout == Layout::Image
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("volume name {0:?} is not a valid volume id")]
    InvalidName(String),
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Where volumes live on a node: `<data-dir>/volumes/<name>.img` or
/// `<data-dir>/volumes/<name>/`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A volume id is one path component of safe characters: it is joined to the
/// data directory and must never name anything outside it.
pub fn validate_volume_id(id: &str) -> Result<(), LocalError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(LocalError::InvalidName(id.to_string()))
    }
}

impl Store {
    pub fn new(data_dir: &Path) -> Self {
        Store {
            root: data_dir.join("volumes"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn image_path(&self, id: &str) -> Result<PathBuf, LocalError> {
        validate_volume_id(id)?;
        Ok(self.root.join(format!("{id}.img")))
    }

    pub fn dir_path(&self, id: &str) -> Result<PathBuf, LocalError> {
        validate_volume_id(id)?;
        Ok(self.root.join(id))
    }

    /// Creates the volume if it does not exist yet, or grows it to `bytes`;
    /// returns its size. An
    /// image is built under a temporary name and renamed when formatted, so
    /// a crash mid-way leaves no half-made volume under the real name. Block
    /// volumes (`format: false`) stay raw, as their users expect.
    pub async fn create(
        &self,
        id: &str,
        params: Parameters,
        bytes: i64,
        format: bool,
    ) -> Result<i64, LocalError> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(io("creating", &self.root))?;
        match params.layout {
            Layout::Dir => {
                let dir = self.dir_path(id)?;
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(io("creating", &dir))?;
                Ok(bytes)
            }
            Layout::Image => {
                let image = self.image_path(id)?;
                if tokio::fs::metadata(&image).await.is_ok() {
                    return self.grow(id, bytes).await;
                }
                let tmp = image.with_extension("img.tmp");
                let _ = tokio::fs::remove_file(&tmp).await;
                let file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
                file.set_len(bytes as u64).map_err(io("sizing", &tmp))?;
                drop(file);
                crate::failpoint::hit("node-after-image-sized");
                if format && let Err(e) = mkfs(params.fs_type, &tmp).await {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
                // After mkfs, which would punch holes in a preallocated
                // file (it discards the device it formats).
                if params.preallocate
                    && let Err(e) = allocate(&tmp, 0, bytes)
                {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
                crate::failpoint::hit("node-after-mkfs");
                tokio::fs::rename(&tmp, &image)
                    .await
                    .map_err(io("renaming", &tmp))?;
                Ok(bytes)
            }
        }
    }

    /// Grows an image file (never shrinks it); returns its size. An image
    /// whose every block is allocated was made with `preallocate`, and its
    /// growth is allocated too.
    pub async fn grow(&self, id: &str, bytes: i64) -> Result<i64, LocalError> {
        use std::os::unix::fs::MetadataExt;
        let image = self.image_path(id)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(io("opening", &image))?;
        let meta = file.metadata().map_err(io("reading", &image))?;
        let current = meta.len() as i64;
        let preallocated = current > 0 && meta.blocks() as i64 * 512 >= current;
        if bytes > current {
            if preallocated {
                if let Err(e) = allocate(&image, current, bytes - current) {
                    // Blocks allocated before ENOSPC lie past the old end.
                    let _ = file.set_len(current as u64);
                    return Err(e);
                }
            } else {
                file.set_len(bytes as u64).map_err(io("growing", &image))?;
            }
            crate::failpoint::hit("node-after-image-grown");
        }
        Ok(bytes.max(current))
    }

    /// Removes the volume's data; succeeds when it is already gone.
    pub async fn delete(&self, id: &str) -> Result<(), LocalError> {
        let image = self.image_path(id)?;
        for path in [image.with_extension("img.tmp"), image] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io("removing", &path)(e).into());
                }
            }
        }
        let dir = self.dir_path(id)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &dir)(e).into()),
        }
    }

    /// Names of the volumes present on disk.
    pub async fn list(&self) -> Result<Vec<String>, LocalError> {
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(io("listing", &self.root)(e).into());
            }
        };
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(io("listing", &self.root))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".img") {
                out.push(id.to_string());
            } else if entry.path().is_dir() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Allocates `len` bytes of `path` from `offset` (fallocate mode 0: holes
/// get blocks, data stays, the file grows to cover the range). ENOSPC when
/// the filesystem has not the blocks.
fn allocate(path: &Path, offset: i64, len: i64) -> Result<(), LocalError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io("opening", path))?;
    // SAFETY: the descriptor is open for writing for the whole call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
    if rc != 0 {
        return Err(io("preallocating", path)(std::io::Error::last_os_error()).into());
    }
    Ok(())
}

async fn mkfs(fs: FsType, path: &Path) -> Result<(), LocalError> {
    let mut cmd = match fs {
        FsType::Ext4 => {
            let mut c = Command::new("mkfs.ext4");
            // No lazy init: the image is sparse anyway, and lazy init would
            // keep a kernel thread writing after the first mount.
            c.args([
                "-F",
                "-q",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-m",
                "0",
            ]);
            c
        }
        FsType::Xfs => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-f", "-q"]);
            c
        }
    };
    cmd.arg(path);
    Ok(run(cmd).await?)
}

#[cfg(test)]
mod tests;
