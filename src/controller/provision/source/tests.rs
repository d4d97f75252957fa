use super::*;
use crate::controller::cached_claim::Claim;
use serde_json::json;

const DRIVER: &str = "d.example.com";

fn claim(size: &str, mode: Option<&str>, source: serde_json::Value) -> Claim {
    serde_json::from_value(json!({
        "metadata": { "name": "new", "namespace": "ns" },
        "spec": {
            "storageClassName": "c", "volumeMode": mode,
            "resources": { "requests": { "storage": size } },
            "dataSource": source,
        },
    }))
    .unwrap()
}

fn snapshot_source() -> serde_json::Value {
    json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "snap" })
}

fn snapshot(ready: bool, restore: &str) -> VolumeSnapshot {
    serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": { "name": "snap", "namespace": "ns", "uid": "s-1" },
        "spec": { "source": { "persistentVolumeClaimName": "old" } },
        "status": { "boundVolumeSnapshotContentName": "content", "readyToUse": ready, "restoreSize": restore },
    }))
    .unwrap()
}

fn content(driver: &str, mode: &str, annotations: serde_json::Value) -> VolumeSnapshotContent {
    serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": { "name": "content", "annotations": annotations },
        "spec": {
            "driver": driver, "deletionPolicy": "Delete", "sourceVolumeMode": mode,
            "volumeSnapshotRef": { "name": "snap", "namespace": "ns", "uid": "s-1" },
            "source": { "volumeHandle": "vol-1" },
        },
        "status": { "snapshotHandle": "snap-handle", "readyToUse": true },
    }))
    .unwrap()
}

fn restore(claim: &Claim, lookup: Lookup) -> Result<Option<VolumeSource>, ProvisionError> {
    let requested = requested(claim).unwrap();
    content_source(claim, DRIVER, &requested, &lookup)
}

fn found(snap: VolumeSnapshot, content: VolumeSnapshotContent) -> Lookup {
    Lookup::Snapshot {
        supported: true,
        snapshot: Some(Box::new(snap)),
        content: Some(Box::new(content)),
    }
}

/// A source that is not there; `supported`: whether the driver could
/// restore or clone at all.
fn no_snapshot(supported: bool) -> Lookup {
    Lookup::Snapshot {
        supported,
        snapshot: None,
        content: None,
    }
}

fn no_claim(supported: bool) -> Lookup {
    Lookup::Claim {
        supported,
        claim: None,
        pv: None,
    }
}

