//! Capacity of `--csi-driver` drivers that offer GET_CAPACITY, as
//! external-provisioner's central capacity controller publishes it: one
//! object per WaitForFirstConsumer class of the driver and topology
//! segment, the segments being the distinct values of the topology keys
//! each CSINode registered for the driver, read from its Node's labels
//! (a node without all of them is skipped until they appear; a driver
//! without topology has one segment, empty, matching every node).
//!
//! Immediate classes get none, as upstream without
//! `--capacity-for-immediate-binding`: the scheduler consults capacity
//! only for claims that wait for their pod, and each object costs a
//! GetCapacity call per pass.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;

use super::plan::{Capacity, name_of};
use crate::backend::csi_proxy::{CsiDriver, ProxyError};
use crate::controller::protocol::BINDING_WAIT_FOR_FIRST_CONSUMER;
use crate::controller::provision::topology::{DriverNode, Segment, segment_of};

/// One GetCapacity to ask: a class of the driver in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The object's name.
    pub name: String,
    pub class: String,
    pub parameters: BTreeMap<String, String>,
    pub segment: Segment,
}

/// The distinct segments of the nodes where the driver registered.
pub fn segments(nodes: &[DriverNode]) -> BTreeSet<Segment> {
    nodes
        .iter()
        .filter_map(|n| segment_of(n.labels.as_ref()?, &n.keys))
        .collect()
}

/// What to ask `driver` for: each of its WaitForFirstConsumer classes
/// (not being deleted) in each segment.
pub fn items(driver: &str, classes: &[&StorageClass], segments: &BTreeSet<Segment>) -> Vec<Item> {
    let mut out = Vec::new();
    for class in classes {
        let waits = class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
        if class.provisioner != driver || !waits || class.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let class_name = class.name_any();
        for segment in segments {
            out.push(Item {
                name: object_name(driver, &class_name, segment),
                class: class_name.clone(),
                parameters: class.parameters.clone().unwrap_or_default(),
                segment: segment.clone(),
            });
        }
    }
    out
}

/// Fixed per (driver, class, segment), apart from every local name (those
/// hash two parts, these at least three: names hold no NUL).
pub fn object_name(driver: &str, class: &str, segment: &Segment) -> String {
    let mut parts = vec!["csi", driver, class];
    for (key, value) in segment {
        parts.push(key);
        parts.push(value);
    }
    name_of(&parts)
}

/// What the driver's objects should say, by name, and the names whose
/// figure could not be learnt this time (their objects are left as they
/// are, as upstream keeps an object whose refresh failed), with the first
/// error met.
#[derive(Debug, Default)]
pub struct Asked {
    pub desired: BTreeMap<String, Capacity>,
    pub unknown: BTreeSet<String>,
    pub error: Option<ProxyError>,
}

/// Asks GetCapacity for each item, one after the other (a driver's
/// controller is often single-threaded; upstream's workers are few).
pub async fn ask(driver: &CsiDriver, items: Vec<Item>) -> Asked {
    let mut asked = Asked::default();
    for item in items {
        match driver.get_capacity(&item.parameters, &item.segment).await {
            Ok(room) => {
                asked.desired.insert(
                    item.name,
                    Capacity {
                        class: item.class,
                        topology: item.segment,
                        bytes: room.available_bytes,
                        maximum: room.maximum_volume_bytes,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(driver = %driver.name, class = %item.class, segment = ?item.segment, error = %e, "GetCapacity failed; the published figure is kept");
                asked.unknown.insert(item.name);
                asked.error.get_or_insert(e);
            }
        }
    }
    asked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, provisioner: &str, mode: &str) -> StorageClass {
        crate::testing::storage_class(name, provisioner, Some(mode), &[("pool", name)])
    }

    fn node(name: &str, keys: &[&str], labels: Option<&[(&str, &str)]>) -> DriverNode {
        DriverNode {
            name: name.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            labels: labels.map(|l| {
                l.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
        }
    }

    fn segment(pairs: &[(&str, &str)]) -> Segment {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn segments_are_distinct_and_need_every_key_labelled() {
        let zone = "example.com/zone";
        let nodes = [
            node("a1", &[zone], Some(&[(zone, "a"), ("other", "x")])),
            node("a2", &[zone], Some(&[(zone, "a")])),
            node("b1", &[zone], Some(&[(zone, "b")])),
            node("unlabelled", &[zone], Some(&[])),
            node("no-node-object", &[zone], None),
        ];
        let got = segments(&nodes);
        assert_eq!(
            got,
            BTreeSet::from([segment(&[(zone, "a")]), segment(&[(zone, "b")])])
        );
        // A driver without topology: one segment that matches everything.
        let flat = segments(&[node("n", &[], Some(&[("any", "label")]))]);
        assert_eq!(flat, BTreeSet::from([Segment::new()]));
    }

    #[test]
    fn only_the_drivers_waiting_classes_are_asked_in_each_segment() {
        let classes = [
            class("late", "d.example.com", BINDING_WAIT_FOR_FIRST_CONSUMER),
            class("now", "d.example.com", "Immediate"),
            class(
                "theirs",
                "other.example.com",
                BINDING_WAIT_FOR_FIRST_CONSUMER,
            ),
        ];
        let mut going = class("going", "d.example.com", BINDING_WAIT_FOR_FIRST_CONSUMER);
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let segments = BTreeSet::from([segment(&[("z", "a")]), segment(&[("z", "b")])]);
        let all: Vec<_> = classes.iter().chain([&going]).collect();
        let got = items("d.example.com", &all, &segments);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|i| i.class == "late"));
        assert_eq!(got[0].parameters["pool"], "late");
        assert_eq!(got[0].segment, segment(&[("z", "a")]));
        assert_ne!(got[0].name, got[1].name);
    }

    #[test]
    fn names_differ_per_driver_class_and_segment_and_from_local_ones() {
        let a = segment(&[("z", "a")]);
        let name = object_name("d", "c", &a);
        assert_eq!(name, object_name("d", "c", &a));
        assert_ne!(name, object_name("e", "c", &a));
        assert_ne!(name, object_name("d", "c2", &a));
        assert_ne!(name, object_name("d", "c", &segment(&[("z", "b")])));
        assert_ne!(
            object_name("d", "c", &Segment::new()),
            super::super::plan::object_name("d", "c")
        );
        assert!(name.len() <= 63, "{name}");
    }
}
