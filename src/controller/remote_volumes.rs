//! Carries out Volumes of `--csi-driver`s: CreateVolume when one appears,
//! DeleteVolume when it is deleted, and the result in `Volume.status`
//! (the node agent does the same for `local.stowage.dev`).
//!
//! The Volume is written before CreateVolume is called and CreateVolume is
//! asked by the Volume's name, so a crash at any point is finished by the
//! next attempt; and a Volume deleted before its handle was recorded asks
//! CreateVolume once more to learn the handle, so nothing is left behind.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::protocol::{PARAM_PV_NAME, PARAM_PVC_NAME, PARAM_PVC_NAMESPACE};
use super::secrets::{self, SecretFor, Secrets, TemplateValues};
use super::{Context, Error};
use crate::backend::csi_proxy::{Capability, CreateRequest, CreatedVolume, CsiDriver};
use crate::crd::{Outstanding, VOLUME_FINALIZER, Volume, VolumeMode, VolumePhase};
use crate::kubeapi;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteWork {
    Nothing,
    Create,
    /// Delete the backend volume (its handle, when recorded), then the finalizer.
    Delete {
        volume_id: Option<String>,
    },
}

pub fn plan(volume: &Volume) -> RemoteWork {
    match volume.outstanding() {
        Outstanding::Nothing => RemoteWork::Nothing,
        Outstanding::Create => RemoteWork::Create,
        Outstanding::Delete => RemoteWork::Delete {
            volume_id: volume.status.as_ref().and_then(|s| s.volume_handle.clone()),
        },
    }
}

/// What CreateVolume asks for this Volume, the same at every attempt.
/// `extra_metadata`: `--extra-create-metadata`.
fn create_request(volume: &Volume, secrets: Secrets, extra_metadata: bool) -> CreateRequest {
    let spec = &volume.spec;
    let mut parameters = secrets::driver_parameters(&spec.parameters);
    if extra_metadata {
        if let Some(claim) = &spec.claim {
            parameters.insert(PARAM_PVC_NAME.into(), claim.name.clone());
            parameters.insert(PARAM_PVC_NAMESPACE.into(), claim.namespace.clone());
        }
        let pv = spec.persistent_volume_name.clone();
        parameters.insert(
            PARAM_PV_NAME.into(),
            pv.unwrap_or_else(|| volume.name_any()),
        );
    }
    let block = spec.volume_mode == VolumeMode::Block;
    let capabilities = spec
        .access_modes
        .iter()
        .map(|mode| Capability {
            block,
            fs_type: secrets::fs_type(&spec.parameters)
                .unwrap_or_default()
                .to_string(),
            mount_flags: spec.mount_options.clone(),
            access_mode: format!("{mode:?}"),
        })
        .collect();
    // Volumes written before the preferred order was recorded asked for
    // their requisite segments as preferred; they keep asking the same.
    let preferred = if spec.preferred_topology.is_empty() {
        spec.requisite_topology.clone()
    } else {
        spec.preferred_topology.clone()
    };
    CreateRequest {
        name: volume.name_any(),
        capacity_bytes: spec.capacity_bytes,
        parameters,
        secrets,
        capabilities,
        requisite: spec.requisite_topology.clone(),
        preferred,
        mutable_parameters: spec.mutable_parameters.to_btree(),
        content_source: spec.source.clone(),
    }
}

/// The provisioner Secret's data, if the class names one.
async fn provisioner_secrets(ctx: &Context, volume: &Volume) -> Result<Secrets, Error> {
    let name = volume.name_any();
    let claim = volume.spec.claim.as_ref();
    // The provisioner Secret's templates never use annotations, so the
    // claim's name and namespace, kept in the Volume, resolve it even
    // once the claim is gone (DeleteVolume).
    let no_annotations = crate::compact_map::CompactMap::new();
    let values = TemplateValues {
        pv_name: &name,
        claim_namespace: claim.map(|c| c.namespace.as_str()).unwrap_or_default(),
        claim_name: claim.map(|c| c.name.as_str()).unwrap_or_default(),
        claim_annotations: &no_annotations,
    };
    match secrets::secret_ref(&volume.spec.parameters, SecretFor::Provisioner, &values)? {
        Some(r) => Ok(secrets::read(&ctx.client, &r, SecretFor::Provisioner).await?),
        None => Ok(Secrets::default()),
    }
}

