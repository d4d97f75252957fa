//! Reconcilers keyed by PV (reclaim.rs) and by Volume (Volumes whose claim
//! vanished before a PV was made).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::informer::Informers;
use super::job::{Job, Retry, trigger};
use super::protocol::*;
use super::reclaim::{self, Reclaim};
use super::{Context, Error, attach, provision, remote_volumes};
use crate::crd::Volume;
use crate::kubeapi;

/// The reclaim job, keyed by PV: a PV is looked at again when its Volume
/// or claim changes, and when its claim, Volume or VolumeAttachment is
/// deleted.
pub fn controller(
    ctx: Arc<Context>,
    informers: &mut Informers,
) -> impl Future<Output = ()> + Send + 'static {
    let pvs = informers.pvs.subscribe();
    let volumes = informers.volumes.subscribe();
    let claims = informers.claims.subscribe();
    let (requeue, requeues) = trigger::<PersistentVolume>();
    let pv_of_claim = |c: &PersistentVolumeClaim| {
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
        .watches_shared_stream(claims, move |c: Arc<PersistentVolumeClaim>| {
            Some(ObjectRef::new(&pv_of_claim(&c)?))
        })
        .reconcile_on(requeues);
    let job = Job {
        name: "reclaim",
        retry: Retry::Backoff,
    };
    job.run(controller, reconcile, ctx)
}

/// The Volume job: Volumes whose claim is gone before their PV existed.
/// A claim deleted triggers its Volume.
pub fn volume_controller(
    ctx: Arc<Context>,
    informers: &mut Informers,
) -> impl Future<Output = ()> + Send + 'static {
    let volumes = informers.volumes.subscribe();
    let (requeue, requeues) = trigger::<Volume>();
    informers.claims.on_delete(move |c| {
        if let Some(name) = provision::volume_name(c) {
            let _ = requeue.send(ObjectRef::new(&name));
        }
    });
    let controller =
        Controller::for_shared_stream(volumes, ctx.stores.volumes.clone()).reconcile_on(requeues);
    let job = Job {
        name: "volume",
        retry: Retry::After(remote_volumes::retry_after),
    };
    job.run(controller, reconcile_volume, ctx)
}

fn pv_of_volume(v: &Volume) -> String {
    v.spec
        .persistent_volume_name
        .clone()
        .unwrap_or_else(|| v.name_any())
}

/// Whether the claim a claimRef names still exists with the same UID. Asks
/// the API server, not the cache: a stale cache must never delete data.
async fn claim_exists(
    ctx: &Context,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<bool, Error> {
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace);
    let found = api.get_opt(name).await?;
    Ok(found.is_some_and(|c| uid.is_none_or(|u| u.is_empty() || c.uid().as_deref() == Some(u))))
}

