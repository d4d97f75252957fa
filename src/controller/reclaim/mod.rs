//! The reclaim job (external-provisioner's deletion side), keyed by PV:
//! what happens to a PV of ours once its claim is gone (`plan.rs`), carried
//! out in `apply.rs`. The attacher's PV finalizer is dropped here too, once
//! no VolumeAttachment names the PV.

mod apply;
mod plan;

pub use plan::{Reclaim, plan};

use std::sync::Arc;

use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::informer::Informers;
use super::job::{Job, JobRun, Retry, trigger};
use super::{Context, Error, attach, csi_handle, provision};
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::Volume;
use crate::kubeapi;

/// The reclaim job, keyed by PV: a PV is looked at again when its Volume
/// or claim changes, and when its claim, Volume or VolumeAttachment is
/// deleted.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let pvs = informers.pvs.subscribe();
    let volumes = informers.volumes.subscribe();
    let claims = informers.claims.subscribe();
    let (requeue, requeues) = trigger::<Pv>();
    let pv_of_claim = |c: &Claim| {
        let bound = c
            .spec
            .as_ref()?
            .volume_name
            .clone()
            .filter(|n| !n.is_empty());
        bound.or_else(|| provision::volume_name(c))
    };
    {
        // A claim gone: its PV may be Released.
        let requeue = requeue.clone();
        informers.claims.on_delete(move |c| {
            if let Some(pv) = pv_of_claim(c) {
                let _ = requeue.send(ObjectRef::new(&pv));
            }
        });
    }
    {
        // A VolumeAttachment gone: its PV may drop our attacher finalizer.
        let requeue = requeue.clone();
        informers
            .attachments
            .on_delete(move |va: &VolumeAttachment| {
                if let Some(pv) = va.spec.source.persistent_volume_name.as_deref() {
                    let _ = requeue.send(ObjectRef::new(pv));
                }
            });
    }
    // A Volume gone: its PV can go.
    informers.volumes.on_delete(move |v: &Volume| {
        let _ = requeue.send(ObjectRef::new(&pv_of_volume(v)));
    });
    let controller = Controller::for_shared_stream(pvs, ctx.stores.pvs.clone())
        .watches_shared_stream(volumes, |v: Arc<Volume>| {
            Some(ObjectRef::new(&pv_of_volume(&v)))
        })
        .watches_shared_stream(claims, move |c: Arc<Claim>| {
            Some(ObjectRef::new(&pv_of_claim(&c)?))
        })
        .reconcile_on(requeues);
    let job = Job {
        name: "reclaim",
        retry: Retry::Backoff,
    };
    job.run(controller, reconcile, ctx)
}

/// The PV a Volume serves: provisioned Volumes are named after it.
pub(crate) fn pv_of_volume(v: &Volume) -> String {
    v.spec
        .persistent_volume_name
        .clone()
        .unwrap_or_else(|| v.name_any())
}

#[tracing::instrument(skip_all, fields(pv = %pv.name_any()))]
async fn reconcile(pv: Arc<Pv>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.jobs.reconcile_timer("reclaim");
    let driver = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.driver.as_str());
    if driver.is_some_and(|d| ctx.drivers.contains_key(d))
        && let Some(ours) = attach::pv_released(&pv, &ctx.stores.attachments.state())
    {
        let pvs = Api::<Pv>::all(ctx.client.clone());
        kubeapi::remove_finalizer(&pvs, &pv, &ours).await?;
        return Ok(Action::await_change());
    }
    let exists = claim_exists(&ctx, &pv).await?;
    let handle = csi_handle(&pv);
    // Provisioned Volumes carry the PV's name; a driver's handle is its own.
    let volume = ctx
        .stores
        .volumes
        .get(&ObjectRef::new(&pv.name_any()))
        .or_else(|| handle.and_then(|h| ctx.stores.volumes.get(&ObjectRef::new(h))));
    let action = plan(
        &pv,
        exists,
        volume.as_deref(),
        |d| ctx.serves(d),
        |d| ctx.drivers.contains_key(d),
    );
    tracing::debug!(?action, "planned");
    apply::apply(&ctx, &pv, volume.as_deref(), action).await?;
    Ok(Action::await_change())
}

/// Whether the claim the PV's claimRef names still exists (with that UID).
/// The cache saying "gone" is confirmed with the API server before acting.
async fn claim_exists(ctx: &Context, pv: &Pv) -> Result<bool, Error> {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return Ok(false);
    };
    let (Some(namespace), Some(name)) = (r.namespace.as_deref(), r.name.as_deref()) else {
        return Ok(false);
    };
    let cached = ctx
        .stores
        .claims
        .get(&ObjectRef::new(name).within(namespace))
        .filter(|c| r.uid.is_none() || c.uid() == r.uid);
    if cached.is_some() {
        return Ok(true);
    }
    let api = Api::<Claim>::namespaced(ctx.client.clone(), namespace);
    Ok(kubeapi::exists_with_uid(&api, name, r.uid.as_deref()).await?)
}
