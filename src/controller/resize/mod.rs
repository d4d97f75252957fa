//! external-resizer's job for `local.stowage.dev`, keyed by claim.
//!
//! A bound claim whose request exceeds its capacity moves through the states
//! kubelet and kubectl know from external-resizer (with
//! RecoverVolumeExpansionFailure, GA since 1.34): `allocatedResources` set and
//! `ControllerResizeInProgress` → the Volume's `capacityBytes` grows and its
//! node agent grows the image → the PV's capacity follows → either
//! `NodeResizePending` with the `FileSystemResizePending` condition, after
//! which kubelet's NodeExpandVolume grows the filesystem and writes the new
//! capacity, or (plain directories) the new capacity at once.
//!
//! A `--csi-driver`'s claim takes external-resizer's path instead:
//! `ControllerResizeInProgress` → ControllerExpandVolume → the PV's
//! capacity → `NodeResizePending` when the driver says
//! `node_expansion_required`, else the new capacity.
//!
//! Every step is read back from the objects, so a crash between steps
//! resumes where it stopped; no step shrinks anything.

mod apply;
mod plan;

pub use plan::{Resize, ResizeError, ResizeView, plan};

use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use super::informer::Informers;
use super::job::{Job, JobRun, Retry};
use super::{Context, Error, capacity, claim_of_pv, claim_of_volume, csi_handle};
use crate::controller::cached_claim::Claim;
use crate::crd::Volume;

pub const CONTROLLER_RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
pub const CONTROLLER_RESIZE_INFEASIBLE: &str = "ControllerResizeInfeasible";
pub const NODE_RESIZE_PENDING: &str = "NodeResizePending";
pub const NODE_RESIZE_IN_PROGRESS: &str = "NodeResizeInProgress";
pub const NODE_RESIZE_INFEASIBLE: &str = "NodeResizeInfeasible";

/// The expansion job, on its own queue: an expansion never waits behind a
/// provisioning storm.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let claims = informers.claims.subscribe();
    let volumes = informers.volumes.subscribe();
    let pvs = informers.pvs.subscribe();
    let controller = Controller::for_shared_stream(claims, ctx.stores.claims.clone())
        .watches_shared_stream(volumes, claim_of_volume)
        .watches_shared_stream(pvs, claim_of_pv);
    let job = Job {
        name: "resize",
        retry: Retry::Backoff,
    };
    job.run(controller, reconcile, ctx)
}

/// Free bytes on the Volume's node, less what is promised there.
fn free_on_node(ctx: &Context, volume: &Volume) -> Option<i64> {
    let nodes = ctx.stores.storage_nodes.state();
    let nodes: Vec<_> = nodes.iter().map(|n| n.as_ref()).collect();
    let promised = ctx
        .promised
        .lock()
        .expect("capacity index poisoned")
        .per_node();
    capacity::free_on(&nodes, &promised, volume.spec.node.as_deref()?)
}

#[tracing::instrument(skip_all, fields(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any())))]
pub async fn reconcile(claim: Arc<Claim>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.jobs.reconcile_timer("resize");
    let s = &ctx.stores;
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    if pv_name.is_empty() {
        return Ok(Action::await_change());
    }
    let pv = s.pvs.get(&ObjectRef::new(&pv_name));
    let driver = pv.as_deref().and_then(plan::driver_of);
    let remote = driver.and_then(|d| ctx.drivers.get(d));
    if remote.is_none() && (!ctx.serve_local || driver != Some(crate::backend::local::DRIVER_NAME))
    {
        return Ok(Action::await_change());
    }
    let remote_expands = match remote {
        Some(driver) => Some(driver.capabilities().await?.expand),
        None => None,
    };
    let class = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .and_then(|name| s.classes.get(&ObjectRef::new(name)));
    let volume_name = pv.as_deref().and_then(csi_handle).unwrap_or_default();
    let volume = s.volumes.get(&ObjectRef::new(volume_name));
    let view = ResizeView {
        claim: &claim,
        pv: pv.as_deref(),
        class: class.as_deref(),
        volume: volume.as_deref(),
        free_on_node: volume.as_ref().and_then(|v| free_on_node(&ctx, v)),
        remote_expands,
    };
    let step = plan(&view);
    tracing::debug!(?step, "planned");
    match step {
        Resize::Nothing | Resize::WaitForNode => {}
        Resize::Refuse(e) => return apply::refuse(&ctx, &claim, &e).await,
        Resize::Start { request } => apply::start(&ctx, &claim, &request, &pv_name).await?,
        Resize::GrowVolume { bytes } => {
            let volume = volume.expect("planned from it");
            apply::grow_volume(&ctx, &volume, bytes).await?
        }
        Resize::ResizePv { bytes } => apply::resize_pv(&ctx, &pv_name, bytes).await?,
        Resize::AwaitNodeExpansion => apply::await_node_expansion(&ctx, &claim).await?,
        Resize::Finish { bytes } => apply::finish(&ctx, &claim, bytes).await?,
        Resize::ExpandInDriver { bytes } => {
            let pv = pv.expect("planned from it");
            let driver = remote.expect("planned for a --csi-driver");
            return apply::expand_in_driver(&ctx, &claim, &pv, driver, bytes).await;
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests;