#[tracing::instrument(skip_all, fields(pv = %pv.name_any()))]
pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.jobs.reconcile_timer("reclaim");
    let driver = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.driver.as_str());
    if driver.is_some_and(|d| ctx.drivers.contains_key(d))
        && let Some(ours) = attach::pv_released(&pv, &ctx.stores.attachments.state())
    {
        let pvs = Api::<PersistentVolume>::all(ctx.client.clone());
        kubeapi::remove_finalizer(&pvs, &pv, &ours).await?;
        return Ok(Action::await_change());
    }
    let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.clone());
    let cached_claim = claim_ref.as_ref().and_then(|r| {
        let key = ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?);
        ctx.stores
            .claims
            .get(&key)
            .filter(|c| r.uid.is_none() || c.uid() == r.uid)
    });
    // The cache saying "gone" is confirmed with the API server before acting.
    let exists = match (&claim_ref, cached_claim) {
        (None, _) => false,
        (Some(_), Some(_)) => true,
        (Some(r), None) => {
            claim_exists(
                &ctx,
                r.namespace.as_deref().unwrap_or_default(),
                r.name.as_deref().unwrap_or_default(),
                r.uid.as_deref(),
            )
            .await?
        }
    };
    let handle = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone());
    // Provisioned Volumes carry the PV's name; a driver's handle is its own.
    let volume = ctx
        .stores
        .volumes
        .get(&ObjectRef::new(&pv.name_any()))
        .or_else(|| handle.and_then(|h| ctx.stores.volumes.get(&ObjectRef::new(&h))));
    let action = reclaim::plan(&pv, exists, volume.as_deref(), |d| ctx.serves(d));
    tracing::debug!(?action, "planned");

    let pvs = Api::<PersistentVolume>::all(ctx.client.clone());
    let pp = PatchParams::default();
    match action {
        Reclaim::Skip => {}
        Reclaim::MarkReleased => {
            let patch = json!({
                "metadata": { "resourceVersion": pv.resource_version() },
                "status": { "phase": "Released", "message": "its claim was deleted" },
            });
            pvs.patch_status(&pv.name_any(), &pp, &Patch::Merge(&patch))
                .await?;
        }
        Reclaim::DeleteVolume(name) => {
            let volumes = Api::<Volume>::all(ctx.client.clone());
            let uid = volume
                .as_ref()
                .filter(|v| v.name_any() == name)
                .and_then(|v| v.uid());
            kubeapi::delete(&volumes, &name, uid).await?;
            crate::failpoint::hit("controller-after-volume-deleted");
            tracing::info!(volume = %name, "deleting volume data");
        }
        Reclaim::DeletePv => {
            kubeapi::delete(&pvs, &pv.name_any(), pv.uid()).await?;
            crate::failpoint::hit("controller-after-pv-deleted");
            tracing::info!("volume data deleted; PV deleted");
        }
        Reclaim::RemoveFinalizer => {
            kubeapi::remove_finalizer(&pvs, &pv, PV_PROVISIONER_FINALIZER).await?;
        }
        Reclaim::Retained => {
            ctx.event(&*pv, EventType::Normal, "VolumeRetained", "Reclaim",
                "its claim was deleted and the reclaim policy is Retain: the PV and its data are kept; \
                 delete the PV to let the data go, or remove spec.claimRef to reuse it").await;
        }
    }
    Ok(Action::await_change())
}

/// A Volume whose claim was deleted before its PV existed has nobody to
/// release it: delete it here so its data does not leak.
#[tracing::instrument(skip_all, fields(volume = %volume.name_any()))]
pub async fn reconcile_volume(volume: Arc<Volume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.jobs.reconcile_timer("volume");
    if let Some(driver) = ctx.drivers.get(&volume.spec.driver) {
        // A retry not yet due keeps its time.
        let action = remote_volumes::execute(&volume, driver, &ctx).await?;
        if action != Action::await_change() {
            return Ok(action);
        }
    }
    if volume.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(claim) = volume.spec.claim.as_ref() else {
        return Ok(Action::await_change());
    };
    let pv_name = volume
        .spec
        .persistent_volume_name
        .clone()
        .unwrap_or_else(|| volume.name_any());
    if ctx.stores.pvs.get(&ObjectRef::new(&pv_name)).is_some() {
        return Ok(Action::await_change());
    }
    let cached = ctx
        .stores
        .claims
        .get(&ObjectRef::new(&claim.name).within(&claim.namespace));
    if cached.is_some_and(|c| c.uid().as_deref() == Some(claim.uid.as_str())) {
        return Ok(Action::await_change());
    }
    if claim_exists(&ctx, &claim.namespace, &claim.name, Some(&claim.uid)).await? {
        return Ok(Action::await_change());
    }
    // The PV may have been created since the cache was read.
    if Api::<PersistentVolume>::all(ctx.client.clone())
        .get_opt(&pv_name)
        .await?
        .is_some()
    {
        return Ok(Action::await_change());
    }
    tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), "claim deleted before its PV existed; deleting volume");
    let volumes = Api::<Volume>::all(ctx.client.clone());
    kubeapi::delete(&volumes, &volume.name_any(), volume.uid()).await?;
    Ok(Action::await_change())
}
