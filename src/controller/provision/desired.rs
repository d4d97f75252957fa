//! The objects provisioning writes, one builder each: the Volume (intent,
//! before any data) and the PV external-provisioner would create. The
//! local and `--csi-driver` variants differ only in placement, the CSI
//! source and the node affinity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttributesClass};
use kube::ResourceExt;
use serde_json::{Value, json};

use super::super::protocol::*;
use super::super::secrets;
use super::source;
use super::topology::{self, Requirement};
use super::{
    ClaimView, ProvisionError, check_room_on, choose_node, requested_bytes, template_values,
    volume_name,
};
use crate::backend::local::{self, Layout, Parameters};
use crate::compact_map::CompactMap;
use crate::controller::cached_claim::Claim;
use crate::crd::{
    AccessMode, ClaimReference, NODE_LABEL, ReclaimPolicy, VOLUME_FINALIZER, Volume, VolumeMode,
    VolumeSource, VolumeSpec,
};
use crate::quantity::format_bytes;

/// Where a Volume's data goes: a node (local), or what the driver is told
/// (`--csi-driver`): the topology it must honour and the class's mount
/// options.
enum Placement {
    Node(String),
    Driver {
        topology: Requirement,
        mount_options: Vec<String>,
    },
}

/// The claim's access modes, each one `allowed`.
fn access_modes(claim: &Claim, allowed: &[AccessMode]) -> Result<Vec<AccessMode>, ProvisionError> {
    let modes = claim.spec.as_ref().and_then(|s| s.access_modes.clone());
    modes
        .unwrap_or_default()
        .iter()
        .map(|m| {
            serde_json::from_value::<AccessMode>(json!(m))
                .ok()
                .filter(|mode| allowed.contains(mode))
                .ok_or_else(|| ProvisionError::AccessMode(m.clone()))
        })
        .collect()
}

fn volume_mode(claim: &Claim) -> VolumeMode {
    match claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) {
        Some("Block") => VolumeMode::Block,
        _ => VolumeMode::Filesystem,
    }
}

/// The local Volume a claim starts from (a snapshot Volume, or the
/// cloned claim's Volume) and the node its data is on; None without a
/// data source.
fn local_source(
    view: &ClaimView,
    params: &Parameters,
) -> Result<Option<(String, String)>, ProvisionError> {
    let claim = view.claim;
    let Some(requested) = source::requested(claim) else {
        return Ok(None);
    };
    let found = source::content_source(claim, local::DRIVER_NAME, &requested, &view.source)?;
    let Some(VolumeSource::Snapshot(from) | VolumeSource::Handle(from)) = found else {
        return Err(ProvisionError::Source(format!(
            "{} {} could not be looked up",
            requested.kind, requested.name
        )));
    };
    if params.layout == Layout::Dir {
        return Err(ProvisionError::Source(
            "a restore or clone needs an image volume: remove `layout: dir` from the StorageClass"
                .into(),
        ));
    }
    let node = view.source_node.clone().ok_or_else(|| {
        ProvisionError::Source(format!("the data of {from} is on no node stowage knows"))
    })?;
    Ok(Some((from, node)))
}

/// Every Volume stowage writes: held by our finalizer until its data is
/// gone, and labelled with its node, if it has one, so that only that
/// node's agent watches it.
pub fn new_volume(name: &str, spec: VolumeSpec) -> Volume {
    let node = spec.node.clone();
    let mut volume = Volume::new(name, spec);
    volume.metadata.finalizers = Some(vec![VOLUME_FINALIZER.to_string()]);
    volume.metadata.labels = node.map(|n| BTreeMap::from([(NODE_LABEL.to_string(), n)]));
    volume
}

/// The one Volume builder for claims: what both kinds share (claim, PV
/// name, reclaim policy), placed as `placement` says.
fn volume(
    claim: &Claim,
    class: &StorageClass,
    bytes: i64,
    access_modes: Vec<AccessMode>,
    placement: Placement,
) -> Volume {
    let name = volume_name(claim).expect("claims from the API server have a UID");
    let (node, topology, mount_options) = match placement {
        Placement::Node(node) => (Some(node), Requirement::default(), Vec::new()),
        Placement::Driver {
            topology,
            mount_options,
        } => (None, topology, mount_options),
    };
    new_volume(
        &name,
        VolumeSpec {
            driver: class.provisioner.clone(),
            parameters: class.parameters.clone().unwrap_or_default().into(),
            capacity_bytes: bytes,
            access_modes,
            volume_mode: volume_mode(claim),
            node,
            requisite_topology: topology.requisite,
            preferred_topology: topology.preferred,
            mount_options,
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
            volume_attributes_class_name: None,
            mutable_parameters: CompactMap::new(),
        },
    )
}

