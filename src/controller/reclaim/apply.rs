//! The reclaim plan's effects on the API.

use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Reclaim;
use crate::backend::secrets::Secrets;
use crate::controller::cached_pv::Pv;
use crate::controller::protocol::{
    ANN_DELETION_SECRET_NAME, ANN_DELETION_SECRET_NAMESPACE, PV_PROVISIONER_FINALIZER,
};
use crate::controller::secrets::{self, SecretFor, SecretRef};
use crate::controller::{Context, Error};
use crate::crd::Volume;
use crate::kubeapi;

pub async fn apply(
    ctx: &Context,
    pv: &Pv,
    volume: Option<&Volume>,
    action: Reclaim,
) -> Result<(), Error> {
    let pvs = Api::<Pv>::all(ctx.client.clone());
    match action {
        Reclaim::Skip => {}
        Reclaim::MarkReleased => {
            let patch = json!({
                "metadata": { "resourceVersion": pv.resource_version() },
                "status": { "phase": "Released", "message": "its claim was deleted" },
            });
            pvs.patch_status(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        }
        Reclaim::DeleteVolume(name) => {
            let volumes = Api::<Volume>::all(ctx.client.clone());
            let uid = volume
                .filter(|v| v.name_any() == name)
                .and_then(|v| v.uid());
            kubeapi::delete(&volumes, &name, uid).await?;
            crate::failpoint::hit("controller-after-volume-deleted");
            tracing::info!(volume = %name, "deleting volume data");
        }
        Reclaim::DeletePv => {
            kubeapi::delete(&pvs, &pv.name_any(), pv.uid()).await?;
            crate::failpoint::hit("controller-after-pv-deleted");
            tracing::info!("volume data deleted; PV deleted");
        }
        Reclaim::DeleteInDriver { driver, handle } => {
            let Some(driver) = ctx.drivers.get(&driver) else {
                return Ok(());
            };
            let secrets = deletion_secrets(ctx, pv).await?;
            driver.delete_volume(&handle, secrets).await?;
            tracing::info!(volume = %handle, "deleted in the driver");
            if pv.metadata.deletion_timestamp.is_some() {
                kubeapi::remove_finalizer(&pvs, pv, PV_PROVISIONER_FINALIZER).await?;
            } else {
                kubeapi::delete(&pvs, &pv.name_any(), pv.uid()).await?;
            }
        }
        Reclaim::RemoveFinalizer => {
            kubeapi::remove_finalizer(&pvs, pv, PV_PROVISIONER_FINALIZER).await?;
        }
        Reclaim::Retained => {
            ctx.event(pv, EventType::Normal, "VolumeRetained", "Reclaim",
                "its claim was deleted and the reclaim policy is Retain: the PV and its data are kept; \
                 delete the PV to let the data go, or remove spec.claimRef to reuse it").await;
        }
    }
    Ok(())
}

/// The Secret external-provisioner recorded on the PV for its
/// DeleteVolume (`volume.kubernetes.io/provisioner-deletion-secret-*`),
/// if it recorded one.
async fn deletion_secrets(ctx: &Context, pv: &Pv) -> Result<Secrets, Error> {
    let Some(reference) = SecretRef::annotated(
        pv.annotations(),
        ANN_DELETION_SECRET_NAME,
        ANN_DELETION_SECRET_NAMESPACE,
    ) else {
        return Ok(Secrets::default());
    };
    Ok(secrets::read(&ctx.client, &reference, SecretFor::Provisioner).await?)
}
