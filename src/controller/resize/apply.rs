//! The resize job's effects on the claim, its Volume and its PV, one small
//! function per planned step.

use k8s_openapi::api::core::v1::PersistentVolumeClaimCondition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::plan::storage;
use super::{
    CONTROLLER_RESIZE_IN_PROGRESS, CONTROLLER_RESIZE_INFEASIBLE, NODE_RESIZE_PENDING, ResizeError,
};
use crate::backend::csi_proxy::CsiDriver;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::controller::secrets::{self, SecretFor};
use crate::controller::{Context, Error, csi_handle, job};
use crate::crd::Volume;
use crate::quantity::format_bytes;

/// Claim conditions that belong to resizing; the rest are left as found.
const RESIZE_CONDITIONS: [&str; 4] = [
    "Resizing",
    "FileSystemResizePending",
    "ControllerResizeError",
    "NodeResizeError",
];

/// kubelet's and external-resizer's wording, so `kubectl describe` reads alike.
const FS_RESIZE_PENDING_MESSAGE: &str =
    "Waiting for user to (re-)start a pod to finish file system resize of volume on node.";

/// The claim's conditions with the resize ones replaced by `new`.
fn conditions_with(
    claim: &Claim,
    new: Option<(&str, &str)>,
) -> Vec<PersistentVolumeClaimCondition> {
    let mut out: Vec<_> = claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !RESIZE_CONDITIONS.contains(&c.type_.as_str()))
        .collect();
    if let Some((type_, message)) = new {
        out.push(PersistentVolumeClaimCondition {
            type_: type_.into(),
            status: "True".into(),
            message: (!message.is_empty()).then(|| message.into()),
            last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            ..Default::default()
        });
    }
    out
}

async fn event(ctx: &Context, claim: &Claim, type_: EventType, reason: &str, note: &str) {
    ctx.event(claim, type_, reason, "Resize", note).await;
}

/// Tells the user why not; an infeasible request is marked so on the claim.
/// Asked again at the backoff's pace.
pub async fn refuse(ctx: &Context, claim: &Claim, error: &ResizeError) -> Result<Action, Error> {
    let message = error.to_string();
    event(
        ctx,
        claim,
        EventType::Warning,
        "VolumeResizeFailed",
        &message,
    )
    .await;
    job::count_failure(ctx, "resize", error.metric_label());
    let current = claim
        .status
        .as_ref()
        .and_then(|s| storage(s.allocated_resource_statuses.as_ref()).cloned());
    if error.infeasible() && current.as_deref() != Some(CONTROLLER_RESIZE_INFEASIBLE) {
        let conditions = conditions_with(claim, Some(("ControllerResizeError", &message)));
        let status = json!({
            "allocatedResourceStatuses": { "storage": CONTROLLER_RESIZE_INFEASIBLE },
            "conditions": conditions,
        });
        ctx.patch_claim_status(claim, status).await?;
    }
    Ok(Action::requeue(ctx.backoff(&claim.object_ref(&()), true)))
}

/// Records the size being worked towards.
pub async fn start(
    ctx: &Context,
    claim: &Claim,
    request: &str,
    pv_name: &str,
) -> Result<(), Error> {
    let status = json!({
        "allocatedResources": { "storage": request },
        "allocatedResourceStatuses": { "storage": CONTROLLER_RESIZE_IN_PROGRESS },
        "conditions": conditions_with(claim, Some(("Resizing", ""))),
    });
    let note = format!("External resizer is resizing volume {pv_name}");
    record_step(ctx, claim, status, "Resizing", &note).await
}

/// Writes a step of the resize to the claim's status, then tells the user.
async fn record_step(
    ctx: &Context,
    claim: &Claim,
    status: serde_json::Value,
    reason: &str,
    note: &str,
) -> Result<(), Error> {
    ctx.patch_claim_status(claim, status).await?;
    event(ctx, claim, EventType::Normal, reason, note).await;
    Ok(())
}

/// Asks the Volume's node agent for `bytes`.
pub async fn grow_volume(ctx: &Context, volume: &Volume, bytes: i64) -> Result<(), Error> {
    let patch = json!({
        "metadata": { "resourceVersion": volume.resource_version() },
        "spec": { "capacityBytes": bytes },
    });
    Api::<Volume>::all(ctx.client.clone())
        .patch(
            &volume.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    crate::failpoint::hit("controller-after-volume-grown");
    tracing::info!(bytes, volume = %volume.name_any(), "volume growing");
    Ok(())
}

/// The PV's capacity follows the backend's.
pub async fn resize_pv(ctx: &Context, pv_name: &str, bytes: i64) -> Result<(), Error> {
    let patch = json!({ "spec": { "capacity": { "storage": format_bytes(bytes) } } });
    Api::<Pv>::all(ctx.client.clone())
        .patch(pv_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(bytes, pv = %pv_name, "PV capacity updated");
    Ok(())
}

/// Hands over to kubelet's NodeExpandVolume.
pub async fn await_node_expansion(ctx: &Context, claim: &Claim) -> Result<(), Error> {
    let pending = ("FileSystemResizePending", FS_RESIZE_PENDING_MESSAGE);
    let status = json!({
        "allocatedResourceStatuses": { "storage": NODE_RESIZE_PENDING },
        "conditions": conditions_with(claim, Some(pending)),
    });
    let note = "Require file system resize of volume on node";
    record_step(ctx, claim, status, "FileSystemResizeRequired", note).await
}

/// The claim has its new capacity.
pub async fn finish(ctx: &Context, claim: &Claim, bytes: i64) -> Result<(), Error> {
    let status = json!({
        "capacity": { "storage": format_bytes(bytes) },
        "allocatedResourceStatuses": { "storage": null },
        "conditions": conditions_with(claim, None),
    });
    let note = "Resize volume succeeded";
    record_step(ctx, claim, status, "VolumeResizeSuccessful", note).await?;
    ctx.forget_failures(&claim.object_ref(&()));
    Ok(())
}

/// ControllerExpandVolume on the PV's driver, then the PV and the claim
/// from its answer. A driver's refusal is the claim's event, and
/// `ControllerResizeInfeasible` when asking again cannot help
/// (InvalidArgument, OutOfRange, NotFound, as external-resizer reads them).
pub async fn expand_in_driver(
    ctx: &Context,
    claim: &Claim,
    pv: &Pv,
    driver: &CsiDriver,
    bytes: i64,
) -> Result<Action, Error> {
    let handle = csi_handle(pv).unwrap_or_default();
    let secrets = secrets::for_pv(&ctx.client, pv, SecretFor::ControllerExpand).await?;
    let capability = crate::controller::capability(pv);
    let expanded = match driver
        .expand_volume(handle, bytes, &capability, secrets)
        .await
    {
        Ok(expanded) => expanded,
        Err(e) => {
            let infeasible = e.is_infeasible();
            let error = ResizeError::Driver {
                message: e.to_string(),
                infeasible,
            };
            return refuse(ctx, claim, &error).await;
        }
    };
    tracing::info!(bytes = expanded.capacity_bytes, volume = %handle, "expanded in the driver");
    let pv_name = pv.name_any();
    resize_pv(ctx, &pv_name, expanded.capacity_bytes).await?;
    if expanded.node_expansion_required {
        await_node_expansion(ctx, claim).await?;
    } else {
        finish(ctx, claim, expanded.capacity_bytes).await?;
    }
    Ok(Action::await_change())
}
