//! What happens to a PV of ours once its claim is gone: Released, then
//! `Delete` removes the data (through the Volume), then the PV; `Retain`
//! keeps both and says so.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;

use super::protocol::*;
use crate::backend::local;
use crate::crd::Volume;

#[derive(Debug, Clone, PartialEq)]
pub enum Reclaim {
    Skip,
    /// The claim is gone: the PV becomes Released.
    MarkReleased,
    /// Released with `Delete`: delete the Volume; its node removes the data.
    DeleteVolume(String),
    /// The data is gone: delete the PV object.
    DeletePv,
    /// The PV is being deleted and nothing holds it any more.
    RemoveFinalizer,
    /// Released with `Retain`: keep everything, tell the user.
    Retained,
}

/// `claim_exists`: whether the claim the PV's claimRef names (with that UID)
/// still exists.
pub fn plan(pv: &PersistentVolume, claim_exists: bool, volume: Option<&Volume>) -> Reclaim {
    let ours =
        pv.annotations().get(ANN_PROVISIONED_BY).map(String::as_str) == Some(local::DRIVER_NAME);
    let spec = pv.spec.clone().unwrap_or_default();
    let policy = spec
        .persistent_volume_reclaim_policy
        .as_deref()
        .unwrap_or("Delete");
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    let has_finalizer = pv
        .finalizers()
        .iter()
        .any(|f| f == PV_PROVISIONER_FINALIZER);

    if pv.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Reclaim::Skip;
        }
        return match (policy, volume) {
            ("Delete", Some(v)) if v.metadata.deletion_timestamp.is_none() => {
                Reclaim::DeleteVolume(v.name_any())
            }
            ("Delete", Some(_)) => Reclaim::Skip,
            _ => Reclaim::RemoveFinalizer,
        };
    }
    let released = spec.claim_ref.is_some() && !claim_exists;
    if !released {
        return Reclaim::Skip;
    }
    if phase != "Released" && phase != "Failed" {
        return Reclaim::MarkReleased;
    }
    if !ours {
        return Reclaim::Skip;
    }
    match (policy, volume) {
        ("Retain", _) => Reclaim::Retained,
        ("Delete", Some(v)) if v.metadata.deletion_timestamp.is_none() => {
            Reclaim::DeleteVolume(v.name_any())
        }
        ("Delete", Some(_)) => Reclaim::Skip,
        ("Delete", None) => Reclaim::DeletePv,
        _ => Reclaim::Skip,
    }
}
