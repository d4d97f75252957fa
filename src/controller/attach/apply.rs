//! The attach job's effects on the API server and the driver, one small
//! function per planned step.

use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{ANN_NODE_ID, AttachError};
use crate::backend::csi_proxy::CsiDriver;
use crate::controller::cached_pv::Pv;
use crate::controller::secrets::{self, Secrets};
use crate::controller::{Context, Error, csi_handle, job};
use crate::kubeapi;

fn api(ctx: &Context) -> Api<VolumeAttachment> {
    Api::all(ctx.client.clone())
}

/// Merges `status` into the VA's status; every status write goes here.
async fn patch_status(
    ctx: &Context,
    va: &VolumeAttachment,
    status: serde_json::Value,
) -> Result<VolumeAttachment, Error> {
    Ok(kubeapi::merge_status(&api(ctx), va, status).await?)
}

/// An `attachError`/`detachError` value.
pub(super) fn error_status(message: &str) -> serde_json::Value {
    json!({ "time": k8s_openapi::jiff::Timestamp::now().to_string(), "message": message })
}

async fn attach_failed(ctx: &Context, va: &VolumeAttachment, message: &str) -> Result<(), Error> {
    let status = json!({ "attached": false, "attachError": error_status(message) });
    patch_status(ctx, va, status).await.map(drop)
}

pub(super) async fn publish_secrets(ctx: &Context, pv: &Pv) -> Result<Secrets, Error> {
    Ok(secrets::for_pv(&ctx.client, pv, secrets::SecretFor::ControllerPublish).await?)
}

/// The node is gone: deleting the VA detaches it.
pub async fn delete_orphan(ctx: &Context, va: &VolumeAttachment) -> Result<(), Error> {
    tracing::info!("node is gone; detaching");
    Ok(kubeapi::delete(&api(ctx), &va.name_any(), va.uid()).await?)
}

/// Reports why the VA cannot be attached and asks again at the backoff's pace.
pub async fn refuse(
    ctx: &Context,
    va: &VolumeAttachment,
    error: &AttachError,
) -> Result<Action, Error> {
    attach_failed(ctx, va, &error.to_string()).await?;
    job::count_failure(ctx, "attach", error.metric_label());
    Ok(Action::requeue(ctx.backoff(&va.object_ref(&()), true)))
}

/// Our finalizer on the PV and the VA, and the node ID on the VA, before the
/// driver sees anything.
pub async fn prepare(
    ctx: &Context,
    va: &VolumeAttachment,
    pv: &Pv,
    node_id: &str,
    ours: &str,
) -> Result<(), Error> {
    let pp = PatchParams::default();
    let pvs = Api::<Pv>::all(ctx.client.clone());
    kubeapi::add_finalizer(&pvs, pv, ours).await?;
    let mut finalizers = va.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == ours) {
        finalizers.push(ours.to_string());
    }
    let patch = json!({ "metadata": {
        "finalizers": finalizers,
        "annotations": { ANN_NODE_ID: node_id },
        "resourceVersion": va.resource_version(),
    }});
    api(ctx)
        .patch(&va.name_any(), &pp, &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// ControllerPublish, and its outcome in the VA's status.
pub async fn publish(
    ctx: &Context,
    driver: &CsiDriver,
    va: &VolumeAttachment,
    pv: &Pv,
    node_id: &str,
) -> Result<(), Error> {
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.clone())
        .unwrap_or_default();
    let secrets = publish_secrets(ctx, pv).await?;
    let result = driver
        .publish(
            &csi.volume_handle,
            node_id,
            &crate::controller::capability(pv),
            csi.read_only.unwrap_or(false),
            csi.volume_attributes
                .map(|a| a.to_btree())
                .unwrap_or_default(),
            secrets,
        )
        .await;
    match result {
        Ok(context) => {
            let status =
                json!({ "attached": true, "attachmentMetadata": context, "attachError": null });
            patch_status(ctx, va, status).await?;
            tracing::info!(volume = %csi.volume_handle, "attached");
            ctx.forget_failures(&va.object_ref(&()));
            Ok(())
        }
        Err(e) => {
            attach_failed(ctx, va, &e.to_string()).await?;
            Err(e.into())
        }
    }
}

/// ControllerUnpublish when the volume and node are known, then the VA is
/// marked detached and our finalizer dropped.
pub async fn unpublish(
    ctx: &Context,
    driver: &CsiDriver,
    va: &VolumeAttachment,
    pv: Option<&Pv>,
    node_id: Option<&str>,
    ours: &str,
) -> Result<(), Error> {
    let handle = pv.and_then(csi_handle);
    if let (Some(handle), Some(node_id)) = (handle, node_id) {
        let secrets = match pv {
            Some(pv) => publish_secrets(ctx, pv).await?,
            None => Secrets::default(),
        };
        if let Err(e) = driver.unpublish(handle, node_id, secrets).await {
            let status = json!({ "detachError": error_status(&e.to_string()) });
            patch_status(ctx, va, status).await?;
            return Err(e.into());
        }
        tracing::info!(volume = %handle, "detached");
    }
    let status = json!({ "attached": false, "detachError": null, "attachmentMetadata": null });
    let detached = patch_status(ctx, va, status).await?;
    Ok(kubeapi::remove_finalizer(&api(ctx), &detached, ours).await?)
}

/// Detached: drop our finalizer so the VA goes.
pub async fn release(ctx: &Context, va: &VolumeAttachment, ours: &str) -> Result<(), Error> {
    Ok(kubeapi::remove_finalizer(&api(ctx), va, ours).await?)
}
