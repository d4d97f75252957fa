//! `stowage controller`: the cluster-wide jobs of the CSI sidecars, run from
//! one set of shared informers.

pub mod leader;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use prometheus_client::registry::Registry;

use crate::crd::Volume;
use crate::telemetry::{self, Health};
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

    /// This replica's identity in the Lease; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// Errors of the controller as a whole; each job adds its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Kubernetes API: {0}. Set KUBECONFIG or run inside a cluster")]
    Connect(#[source] kube::Error),
    #[error(
        "CustomResourceDefinition {name} is not installed or not established: {reason}. \
         Install it with `stowage crds | kubectl apply -f -` (or `kubectl apply -f crds/`)"
    )]
    CrdMissing { name: String, reason: String },
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("metrics server: {0}")]
    Http(#[source] std::io::Error),
    #[error(transparent)]
    Election(#[from] leader::ElectionError),
}

impl Error {
    /// Short name used as a metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Connect(_) => "connect",
            Error::CrdMissing { .. } => "crd_missing",
            Error::Kube(_) => "kube",
            Error::Http(_) => "http",
            Error::Election(_) => "leader_election",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
}

struct AlwaysHealthy;
impl Health for AlwaysHealthy {
    fn healthy(&self) -> Result<(), String> {
        Ok(())
    }
}

pub async fn run(config: Config) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(Error::Connect)?;
    ensure_crds_established(&client).await?;

    let mut registry = Registry::with_prefix("stowage");
    let metrics = Metrics::register(&mut registry);
    let http = telemetry::serve_http(
        config.metrics_addr,
        Arc::new(registry),
        Arc::new(AlwaysHealthy),
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
    });
    tokio::pin!(http);

    let elector = config.leader_elect.then(|| {
        leader::LeaderElector::new(
            client.clone(),
            leader::ElectionConfig {
                namespace: config.leader_election_namespace.clone(),
                lease_name: config.leader_election_lease.clone(),
                identity: config.identity.clone().unwrap_or_else(default_identity),
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            },
        )
    });
    if let Some(elector) = &elector {
        tokio::select! {
            () = elector.acquire() => {}
            res = &mut http => return res.map_err(Error::Http),
            () = shutdown_signal() => return Ok(()),
        }
    }

    let volumes = Api::<Volume>::all(client);
    let controller = Controller::new(volumes, watcher::Config::default())
        .graceful_shutdown_on(shutdown_signal())
        .run(reconcile_volume, error_policy, ctx)
        .for_each(|_| async {});
    let lost = async {
        match &elector {
            Some(elector) => elector.hold().await,
            None => std::future::pending().await,
        }
    };

    tracing::info!("controller started");
    let result = tokio::select! {
        () = controller => {
            tracing::info!("controller stopped");
            Ok(())
        }
        res = &mut http => res.map_err(Error::Http),
        // Stop at once: another replica may already be acting.
        lost = lost => Err(Error::Election(lost)),
    };
    if let (Some(elector), Ok(())) = (&elector, &result) {
        elector.release().await;
    }
    result
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "stowage".into());
    format!("{host}_{}", std::process::id())
}

/// Fails with an actionable message when our CRDs are absent, rather than
/// letting the watchers retry forever against a 404.
pub async fn ensure_crds_established(client: &Client) -> Result<(), Error> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in [Volume::crd()] {
        let name = crd.name_any();
        let found = match api.get_opt(&name).await {
            Ok(found) => found,
            Err(e @ kube::Error::Api(_)) => return Err(Error::Kube(e)),
            Err(e) => return Err(Error::Connect(e)),
        };
        let Some(found) = found else {
            return Err(Error::CrdMissing {
                name,
                reason: "not found".into(),
            });
        };
        if !is_established(&found) {
            return Err(Error::CrdMissing {
                name,
                reason: "not established".into(),
            });
        }
    }
    Ok(())
}

pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

#[tracing::instrument(skip_all, fields(volume = %volume.name_any()))]
async fn reconcile_volume(volume: Arc<Volume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("volume");
    tracing::debug!(phase = ?volume.status.as_ref().map(|s| s.phase), "observed");
    Ok(Action::await_change())
}

fn error_policy(volume: Arc<Volume>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(volume = %volume.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_failed("volume", error.metric_label());
    Action::requeue(Duration::from_secs(5))
}
