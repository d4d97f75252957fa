//! Reconciler keyed by claim: provisions (provision.rs), then binds (bind.rs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::bind::{self, BindSteps, Binding};
use super::informer::Informers;
use super::job::{Job, Retry, trigger};
use super::protocol::*;
use super::provision::{self, ClaimView, Provision};
use super::{Context, Error, claim_of_pv, claim_of_volume};
use crate::crd::Volume;

/// The claim job: provisions and binds claims; a claim is looked at again
/// when its Volume or PV changes, and when a Volume is deleted (its room
/// may let a waiting claim fit).
pub fn controller(
    ctx: Arc<Context>,
    informers: &mut Informers,
) -> impl Future<Output = ()> + Send + 'static {
    let claims = informers.claims.subscribe();
    let volumes = informers.volumes.subscribe();
    let pvs = informers.pvs.subscribe();
    {
        let ctx = ctx.clone();
        informers.claims.on_apply(move |c| {
            ctx.pending.lock().expect("pending index poisoned").apply(c);
            count_pending(&ctx);
        });
    }
    {
        let ctx = ctx.clone();
        informers.claims.on_delete(move |c| {
            if let Some(uid) = c.uid() {
                ctx.metrics.forget_claim(&uid);
            }
            ctx.pending
                .lock()
                .expect("pending index poisoned")
                .delete(c);
            count_pending(&ctx);
        });
    }
    {
        let ctx = ctx.clone();
        informers.pvs.on_apply(move |pv| {
            ctx.static_pvs.lock().expect("PV index poisoned").apply(pv);
        });
    }
    {
        let ctx = ctx.clone();
        informers.pvs.on_delete(move |pv| {
            ctx.static_pvs.lock().expect("PV index poisoned").delete(pv);
        });
    }
    let (requeue, requeues) = trigger::<PersistentVolumeClaim>();
    {
        let ctx = ctx.clone();
        informers.volumes.on_delete(move |v: &Volume| {
            for claim in waiting_for_room_of(&ctx, v) {
                let _ = requeue.send(claim);
            }
        });
    }
    let controller = Controller::for_shared_stream(claims, ctx.stores.claims.clone())
        .watches_shared_stream(volumes, claim_of_volume)
        .watches_shared_stream(pvs, claim_of_pv)
        .reconcile_on(requeues);
    let job = Job {
        name: "claim",
        retry: Retry::Backoff,
    };
    job.run(controller, reconcile, ctx)
}

/// The pending claims a deleted Volume's room could serve: those the
/// scheduler placed on its node, and those of its driver's Immediate
/// classes that have no node yet.
fn waiting_for_room_of(ctx: &Context, volume: &Volume) -> Vec<ObjectRef<PersistentVolumeClaim>> {
    let pending = ctx.pending.lock().expect("pending index poisoned");
    let mut claims = volume
        .spec
        .node
        .as_deref()
        .map(|node| pending.on_node(node))
        .unwrap_or_default();
    for class in ctx.stores.classes.state() {
        if class.provisioner == volume.spec.driver
            && class.volume_binding_mode.as_deref() != Some(BINDING_WAIT_FOR_FIRST_CONSUMER)
        {
            claims.extend(pending.unscheduled(&class.name_any()));
        }
    }
    claims
}

/// The backlog gauge, from the pending index: a sum over classes.
fn count_pending(ctx: &Context) {
    let pending = ctx
        .pending
        .lock()
        .expect("pending index poisoned")
        .count(|class| {
            ctx.stores
                .classes
                .get(&ObjectRef::new(class))
                .is_some_and(|c| ctx.serves(&c.provisioner))
        });
    ctx.metrics.claims_pending.set(pending as i64);
}

