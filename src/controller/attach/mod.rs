//! external-attacher's job for `--csi-driver`s whose CSIDriver has
//! `attachRequired: true`: kube-controller-manager's attach-detach
//! controller creates a VolumeAttachment per (volume, node); we call
//! ControllerPublish/Unpublish and report in its status.
//!
//! The protocol is external-attacher's, so kcm, kubelet and kubectl read it
//! as usual: finalizer `external-attacher/<driver>` on the VA and the PV
//! before the first publish, the node ID kept in an annotation so a detach
//! works after the node is gone, `status.attached` with `attachmentMetadata`,
//! and `attachError`/`detachError` with the driver's message.

mod apply;
pub mod drift;
mod plan;

pub use plan::{Attach, AttachError, AttachView, plan, pv_released};

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::core::PartialObjectMeta;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::informer::Informers;
use super::job::{Job, JobRun, Retry, trigger};
use super::{Context, Error};
use plan::pv_name;

/// Where external-attacher keeps the node ID it published to.
pub const ANN_NODE_ID: &str = "csi.alpha.kubernetes.io/node-id";
/// kubelet's map of driver name → node ID on the Node object.
pub const ANN_NODE_IDS: &str = "csi.volume.kubernetes.io/nodeid";

/// external-attacher's finalizer name for a driver: anything but letters,
/// digits and '-' becomes '-'.
pub fn finalizer(driver: &str) -> String {
    let sanitized: String = driver
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("external-attacher/{sanitized}")
}

/// The attach job, on its own queue: a pod start never waits behind
/// provisioning. A Node deleted gets its VolumeAttachments detached.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let attachments = informers.attachments.subscribe();
    let (requeue, requeues) = trigger::<VolumeAttachment>();
    let store = ctx.stores.attachments.clone();
    informers
        .nodes
        .on_delete(move |node: &PartialObjectMeta<Node>| {
            let name = node.name_any();
            for va in store.state() {
                if va.spec.node_name == name {
                    let _ = requeue.send(ObjectRef::from_obj(va.as_ref()));
                }
            }
        });
    let controller = Controller::for_shared_stream(attachments, ctx.stores.attachments.clone())
        .reconcile_on(requeues);
    // Detached and deleted between the cache's view and our write: 404.
    let job = Job {
        name: "attach",
        retry: Retry::BackoffUnlessGone,
    };
    job.run(controller, reconcile, ctx)
}

/// The driver's node ID: the CSINode's entry, else kubelet's annotation.
/// From the caches; a Node missing there is confirmed with the API server,
/// since a stale cache must not detach a volume in use.
async fn node_id(ctx: &Context, node: &str, driver: &str) -> Result<(bool, Option<String>), Error> {
    let exists = ctx.stores.nodes.get(&ObjectRef::new(node)).is_some()
        || Api::<Node>::all(ctx.client.clone())
            .get_metadata_opt(node)
            .await?
            .is_some();
    if !exists {
        return Ok((false, None));
    }
    Ok((true, cached_node_id(ctx, node, driver)))
}

/// The driver's node ID as the caches know it: the CSINode's entry, else
/// kubelet's annotation on the Node.
fn cached_node_id(ctx: &Context, node: &str, driver: &str) -> Option<String> {
    if let Some(csinode) = ctx.stores.csinodes.get(&ObjectRef::new(node))
        && let Some(d) = csinode.spec.drivers.iter().find(|d| d.name == driver)
    {
        return Some(d.node_id.clone());
    }
    ctx.stores
        .nodes
        .get(&ObjectRef::new(node))
        .and_then(|n| n.annotations().get(ANN_NODE_IDS).cloned())
        .and_then(|json| serde_json::from_str::<BTreeMap<String, String>>(&json).ok())
        .and_then(|mut ids| ids.remove(driver))
}

#[tracing::instrument(skip_all, fields(va = %va.name_any(), node = %va.spec.node_name))]
pub async fn reconcile(va: Arc<VolumeAttachment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(driver) = ctx.drivers.get(&va.spec.attacher) else {
        return Ok(Action::await_change());
    };
    let _timer = ctx.metrics.jobs.reconcile_timer("attach");
    let pv = pv_name(&va).and_then(|n| ctx.stores.pvs.get(&ObjectRef::new(n)));
    let (node_exists, node_id) = node_id(&ctx, &va.spec.node_name, &driver.name).await?;
    let all = ctx.stores.attachments.state();
    let others: Vec<_> = all
        .iter()
        .filter(|o| o.name_any() != va.name_any() && pv_name(o) == pv_name(&va))
        .map(|o| o.as_ref())
        .collect();
    let step = plan(&AttachView {
        va: &va,
        pv: pv.as_deref(),
        node_id,
        node_exists,
        others: &others,
    });
    tracing::debug!(?step, "planned");
    // A refused or failed attach is asked again at its backoff's pace; our
    // own attachError write must not wake it at once (external-attacher
    // ignores status-only changes for the same reason).
    if matches!(step, Attach::Refuse(_) | Attach::Publish { .. })
        && let Some(left) = ctx.retry_not_yet(&va.object_ref(&()))
    {
        return Ok(Action::requeue(left));
    }
    let ours = finalizer(&driver.name);
    match step {
        Attach::Nothing => {}
        Attach::DeleteOrphan => apply::delete_orphan(&ctx, &va).await?,
        Attach::Refuse(e) => return apply::refuse(&ctx, &va, &e).await,
        Attach::Prepare { node_id } => {
            let pv = pv.expect("planned with a PV");
            apply::prepare(&ctx, &va, &pv, &node_id, &ours).await?
        }
        Attach::Publish { node_id } => {
            let pv = pv.expect("planned with a PV");
            apply::publish(&ctx, driver, &va, &pv, &node_id).await?
        }
        Attach::Unpublish { node_id } => {
            let (pv, node_id) = (pv.as_deref(), node_id.as_deref());
            apply::unpublish(&ctx, driver, &va, pv, node_id, &ours).await?
        }
        Attach::Release => apply::release(&ctx, &va, &ours).await?,
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests;
