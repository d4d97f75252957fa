use super::*;
use crate::crd::VolumeSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn node(name: &str, reported_secs_ago: Option<i64>, now: Timestamp) -> StorageNode {
    let mut n = crate::testing::storage_node(name, 1);
    n.status.as_mut().unwrap().heartbeat_time = reported_secs_ago.map(|s| {
        Time(
            now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                .unwrap(),
        )
    });
    n
}

#[test]
fn a_node_is_silent_once_its_last_report_is_older_than_the_timeout() {
    let now = Timestamp::now();
    let timeout = Duration::from_secs(120);
    let fresh = node("fresh", Some(30), now);
    let late = node("late", Some(121), now);
    let never = node("never", None, now);
    let mut theirs = node("theirs", Some(500), now);
    theirs.spec.driver = "other.example.com".into();
    let silent = silent_nodes(&[&fresh, &late, &never, &theirs], now, timeout);
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0].node, "late");
    assert!(
        silent[0].message.contains("121s ago") && silent[0].message.contains("120s"),
        "{}",
        silent[0].message
    );
}

#[test]
fn a_node_already_marked_is_not_marked_again() {
    let now = Timestamp::now();
    let mut late = node("late", Some(600), now);
    let expired = ConditionStatus::False;
    let marked = crate::testing::condition(READY, expired, REASON_HEARTBEAT_EXPIRED, "silent");
    late.status.as_mut().unwrap().conditions.push(marked);
    assert!(silent_nodes(&[&late], now, Duration::from_secs(120)).is_empty());
}

fn volume(name: &str, node: Option<&str>) -> Volume {
    Volume::new(
        name,
        VolumeSpec {
            node: node.map(String::from),
            ..serde_json::from_value(serde_json::json!({
                "driver": local::DRIVER_NAME, "capacityBytes": 1, "accessModes": [],
            }))
            .unwrap()
        },
    )
}

#[test]
fn volumes_of_deleted_nodes_are_reported_once() {
    let on_gone = volume("on-gone", Some("gone"));
    let on_live = volume("on-live", Some("live"));
    let remote = volume("remote", None);
    let volumes = [&on_gone, &on_live, &remote];
    let exists = |n: &str| n == "live";
    let mut reported = HashSet::new();
    let found: Vec<_> = on_gone_nodes(&volumes, exists, &reported)
        .iter()
        .map(|v| v.name_any())
        .collect();
    assert_eq!(found, ["on-gone"]);
    reported.insert("on-gone".to_string());
    assert!(on_gone_nodes(&volumes, exists, &reported).is_empty());
}
