//! Snapshots of image volumes, on the volume's own node:
//! `<data-dir>/snapshots/<id>.img`, a point-in-time copy of the image
//! (a reflink where the data directory's filesystem shares blocks, a
//! sparse copy otherwise), with `<id>.json` saying what it was cut from.
//! New volumes start from a snapshot or from another volume by the same
//! copy. Every file is written under a temporary name and renamed when
//! complete, so a crash never leaves a half snapshot under the real name.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{LocalError, Store, validate_volume_id};
use crate::host::HostError;
use crate::host::process::io;

/// What a snapshot was cut from, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub id: String,
    pub source_volume: String,
    pub size_bytes: i64,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: i64,
}

impl Store {
    fn snapshot_root(&self) -> PathBuf {
        self.root
            .parent()
            .map_or_else(|| PathBuf::from("snapshots"), |d| d.join("snapshots"))
    }

    pub fn snapshot_path(&self, id: &str) -> Result<PathBuf, LocalError> {
        validate_volume_id(id)?;
        Ok(self.snapshot_root().join(format!("{id}.img")))
    }

    fn snapshot_meta_path(&self, id: &str) -> Result<PathBuf, LocalError> {
        validate_volume_id(id)?;
        Ok(self.snapshot_root().join(format!("{id}.json")))
    }

    /// Copies volume `volume`'s image as snapshot `id`. The caller keeps
    /// the volume still for the copy (a frozen or unmounted filesystem).
    pub async fn cut_snapshot(&self, id: &str, volume: &str) -> Result<SnapshotInfo, LocalError> {
        let source = self.image_path(volume)?;
        let image = self.snapshot_path(id)?;
        let meta = self.snapshot_meta_path(id)?;
        let root = self.snapshot_root();
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(io("creating", &root))?;
        let size_bytes = tokio::fs::metadata(&source)
            .await
            .map_err(io("reading", &source))?
            .len() as i64;
        let info = SnapshotInfo {
            id: id.to_string(),
            source_volume: volume.to_string(),
            size_bytes,
            created_ns: now_ns(),
        };
        let tmp = image.with_extension("img.tmp");
        copy_image(&source, &tmp, size_bytes).await?;
        let text = serde_json::to_vec(&info).expect("snapshot info serializes");
        let meta_tmp = meta.with_extension("json.tmp");
        tokio::fs::write(&meta_tmp, text)
            .await
            .map_err(io("writing", &meta_tmp))?;
        tokio::fs::rename(&meta_tmp, &meta)
            .await
            .map_err(io("renaming", &meta_tmp))?;
        tokio::fs::rename(&tmp, &image)
            .await
            .map_err(io("renaming", &tmp))?;
        Ok(info)
    }

    /// The snapshot `id`, if it is complete.
    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>, LocalError> {
        let image = self.snapshot_path(id)?;
        if tokio::fs::metadata(&image).await.is_err() {
            return Ok(None);
        }
        let meta = self.snapshot_meta_path(id)?;
        let text = tokio::fs::read(&meta).await.map_err(io("reading", &meta))?;
        let info = serde_json::from_slice(&text).map_err(|e| HostError::Io {
            op: "parsing",
            path: meta.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Ok(Some(info))
    }

    /// Every complete snapshot, by id.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, LocalError> {
        let root = self.snapshot_root();
        let mut entries = match tokio::fs::read_dir(&root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("listing", &root)(e).into()),
        };
        let mut out = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io("listing", &root))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".img")
                && let Some(info) = self.snapshot(id).await?
            {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Removes snapshot `id`; succeeds when it is already gone.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), LocalError> {
        let image = self.snapshot_path(id)?;
        let meta = self.snapshot_meta_path(id)?;
        // The image first: without it the snapshot no longer exists.
        for path in [
            image.clone(),
            image.with_extension("img.tmp"),
            meta.with_extension("json.tmp"),
            meta,
        ] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &path)(e).into()),
            }
        }
        Ok(())
    }

    /// Creates image volume `id` as a copy of `source` (a snapshot's or
    /// another volume's image), grown to `bytes` when that is larger; its
    /// filesystem grows when it is next staged. Returns its size.
    pub async fn create_from(
        &self,
        id: &str,
        source: &Path,
        bytes: i64,
    ) -> Result<i64, LocalError> {
        let image = self.image_path(id)?;
        if let Ok(meta) = tokio::fs::metadata(&image).await {
            return Ok(meta.len() as i64);
        }
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(io("creating", &self.root))?;
        let size = tokio::fs::metadata(source)
            .await
            .map_err(io("reading", source))?
            .len() as i64;
        let tmp = image.with_extension("img.tmp");
        copy_image(source, &tmp, size).await?;
        let bytes = bytes.max(size);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(io("opening", &tmp))?;
        file.set_len(bytes as u64).map_err(io("sizing", &tmp))?;
        drop(file);
        tokio::fs::rename(&tmp, &image)
            .await
            .map_err(io("renaming", &tmp))?;
        Ok(bytes)
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Copies `len` bytes of `from` to a new `to`: a reflink (FICLONE) where
/// the filesystem shares blocks, otherwise only the data ranges (holes
/// stay holes), on a blocking thread.
async fn copy_image(from: &Path, to: &Path, len: i64) -> Result<(), LocalError> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&to);
        let result = copy_blocking(&from, &to, len);
        if result.is_err() {
            let _ = std::fs::remove_file(&to);
        }
        result
    })
    .await
    .expect("copy thread panicked")
}