#[tracing::instrument(skip_all, fields(volume = %volume.name_any(), driver = %driver.name))]
pub async fn execute(volume: &Volume, driver: &CsiDriver, ctx: &Context) -> Result<Action, Error> {
    let api = Api::<Volume>::all(ctx.client.clone());
    let pp = PatchParams::default();
    match plan(volume) {
        RemoteWork::Nothing => {}
        RemoteWork::Create => {
            // Repeated at the backoff's pace, not when our own Failed status
            // comes back through the watch.
            if let Some(left) = ctx.retry_not_yet(&kube::Resource::object_ref(volume, &())) {
                return Ok(Action::requeue(left));
            }
            // A Secret the class names but nobody created yet is the user's
            // to fix: recorded like a driver failure, so the claim says so.
            let secrets = match provisioner_secrets(ctx, volume).await {
                Ok(secrets) => secrets,
                Err(e) => {
                    record_failure(&api, volume, "SecretUnavailable", &e.to_string()).await?;
                    return Err(e);
                }
            };
            match driver
                .create_volume(create_request(volume, secrets, ctx.extra_create_metadata))
                .await
            {
                Ok(created) => {
                    crate::failpoint::hit("controller-after-create-volume");
                    tracing::info!(handle = %created.volume_id, bytes = created.capacity_bytes, "backend volume created");
                    api.patch_status(
                        &volume.name_any(),
                        &pp,
                        &Patch::Merge(&json!({ "status": ready_status(volume, &created) })),
                    )
                    .await?;
                }
                Err(e) => {
                    record_failure(&api, volume, &format!("{:?}", e.code()), &e.to_string())
                        .await?;
                    return Err(e.into());
                }
            }
        }
        RemoteWork::Delete { volume_id } => {
            let secrets = provisioner_secrets(ctx, volume).await?;
            let volume_id = match volume_id {
                Some(id) => Some(id),
                // Created, perhaps, but not recorded: the name finds it.
                None => match driver
                    .create_volume(create_request(
                        volume,
                        secrets.clone(),
                        ctx.extra_create_metadata,
                    ))
                    .await
                {
                    Ok(created) => Some(created.volume_id),
                    Err(e) if e.is_final() => None,
                    Err(e) => return Err(e.into()),
                },
            };
            if let Some(id) = &volume_id {
                driver.delete_volume(id, secrets).await?;
                crate::failpoint::hit("controller-after-delete-volume");
                tracing::info!(handle = %id, "backend volume deleted");
            }
            kubeapi::remove_finalizer(&api, volume, VOLUME_FINALIZER).await?;
        }
    }
    Ok(Action::await_change())
}

/// Marks the Volume Failed with `message`, unless it already says exactly
/// that: writing it again would wake this reconcile at once instead of
/// after the backoff.
async fn record_failure(
    api: &Api<Volume>,
    volume: &Volume,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let shown = volume.status.as_ref().is_some_and(|s| {
        s.phase == VolumePhase::Failed
            && s.observed_generation == volume.metadata.generation
            && s.last_error.as_deref() == Some(message)
    });
    let status = json!({
        "phase": VolumePhase::Failed,
        "observedGeneration": volume.metadata.generation,
        "lastError": message,
        "conditions": [condition(volume, "False", reason, message)],
    });
    kubeapi::merge_status_unless_shown(api, volume, shown, status).await?;
    Ok(())
}

fn condition(volume: &Volume, status: &str, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        "observedGeneration": volume.metadata.generation,
    })
}

fn ready_status(volume: &Volume, created: &CreatedVolume) -> serde_json::Value {
    json!({
        "phase": VolumePhase::Ready,
        "observedGeneration": volume.metadata.generation,
        "capacityBytes": created.capacity_bytes,
        "volumeHandle": created.volume_id,
        "topology": created.accessible_topology.first(),
        "accessibleTopology": created.accessible_topology,
        "volumeContext": created.volume_context,
        "lastError": null,
        "conditions": [condition(volume, "True", "Created", &format!("{} created it as {}", volume.spec.driver, created.volume_id))],
    })
}

