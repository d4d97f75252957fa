//! Where a `--csi-driver` volume may go, as external-provisioner computes
//! it: from CSINodes' topology keys valued by their Nodes' labels.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::controller::context::Stores;
use crate::controller::protocol::*;

/// A topology segment: key → value.
pub type Segment = BTreeMap<String, String>;

/// Topology for a remote claim still to be provisioned: the selected
/// node's for WaitForFirstConsumer, everywhere the driver runs for
/// Immediate. Returns (node topology, cluster topology).
pub fn for_claim(
    stores: &Stores,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
) -> (Option<Segment>, Vec<Segment>) {
    if class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER) {
        (
            selected_node_topology(stores, claim, &class.provisioner),
            Vec::new(),
        )
    } else {
        (None, cluster_topology(stores, &class.provisioner))
    }
}

/// Every topology segment where `driver` runs, as external-provisioner
/// aggregates it for `Immediate` classes: for each CSINode listing the
/// driver, its topology keys valued from that Node's labels (nodes missing
/// a label are left out). Sorted and without repeats.
fn cluster_topology(stores: &Stores, driver: &str) -> Vec<BTreeMap<String, String>> {
    let mut segments = std::collections::BTreeSet::new();
    for csinode in stores.csinodes.state() {
        let Some(entry) = csinode.spec.drivers.iter().find(|d| d.name == driver) else {
            continue;
        };
        let keys = entry.topology_keys.clone().unwrap_or_default();
        if keys.is_empty() {
            continue;
        }
        let Some(node) = stores.nodes.get(&ObjectRef::new(&csinode.name_any())) else {
            continue;
        };
        let labels = node.labels();
        let segment: Option<BTreeMap<_, _>> = keys
            .iter()
            .map(|k| Some((k.clone(), labels.get(k)?.clone())))
            .collect();
        segments.extend(segment);
    }
    segments.into_iter().collect()
}

/// The scheduler's node's topology for `driver`, as external-provisioner
/// reads it: the CSINode's topology keys for the driver, valued from the
/// Node's labels. None while the node has no CSINode entry for the driver.
fn selected_node_topology(
    stores: &Stores,
    claim: &PersistentVolumeClaim,
    driver: &str,
) -> Option<BTreeMap<String, String>> {
    let node = claim.annotations().get(ANN_SELECTED_NODE)?;
    let csinode = stores.csinodes.get(&ObjectRef::new(node))?;
    let entry = csinode.spec.drivers.iter().find(|d| d.name == driver)?;
    let labels = stores
        .nodes
        .get(&ObjectRef::new(node))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    Some(
        entry
            .topology_keys
            .iter()
            .flatten()
            .filter_map(|k| Some((k.clone(), labels.get(k)?.clone())))
            .collect(),
    )
}
