//! Unix sockets a role serves on: binding over a stale socket, and handing
//! a socket path from one agent to the next without a gap.

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("--endpoint {0:?} must be unix:///absolute/path")]
    Endpoint(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn socket_path(endpoint: &str) -> Result<PathBuf, SocketError> {
    let path = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| SocketError::Endpoint(endpoint.into()))?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(SocketError::Endpoint(endpoint.into()));
    }
    Ok(path)
}

/// Binds a unix socket, replacing a stale one left by a previous run.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |op| {
        move |source| SocketError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating"))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing")(e)),
    }
    UnixListener::bind(path).map_err(io("binding"))
}

/// Which file a socket path names, so that an agent removes its socket on
/// exit only while the path is still its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketId {
    dev: u64,
    ino: u64,
}

impl SocketId {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Removes `path` if it still names this socket.
    pub fn remove_if_still_at(self, path: &Path) {
        if SocketId::of(path).is_ok_and(|now| now == self) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a unix socket under a hidden name beside `path`, then renames it
/// over `path` in one step: kubelet's plugin watcher ignores names starting
/// with a dot and sees one creation at `path`, and a client never finds the
/// path missing while one agent takes over from another.
pub fn bind_replacing(path: &Path) -> Result<(UnixListener, SocketId), SocketError> {
    let io = |op| {
        move |source| SocketError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(io("creating"))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let hidden = parent.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&hidden);
    let listener = UnixListener::bind(&hidden).map_err(io("binding"))?;
    std::fs::rename(&hidden, path).map_err(io("renaming onto"))?;
    let id = SocketId::of(path).map_err(io("inspecting"))?;
    Ok((listener, id))
}
