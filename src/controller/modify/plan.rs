//! The next step for a claim whose `volumeAttributesClassName` differs from
//! the class its volume has, decided from a snapshot. No API calls here.

use std::collections::BTreeMap;

use k8s_openapi::api::storage::v1::VolumeAttributesClass;
use kube::ResourceExt;

use crate::backend::local;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;

/// `modifyVolumeStatus.status` values, as external-resizer writes them.
pub const PENDING: &str = "Pending";
pub const IN_PROGRESS: &str = "InProgress";
pub const INFEASIBLE: &str = "Infeasible";

/// Who serves the claim's PV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// `local.stowage.dev`, whose volumes have no mutable parameters.
    Local,
    /// A `--csi-driver`; whether it offers MODIFY_VOLUME.
    Remote { modifies: bool },
    /// Not stowage's.
    Elsewhere,
}

pub struct ModifyView<'a> {
    pub claim: &'a Claim,
    pub pv: Option<&'a Pv>,
    pub served: Served,
    /// The class the claim asks for, when it exists (read only when the
    /// claim asks for a change).
    pub target: Option<&'a VolumeAttributesClass>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Modify {
    Nothing,
    /// The class asked for does not exist (yet): `Pending`, asked again.
    Pending {
        target: String,
    },
    /// Cannot be done as asked: `Infeasible`, until the claim changes.
    Refuse {
        target: String,
        error: ModifyError,
    },
    /// The driver has it (the PV says so): the claim is told.
    Finish {
        target: String,
    },
    /// ControllerModifyVolume with the class's parameters.
    Modify {
        target: String,
        parameters: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModifyError {
    #[error(
        "{driver} has no mutable parameters, so its volumes take no VolumeAttributesClass: remove volumeAttributesClassName from the claim",
        driver = local::DRIVER_NAME
    )]
    Local,
    #[error(
        "CSI driver {0} does not offer MODIFY_VOLUME, so the volume cannot change VolumeAttributesClass"
    )]
    Unsupported(String),
    #[error(
        "VolumeAttributesClass {name:?} is for driver {theirs}, not {ours}: name one whose driverName is {ours}"
    )]
    WrongDriver {
        name: String,
        theirs: String,
        ours: String,
    },
    #[error("VolumeAttributesClass {0:?} does not exist: create it, or name another")]
    Missing(String),
    #[error("{message}")]
    Driver { message: String, infeasible: bool },
}

impl ModifyError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ModifyError::Local => "local",
            ModifyError::Unsupported(_) => "unsupported",
            ModifyError::WrongDriver { .. } => "wrong_driver",
            ModifyError::Missing(_) => "missing_class",
            ModifyError::Driver { .. } => "driver_failed",
        }
    }
}

pub fn plan(view: &ModifyView) -> Modify {
    let claim = view.claim;
    let Some(pv) = view.pv.filter(|pv| bound_to(pv, claim)) else {
        return Modify::Nothing;
    };
    let Some(driver) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
        return Modify::Nothing;
    };
    let Some(target) = wanted_change(claim) else {
        return Modify::Nothing;
    };
    let refuse = |error| Modify::Refuse {
        target: target.clone(),
        error,
    };
    if view.served != Served::Elsewhere
        && pv
            .spec
            .as_ref()
            .and_then(|s| s.volume_attributes_class_name.as_deref())
            == Some(target.as_str())
    {
        return Modify::Finish { target };
    }
    match view.served {
        Served::Elsewhere => return Modify::Nothing,
        Served::Local => return refuse(ModifyError::Local),
        Served::Remote { modifies: false } => {
            return refuse(ModifyError::Unsupported(driver.driver.clone()));
        }
        Served::Remote { modifies: true } => {}
    }
    let Some(class) = view.target else {
        return Modify::Pending { target };
    };
    if class.driver_name != driver.driver {
        return refuse(ModifyError::WrongDriver {
            name: target.clone(),
            theirs: class.driver_name.clone(),
            ours: driver.driver.clone(),
        });
    }
    Modify::Modify {
        parameters: class.parameters.clone().unwrap_or_default(),
        target,
    }
}

/// The class the claim asks for, when it is not the volume's yet and was
/// not already found infeasible (the user must change the claim first).
pub fn wanted_change(claim: &Claim) -> Option<String> {
    let target = claim
        .spec
        .as_ref()?
        .volume_attributes_class_name
        .clone()
        .filter(|n| !n.is_empty())?;
    let status = claim.status.as_ref()?;
    if status.phase.as_deref() != Some("Bound")
        || status.current_volume_attributes_class_name.as_deref() == Some(target.as_str())
    {
        return None;
    }
    let tried = status.modify_volume_status.as_ref();
    let infeasible = tried.is_some_and(|t| {
        t.status == INFEASIBLE && t.target_volume_attributes_class_name.as_deref() == Some(&target)
    });
    (!infeasible).then_some(target)
}

