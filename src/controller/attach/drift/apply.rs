//! The drift job's effects. Each repair starts with a status write that is
//! a compare-and-swap on the VolumeAttachment as the pass read it: a VA
//! changed since (attached or detached meanwhile, replaced under its name)
//! is left to the next pass, which sees it anew.

use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::Api;
use kube::runtime::events::EventType;
use serde_json::json;

use super::super::apply::{error_status, publish_secrets};
use super::Repair;
use crate::backend::csi_proxy::CsiDriver;
use crate::controller::{Context, Error};
use crate::kubeapi;

/// Merges `status` into the VA's; with `cas`, only into the version the
/// pass read. False when the VA changed or went meanwhile.
async fn write_status(
    ctx: &Context,
    va: &VolumeAttachment,
    status: serde_json::Value,
    cas: bool,
) -> Result<bool, Error> {
    let api = Api::<VolumeAttachment>::all(ctx.client.clone());
    let written = if cas {
        kubeapi::merge_status_at(&api, va, status).await
    } else {
        kubeapi::merge_status(&api, va, status).await
    };
    match written {
        Ok(_) => Ok(true),
        Err(e) if kubeapi::changed_meanwhile(&e) => {
            tracing::debug!(
                "VolumeAttachment changed since it was compared; the next pass decides"
            );
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

fn whereabouts(r: &Repair) -> String {
    format!(
        "volume {} published to node {} (ID {})",
        r.handle, r.va.spec.node_name, r.node_id
    )
}

/// Marks the VA detached; the attach job sees it and publishes again.
/// kubelet and kcm read `attached: false` as "wait", which is the truth
/// until the driver has the volume published again.
pub async fn republish(ctx: &Context, driver: &CsiDriver, r: &Repair<'_>) -> Result<(), Error> {
    if !write_status(ctx, r.va, json!({ "attached": false }), true).await? {
        return Ok(());
    }
    let note = format!(
        "{} no longer has {}; publishing it again",
        driver.name,
        whereabouts(r)
    );
    tracing::warn!("{note}");
    ctx.event(
        r.va,
        EventType::Warning,
        "VolumeNotPublished",
        "Reconcile",
        &note,
    )
    .await;
    Ok(())
}

/// ControllerUnpublish again for a VA we already let go, with the outcome
/// in its `detachError` while it lasts.
pub async fn unpublish(ctx: &Context, driver: &CsiDriver, r: &Repair<'_>) -> Result<(), Error> {
    let note = format!(
        "{} still has {} after it was detached; unpublishing it again",
        driver.name,
        whereabouts(r)
    );
    let status = json!({ "detachError": error_status(&note) });
    if !write_status(ctx, r.va, status, true).await? {
        return Ok(());
    }
    tracing::warn!("{note}");
    ctx.event(
        r.va,
        EventType::Warning,
        "VolumeStillPublished",
        "Reconcile",
        &note,
    )
    .await;
    let secrets = publish_secrets(ctx, r.pv).await?;
    if let Err(e) = driver.unpublish(&r.handle, &r.node_id, secrets).await {
        let status = json!({ "detachError": error_status(&e.to_string()) });
        write_status(ctx, r.va, status, false).await?;
        return Err(e.into());
    }
    tracing::info!(volume = %r.handle, "detached");
    write_status(ctx, r.va, json!({ "detachError": null }), false).await?;
    Ok(())
}