/// The Volume to write for a claim of `local.stowage.dev`, or None while
/// waiting for the scheduler.
pub(super) fn desired_volume(
    view: &ClaimView,
    class: &StorageClass,
) -> Result<Option<Volume>, ProvisionError> {
    let claim = view.claim;
    let params = Parameters::parse(&class.parameters.clone().unwrap_or_default())?;
    let modes = access_modes(
        claim,
        &[AccessMode::ReadWriteOnce, AccessMode::ReadWriteOncePod],
    )?;
    if volume_mode(claim) == VolumeMode::Block && params.layout == Layout::Dir {
        return Err(ProvisionError::BlockOnDir);
    }
    if let Some(name) = attributes_class_name(claim) {
        return Err(ProvisionError::AttributesClassOnLocal(name.to_string()));
    }
    let source = local_source(view, &params)?;
    let bytes = params.allocated_bytes(requested_bytes(claim)?);
    let wffc = class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
    let node = match (&source, wffc) {
        (_, true) => {
            let Some(selected) = claim.annotations().get(ANN_SELECTED_NODE) else {
                return Ok(None);
            };
            if let Some((from, node)) = source.as_ref().filter(|(_, n)| n != selected) {
                return Err(ProvisionError::Source(format!(
                    "the data of {from} is on node {node}, and the scheduler chose {selected}: \
                     a restore or clone of a local volume is made on its source's node; \
                     give the pod a nodeAffinity for {node}"
                )));
            }
            check_room_on(view, selected, bytes)?;
            selected.clone()
        }
        (Some((_, node)), false) => {
            check_room_on(view, node, bytes)?;
            node.clone()
        }
        (None, false) => choose_node(view, bytes)?,
    };
    let mut volume = volume(claim, class, bytes, modes, Placement::Node(node));
    volume.spec.source = source.map(|(from, _)| VolumeSource::Volume(from));
    Ok(Some(volume))
}

/// The Volume to write for a claim of a `--csi-driver`: the driver decides
/// placement, within the scheduler's node's topology for
/// `WaitForFirstConsumer`.
pub(super) fn desired_remote_volume(
    view: &ClaimView,
    class: &StorageClass,
) -> Result<Option<Volume>, ProvisionError> {
    let claim = view.claim;
    let name = volume_name(claim).expect("claims from the API server have a UID");
    let parameters = class.parameters.clone().unwrap_or_default();
    if let Some(key) = secrets::unknown_reserved_key(&parameters) {
        return Err(ProvisionError::ReservedParameter(key.to_string()));
    }
    let fs_type_keys = secrets::fs_type_keys(&parameters);
    if fs_type_keys.len() > 1 {
        return Err(ProvisionError::FsTypeTwice(fs_type_keys.join(" and ")));
    }
    secrets::all_refs(&parameters, &template_values(claim, &name))?;
    let content = match source::requested(claim) {
        None => None,
        Some(requested) => {
            let found =
                source::content_source(claim, &class.provisioner, &requested, &view.source)?;
            // Another kind is a volume populator's to fill, as upstream
            // leaves it.
            if found.is_none() {
                return Ok(None);
            }
            found
        }
    };
    let all = [
        AccessMode::ReadWriteOnce,
        AccessMode::ReadWriteOncePod,
        AccessMode::ReadOnlyMany,
        AccessMode::ReadWriteMany,
    ];
    let modes = access_modes(claim, &all)?;
    let bytes = requested_bytes(claim)?;
    let wffc = class.volume_binding_mode.as_deref() == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
    let selected = if wffc {
        let Some(selected) = claim.annotations().get(ANN_SELECTED_NODE) else {
            return Ok(None);
        };
        Some(selected.as_str())
    } else {
        None
    };
    let topology = topology::requirement(
        &class.provisioner,
        &claim.name_any(),
        class.allowed_topologies.as_deref().unwrap_or_default(),
        selected,
        &view.driver_nodes,
    )?;
    let mut volume = volume(
        claim,
        class,
        bytes,
        modes,
        Placement::Driver {
            topology: topology.unwrap_or_default(),
            mount_options: class.mount_options.clone().unwrap_or_default(),
        },
    );
    volume.spec.source = content;
    if let Some(name) = attributes_class_name(claim) {
        let attributes = attributes_class(view, class, name)?;
        volume.spec.volume_attributes_class_name = Some(name.to_string());
        volume.spec.mutable_parameters = attributes.parameters.clone().unwrap_or_default().into();
    }
    Ok(Some(volume))
}

/// The claim's `volumeAttributesClassName`, if it names one.
pub fn attributes_class_name(claim: &Claim) -> Option<&str> {
    claim
        .spec
        .as_ref()?
        .volume_attributes_class_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// The VolumeAttributesClass a claim names, which must exist and be for
/// the class's driver (external-provisioner's checks).
fn attributes_class<'a>(
    view: &ClaimView<'a>,
    class: &StorageClass,
    name: &str,
) -> Result<&'a VolumeAttributesClass, ProvisionError> {
    let attributes = view
        .attributes_class
        .ok_or_else(|| ProvisionError::NoAttributesClass(name.to_string()))?;
    if attributes.driver_name != class.provisioner {
        return Err(ProvisionError::AttributesClassDriver {
            name: name.to_string(),
            theirs: attributes.driver_name.clone(),
            ours: class.provisioner.clone(),
        });
    }
    Ok(attributes)
}

