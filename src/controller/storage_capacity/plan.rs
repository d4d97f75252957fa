//! What the CSIStorageCapacity objects should say, decided from classes,
//! StorageNodes and promises alone; and what to change to get there from
//! the objects that exist.

use std::collections::BTreeMap;

use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::ResourceExt;

use super::super::capacity;
use crate::backend::local::{self, Parameters};
use crate::crd::StorageNode;
use crate::quantity::parse_bytes;

const MIB: i64 = 1 << 20;

/// One (class, topology segment) pair as the scheduler should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub class: String,
    /// The object's `nodeTopology.matchLabels`: for local volumes the node
    /// label every local PV's affinity names; for a driver, its segment.
    pub topology: BTreeMap<String, String>,
    /// Bytes volumes of the class can still get there (`capacity`).
    pub bytes: i64,
    /// The largest one volume can be (`maximumVolumeSize`), when known.
    pub maximum: Option<i64>,
}

impl Capacity {
    /// A node's room for a local class: the whole of it fits one volume.
    pub fn local(class: String, node: &str, bytes: i64) -> Self {
        Capacity {
            class,
            topology: BTreeMap::from([(local::TOPOLOGY_KEY.to_string(), node.to_string())]),
            bytes,
            maximum: Some(bytes),
        }
    }
}

/// What to do to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create(String, Capacity),
    /// Its figure (or owner) is not what it should be.
    Update(String, Capacity),
    /// Its class or node is gone, or the node's agent went silent.
    Delete(String),
}

/// The object's name for a (class, node) pair: fixed, so that a pass
/// repeated before the cache saw its own creations never makes a second
/// one; hashed, because class and node names together can be longer than
/// a name may be.
pub fn object_name(class: &str, node: &str) -> String {
    name_of(&[class, node])
}

/// The name for `parts`, each kept apart from the next by a NUL.
pub fn name_of(parts: &[&str]) -> String {
    // FNV-1a: stable across builds and releases, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let separator = (i > 0).then_some(0u8);
        for byte in separator.into_iter().chain(part.bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("stowage-{hash:016x}")
}

/// The largest request a volume of a class with `params` can be made
/// from in `free` bytes. Requests are rounded up to whole MiB and to the
/// filesystem's minimum (`Parameters::allocated_bytes`): so a whole number
/// of MiB fits exactly, and nothing fits below the minimum.
pub fn largest_request(params: &Parameters, free: i64) -> i64 {
    let whole = free.max(0) / MIB * MIB;
    if whole > 0 && params.allocated_bytes(whole) <= free {
        whole
    } else {
        0
    }
}

/// One Capacity per class of our driver and node whose agent reports and
/// is not silent. A node under disk pressure offers 0; a class whose
/// parameters are wrong is offered the plain free space, so that the
/// scheduler still picks a node and the claim hears what is wrong.
pub fn plan(
    classes: &[&StorageClass],
    nodes: &[&StorageNode],
    promised: &BTreeMap<String, i64>,
) -> BTreeMap<String, Capacity> {
    let nodes: Vec<&StorageNode> = nodes
        .iter()
        .copied()
        .filter(|n| n.spec.driver == local::DRIVER_NAME && n.status.is_some())
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| capacity::not_ready(n).is_none())
        .collect();
    let free: BTreeMap<String, i64> = capacity::free_bytes(&nodes, promised).into_iter().collect();
    let mut out = BTreeMap::new();
    for class in classes {
        if class.provisioner != local::DRIVER_NAME || class.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let params =
            Parameters::parse(&class.parameters.clone().unwrap_or_default()).unwrap_or_default();
        for node in &nodes {
            let name = &node.spec.node;
            let room = if capacity::pressure(node).is_some() {
                0
            } else {
                free.get(name).copied().unwrap_or(0)
            };
            let class_name = class.name_any();
            out.insert(
                object_name(&class_name, name),
                Capacity::local(class_name, name, largest_request(&params, room)),
            );
        }
    }
    out
}

/// The changes that turn `existing` (our objects, by name) into `desired`.
/// `owned` says whether an object already carries the owner it should.
pub fn diff(
    desired: &BTreeMap<String, Capacity>,
    existing: &[&CSIStorageCapacity],
    owned: impl Fn(&CSIStorageCapacity) -> bool,
) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for object in existing {
        let name = object.name_any();
        match desired.get(&name) {
            None => changes.push(Change::Delete(name)),
            Some(want) => {
                seen.insert(name.clone());
                if published_bytes(object) != (Some(want.bytes), want.maximum) || !owned(object) {
                    changes.push(Change::Update(name, want.clone()));
                }
            }
        }
    }
    for (name, want) in desired {
        if !seen.contains(name) {
            changes.push(Change::Create(name.clone(), want.clone()));
        }
    }
    changes
}

/// (capacity, maximumVolumeSize) in bytes, compared as numbers: the API
/// server may write a quantity in another form than we sent.
fn published_bytes(object: &CSIStorageCapacity) -> (Option<i64>, Option<i64>) {
    let bytes = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        q.and_then(|q| parse_bytes(&q.0).ok())
    };
    (
        bytes(object.capacity.as_ref()),
        bytes(object.maximum_volume_size.as_ref()),
    )
}

#[cfg(test)]
mod tests;
