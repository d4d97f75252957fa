//! `stowage controller`: the cluster-wide jobs of the CSI sidecars, run from
//! one set of shared informers.

pub mod attach;
pub mod bind;
pub mod cached_claim;
pub mod cached_pv;
mod cached_view;
mod capacity;
mod claims;
mod clone_protection;
mod context;
pub mod forbidden;
mod health;
pub mod informer;
mod job;
pub mod leader;
pub mod lifecycle;
mod metrics;
pub mod modify;
mod node_liveness;
mod pending;
pub mod protocol;
pub mod provision;
pub mod reclaim;
mod reference_grants;
pub mod release;
mod remote_volumes;
pub mod resize;
mod scope;
pub mod secrets;
mod snapshot_contents;
mod static_pvs;
mod storage_capacity;
mod superseded;
mod volumes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;

use crate::backend::csi_proxy::{Capability, DriverEndpoint};
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::Volume;
use crate::quantity::parse_duration_flag;
use crate::telemetry;
use crate::telemetry::csi_calls::CsiCalls;

pub use context::{Context, Stores};
pub use metrics::Metrics;

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address for `/metrics` and `/healthz`.
    #[arg(long, env = "STOWAGE_METRICS_ADDR", default_value = "0.0.0.0:9808")]
    pub metrics_addr: SocketAddr,

    /// Take part in leader election so that only one replica acts at a time.
    #[arg(long, env = "STOWAGE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "stowage-system")]
    pub leader_election_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = "stowage-controller")]
    pub leader_election_lease: String,

    /// Objects each job works on at once.
    #[arg(long, env = "STOWAGE_WORKERS", default_value_t = 16)]
    pub workers: u16,

    /// This replica's identity in the Lease; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Another CSI driver to serve in place of its sidecars (provisioning,
    /// attach/detach): its name and controller socket. Repeatable.
    #[arg(long = "csi-driver", value_name = "NAME=unix:///PATH")]
    pub csi_drivers: Vec<DriverEndpoint>,

    /// Serve the built-in `local.stowage.dev` driver. Turn off in a
    /// controller deployed beside another driver only (`--csi-driver`), so
    /// that it and the cluster's main stowage controller never act on the
    /// same claims.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub serve_local: bool,

    /// Deadline of each call to a `--csi-driver`, e.g. 30s or 500ms.
    #[arg(long, default_value = "30s", value_parser = parse_duration_flag)]
    pub csi_timeout: Duration,

    /// Add the claim's name and namespace and the PV's name to the
    /// parameters of each CreateVolume to a `--csi-driver`
    /// (`csi.storage.k8s.io/pvc/name`, `csi.storage.k8s.io/pvc/namespace`,
    /// `csi.storage.k8s.io/pv/name`), as external-provisioner's flag of the
    /// same name does.
    #[arg(
        long,
        default_value_t = false,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub extra_create_metadata: bool,

    /// Let a claim's `dataSourceRef` name a VolumeSnapshot or claim in
    /// another namespace, as external-provisioner's
    /// `--feature-gates=CrossNamespaceVolumeDataSource=true` does: allowed
    /// when a Gateway API ReferenceGrant in the source's namespace lets
    /// claims of the claim's namespace refer to it. Needs kube-apiserver's
    /// CrossNamespaceVolumeDataSource feature gate (else it drops the
    /// namespace) and RBAC to read `referencegrants`.
    #[arg(
        long,
        default_value_t = false,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub cross_namespace_data_sources: bool,

    /// `/healthz` fails when a watch has been listing this long without any
    /// progress (no event, list not complete), e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = parse_duration_flag)]
    pub health_stall_timeout: Duration,

    /// On SIGTERM, how long reconciles already running may take to finish
    /// before they are abandoned and the lease is released. Keep it well
    /// inside the pod's termination grace period.
    #[arg(long, default_value = "3s", value_parser = parse_duration_flag)]
    pub shutdown_timeout: Duration,

    /// When kube-controller-manager's PV binder runs, how long it may bind a
    /// new PV to its claim before stowage does it itself. Both at once make
    /// one write fail and kcm warn on the claim; binding before kcm's cache
    /// has the PV can make it mark the claim Lost. 0s binds at once.
    #[arg(long, default_value = "2s", value_parser = parse_duration_flag)]
    pub kcm_binder_grace: Duration,

    /// Publish CSIStorageCapacity objects in the controller's namespace,
    /// so that kube-scheduler places pods only where their volumes fit:
    /// one per StorageClass of `local.stowage.dev` and node, and for each
    /// `--csi-driver` offering GET_CAPACITY one per WaitForFirstConsumer
    /// class and topology segment. Pair `false` with `storageCapacity:
    /// false` in the CSIDriver, or the scheduler finds room nowhere.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_capacity: bool,

    /// How often every CSIStorageCapacity is compared with what it should
    /// say (a driver is asked again), besides on each change of nodes,
    /// volumes and classes.
    #[arg(long, default_value = "1m", value_parser = parse_duration_flag)]
    pub capacity_poll_interval: Duration,

    /// A StorageNode whose agent has not reported for this long is marked
    /// `Ready=False` (`HeartbeatExpired`) and gets no new volumes. Keep it
    /// a few times the agents' `--report-interval` (30s).
    #[arg(long, default_value = "2m", value_parser = parse_duration_flag)]
    pub node_heartbeat_timeout: Duration,

    /// How often the VolumeAttachments of each `--csi-driver` whose
    /// ListVolumes reports published nodes are compared with the driver,
    /// as external-attacher's `--reconcile-sync`: an attached volume the
    /// driver no longer has published is published again. 0s turns it off.
    #[arg(long, default_value = "1m", value_parser = parse_duration_flag)]
    pub attach_reconcile_interval: Duration,
}

