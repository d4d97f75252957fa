//! external-provisioner's job for `local.stowage.dev`, decided by a pure
//! `plan` over a snapshot of objects.
//!
//! A claim moves through: Volume written (intent, before any data) → node
//! agent creates the data → PV `pvc-<claim uid>` created with a pre-set
//! claimRef → bound (see bind.rs). Every step is keyed by the claim's UID, so
//! a retried or restarted step finds the work already done instead of doing
//! it twice.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use serde_json::json;

use super::capacity;
use super::protocol::*;
use super::secrets::{self, TemplateValues};
use crate::backend::local::{self, Layout, Parameters};
use crate::crd::{
    AccessMode, ClaimReference, NODE_LABEL, ReclaimPolicy, StorageNode, VOLUME_FINALIZER, Volume,
    VolumeMode, VolumePhase, VolumeSpec,
};
use crate::quantity::{format_bytes, parse_bytes};

/// Everything `plan` looks at for one claim.
pub struct ClaimView<'a> {
    pub claim: &'a PersistentVolumeClaim,
    pub class: Option<&'a StorageClass>,
    /// The Volume named after the claim, if written.
    pub volume: Option<&'a Volume>,
    /// The PV named after the claim, if created.
    pub pv: Option<&'a PersistentVolume>,
    pub storage_nodes: &'a [&'a StorageNode],
    /// Bytes each node has promised to Volumes already.
    pub promised: &'a BTreeMap<String, i64>,
    /// An existing PV can be bound instead (binding is tried first, as kcm does).
    pub static_match: bool,
    /// The class's provisioner is a `--csi-driver` that stowage serves.
    pub remote: bool,
    /// `--serve-local`: this controller provisions `local.stowage.dev`.
    pub serve_local: bool,
    /// For remote drivers: the scheduler's node's topology segments for the
    /// driver (its CSINode topology keys, valued from the Node's labels).
    pub node_topology: Option<BTreeMap<String, String>>,
    /// For `Immediate` classes of a `--csi-driver`: every topology segment
    /// where the driver runs (empty when it reports none).
    pub cluster_topology: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Provision {
    /// Not ours, or nothing to provision.
    Skip,
    /// `WaitForFirstConsumer` and the scheduler has not picked a node yet.
    WaitForConsumer,
    /// The claim cannot be provisioned as asked; tell the user what to change.
    Fail(ProvisionError),
    /// Record intent before any data exists.
    CreateVolume(Box<Volume>),
    /// The node agent is creating the data.
    WaitForData { node: String },
    /// Data exists: expose it as a PV pre-bound to the claim.
    CreatePv(Box<PersistentVolume>),
    /// The PV exists; binding takes it from here.
    Provisioned,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Parameters(#[from] local::ParameterError),
    #[error(
        "access mode {0:?} is not supported: {driver} volumes live on one node; use ReadWriteOnce or ReadWriteOncePod",
        driver = local::DRIVER_NAME
    )]
    AccessMode(String),
    #[error("claim has no storage request: set spec.resources.requests.storage, e.g. 1Gi")]
    NoSize,
    #[error("storage request {0:?} is not a size: {1}")]
    BadSize(String, String),
    #[error(
        "storage request must be greater than zero; set spec.resources.requests.storage, e.g. 1Gi"
    )]
    ZeroSize,
    #[error(
        "volumeMode Block needs an image volume: remove `layout: dir` from the StorageClass or use volumeMode Filesystem"
    )]
    BlockOnDir,
    #[error("dataSource is not supported by stowage yet: create the claim without it")]
    DataSource,
    #[error("{0}")]
    Secrets(#[from] super::secrets::SecretError),
    #[error(
        "node {node} has no topology for {driver}: its CSINode lists no such driver; is the driver's node plugin running there?"
    )]
    NoTopology { node: String, driver: String },
    #[error(
        "no node runs the stowage node agent for {driver}: deploy the stowage-node DaemonSet",
        driver = local::DRIVER_NAME
    )]
    NoNodes,
    #[error("node {0:?} selected by the scheduler runs no stowage node agent")]
    NodeWithoutAgent(String),
    #[error(
        "no node can hold {wanted}: the most any node has free is {largest} (on {node}); free space or request less"
    )]
    NoRoom {
        wanted: String,
        largest: String,
        node: String,
    },
    #[error(
        "node {node} cannot hold {wanted}: it has {free} free; free space there or request less"
    )]
    NoRoomOnNode {
        node: String,
        wanted: String,
        free: String,
    },
    #[error(
        "node {node} selected by the scheduler takes no new volumes: {message}; \
         it will again once space there is back above its reserve"
    )]
    DiskPressure { node: String, message: String },
    #[error(
        "no node can take a new volume: every node with a stowage agent is under \
         disk pressure ({nodes}); on {first}: {message}"
    )]
    AllUnderDiskPressure {
        nodes: String,
        first: String,
        message: String,
    },
    #[error("node {node} failed to create the volume: {message}")]
    Backend { node: String, message: String },
    #[error("{driver} failed to create the volume: {message}")]
    Driver { driver: String, message: String },
}

