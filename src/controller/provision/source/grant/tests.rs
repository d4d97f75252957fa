use super::*;
use serde_json::{Value, json};

/// A claim `b/new` whose `dataSourceRef` names `kind` `name` of `group`
/// in namespace `a`.
fn reference(group: &str, kind: &str, name: &str) -> Reference {
    Reference {
        claim_namespace: "b".into(),
        claim_name: "new".into(),
        namespace: "a".into(),
        group: group.into(),
        kind: kind.into(),
        name: name.into(),
    }
}

fn snapshot_ref() -> Reference {
    reference("snapshot.storage.k8s.io", "VolumeSnapshot", "snap")
}

fn grant(namespace: &str, from: Value, to: Value) -> ReferenceGrant {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": { "name": "g", "namespace": namespace },
        "spec": { "from": from, "to": to },
    }))
    .unwrap()
}

fn claims_of(namespace: &str) -> Value {
    json!([{ "group": "", "kind": "PersistentVolumeClaim", "namespace": namespace }])
}

fn snapshots(name: Option<&str>) -> Value {
    json!([{ "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name }])
}

type Case = (&'static str, ReferenceGrant, Reference, bool);

fn assert_cases(cases: Vec<Case>) {
    for (case, grant, reference, want) in cases {
        assert_eq!(is_granted(&grant, &reference), want, "{case}");
    }
}

#[test]
fn a_grant_is_in_the_sources_namespace_for_claims_of_the_claims_namespace() {
    let pod_from = json!([{ "group": "", "kind": "Pod", "namespace": "b" }]);
    let group_from =
        json!([{ "group": "example.com", "kind": "PersistentVolumeClaim", "namespace": "b" }]);
    let several_from = json!([
        { "group": "", "kind": "Pod", "namespace": "b" },
        { "group": "", "kind": "PersistentVolumeClaim", "namespace": "b" },
    ]);
    let several_to = json!([
        { "group": "", "kind": "Secret" },
        { "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap" },
    ]);
    let any = snapshots(None);
    assert_cases(vec![
        (
            "matching",
            grant("a", claims_of("b"), snapshots(Some("snap"))),
            snapshot_ref(),
            true,
        ),
        (
            "claims of another namespace",
            grant("a", claims_of("c"), any.clone()),
            snapshot_ref(),
            false,
        ),
        (
            "grant in another namespace",
            grant("c", claims_of("b"), any.clone()),
            snapshot_ref(),
            false,
        ),
        (
            "grant in the claim's namespace",
            grant("b", claims_of("b"), any.clone()),
            snapshot_ref(),
            false,
        ),
        (
            "from another kind",
            grant("a", pod_from, any.clone()),
            snapshot_ref(),
            false,
        ),
        (
            "from a group",
            grant("a", group_from, any),
            snapshot_ref(),
            false,
        ),
        (
            "one of several entries",
            grant("a", several_from, several_to),
            snapshot_ref(),
            true,
        ),
    ]);
}

#[test]
fn a_grant_names_the_sources_group_and_kind_and_its_name_or_none() {
    let to = |v: Value| grant("a", claims_of("b"), v);
    let old_claim = || reference("", "PersistentVolumeClaim", "old");
    let contents = json!([{ "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshotContent" }]);
    let core_snapshots = json!([{ "group": "", "kind": "VolumeSnapshot" }]);
    let claims = json!([{ "group": "", "kind": "PersistentVolumeClaim", "name": "old" }]);
    let grouped_claims =
        json!([{ "group": "snapshot.storage.k8s.io", "kind": "PersistentVolumeClaim" }]);
    assert_cases(vec![
        (
            "no name: any snapshot",
            to(snapshots(None)),
            snapshot_ref(),
            true,
        ),
        (
            "empty name: any snapshot",
            to(snapshots(Some(""))),
            snapshot_ref(),
            true,
        ),
        (
            "another snapshot",
            to(snapshots(Some("other"))),
            snapshot_ref(),
            false,
        ),
        ("another kind", to(contents), snapshot_ref(), false),
        (
            "a snapshot without its group",
            to(core_snapshots),
            snapshot_ref(),
            false,
        ),
        ("a claim, in the core group", to(claims), old_claim(), true),
        (
            "a claim given a group",
            to(grouped_claims),
            old_claim(),
            false,
        ),
    ]);
}

#[test]
fn another_namespace_needs_the_flag_then_a_grant_and_each_refusal_says_what_to_do() {
    let wanted = snapshot_ref();
    let good = grant("a", claims_of("b"), snapshots(None));
    let unrelated = grant("a", claims_of("c"), snapshots(None));

    let off = check(&wanted, false, Some(std::slice::from_ref(&good))).unwrap_err();
    assert!(matches!(off, AccessError::FlagOff(_)), "{off:?}");
    let note = off.to_string();
    assert!(note.contains("--cross-namespace-data-sources"), "{note}");
    assert!(note.contains("VolumeSnapshot a/snap"), "{note}");

    let missing = check(&wanted, true, Some(std::slice::from_ref(&unrelated))).unwrap_err();
    assert!(matches!(missing, AccessError::NotGranted(_)), "{missing:?}");
    let note = missing.to_string();
    for part in [
        "accessing a/snap of VolumeSnapshot dataSource from b/new isn't allowed",
        "ReferenceGrant (gateway.networking.k8s.io/v1beta1) in namespace a",
        "{group: \"\", kind: PersistentVolumeClaim, namespace: b}",
        "{group: \"snapshot.storage.k8s.io\", kind: VolumeSnapshot, name: snap}",
    ] {
        assert!(note.contains(part), "{note} (want {part})");
    }
    assert_eq!(
        check(&wanted, true, Some(&[])),
        Err(AccessError::NotGranted(Box::new(wanted.clone())))
    );

    let no_crd = check(&wanted, true, None).unwrap_err();
    assert!(matches!(no_crd, AccessError::NoGrantCrd(_)), "{no_crd:?}");
    assert!(
        no_crd
            .to_string()
            .contains("install Gateway API's ReferenceGrant CRD")
    );

    assert_eq!(check(&wanted, true, Some(&[unrelated, good])), Ok(()));
    // The claim's own namespace needs neither flag nor grant.
    let own = Reference {
        namespace: "b".into(),
        ..wanted
    };
    assert_eq!(check(&own, false, None), Ok(()));
}