#[tracing::instrument(skip_all, fields(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any())))]
pub async fn reconcile(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.jobs.reconcile_timer("claim");
    let s = &ctx.stores;
    let class = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .and_then(|name| s.classes.get(&ObjectRef::new(name)));
    // Another provisioner's claim (most claims of a large cluster): both
    // plans would skip it; do not read every Volume and PV to find that out.
    let ours = class.as_deref().is_some_and(|c| {
        ctx.serves(&c.provisioner)
            || provision::claim_provisioner(&claim, Some(c)).is_some_and(|p| ctx.serves(p))
    });
    if !ours {
        return Ok(Action::await_change());
    }
    // Also here: classes may have arrived after the claims that name them.
    count_pending(&ctx);
    let name = provision::volume_name(&claim).unwrap_or_default();
    let volume = s.volumes.get(&ObjectRef::new(&name));
    let pv = s.pvs.get(&ObjectRef::new(&name));
    let named = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty());
    // Room on nodes and every PV (for a static match) matter only to a
    // claim still looking for its PV; one that names its PV, or has ours,
    // needs that PV alone.
    let looking = named.is_none() && volume.is_none() && pv.is_none();
    let storage_nodes = s.storage_nodes.state();
    let promised = if looking {
        ctx.promised
            .lock()
            .expect("capacity index poisoned")
            .per_node()
    } else {
        BTreeMap::new()
    };
    let nodes: Vec<_> = storage_nodes.iter().map(|n| n.as_ref()).collect();

    let pvs = match (&named, &pv) {
        (Some(named), _) => s.pvs.get(&ObjectRef::new(named)).into_iter().collect(),
        (None, Some(pv)) => vec![pv.clone()],
        (None, None) => static_candidates(&ctx, &claim),
    };
    let pv_refs: Vec<_> = pvs.iter().map(|p| p.as_ref()).collect();
    let static_match = class.as_deref().is_some_and(|c| {
        c.volume_binding_mode.as_deref() != Some(BINDING_WAIT_FOR_FIRST_CONSUMER)
            && bind::best_static_match(&claim, c, &pv_refs).is_some()
    });
    let remote = class
        .as_deref()
        .is_some_and(|c| ctx.drivers.contains_key(&c.provisioner));
    // Only a remote claim still to be provisioned needs topology: the
    // selected node's for WaitForFirstConsumer, everywhere the driver runs
    // for Immediate.
    let (node_topology, cluster_topology) = match (&class, &volume) {
        (Some(c), None) if remote => {
            if c.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER) {
                (
                    selected_node_topology(&ctx, &claim, &c.provisioner).await?,
                    Vec::new(),
                )
            } else {
                (None, cluster_topology(&ctx, &c.provisioner))
            }
        }
        _ => (None, Vec::new()),
    };
    let view = ClaimView {
        claim: &claim,
        class: class.as_deref(),
        volume: volume.as_deref(),
        pv: pv.as_deref(),
        storage_nodes: &nodes,
        promised: &promised,
        static_match,
        remote,
        serve_local: ctx.serve_local,
        node_topology,
        cluster_topology,
    };
    let provision = provision::plan(&view);
    tracing::debug!(?provision, "planned");
    match provision {
        Provision::Skip | Provision::Provisioned => {}
        Provision::WaitForConsumer => {
            // The same event kcm's binder posts, so `kubectl describe` reads alike
            // whether or not it runs.
            ctx.event(
                &*claim,
                EventType::Normal,
                "WaitForFirstConsumer",
                "Provision",
                "waiting for first consumer to be created before binding",
            )
            .await;
            return Ok(Action::await_change());
        }
        Provision::Fail(e) => {
            ctx.event(
                &*claim,
                EventType::Warning,
                "ProvisioningFailed",
                "Provision",
                &e.to_string(),
            )
            .await;
            ctx.metrics
                .jobs
                .reconcile_failed("claim", "provisioning_failed");
            let retry = ctx.backoff(&claim.object_ref(&()), e.may_resolve_itself());
            return Ok(Action::requeue(retry));
        }
        Provision::CreateVolume(volume) => {
            ctx.event(
                &*claim,
                EventType::Normal,
                "Provisioning",
                "Provision",
                &provisioning_note(&claim, volume.spec.node.as_deref()),
            )
            .await;
            create_idempotent(&Api::<Volume>::all(ctx.client.clone()), &volume).await?;
            crate::failpoint::hit("controller-after-volume-created");
            return Ok(Action::await_change());
        }
        Provision::WaitForData { .. } => return Ok(Action::await_change()),
        Provision::CreatePv(pv) => {
            crate::failpoint::hit("controller-before-pv-created");
            create_idempotent(&Api::<PersistentVolume>::all(ctx.client.clone()), &pv).await?;
            crate::failpoint::hit("controller-after-pv-created");
            ctx.event(
                &*claim,
                EventType::Normal,
                "ProvisioningSucceeded",
                "Provision",
                &format!("Successfully provisioned volume {}", pv.name_any()),
            )
            .await;
            ctx.forget_failures(&claim.object_ref(&()));
            return Ok(Action::await_change());
        }
    }

    match bind::plan(&claim, class.as_deref(), &pv_refs, |c| {
        ctx.serves(&c.provisioner)
    }) {
        Binding::Skip => {}
        // Whoever wrote the last half (we or kcm's binder), the user waited
        // until now.
        Binding::Done => ctx.metrics.observe_claim_bound(&claim),
        Binding::Bind(steps) => {
            let pv = pvs
                .iter()
                .find(|p| p.name_any() == steps.pv)
                .expect("planned from this list");
            if let Some(wait) = kcm_binder_grace(&claim, pv, ctx.kcm_binder_grace) {
                return Ok(Action::requeue(wait));
            }
            apply_binding(&ctx, &claim, pv, &steps).await?;
        }
    }
    Ok(Action::await_change())
}