impl ProvisionError {
    /// Whether retrying without any change can succeed (capacity may be
    /// freed, a node agent may start); the rest need the user to act.
    pub fn may_resolve_itself(&self) -> bool {
        matches!(
            self,
            ProvisionError::NoNodes
                | ProvisionError::NoTopology { .. }
                | ProvisionError::NodeWithoutAgent(_)
                | ProvisionError::NoRoom { .. }
                | ProvisionError::NoRoomOnNode { .. }
                | ProvisionError::DiskPressure { .. }
                | ProvisionError::AllUnderDiskPressure { .. }
                | ProvisionError::Backend { .. }
                | ProvisionError::Driver { .. }
        )
    }
}

/// The driver that provisions this claim, if the claim asks for one.
pub fn claim_provisioner<'a>(
    claim: &'a PersistentVolumeClaim,
    class: Option<&'a StorageClass>,
) -> Option<&'a str> {
    let ann = claim.annotations();
    ann.get(ANN_STORAGE_PROVISIONER)
        .or_else(|| ann.get(ANN_BETA_STORAGE_PROVISIONER))
        .map(String::as_str)
        .or_else(|| class.map(|c| c.provisioner.as_str()))
}

/// PV and Volume name for a claim, as external-provisioner names PVs.
pub fn volume_name(claim: &PersistentVolumeClaim) -> Option<String> {
    claim.uid().map(|uid| format!("pvc-{uid}"))
}

pub fn plan(view: &ClaimView) -> Provision {
    let claim = view.claim;
    if claim.metadata.deletion_timestamp.is_some() {
        return Provision::Skip;
    }
    let Some(class) = view.class else {
        return Provision::Skip;
    };
    let provisioner = claim_provisioner(claim, Some(class));
    let remote = view.remote && provisioner == Some(class.provisioner.as_str());
    let local = view.serve_local && provisioner == Some(local::DRIVER_NAME);
    if !local && !remote {
        return Provision::Skip;
    }
    let spec = claim.spec.as_ref();
    // A claim that names its PV (or got one bound) is the binder's business.
    if spec
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
    {
        return Provision::Skip;
    }
    if let Some(pv) = view.pv {
        return if pv.metadata.deletion_timestamp.is_some() {
            Provision::Skip
        } else {
            Provision::Provisioned
        };
    }
    if let Some(volume) = view.volume {
        return after_volume_written(view, class, volume);
    }
    if view.static_match {
        return Provision::Skip;
    }
    let desired = if remote {
        desired_remote_volume(view, class)
    } else {
        desired_volume(view, class)
    };
    match desired {
        Ok(Some(volume)) => Provision::CreateVolume(Box::new(volume)),
        Ok(None) => Provision::WaitForConsumer,
        Err(e) => Provision::Fail(e),
    }
}

