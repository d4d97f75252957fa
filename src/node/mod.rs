//! `stowage node`: the node agent. Carries out the node-local Volumes
//! assigned to this node and reports what it offers in a StorageNode.

mod authority;
pub mod handover;
mod health;
mod refusals;
pub mod registration;
mod report;
mod volumes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::controller::Controller;
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;

use crate::backend::local::{self, Store, room};
use crate::crd::{NODE_LABEL, Volume};
use crate::quantity::parse_quantity_flag;
use crate::telemetry;
use crate::telemetry::jobs::JobMetrics;
use health::{NodeHealth, NodeReadiness};

pub const FIELD_MANAGER: &str = "stowage-node";

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Name of the Kubernetes Node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory that holds this node's volumes.
    #[arg(long, env = "STOWAGE_DATA_DIR", default_value = "/var/lib/stowage")]
    pub data_dir: PathBuf,

    /// Bytes of volumes this node may hold (e.g. 100Gi). Without it: the
    /// data filesystem's free space, plus what stowage's own images hold
    /// there, less --capacity-reserve.
    #[arg(long, env = "STOWAGE_CAPACITY", value_parser = parse_quantity_flag)]
    pub capacity: Option<i64>,

    /// Space of the data filesystem never promised to volumes, as a
    /// quantity (10Gi) or a percentage of the filesystem's size (5%). Free
    /// space below it sets the StorageNode's DiskPressure condition: no new
    /// volumes land here, and the claims of volumes here are warned.
    #[arg(long, env = "STOWAGE_CAPACITY_RESERVE", default_value = room::DEFAULT_RESERVE, value_parser = room::Reserve::parse)]
    pub capacity_reserve: room::Reserve,

    /// How often the StorageNode (capacity, DiskPressure) is reported.
    #[arg(long, env = "STOWAGE_REPORT_INTERVAL", default_value = "30s", value_parser = crate::quantity::parse_duration_flag)]
    pub report_interval: Duration,

    /// Address for `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "STOWAGE_NODE_METRICS_ADDR",
        default_value = "0.0.0.0:9809"
    )]
    pub metrics_addr: SocketAddr,

    /// kubelet's root directory: the registration socket goes in its
    /// plugins_registry, and target and staging paths must lie under it.
    #[arg(long, env = "KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Volumes created or deleted at once (each runs mkfs or removes data).
    #[arg(long, env = "STOWAGE_NODE_WORKERS", default_value_t = 4)]
    pub workers: u16,
}

