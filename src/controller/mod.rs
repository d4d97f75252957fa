//! `stowage controller`: the cluster-wide jobs of the CSI sidecars, run from
//! one set of shared informers.

pub mod attach;
pub mod bind;
mod capacity;
mod claims;
pub mod forbidden;
pub mod leader;
mod metrics;
mod persistent_volumes;
pub mod protocol;
pub mod provision;
pub mod reclaim;
mod remote_volumes;
pub mod resize;
pub mod secrets;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttachment};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use crate::backend::csi_proxy::{CsiDriver, DriverEndpoint};
use crate::backend::local;
use crate::crd::{StorageNode, Volume};
use crate::telemetry::{self, AlwaysHealthy};

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
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub csi_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration: use e.g. 30s, 500ms or 2m");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let n: u64 = s[..split].parse().map_err(|_| err())?;
    match &s[split..] {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(err()),
    }
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
    #[error(
        "CustomResourceDefinition {name} is older than stowage {version}: it lacks {missing}, \
         which the API server would silently drop. Apply this release's CRDs first \
         (`kubectl apply -k manifests/` applies both; or `stowage crds | kubectl apply -f -`)"
    )]
    CrdOutdated {
        name: String,
        version: &'static str,
        missing: String,
    },
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("metrics server: {0}")]
    Http(#[source] std::io::Error),
    #[error(transparent)]
    Election(#[from] leader::ElectionError),
    #[error(transparent)]
    Driver(#[from] crate::backend::csi_proxy::ProxyError),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretError),
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
            Error::CrdMissing { .. } => "crd_missing",
            Error::CrdOutdated { .. } => "crd_outdated",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(_) => "kube",
            Error::Http(_) => "http",
            Error::Election(_) => "leader_election",
            Error::Driver(_) => "csi_driver",
            Error::Secrets(_) => "secrets",
        }
    }
}

/// The informer caches, one per kind, shared by every job.
#[derive(Clone)]
pub struct Stores {
    pub claims: Store<PersistentVolumeClaim>,
    pub pvs: Store<PersistentVolume>,
    pub classes: Store<StorageClass>,
    pub volumes: Store<Volume>,
    pub storage_nodes: Store<StorageNode>,
    pub attachments: Store<VolumeAttachment>,
    pub csinodes: Store<CSINode>,
    /// Nodes' metadata only (labels, annotations): all that attach and
    /// topology need, at a fraction of a full Node's size.
    pub nodes: Store<PartialObjectMeta<Node>>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    pub stores: Stores,
    /// The `--csi-driver`s, by name.
    pub drivers: BTreeMap<String, CsiDriver>,
    /// `--serve-local`.
    pub serve_local: bool,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Whether stowage provisions for this provisioner name.
    pub fn serves(&self, provisioner: &str) -> bool {
        (self.serve_local && provisioner == local::DRIVER_NAME)
            || self.drivers.contains_key(provisioner)
    }

    /// Posts an event on `object` in the background: events are for people,
    /// so they stay off the provisioning path, and failing to post is logged.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        self.post_event(object, type_, reason, action, note);
    }

    /// An API call that RBAC refused gets an event on the object waiting for
    /// it, naming the verb and resource to grant; other errors are reported
    /// by their jobs.
    pub fn report_if_forbidden<K: Resource<DynamicType = ()>>(&self, object: &K, error: &Error) {
        let Error::Kube(kube::Error::Api(status)) = error else {
            return;
        };
        let Some(refusal) = forbidden::Refusal::from_status(status) else {
            return;
        };
        let note = refusal.note("stowage-controller");
        tracing::error!(verb = %refusal.verb, resource = %refusal.resource, "{note}");
        self.post_event(object, EventType::Warning, "Forbidden", "Authorize", &note);
    }

    fn post_event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let reference = object.object_ref(&());
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, reason, "posting event failed");
            }
        });
    }

    /// Exponential retry delay per object: 1s, 2s, 4s... capped at 16s for
    /// errors that can clear by themselves and 5 minutes for the rest.
    pub fn backoff(&self, object: &ObjectReference, may_resolve_itself: bool) -> Duration {
        let mut failures = self.failures.lock().expect("failure map poisoned");
        let n = failures.entry(failure_key(object)).or_default();
        *n = n.saturating_add(1);
        let cap = if may_resolve_itself { 16 } else { 300 };
        Duration::from_secs((1u64 << (*n - 1).min(9)).min(cap))
    }

    pub fn forget_failures(&self, object: &ObjectReference) {
        self.failures
            .lock()
            .expect("failure map poisoned")
            .remove(&failure_key(object));
    }
}

