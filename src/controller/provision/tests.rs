use super::*;
use crate::controller::cached_claim::Claim;
use crate::crd::{NODE_LABEL, VOLUME_FINALIZER};
use serde_json::json;

fn class(mode: &str, params: &[(&str, &str)]) -> StorageClass {
    crate::testing::storage_class("c", local::DRIVER_NAME, Some(mode), params)
}

fn claim(size: &str, modes: &[&str], selected: Option<&str>) -> Claim {
    let mut c: Claim = serde_json::from_value(json!({
        "metadata": { "name": "data", "namespace": "ns", "uid": "u1" },
        "spec": { "storageClassName": "c", "accessModes": modes,
                  "resources": { "requests": { "storage": size } } },
    }))
    .unwrap();
    if let Some(node) = selected {
        c.annotations = [(ANN_SELECTED_NODE.to_string(), node.to_string())].into();
    }
    c
}

fn node(name: &str, capacity: i64) -> StorageNode {
    crate::testing::storage_node(name, capacity)
}

fn plan_for(claim: &Claim, class: &StorageClass, nodes: &[&StorageNode]) -> Provision {
    plan(&ClaimView {
        claim,
        class: Some(class),
        volume: None,
        pv: None,
        storage_nodes: nodes,
        promised: &BTreeMap::new(),
        static_match: false,
        remote: false,
        serve_local: true,
        attributes_class: None,
        source: Default::default(),
        source_node: None,
        driver_nodes: Vec::new(),
    })
}

const GI: i64 = 1 << 30;

/// A `--csi-driver` class, registered in zones a and b (one node each).
fn remote_view<'a>(
    claim: &'a Claim,
    class: &'a StorageClass,
    driver_nodes: Vec<topology::DriverNode>,
) -> ClaimView<'a> {
    static NOTHING_PROMISED: BTreeMap<String, i64> = BTreeMap::new();
    ClaimView {
        claim,
        class: Some(class),
        volume: None,
        pv: None,
        storage_nodes: &[],
        promised: &NOTHING_PROMISED,
        static_match: false,
        remote: true,
        serve_local: true,
        attributes_class: None,
        source: Default::default(),
        source_node: None,
        driver_nodes,
    }
}

fn remote_class(mode: &str, params: &[(&str, &str)]) -> StorageClass {
    let mut class = class(mode, params);
    class.provisioner = "hostpath.csi.k8s.io".into();
    class
}

fn zones() -> Vec<topology::DriverNode> {
    ["a", "b"]
        .iter()
        .map(|z| topology::DriverNode {
            name: format!("node-{z}"),
            keys: vec!["zone".into()],
            labels: Some(BTreeMap::from([("zone".to_string(), z.to_string())])),
        })
        .collect()
}

fn zone(z: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("zone".to_string(), z.to_string())])
}

#[test]
fn immediate_remote_claims_ask_for_every_segment_the_driver_runs_in() {
    let mut class = remote_class("Immediate", &[]);
    class.mount_options = Some(vec!["noatime".into()]);
    let claim = claim("1Gi", &["ReadWriteOnce"], None);
    let Provision::CreateVolume(v) = plan(&remote_view(&claim, &class, zones())) else {
        panic!("expected a Volume")
    };
    assert_eq!(v.spec.driver, "hostpath.csi.k8s.io");
    assert_eq!(v.spec.requisite_topology, vec![zone("a"), zone("b")]);
    assert_eq!(v.spec.preferred_topology.len(), 2);
    assert_eq!(v.spec.mount_options, vec!["noatime".to_string()]);
    assert_eq!(v.spec.node, None);
}

#[test]
fn wait_for_first_consumer_remote_claims_prefer_the_schedulers_node() {
    let class = remote_class("WaitForFirstConsumer", &[]);
    let waiting = claim("1Gi", &["ReadWriteOnce"], None);
    assert_eq!(
        plan(&remote_view(&waiting, &class, zones())),
        Provision::WaitForConsumer
    );
    let claim = claim("1Gi", &["ReadWriteOnce"], Some("node-b"));
    let Provision::CreateVolume(v) = plan(&remote_view(&claim, &class, zones())) else {
        panic!("expected a Volume")
    };
    assert_eq!(v.spec.requisite_topology, vec![zone("a"), zone("b")]);
    assert_eq!(v.spec.preferred_topology, vec![zone("b"), zone("a")]);

    let elsewhere = self::claim("1Gi", &["ReadWriteOnce"], Some("node-c"));
    let Provision::Fail(e) = plan(&remote_view(&elsewhere, &class, zones())) else {
        panic!("expected a failure")
    };
    assert!(e.may_resolve_itself(), "{e}");
    assert!(e.to_string().contains("node-c"), "{e}");
}

