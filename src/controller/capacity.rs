//! Room on each node: what its agent reports, less what Volumes there were
//! promised. Images are sparse, so promises, not disk usage, must fit.

use std::collections::{BTreeMap, HashMap};

use kube::ResourceExt;

use crate::backend::local;
use crate::crd::DISK_PRESSURE;
use crate::crd::{ConditionStatus, StorageNode, Volume};

/// Bytes each node has promised to Volumes, kept up to date from the Volume
/// watch, so that placing a claim costs a pass over nodes, not over every
/// Volume in the cluster.
#[derive(Debug, Default)]
pub struct Promised {
    /// Each Volume's node and size, to undo it when it changes or goes.
    volumes: HashMap<String, (String, i64)>,
    /// Bytes and Volumes per node.
    per_node: BTreeMap<String, (i64, usize)>,
}

impl Promised {
    /// A Volume created or changed.
    pub fn apply(&mut self, volume: &Volume) {
        let name = volume.name_any();
        self.forget(&name);
        if let Some(node) = volume.spec.node.clone() {
            let (bytes, count) = self.per_node.entry(node.clone()).or_default();
            *bytes += volume.spec.capacity_bytes;
            *count += 1;
            self.volumes
                .insert(name, (node, volume.spec.capacity_bytes));
        }
    }

    pub fn delete(&mut self, volume: &Volume) {
        self.forget(&volume.name_any());
    }

    fn forget(&mut self, name: &str) {
        let Some((node, bytes)) = self.volumes.remove(name) else {
            return;
        };
        if let Some((promised, count)) = self.per_node.get_mut(&node) {
            *promised -= bytes;
            *count -= 1;
            if *count == 0 {
                self.per_node.remove(&node);
            }
        }
    }

    /// Bytes promised per node.
    pub fn per_node(&self) -> BTreeMap<String, i64> {
        self.per_node
            .iter()
            .map(|(node, (bytes, _))| (node.clone(), *bytes))
            .collect()
    }
}

/// Free bytes per node that runs an agent for our driver (negative when a
/// node shrank under its promises).
pub fn free_bytes(nodes: &[&StorageNode], promised: &BTreeMap<String, i64>) -> Vec<(String, i64)> {
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

/// Why a node takes no new volume now: its agent's `DiskPressure`
/// condition is True (free space below its reserve), with the agent's
/// message naming both.
pub fn pressure(node: &StorageNode) -> Option<&str> {
    message_of(node, DISK_PRESSURE, ConditionStatus::True)
}

/// The message of `node`'s condition `type_`, while it has `status`.
fn message_of<'a>(node: &'a StorageNode, type_: &str, status: ConditionStatus) -> Option<&'a str> {
    node.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.message.as_str())
}

/// StorageNode condition the controller writes `False` (reason
/// `HeartbeatExpired`) when the node's agent stopped reporting; the
/// agent's next report replaces the conditions and so clears it.
pub const READY: &str = "Ready";
pub const REASON_HEARTBEAT_EXPIRED: &str = "HeartbeatExpired";

/// Why a node takes no new volume because its agent is silent: its
/// `Ready` condition is False, with the controller's message.
pub fn not_ready(node: &StorageNode) -> Option<&str> {
    message_of(node, READY, ConditionStatus::False)
}

/// Free bytes on one node, or None when no agent runs there.
pub fn free_on(
    nodes: &[&StorageNode],
    promised: &BTreeMap<String, i64>,
    node: &str,
) -> Option<i64> {
    free_bytes(nodes, promised)
        .into_iter()
        .find_map(|(n, free)| (n == node).then_some(free))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn volume(name: &str, node: &str, bytes: i64) -> Volume {
        let mut spec = testing::volume_spec(local::DRIVER_NAME, bytes);
        spec.node = Some(node.into());
        Volume::new(name, spec)
    }

    #[test]
    fn promises_follow_volumes_as_they_change_and_go() {
        let mut promised = Promised::default();
        promised.apply(&volume("a", "n1", 10));
        promised.apply(&volume("b", "n1", 5));
        promised.apply(&volume("c", "n2", 7));
        assert_eq!(promised.per_node()["n1"], 15);
        // Grown by an expansion.
        promised.apply(&volume("a", "n1", 20));
        assert_eq!(promised.per_node()["n1"], 25);
        promised.delete(&volume("b", "n1", 5));
        promised.delete(&volume("a", "n1", 20));
        assert!(!promised.per_node().contains_key("n1"));
        assert_eq!(promised.per_node()["n2"], 7);
        promised.delete(&volume("gone-already", "n2", 7));
        assert_eq!(promised.per_node()["n2"], 7);
    }

    fn node(name: &str, driver: &str, capacity: Option<i64>) -> StorageNode {
        let mut n = StorageNode::new(
            name,
            crate::crd::StorageNodeSpec {
                driver: driver.into(),
                node: name.into(),
            },
        );
        n.status = capacity.map(|c| crate::crd::StorageNodeStatus {
            capacity_bytes: c,
            ..Default::default()
        });
        n
    }

    /// Each row: promised bytes on "n1", what "n1" reports, free on "n1".
    #[test]
    fn free_is_reported_capacity_less_promises() {
        let rows = [
            (0, Some(100), Some(100)),
            (40, Some(100), Some(60)),
            (100, Some(100), Some(0)),
            // The node's filesystem shrank under its promises.
            (150, Some(100), Some(-50)),
            // An agent that has not reported yet offers nothing.
            (0, None, Some(0)),
        ];
        for (promised_bytes, capacity, free) in rows {
            let nodes = [node("n1", local::DRIVER_NAME, capacity)];
            let refs: Vec<_> = nodes.iter().collect();
            let promised = BTreeMap::from([("n1".to_string(), promised_bytes)]);
            assert_eq!(
                free_on(&refs, &promised, "n1"),
                free,
                "{promised_bytes} promised of {capacity:?}"
            );
        }
    }

    #[test]
    fn a_node_is_under_pressure_only_while_its_condition_is_true() {
        let condition = |type_: &str, status| {
            crate::testing::condition(type_, status, "FreeSpaceBelowReserve", "7 bytes free")
        };
        let mut n = node("n1", local::DRIVER_NAME, Some(10));
        assert_eq!(pressure(&n), None, "no condition reported yet");
        let status = n.status.as_mut().unwrap();
        status.conditions = vec![condition(DISK_PRESSURE, ConditionStatus::False)];
        assert_eq!(pressure(&n), None);
        let status = n.status.as_mut().unwrap();
        status.conditions = vec![condition("Other", ConditionStatus::True)];
        assert_eq!(pressure(&n), None);
        let status = n.status.as_mut().unwrap();
        status
            .conditions
            .push(condition(DISK_PRESSURE, ConditionStatus::True));
        assert_eq!(pressure(&n), Some("7 bytes free"));
        assert_eq!(pressure(&node("n2", local::DRIVER_NAME, None)), None);
    }

    #[test]
    fn only_nodes_of_our_driver_offer_room() {
        let nodes = [
            node("ours", local::DRIVER_NAME, Some(10)),
            node("theirs", "other.example.com", Some(10)),
        ];
        let refs: Vec<_> = nodes.iter().collect();
        let free = free_bytes(&refs, &BTreeMap::new());
        assert_eq!(free, [("ours".to_string(), 10)]);
        assert_eq!(free_on(&refs, &BTreeMap::new(), "theirs"), None);
        assert_eq!(free_on(&refs, &BTreeMap::new(), "nowhere"), None);
    }
}