fn bound_to(pv: &Pv, claim: &Claim) -> bool {
    let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    claim.uid().is_some()
        && claim_ref.and_then(|r| r.uid.clone()) == claim.uid()
        && claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
            == Some(pv.name_any().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DRIVER: &str = "mock.csi.k8s.io";

    fn claim(wanted: Option<&str>, current: Option<&str>, tried: Option<(&str, &str)>) -> Claim {
        serde_json::from_value(json!({
            "metadata": { "name": "data", "namespace": "ns", "uid": "u1" },
            "spec": { "volumeName": "pvc-u1", "volumeAttributesClassName": wanted },
            "status": {
                "phase": "Bound",
                "currentVolumeAttributesClassName": current,
                "modifyVolumeStatus": tried.map(|(target, status)| json!({
                    "targetVolumeAttributesClassName": target, "status": status,
                })),
            },
        }))
        .unwrap()
    }

    fn pv(driver: &str) -> Pv {
        serde_json::from_value(json!({
            "metadata": { "name": "pvc-u1" },
            "spec": { "claimRef": { "namespace": "ns", "name": "data", "uid": "u1" },
                      "csi": { "driver": driver, "volumeHandle": "vol-1" } },
        }))
        .unwrap()
    }

    fn class(name: &str, driver: &str) -> VolumeAttributesClass {
        serde_json::from_value(json!({
            "metadata": { "name": name }, "driverName": driver, "parameters": { "iops": "300" },
        }))
        .unwrap()
    }

    fn plan_for(c: &Claim, served: Served, target: Option<&VolumeAttributesClass>) -> Modify {
        let p = pv(DRIVER);
        plan(&ModifyView {
            claim: c,
            pv: Some(&p),
            served,
            target,
        })
    }

    const MODIFIES: Served = Served::Remote { modifies: true };

    #[test]
    fn a_new_class_is_applied_with_its_parameters() {
        let gold = class("gold", DRIVER);
        let c = claim(Some("gold"), Some("silver"), None);
        assert_eq!(
            plan_for(&c, MODIFIES, Some(&gold)),
            Modify::Modify {
                target: "gold".into(),
                parameters: [("iops".to_string(), "300".to_string())].into(),
            }
        );
        // A first class on a volume provisioned without one, and a retry
        // of one in progress, are the same call.
        let c = claim(Some("gold"), None, Some(("gold", IN_PROGRESS)));
        assert!(matches!(
            plan_for(&c, MODIFIES, Some(&gold)),
            Modify::Modify { .. }
        ));
    }

    #[test]
    fn nothing_to_do_when_current_unasked_unbound_or_already_infeasible() {
        let gold = class("gold", DRIVER);
        for c in [
            claim(Some("gold"), Some("gold"), None),
            claim(None, Some("gold"), None),
            claim(Some("gold"), None, Some(("gold", INFEASIBLE))),
        ] {
            assert_eq!(
                plan_for(&c, MODIFIES, Some(&gold)),
                Modify::Nothing,
                "{c:?}"
            );
        }
        let mut pending = claim(Some("gold"), None, None);
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(plan_for(&pending, MODIFIES, Some(&gold)), Modify::Nothing);
        // Infeasible for another class: this one is tried.
        let c = claim(Some("gold"), None, Some(("platinum", INFEASIBLE)));
        assert!(matches!(
            plan_for(&c, MODIFIES, Some(&gold)),
            Modify::Modify { .. }
        ));
        // Not our driver.
        let c = claim(Some("gold"), None, None);
        assert_eq!(
            plan_for(&c, Served::Elsewhere, Some(&gold)),
            Modify::Nothing
        );
    }

    #[test]
    fn a_pv_already_of_the_class_only_needs_the_claim_told() {
        // The driver was asked and the PV written, the claim not yet (a
        // crash, or a pass woken by the PV's change first): no second call.
        let c = claim(Some("gold"), Some("silver"), Some(("gold", IN_PROGRESS)));
        let mut p = pv(DRIVER);
        p.spec.as_mut().unwrap().volume_attributes_class_name = Some("gold".into());
        let view = ModifyView {
            claim: &c,
            pv: Some(&p),
            served: MODIFIES,
            target: None,
        };
        assert_eq!(
            plan(&view),
            Modify::Finish {
                target: "gold".into()
            }
        );
    }

    #[test]
    fn what_cannot_work_is_refused_and_a_missing_class_waits() {
        let c = claim(Some("gold"), None, None);
        let refused = |p: Modify| match p {
            Modify::Refuse { error, .. } => error,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(plan_for(&c, Served::Local, None)),
            ModifyError::Local
        );
        assert_eq!(
            refused(plan_for(&c, Served::Remote { modifies: false }, None)),
            ModifyError::Unsupported(DRIVER.into())
        );
        let other = class("gold", "other.csi.k8s.io");
        assert!(matches!(
            refused(plan_for(&c, MODIFIES, Some(&other))),
            ModifyError::WrongDriver { .. }
        ));
        assert_eq!(
            plan_for(&c, MODIFIES, None),
            Modify::Pending {
                target: "gold".into()
            }
        );
    }
}
