//! The PV controller's binding, done in-process for claims of our classes:
//! the same writes, in the same order, as kube-controller-manager's binder,
//! so it makes no difference which of the two gets there first.

pub mod apply;

use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

use super::protocol::*;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::quantity::parse_bytes;

#[derive(Debug, Clone, PartialEq)]
pub enum Binding {
    /// Not ours, or nothing to bind yet.
    Skip,
    /// Bound on both sides.
    Done,
    /// Write whichever halves are missing, in kcm's order.
    Bind(BindSteps),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BindSteps {
    pub pv: String,
    /// Static PV: point its claimRef at the claim (and mark it ours).
    pub set_claim_ref: bool,
    pub set_pv_phase: bool,
    pub set_claim_volume_name: bool,
    pub set_claim_status: bool,
}

pub fn plan(
    claim: &Claim,
    class: Option<&StorageClass>,
    pvs: &[&Pv],
    is_ours: impl Fn(&StorageClass) -> bool,
) -> Binding {
    let Some(class) = class else {
        return Binding::Skip;
    };
    if !is_ours(class) || claim.metadata.deletion_timestamp.is_some() {
        return Binding::Skip;
    }
    let spec = claim.spec.clone().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    let named = spec.volume_name.clone().filter(|n| !n.is_empty());

    let pv = match &named {
        Some(name) => pvs.iter().find(|pv| pv.name_any() == *name).copied(),
        None => pvs
            .iter()
            .find(|pv| reserved_for(pv, claim))
            .copied()
            .or_else(|| {
                let wffc =
                    class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
                // The scheduler binds static PVs of WaitForFirstConsumer classes itself.
                if wffc {
                    None
                } else {
                    best_static_match(claim, class, pvs)
                }
            }),
    };
    let Some(pv) = pv else { return Binding::Skip };
    if pv.metadata.deletion_timestamp.is_some() {
        return Binding::Skip;
    }
    // A PV reserved for another claim is never taken.
    match (
        claim_ref_uid(pv),
        pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()),
    ) {
        (Some(u), _) if !u.is_empty() && u != uid => return Binding::Skip,
        (_, Some(r))
            if r.name.as_deref() != Some(&claim.name_any()) || r.namespace != claim.namespace() =>
        {
            return Binding::Skip;
        }
        _ => {}
    }

    let steps = BindSteps {
        pv: pv.name_any(),
        set_claim_ref: claim_ref_uid(pv).is_none_or(|u| u.is_empty()),
        set_pv_phase: pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound"),
        set_claim_volume_name: named.is_none()
            || claim
                .annotations()
                .get(ANN_BIND_COMPLETED)
                .map(String::as_str)
                != Some("yes"),
        set_claim_status: claim.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound"),
    };
    if steps.set_claim_ref
        || steps.set_pv_phase
        || steps.set_claim_volume_name
        || steps.set_claim_status
    {
        Binding::Bind(steps)
    } else {
        Binding::Done
    }
}

/// kcm's "pre-bound" test: the PV's claimRef names the claim, with its
/// UID or none (an admin reserving a PV by claim name).
fn reserved_for(pv: &Pv, claim: &Claim) -> bool {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return false;
    };
    r.name.as_deref() == Some(claim.name_any().as_str())
        && r.namespace == claim.namespace()
        && r.uid
            .as_deref()
            .is_none_or(|u| u.is_empty() || Some(u) == claim.uid().as_deref())
}

fn claim_ref_uid(pv: &Pv) -> Option<&str> {
    pv.spec
        .as_ref()?
        .claim_ref
        .as_ref()
        .map(|r| r.uid.as_deref().unwrap_or(""))
}

/// kcm's matching rule: the smallest available PV of the claim's class that
/// fits its size, access modes, volume mode and selector.
pub fn best_static_match<'a>(
    claim: &Claim,
    class: &StorageClass,
    pvs: &[&'a Pv],
) -> Option<&'a Pv> {
    let spec = claim.spec.clone().unwrap_or_default();
    let wanted = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_bytes(&q.0).ok())?;
    let wanted_modes = spec.access_modes.clone().unwrap_or_default();
    let wanted_mode = spec
        .volume_mode
        .clone()
        .unwrap_or_else(|| "Filesystem".into());
    let labels = |pv: &Pv| pv.labels().clone();
    let wanted_attributes = spec
        .volume_attributes_class_name
        .clone()
        .unwrap_or_default();

    pvs.iter()
        .copied()
        .filter(|pv| pv.metadata.deletion_timestamp.is_none())
        .filter(|pv| {
            let Some(s) = pv.spec.as_ref() else {
                return false;
            };
            s.claim_ref.is_none()
                && s.storage_class_name.as_deref() == Some(class.name_any().as_str())
                && s.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()) == wanted_mode
                && s.volume_attributes_class_name.clone().unwrap_or_default() == wanted_attributes
                && wanted_modes
                    .iter()
                    .all(|m| s.access_modes.as_ref().is_some_and(|have| have.contains(m)))
                && pv
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_none_or(|p| p == "Available" || p == "Pending")
        })
        .filter(|pv| {
            spec.selector
                .as_ref()
                .is_none_or(|sel| selector_matches(sel, &labels(pv)))
        })
        .filter_map(|pv| Some((pv_bytes(pv)?, pv)))
        .filter(|(bytes, _)| *bytes >= wanted)
        .min_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.name_any().cmp(&b.1.name_any()))
        })
        .map(|(_, pv)| pv)
}

pub fn pv_bytes(pv: &Pv) -> Option<i64> {
    let q = pv.spec.as_ref()?.capacity.as_ref()?.get("storage")?;
    parse_bytes(&q.0).ok()
}

pub fn selector_matches(
    sel: &LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let by_labels = sel
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_exprs = sel.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            let have = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => have.is_some_and(|v| values.contains(v)),
                "NotIn" => have.is_none_or(|v| !values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
    });
    by_labels && by_exprs
}

#[cfg(test)]
mod tests;
