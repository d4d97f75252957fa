//! `StorageNode`: what a node agent offers for node-local volumes.
//!
//! Written by `stowage node`, read by the controller to choose a node for
//! `Immediate` claims and to check that a selected node can hold a volume.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type on StorageNode, named after kubelet's Node condition:
/// free space below the reserve; no new volumes land on the node.
pub const DISK_PRESSURE: &str = "DiskPressure";

#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "StorageNode",
    plural = "storagenodes",
    shortname = "snode",
    category = "stowage",
    status = "StorageNodeStatus",
    printcolumn = r#"{"name":"Driver","type":"string","jsonPath":".spec.driver"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".status.capacityBytes"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.availableBytes"}"#,
    printcolumn = r#"{"name":"DiskPressure","type":"string","jsonPath":".status.conditions[?(@.type==\"DiskPressure\")].status"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".status.heartbeatTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StorageNodeSpec {
    /// Driver whose volumes this node agent carries out.
    pub driver: String,
    /// Kubernetes Node name (also this object's name).
    pub node: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageNodeStatus {
    /// Bytes volumes on this node may add up to (their sizes, not what
    /// they hold, since images are sparse): `--capacity`, or the data
    /// filesystem's free bytes plus those stowage's images hold there, less
    /// the reserve.
    pub capacity_bytes: i64,
    /// Free bytes on the data directory's filesystem right now.
    pub available_bytes: i64,
    /// Bytes of the data filesystem kept free (`--capacity-reserve`).
    #[serde(default)]
    pub reserve_bytes: i64,
    /// Directory under which volumes are kept.
    pub data_dir: String,
    /// Last time the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// `DiskPressure`: True while free bytes are below the reserve; the
    /// controller places no new volume here then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<super::VolumeCondition>,
}
