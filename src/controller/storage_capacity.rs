//! external-provisioner's capacity job (`--enable-capacity`): one
//! `CSIStorageCapacity` per StorageClass and topology segment, saying how
//! large a volume of that class the segment can still take, so that
//! kube-scheduler (CSIDriver `storageCapacity: true`) sends a pod only
//! where its volume fits.
//!
//! For `local.stowage.dev` the segment is a node, and the figure comes
//! from its StorageNode (`plan`); for a `--csi-driver` that offers
//! GET_CAPACITY, it comes from the driver (`remote`).
//!
//! As upstream: the objects live in the controller's namespace, carry the
//! labels `csi.storage.k8s.io/drivername` and
//! `csi.storage.k8s.io/managed-by`, and are owned by the controller's
//! Deployment (found from this pod through its ReplicaSet), so that they go
//! with it.
//!
//! The desired set is a product of classes and segments, and either going
//! must remove objects: so the job is one pass over a driver's whole set
//! (pure planning, a pure `plan::diff`, then a thin `apply`), run on every
//! change that moves it (coalesced) and every `--capacity-poll-interval`.
//! A local pass costs classes × nodes, whatever the number of claims; a
//! driver's pass one GetCapacity per class and segment, and is run only
//! on what can change a driver's answer (its classes, volumes and
//! topology), not on every local volume.

mod plan;
mod remote;

use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::informer::Informers;
use super::job::{self, JobRun};
use super::provision::topology::driver_nodes;
use super::{Config, Context, Error};
use crate::backend::csi_proxy::CsiDriver;
use crate::backend::local;
use crate::crd::Volume;
use crate::kubeapi;
use crate::quantity::format_bytes;

pub use plan::{Capacity, Change};

/// Upstream's label keys; the value of `managed-by` tells our objects from
/// those of an external-provisioner in the same namespace.
pub const LABEL_DRIVER: &str = "csi.storage.k8s.io/drivername";
pub const LABEL_MANAGED_BY: &str = "csi.storage.k8s.io/managed-by";
pub const MANAGED_BY: &str = "stowage-controller";

const JOB: &str = "storage_capacity";
/// A burst of changes (a provisioning storm) makes one pass, not one each.
const COALESCE: Duration = Duration::from_millis(500);

/// Where and as whom the objects are published.
#[derive(Debug, Clone)]
struct Settings {
    /// The controller's namespace (`POD_NAMESPACE`).
    pub namespace: String,
    /// This replica's pod (`POD_NAME`), whose owners own the objects.
    pub pod: Option<String>,
    pub poll_interval: Duration,
    /// Whether `local.stowage.dev` is served here.
    pub local: bool,
}

/// Which sets a change has made stale, and the wake-up for the pass.
#[derive(Default)]
struct Stale {
    local: AtomicBool,
    drivers: AtomicBool,
    wake: Notify,
}