/// The one PV builder: what external-provisioner writes for every driver,
/// with the CSI source and node affinity of the volume's kind.
fn pv(
    claim: &Claim,
    class: &StorageClass,
    volume: &Volume,
    capacity: i64,
    csi: Value,
    node_affinity: Option<Value>,
) -> PersistentVolume {
    let block = volume.spec.volume_mode == VolumeMode::Block;
    let mut pv = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume.name_any(),
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
    if let Some(affinity) = node_affinity {
        pv["spec"]["nodeAffinity"] = affinity;
    }
    if let Some(attributes) = &volume.spec.volume_attributes_class_name {
        pv["spec"]["volumeAttributesClassName"] = json!(attributes);
    }
    serde_json::from_value(pv).expect("PV literal matches the PersistentVolume schema")
}

/// Node affinity that a node matches by matching any one of `terms`, each
/// a list of match expressions that must all hold.
fn required_affinity(terms: Vec<Vec<Value>>) -> Value {
    let terms: Vec<Value> = terms
        .into_iter()
        .map(|expressions| json!({ "matchExpressions": expressions }))
        .collect();
    json!({ "required": { "nodeSelectorTerms": terms } })
}

/// The PV external-provisioner would create for this volume.
pub fn desired_pv(claim: &Claim, class: &StorageClass, volume: &Volume) -> PersistentVolume {
    if volume.spec.driver != local::DRIVER_NAME {
        return desired_remote_pv(claim, class, volume);
    }
    // Built from the spec alone: the status of a node-local Volume is
    // written by its node agent, which must not be able to point the PV at
    // another volume (handle), give it attributes, or grow it. The agent
    // names the data after the Volume and creates it at the spec's size.
    let node = volume.spec.node.clone().unwrap_or_default();
    let params = Parameters::parse(&volume.spec.parameters).unwrap_or_default();
    let block = volume.spec.volume_mode == VolumeMode::Block;
    let csi = json!({
        "driver": local::DRIVER_NAME,
        "volumeHandle": volume.name_any(),
        "fsType": if block { None } else { Some(params.fs_type.as_str()) },
        "volumeAttributes": { "layout": match params.layout { Layout::Image => "image", Layout::Dir => "dir" } },
    });
    let affinity = required_affinity(vec![vec![
        json!({ "key": local::TOPOLOGY_KEY, "operator": "In", "values": [node] }),
    ]]);
    pv(
        claim,
        class,
        volume,
        volume.spec.capacity_bytes,
        csi,
        Some(affinity),
    )
}

/// The PV external-provisioner would create for a `--csi-driver` volume.
fn desired_remote_pv(claim: &Claim, class: &StorageClass, volume: &Volume) -> PersistentVolume {
    // The status of a `--csi-driver` Volume is the controller's own (the
    // node agents' admission policy keeps them to Volumes with a spec.node):
    // handle, context and topology are what CreateVolume returned.
    let status = volume.status.clone().unwrap_or_default();
    // CSI's 0 means "unknown": the request is the best we know.
    let capacity = status
        .capacity_bytes
        .filter(|b| *b > 0)
        .unwrap_or(volume.spec.capacity_bytes);
    let params = &volume.spec.parameters;
    let mut csi = json!({
        "driver": volume.spec.driver,
        "volumeHandle": status.volume_handle.clone().unwrap_or_else(|| volume.name_any()),
        "volumeAttributes": status.volume_context,
    });
    if volume.spec.volume_mode != VolumeMode::Block
        && let Some(fs) = secrets::fs_type(params)
    {
        csi["fsType"] = json!(fs);
    }
    let name = volume.name_any();
    let mut annotations = BTreeMap::new();
    // Checked by `after_volume_written` just before: these resolve.
    for (kind, r) in secrets::all_refs(params, &template_values(claim, &name)).unwrap_or_default() {
        if let Some(field) = kind.pv_field() {
            csi[field] = json!(r);
        }
        if let Some((name_key, namespace_key)) = kind.pv_annotations() {
            annotations.insert(name_key.to_string(), r.name);
            annotations.insert(namespace_key.to_string(), r.namespace);
        }
    }
    // As external-provisioner: one term per segment, so a node in any
    // segment the driver reported may use the volume.
    let segments: Vec<_> = status.segments().iter().filter(|s| !s.is_empty()).collect();
    let affinity = (!segments.is_empty()).then(|| {
        required_affinity(
            segments
                .into_iter()
                .map(|segment| {
                    segment
                        .iter()
                        .map(|(k, v)| json!({ "key": k, "operator": "In", "values": [v] }))
                        .collect()
                })
                .collect(),
        )
    });
    let mut pv = pv(claim, class, volume, capacity, csi, affinity);
    pv.metadata
        .annotations
        .get_or_insert_default()
        .extend(annotations);
    pv
}