/// The PVs a claim looking for one could bind: its class's unclaimed PVs
/// and any whose claimRef names it (from the index, not every PV).
fn static_candidates(ctx: &Context, claim: &PersistentVolumeClaim) -> Vec<Arc<PersistentVolume>> {
    let class = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let namespace = claim.namespace().unwrap_or_default();
    let names = ctx
        .static_pvs
        .lock()
        .expect("PV index poisoned")
        .candidates(&class, &namespace, &claim.name_any());
    names
        .iter()
        .filter_map(|n| ctx.stores.pvs.get(&ObjectRef::new(n)))
        .collect()
}

/// external-provisioner's words, naming the node only when there is one
/// (`Immediate` claims of other drivers have none).
fn provisioning_note(claim: &PersistentVolumeClaim, node: Option<&str>) -> String {
    let key = format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    match node {
        Some(node) => {
            format!(
                "External provisioner is provisioning volume for claim \"{key}\" on node {node}"
            )
        }
        None => format!("External provisioner is provisioning volume for claim \"{key}\""),
    }
}

/// kcm's binder marks the claims it works on with the storage-provisioner
/// annotation. When it is there, it will bind our PV itself: writing the
/// same objects at the same moment only makes one of us fail (and kcm then
/// posts a warning event on the claim). So we give it a short head start,
/// and bind only what it has not bound by then; with the binder disabled
/// the annotation never appears and we bind at once.
fn kcm_binder_grace(
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    grace: Duration,
) -> Option<Duration> {
    let ann = claim.annotations();
    let kcm_binder =
        ann.contains_key(ANN_STORAGE_PROVISIONER) || ann.contains_key(ANN_BETA_STORAGE_PROVISIONER);
    let created = pv.metadata.creation_timestamp.as_ref()?.0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(created);
    let left = grace.as_secs_f64() - age.as_secs_f64();
    (kcm_binder && left > 0.0).then(|| Duration::from_secs_f64(left))
}

/// Every topology segment where `driver` runs, as external-provisioner
/// aggregates it for `Immediate` classes: for each CSINode listing the
/// driver, its topology keys valued from that Node's labels (nodes missing
/// a label are left out). Sorted and without repeats.
fn cluster_topology(ctx: &Context, driver: &str) -> Vec<BTreeMap<String, String>> {
    let mut segments = std::collections::BTreeSet::new();
    for csinode in ctx.stores.csinodes.state() {
        let Some(entry) = csinode.spec.drivers.iter().find(|d| d.name == driver) else {
            continue;
        };
        let keys = entry.topology_keys.clone().unwrap_or_default();
        if keys.is_empty() {
            continue;
        }
        let Some(node) = ctx.stores.nodes.get(&ObjectRef::new(&csinode.name_any())) else {
            continue;
        };
        let labels = node.labels();
        let segment: Option<BTreeMap<_, _>> = keys
            .iter()
            .map(|k| Some((k.clone(), labels.get(k)?.clone())))
            .collect();
        segments.extend(segment);
    }
    segments.into_iter().collect()
}

