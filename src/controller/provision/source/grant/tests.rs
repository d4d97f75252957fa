use super::*;
use serde_json::json;

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

fn grant(namespace: &str, from: serde_json::Value, to: serde_json::Value) -> ReferenceGrant {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": { "name": "g", "namespace": namespace },
        "spec": { "from": from, "to": to },
    }))
    .unwrap()
}

fn claims_of(namespace: &str) -> serde_json::Value {
    json!([{ "group": "", "kind": "PersistentVolumeClaim", "namespace": namespace }])
}

fn snapshots(name: Option<&str>) -> serde_json::Value {
    json!([{ "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name }])
}

#[test]
fn a_grant_matches_only_its_namespace_the_claims_namespace_and_the_source() {
    let cases = [
        (
            "matching",
            grant("a", claims_of("b"), snapshots(Some("snap"))),
            snapshot_ref(),
            true,
        ),
        (
            "no name: any snapshot",
            grant("a", claims_of("b"), snapshots(None)),
            snapshot_ref(),
            true,
        ),
        (
            "empty name: any snapshot",
            grant("a", claims_of("b"), snapshots(Some(""))),
            snapshot_ref(),
            true,
        ),
        (
            "another snapshot",
            grant("a", claims_of("b"), snapshots(Some("other"))),
            snapshot_ref(),
            false,
        ),
        (
            "claims of another namespace",
            grant("a", claims_of("c"), snapshots(None)),
            snapshot_ref(),
            false,
        ),
        (
            "grant in another namespace",
            grant("c", claims_of("b"), snapshots(None)),
            snapshot_ref(),
            false,
        ),
        (
            "from another kind",
            grant(
                "a",
                json!([{ "group": "", "kind": "Pod", "namespace": "b" }]),
                snapshots(None),
            ),
            snapshot_ref(),
            false,
        ),
        (
            "from a group",
            grant(
                "a",
                json!([{ "group": "example.com", "kind": "PersistentVolumeClaim", "namespace": "b" }]),
                snapshots(None),
            ),
            snapshot_ref(),
            false,
        ),
        (
            "to another kind",
            grant(
                "a",
                claims_of("b"),
                json!([{ "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshotContent" }]),
            ),
            snapshot_ref(),
            false,
        ),
        (
            "snapshot without its group",
            grant(
                "a",
                claims_of("b"),
                json!([{ "group": "", "kind": "VolumeSnapshot" }]),
            ),
            snapshot_ref(),
            false,
        ),
        (
            "claim in the core group",
            grant(
                "a",
                claims_of("b"),
                json!([{ "group": "", "kind": "PersistentVolumeClaim", "name": "old" }]),
            ),
            reference("", "PersistentVolumeClaim", "old"),
            true,
        ),
        (
            "claim given a group",
            grant(
                "a",
                claims_of("b"),
                json!([{ "group": "snapshot.storage.k8s.io", "kind": "PersistentVolumeClaim" }]),
            ),
            reference("", "PersistentVolumeClaim", "old"),
            false,
        ),
        (
            "one of several entries",
            grant(
                "a",
                json!([{ "group": "", "kind": "Pod", "namespace": "b" }, { "group": "", "kind": "PersistentVolumeClaim", "namespace": "b" }]),
                json!([{ "group": "", "kind": "Secret" }, { "group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap" }]),
            ),
            snapshot_ref(),
            true,
        ),
    ];
    for (case, grant, reference, want) in cases {
        assert_eq!(is_granted(&grant, &reference), want, "{case}");
    }
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
