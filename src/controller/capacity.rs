//! Room on each node: what its agent reports, less what Volumes there were
//! promised. Images are sparse, so promises, not disk usage, must fit.

use std::collections::BTreeMap;

use crate::backend::local;
use crate::crd::{StorageNode, Volume};

/// Bytes each node has promised to Volumes.
fn promised_bytes<'a>(volumes: &[&'a Volume]) -> BTreeMap<&'a str, i64> {
    let mut out = BTreeMap::new();
    for v in volumes {
        if let Some(node) = v.spec.node.as_deref() {
            *out.entry(node).or_default() += v.spec.capacity_bytes;
        }
    }
    out
}

/// Free bytes per node that runs an agent for our driver (negative when a
/// node shrank under its promises).
pub fn free_bytes(nodes: &[&StorageNode], volumes: &[&Volume]) -> Vec<(String, i64)> {
    let promised = promised_bytes(volumes);
    nodes
        .iter()
        .filter(|n| n.spec.driver == local::DRIVER_NAME)
        .map(|n| {
            let capacity = n.status.as_ref().map_or(0, |s| s.capacity_bytes);
            let used = promised.get(n.spec.node.as_str()).copied().unwrap_or(0);
            (n.spec.node.clone(), capacity - used)
        })
        .collect()
}

/// Free bytes on one node, or None when no agent runs there.
pub fn free_on(nodes: &[&StorageNode], volumes: &[&Volume], node: &str) -> Option<i64> {
    free_bytes(nodes, volumes)
        .into_iter()
        .find_map(|(n, free)| (n == node).then_some(free))
}
