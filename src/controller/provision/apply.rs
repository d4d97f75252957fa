//! The provisioning plan's effects: events on the claim as
//! external-provisioner posts them, and the Volume or PV written.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use k8s_openapi::api::storage::v1::StorageClass;

use super::{Provision, reschedule, source};
use crate::controller::cached_claim::Claim;
use crate::controller::{Context, Error, job};
use crate::crd::Volume;
use crate::kubeapi::create_idempotent;

/// Carries out one step of provisioning. `Some(action)` ends this pass
/// of the claim job; `None` lets binding look at the claim.
pub async fn apply(
    ctx: &Context,
    claim: &Claim,
    class: Option<&StorageClass>,
    provision: Provision,
) -> Result<Option<Action>, Error> {
    match provision {
        Provision::Skip | Provision::Provisioned => {}
        Provision::WaitForConsumer => {
            // The same event kcm's binder posts, so `kubectl describe` reads alike
            // whether or not it runs.
            let note = "waiting for first consumer to be created before binding";
            return Ok(Some(wait(ctx, claim, "WaitForFirstConsumer", note).await));
        }
        Provision::LeftToPopulator => {
            let note = "Assuming an external populator will provision the volume";
            return Ok(Some(wait(ctx, claim, "Provisioning", note).await));
        }
        Provision::Fail(e) => {
            ctx.event(
                claim,
                EventType::Warning,
                "ProvisioningFailed",
                "Provision",
                &e.to_string(),
            )
            .await;
            job::count_failure(ctx, "claim", e.metric_label());
            if let Some(node) = reschedule::node_to_give_up(claim, class, &e) {
                reschedule::give_back(ctx, claim, node, &e).await?;
                return Ok(Some(Action::await_change()));
            }
            let retry = ctx.backoff(&claim.object_ref(&()), e.may_resolve_itself());
            return Ok(Some(Action::requeue(retry)));
        }
        Provision::CreateVolume(volume) => {
            create_volume(ctx, claim, &volume).await?;
            return Ok(Some(Action::await_change()));
        }
        Provision::WaitForData { .. } => return Ok(Some(Action::await_change())),
        Provision::CreatePv(pv) => {
            crate::failpoint::hit("controller-before-pv-created");
            create_idempotent(&Api::<PersistentVolume>::all(ctx.client.clone()), &pv).await?;
            crate::failpoint::hit("controller-after-pv-created");
            source::release_snapshot(ctx, claim).await;
            ctx.event(
                claim,
                EventType::Normal,
                "ProvisioningSucceeded",
                "Provision",
                &format!("Successfully provisioned volume {}", pv.name_any()),
            )
            .await;
            ctx.forget_failures(&claim.object_ref(&()));
            return Ok(Some(Action::await_change()));
        }
    }

    Ok(None)
}

/// Says on the claim what it waits for; the claim's next change asks again.
async fn wait(ctx: &Context, claim: &Claim, reason: &str, note: &str) -> Action {
    ctx.event(claim, EventType::Normal, reason, "Provision", note)
        .await;
    Action::await_change()
}

/// Writes the Volume (intent), its source protected first.
async fn create_volume(ctx: &Context, claim: &Claim, volume: &Volume) -> Result<(), Error> {
    ctx.event(
        claim,
        EventType::Normal,
        "Provisioning",
        "Provision",
        &provisioning_note(claim, volume.spec.node.as_deref()),
    )
    .await;
    if volume.spec.source.is_some() {
        source::protect(ctx, claim).await?;
    }
    create_idempotent(&Api::<Volume>::all(ctx.client.clone()), volume).await?;
    crate::failpoint::hit("controller-after-volume-created");
    Ok(())
}

/// external-provisioner's words, naming the node only when there is one
/// (`Immediate` claims of other drivers have none).
fn provisioning_note(claim: &Claim, node: Option<&str>) -> String {
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
