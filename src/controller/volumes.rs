//! The Volume job: carries out Volumes of `--csi-driver`s (CreateVolume and
//! DeleteVolume, see `remote_volumes.rs`), and deletes a Volume whose claim
//! went away before its PV existed, so its data does not leak.

use std::sync::Arc;

use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::informer::Informers;
use super::job::{Job, JobRun, Retry, trigger};
use super::reclaim::pv_of_volume;
use super::{Context, Error, provision, remote_volumes};
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::Volume;
use crate::kubeapi;

/// The Volume job: Volumes whose claim is gone before their PV existed.
/// A claim deleted triggers its Volume.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
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
    job.run(controller, reconcile, ctx)
}

/// A Volume whose claim was deleted before its PV existed has nobody to
/// release it: delete it here so its data does not leak.
#[tracing::instrument(skip_all, fields(volume = %volume.name_any()))]
async fn reconcile(volume: Arc<Volume>, ctx: Arc<Context>) -> Result<Action, Error> {
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
    let pv_name = pv_of_volume(&volume);
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
    let claims = Api::<Claim>::namespaced(ctx.client.clone(), &claim.namespace);
    if kubeapi::exists_with_uid(&claims, &claim.name, Some(&claim.uid)).await? {
        return Ok(Action::await_change());
    }
    // The PV may have been created since the cache was read.
    if Api::<Pv>::all(ctx.client.clone())
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
