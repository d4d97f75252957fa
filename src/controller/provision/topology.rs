//! Where a `--csi-driver` volume may go (CreateVolume's requisite
//! topology) and where it had better go (preferred), computed as
//! external-provisioner v6 computes them with its defaults
//! (`--strict-topology=false`, `--immediate-topology=true`), so that a
//! driver sees the same request from either.
//!
//! `requirement` is pure; `driver_nodes` reads what it needs from the
//! caches: each CSINode's topology keys for the driver, valued by its
//! Node's labels.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::TopologySelectorTerm;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::controller::context::Stores;

/// A topology segment: key → value.
pub type Segment = BTreeMap<String, String>;

/// A node whose CSINode lists the driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverNode {
    pub name: String,
    /// The topology keys the driver registered there (none for a driver
    /// without topology).
    pub keys: Vec<String>,
    /// The Node's labels; None when there is no Node of that name.
    pub labels: Option<BTreeMap<String, String>>,
}

/// CreateVolume's accessibility requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirement {
    pub requisite: Vec<Segment>,
    /// The requisite segments, most preferred first.
    pub preferred: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "node {node} has no topology for {driver}: its CSINode lists no such driver; is the driver's node plugin running there?"
    )]
    NotRegistered { node: String, driver: String },
    #[error(
        "node {node} lacks the labels {keys:?} that its CSINode names as {driver}'s topology keys; \
         they appear when the driver's node plugin registers there"
    )]
    NodeUnlabelled {
        node: String,
        driver: String,
        keys: Vec<String>,
    },
    #[error(
        "no node carries all the labels of any topology key set {driver} registered ({keys:?}); \
         they appear when the driver's node plugin registers"
    )]
    NoLabelledNode {
        driver: String,
        keys: Vec<Vec<String>>,
    },
    #[error(
        "node {node} chosen by the scheduler is outside the StorageClass's allowedTopologies \
         (its segment: {segment:?})"
    )]
    NotAllowed { node: String, segment: Segment },
}

/// Every node whose CSINode lists `driver`, with its keys and labels.
pub fn driver_nodes(stores: &Stores, driver: &str) -> Vec<DriverNode> {
    stores
        .csinodes
        .state()
        .iter()
        .filter_map(|csinode| {
            let entry = csinode.spec.drivers.iter().find(|d| d.name == driver)?;
            let name = csinode.name_any();
            let labels = stores
                .nodes
                .get(&ObjectRef::new(&name))
                .map(|n| n.labels().clone());
            Some(DriverNode {
                keys: entry.topology_keys.clone().unwrap_or_default(),
                labels,
                name,
            })
        })
        .collect()
}

/// The requirement for a claim named `claim_name` of a class with
/// `allowed` topologies; `selected` is the scheduler's node for
/// WaitForFirstConsumer, None for Immediate.
///
/// None when the driver registered no topology keys (where it matters:
/// on the selected node, or anywhere for Immediate). external-provisioner
/// asks drivers without topology for none; one with topology whose node
/// plugins have not registered yet it makes wait, which stowage cannot
/// tell apart here without asking the driver.
pub fn requirement(
    driver: &str,
    claim_name: &str,
    allowed: &[TopologySelectorTerm],
    selected: Option<&str>,
    nodes: &[DriverNode],
) -> Result<Option<Requirement>, TopologyError> {
    let selected = match selected {
        None => None,
        Some(name) => {
            let node = nodes.iter().find(|n| n.name == name).ok_or_else(|| {
                TopologyError::NotRegistered {
                    node: name.to_string(),
                    driver: driver.to_string(),
                }
            })?;
            if node.keys.is_empty() {
                return Ok(None);
            }
            let segment = node
                .labels
                .as_ref()
                .and_then(|labels| segment_of(labels, &node.keys))
                .ok_or_else(|| TopologyError::NodeUnlabelled {
                    node: name.to_string(),
                    driver: driver.to_string(),
                    keys: node.keys.clone(),
                })?;
            Some((node, segment))
        }
    };
    let mut requisite = if !allowed.is_empty() {
        flatten(allowed)
    } else if let Some((node, _)) = &selected {
        aggregate(nodes, &node.keys.iter().cloned().collect())
    } else {
        let key_sets = key_sets(nodes);
        if key_sets.is_empty() {
            return Ok(None);
        }
        let segments: Vec<Segment> = key_sets.iter().flat_map(|k| aggregate(nodes, k)).collect();
        if segments.is_empty() {
            return Err(TopologyError::NoLabelledNode {
                driver: driver.to_string(),
                keys: key_sets
                    .into_iter()
                    .map(|k| k.into_iter().collect())
                    .collect(),
            });
        }
        segments
    };
    requisite.sort_by(compare);
    requisite.dedup();
    if requisite.is_empty() {
        return Ok(None);
    }
    let first = match &selected {
        None => {
            let (hash, ordinal) = name_hash_and_ordinal(claim_name);
            (hash.wrapping_add(ordinal) % requisite.len() as u32) as usize
        }
        Some((node, segment)) => requisite
            .iter()
            .position(|s| is_subset(s, segment))
            .ok_or_else(|| TopologyError::NotAllowed {
                node: node.name.clone(),
                segment: segment.clone(),
            })?,
    };
    let mut preferred = requisite.clone();
    preferred.rotate_left(first);
    Ok(Some(Requirement {
        requisite,
        preferred,
    }))
}