fn after_volume_written(view: &ClaimView, class: &StorageClass, volume: &Volume) -> Provision {
    let node = volume.spec.node.clone().unwrap_or_default();
    let Some(status) = volume.status.as_ref() else {
        return Provision::WaitForData { node };
    };
    match status.phase {
        VolumePhase::Ready if status.observed_generation == volume.metadata.generation => {
            Provision::CreatePv(Box::new(desired_pv(view.claim, class, volume)))
        }
        VolumePhase::Failed => {
            let message = status
                .last_error
                .clone()
                .unwrap_or_else(|| "unknown error".into());
            Provision::Fail(if volume.spec.node.is_some() {
                ProvisionError::Backend { node, message }
            } else {
                ProvisionError::Driver {
                    driver: volume.spec.driver.clone(),
                    message,
                }
            })
        }
        _ => Provision::WaitForData { node },
    }
}

/// The Volume to write for a claim, or None while waiting for the scheduler.
fn desired_volume(
    view: &ClaimView,
    class: &StorageClass,
) -> Result<Option<Volume>, ProvisionError> {
    let claim = view.claim;
    let spec = claim.spec.clone().unwrap_or_default();
    let params = Parameters::parse(&class.parameters.clone().unwrap_or_default())?;

    let access_modes = spec
        .access_modes
        .unwrap_or_default()
        .iter()
        .map(|m| match m.as_str() {
            "ReadWriteOnce" => Ok(AccessMode::ReadWriteOnce),
            "ReadWriteOncePod" => Ok(AccessMode::ReadWriteOncePod),
            other => Err(ProvisionError::AccessMode(other.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let volume_mode = match spec.volume_mode.as_deref() {
        Some("Block") => VolumeMode::Block,
        _ => VolumeMode::Filesystem,
    };
    if volume_mode == VolumeMode::Block && params.layout == Layout::Dir {
        return Err(ProvisionError::BlockOnDir);
    }
    if spec.data_source.is_some() || spec.data_source_ref.is_some() {
        return Err(ProvisionError::DataSource);
    }
    let requested = requested_bytes(claim)?;
    let bytes = params.allocated_bytes(requested);

    let wffc = class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
    let node = if wffc {
        let Some(selected) = claim.annotations().get(ANN_SELECTED_NODE) else {
            return Ok(None);
        };
        check_room_on(view, selected, bytes)?;
        selected.clone()
    } else {
        choose_node(view, bytes)?
    };

    let name = volume_name(claim).expect("claims from the API server have a UID");
    let mut volume = Volume::new(
        &name,
        VolumeSpec {
            driver: local::DRIVER_NAME.to_string(),
            parameters: class.parameters.clone().unwrap_or_default(),
            capacity_bytes: bytes,
            access_modes,
            volume_mode,
            node: Some(node.clone()),
            requisite_topology: Vec::new(),
            source: None,
            claim: Some(ClaimReference {
                namespace: claim.namespace().unwrap_or_default(),
                name: claim.name_any(),
                uid: claim.uid().unwrap_or_default(),
            }),
            persistent_volume_name: Some(name.clone()),
            reclaim_policy: match class.reclaim_policy.as_deref() {
                Some("Retain") => ReclaimPolicy::Retain,
                _ => ReclaimPolicy::Delete,
            },
        },
    );
    volume.metadata.finalizers = Some(vec![VOLUME_FINALIZER.to_string()]);
    volume.metadata.labels = Some(BTreeMap::from([(NODE_LABEL.to_string(), node)]));
    Ok(Some(volume))
}

fn check_room_on(view: &ClaimView, node: &str, bytes: i64) -> Result<(), ProvisionError> {
    let pressure = view
        .storage_nodes
        .iter()
        .filter(|n| n.spec.node == node)
        .find_map(|n| capacity::pressure(n));
    if let Some(message) = pressure {
        return Err(ProvisionError::DiskPressure {
            node: node.to_string(),
            message: message.to_string(),
        });
    }
    let free = capacity::free_bytes(view.storage_nodes, view.promised);
    let Some((_, free)) = free.iter().find(|(n, _)| n == node) else {
        return Err(ProvisionError::NodeWithoutAgent(node.to_string()));
    };
    if *free < bytes {
        return Err(ProvisionError::NoRoomOnNode {
            node: node.to_string(),
            wanted: format_bytes(bytes),
            free: format_bytes((*free).max(0)),
        });
    }
    Ok(())
}

/// The node with the most free room that can hold `bytes`, among those not
/// under disk pressure; ties go to the name that sorts first, so the choice
/// is stable across retries.
fn choose_node(view: &ClaimView, bytes: i64) -> Result<String, ProvisionError> {
    let pressured: BTreeMap<&str, &str> = view
        .storage_nodes
        .iter()
        .filter(|n| n.spec.driver == local::DRIVER_NAME)
        .filter_map(|n| Some((n.spec.node.as_str(), capacity::pressure(n)?)))
        .collect();
    let mut free = capacity::free_bytes(view.storage_nodes, view.promised);
    free.retain(|(node, _)| !pressured.contains_key(node.as_str()));
    free.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    match free.first() {
        None => match pressured.first_key_value() {
            Some((first, message)) => Err(ProvisionError::AllUnderDiskPressure {
                nodes: pressured.keys().copied().collect::<Vec<_>>().join(", "),
                first: first.to_string(),
                message: message.to_string(),
            }),
            None => Err(ProvisionError::NoNodes),
        },
        Some((node, room)) if *room >= bytes => Ok(node.clone()),
        Some((node, room)) => Err(ProvisionError::NoRoom {
            wanted: format_bytes(bytes),
            largest: format_bytes((*room).max(0)),
            node: node.clone(),
        }),
    }
}

fn requested_bytes(claim: &PersistentVolumeClaim) -> Result<i64, ProvisionError> {
    let requested = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .ok_or(ProvisionError::NoSize)?;
    let bytes = parse_bytes(&requested.0)
        .map_err(|e| ProvisionError::BadSize(requested.0.clone(), e.to_string()))?;
    if bytes <= 0 {
        return Err(ProvisionError::ZeroSize);
    }
    Ok(bytes)
}

fn template_values<'a>(claim: &'a PersistentVolumeClaim, pv_name: &'a str) -> TemplateValues<'a> {
    TemplateValues {
        pv_name,
        claim_namespace: claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim_name: claim.metadata.name.as_deref().unwrap_or_default(),
    }
}

/// The Volume to write for a claim of a `--csi-driver`: the driver decides
/// placement, within the scheduler's node's topology for
/// `WaitForFirstConsumer`.
fn desired_remote_volume(
    view: &ClaimView,
    class: &StorageClass,
) -> Result<Option<Volume>, ProvisionError> {
    let claim = view.claim;
    let spec = claim.spec.clone().unwrap_or_default();
    let name = volume_name(claim).expect("claims from the API server have a UID");
    let parameters = class.parameters.clone().unwrap_or_default();
    secrets::all_refs(&parameters, &template_values(claim, &name))?;
    if spec.data_source.is_some() || spec.data_source_ref.is_some() {
        return Err(ProvisionError::DataSource);
    }
    let access_modes = spec
        .access_modes
        .unwrap_or_default()
        .iter()
        .map(|m| match m.as_str() {
            "ReadWriteOnce" => Ok(AccessMode::ReadWriteOnce),
            "ReadWriteOncePod" => Ok(AccessMode::ReadWriteOncePod),
            "ReadOnlyMany" => Ok(AccessMode::ReadOnlyMany),
            "ReadWriteMany" => Ok(AccessMode::ReadWriteMany),
            other => Err(ProvisionError::AccessMode(other.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = requested_bytes(claim)?;
    let wffc = class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
    let requisite_topology = if wffc {
        let Some(selected) = claim.annotations().get(ANN_SELECTED_NODE) else {
            return Ok(None);
        };
        match &view.node_topology {
            Some(t) if !t.is_empty() => vec![t.clone()],
            Some(_) => Vec::new(),
            None => {
                return Err(ProvisionError::NoTopology {
                    node: selected.clone(),
                    driver: class.provisioner.clone(),
                });
            }
        }
    } else {
        view.cluster_topology.clone()
    };
    let mut volume = Volume::new(
        &name,
        VolumeSpec {
            driver: class.provisioner.clone(),
            parameters,
            capacity_bytes: bytes,
            access_modes,
            volume_mode: match spec.volume_mode.as_deref() {
                Some("Block") => VolumeMode::Block,
                _ => VolumeMode::Filesystem,
            },
            node: None,
            requisite_topology,
            source: None,
            claim: Some(ClaimReference {
                namespace: claim.namespace().unwrap_or_default(),
                name: claim.name_any(),
                uid: claim.uid().unwrap_or_default(),
            }),
            persistent_volume_name: Some(name.clone()),
            reclaim_policy: match class.reclaim_policy.as_deref() {
                Some("Retain") => ReclaimPolicy::Retain,
                _ => ReclaimPolicy::Delete,
            },
        },
    );
    volume.metadata.finalizers = Some(vec![VOLUME_FINALIZER.to_string()]);
    Ok(Some(volume))
}

/// The PV external-provisioner would create for a `--csi-driver` volume.
fn desired_remote_pv(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    volume: &Volume,
) -> PersistentVolume {
    let status = volume.status.clone().unwrap_or_default();
    // CSI's 0 means "unknown": the request is the best we know.
    let capacity = status
        .capacity_bytes
        .filter(|b| *b > 0)
        .unwrap_or(volume.spec.capacity_bytes);
    let block = volume.spec.volume_mode == VolumeMode::Block;
    let params = &volume.spec.parameters;
    let mut csi = json!({
        "driver": volume.spec.driver,
        "volumeHandle": status.volume_handle.clone().unwrap_or_else(|| volume.name_any()),
        "volumeAttributes": status.volume_context,
    });
    if !block && let Some(fs) = params.get(secrets::FS_TYPE) {
        csi["fsType"] = json!(fs);
    }
    let name = volume.name_any();
    for (kind, r) in secrets::all_refs(params, &template_values(claim, &name)).unwrap_or_default() {
        if let Some(field) = kind.pv_field() {
            csi[field] = json!(r);
        }
    }
    let mut pv = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": { ANN_PROVISIONED_BY: volume.spec.driver },
            "finalizers": [PV_PROVISIONER_FINALIZER],
        },
        "spec": {
            "capacity": { "storage": format_bytes(capacity) },
            "accessModes": claim.spec.as_ref().and_then(|s| s.access_modes.clone()).unwrap_or_default(),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class.name_any(),
            "mountOptions": class.mount_options.clone(),
            "volumeMode": if block { "Block" } else { "Filesystem" },
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(),
                "name": claim.name_any(),
                "uid": claim.uid(),
            },
            "csi": csi,
        },
    });
    if !status.topology.is_empty() {
        let expressions: Vec<_> = status
            .topology
            .iter()
            .map(|(k, v)| json!({ "key": k, "operator": "In", "values": [v] }))
            .collect();
        pv["spec"]["nodeAffinity"] =
            json!({ "required": { "nodeSelectorTerms": [{ "matchExpressions": expressions }] } });
    }
    serde_json::from_value(pv).expect("PV literal matches the PersistentVolume schema")
}

/// The PV external-provisioner would create for this volume.
pub fn desired_pv(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    volume: &Volume,
) -> PersistentVolume {
    if volume.spec.driver != local::DRIVER_NAME {
        return desired_remote_pv(claim, class, volume);
    }
    let status = volume.status.clone().unwrap_or_default();
    let capacity = status.capacity_bytes.unwrap_or(volume.spec.capacity_bytes);
    let node = volume.spec.node.clone().unwrap_or_default();
    let params = Parameters::parse(&volume.spec.parameters).unwrap_or_default();
    let block = volume.spec.volume_mode == VolumeMode::Block;
    let access_modes: Vec<_> = claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    let pv = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume.name_any(),
            "annotations": { ANN_PROVISIONED_BY: local::DRIVER_NAME },
            "finalizers": [PV_PROVISIONER_FINALIZER],
        },
        "spec": {
            "capacity": { "storage": format_bytes(capacity) },
            "accessModes": access_modes,
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class.name_any(),
            "mountOptions": class.mount_options.clone(),
            "volumeMode": if block { "Block" } else { "Filesystem" },
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(),
                "name": claim.name_any(),
                "uid": claim.uid(),
            },
            "csi": {
                "driver": local::DRIVER_NAME,
                "volumeHandle": status.volume_handle.unwrap_or_else(|| volume.name_any()),
                "fsType": if block { None } else { Some(params.fs_type.as_str()) },
                "volumeAttributes": { "layout": match params.layout { Layout::Image => "image", Layout::Dir => "dir" } },
            },
            "nodeAffinity": { "required": { "nodeSelectorTerms": [{
                "matchExpressions": [{ "key": local::TOPOLOGY_KEY, "operator": "In", "values": [node] }]
            }]}},
        },
    });
    serde_json::from_value(pv).expect("PV literal matches the PersistentVolume schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{StorageNodeSpec, StorageNodeStatus};

    fn class(mode: &str, params: &[(&str, &str)]) -> StorageClass {
        serde_json::from_value(json!({
            "metadata": { "name": "c" },
            "provisioner": local::DRIVER_NAME,
            "volumeBindingMode": mode,
            "parameters": params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap()
    }

    fn claim(size: &str, modes: &[&str], selected: Option<&str>) -> PersistentVolumeClaim {
        let mut c: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": { "name": "data", "namespace": "ns", "uid": "u1" },
            "spec": { "storageClassName": "c", "accessModes": modes,
                      "resources": { "requests": { "storage": size } } },
        }))
        .unwrap();
        if let Some(node) = selected {
            c.metadata.annotations = Some(BTreeMap::from([(
                ANN_SELECTED_NODE.to_string(),
                node.to_string(),
            )]));
        }
        c
    }

    fn node(name: &str, capacity: i64) -> StorageNode {
        let mut n = StorageNode::new(
            name,
            StorageNodeSpec {
                driver: local::DRIVER_NAME.into(),
                node: name.into(),
            },
        );
        n.status = Some(StorageNodeStatus {
            capacity_bytes: capacity,
            ..Default::default()
        });
        n
    }

    fn plan_for(
        claim: &PersistentVolumeClaim,
        class: &StorageClass,
        nodes: &[&StorageNode],
    ) -> Provision {
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
            node_topology: None,
            cluster_topology: Vec::new(),
        })
    }

    const GI: i64 = 1 << 30;

    #[test]
    fn immediate_remote_claims_ask_for_every_segment_the_driver_runs_in() {
        let mut class = class("Immediate", &[]);
        class.provisioner = "hostpath.csi.k8s.io".into();
        let zones: Vec<BTreeMap<String, String>> = ["a", "b"]
            .iter()
            .map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]))
            .collect();
        let claim = claim("1Gi", &["ReadWriteOnce"], None);
        let Provision::CreateVolume(v) = plan(&ClaimView {
            claim: &claim,
            class: Some(&class),
            volume: None,
            pv: None,
            storage_nodes: &[],
            promised: &BTreeMap::new(),
            static_match: false,
            remote: true,
            serve_local: true,
            node_topology: None,
            cluster_topology: zones.clone(),
        }) else {
            panic!("expected a Volume")
        };
        assert_eq!(v.spec.driver, "hostpath.csi.k8s.io");
        assert_eq!(v.spec.requisite_topology, zones);
        assert_eq!(v.spec.node, None);
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

    fn under_pressure(mut n: StorageNode) -> StorageNode {
        let status = n.status.as_mut().unwrap();
        status.conditions = vec![crate::crd::VolumeCondition {
            type_: crate::node::DISK_PRESSURE.into(),
            status: crate::crd::ConditionStatus::True,
            reason: "FreeSpaceBelowReserve".into(),
            message: "the data filesystem has 5 bytes free".into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ),
            observed_generation: None,
        }];
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
        let Provision::Fail(e) = plan_for(&claim("2Gi", &["ReadWriteOnce"], None), &imm, &[&a])
        else {
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
}