#[test]
fn remote_classes_may_use_only_kubernetes_own_reserved_keys() {
    let class = remote_class("Immediate", &[("csi.storage.k8s.io/pvc/name", "x")]);
    let claim = claim("1Gi", &["ReadWriteOnce"], None);
    let Provision::Fail(e) = plan(&remote_view(&claim, &class, zones())) else {
        panic!("expected a failure")
    };
    assert_eq!(
        e,
        ProvisionError::ReservedParameter("csi.storage.k8s.io/pvc/name".into())
    );
    assert!(!e.may_resolve_itself());

    let class = remote_class(
        "Immediate",
        &[("csi.storage.k8s.io/fstype", "xfs"), ("fsType", "ext4")],
    );
    let Provision::Fail(e) = plan(&remote_view(&claim, &class, zones())) else {
        panic!("expected a failure")
    };
    assert!(matches!(e, ProvisionError::FsTypeTwice(_)), "{e}");
}

#[test]
fn immediate_picks_the_node_with_most_room() {
    let (a, b) = (node("a", GI), node("b", 4 * GI));
    let Provision::CreateVolume(v) = plan_for(
        &claim("1Gi", &["ReadWriteOnce"], None),
        &class("Immediate", &[]),
        &[&a, &b],
    ) else {
        panic!("expected a Volume")
    };
    assert_eq!(v.name_any(), "pvc-u1");
    assert_eq!(v.spec.node.as_deref(), Some("b"));
    assert_eq!(v.spec.capacity_bytes, GI);
    assert_eq!(v.labels()[NODE_LABEL], "b");
    assert!(v.finalizers().contains(&VOLUME_FINALIZER.to_string()));
}

#[test]
fn wait_for_first_consumer_waits_for_the_scheduler_then_uses_its_node() {
    let (a, b) = (node("a", 4 * GI), node("b", 4 * GI));
    let wffc = class("WaitForFirstConsumer", &[]);
    assert_eq!(
        plan_for(&claim("1Gi", &["ReadWriteOnce"], None), &wffc, &[&a, &b]),
        Provision::WaitForConsumer
    );
    let Provision::CreateVolume(v) = plan_for(
        &claim("1Gi", &["ReadWriteOnce"], Some("a")),
        &wffc,
        &[&a, &b],
    ) else {
        panic!("expected a Volume")
    };
    assert_eq!(v.spec.node.as_deref(), Some("a"));
}

#[test]
fn bad_requests_fail_with_what_to_change() {
    let a = node("a", GI);
    let imm = class("Immediate", &[]);
    let cases = [
        (
            claim("0", &["ReadWriteOnce"], None),
            ProvisionError::ZeroSize,
        ),
        (
            claim("1Gi", &["ReadWriteMany"], None),
            ProvisionError::AccessMode("ReadWriteMany".into()),
        ),
        (
            claim("1Gi", &["ReadOnlyMany"], None),
            ProvisionError::AccessMode("ReadOnlyMany".into()),
        ),
    ];
    for (c, expected) in cases {
        assert_eq!(plan_for(&c, &imm, &[&a]), Provision::Fail(expected));
    }
    let Provision::Fail(e) = plan_for(&claim("2Gi", &["ReadWriteOnce"], None), &imm, &[&a]) else {
        panic!()
    };
    assert!(
        matches!(e, ProvisionError::NoRoom { .. }) && e.may_resolve_itself(),
        "{e}"
    );
    assert_eq!(
        plan_for(&claim("1Gi", &["ReadWriteOnce"], None), &imm, &[]),
        Provision::Fail(ProvisionError::NoNodes)
    );
    let bad = class("Immediate", &[("fsType", "btrfs")]);
    assert!(matches!(
        plan_for(&claim("1Gi", &["ReadWriteOnce"], None), &bad, &[&a]),
        Provision::Fail(ProvisionError::Parameters(_))
    ));
}

#[test]
fn other_provisioners_and_bound_claims_are_skipped() {
    let a = node("a", GI);
    let mut other = class("Immediate", &[]);
    other.provisioner = "ebs.csi.aws.com".into();
    assert_eq!(
        plan_for(&claim("1Gi", &["ReadWriteOnce"], None), &other, &[&a]),
        Provision::Skip
    );
    let mut bound = claim("1Gi", &["ReadWriteOnce"], None);
    bound.spec.as_mut().unwrap().volume_name = Some("pv-1".into());
    assert_eq!(
        plan_for(&bound, &class("Immediate", &[]), &[&a]),
        Provision::Skip
    );
}