/// Errors of the controller as a whole; each job adds its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Kubernetes API: {0}. Set KUBECONFIG or run inside a cluster")]
    Connect(#[source] kube::Error),
    #[error(transparent)]
    Crd(#[from] crate::crd::CrdError),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("metrics server: {0}")]
    Http(#[source] std::io::Error),
    #[error("metrics server stopped")]
    HttpStopped,
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Election(#[from] leader::ElectionError),
    #[error(transparent)]
    Driver(#[from] crate::backend::csi_proxy::ProxyError),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretError),
    #[error(transparent)]
    SecretRead(#[from] secrets::ReadError),
    /// A VolumeSnapshotContent or its class that cannot be acted on as it is.
    #[error("{0}")]
    Snapshot(String),
}

impl Error {
    /// Someone else wrote the object since we read it.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }

    /// The object went away while we worked on it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 404)
    }

    /// Short name used as a metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Connect(_) => "connect",
            Error::Crd(e) => e.metric_label(),
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(_) => "kube",
            Error::Http(_) | Error::HttpStopped => "http",
            Error::Signals(_) => "signals",
            Error::Election(_) => "leader_election",
            Error::Driver(_) => "csi_driver",
            Error::Secrets(_) | Error::SecretRead(_) => "secrets",
            Error::Snapshot(_) => "snapshot",
        }
    }
}

/// The claim a Volume serves.
pub(crate) fn claim_of_volume(v: Arc<Volume>) -> Option<ObjectRef<Claim>> {
    let c = v.spec.claim.as_ref()?;
    Some(ObjectRef::new(&c.name).within(&c.namespace))
}

/// The driver's handle of a CSI PV.
pub(crate) fn csi_handle(pv: &Pv) -> Option<&str> {
    Some(pv.spec.as_ref()?.csi.as_ref()?.volume_handle.as_str())
}

/// How a PV is used: its volume mode, first access mode, fsType and
/// mount options.
pub(crate) fn capability(pv: &Pv) -> Capability {
    let spec = pv.spec.clone().unwrap_or_default();
    let csi = spec.csi.clone().unwrap_or_default();
    Capability {
        block: spec.volume_mode.as_deref() == Some("Block"),
        fs_type: csi.fs_type.unwrap_or_default(),
        mount_flags: spec.mount_options.unwrap_or_default(),
        access_mode: spec
            .access_modes
            .and_then(|m| m.first().cloned())
            .unwrap_or_default(),
    }
}

/// The claim a PV is (being) bound to.
pub(crate) fn claim_of_pv(pv: Arc<Pv>) -> Option<ObjectRef<Claim>> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
}

pub async fn run(config: Config) -> Result<(), Error> {
    // First, so that a SIGTERM at any later moment is a request to stop
    // cleanly, never the default "die holding the lease".
    let shutdown = lifecycle::Shutdown::on_signals().map_err(Error::Signals)?;
    let connect = async {
        let client = crate::kubeapi::client("controller")
            .await
            .map_err(Error::Connect)?;
        crate::crd::ensure_established(&client).await?;
        Ok::<_, Error>(client)
    };
    let client = tokio::select! {
        client = connect => client?,
        () = shutdown.requested() => return Ok(()),
    };
    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let elector = config
        .leader_elect
        .then(|| leader::LeaderElector::new(client.clone(), election(&config, &identity)))
        .transpose()?;

    let mut informers = informer::Informers::default();
    let mut registry = telemetry::registry();
    let metrics = Metrics::register(registry.sub_registry_with_prefix("stowage"));
    let csi_calls = CsiCalls::register(&mut registry);
    let watches = informers.progress();
    let judged = health::Watches::new(watches.clone());
    let health = health::ControllerHealth {
        watches: judged.clone(),
        renewals: elector.as_ref().map(|e| (e.renewals(), e.renew_deadline())),
        stall_timeout: config.health_stall_timeout,
    };
    let http = telemetry::serve_http(
        config.metrics_addr,
        Arc::new(registry),
        Arc::new(health),
        // A replica waiting for the Lease is as ready as the leader: a
        // rolling update must not wait for it to lead.
        Arc::new(crate::telemetry::AlwaysHealthy),
    );
    let ctx = Arc::new(Context::new(
        &config,
        client.clone(),
        metrics,
        csi_calls,
        informers.stores(),
        identity,
        judged,
    ));
    ask_drivers(&ctx);

    let jobs = tokio::spawn(start_jobs(&ctx, &mut informers, &config));
    // Each watch's own signal: the stores' readiness wakes one waiter only.
    let caches = async move {
        for watch in &watches {
            watch.listed().await;
        }
    };
    let watches = tokio::spawn(informers.run(&client));

    let result = lead(
        &ctx,
        caches,
        elector.as_ref(),
        &shutdown,
        http,
        config.shutdown_timeout,
    )
    .await;

    // Nothing acts any more; then give the lease up, whichever way we
    // came here (release leaves a lease that is not ours alone).
    jobs.abort();
    watches.abort();
    let _ = jobs.await;
    if let Some(elector) = &elector {
        elector.release().await;
    }
    match &result {
        Ok(()) => tracing::info!("controller stopped"),
        Err(e) => tracing::error!(error = %e, "controller stopped"),
    }
    result
}

/// Scopes and indexes the caches, then lets each job subscribe to the
/// watches it needs. Adding a job is one line here. Jobs drain their
/// streams from the start, whether or not we lead.
fn start_jobs(
    ctx: &Arc<Context>,
    informers: &mut informer::Informers,
    config: &Config,
) -> impl Future<Output = Vec<()>> + Send + 'static {
    scope::limit(ctx, informers);
    informers.count_into(&ctx.metrics.cached_objects);
    index_capacity(ctx, informers);
    let jobs = [
        claims::controller(ctx.clone(), informers),
        reclaim::controller(ctx.clone(), informers),
        volumes::controller(ctx.clone(), informers),
        resize::controller(ctx.clone(), informers),
        attach::controller(ctx.clone(), informers),
        modify::controller(ctx.clone(), informers),
        storage_capacity::controller(ctx.clone(), informers, config),
        node_liveness::controller(ctx.clone(), informers, config),
        release::controller(ctx.clone(), informers),
        attach::drift::controller(ctx.clone()),
        snapshot_contents::controller(ctx.clone(), informers),
        clone_protection::controller(ctx.clone(), informers),
    ];
    futures::future::join_all(jobs)
}

