//! The claim job: external-provisioner's provisioning and kcm's binder,
//! both keyed by claim. One pass reads the caches once, runs the
//! provisioning plan and its apply (`provision/`), and, once the claim's
//! PV exists, the binding plan and its apply (`bind/`). They share a job
//! because binding acts on provisioning's result: two jobs on one claim
//! would race each other's writes and backoffs.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use k8s_openapi::api::storage::v1::VolumeAttributesClass;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::bind;
use super::informer::Informers;
use super::job::{Job, JobRun, Retry, trigger};
use super::protocol::*;
use super::provision::{self, ClaimView, topology};
use super::{Context, Error, claim_of_pv, claim_of_volume, reference_grants};
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::{StorageNode, Volume};

/// The claim job: provisions and binds claims; a claim is looked at again
/// when its Volume or PV changes, when a Volume is deleted (its room may
/// let a waiting claim fit), and when a ReferenceGrant in its source's
/// namespace changes.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
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
                ctx.superseded.forget(&uid);
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
    let (requeue, requeues) = trigger::<Claim>();
    let grants = reference_grants::requeue_on_change(ctx.clone(), requeue.clone());
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
    let run = job.run(controller, reconcile, ctx);
    futures::future::join(run, grants).map(|_| ()).boxed()
}

/// The pending claims a deleted Volume's room could serve: those the
/// scheduler placed on its node, and those of its driver's Immediate
/// classes that have no node yet.
fn waiting_for_room_of(ctx: &Context, volume: &Volume) -> Vec<ObjectRef<Claim>> {
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
pub async fn reconcile(claim: Arc<Claim>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.jobs.reconcile_timer("claim");
    // Woken by the event of an earlier write of ours: the event of our
    // newest write is still to come.
    if let (Some(uid), Some(version)) = (claim.uid(), claim.resource_version())
        && ctx.superseded.is_stale(&uid, &version)
    {
        return Ok(Action::await_change());
    }
    let class = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .and_then(|name| ctx.stores.classes.get(&ObjectRef::new(name)));
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
    let found = Found::gather(&ctx, &claim);
    let class = class.as_deref();
    let pv_refs: Vec<_> = found.pvs.iter().map(|p| p.as_ref()).collect();
    let static_match = class.is_some_and(|c| {
        c.volume_binding_mode.as_deref() != Some(BINDING_WAIT_FOR_FIRST_CONSUMER)
            && bind::best_static_match(&claim, c, &pv_refs).is_some()
    });
    let remote = class.is_some_and(|c| ctx.drivers.contains_key(&c.provisioner));
    // Only a remote claim still to be provisioned needs topology.
    let driver_nodes = match class {
        Some(c) if remote && found.volume.is_none() => {
            topology::driver_nodes(&ctx.stores, &c.provisioner)
        }
        _ => Vec::new(),
    };
    let attributes_class = match provision::attributes_class_name(&claim) {
        Some(name) if remote && found.volume.is_none() => {
            Api::<VolumeAttributesClass>::all(ctx.client.clone())
                .get_opt(name)
                .await?
        }
        _ => None,
    };
    let source = match (class, provision::source::requested(&claim)) {
        (Some(c), Some(requested)) if found.volume.is_none() => {
            provision::source::lookup(&ctx, &claim, &c.provisioner, &requested).await?
        }
        _ => provision::source::Lookup::Nothing,
    };
    let source_node = provision::source::local_node(&ctx, &source);
    let nodes: Vec<_> = found.storage_nodes.iter().map(|n| n.as_ref()).collect();
    let view = ClaimView {
        claim: &claim,
        class,
        volume: found.volume.as_deref(),
        pv: found.pv.as_deref(),
        storage_nodes: &nodes,
        promised: &found.promised,
        static_match,
        remote,
        serve_local: ctx.serve_local,
        driver_nodes,
        attributes_class: attributes_class.as_ref(),
        source,
        source_node,
    };
    let step = provision::plan(&view);
    tracing::debug!(?step, "planned");
    if let Some(action) = provision::apply(&ctx, &claim, class, step).await? {
        return Ok(action);
    }
    bind::apply::bind(&ctx, &claim, class, &found.pvs).await
}

/// What the claim's plans look at, read from the caches.
struct Found {
    volume: Option<Arc<Volume>>,
    pv: Option<Arc<Pv>>,
    /// The PVs it may bind: the one it names, ours, or static candidates.
    pvs: Vec<Arc<Pv>>,
    storage_nodes: Vec<Arc<StorageNode>>,
    promised: BTreeMap<String, i64>,
}

impl Found {
    fn gather(ctx: &Context, claim: &Claim) -> Found {
        let s = &ctx.stores;
        let name = provision::volume_name(claim).unwrap_or_default();
        let volume = s.volumes.get(&ObjectRef::new(&name));
        let pv = s.pvs.get(&ObjectRef::new(&name));
        let named = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty());
        // Room on nodes and every PV (for a static match) matter only to a
        // claim still looking for its PV; one that names its PV, or has
        // ours, needs that PV alone.
        let looking = named.is_none() && volume.is_none() && pv.is_none();
        let promised = if looking {
            ctx.promised
                .lock()
                .expect("capacity index poisoned")
                .per_node()
        } else {
            BTreeMap::new()
        };
        let pvs = match (&named, &pv) {
            (Some(named), _) => s.pvs.get(&ObjectRef::new(named)).into_iter().collect(),
            (None, Some(pv)) => vec![pv.clone()],
            (None, None) => static_candidates(ctx, claim),
        };
        Found {
            volume,
            pv,
            pvs,
            storage_nodes: s.storage_nodes.state(),
            promised,
        }
    }
}

/// The PVs a claim looking for one could bind: its class's unclaimed PVs
/// and any whose claimRef names it (from the index, not every PV).
fn static_candidates(ctx: &Context, claim: &Claim) -> Vec<Arc<Pv>> {
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
