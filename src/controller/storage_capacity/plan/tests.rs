use super::*;
use crate::crd::ConditionStatus;
use serde_json::json;

const GI: i64 = 1 << 30;

fn class(name: &str, provisioner: &str, params: &[(&str, &str)]) -> StorageClass {
    crate::testing::storage_class(name, provisioner, None, params)
}

fn node(name: &str, capacity: i64) -> StorageNode {
    crate::testing::storage_node(name, capacity)
}

fn with_condition(mut n: StorageNode, type_: &str, status: ConditionStatus) -> StorageNode {
    let condition = crate::testing::condition(type_, status, "Test", "test");
    n.status.as_mut().unwrap().conditions.push(condition);
    n
}

fn bytes_of(plan: &BTreeMap<String, Capacity>, class: &str, node: &str) -> Option<i64> {
    plan.get(&object_name(class, node)).map(|c| c.bytes)
}

#[test]
fn one_object_per_class_of_ours_and_reporting_node() {
    let classes = [
        class("ext4", local::DRIVER_NAME, &[]),
        class("theirs", "other.example.com", &[]),
    ];
    let nodes = [node("a", 4 * GI), node("b", GI)];
    let mut silent = node("c", GI);
    silent.status = None;
    let plan = plan(
        &classes.iter().collect::<Vec<_>>(),
        &[&nodes[0], &nodes[1], &silent],
        &BTreeMap::from([("a".to_string(), GI)]),
    );
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert_eq!(bytes_of(&plan, "ext4", "a"), Some(3 * GI));
    assert_eq!(bytes_of(&plan, "ext4", "b"), Some(GI));
    assert_eq!(bytes_of(&plan, "theirs", "a"), None);
    assert_eq!(bytes_of(&plan, "ext4", "c"), None, "never reported");
}

/// Class parameters, free bytes, the largest request that fits.
type Row = (&'static [(&'static str, &'static str)], i64, i64);

#[test]
fn what_a_class_can_get_follows_its_filesystem_minimum_and_whole_mib() {
    let rows: &[Row] = &[
        (&[], GI, GI),
        (&[], GI + 5, GI),
        (&[], 16 * MIB, 16 * MIB),
        (&[], 16 * MIB - 1, 0),
        (&[("fsType", "xfs")], 300 * MIB, 300 * MIB),
        (&[("fsType", "xfs")], 299 * MIB, 0),
        (&[("layout", "dir")], MIB, MIB),
        (&[("layout", "dir")], MIB - 1, 0),
        // Promised more than the node has now.
        (&[], -GI, 0),
        // Wrong parameters: the plain free space, so the claim is told.
        (&[("fsType", "zfs")], 17 * MIB + 3, 17 * MIB),
    ];
    for (params, free, want) in rows {
        let classes = [class("c", local::DRIVER_NAME, params)];
        let nodes = [node("n", *free)];
        let plan = plan(&[&classes[0]], &[&nodes[0]], &BTreeMap::new());
        assert_eq!(bytes_of(&plan, "c", "n"), Some(*want), "{params:?} {free}");
    }
}

#[test]
fn a_node_under_pressure_offers_nothing_and_a_silent_one_is_not_published() {
    let classes = [class("c", local::DRIVER_NAME, &[])];
    let pressured = with_condition(node("p", GI), "DiskPressure", ConditionStatus::True);
    let relieved = with_condition(node("r", GI), "DiskPressure", ConditionStatus::False);
    let silent = with_condition(node("s", GI), capacity::READY, ConditionStatus::False);
    let plan = plan(
        &[&classes[0]],
        &[&pressured, &relieved, &silent],
        &BTreeMap::new(),
    );
    assert_eq!(bytes_of(&plan, "c", "p"), Some(0));
    assert_eq!(bytes_of(&plan, "c", "r"), Some(GI));
    assert_eq!(bytes_of(&plan, "c", "s"), None);
}

#[test]
fn names_are_fixed_per_pair_and_valid() {
    let a = object_name("fast", "node-a");
    assert_eq!(a, object_name("fast", "node-a"));
    assert_ne!(a, object_name("fast", "node-b"));
    // The separator keeps ("ab", "c") apart from ("a", "bc").
    assert_ne!(object_name("ab", "c"), object_name("a", "bc"));
    assert!(a.len() <= 63 && a.starts_with("stowage-"), "{a}");
}

fn object(name: &str, capacity: &str, maximum: Option<&str>) -> CSIStorageCapacity {
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "ns" },
        "storageClassName": "c",
        "capacity": capacity,
        "maximumVolumeSize": maximum,
    }))
    .unwrap()
}

#[test]
fn diff_creates_updates_and_deletes_only_what_differs() {
    let want = |node: &str, bytes| {
        (
            object_name("c", node),
            Capacity::local("c".into(), node, bytes),
        )
    };
    let desired: BTreeMap<_, _> = [want("same", GI), want("changed", GI), want("new", GI)]
        .into_iter()
        .collect();
    let same = object(&object_name("c", "same"), "1Gi", Some("1024Mi"));
    let changed = object(&object_name("c", "changed"), "2Gi", Some("2Gi"));
    let no_maximum = object(&object_name("c", "changed"), "1Gi", None);
    let stale = object("stowage-gone", "1Gi", Some("1Gi"));
    let changes = diff(&desired, &[&same, &changed, &stale], |_| true);
    assert_eq!(
        changes,
        [
            Change::Update(
                desired_entry(&desired, "changed").0,
                desired_entry(&desired, "changed").1
            ),
            Change::Delete("stowage-gone".into()),
            Change::Create(
                desired_entry(&desired, "new").0,
                desired_entry(&desired, "new").1
            ),
        ]
    );
    let changes = diff(&desired, &[&same, &no_maximum], |_| true);
    assert!(matches!(&changes[0], Change::Update(n, _) if *n == object_name("c", "changed")));
    // An owner missing is put right too.
    let changes = diff(&desired, &[&same], |_| false);
    assert!(matches!(&changes[0], Change::Update(n, _) if *n == object_name("c", "same")));
}

fn desired_entry(desired: &BTreeMap<String, Capacity>, node: &str) -> (String, Capacity) {
    let name = object_name("c", node);
    (name.clone(), desired[&name].clone())
}