fn copy_blocking(from: &Path, to: &Path, len: i64) -> Result<(), LocalError> {
    let source = std::fs::File::open(from).map_err(io("opening", from))?;
    let target = std::fs::File::create(to).map_err(io("creating", to))?;
    // SAFETY: both descriptors are open for the whole call.
    let cloned = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if cloned == 0 {
        return target.sync_all().map_err(|e| io("syncing", to)(e).into());
    }
    target.set_len(len as u64).map_err(io("sizing", to))?;
    let mut offset: i64 = 0;
    while offset < len {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(source.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past offset.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(source.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole.min(len) };
        copy_range(&source, &target, data, end - data).map_err(io("copying", from))?;
        offset = end;
    }
    target.sync_all().map_err(io("syncing", to))?;
    Ok(())
}

/// Copies `len` bytes at `offset` between the files (same offset in both).
fn copy_range(
    source: &std::fs::File,
    target: &std::fs::File,
    offset: i64,
    len: i64,
) -> std::io::Result<()> {
    let (mut from, mut to) = (offset, offset);
    let mut left = len;
    while left > 0 {
        // SAFETY: both descriptors are open; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                &mut from,
                target.as_raw_fd(),
                &mut to,
                left as usize,
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source ended before its data range",
            ));
        }
        left -= n as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_is_a_sparse_point_in_time_copy_and_restores_grown() {
        let dir = std::env::temp_dir().join(format!("stowage-snapshots-{}", std::process::id()));
        let store = Store::new(&dir);
        tokio::fs::create_dir_all(store.root()).await.unwrap();
        use std::os::unix::fs::FileExt;
        let volume = store.image_path("vol").unwrap();
        let file = std::fs::File::create(&volume).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_at(b"before", 0).unwrap();
        drop(file);

        let info = store.cut_snapshot("snap", "vol").await.unwrap();
        assert_eq!(info.source_volume, "vol");
        assert_eq!(info.size_bytes, 64 << 20);
        // Later writes to the volume are not in the snapshot.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .unwrap();
        f.write_at(b"after!", 0).unwrap();
        let snap = store.snapshot_path("snap").unwrap();
        let mut head = [0u8; 6];
        std::fs::File::open(&snap)
            .unwrap()
            .read_exact_at(&mut head, 0)
            .unwrap();
        assert_eq!(&head, b"before");
        // Holes stay holes.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&snap).unwrap().blocks() * 512 < 1 << 20);

        assert_eq!(store.snapshot("snap").await.unwrap(), Some(info.clone()));
        assert_eq!(store.snapshots().await.unwrap(), vec![info]);
        let restored = store.create_from("copy", &snap, 128 << 20).await.unwrap();
        assert_eq!(restored, 128 << 20);
        let mut head = [0u8; 6];
        std::fs::File::open(store.image_path("copy").unwrap())
            .unwrap()
            .read_exact_at(&mut head, 0)
            .unwrap();
        assert_eq!(&head, b"before");

        store.delete_snapshot("snap").await.unwrap();
        store.delete_snapshot("snap").await.unwrap();
        assert_eq!(store.snapshot("snap").await.unwrap(), None);
        assert!(store.snapshots().await.unwrap().is_empty());
        assert!(store.cut_snapshot("../x", "vol").await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