/// `keys` valued from `labels`; None if a label is missing.
pub fn segment_of(labels: &BTreeMap<String, String>, keys: &[String]) -> Option<Segment> {
    keys.iter()
        .map(|k| Some((k.clone(), labels.get(k)?.clone())))
        .collect()
}

/// The distinct key sets the driver registered, in order.
fn key_sets(nodes: &[DriverNode]) -> BTreeSet<BTreeSet<String>> {
    nodes
        .iter()
        .filter(|n| !n.keys.is_empty())
        .map(|n| n.keys.iter().cloned().collect())
        .collect()
}

/// One segment of `keys` per node that registered at least those keys and
/// carries their labels: a node is never placed under keys its driver did
/// not register there, whatever labels it has.
fn aggregate(nodes: &[DriverNode], keys: &BTreeSet<String>) -> Vec<Segment> {
    let keys: Vec<String> = keys.iter().cloned().collect();
    nodes
        .iter()
        .filter(|n| keys.iter().all(|k| n.keys.contains(k)))
        .filter_map(|n| segment_of(n.labels.as_ref()?, &keys))
        .collect()
}

/// allowedTopologies as segments: each term's expressions ANDed, each
/// expression's values ORed, distributed into one segment per combination.
fn flatten(allowed: &[TopologySelectorTerm]) -> Vec<Segment> {
    let mut out = Vec::new();
    for term in allowed {
        let mut segments: Vec<Segment> = Vec::new();
        for expression in term.match_label_expressions.iter().flatten() {
            let mut next = Vec::new();
            for value in &expression.values {
                // As upstream: an expression with no values empties the
                // term so far, and the next one starts it afresh.
                if segments.is_empty() {
                    next.push(Segment::from([(expression.key.clone(), value.clone())]));
                } else {
                    for s in &segments {
                        let mut s = s.clone();
                        s.insert(expression.key.clone(), value.clone());
                        next.push(s);
                    }
                }
            }
            segments = next;
        }
        out.extend(segments);
    }
    out
}

/// external-provisioner's order of segments: fewer keys first, then by
/// (key, value) pairs in key order.
fn compare(a: &Segment, b: &Segment) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.iter().cmp(b.iter()))
}

fn is_subset(part: &Segment, whole: &Segment) -> bool {
    part.iter().all(|(k, v)| whole.get(k) == Some(v))
}

/// The spreading key of an Immediate claim, as Kubernetes' in-tree
/// provisioners and external-provisioner compute it: the FNV-1 hash of the
/// name, except that a name ending in `-<number>` (a StatefulSet's
/// `<claim>-<set>-<ordinal>`) hashes only the part between its last two
/// dashes and adds the ordinal, so that one set's replicas go round the
/// segments and one replica's claims land together.
fn name_hash_and_ordinal(name: &str) -> (u32, u32) {
    let mut hashed = name;
    let mut ordinal = 0;
    if let Some(dash) = name.rfind('-') {
        let suffix = &name[dash + 1..];
        // Go's ParseUint: digits only (no sign), within 32 bits.
        let number = suffix
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| suffix.parse::<u32>().ok())
            .flatten();
        if let Some(n) = number {
            ordinal = n;
            hashed = &name[..dash];
            if let Some(dash) = hashed.rfind('-') {
                hashed = &hashed[dash + 1..];
            }
        }
    }
    (fnv1_32(hashed.as_bytes()), ordinal)
}

/// FNV-1 (not 1a), 32 bits: Go's `hash/fnv.New32`.
fn fnv1_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash: u32, b| {
        hash.wrapping_mul(0x0100_0193) ^ u32::from(*b)
    })
}

#[cfg(test)]
mod tests;
