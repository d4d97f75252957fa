//! What happens to a PV of ours once its claim is gone: Released, then
//! `Delete` removes the data (through the Volume), then the PV; `Retain`
//! keeps both and says so.

use kube::ResourceExt;

use crate::controller::cached_pv::Pv;
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
    /// A `--csi-driver` PV that no Volume of ours records (provisioned by
    /// external-provisioner before stowage took over, or created by hand
    /// with its annotation): DeleteVolume by its handle, then the PV goes
    /// (or, being deleted, loses our finalizer), as external-provisioner
    /// does.
    DeleteInDriver {
        driver: String,
        handle: String,
    },
    /// The PV is being deleted and nothing holds it any more.
    RemoveFinalizer,
    /// Released with `Retain`: keep everything, tell the user.
    Retained,
}

/// `claim_exists`: whether the claim the PV's claimRef names (with that UID)
/// still exists; `serves`: whether stowage provisions for a driver name;
/// `remote`: whether it is a `--csi-driver` (called over its socket).
pub fn plan(
    pv: &Pv,
    claim_exists: bool,
    volume: Option<&Volume>,
    serves: impl Fn(&str) -> bool,
    remote: impl Fn(&str) -> bool,
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
            ("Delete", None) if ours => in_driver(pv, &remote).unwrap_or(Reclaim::RemoveFinalizer),
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
        ("Delete", None) => in_driver(pv, &remote).unwrap_or(Reclaim::DeletePv),
        _ => Reclaim::Skip,
    }
}

/// DeleteVolume for a CSI PV of a `--csi-driver`, by its handle.
fn in_driver(pv: &Pv, remote: impl Fn(&str) -> bool) -> Option<Reclaim> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    remote(&csi.driver).then(|| Reclaim::DeleteInDriver {
        driver: csi.driver.clone(),
        handle: csi.volume_handle.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local;

    fn no_remote(_: &str) -> bool {
        false
    }

    fn local_only(driver: &str) -> bool {
        driver == local::DRIVER_NAME
    }

    /// The plan where only `local.stowage.dev` is served.
    fn plan_local(pv: &Pv, claim_exists: bool, volume: Option<&Volume>) -> Reclaim {
        plan(pv, claim_exists, volume, local_only, no_remote)
    }
    use serde_json::json;

    fn pv(policy: &str, phase: &str, ours: bool, deleting: bool) -> Pv {
        let mut pv: Pv = serde_json::from_value(json!({
            "metadata": { "name": "pvc-1", "finalizers": [PV_PROVISIONER_FINALIZER] },
            "spec": { "persistentVolumeReclaimPolicy": policy,
                      "claimRef": { "namespace": "ns", "name": "data", "uid": "u1" } },
            "status": { "phase": phase },
        }))
        .unwrap();
        if ours {
            pv.annotations = [(
                ANN_PROVISIONED_BY.to_string(),
                local::DRIVER_NAME.to_string(),
            )]
            .into();
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
            plan_local(&pv("Delete", "Bound", true, false), true, Some(&volume())),
            Reclaim::Skip
        );
    }

    #[test]
    fn delete_goes_released_then_data_then_pv_then_finalizer() {
        let v = volume();
        // The PV as each step leaves it, with the Volume while it exists.
        let steps = [
            (
                pv("Delete", "Bound", true, false),
                Some(&v),
                Reclaim::MarkReleased,
            ),
            (
                pv("Delete", "Released", true, false),
                Some(&v),
                Reclaim::DeleteVolume("pvc-1".into()),
            ),
            (
                pv("Delete", "Released", true, false),
                None,
                Reclaim::DeletePv,
            ),
            (
                pv("Delete", "Released", true, true),
                None,
                Reclaim::RemoveFinalizer,
            ),
        ];
        for (pv, volume, next) in steps {
            assert_eq!(plan_local(&pv, false, volume), next, "{pv:?}");
        }
    }

    #[test]
    fn retain_keeps_everything() {
        assert_eq!(
            plan_local(
                &pv("Retain", "Released", true, false),
                false,
                Some(&volume())
            ),
            Reclaim::Retained
        );
        // Deleting a retained PV by hand lets it go, and keeps the data.
        assert_eq!(
            plan_local(
                &pv("Retain", "Released", true, true),
                false,
                Some(&volume())
            ),
            Reclaim::RemoveFinalizer
        );
    }

    #[test]
    fn static_pvs_are_released_but_never_deleted() {
        assert_eq!(
            plan_local(&pv("Delete", "Bound", false, false), false, None),
            Reclaim::MarkReleased
        );
        assert_eq!(
            plan_local(&pv("Delete", "Released", false, false), false, None),
            Reclaim::Skip
        );
    }

    fn csi(mut pv: Pv, driver: &str) -> Pv {
        pv.spec.as_mut().unwrap().csi = Some(
            serde_json::from_value(json!({
                "driver": driver, "volumeHandle": "vol-7",
            }))
            .unwrap(),
        );
        pv.annotations
            .insert(ANN_PROVISIONED_BY.into(), driver.into());
        pv
    }

    #[test]
    fn a_driver_volume_without_our_record_is_deleted_in_the_driver() {
        let remote = |d: &str| d == "mock.csi.k8s.io";
        let serves = |d: &str| d == "mock.csi.k8s.io";
        let in_driver = Reclaim::DeleteInDriver {
            driver: "mock.csi.k8s.io".into(),
            handle: "vol-7".into(),
        };
        // Released: DeleteVolume, never just the PV (that would leak it).
        let released = csi(pv("Delete", "Released", true, false), "mock.csi.k8s.io");
        assert_eq!(plan(&released, false, None, serves, remote), in_driver);
        // Being deleted with the provisioner's finalizer: the same.
        let deleting = csi(pv("Delete", "Released", true, true), "mock.csi.k8s.io");
        assert_eq!(plan(&deleting, false, None, serves, remote), in_driver);
        // Retained, or another driver's: left alone.
        let retained = csi(pv("Retain", "Released", true, false), "mock.csi.k8s.io");
        assert_eq!(
            plan(&retained, false, None, serves, remote),
            Reclaim::Retained
        );
        let other = csi(pv("Delete", "Released", true, false), "other.csi.k8s.io");
        assert_eq!(plan(&other, false, None, serves, remote), Reclaim::Skip);
        // Recorded in a Volume: that Volume is how it goes.
        assert_eq!(
            plan(&released, false, Some(&volume()), serves, remote),
            Reclaim::DeleteVolume(volume().name_any())
        );
    }
}