/// How long to wait before retrying a failed driver call.
pub fn retry_after(ctx: &Context, volume: &Volume, error: &Error) -> Duration {
    let final_error = matches!(error, Error::Driver(e) if e.is_final());
    ctx.backoff(&kube::Resource::object_ref(volume, &()), !final_error)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::crd::{AccessMode, VolumeStatus};
    use crate::testing;

    fn volume() -> Volume {
        let mut spec = testing::volume_spec("hostpath.csi.k8s.io", 1 << 30);
        spec.parameters = [
            ("kind".to_string(), "fast".to_string()),
            (secrets::FS_TYPE.to_string(), "xfs".to_string()),
        ]
        .into();
        spec.access_modes = vec![AccessMode::ReadWriteOncePod];
        spec.requisite_topology = vec![[("zone".to_string(), "a".to_string())].into()];
        testing::volume("pvc-1", spec)
    }

    #[test]
    fn created_once_per_generation_and_deleted_by_handle() {
        let mut v = volume();
        assert_eq!(plan(&v), RemoteWork::Create);
        v.status = Some(VolumeStatus {
            phase: VolumePhase::Ready,
            observed_generation: Some(1),
            volume_handle: Some("h-1".into()),
            ..Default::default()
        });
        assert_eq!(plan(&v), RemoteWork::Nothing);
        v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert_eq!(
            plan(&v),
            RemoteWork::Delete {
                volume_id: Some("h-1".into())
            }
        );
        v.metadata.finalizers = None;
        assert_eq!(plan(&v), RemoteWork::Nothing);
    }

    #[test]
    fn the_driver_gets_its_parameters_and_the_pvs_capability() {
        let req = create_request(&volume(), Secrets::default(), false);
        assert_eq!(req.name, "pvc-1");
        assert_eq!(req.parameters.len(), 1, "csi.storage.k8s.io/* stripped");
        assert_eq!(req.capabilities.len(), 1);
        assert_eq!(req.capabilities[0].fs_type, "xfs");
        assert_eq!(req.capabilities[0].access_mode, "ReadWriteOncePod");
        assert_eq!(req.requisite.len(), 1);
        assert_eq!(req.preferred, req.requisite, "none recorded: the requisite");
    }

    #[test]
    fn one_capability_per_access_mode_with_the_class_mount_options() {
        let mut v = volume();
        v.spec.access_modes = vec![AccessMode::ReadWriteOnce, AccessMode::ReadOnlyMany];
        v.spec.mount_options = vec!["noatime".into()];
        let req = create_request(&v, Secrets::default(), false);
        let modes: Vec<_> = req
            .capabilities
            .iter()
            .map(|c| c.access_mode.as_str())
            .collect();
        assert_eq!(modes, ["ReadWriteOnce", "ReadOnlyMany"]);
        assert!(
            req.capabilities
                .iter()
                .all(|c| c.mount_flags == ["noatime"] && !c.block)
        );
        v.spec.volume_mode = VolumeMode::Block;
        let req = create_request(&v, Secrets::default(), false);
        let caps: Vec<_> = req.capabilities.iter().map(|c| c.to_csi(false)).collect();
        assert!(caps.iter().all(|c| matches!(
            c.access_type,
            Some(crate::proto::csi::v1::volume_capability::AccessType::Block(
                _
            ))
        )));
    }

    #[test]
    fn the_recorded_preference_is_asked_for() {
        let mut v = volume();
        let (a, b) = (
            BTreeMap::from([("zone".to_string(), "a".to_string())]),
            BTreeMap::from([("zone".to_string(), "b".to_string())]),
        );
        v.spec.requisite_topology = vec![a.clone(), b.clone()];
        v.spec.preferred_topology = vec![b.clone(), a.clone()];
        let req = create_request(&v, Secrets::default(), false);
        assert_eq!(req.requisite, [a.clone(), b.clone()]);
        assert_eq!(req.preferred, [b, a]);
    }

    #[test]
    fn extra_create_metadata_names_the_claim_and_the_pv() {
        let mut v = volume();
        v.spec.claim = Some(crate::crd::ClaimReference {
            namespace: "team".into(),
            name: "data".into(),
            uid: "1".into(),
        });
        v.spec.persistent_volume_name = Some("pvc-1".into());
        let req = create_request(&v, Secrets::default(), true);
        let wanted: BTreeMap<String, String> = [
            ("kind", "fast"),
            (PARAM_PVC_NAME, "data"),
            (PARAM_PVC_NAMESPACE, "team"),
            (PARAM_PV_NAME, "pvc-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(req.parameters, wanted);
    }
}