fn failure_key(object: &ObjectReference) -> String {
    format!(
        "{}/{}/{}",
        object.kind.as_deref().unwrap_or_default(),
        object.namespace.as_deref().unwrap_or_default(),
        object.name.as_deref().unwrap_or_default()
    )
}

type Writer<K> = reflector::store::Writer<K>;

/// Fans one watch out to several jobs. Each job gets every applied object on
/// its own channel; deletions go to `on_delete`, which turns them into
/// reconcile requests for related objects (kube-runtime's shared streams
/// deliver no deletions).
struct Informer<K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static> {
    store: Store<K>,
    writer: Writer<K>,
    sinks: Vec<mpsc::Sender<Arc<K>>>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn new() -> Self {
        let (store, writer) = reflector::store();
        Informer {
            store,
            writer,
            sinks: Vec::new(),
        }
    }

    /// A stream of applied objects for one more job.
    fn subscribe(&mut self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::channel(1024);
        self.sinks.push(tx);
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    fn run(
        self,
        api: Api<K>,
        on_delete: impl Fn(&K) + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let sinks = self.sinks;
        // managedFields are the largest part of most objects' metadata and
        // nothing here reads them: the caches hold the rest.
        let events = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|o| o.meta_mut().managed_fields = None)
            .reflect(self.writer);
        events.for_each(move |event| {
            let sinks = sinks.clone();
            let applied = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => Some(Arc::new(o)),
                Ok(watcher::Event::Delete(o)) => {
                    on_delete(&o);
                    None
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
                    None
                }
            };
            async move {
                if let Some(o) = applied {
                    for sink in &sinks {
                        let _ = sink.send(o.clone()).await;
                    }
                }
            }
        })
    }
}

/// An unbounded channel of reconcile requests, fed from deletions.
fn trigger<K: Resource<DynamicType = ()>>() -> (
    mpsc::UnboundedSender<ObjectRef<K>>,
    impl Stream<Item = ObjectRef<K>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
}