impl Stale {
    fn mark(&self, local: bool, drivers: bool) {
        if local {
            self.local.store(true, Ordering::Relaxed);
        }
        if drivers {
            self.drivers.store(true, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    /// (local, drivers) to refresh now; both on a poll.
    fn take(&self, poll: bool) -> (bool, bool) {
        (
            self.local.swap(false, Ordering::Relaxed) || poll,
            self.drivers.swap(false, Ordering::Relaxed) || poll,
        )
    }
}

/// The capacity job (unless `--enable-capacity=false`, or nothing to
/// publish for): subscribes to what changes capacity, then runs a pass
/// per change (coalesced) and per poll interval.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers, config: &Config) -> JobRun {
    let local = config.serve_local;
    let enabled = config.enable_capacity && (local || !ctx.drivers.is_empty());
    let stale = Arc::new(Stale::default());
    if enabled {
        watch(informers, &stale);
    }
    let settings = Settings {
        namespace: config.leader_election_namespace.clone(),
        pod: config.identity.clone(),
        poll_interval: config.capacity_poll_interval,
        local,
    };
    async move {
        if enabled {
            run(ctx, stale, settings).await;
        }
    }
    .boxed()
}

/// Classes move every set; StorageNodes the local one; a Volume the set of
/// its driver; CSINodes and Node labels the drivers' segments. A Node's
/// other changes (its heartbeats) move nothing.
fn watch(informers: &mut Informers, stale: &Arc<Stale>) {
    let mark = |local: bool, drivers: bool| {
        let stale = stale.clone();
        move || stale.mark(local, drivers)
    };
    let both = mark(true, true);
    informers.classes.on_apply(move |_| both());
    let both = mark(true, true);
    informers.classes.on_delete(move |_| both());
    let local = mark(true, false);
    informers.storage_nodes.on_apply(move |_| local());
    let local = mark(true, false);
    informers.storage_nodes.on_delete(move |_| local());
    informers.volumes.on_apply(mark_volume(stale));
    informers.volumes.on_delete(mark_volume(stale));
    let drivers = mark(false, true);
    informers.csinodes.on_apply(move |_| drivers());
    let drivers = mark(false, true);
    informers.csinodes.on_delete(move |_| drivers());
    let labels = LabelWatch::default();
    let drivers = mark(false, true);
    informers.nodes.on_apply(move |n| {
        if labels.changed(n) {
            drivers()
        }
    });
    let drivers = mark(false, true);
    informers.nodes.on_delete(move |_| drivers());
}

fn mark_volume(stale: &Arc<Stale>) -> impl Fn(&Volume) + Send + Sync + 'static {
    let stale = stale.clone();
    move |v| {
        let is_local = v.spec.driver == local::DRIVER_NAME;
        stale.mark(is_local, !is_local)
    }
}

/// Tells a Node whose labels changed from one that only heart-beat.
#[derive(Default)]
struct LabelWatch(Mutex<BTreeMap<String, BTreeMap<String, String>>>);

impl LabelWatch {
    fn changed(&self, node: &PartialObjectMeta<Node>) -> bool {
        let mut seen = self.0.lock().expect("label watch poisoned");
        let labels = node.labels();
        if seen.get(&node.name_any()) == Some(labels) {
            return false;
        }
        seen.insert(node.name_any(), labels.clone());
        true
    }
}

async fn run(ctx: Arc<Context>, stale: Arc<Stale>, settings: Settings) {
    let mut owner: Option<Option<OwnerReference>> = None;
    let mut next = Duration::ZERO;
    let mut published: BTreeMap<String, usize> = BTreeMap::new();
    // Counted under one reference, so that failures back off as any
    // object's do.
    let key = ObjectReference {
        kind: Some("CSIStorageCapacity".into()),
        namespace: Some(settings.namespace.clone()),
        ..Default::default()
    };
    // After a failed pass, changes wait for its backoff too: every Volume
    // or node change would otherwise repeat the failure at once (the
    // controller's namespace missing, RBAC refusing). What they made
    // stale is kept, and the retry is a full pass.
    let mut failing = false;
    loop {
        let poll = tokio::select! {
            () = stale.wake.notified(), if !failing => { tokio::time::sleep(COALESCE).await; false }
            () = tokio::time::sleep(next) => true,
        };
        let Some(_pass) = ctx.gate.enter().await else {
            return;
        };
        let _timer = ctx.metrics.jobs.reconcile_timer(JOB);
        if owner.is_none() {
            match find_owner(&ctx, &settings).await {
                Ok(found) => owner = Some(found),
                Err(e) => {
                    next = failed(&ctx, &key, &e);
                    failing = true;
                    continue;
                }
            }
        }
        let owner = owner.clone().flatten();
        let (local, drivers) = stale.take(poll);
        let target = Target {
            namespace: &settings.namespace,
            owner: owner.as_ref(),
        };
        let result = pass(
            &ctx,
            &target,
            settings.local && local,
            drivers,
            &mut published,
        )
        .await;
        ctx.metrics
            .storage_capacities
            .set(published.values().sum::<usize>() as i64);
        failing = result.is_err();
        next = match result {
            Ok(()) => {
                ctx.forget_failures(&key);
                settings.poll_interval
            }
            Err(e) => failed(&ctx, &key, &e),
        };
    }
}

fn failed(ctx: &Context, key: &ObjectReference, error: &Error) -> Duration {
    job::pass_failed(ctx, JOB, "publishing storage capacity", error);
    ctx.backoff(key, true)
}

/// Where the objects go and who owns them.
struct Target<'a> {
    namespace: &'a str,
    owner: Option<&'a OwnerReference>,
}

