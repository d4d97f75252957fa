//! `stowage csi`: one backend as a plain CSI endpoint on a unix socket.

use std::path::PathBuf;

use tokio_stream::wrappers::UnixListenerStream;

use super::VolumeLocks;
use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use crate::backend::local::{self, Store};
use crate::host::socket::{SocketError, bind, socket_path};
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
    pub request_paths: crate::host::paths::Layout,

    /// Bytes of volumes this endpoint may create (e.g. 100Gi).
    #[arg(long, value_parser = crate::quantity::parse_quantity_flag, default_value = "1Ti")]
    pub capacity: i64,

    /// Driver name answered by GetPluginInfo: serving the backend under a
    /// name of its own lets a controller drive it with `--csi-driver`
    /// beside the built-in `local.stowage.dev`.
    #[arg(long, default_value = local::DRIVER_NAME)]
    pub driver_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

pub async fn run(config: Config) -> Result<(), ServeError> {
    let Backend::Local = config.backend;
    let socket = socket_path(&config.endpoint)?;
    let store = Store::new(&config.data_dir);
    let locks = VolumeLocks::default();
    // A fixed capacity: the endpoint serves tests and benchmarks, whose
    // volumes must not depend on the host's free space.
    let room = crate::backend::local::room::Policy {
        capacity: Some(config.capacity),
        reserve: crate::backend::local::room::Reserve::Bytes(0),
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
            refusals: None,
            locks,
        }))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            crate::telemetry::shutdown_signal(),
        )
        .await;
    let _ = std::fs::remove_file(&socket);
    Ok(result?)
}
