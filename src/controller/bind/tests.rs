use super::*;
use crate::controller::cached_claim::Claim;
use serde_json::{Value, json};

const CLASS: &str = "fast";

fn class(mode: &str) -> StorageClass {
    crate::testing::storage_class(CLASS, "local.stowage.dev", Some(mode), &[])
}

fn claim(spec: Value) -> Claim {
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
fn pv(name: &str, spec: Value, meta: Value) -> Pv {
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

fn best(claim: &Claim, pvs: &[Pv]) -> Option<String> {
    let refs: Vec<_> = pvs.iter().collect();
    best_static_match(claim, &class("Immediate"), &refs).map(|p| p.name_any())
}

/// A row of kube-controller-manager's matching rules: what it shows, the
/// claim's spec, the PV's spec and metadata, whether they match.
type Row = (&'static str, Value, Value, Value, bool);

fn assert_rows(rows: Vec<Row>) {
    for (what, claim_spec, pv_spec, pv_meta, matches) in rows {
        let found = best(&claim(claim_spec), &[pv("pv", pv_spec, pv_meta)]);
        assert_eq!(found.is_some(), matches, "{what}");
    }
}

/// kube-controller-manager's matching rules: a PV as big as asked or
/// bigger, of the claim's StorageClass and VolumeAttributesClass (or of
/// none when the claim names none).
#[test]
fn static_match_follows_kcm_rules_for_size_and_class() {
    let none = json!({});
    assert_rows(vec![
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
            "the VolumeAttributesClass asked",
            json!({ "volumeAttributesClassName": "gold" }),
            json!({ "volumeAttributesClassName": "gold" }),
            none.clone(),
            true,
        ),
        (
            "another VolumeAttributesClass",
            json!({ "volumeAttributesClassName": "gold" }),
            json!({ "volumeAttributesClassName": "silver" }),
            none.clone(),
            false,
        ),
        (
            "a VolumeAttributesClass asked, none on the PV",
            json!({ "volumeAttributesClassName": "gold" }),
            none.clone(),
            none.clone(),
            false,
        ),
        (
            "a VolumeAttributesClass on the PV, none asked",
            none.clone(),
            json!({ "volumeAttributesClassName": "gold" }),
            none.clone(),
            false,
        ),
    ]);
}

/// kube-controller-manager's matching rules: every access mode asked is
/// offered; volume modes are equal (a PV without one is Filesystem).
#[test]
fn static_match_follows_kcm_rules_for_modes() {
    let none = json!({});
    assert_rows(vec![
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
    ]);
}

/// kube-controller-manager's matching rules: the claim's selector, labels
/// and expressions, against the PV's labels.
#[test]
fn static_match_follows_kcm_rules_for_selectors() {
    let none = json!({});
    assert_rows(vec![
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
    ]);
}

/// kube-controller-manager's matching rules: claimed or dying PVs are never
/// taken; without a selected node, node affinity is ignored.
#[test]
fn static_match_follows_kcm_rules_for_availability() {
    let none = json!({});
    assert_rows(vec![
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
    ]);
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

fn plan_for(claim: &Claim, pvs: &[Pv], mode: &str) -> Binding {
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
    let Binding::Bind(steps) = plan_for(&claim(json!({})), &[smaller, mine], "Immediate") else {
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
        .annotations
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
