//! The modify job's effects: the claim's `modifyVolumeStatus` and
//! `currentVolumeAttributesClassName`, the PV's class, and events, as
//! external-resizer writes them.

use std::collections::BTreeMap;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::plan::{IN_PROGRESS, INFEASIBLE, ModifyError, PENDING};
use crate::backend::csi_proxy::CsiDriver;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::controller::secrets::{self, SecretFor};
use crate::controller::{Context, Error, csi_handle, job};

const JOB: &str = "modify";

/// Records the attempt's state, only when it changes.
async fn mark(ctx: &Context, claim: &Claim, target: &str, state: &str) -> Result<(), Error> {
    let current = claim
        .status
        .as_ref()
        .and_then(|s| s.modify_volume_status.as_ref());
    let same = current.is_some_and(|c| {
        c.status == state && c.target_volume_attributes_class_name.as_deref() == Some(target)
    });
    if same {
        return Ok(());
    }
    let status = json!({ "modifyVolumeStatus": {
        "targetVolumeAttributesClassName": target, "status": state,
    }});
    ctx.patch_claim_status(claim, status).await
}

async fn failed(ctx: &Context, claim: &Claim, error: &ModifyError) {
    ctx.event(
        claim,
        EventType::Warning,
        "VolumeModifyFailed",
        "Modify",
        &error.to_string(),
    )
    .await;
    job::count_failure(ctx, JOB, error.metric_label());
}

/// The class does not exist yet: `Pending`, asked again at the backoff's pace.
pub async fn pending(ctx: &Context, claim: &Claim, target: &str) -> Result<Action, Error> {
    mark(ctx, claim, target, PENDING).await?;
    failed(ctx, claim, &ModifyError::Missing(target.to_string())).await;
    Ok(Action::requeue(ctx.backoff(&claim.object_ref(&()), true)))
}

/// `Infeasible`: nothing more until the user changes the claim.
pub async fn refuse(
    ctx: &Context,
    claim: &Claim,
    target: &str,
    error: &ModifyError,
) -> Result<Action, Error> {
    mark(ctx, claim, target, INFEASIBLE).await?;
    failed(ctx, claim, error).await;
    Ok(Action::await_change())
}

/// ControllerModifyVolume, then the PV's and the claim's class.
pub async fn modify(
    ctx: &Context,
    claim: &Claim,
    pv: &Pv,
    driver: &CsiDriver,
    target: &str,
    parameters: BTreeMap<String, String>,
) -> Result<Action, Error> {
    let pv_name = pv.name_any();
    if claim
        .status
        .as_ref()
        .and_then(|s| s.modify_volume_status.as_ref())
        .is_none_or(|m| m.status != IN_PROGRESS)
    {
        let note = format!("external resizer is modifying volume {pv_name} with vac {target}");
        ctx.event(claim, EventType::Normal, "VolumeModify", "Modify", &note)
            .await;
    }
    mark(ctx, claim, target, IN_PROGRESS).await?;
    let handle = csi_handle(pv).unwrap_or_default();
    let secrets = secrets::for_pv(&ctx.client, pv, SecretFor::ControllerModify).await?;
    if let Err(e) = driver.modify_volume(handle, parameters, secrets).await {
        let infeasible = e.is_infeasible();
        let error = ModifyError::Driver {
            message: e.to_string(),
            infeasible,
        };
        if infeasible {
            let claim = Api::<Claim>::namespaced(
                ctx.client.clone(),
                &claim.namespace().unwrap_or_default(),
            )
            .get(&claim.name_any())
            .await?;
            return refuse(ctx, &claim, target, &error).await;
        }
        failed(ctx, claim, &error).await;
        return Ok(Action::requeue(ctx.backoff(&claim.object_ref(&()), true)));
    }
    tracing::info!(volume = %handle, class = %target, "modified in the driver");
    let patch = json!({ "spec": { "volumeAttributesClassName": target } });
    Api::<Pv>::all(ctx.client.clone())
        .patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    finish(ctx, claim, &pv_name, target).await
}

/// The PV has the class: so does the claim now.
pub async fn finish(
    ctx: &Context,
    claim: &Claim,
    pv_name: &str,
    target: &str,
) -> Result<Action, Error> {
    let status = json!({
        "currentVolumeAttributesClassName": target,
        "modifyVolumeStatus": null,
    });
    // Over whatever version the claim has now: once the claim is Bound only
    // this job writes these fields.
    let api = Api::<Claim>::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    api.patch_status(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    let note = format!("external resizer modified volume {pv_name} with vac {target} successfully");
    ctx.event(
        claim,
        EventType::Normal,
        "VolumeModifySuccessful",
        "Modify",
        &note,
    )
    .await;
    ctx.forget_failures(&claim.object_ref(&()));
    Ok(Action::await_change())
}
