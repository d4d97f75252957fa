//! `Volume`: the durable record of one backend volume.
//!
//! The controller writes intent into `spec` before any backend call; whoever
//! carries the work out (the controller for remote backends, the node agent
//! for node-local ones) reports in `status`. If anything dies between "decide"
//! and "done", the intent is still here: nothing is leaked, nothing done twice.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::compact_map::CompactMap;

/// Finalizer that holds a Volume until the backend data is gone (or kept by
/// the reclaim policy).
pub const VOLUME_FINALIZER: &str = "stowage.dev/volume-protection";

/// Label naming the node that holds a node-local Volume, so each node agent
/// watches only its own.
pub const NODE_LABEL: &str = "stowage.dev/node";

/// What a backend volume should be. Fixed when written, except that
/// `capacityBytes` may grow: see `super::all` for the rules that say so.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Volume",
    plural = "volumes",
    derive = "PartialEq",
    shortname = "svol",
    category = "stowage",
    status = "VolumeStatus",
    printcolumn = r#"{"name":"Driver","type":"string","jsonPath":".spec.driver"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".status.capacityBytes"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Claim","type":"string","jsonPath":".spec.claim.name","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// CSI driver name that owns this volume, e.g. `local.stowage.dev`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub driver: String,

    /// Backend parameters, taken from the StorageClass when provisioned.
    #[serde(default, skip_serializing_if = "CompactMap::is_empty")]
    pub parameters: CompactMap<String, String>,

    /// Requested size in bytes. Grows on expansion; never shrinks.
    #[x_kube(validation = Rule::new("self >= oldSelf").message("capacityBytes cannot shrink"))]
    #[schemars(range(min = 1))]
    pub capacity_bytes: i64,

    /// Access modes the volume must support.
    #[schemars(length(min = 1))]
    pub access_modes: Vec<AccessMode>,

    /// Whether the volume carries a filesystem or is a raw block device.
    #[serde(default)]
    pub volume_mode: VolumeMode,

    /// Node that holds the data, for node-local backends. Set once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,

    /// Topology segments the volume must be reachable from (for CSI drivers
    /// with accessibility constraints: the scheduler's node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requisite_topology: Vec<BTreeMap<String, String>>,

    /// The requisite segments in the order the driver should try them
    /// (CreateVolume's preferred topology): the scheduler's node's first
    /// for WaitForFirstConsumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_topology: Vec<BTreeMap<String, String>>,

    /// The StorageClass's mountOptions, for CSI drivers: CreateVolume's
    /// mount flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,

    /// Data to pre-populate the volume with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,

    /// The claim this volume was provisioned for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimReference>,

    /// Name of the PersistentVolume that exposes this volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_name: Option<String>,

    /// What happens to the data when the claim is released.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,

    /// The claim's VolumeAttributesClass at provisioning, for `--csi-driver`s
    /// that offer MODIFY_VOLUME; the PV carries it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_attributes_class_name: Option<String>,

    /// That class's parameters, CreateVolume's `mutable_parameters`.
    #[serde(default, skip_serializing_if = "CompactMap::is_empty")]
    pub mutable_parameters: CompactMap<String, String>,
}

