//! What happens to a PV of ours once its claim is gone: Released, then
//! `Delete` removes the data (through the Volume), then the PV; `Retain`
//! keeps both and says so.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;

use crate::controller::protocol::*;
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
/// still exists; `serves`: whether stowage provisions for a driver name.
pub fn plan(
    pv: &PersistentVolume,
    claim_exists: bool,
    volume: Option<&Volume>,
    serves: impl Fn(&str) -> bool,
) -> Reclaim {
    let ours = pv
        .annotations()
        .get(ANN_PROVISIONED_BY)
        .is_some_and(|d| serves(d));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local;

    fn local_only(driver: &str) -> bool {
        driver == local::DRIVER_NAME
    }
    use serde_json::json;

    fn pv(policy: &str, phase: &str, ours: bool, deleting: bool) -> PersistentVolume {
        let mut pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": { "name": "pvc-1", "finalizers": [PV_PROVISIONER_FINALIZER] },
            "spec": { "persistentVolumeReclaimPolicy": policy,
                      "claimRef": { "namespace": "ns", "name": "data", "uid": "u1" } },
            "status": { "phase": phase },
        }))
        .unwrap();
        if ours {
            pv.metadata.annotations = Some(
                [(
                    ANN_PROVISIONED_BY.to_string(),
                    local::DRIVER_NAME.to_string(),
                )]
                .into_iter()
                .collect(),
            );
        }
        if deleting {
            pv.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        pv
    }

    fn volume() -> Volume {
        serde_json::from_value(json!({
            "metadata": { "name": "pvc-1" },
            "spec": { "driver": local::DRIVER_NAME, "capacityBytes": 1, "accessModes": ["ReadWriteOnce"] },
        }))
        .unwrap()
    }

    #[test]
    fn bound_pv_with_its_claim_is_left_alone() {
        assert_eq!(
            plan(
                &pv("Delete", "Bound", true, false),
                true,
                Some(&volume()),
                local_only
            ),
            Reclaim::Skip
        );
    }

    #[test]
    fn delete_goes_released_then_data_then_pv_then_finalizer() {
        let v = volume();
        assert_eq!(
            plan(
                &pv("Delete", "Bound", true, false),
                false,
                Some(&v),
                local_only
            ),
            Reclaim::MarkReleased
        );
        assert_eq!(
            plan(
                &pv("Delete", "Released", true, false),
                false,
                Some(&v),
                local_only
            ),
            Reclaim::DeleteVolume("pvc-1".into())
        );
        assert_eq!(
            plan(
                &pv("Delete", "Released", true, false),
                false,
                None,
                local_only
            ),
            Reclaim::DeletePv
        );
        assert_eq!(
            plan(
                &pv("Delete", "Released", true, true),
                false,
                None,
                local_only
            ),
            Reclaim::RemoveFinalizer
        );
    }

    #[test]
    fn retain_keeps_everything() {
        assert_eq!(
            plan(
                &pv("Retain", "Released", true, false),
                false,
                Some(&volume()),
                local_only,
            ),
            Reclaim::Retained
        );
        // Deleting a retained PV by hand lets it go, and keeps the data.
        assert_eq!(
            plan(
                &pv("Retain", "Released", true, true),
                false,
                Some(&volume()),
                local_only,
            ),
            Reclaim::RemoveFinalizer
        );
    }

    #[test]
    fn static_pvs_are_released_but_never_deleted() {
        assert_eq!(
            plan(
                &pv("Delete", "Bound", false, false),
                false,
                None,
                local_only
            ),
            Reclaim::MarkReleased
        );
        assert_eq!(
            plan(
                &pv("Delete", "Released", false, false),
                false,
                None,
                local_only
            ),
            Reclaim::Skip
        );
    }
}