pub async fn run(config: Config) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(Error::Connect)?;
    ensure_crds_established(&client).await?;

    let mut registry = telemetry::registry();
    let metrics = Metrics::register(registry.sub_registry_with_prefix("stowage"));
    let http = telemetry::serve_http(
        config.metrics_addr,
        Arc::new(registry),
        Arc::new(AlwaysHealthy),
        // A replica waiting for the Lease is as ready as the leader: a
        // rolling update must not wait for it to lead.
        Arc::new(AlwaysHealthy),
    );
    tokio::pin!(http);

    // One watch per kind, shared by every job (the sidecars run one each).
    let mut claims = Informer::<PersistentVolumeClaim>::new();
    let mut pvs = Informer::<PersistentVolume>::new();
    let mut volumes = Informer::<Volume>::new();
    let classes = Informer::<StorageClass>::new();
    let storage_nodes = Informer::<StorageNode>::new();
    let mut attachments = Informer::<VolumeAttachment>::new();
    let csinodes = Informer::<CSINode>::new();
    // Metadata only: labels and annotations are all attach and topology read.
    let nodes = Informer::<PartialObjectMeta<Node>>::new();
    let stores = Stores {
        csinodes: csinodes.store.clone(),
        nodes: nodes.store.clone(),
        attachments: attachments.store.clone(),
        claims: claims.store.clone(),
        pvs: pvs.store.clone(),
        classes: classes.store.clone(),
        volumes: volumes.store.clone(),
        storage_nodes: storage_nodes.store.clone(),
    };
    let (claims_for_claims, claims_for_pvs, claims_for_resize) =
        (claims.subscribe(), claims.subscribe(), claims.subscribe());
    let (pvs_for_claims, pvs_for_pvs, pvs_for_resize) =
        (pvs.subscribe(), pvs.subscribe(), pvs.subscribe());
    let (volumes_for_claims, volumes_for_pvs, volumes_for_volumes, volumes_for_resize) = (
        volumes.subscribe(),
        volumes.subscribe(),
        volumes.subscribe(),
        volumes.subscribe(),
    );

    // A claim gone: its PV may be Released, its Volume orphaned.
    let (pv_trigger, pv_triggers) = trigger::<PersistentVolume>();
    let (volume_trigger, volume_triggers) = trigger::<Volume>();
    let (claim_trigger, claim_triggers) = trigger::<PersistentVolumeClaim>();
    let on_claim_deleted = {
        let (pv_trigger, volume_trigger) = (pv_trigger.clone(), volume_trigger.clone());
        let metrics = metrics.clone();
        move |c: &PersistentVolumeClaim| {
            if let Some(uid) = c.uid() {
                metrics.forget_claim(&uid);
            }
            let Some(name) = provision::volume_name(c) else {
                return;
            };
            let bound = c
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .filter(|n| !n.is_empty());
            let _ = pv_trigger.send(ObjectRef::new(bound.as_deref().unwrap_or(&name)));
            let _ = volume_trigger.send(ObjectRef::new(&name));
        }
    };
    let attachments_for_attach = attachments.subscribe();
    let (attach_trigger, attach_triggers) = trigger::<VolumeAttachment>();
    // A Node gone: its VolumeAttachments are to be detached.
    let on_node_deleted = {
        let attachments = stores.attachments.clone();
        move |node: &PartialObjectMeta<Node>| {
            let name = node.name_any();
            for va in attachments.state() {
                if va.spec.node_name == name {
                    let _ = attach_trigger.send(ObjectRef::from_obj(va.as_ref()));
                }
            }
        }
    };
    // A VolumeAttachment gone: its PV may drop our attacher finalizer.
    let on_attachment_deleted = {
        let pv_trigger = pv_trigger.clone();
        move |va: &VolumeAttachment| {
            if let Some(pv) = va.spec.source.persistent_volume_name.as_deref() {
                let _ = pv_trigger.send(ObjectRef::new(pv));
            }
        }
    };
    // A Volume gone: its PV can go, and its space may let a waiting claim fit.
    let on_volume_deleted = {
        let claims = stores.claims.clone();
        move |v: &Volume| {
            let pv = v
                .spec
                .persistent_volume_name
                .clone()
                .unwrap_or_else(|| v.name_any());
            let _ = pv_trigger.send(ObjectRef::new(&pv));
            for claim in claims.state() {
                if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending") {
                    let _ = claim_trigger.send(ObjectRef::from_obj(claim.as_ref()));
                }
            }
        }
    };
    tokio::spawn(claims.run(Api::all(client.clone()), on_claim_deleted));
    tokio::spawn(attachments.run(Api::all(client.clone()), on_attachment_deleted));
    tokio::spawn(pvs.run(Api::all(client.clone()), |_| {}));
    tokio::spawn(volumes.run(Api::all(client.clone()), on_volume_deleted));
    tokio::spawn(classes.run(Api::all(client.clone()), |_| {}));
    tokio::spawn(storage_nodes.run(Api::all(client.clone()), |_| {}));
    tokio::spawn(csinodes.run(Api::all(client.clone()), |_| {}));
    tokio::spawn(nodes.run(Api::all(client.clone()), on_node_deleted));

    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stowage-controller".into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
        stores: stores.clone(),
        drivers: config
            .csi_drivers
            .iter()
            .map(|e| (e.name.clone(), CsiDriver::new(e, config.csi_timeout)))
            .collect(),
        serve_local: config.serve_local,
        recorder,
        failures: Mutex::default(),
    });

    // Ask each driver what it can do now, so that a wrong socket or driver
    // name shows in the log at start; a failure is asked again on first use.
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

    let elector = config.leader_elect.then(|| {
        leader::LeaderElector::new(
            client.clone(),
            leader::ElectionConfig {
                namespace: config.leader_election_namespace.clone(),
                lease_name: config.leader_election_lease.clone(),
                identity,
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
    // Decide nothing from a half-filled cache.
    let ready = futures::future::try_join_all([
        stores.claims.wait_until_ready().boxed(),
        stores.pvs.wait_until_ready().boxed(),
        stores.volumes.wait_until_ready().boxed(),
        stores.classes.wait_until_ready().boxed(),
        stores.storage_nodes.wait_until_ready().boxed(),
        stores.attachments.wait_until_ready().boxed(),
        stores.csinodes.wait_until_ready().boxed(),
        stores.nodes.wait_until_ready().boxed(),
    ]);
    ready.await.expect("reflectors run until the process ends");

    let claim_jobs = Controller::for_shared_stream(claims_for_claims, stores.claims.clone())
        .with_config(controller::Config::default().concurrency(config.workers))
        .watches_shared_stream(volumes_for_claims, |v: Arc<Volume>| {
            v.spec
                .claim
                .as_ref()
                .map(|c| ObjectRef::new(&c.name).within(&c.namespace))
        })
        .watches_shared_stream(pvs_for_claims, |pv: Arc<PersistentVolume>| {
            let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
            Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
        })
        .reconcile_on(claim_triggers)
        .graceful_shutdown_on(shutdown_signal())
        .run(claims::reconcile, claims::error_policy, ctx.clone())
        .for_each(|_| async {});
    let pv_jobs = Controller::for_shared_stream(pvs_for_pvs, stores.pvs.clone())
        .with_config(controller::Config::default().concurrency(config.workers))
        .watches_shared_stream(volumes_for_pvs, |v: Arc<Volume>| {
            Some(ObjectRef::new(
                v.spec
                    .persistent_volume_name
                    .as_deref()
                    .unwrap_or(&v.name_any()),
            ))
        })
        .watches_shared_stream(claims_for_pvs, |c: Arc<PersistentVolumeClaim>| {
            let name = c
                .spec
                .as_ref()?
                .volume_name
                .clone()
                .or_else(|| provision::volume_name(&c))?;
            Some(ObjectRef::new(&name))
        })
        .reconcile_on(pv_triggers)
        .graceful_shutdown_on(shutdown_signal())
        .run(
            persistent_volumes::reconcile,
            persistent_volumes::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let volume_jobs = Controller::for_shared_stream(volumes_for_volumes, stores.volumes.clone())
        .with_config(controller::Config::default().concurrency(config.workers))
        .reconcile_on(volume_triggers)
        .graceful_shutdown_on(shutdown_signal())
        .run(
            persistent_volumes::reconcile_volume,
            persistent_volumes::volume_error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    // Its own queue: an expansion never waits behind a provisioning storm.
    let resize_jobs = Controller::for_shared_stream(claims_for_resize, stores.claims.clone())
        .with_config(controller::Config::default().concurrency(config.workers))
        .watches_shared_stream(volumes_for_resize, |v: Arc<Volume>| {
            v.spec
                .claim
                .as_ref()
                .map(|c| ObjectRef::new(&c.name).within(&c.namespace))
        })
        .watches_shared_stream(pvs_for_resize, |pv: Arc<PersistentVolume>| {
            let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
            Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
        })
        .graceful_shutdown_on(shutdown_signal())
        .run(resize::reconcile, resize::error_policy, ctx.clone())
        .for_each(|_| async {});
    // Attach and detach have their own queue: a pod start never waits
    // behind provisioning.
    let attach_jobs =
        Controller::for_shared_stream(attachments_for_attach, stores.attachments.clone())
            .with_config(controller::Config::default().concurrency(config.workers))
            .reconcile_on(attach_triggers)
            .graceful_shutdown_on(shutdown_signal())
            .run(attach::reconcile, attach::error_policy, ctx.clone())
            .for_each(|_| async {});
    let controllers = async {
        tokio::join!(claim_jobs, pv_jobs, volume_jobs, resize_jobs, attach_jobs);
    };
    let lost = async {
        match &elector {
            Some(elector) => elector.hold().await,
            None => std::future::pending().await,
        }
    };

    tracing::info!("controller started");
    let result = tokio::select! {
        () = controllers => {
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

pub async fn shutdown_signal() {
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
    for crd in crate::crd::all() {
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
        let missing = crate::crd::missing_fields(&found, &crd);
        if !missing.is_empty() {
            return Err(Error::CrdOutdated {
                name,
                version: env!("CARGO_PKG_VERSION"),
                missing: missing.join(", "),
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