/// One pass over the stale sets; every driver is tried even when one
/// fails, and the first error is returned (the retry redoes them all).
/// `published` keeps how many objects each driver has.
async fn pass(
    ctx: &Context,
    target: &Target<'_>,
    local: bool,
    drivers: bool,
    published: &mut BTreeMap<String, usize>,
) -> Result<(), Error> {
    let mut first_error = None;
    if local {
        let desired = local_plan(ctx);
        match publish(ctx, target, local::DRIVER_NAME, &desired, &BTreeSet::new()).await {
            Ok(n) => {
                published.insert(local::DRIVER_NAME.to_string(), n);
            }
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if drivers {
        for driver in ctx.drivers.values() {
            // A driver that cannot be reached keeps what it has.
            let asked = match ask_driver(ctx, driver).await {
                Ok(asked) => asked,
                Err(e) => {
                    first_error = first_error.or(Some(e));
                    continue;
                }
            };
            let result = publish(ctx, target, &driver.name, &asked.desired, &asked.unknown).await;
            match result {
                Ok(n) => {
                    published.insert(driver.name.clone(), n);
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
            first_error = first_error.or(asked.error.map(Error::from));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The local set, from the caches.
fn local_plan(ctx: &Context) -> BTreeMap<String, Capacity> {
    let classes = ctx.stores.classes.state();
    let nodes = ctx.stores.storage_nodes.state();
    let promised = ctx
        .promised
        .lock()
        .expect("capacity index poisoned")
        .per_node();
    plan::plan(
        &classes.iter().map(|c| c.as_ref()).collect::<Vec<_>>(),
        &nodes.iter().map(|n| n.as_ref()).collect::<Vec<_>>(),
        &promised,
    )
}

/// A driver's set as it answers GetCapacity. A driver without
/// GET_CAPACITY should have no objects.
#[tracing::instrument(skip_all, fields(driver = %driver.name))]
async fn ask_driver(ctx: &Context, driver: &CsiDriver) -> Result<remote::Asked, Error> {
    if !driver.capabilities().await?.get_capacity {
        tracing::debug!("the driver does not offer GET_CAPACITY: no CSIStorageCapacity");
        return Ok(remote::Asked::default());
    }
    let segments = remote::segments(&driver_nodes(&ctx.stores, &driver.name));
    let classes = ctx.stores.classes.state();
    let classes: Vec<_> = classes.iter().map(|c| c.as_ref()).collect();
    let items = remote::items(&driver.name, &classes, &segments);
    Ok(remote::ask(driver, items).await)
}

/// Diffs `desired` against the driver's objects as the API server has them
/// now (but those named in `keep`) and applies the changes. Returns how
/// many objects the driver has then.
#[tracing::instrument(skip_all, fields(namespace = %target.namespace, driver = %driver))]
async fn publish(
    ctx: &Context,
    target: &Target<'_>,
    driver: &str,
    desired: &BTreeMap<String, Capacity>,
    keep: &BTreeSet<String>,
) -> Result<usize, Error> {
    let api = Api::<CSIStorageCapacity>::namespaced(ctx.client.clone(), target.namespace);
    let selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_DRIVER}={driver}");
    let existing = api.list(&ListParams::default().labels(&selector)).await?;
    let kept = existing
        .items
        .iter()
        .filter(|o| keep.contains(&o.name_any()))
        .count();
    let existing: Vec<_> = existing
        .items
        .iter()
        .filter(|o| !keep.contains(&o.name_any()))
        .collect();
    let has_owner = |o: &CSIStorageCapacity| {
        target
            .owner
            .is_none_or(|want| o.owner_references().iter().any(|r| r.uid == want.uid))
    };
    let changes = plan::diff(desired, &existing, has_owner);
    tracing::debug!(
        existing = existing.len(),
        desired = desired.len(),
        kept,
        changes = changes.len(),
        "storage capacity planned"
    );
    for change in &changes {
        apply(&api, target, driver, change).await?;
    }
    Ok(desired.len() + kept)
}

/// Makes one change; an object already created or already gone is the
/// change done (another pass, or a replica that led before, did it).
async fn apply(
    api: &Api<CSIStorageCapacity>,
    target: &Target<'_>,
    driver: &str,
    change: &Change,
) -> Result<(), Error> {
    let result = match change {
        Change::Create(name, want) => {
            let object: CSIStorageCapacity =
                serde_json::from_value(desired_object(name, target, driver, want))
                    .expect("literal matches CSIStorageCapacity");
            kubeapi::create_idempotent(api, &object).await
        }
        Change::Update(name, want) => {
            let patch = desired_object(name, target, driver, want);
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        Change::Delete(name) => kubeapi::delete(api, name, None).await,
    };
    match result {
        // Another writer was first: the next pass compares again.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        other => other.map_err(Error::from),
    }
}

/// The object as upstream's capacity controller writes it. An update
/// is a merge patch: a maximum the driver stopped reporting is removed.
fn desired_object(
    name: &str,
    target: &Target<'_>,
    driver: &str,
    want: &Capacity,
) -> serde_json::Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIStorageCapacity",
        "metadata": {
            "name": name,
            "namespace": target.namespace,
            "labels": BTreeMap::from([
                (LABEL_DRIVER, driver),
                (LABEL_MANAGED_BY, MANAGED_BY),
            ]),
            "ownerReferences": target.owner.map(|o| vec![o]),
        },
        "storageClassName": want.class,
        "nodeTopology": { "matchLabels": want.topology },
        "capacity": format_bytes(want.bytes),
        "maximumVolumeSize": want.maximum.map(format_bytes),
    })
}

/// The controller's Deployment, as external-provisioner finds it with
/// `--capacity-ownerref-level=2`: this pod's controller (a ReplicaSet),
/// then that one's. A pod owned otherwise (a StatefulSet) gives its own
/// owner. Without `POD_NAME`, or a pod that cannot be found, the objects
/// have no owner (and are logged as such): they then outlive the
/// controller until it deletes them.
async fn find_owner(ctx: &Context, settings: &Settings) -> Result<Option<OwnerReference>, Error> {
    let Some(pod_name) = &settings.pod else {
        tracing::info!("POD_NAME not set: CSIStorageCapacity objects get no owner");
        return Ok(None);
    };
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &settings.namespace);
    let Some(pod) = pods.get_opt(pod_name).await? else {
        tracing::warn!(pod = %pod_name, namespace = %settings.namespace, "this controller's pod is not found: CSIStorageCapacity objects get no owner");
        return Ok(None);
    };
    let Some(first) = controller_of(pod.owner_references()) else {
        tracing::warn!(pod = %pod_name, "this controller's pod has no owner: CSIStorageCapacity objects get no owner");
        return Ok(None);
    };
    if first.kind != "ReplicaSet" {
        return Ok(Some(first));
    }
    let sets = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &settings.namespace);
    let owner = match sets.get_opt(&first.name).await? {
        Some(set) => controller_of(set.owner_references()).unwrap_or(first),
        None => first,
    };
    tracing::info!(kind = %owner.kind, name = %owner.name, "CSIStorageCapacity objects are owned by this controller's {}", owner.kind);
    Ok(Some(owner))
}

fn controller_of(refs: &[OwnerReference]) -> Option<OwnerReference> {
    let r = refs.iter().find(|r| r.controller == Some(true))?;
    Some(OwnerReference {
        api_version: r.api_version.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
        uid: r.uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    })
}
