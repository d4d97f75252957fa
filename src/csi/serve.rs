//! `stowage csi`: one backend as a plain CSI endpoint on a unix socket.

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::VolumeLocks;
use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use crate::backend::local::{self, Store};
use crate::proto::csi::v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Image files (or directories) under --data-dir on this node.
    Local,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Which backend to serve.
    #[arg(long, value_enum, default_value = "local")]
    pub backend: Backend,

    /// Where to listen, as unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,

    /// Node id reported by NodeGetInfo and used as the volumes' topology.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory that holds the volumes.
    #[arg(long, default_value = "/var/lib/stowage")]
    pub data_dir: PathBuf,

    /// Target and staging paths in requests must lie under this directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Which paths under --kubelet-dir requests may name: `kubelet`, only
    /// the staging and target paths kubelet builds; `beneath`, any path
    /// beneath it (csi-sanity makes directories of its own). Either way
    /// no path may run through a symlink.
    #[arg(long, value_enum, default_value = "kubelet")]
    pub request_paths: crate::node::paths::Layout,

    /// Bytes of volumes this endpoint may create (e.g. 100Gi).
    #[arg(long, value_parser = crate::node::parse_quantity, default_value = "1Ti")]
    pub capacity: i64,

    /// Driver name answered by GetPluginInfo: serving the backend under a
    /// name of its own lets a controller drive it with `--csi-driver`
    /// beside the built-in `local.stowage.dev`.
    #[arg(long, default_value = local::DRIVER_NAME)]
    pub driver_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--endpoint {0:?} must be unix:///absolute/path")]
    Endpoint(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| ServeError::Endpoint(endpoint.into()))?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(ServeError::Endpoint(endpoint.into()));
    }
    Ok(path)
}

/// Binds a unix socket, replacing a stale one left by a previous run.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let io = |op| {
        move |source| ServeError::Io {
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
pub fn bind_replacing(path: &Path) -> Result<(UnixListener, SocketId), ServeError> {
    let io = |op| {
        move |source| ServeError::Io {
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

pub async fn run(config: Config) -> Result<(), ServeError> {
    let Backend::Local = config.backend;
    let socket = socket_path(&config.endpoint)?;
    let store = Store::new(&config.data_dir);
    let locks = VolumeLocks::default();
    // A fixed capacity: the endpoint serves tests and benchmarks, whose
    // volumes must not depend on the host's free space.
    let room = crate::node::room::Policy {
        capacity: Some(config.capacity),
        reserve: crate::node::room::Reserve::Bytes(0),
    };
    let listener = bind(&socket)?;
    tracing::info!(socket = %socket.display(), driver = %config.driver_name, "serving CSI Identity, Controller and Node");
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService {
            driver: config.driver_name.clone(),
            controller: true,
        }))
        .add_service(ControllerServer::new(ControllerService {
            store: store.clone(),
            node: config.node_name.clone(),
            room,
            locks: locks.clone(),
        }))
        .add_service(NodeServer::new(NodeService {
            store,
            room,
            node: config.node_name,
            kubelet_dir: config.kubelet_dir,
            paths: config.request_paths,
            locks,
        }))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            crate::controller::shutdown_signal(),
        )
        .await;
    let _ = std::fs::remove_file(&socket);
    Ok(result?)
}