/// Each lookup is refused, in words that contain its case's.
fn assert_refused(claim: &Claim, cases: impl IntoIterator<Item = (Lookup, &'static str)>) {
    for (lookup, want) in cases {
        let got = refusal(restore(claim, lookup));
        assert!(got.contains(want), "{got} (want {want})");
    }
}

fn refusal(result: Result<Option<VolumeSource>, ProvisionError>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn a_ready_snapshot_of_the_driver_restores_by_its_handle() {
    let new = claim("1Gi", Some("Filesystem"), snapshot_source());
    let got = restore(
        &new,
        found(
            snapshot(true, "1Gi"),
            content(DRIVER, "Filesystem", json!({})),
        ),
    );
    assert_eq!(got, Ok(Some(VolumeSource::Snapshot("snap-handle".into()))));
}

#[test]
fn a_snapshot_that_cannot_be_restored_says_why() {
    let new = claim("1Gi", Some("Filesystem"), snapshot_source());
    let ours = || content(DRIVER, "Filesystem", json!({}));
    let cases = [
        (
            found(snapshot(false, "1Gi"), ours()),
            "snapshot snap is not Ready",
        ),
        (
            found(snapshot(true, "2Gi"), ours()),
            "is less than the size",
        ),
        (
            found(
                snapshot(true, "1Gi"),
                content("other.example.com", "Filesystem", json!({})),
            ),
            "is not handled by CSI driver d.example.com",
        ),
        (
            found(snapshot(true, "1Gi"), content(DRIVER, "Block", json!({}))),
            "modifies the mode of the source volume",
        ),
        (no_snapshot(true), "VolumeSnapshot snap does not exist"),
        (
            no_snapshot(false),
            "CREATE_DELETE_SNAPSHOT capability is not reported",
        ),
    ];
    assert_refused(&new, cases);
    let mut unbound = snapshot(true, "1Gi");
    unbound
        .status
        .as_mut()
        .unwrap()
        .bound_volume_snapshot_content_name = None;
    assert!(refusal(restore(&new, found(unbound, ours()))).contains("not bound"));
    let allowed = content(
        DRIVER,
        "Block",
        json!({ "snapshot.storage.kubernetes.io/allow-volume-mode-change": "true" }),
    );
    assert!(restore(&new, found(snapshot(true, "1Gi"), allowed)).is_ok());
    let wrong_group = claim(
        "1Gi",
        None,
        json!({ "kind": "VolumeSnapshot", "name": "snap" }),
    );
    let got = refusal(restore(&wrong_group, found(snapshot(true, "1Gi"), ours())));
    assert!(
        got.contains("must have apiGroup snapshot.storage.k8s.io"),
        "{got}"
    );
}

fn source_claim(size: &str, mode: &str, phase: &str) -> Claim {
    serde_json::from_value(json!({
        "metadata": { "name": "old", "namespace": "ns", "uid": "c-1" },
        "spec": {
            "storageClassName": "c", "volumeMode": mode, "volumeName": "pv-old",
            "resources": { "requests": { "storage": size } },
        },
        "status": { "phase": phase },
    }))
    .unwrap()
}

fn source_pv(driver: &str) -> Pv {
    serde_json::from_value(json!({
        "metadata": { "name": "pv-old" },
        "spec": {
            "csi": { "driver": driver, "volumeHandle": "vol-old" },
            "claimRef": { "name": "old", "namespace": "ns", "uid": "c-1" },
        },
        "status": { "phase": "Bound" },
    }))
    .unwrap()
}

fn cloning(source: Claim, pv: Pv) -> Lookup {
    Lookup::Claim {
        supported: true,
        claim: Some(Box::new(source)),
        pv: Some(Box::new(pv)),
    }
}

#[test]
fn a_bound_claim_of_the_driver_clones_by_its_volume_handle_and_others_say_why() {
    let new = claim(
        "1Gi",
        None,
        json!({ "kind": "PersistentVolumeClaim", "name": "old" }),
    );
    let got = restore(
        &new,
        cloning(
            source_claim("1Gi", "Filesystem", "Bound"),
            source_pv(DRIVER),
        ),
    );
    assert_eq!(got, Ok(Some(VolumeSource::Handle("vol-old".into()))));
    let cases = [
        (
            cloning(
                source_claim("1Gi", "Filesystem", "Pending"),
                source_pv(DRIVER),
            ),
            "must have a status of Bound",
        ),
        (
            cloning(
                source_claim("2Gi", "Filesystem", "Bound"),
                source_pv(DRIVER),
            ),
            "greater than or equal in size",
        ),
        (
            cloning(source_claim("1Gi", "Block", "Bound"), source_pv(DRIVER)),
            "same volume mode",
        ),
        (
            cloning(
                source_claim("1Gi", "Filesystem", "Bound"),
                source_pv("other.example.com"),
            ),
            "not bound or invalid",
        ),
        (no_claim(true), "does not exist"),
        (no_claim(false), "CLONE_VOLUME capability is not reported"),
    ];
    assert_refused(&new, cases);
}

#[test]
fn data_source_wins_over_ref_and_other_namespaces_and_kinds_are_told_apart() {
    let mut both = claim(
        "1Gi",
        None,
        json!({ "kind": "PersistentVolumeClaim", "name": "a" }),
    );
    both.spec.as_mut().unwrap().data_source_ref = Some(
        serde_json::from_value(json!({ "kind": "PersistentVolumeClaim", "name": "b" })).unwrap(),
    );
    assert_eq!(requested(&both).unwrap().name, "a");
    assert_eq!(requested(&both).unwrap().namespace, "ns");
    let mut elsewhere = claim("1Gi", None, serde_json::Value::Null);
    elsewhere.spec.as_mut().unwrap().data_source_ref = Some(
        serde_json::from_value(json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "s", "namespace": "other" })).unwrap(),
    );
    assert_eq!(requested(&elsewhere).unwrap().namespace, "other");
    // An empty namespace is the claim's own.
    elsewhere.spec.as_mut().unwrap().data_source_ref = Some(
        serde_json::from_value(json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "s", "namespace": "" })).unwrap(),
    );
    assert_eq!(requested(&elsewhere).unwrap().namespace, "ns");
    let populated = claim(
        "1Gi",
        None,
        json!({ "kind": "Backup", "apiGroup": "example.com", "name": "b" }),
    );
    assert!(left_to_populator(&populated));
    assert!(!left_to_populator(&claim("1Gi", None, snapshot_source())));
    assert!(!left_to_populator(&claim(
        "1Gi",
        None,
        serde_json::Value::Null
    )));
}

#[test]
fn a_granted_snapshot_of_another_namespace_restores_and_a_refused_one_says_why() {
    let mut new = claim("1Gi", Some("Filesystem"), serde_json::Value::Null);
    new.spec.as_mut().unwrap().data_source_ref = Some(
        serde_json::from_value(json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "snap", "namespace": "a" })).unwrap(),
    );
    let mut snap = snapshot(true, "1Gi");
    snap.metadata.namespace = Some("a".into());
    let mut bound = content(DRIVER, "Filesystem", json!({}));
    bound.spec.volume_snapshot_ref.namespace = Some("a".into());
    // The same checks as in the claim's namespace: the content must point
    // back at the snapshot where it is.
    assert_eq!(
        restore(&new, found(snap.clone(), bound)),
        Ok(Some(VolumeSource::Snapshot("snap-handle".into())))
    );
    let elsewhere = content(DRIVER, "Filesystem", json!({}));
    assert!(
        refusal(restore(&new, found(snap, elsewhere))).contains("bound to a different snapshot")
    );

    let requested = requested(&new).unwrap();
    let refused =
        grant::check(&grant::Reference::new(&new, &requested), true, Some(&[])).unwrap_err();
    let got = restore(&new, Lookup::Refused(refused.clone()));
    assert_eq!(got, Err(ProvisionError::CrossNamespaceSource(refused)));
    assert!(refusal(got).contains("accessing a/snap of VolumeSnapshot dataSource from ns/new"));
}