impl Config {
    pub fn room(&self) -> room::Policy {
        room::Policy {
            capacity: self.capacity,
            reserve: self.capacity_reserve,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Crd(#[from] crate::crd::CrdError),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics server: {0}")]
    Http(#[source] std::io::Error),
    #[error(
        "volume {volume} is still attached as {device}; its data is deleted once kubelet unstages it"
    )]
    InUse { volume: String, device: String },
    #[error("kubelet socket: {0}")]
    Socket(#[source] crate::host::socket::SocketError),
    #[error("gRPC server: {0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error(transparent)]
    Lock(#[from] handover::LockError),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Crd(e) => e.metric_label(),
            Error::Kube(_) => "kube",
            Error::Local(_) => "local",
            Error::Host(_) => "host",
            Error::DataDir { .. } => "data_dir",
            Error::Http(_) => "http",
            Error::Socket(_) => "socket",
            Error::InUse { .. } => "in_use",
            Error::Grpc(_) => "grpc",
            Error::Lock(_) => "lock",
        }
    }
}

pub struct NodeContext {
    pub client: Client,
    pub node: String,
    pub store: Store,
    /// `--capacity`, `--capacity-reserve`.
    pub room: room::Policy,
    pub metrics: JobMetrics,
    /// Per-Volume retry delays.
    pub failures: crate::retry::Failures,
}

impl NodeContext {
    fn new(client: Client, config: &Config, metrics: JobMetrics) -> Self {
        NodeContext {
            client,
            node: config.node_name.clone(),
            store: Store::new(&config.data_dir),
            room: config.room(),
            metrics,
            failures: Default::default(),
        }
    }
}

pub async fn run(config: Config) -> Result<(), Error> {
    let client = connect(&config).await?;
    let socket = socket_path(&config.kubelet_dir);
    let Telemetry {
        metrics,
        registered,
        readiness,
        http,
    } = serve_telemetry(&config, &socket);
    tokio::pin!(http);

    // A missing kubelet directory is a wrong hostPath or --kubelet-dir:
    // creating it would register where kubelet never looks.
    while !config.kubelet_dir.is_dir() {
        let wait = tokio::time::sleep(Duration::from_secs(2));
        if unless_stopped(wait, &mut http).await?.is_none() {
            return Ok(());
        }
    }

    // During a rolling update the previous agent may still act here.
    readiness.idle("waiting for the data directory's lock (another node agent holds it)");
    let me = std::env::var("POD_NAME").unwrap_or_else(|_| format!("pid {}", std::process::id()));
    let acquire = handover::acquire(&config.data_dir, &me);
    let Some(lock) = unless_stopped(acquire, &mut http).await? else {
        return Ok(());
    };
    let lock = lock?;

    // Stop acting on SIGTERM, or when a newer agent asks to take over.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<Stop>);
    let stop = || stopped(stop_rx.clone());
    let warnings = refusals::ClaimWarnings::new(client.clone(), &config.node_name);
    let (grpc, socket_id) = serve_socket(&socket, &config, warnings, registered, stop())?;
    let ctx = Arc::new(NodeContext::new(client.clone(), &config, metrics));
    let reporter = report::Reporter::new(&ctx, &config);
    reporter.report(&ctx).await?;
    let heartbeat = heartbeat(&reporter, &ctx, config.report_interval);
    let controller = volume_controller(client, &config, ctx.clone(), &stop_rx);
    let stopping = stop_when_asked(&lock, &stop_tx);

    readiness.acting();
    tracing::info!(node = %config.node_name, data_dir = %config.data_dir.display(), "node agent started");
    // Both the CSI server and the Volume controller finish what they are
    // doing before they return; mounts are never undone on the way out.
    let result = tokio::select! {
        (res, ()) = async { tokio::join!(grpc, controller) } => res.map_err(Error::Grpc),
        res = &mut http => res.map_err(Error::Http),
        () = heartbeat => Ok(()),
        () = stopping => Ok(()),
        // kubelet may hold a connection open for good; in-flight calls get
        // a moment to finish, and a second SIGTERM cuts even that short.
        () = grace_after(stop()) => {
            tracing::warn!("CSI calls or Volume work still open {STOP_GRACE:?} after the stop; leaving them");
            Ok(())
        }
    };
    readiness.idle("stopping");
    let handed_over = match stop_tx.borrow().clone() {
        Some(Stop::HandOver(who)) => Some(who),
        _ => None,
    };
    // The newer agent renames its socket over ours: removing ours would
    // make kubelet see the plugin go away in between.
    if handed_over.is_none() {
        socket_id.remove_if_still_at(&socket);
    }
    drop(lock);
    result?;
    if let Some(who) = handed_over {
        idle_after_handover(&who, &readiness, &mut http).await?;
    }
    tracing::info!("node agent stopped");
    Ok(())
}

/// The API server, with our CRDs established, and the data directory.
async fn connect(config: &Config) -> Result<Client, Error> {
    let client = crate::kubeapi::client("node")
        .await
        .map_err(crate::crd::CrdError::Connect)?;
    crate::crd::ensure_established(&client).await?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    Ok(client)
}

/// The agent's metrics, and `/metrics`, `/healthz` and `/readyz` served
/// once `http` is polled.
struct Telemetry<H> {
    metrics: JobMetrics,
    /// Whether kubelet accepted the plugin registration.
    registered: Gauge<i64, AtomicI64>,
    readiness: Arc<NodeReadiness>,
    http: H,
}

fn serve_telemetry(
    config: &Config,
    socket: &std::path::Path,
) -> Telemetry<impl Future<Output = std::io::Result<()>> + use<>> {
    let mut root = telemetry::registry();
    let registry = root.sub_registry_with_prefix("stowage_node");
    let metrics = JobMetrics::register(registry);
    let registered = Gauge::<i64, AtomicI64>::default();
    registered.set(-1);
    registry.register(
        "kubelet_registered",
        "1 once kubelet accepted the plugin registration, 0 if it refused, -1 before either",
        registered.clone(),
    );
    let health = Arc::new(NodeHealth {
        socket: socket.to_path_buf(),
        data_dir: config.data_dir.clone(),
    });
    let readiness = Arc::new(NodeReadiness {
        kubelet_dir: config.kubelet_dir.clone(),
        idle: Mutex::new(Some("starting".into())),
    });
    if let Err(problem) = readiness.kubelet_dir_problem() {
        tracing::error!("{problem}");
    }
    let http = telemetry::serve_http(
        config.metrics_addr,
        Arc::new(root),
        health,
        readiness.clone(),
    );
    Telemetry {
        metrics,
        registered,
        readiness,
        http,
    }
}

/// `work`'s output, or None when a signal stops the agent (or the metrics
/// server ends) first; the metrics server's failure is returned.
async fn unless_stopped<T, H>(
    work: impl Future<Output = T>,
    http: &mut std::pin::Pin<&mut H>,
) -> Result<Option<T>, Error>
where
    H: Future<Output = std::io::Result<()>>,
{
    tokio::select! {
        done = work => Ok(Some(done)),
        res = http => res.map(|()| None).map_err(Error::Http),
        () = crate::telemetry::shutdown_signal() => Ok(None),
    }
}

/// Tells everything to stop acting at SIGTERM, or when a newer agent asks
/// to take over; never resolves.
async fn stop_when_asked(
    lock: &handover::AgentLock,
    stop: &tokio::sync::watch::Sender<Option<Stop>>,
) {
    let why = tokio::select! {
        () = crate::telemetry::shutdown_signal() => Stop::Signal,
        who = lock.handover_requested() => Stop::HandOver(who),
    };
    let _ = stop.send(Some(why));
    std::future::pending::<()>().await
}

/// Resolves once the agent is told to stop acting.
async fn stopped(mut stop: tokio::sync::watch::Receiver<Option<Stop>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// Resolves `STOP_GRACE` after `stop`, or at a second SIGTERM.
async fn grace_after(stop: impl Future<Output = ()>) {
    stop.await;
    tokio::select! {
        () = tokio::time::sleep(STOP_GRACE) => {}
        () = crate::telemetry::shutdown_signal() => {}
    }
}

/// Reports the StorageNode every `interval`, for good.
async fn heartbeat(reporter: &report::Reporter, ctx: &NodeContext, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = reporter.report(ctx).await {
            tracing::warn!(error = %e, "reporting StorageNode failed");
        }
    }
}

/// The Volumes of this node, carried out by `volumes::reconcile` until
/// `stop` says so.
fn volume_controller(
    client: Client,
    config: &Config,
    ctx: Arc<NodeContext>,
    stop: &tokio::sync::watch::Receiver<Option<Stop>>,
) -> impl Future<Output = ()> + use<> {
    let mine = watcher::Config::default().labels(&format!("{NODE_LABEL}={}", config.node_name));
    // Only spec changes and deletion (both bump the generation) are work
    // for the node; reacting to status writes, our own included, would
    // retry a failure at once instead of after its backoff.
    let (cache, writer) = reflector::store();
    let changes = watcher(Api::<Volume>::all(client), mine)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let volumes = Controller::for_stream(changes, cache)
        .with_config(kube::runtime::controller::Config::default().concurrency(config.workers))
        .graceful_shutdown_on(stopped(stop.clone()));
    let cache = volumes.store();
    let volumes = volumes
        .run(volumes::reconcile, volumes::error_policy, ctx)
        .for_each(|_| async {});
    let stop = stop.clone();
    // kube-runtime's graceful stop waits for the cache, and the cache stops
    // loading once asked to stop: a stop before the cache was ready would
    // never end. Before it is ready no reconcile has run, so nothing needs
    // finishing and the controller can simply be dropped.
    async move {
        tokio::select! {
            () = volumes => {}
            () = async {
                stopped(stop).await;
                if cache.wait_until_ready().now_or_never().is_some() {
                    std::future::pending::<()>().await;
                }
            } => tracing::debug!("stopped before the Volume cache was ready"),
        }
    }
}

/// After a hand-over: not ready, serving metrics until stopped.
async fn idle_after_handover<H>(
    who: &str,
    readiness: &NodeReadiness,
    http: &mut std::pin::Pin<&mut H>,
) -> Result<(), Error>
where
    H: Future<Output = std::io::Result<()>>,
{
    tracing::info!(to = %who, "handed this node over to a newer agent; idle until stopped");
    readiness.idle(&format!("handed over to {who}; idle until stopped"));
    tokio::select! {
        res = http => res.map_err(Error::Http)?,
        () = crate::telemetry::shutdown_signal() => {}
    }
    Ok(())
}

/// How long calls in flight may finish once the agent stops acting. Every
/// call is idempotent and kubelet retries it, so one cut short is redone by
/// whichever agent acts next.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why the agent stops acting.
#[derive(Debug, Clone)]
enum Stop {
    Signal,
    /// A newer agent on this node (named) takes over.
    HandOver(String),
}

/// `<kubelet-dir>/plugins_registry/<driver>-reg.sock`
pub fn socket_path(kubelet_dir: &std::path::Path) -> PathBuf {
    kubelet_dir
        .join("plugins_registry")
        .join(format!("{}-reg.sock", local::DRIVER_NAME))
}

/// Registration, CSI Identity and CSI Node on one unix socket.
fn serve_socket<S: Future<Output = ()> + Send + 'static>(
    socket: &std::path::Path,
    config: &Config,
    warnings: refusals::ClaimWarnings,
    registered: Gauge<i64, AtomicI64>,
    stop: S,
) -> Result<
    (
        impl Future<Output = Result<(), tonic::transport::Error>> + use<S>,
        crate::host::socket::SocketId,
    ),
    Error,
> {
    use crate::csi::{VolumeLocks, identity::IdentityService, node::NodeService};
    use crate::host::socket;
    use crate::proto::csi::v1::{identity_server::IdentityServer, node_server::NodeServer};
    use crate::proto::pluginregistration::registration_server::RegistrationServer;
    let (listener, id) = socket::bind_replacing(socket).map_err(Error::Socket)?;
    tracing::info!(socket = %socket.display(), "serving plugin registration, CSI Identity and Node");
    let node = NodeService {
        store: Store::new(&config.data_dir),
        room: config.room(),
        node: config.node_name.clone(),
        kubelet_dir: config.kubelet_dir.clone(),
        // kubelet is the only caller here.
        paths: crate::host::paths::Layout::Kubelet,
        locks: VolumeLocks::default(),
        refusals: Some(Arc::new(warnings)),
    };
    let server = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(registration::RegistrationService {
            driver: local::DRIVER_NAME.into(),
            registered,
        }))
        .add_service(IdentityServer::new(IdentityService {
            driver: local::DRIVER_NAME.into(),
            controller: false,
        }))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(authority::incoming(listener), stop);
    Ok((server, id))
}
