//! The PV controller's binding, done in-process for claims of our classes:
//! the same writes, in the same order, as kube-controller-manager's binder,
//! so it makes no difference which of the two gets there first.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

use super::protocol::*;
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
    claim: &PersistentVolumeClaim,
    class: Option<&StorageClass>,
    pvs: &[&PersistentVolume],
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
fn reserved_for(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return false;
    };
    r.name.as_deref() == Some(claim.name_any().as_str())
        && r.namespace == claim.namespace()
        && r.uid
            .as_deref()
            .is_none_or(|u| u.is_empty() || Some(u) == claim.uid().as_deref())
}

fn claim_ref_uid(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .claim_ref
        .as_ref()
        .map(|r| r.uid.as_deref().unwrap_or(""))
}

/// kcm's matching rule: the smallest available PV of the claim's class that
/// fits its size, access modes, volume mode and selector.
pub fn best_static_match<'a>(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    pvs: &[&'a PersistentVolume],
) -> Option<&'a PersistentVolume> {
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
    let labels = |pv: &PersistentVolume| pv.labels().clone();

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

pub fn pv_bytes(pv: &PersistentVolume) -> Option<i64> {
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
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const CLASS: &str = "fast";

    fn class(mode: &str) -> StorageClass {
        serde_json::from_value(json!({
            "metadata": { "name": CLASS }, "provisioner": "local.stowage.dev",
            "volumeBindingMode": mode,
        }))
        .unwrap()
    }

    fn claim(spec: Value) -> PersistentVolumeClaim {
        let mut base = json!({
            "storageClassName": CLASS, "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "1Gi" } },
        });
        merge(&mut base, spec);
        serde_json::from_value(json!({
            "metadata": { "name": "c", "namespace": "ns", "uid": "claim-uid" },
            "spec": base,
        }))
        .unwrap()
    }

    /// A PV of 2Gi, RWO+RWX, Filesystem, Available, in CLASS, unless `spec`
    /// or `meta` say otherwise.
    fn pv(name: &str, spec: Value, meta: Value) -> PersistentVolume {
        let mut base = json!({
            "capacity": { "storage": "2Gi" }, "storageClassName": CLASS,
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"], "volumeMode": "Filesystem",
        });
        merge(&mut base, spec);
        let mut metadata = json!({ "name": name });
        merge(&mut metadata, meta);
        serde_json::from_value(json!({
            "metadata": metadata, "spec": base, "status": { "phase": "Available" },
        }))
        .unwrap()
    }

    fn merge(base: &mut Value, patch: Value) {
        for (k, v) in patch.as_object().unwrap() {
            base[k] = v.clone();
        }
    }

    fn best(claim: &PersistentVolumeClaim, pvs: &[PersistentVolume]) -> Option<String> {
        let refs: Vec<_> = pvs.iter().collect();
        best_static_match(claim, &class("Immediate"), &refs).map(|p| p.name_any())
    }

    /// kube-controller-manager's matching rules, one row each: a claim, one
    /// PV, whether it matches.
    #[test]
    fn static_match_follows_kcm_rules() {
        let none = json!({});
        let rows: Vec<(&str, Value, Value, Value, bool)> = vec![
            ("fits", none.clone(), none.clone(), none.clone(), true),
            (
                "too small",
                json!({ "resources": { "requests": { "storage": "3Gi" } } }),
                none.clone(),
                none.clone(),
                false,
            ),
            (
                "exactly the size",
                json!({ "resources": { "requests": { "storage": "2Gi" } } }),
                none.clone(),
                none.clone(),
                true,
            ),
            (
                "other class",
                none.clone(),
                json!({ "storageClassName": "slow" }),
                none.clone(),
                false,
            ),
            (
                "no class on the PV",
                none.clone(),
                json!({ "storageClassName": null }),
                none.clone(),
                false,
            ),
            (
                "access mode missing",
                json!({ "accessModes": ["ReadOnlyMany"] }),
                none.clone(),
                none.clone(),
                false,
            ),
            (
                "every mode asked is offered",
                json!({ "accessModes": ["ReadWriteOnce", "ReadWriteMany"] }),
                none.clone(),
                none.clone(),
                true,
            ),
            (
                "block claim, filesystem PV",
                json!({ "volumeMode": "Block" }),
                none.clone(),
                none.clone(),
                false,
            ),
            (
                "block claim, block PV",
                json!({ "volumeMode": "Block" }),
                json!({ "volumeMode": "Block" }),
                none.clone(),
                true,
            ),
            (
                "PV without volumeMode is Filesystem",
                none.clone(),
                json!({ "volumeMode": null }),
                none.clone(),
                true,
            ),
            (
                "selector matches",
                json!({ "selector": { "matchLabels": { "tier": "gold" } } }),
                none.clone(),
                json!({ "labels": { "tier": "gold" } }),
                true,
            ),
            (
                "selector does not",
                json!({ "selector": { "matchLabels": { "tier": "gold" } } }),
                none.clone(),
                json!({ "labels": { "tier": "lead" } }),
                false,
            ),
            (
                "selector expression In",
                json!({ "selector": { "matchExpressions": [{ "key": "tier", "operator": "In", "values": ["gold", "silver"] }] } }),
                none.clone(),
                json!({ "labels": { "tier": "silver" } }),
                true,
            ),
            (
                "selector expression DoesNotExist",
                json!({ "selector": { "matchExpressions": [{ "key": "tier", "operator": "DoesNotExist" }] } }),
                none.clone(),
                json!({ "labels": { "tier": "silver" } }),
                false,
            ),
            (
                "claimed by another",
                none.clone(),
                json!({ "claimRef": { "namespace": "ns", "name": "other", "uid": "u" } }),
                none.clone(),
                false,
            ),
            (
                "being deleted",
                none.clone(),
                none.clone(),
                json!({ "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["f"] }),
                false,
            ),
            // Without a selected node (Immediate), kcm ignores node affinity.
            (
                "node affinity, Immediate",
                none.clone(),
                json!({ "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "k", "operator": "In", "values": ["n"] }] }] } } }),
                none.clone(),
                true,
            ),
        ];
        for (what, claim_spec, pv_spec, pv_meta, matches) in rows {
            let found = best(&claim(claim_spec), &[pv("pv", pv_spec, pv_meta)]);
            assert_eq!(found.is_some(), matches, "{what}");
        }
    }

    #[test]
    fn released_pvs_are_not_matched() {
        let mut released = pv("released", json!({}), json!({}));
        released.status.as_mut().unwrap().phase = Some("Released".into());
        assert_eq!(best(&claim(json!({})), &[released]), None);
    }

    #[test]
    fn the_smallest_fit_wins_then_the_name() {
        let pvs = [
            pv(
                "b-3gi",
                json!({ "capacity": { "storage": "3Gi" } }),
                json!({}),
            ),
            pv(
                "z-1gi",
                json!({ "capacity": { "storage": "1Gi" } }),
                json!({}),
            ),
            pv(
                "y-1gi",
                json!({ "capacity": { "storage": "1Gi" } }),
                json!({}),
            ),
            pv(
                "a-512mi",
                json!({ "capacity": { "storage": "512Mi" } }),
                json!({}),
            ),
        ];
        assert_eq!(best(&claim(json!({})), &pvs).as_deref(), Some("y-1gi"));
    }

    fn plan_for(claim: &PersistentVolumeClaim, pvs: &[PersistentVolume], mode: &str) -> Binding {
        let refs: Vec<_> = pvs.iter().collect();
        plan(claim, Some(&class(mode)), &refs, |_| true)
    }

    #[test]
    fn a_pv_pre_bound_to_the_claim_is_taken_over_a_better_fit() {
        let mine = pv(
            "reserved",
            json!({ "capacity": { "storage": "5Gi" }, "claimRef": { "namespace": "ns", "name": "c", "uid": "claim-uid" } }),
            json!({}),
        );
        let smaller = pv("smaller", json!({}), json!({}));
        let Binding::Bind(steps) = plan_for(&claim(json!({})), &[smaller, mine], "Immediate")
        else {
            panic!("no binding");
        };
        assert_eq!(steps.pv, "reserved");
        assert!(!steps.set_claim_ref, "claimRef already names the claim");
        assert!(steps.set_pv_phase && steps.set_claim_volume_name && steps.set_claim_status);
    }

    /// An admin may reserve a PV by claim name alone (no UID), as kcm
    /// allows: it is that claim's, over any better fit.
    #[test]
    fn a_pv_pre_bound_by_name_only_is_taken() {
        let reserved = pv(
            "reserved",
            json!({ "capacity": { "storage": "5Gi" }, "claimRef": { "namespace": "ns", "name": "c" } }),
            json!({}),
        );
        let smaller = pv("smaller", json!({}), json!({}));
        let Binding::Bind(steps) = plan_for(&claim(json!({})), &[smaller, reserved], "Immediate")
        else {
            panic!("no binding");
        };
        assert_eq!(steps.pv, "reserved");
        assert!(steps.set_claim_ref, "the UID is to be filled in");
    }

    #[test]
    fn a_claim_naming_a_pv_reserved_for_another_claim_is_not_bound() {
        let theirs = pv(
            "theirs",
            json!({ "claimRef": { "namespace": "ns", "name": "other", "uid": "other-uid" } }),
            json!({}),
        );
        let named = claim(json!({ "volumeName": "theirs" }));
        assert_eq!(plan_for(&named, &[theirs], "Immediate"), Binding::Skip);
    }

    #[test]
    fn wait_for_first_consumer_static_pvs_are_left_to_the_scheduler() {
        let free = pv("free", json!({}), json!({}));
        assert_eq!(
            plan_for(&claim(json!({})), &[free], "WaitForFirstConsumer"),
            Binding::Skip
        );
    }

    #[test]
    fn bound_on_both_sides_is_done() {
        let bound = pv(
            "pv",
            json!({ "claimRef": { "namespace": "ns", "name": "c", "uid": "claim-uid" } }),
            json!({}),
        );
        let mut bound = bound;
        bound.status.as_mut().unwrap().phase = Some("Bound".into());
        let mut claim = claim(json!({ "volumeName": "pv" }));
        claim
            .annotations_mut()
            .insert(ANN_BIND_COMPLETED.into(), "yes".into());
        claim.status = Some(serde_json::from_value(json!({ "phase": "Bound" })).unwrap());
        assert_eq!(plan_for(&claim, &[bound], "Immediate"), Binding::Done);
    }

    #[test]
    fn claims_of_other_provisioners_or_being_deleted_are_skipped() {
        let free = pv("free", json!({}), json!({}));
        let refs = [&free];
        let c = claim(json!({}));
        assert_eq!(
            plan(&c, Some(&class("Immediate")), &refs, |_| false),
            Binding::Skip
        );
        assert_eq!(plan(&c, None, &refs, |_| true), Binding::Skip);
        let mut deleting = c.clone();
        deleting.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
        assert_eq!(
            plan(&deleting, Some(&class("Immediate")), &refs, |_| true),
            Binding::Skip
        );
    }
}