/// Kubernetes access modes, spelled as in PersistentVolume specs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteMany,
    ReadWriteOncePod,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VolumeMode {
    #[default]
    Filesystem,
    Block,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReclaimPolicy {
    #[default]
    Delete,
    Retain,
}

/// Where initial content comes from. Externally tagged: exactly one key.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    /// A VolumeSnapshot's backend snapshot handle.
    Snapshot(String),
    /// Another Volume of the same driver, by name.
    Volume(String),
    /// Another volume of the same `--csi-driver`, by the driver's handle
    /// (a clone; the source may predate stowage and have no Volume).
    Handle(String),
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimReference {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ClaimReference {
    /// The claim as an event's `regarding`.
    pub fn object_reference(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..Default::default()
        }
    }
}

/// What has been done, as reported by whoever carries the work out.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Size in bytes the backend actually holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,

    /// Backend handle (CSI volume id) once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,

    /// The first of `accessibleTopology`, the only segment versions before
    /// it recorded and read: still written, so that going back to such an
    /// image keeps giving new PVs their node affinity.
    #[serde(default, skip_serializing_if = "CompactMap::is_empty")]
    pub topology: CompactMap<String, String>,

    /// Every topology segment the backend reported the volume accessible
    /// from. The PV's node affinity has one term per segment: a node in
    /// any of them can use the volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accessible_topology: Vec<CompactMap<String, String>>,

    /// The CSI volume context the backend returned, passed on in the PV.
    #[serde(default, skip_serializing_if = "CompactMap::is_empty")]
    pub volume_context: CompactMap<String, String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VolumeCondition>,

    /// The last failure, in words that say what to change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl VolumeStatus {
    /// The segments the volume is accessible from: `accessibleTopology`,
    /// or for a status written before it, its one `topology`.
    pub fn segments(&self) -> &[CompactMap<String, String>] {
        if self.accessible_topology.is_empty() && !self.topology.is_empty() {
            std::slice::from_ref(&self.topology)
        } else {
            &self.accessible_topology
        }
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VolumePhase {
    /// Intent recorded; nothing created yet.
    #[default]
    Pending,
    /// The backend is creating the data.
    Creating,
    /// Data exists with the requested size.
    Ready,
    /// The backend is removing the data.
    Deleting,
    /// The last attempt failed; see conditions and lastError.
    Failed,
}

/// What whoever carries a Volume out (its node's agent, or the controller
/// for a `--csi-driver`) has left to do, read from the object alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outstanding {
    /// Done for this generation, or deleted with nothing of ours left.
    Nothing,
    /// Create the data, or finish creating it, or grow it to the spec.
    Create,
    /// Being deleted and still held by our finalizer: the data goes first.
    Delete,
}

impl Volume {
    pub fn outstanding(&self) -> Outstanding {
        if self.metadata.deletion_timestamp.is_some() {
            let held = self
                .metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f == VOLUME_FINALIZER);
            return if held {
                Outstanding::Delete
            } else {
                Outstanding::Nothing
            };
        }
        let done = self.status.as_ref().is_some_and(|s| {
            s.phase == VolumePhase::Ready && s.observed_generation == self.metadata.generation
        });
        if done {
            Outstanding::Nothing
        } else {
            Outstanding::Create
        }
    }
}

/// Same shape as `metav1.Condition`, so kubectl and tooling read it as usual.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCondition {
    /// CamelCase condition type: Ready, Expanded, Healthy, ...
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// CamelCase machine-readable reason.
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn string_maps_round_trip_and_hold_one_entry_in_one_entrys_room() {
        let text = json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "Volume",
            "metadata": { "name": "pvc-1" },
            "spec": {
                "driver": "hostpath.csi.k8s.io",
                "parameters": { "kind": "fast", "csi.storage.k8s.io/fstype": "xfs" },
                "capacityBytes": 1,
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "reclaimPolicy": "Delete",
                "mutableParameters": { "iops": "3000" },
            },
            "status": {
                "phase": "Ready",
                "topology": { "zone": "a" },
                "volumeContext": { "b": "2", "a": "1" },
            },
        });
        let volume: Volume = serde_json::from_value(text.clone()).unwrap();
        assert_eq!(serde_json::to_value(&volume).unwrap(), text);
        let parameters = &volume.spec.parameters;
        assert_eq!(parameters["kind"], "fast");
        assert_eq!(
            parameters.to_btree(),
            BTreeMap::from([
                ("csi.storage.k8s.io/fstype".into(), "xfs".into()),
                ("kind".into(), "fast".into()),
            ])
        );
        // Empty maps are left out, as they were.
        let mut bare = volume.clone();
        bare.spec.parameters = CompactMap::new();
        bare.status = Some(VolumeStatus::default());
        let written = serde_json::to_value(&bare).unwrap();
        assert_eq!(written["spec"].get("parameters"), None);
        assert_eq!(written["status"], json!({ "phase": "Pending" }));

        assert!(size_of::<CompactMap<String, String>>() < size_of::<BTreeMap<String, String>>());
        let entry = size_of::<(String, String)>();
        assert_eq!(volume.spec.mutable_parameters.heap_bytes(), entry);
        assert_eq!(volume.status.unwrap().topology.heap_bytes(), entry);
    }

    #[test]
    fn schema_is_structural_for_enums() {
        let crd = serde_json::to_value(&crate::crd::all()[0]).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let modes = &spec["properties"]["accessModes"]["items"];
        assert_eq!(modes["type"], "string");
        assert_eq!(modes["enum"].as_array().unwrap().len(), 4);
        assert_eq!(
            spec["properties"]["capacityBytes"]["minimum"].as_f64(),
            Some(1.0)
        );
    }

    #[test]
    fn immutability_rules_are_in_the_schema() {
        let crd = serde_json::to_string(&crate::crd::all()[0]).unwrap();
        assert!(crd.contains("driver is immutable"));
        assert!(crd.contains("node is immutable"));
        assert!(crd.contains("parameters is immutable"));
        assert!(!crd.contains("capacityBytes is immutable"));
        assert!(crd.contains("capacityBytes cannot shrink"));
    }
}
