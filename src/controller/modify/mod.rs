//! external-resizer's other job, VolumeAttributesClass (GA in 1.34): when a
//! bound claim's `volumeAttributesClassName` changes, ControllerModifyVolume
//! with the new class's parameters on the PV's `--csi-driver`, then the PV's
//! `volumeAttributesClassName` and the claim's
//! `currentVolumeAttributesClassName`, with `modifyVolumeStatus`
//! (`Pending`, `InProgress`, `Infeasible`) on the way. `local.stowage.dev`
//! has nothing mutable: a change is refused with an event.

mod apply;
mod plan;

pub use plan::{Modify, ModifyError, ModifyView, Served, plan, wanted_change};

use std::sync::Arc;

use k8s_openapi::api::storage::v1::VolumeAttributesClass;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::informer::Informers;
use super::job::{Job, JobRun, Retry};
use super::{Context, Error, claim_of_pv};
use crate::backend::local;
use crate::controller::cached_claim::Claim;

pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let claims = informers.claims.subscribe();
    let pvs = informers.pvs.subscribe();
    let controller = Controller::for_shared_stream(claims, ctx.stores.claims.clone())
        .watches_shared_stream(pvs, claim_of_pv);
    let job = Job {
        name: "modify",
        retry: Retry::Backoff,
    };
    job.run(controller, reconcile, ctx)
}

#[tracing::instrument(skip_all, fields(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any())))]
async fn reconcile(claim: Arc<Claim>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Most claims ask for nothing: no cache lookups, no API calls.
    let Some(wanted) = wanted_change(&claim) else {
        return Ok(Action::await_change());
    };
    let _timer = ctx.metrics.jobs.reconcile_timer("modify");
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    let pv = ctx.stores.pvs.get(&ObjectRef::new(&pv_name));
    let driver_name = pv
        .as_deref()
        .and_then(|p| p.spec.as_ref()?.csi.as_ref())
        .map(|c| c.driver.clone())
        .unwrap_or_default();
    let driver = ctx.drivers.get(&driver_name);
    let served = match driver {
        Some(d) => Served::Remote {
            modifies: d.capabilities().await?.modify,
        },
        None if ctx.serve_local && driver_name == local::DRIVER_NAME => Served::Local,
        None => Served::Elsewhere,
    };
    let target = match served {
        Served::Remote { modifies: true } => {
            Api::<VolumeAttributesClass>::all(ctx.client.clone())
                .get_opt(&wanted)
                .await?
        }
        _ => None,
    };
    let view = ModifyView {
        claim: &claim,
        pv: pv.as_deref(),
        served,
        target: target.as_ref(),
    };
    let step = plan(&view);
    tracing::debug!(?step, "planned");
    match step {
        Modify::Nothing => Ok(Action::await_change()),
        Modify::Finish { target } => apply::finish(&ctx, &claim, &pv_name, &target).await,
        Modify::Pending { target } => apply::pending(&ctx, &claim, &target).await,
        Modify::Refuse { target, error } => apply::refuse(&ctx, &claim, &target, &error).await,
        Modify::Modify { target, parameters } => {
            let pv = pv.expect("planned from it");
            let driver = driver.expect("planned for a --csi-driver");
            apply::modify(&ctx, &claim, &pv, driver, &target, parameters).await
        }
    }
}
