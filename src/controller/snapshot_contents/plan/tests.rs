use super::*;
use serde_json::json;

fn content(extra: serde_json::Value) -> VolumeSnapshotContent {
    let mut base = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": { "name": "snapcontent-1" },
        "spec": {
            "driver": "d.example.com", "deletionPolicy": "Delete",
            "volumeSnapshotRef": { "name": "s", "namespace": "ns", "uid": "u-1" },
            "source": { "volumeHandle": "vol-1" },
            "volumeSnapshotClassName": "c",
        },
    });
    merge(&mut base, extra);
    serde_json::from_value(base).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(&k);
                } else {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn deleting() -> serde_json::Value {
    json!({ "metadata": {
        "deletionTimestamp": "2026-01-01T00:00:00Z",
        "finalizers": [CONTENT_FINALIZER],
        "annotations": { ANN_BEING_DELETED: "yes" },
    }})
}

#[test]
fn a_dynamic_content_is_cut_until_ready_then_left_alone() {
    let fresh = content(json!({}));
    let create = Step::Create {
        volume_handle: "vol-1".into(),
    };
    assert_eq!(plan(&fresh), create);
    assert_eq!(snapshot_name(&fresh).as_deref(), Some("snapshot-u-1"));
    let pending = content(json!({ "status": { "snapshotHandle": "h", "readyToUse": false } }));
    assert_eq!(plan(&pending), create, "polled by CreateSnapshot again");
    let ready = content(json!({ "status": { "snapshotHandle": "h", "readyToUse": true } }));
    assert_eq!(plan(&ready), Step::Nothing);
    let settling = content(json!({
        "metadata": { "annotations": { ANN_BEING_CREATED: "yes" } },
        "status": { "snapshotHandle": "h", "readyToUse": true },
    }));
    assert_eq!(plan(&settling), Step::Settle);
    let unbound = content(json!({ "spec": { "volumeSnapshotRef": { "uid": "" } } }));
    assert_eq!(snapshot_name(&unbound), None);
}

#[test]
fn a_pre_provisioned_content_is_checked_and_a_group_member_is_not_ours() {
    let static_one = content(
        json!({ "spec": { "source": { "volumeHandle": null, "snapshotHandle": "snap-9" } } }),
    );
    assert_eq!(
        plan(&static_one),
        Step::Check {
            snapshot_handle: "snap-9".into()
        }
    );
    let member = content(json!({ "metadata": { "annotations": { ANN_GROUP_HANDLE: "g" } } }));
    assert_eq!(plan(&member), Step::Nothing);
    let neither = content(json!({ "spec": { "source": { "volumeHandle": null } } }));
    assert_eq!(plan(&neither), Step::Nothing);
}

#[test]
fn deletion_waits_for_snapshot_controller_and_for_a_cut_in_flight() {
    let mut going = deleting();
    merge(
        &mut going,
        json!({ "status": { "snapshotHandle": "h", "readyToUse": true } }),
    );
    assert_eq!(
        plan(&content(going.clone())),
        Step::Delete {
            snapshot_handle: Some("h".into()),
            finalizer: true
        }
    );
    let mut retained = going.clone();
    merge(
        &mut retained,
        json!({ "spec": { "deletionPolicy": "Retain" } }),
    );
    assert_eq!(
        plan(&content(retained)),
        Step::Delete {
            snapshot_handle: None,
            finalizer: true
        }
    );
    // Without snapshot-controller's word, or while a cut may be in
    // flight, nothing is deleted.
    let mut unannounced = going.clone();
    merge(
        &mut unannounced,
        json!({ "metadata": { "annotations": { ANN_BEING_DELETED: null } } }),
    );
    let unannounced = content(unannounced);
    assert!(!matches!(plan(&unannounced), Step::Delete { .. }));
    let mut in_flight = going;
    merge(
        &mut in_flight,
        json!({ "metadata": { "annotations": { ANN_BEING_CREATED: "yes" } } }),
    );
    assert!(!matches!(plan(&content(in_flight)), Step::Delete { .. }));
    // A pre-provisioned content bound to nothing goes at once.
    let unbound = content(json!({
        "metadata": { "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER] },
        "spec": { "source": { "volumeHandle": null, "snapshotHandle": "s" }, "volumeSnapshotRef": { "uid": "" } },
    }));
    assert_eq!(
        plan(&unbound),
        Step::Delete {
            snapshot_handle: None,
            finalizer: true
        }
    );
}

#[test]
fn status_fills_in_never_overwrites_and_clears_the_error_when_ready() {
    let cut = Snapshot {
        id: "h".into(),
        size_bytes: 1 << 30,
        creation_time_ns: 5,
        ready: false,
    };
    let first = status_after(None, &cut).unwrap();
    assert_eq!(first.snapshot_handle.as_deref(), Some("h"));
    assert_eq!(first.restore_size, Some(1 << 30));
    assert_eq!(first.ready_to_use, Some(false));
    assert_eq!(status_after(Some(&first), &cut), None, "nothing changed");
    let mut failed = first.clone();
    failed.error = Some(crate::snapshot_api::SnapshotError {
        time: None,
        message: Some("boom".into()),
    });
    let later = Snapshot {
        id: "other".into(),
        size_bytes: 0,
        creation_time_ns: 9,
        ready: true,
    };
    let ready = status_after(Some(&failed), &later).unwrap();
    assert_eq!(ready.snapshot_handle.as_deref(), Some("h"));
    assert_eq!(ready.creation_time, Some(5));
    assert_eq!(ready.restore_size, Some(1 << 30));
    assert_eq!(ready.error, None);
    assert_eq!(ready.ready_to_use, Some(true));
}

#[test]
fn reserved_class_parameters_are_stripped_or_refused() {
    let params: BTreeMap<String, String> = [
        ("tier", "gold"),
        ("csi.storage.k8s.io/snapshotter-secret-name", "s"),
        ("csi.storage.k8s.io/snapshotter-secret-namespace", "ns"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let got = driver_parameters(&params).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), ["tier"]);
    let mut wrong = params;
    wrong.insert("csi.storage.k8s.io/fstype".into(), "ext4".into());
    let error = driver_parameters(&wrong).unwrap_err();
    assert!(
        error.contains("csi.storage.k8s.io/fstype") && error.contains("remove it"),
        "{error}"
    );
}