/// Room on nodes, shared by the claim and expansion jobs: kept from the
/// Volume watch, before any job hears of a change.
fn index_capacity(ctx: &Arc<Context>, informers: &mut informer::Informers) {
    let applied = ctx.clone();
    informers.volumes.on_apply(move |v| {
        let mut promised = applied.promised.lock().expect("capacity index poisoned");
        promised.apply(v);
    });
    let deleted = ctx.clone();
    informers.volumes.on_delete(move |v| {
        let mut promised = deleted.promised.lock().expect("capacity index poisoned");
        promised.delete(v);
    });
}

fn election(config: &Config, identity: &str) -> leader::ElectionConfig {
    leader::ElectionConfig {
        namespace: config.leader_election_namespace.clone(),
        lease_name: config.leader_election_lease.clone(),
        identity: identity.to_string(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

/// Waits for the lease (if elected), opens the gate once `caches` says
/// every cache is complete, and acts until asked to stop or until the lease or the HTTP
/// server is lost. Returns with the gate closed and, on a clean stop, the
/// running reconciles finished or `shutdown_timeout` spent.
async fn lead(
    ctx: &Context,
    caches: impl Future<Output = ()>,
    elector: Option<&leader::LeaderElector>,
    shutdown: &lifecycle::Shutdown,
    http: impl Future<Output = std::io::Result<()>>,
    shutdown_timeout: Duration,
) -> Result<(), Error> {
    tokio::pin!(http);
    let http_stopped =
        |res: std::io::Result<()>| Err(res.err().map_or(Error::HttpStopped, Error::Http));
    let acquired = match elector {
        Some(elector) => tokio::select! {
            acquired = elector.acquire() => Some(acquired),
            res = &mut http => return http_stopped(res),
            () = shutdown.requested() => return Ok(()),
        },
        None => None,
    };

    // Renewing runs on its own, from acquisition, whatever the jobs do.
    let renewing = async {
        match (elector, acquired) {
            (Some(elector), Some(acquired)) => elector.hold(acquired).await,
            _ => std::future::pending().await,
        }
    };
    tokio::pin!(renewing);
    let serving = async {
        // Decide nothing from a half-filled cache.
        caches.await;
        ctx.gate.open();
        tracing::info!("controller started");
        std::future::pending::<()>().await
    };
    let mut result = tokio::select! {
        () = shutdown.requested() => Ok(()),
        () = serving => unreachable!("serves until stopped"),
        lost = &mut renewing => Err(Error::Election(lost)),
        res = &mut http => http_stopped(res),
    };

    // Stop acting: nothing new starts; on a clean stop what runs gets a
    // moment to finish, while the lease is still renewed. Reconciles are
    // idempotent: the next leader picks up whatever is left.
    ctx.gate.close();
    if result.is_ok() {
        tokio::select! {
            drained = ctx.gate.drained(shutdown_timeout) => if !drained {
                tracing::warn!(timeout = ?shutdown_timeout, "reconciles still running at shutdown; abandoning them");
            },
            lost = &mut renewing => result = Err(Error::Election(lost)),
        }
    }
    result
}

/// Asks each driver what it can do now, so that a wrong socket or driver
/// name shows in the log at start; a failure is asked again on first use.
fn ask_drivers(ctx: &Context) {
    for driver in ctx.drivers.values() {
        let driver = driver.clone();
        tokio::spawn(async move {
            match driver.capabilities().await {
                Ok(caps) => tracing::info!(driver = %driver.name, ?caps, "CSI driver answered"),
                Err(e) => {
                    tracing::warn!(driver = %driver.name, error = %e, "CSI driver not ready yet")
                }
            }
        });
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "stowage".into());
    format!("{host}_{}", std::process::id())
}