fn under_pressure(mut n: StorageNode) -> StorageNode {
    let status = n.status.as_mut().unwrap();
    status.conditions = vec![crate::testing::condition(
        crate::crd::DISK_PRESSURE,
        crate::crd::ConditionStatus::True,
        "FreeSpaceBelowReserve",
        "the data filesystem has 5 bytes free",
    )];
    n
}

#[test]
fn no_new_volume_lands_on_a_node_under_disk_pressure() {
    let roomy = under_pressure(node("roomy", 100 * GI));
    let small = node("small", 2 * GI);
    let immediate = class("Immediate", &[]);
    let one = claim("1Gi", &["ReadWriteOnce"], None);
    let Provision::CreateVolume(v) = plan_for(&one, &immediate, &[&roomy, &small]) else {
        panic!("expected a Volume")
    };
    assert_eq!(
        v.spec.node.as_deref(),
        Some("small"),
        "the roomier node is full"
    );
    // Room elsewhere too small: it is the room that is missing.
    let three = claim("3Gi", &["ReadWriteOnce"], None);
    assert!(matches!(
        plan_for(&three, &immediate, &[&roomy, &small]),
        Provision::Fail(ProvisionError::NoRoom { node, .. }) if node == "small"
    ));
    // Every node under pressure: that is what the event says.
    let small = under_pressure(small);
    let Provision::Fail(e) = plan_for(&one, &immediate, &[&small, &roomy]) else {
        panic!("expected a failure")
    };
    assert!(
        matches!(&e, ProvisionError::AllUnderDiskPressure { nodes, first, .. }
        if nodes == "roomy, small" && first == "roomy"),
        "{e:?}"
    );
    assert!(e.to_string().contains("5 bytes free"), "{e}");
    assert!(e.may_resolve_itself());
    // The scheduler's choice is refused, saying why.
    let wffc = class("WaitForFirstConsumer", &[]);
    let Provision::Fail(e) = plan_for(
        &claim("1Gi", &["ReadWriteOnce"], Some("roomy")),
        &wffc,
        &[&roomy],
    ) else {
        panic!("expected a failure")
    };
    assert!(
        matches!(&e, ProvisionError::DiskPressure { node, .. } if node == "roomy"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("5 bytes free") && e.to_string().contains("roomy"),
        "{e}"
    );
}

fn snapshot_lookup(driver: &str, handle: &str) -> source::Lookup {
    let snapshot = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": { "name": "s", "namespace": "ns", "uid": "s-1" },
        "spec": { "source": {} },
        "status": { "boundVolumeSnapshotContentName": "sc", "readyToUse": true },
    }))
    .unwrap();
    let content = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": { "name": "sc" },
        "spec": { "driver": driver, "deletionPolicy": "Delete",
                  "volumeSnapshotRef": { "name": "s", "namespace": "ns", "uid": "s-1" },
                  "source": { "volumeHandle": "v" } },
        "status": { "snapshotHandle": handle, "readyToUse": true },
    }))
    .unwrap();
    source::Lookup::Snapshot {
        supported: true,
        snapshot: Some(Box::new(snapshot)),
        content: Some(Box::new(content)),
    }
}

