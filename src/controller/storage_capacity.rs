//! external-provisioner's capacity job (`--enable-capacity`): one
//! `CSIStorageCapacity` per StorageClass of `local.stowage.dev` and node,
//! saying how large a volume of that class the node can still take, so
//! that kube-scheduler (CSIDriver `storageCapacity: true`) sends a pod only
//! where its volume fits.
//!
//! As upstream: the objects live in the controller's namespace, carry the
//! labels `csi.storage.k8s.io/drivername` and
//! `csi.storage.k8s.io/managed-by`, and are owned by the controller's
//! Deployment (found from this pod through its ReplicaSet), so that they go
//! with it. `nodeTopology` matches the label every local PV's node affinity
//! uses (`topology.stowage.dev/node`).
//!
//! The desired set is a product of classes and nodes, and either going
//! must remove objects: so the job is one pass over the whole set (pure
//! `plan::plan` and `plan::diff`, then a thin `apply`), run on every change
//! of a class, a StorageNode or a Volume (coalesced) and every
//! `--capacity-poll-interval`. A pass costs classes × nodes, whatever the
//! number of claims.

mod plan;

use futures::FutureExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::informer::Informers;
use super::job::JobRun;
use super::{Config, Context, Error};
use crate::backend::local;
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
}

/// The capacity job (unless `--enable-capacity=false` or
/// `--serve-local=false`): subscribes to what changes capacity, then runs
/// a pass per change (coalesced) and per poll interval.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers, config: &Config) -> JobRun {
    let enabled = config.enable_capacity && config.serve_local;
    let wake = Arc::new(Notify::new());
    if enabled {
        informers.classes.on_apply(poke(&wake));
        informers.classes.on_delete(poke(&wake));
        informers.storage_nodes.on_apply(poke(&wake));
        informers.storage_nodes.on_delete(poke(&wake));
        informers.volumes.on_apply(poke(&wake));
        informers.volumes.on_delete(poke(&wake));
    }
    let settings = Settings {
        namespace: config.leader_election_namespace.clone(),
        pod: config.identity.clone(),
        poll_interval: config.capacity_poll_interval,
    };
    async move {
        if enabled {
            run(ctx, wake, settings).await;
        }
    }
    .boxed()
}

/// A watch hook that asks for a pass.
fn poke<K>(wake: &Arc<Notify>) -> impl Fn(&K) + Send + Sync + 'static {
    let wake = wake.clone();
    move |_| wake.notify_one()
}

async fn run(ctx: Arc<Context>, wake: Arc<Notify>, settings: Settings) {
    let mut owner: Option<Option<OwnerReference>> = None;
    let mut next = Duration::ZERO;
    // Counted under one reference, so that failures back off as any
    // object's do.
    let key = ObjectReference {
        kind: Some("CSIStorageCapacity".into()),
        namespace: Some(settings.namespace.clone()),
        ..Default::default()
    };
    loop {
        tokio::select! {
            () = wake.notified() => tokio::time::sleep(COALESCE).await,
            () = tokio::time::sleep(next) => {}
        }
        let Some(_pass) = ctx.gate.enter().await else {
            return;
        };
        let _timer = ctx.metrics.jobs.reconcile_timer(JOB);
        if owner.is_none() {
            match find_owner(&ctx, &settings).await {
                Ok(found) => owner = Some(found),
                Err(e) => {
                    next = failed(&ctx, &key, &e);
                    continue;
                }
            }
        }
        let owner = owner.clone().flatten();
        next = match pass(&ctx, &settings.namespace, owner.as_ref()).await {
            Ok(published) => {
                ctx.metrics.storage_capacities.set(published as i64);
                ctx.forget_failures(&key);
                settings.poll_interval
            }
            Err(e) => failed(&ctx, &key, &e),
        };
    }
}

fn failed(ctx: &Context, key: &ObjectReference, error: &Error) -> Duration {
    tracing::warn!(job = JOB, %error, "publishing storage capacity failed");
    ctx.metrics.jobs.reconcile_failed(JOB, error.metric_label());
    ctx.backoff(key, true)
}

/// One pass: plan from the caches, diff against our objects as the API
/// server has them now, apply. Returns how many objects are published.
#[tracing::instrument(skip_all, fields(namespace = %namespace))]
async fn pass(
    ctx: &Context,
    namespace: &str,
    owner: Option<&OwnerReference>,
) -> Result<usize, Error> {
    let classes = ctx.stores.classes.state();
    let nodes = ctx.stores.storage_nodes.state();
    let promised = ctx
        .promised
        .lock()
        .expect("capacity index poisoned")
        .per_node();
    let desired = plan::plan(
        &classes.iter().map(|c| c.as_ref()).collect::<Vec<_>>(),
        &nodes.iter().map(|n| n.as_ref()).collect::<Vec<_>>(),
        &promised,
    );
    let api = Api::<CSIStorageCapacity>::namespaced(ctx.client.clone(), namespace);
    let selector = format!(
        "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_DRIVER}={}",
        local::DRIVER_NAME
    );
    let existing = api.list(&ListParams::default().labels(&selector)).await?;
    let existing: Vec<_> = existing.items.iter().collect();
    let has_owner = |o: &CSIStorageCapacity| {
        owner.is_none_or(|want| o.owner_references().iter().any(|r| r.uid == want.uid))
    };
    let changes = plan::diff(&desired, &existing, has_owner);
    tracing::debug!(
        existing = existing.len(),
        desired = desired.len(),
        changes = changes.len(),
        "storage capacity planned"
    );
    for change in &changes {
        apply(&api, namespace, owner, change).await?;
    }
    if !changes.is_empty() {
        tracing::debug!(
            changes = changes.len(),
            published = desired.len(),
            "storage capacity published"
        );
    }
    Ok(desired.len())
}

/// Makes one change; an object already created or already gone is the
/// change done (another pass, or a replica that led before, did it).
async fn apply(
    api: &Api<CSIStorageCapacity>,
    namespace: &str,
    owner: Option<&OwnerReference>,
    change: &Change,
) -> Result<(), Error> {
    let result = match change {
        Change::Create(name, want) => {
            let object: CSIStorageCapacity =
                serde_json::from_value(desired_object(name, namespace, owner, want))
                    .expect("literal matches CSIStorageCapacity");
            api.create(&PostParams::default(), &object).await.map(drop)
        }
        Change::Update(name, want) => {
            let patch = desired_object(name, namespace, owner, want);
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        Change::Delete(name) => api.delete(name, &DeleteParams::default()).await.map(drop),
    };
    match result {
        Err(kube::Error::Api(s)) if s.code == 409 || (s.code == 404 && deleting(change)) => Ok(()),
        other => other.map_err(Error::from),
    }
}

fn deleting(change: &Change) -> bool {
    matches!(change, Change::Delete(_))
}

/// The object as upstream's capacity controller writes it.
fn desired_object(
    name: &str,
    namespace: &str,
    owner: Option<&OwnerReference>,
    want: &Capacity,
) -> serde_json::Value {
    let bytes = format_bytes(want.bytes);
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIStorageCapacity",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": BTreeMap::from([
                (LABEL_DRIVER, local::DRIVER_NAME),
                (LABEL_MANAGED_BY, MANAGED_BY),
            ]),
            "ownerReferences": owner.map(|o| vec![o]),
        },
        "storageClassName": want.class,
        "nodeTopology": { "matchLabels": { local::TOPOLOGY_KEY: want.node } },
        "capacity": bytes,
        "maximumVolumeSize": bytes,
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