/// The scheduler's node's topology for `driver`, as external-provisioner
/// reads it: the CSINode's topology keys for the driver, valued from the
/// Node's labels. None while the node has no CSINode entry for the driver.
async fn selected_node_topology(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    driver: &str,
) -> Result<Option<BTreeMap<String, String>>, Error> {
    let Some(node) = claim.annotations().get(ANN_SELECTED_NODE) else {
        return Ok(None);
    };
    let Some(csinode) = ctx.stores.csinodes.get(&ObjectRef::new(node)) else {
        return Ok(None);
    };
    let Some(entry) = csinode.spec.drivers.iter().find(|d| d.name == driver) else {
        return Ok(None);
    };
    let labels = ctx
        .stores
        .nodes
        .get(&ObjectRef::new(node))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    Ok(Some(
        entry
            .topology_keys
            .iter()
            .flatten()
            .filter_map(|k| Some((k.clone(), labels.get(k)?.clone())))
            .collect(),
    ))
}

async fn create_idempotent<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes kcm's binding: PV claimRef, PV phase, claim volumeName and
/// annotations, claim status. Each write carries the resourceVersion it was
/// planned from, so a concurrent writer (kcm's binder) wins cleanly and we
/// replan from what it wrote.
async fn apply_binding(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    steps: &BindSteps,
) -> Result<(), Error> {
    let pvs = Api::<PersistentVolume>::all(ctx.client.clone());
    let claims = Api::<PersistentVolumeClaim>::namespaced(
        ctx.client.clone(),
        &claim.namespace().unwrap_or_default(),
    );
    let pp = PatchParams::default();
    let mut pv_version = pv.resource_version();
    if steps.set_claim_ref {
        let patch = json!({
            "metadata": {
                "resourceVersion": pv_version,
                "annotations": { ANN_BOUND_BY_CONTROLLER: "yes" },
            },
            "spec": { "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(), "name": claim.name_any(),
                "uid": claim.uid(), "resourceVersion": claim.resource_version(),
            }},
        });
        pv_version = pvs
            .patch(&steps.pv, &pp, &Patch::Merge(&patch))
            .await?
            .resource_version();
    }
    if steps.set_pv_phase {
        let patch = json!({ "metadata": { "resourceVersion": pv_version }, "status": { "phase": "Bound" } });
        pvs.patch_status(&steps.pv, &pp, &Patch::Merge(&patch))
            .await?;
        crate::failpoint::hit("controller-after-pv-bound");
    }
    let mut claim_version = claim.resource_version();
    if steps.set_claim_volume_name {
        let patch = json!({
            "metadata": {
                "resourceVersion": claim_version,
                "annotations": { ANN_BIND_COMPLETED: "yes", ANN_BOUND_BY_CONTROLLER: "yes" },
            },
            "spec": { "volumeName": steps.pv },
        });
        claim_version = claims
            .patch(&claim.name_any(), &pp, &Patch::Merge(&patch))
            .await?
            .resource_version();
        crate::failpoint::hit("controller-after-claim-volume-name");
    }
    if steps.set_claim_status {
        let spec = pv.spec.clone().unwrap_or_default();
        let patch = json!({
            "metadata": { "resourceVersion": claim_version },
            "status": {
                "phase": "Bound",
                "accessModes": spec.access_modes,
                "capacity": spec.capacity,
            },
        });
        claims
            .patch_status(&claim.name_any(), &pp, &Patch::Merge(&patch))
            .await?;
        tracing::info!(pv = %steps.pv, "claim bound");
    }
    Ok(())
}