/// A 1Gi claim restoring VolumeSnapshot `s`.
fn restoring() -> Claim {
    let mut restored = claim("1Gi", &["ReadWriteOnce"], None);
    restored.spec.as_mut().unwrap().data_source = Some(
        serde_json::from_value(
            json!({ "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "s" }),
        )
        .unwrap(),
    );
    restored
}

#[test]
fn a_local_restore_is_made_on_the_snapshots_node_or_says_where_it_must_run() {
    let restored = restoring();
    let (a, b) = (node("a", 4 * GI), node("b", 8 * GI));
    let nodes = [&a, &b];
    let nothing = BTreeMap::new();
    let immediate = class("Immediate", &[]);
    let view = |claim| ClaimView {
        claim,
        class: Some(&immediate),
        volume: None,
        pv: None,
        storage_nodes: &nodes,
        promised: &nothing,
        static_match: false,
        remote: false,
        serve_local: true,
        attributes_class: None,
        source: snapshot_lookup(local::DRIVER_NAME, "snapshot-s-1"),
        source_node: Some("a".into()),
        driver_nodes: Vec::new(),
    };
    let Provision::CreateVolume(volume) = plan(&view(&restored)) else {
        panic!("{:?}", plan(&view(&restored)));
    };
    // On the snapshot's node, though b has more room.
    assert_eq!(volume.spec.node.as_deref(), Some("a"));
    assert_eq!(
        volume.spec.source,
        Some(crate::crd::VolumeSource::Volume("snapshot-s-1".into()))
    );
    let mut elsewhere = restored.clone();
    elsewhere.annotations = [(ANN_SELECTED_NODE.to_string(), "b".to_string())].into();
    let wffc = class("WaitForFirstConsumer", &[]);
    let mut wffc_view = view(&elsewhere);
    wffc_view.class = Some(&wffc);
    let Provision::Fail(e) = plan(&wffc_view) else {
        panic!("{:?}", plan(&wffc_view));
    };
    assert!(e.to_string().contains("nodeAffinity for a"), "{e}");
}

#[test]
fn data_sources_restore_through_drivers_and_are_left_to_populators() {
    let restored = restoring();
    let remote = remote_class("Immediate", &[]);
    let mut view = remote_view(&restored, &remote, zones());
    view.source = snapshot_lookup("hostpath.csi.k8s.io", "snap-1");
    let Provision::CreateVolume(volume) = plan(&view) else {
        panic!("{:?}", plan(&view));
    };
    assert_eq!(
        volume.spec.source,
        Some(crate::crd::VolumeSource::Snapshot("snap-1".into()))
    );

    let mut populated = claim("1Gi", &["ReadWriteOnce"], None);
    populated.spec.as_mut().unwrap().data_source_ref = Some(
        serde_json::from_value(json!({ "kind": "Backup", "apiGroup": "example.com", "name": "b" }))
            .unwrap(),
    );
    assert_eq!(
        plan(&remote_view(&populated, &remote, zones())),
        Provision::LeftToPopulator
    );
}

#[test]
fn a_source_in_another_namespace_refused_fails_whatever_its_kind() {
    let mut populated = claim("1Gi", &["ReadWriteOnce"], None);
    populated.spec.as_mut().unwrap().data_source_ref = Some(
        serde_json::from_value(
            json!({ "kind": "Backup", "apiGroup": "example.com", "name": "b", "namespace": "a" }),
        )
        .unwrap(),
    );
    let requested = source::requested(&populated).unwrap();
    let reference = source::grant::Reference::new(&populated, &requested);
    let refused = source::grant::check(&reference, false, None).unwrap_err();
    let remote = remote_class("Immediate", &[]);
    let mut view = remote_view(&populated, &remote, zones());
    view.source = source::Lookup::Refused(refused.clone());
    assert_eq!(
        plan(&view),
        Provision::Fail(ProvisionError::CrossNamespaceSource(refused))
    );
    // Granted (nothing refused): the populator's, as in the claim's namespace.
    view.source = source::Lookup::Nothing;
    assert_eq!(plan(&view), Provision::LeftToPopulator);
}

/// A `--csi-driver` Volume for claim() that its driver created with `status`.
fn created_remote(status: serde_json::Value) -> Volume {
    serde_json::from_value(json!({
        "metadata": { "name": "pvc-u1" },
        "spec": { "driver": "hostpath.csi.k8s.io", "capacityBytes": GI,
                  "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                  "reclaimPolicy": "Delete" },
        "status": status,
    }))
    .unwrap()
}

fn affinity_terms(pv: &PersistentVolume) -> serde_json::Value {
    serde_json::to_value(pv.spec.as_ref().unwrap().node_affinity.as_ref()).unwrap()
        ["required"]["nodeSelectorTerms"]
        .clone()
}

#[test]
fn a_volume_accessible_from_several_segments_may_be_used_from_any_of_them() {
    let claim = claim("1Gi", &["ReadWriteOnce"], None);
    let class = remote_class("Immediate", &[]);
    let term = |z: &str| json!({ "matchExpressions": [{ "key": "zone", "operator": "In", "values": [z] }] });

    let both = created_remote(json!({
        "phase": "Ready", "volumeHandle": "h1", "topology": { "zone": "a" },
        "accessibleTopology": [{ "zone": "a" }, { "zone": "b" }, {}],
    }));
    let pv = desired_pv(&claim, &class, &both);
    assert_eq!(affinity_terms(&pv), json!([term("a"), term("b")]));

    // Written by a version that recorded the first segment only.
    let before = created_remote(json!({
        "phase": "Ready", "volumeHandle": "h1", "topology": { "zone": "b" },
    }));
    assert_eq!(
        affinity_terms(&desired_pv(&claim, &class, &before)),
        json!([term("b")])
    );

    let anywhere = created_remote(json!({ "phase": "Ready", "volumeHandle": "h1" }));
    assert_eq!(
        desired_pv(&claim, &class, &anywhere)
            .spec
            .unwrap()
            .node_affinity,
        None
    );
}
