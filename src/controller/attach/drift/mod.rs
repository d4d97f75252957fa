//! external-attacher's reconcile (its `--reconcile-sync`): for each
//! `--csi-driver` whose ListVolumes reports published nodes, every
//! `--attach-reconcile-interval` the VolumeAttachments are compared with
//! what the driver has published, and where they disagree the driver is
//! brought back in line (see `plan`). A driver that lost a publication
//! (restarted without its state, a volume detached behind Kubernetes'
//! back) gets it back without anyone restarting pods.

mod apply;
mod plan;

pub use plan::{DriftView, Fix, Repair, plan};

use std::sync::Arc;

use futures::FutureExt;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::Instrument;

use super::cached_node_id;
use super::plan::pv_name;
use crate::backend::csi_proxy::CsiDriver;
use crate::controller::job::{self, JobRun};
use crate::controller::{Context, Error};

/// The job's label in the reconcile metrics.
const JOB: &str = "attach_drift";

/// A pass per driver right after this replica starts to lead, then every
/// `--attach-reconcile-interval`, as upstream's loop runs; nothing while
/// not leading, and nothing at all when the interval is 0.
pub fn controller(ctx: Arc<Context>) -> JobRun {
    let interval = ctx.attach_reconcile_interval;
    if interval.is_zero() {
        return futures::future::ready(()).boxed();
    }
    async move {
        while let Some(pass) = ctx.gate.enter().await {
            futures::future::join_all(ctx.drivers.values().map(|d| compare(&ctx, d))).await;
            drop(pass);
            tokio::time::sleep(interval).await;
        }
    }
    .boxed()
}

/// One pass over one driver, counted and timed as a reconcile.
#[tracing::instrument(skip_all, fields(driver = %driver.name))]
async fn compare(ctx: &Context, driver: &CsiDriver) {
    let caps = match driver.capabilities().await {
        Ok(caps) => caps,
        Err(e) => {
            // The attach job reports a driver that is away; here it only
            // means there is nothing to compare with yet.
            tracing::debug!(error = %e, "driver not answering; comparing next time");
            return;
        }
    };
    if !caps.lists_published_nodes() {
        return;
    }
    let _timer = ctx.metrics.jobs.reconcile_timer(JOB);
    // The VAs before ListVolumes: a VA the cache shows attached was
    // published before the driver was asked, so a publish still on its way
    // is never taken for drift.
    let vas: Vec<_> = ctx
        .stores
        .attachments
        .state()
        .into_iter()
        .filter(|va| va.spec.attacher == driver.name)
        .collect();
    let published = match driver.list_volumes().await {
        Ok(published) => published,
        Err(e) => {
            let e = Error::from(e);
            let doing = "comparing VolumeAttachments with the driver";
            job::pass_failed(ctx, JOB, doing, &e);
            return;
        }
    };
    let pvs: Vec<_> = vas
        .iter()
        .map(|va| pv_name(va).and_then(|n| ctx.stores.pvs.get(&ObjectRef::new(n))))
        .collect();
    let views: Vec<_> = vas
        .iter()
        .zip(&pvs)
        .map(|(va, pv)| DriftView {
            va,
            pv: pv.as_deref(),
            node_id: cached_node_id(ctx, &va.spec.node_name, &driver.name),
        })
        .collect();
    let repairs = plan(&views, &driver.name, &published);
    tracing::debug!(
        attachments = views.len(),
        repairs = repairs.len(),
        "compared"
    );
    for r in &repairs {
        let span =
            tracing::info_span!("repair", va = %r.va.name_any(), node = %r.va.spec.node_name);
        let repair = async {
            match r.fix {
                Fix::Republish => apply::republish(ctx, driver, r).await,
                Fix::Unpublish => apply::unpublish(ctx, driver, r).await,
            }
        };
        let result = repair.instrument(span.clone()).await;
        if let Err(e) = result {
            ctx.report_if_forbidden(r.va, &e);
            span.in_scope(|| job::pass_failed(ctx, JOB, "repair", &e));
        }
    }
}

#[cfg(test)]
mod tests;
