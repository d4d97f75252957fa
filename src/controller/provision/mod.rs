//! external-provisioner's job, for `local.stowage.dev` and every
//! `--csi-driver`, decided by a pure `plan` over a snapshot of objects.
//!
//! A claim moves through: Volume written (intent, before any data) → the
//! node agent (local) or the volume job (`--csi-driver`: CreateVolume)
//! creates the data → PV `pvc-<claim uid>` created with a pre-set
//! claimRef → bound (see `bind/`). Every step is keyed by the claim's UID, so
//! a retried or restarted step finds the work already done instead of doing
//! it twice.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttributesClass};
use kube::ResourceExt;

use super::capacity;
use super::protocol::*;
use super::secrets::{self, TemplateValues};
use crate::backend::local;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::{StorageNode, Volume, VolumePhase};
use crate::quantity::{format_bytes, parse_bytes};

mod apply;
mod desired;
mod reschedule;
pub mod source;
pub mod topology;

pub use apply::apply;

pub use desired::{attributes_class_name, desired_pv, new_volume};
use desired::{desired_remote_volume, desired_volume};

/// Everything `plan` looks at for one claim.
pub struct ClaimView<'a> {
    pub claim: &'a Claim,
    pub class: Option<&'a StorageClass>,
    /// The Volume named after the claim, if written.
    pub volume: Option<&'a Volume>,
    /// The PV named after the claim, if created.
    pub pv: Option<&'a Pv>,
    pub storage_nodes: &'a [&'a StorageNode],
    /// Bytes each node has promised to Volumes already.
    pub promised: &'a BTreeMap<String, i64>,
    /// An existing PV can be bound instead (binding is tried first, as kcm does).
    pub static_match: bool,
    /// The class's provisioner is a `--csi-driver` that stowage serves.
    pub remote: bool,
    /// `--serve-local`: this controller provisions `local.stowage.dev`.
    pub serve_local: bool,
    /// For a `--csi-driver` claim still to be provisioned: every node whose
    /// CSINode lists the driver, with its topology keys and labels.
    pub driver_nodes: Vec<topology::DriverNode>,
    /// The VolumeAttributesClass the claim names, when it exists (read only
    /// for a `--csi-driver` claim still to be provisioned).
    pub attributes_class: Option<&'a VolumeAttributesClass>,
    /// What the claim's dataSource names, read only for a `--csi-driver`
    /// claim still to be provisioned.
    pub source: source::Lookup,
    /// For a local claim with a data source: the node its data is on.
    pub source_node: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Provision {
    /// Not ours, or nothing to provision.
    Skip,
    /// `WaitForFirstConsumer` and the scheduler has not picked a node yet.
    WaitForConsumer,
    /// The claim's dataSource is of a kind a volume populator fills.
    LeftToPopulator,
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
    #[error("cannot use the claim's dataSource: {0}")]
    Source(String),
    #[error("{0}")]
    CrossNamespaceSource(#[from] source::grant::AccessError),
    #[error("{0}")]
    Secrets(#[from] super::secrets::SecretError),
    #[error("{0}")]
    Topology(#[from] topology::TopologyError),
    #[error(
        "StorageClass parameter {0} is not one Kubernetes defines under csi.storage.k8s.io/ \
         (fstype and the *-secret-name and *-secret-namespace pairs): remove it"
    )]
    ReservedParameter(String),
    #[error(
        "StorageClass parameters {0} each give the filesystem type: keep csi.storage.k8s.io/fstype alone"
    )]
    FsTypeTwice(String),
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
    #[error("node {node} takes no new volumes: {message}")]
    NodeNotReady { node: String, message: String },
    #[error(
        "no node can take a new volume: the stowage agent of every node stopped \
         reporting ({nodes}); is the stowage-node DaemonSet running?"
    )]
    NoReadyNodes { nodes: String },
    #[error(
        "no node can take a new volume: every node with a stowage agent is under \
         disk pressure ({nodes}); on {first}: {message}"
    )]
    AllUnderDiskPressure {
        nodes: String,
        first: String,
        message: String,
    },
    #[error(
        "{driver} has no mutable parameters, so it takes no VolumeAttributesClass: remove volumeAttributesClassName {0:?} from the claim",
        driver = local::DRIVER_NAME
    )]
    AttributesClassOnLocal(String),
    #[error(
        "VolumeAttributesClass {0:?} does not exist: create it, or change the claim's volumeAttributesClassName"
    )]
    NoAttributesClass(String),
    #[error(
        "VolumeAttributesClass {name:?} is for driver {theirs}, not {ours}: name one whose driverName is {ours}"
    )]
    AttributesClassDriver {
        name: String,
        theirs: String,
        ours: String,
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
                | ProvisionError::Topology(_)
                | ProvisionError::NodeWithoutAgent(_)
                | ProvisionError::NoRoom { .. }
                | ProvisionError::NoRoomOnNode { .. }
                | ProvisionError::DiskPressure { .. }
                | ProvisionError::AllUnderDiskPressure { .. }
                | ProvisionError::NodeNotReady { .. }
                | ProvisionError::NoReadyNodes { .. }
                | ProvisionError::NoAttributesClass(_)
                | ProvisionError::Source(_)
                | ProvisionError::Backend { .. }
                | ProvisionError::Driver { .. }
        )
    }

    /// The `error` label of `stowage_reconcile_failures_total{job="claim"}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProvisionError::Parameters(_) => "bad_parameters",
            ProvisionError::AccessMode(_) => "bad_access_mode",
            ProvisionError::NoSize | ProvisionError::BadSize(..) | ProvisionError::ZeroSize => {
                "bad_size"
            }
            ProvisionError::BlockOnDir => "block_on_dir",
            ProvisionError::Source(_) | ProvisionError::CrossNamespaceSource(_) => "data_source",
            ProvisionError::Secrets(_) => "secrets",
            ProvisionError::Topology(_) => "no_topology",
            ProvisionError::ReservedParameter(_) | ProvisionError::FsTypeTwice(_) => {
                "bad_parameters"
            }
            ProvisionError::NoNodes | ProvisionError::NodeWithoutAgent(_) => "no_node_agent",
            ProvisionError::NoRoom { .. } | ProvisionError::NoRoomOnNode { .. } => "no_room",
            ProvisionError::DiskPressure { .. } | ProvisionError::AllUnderDiskPressure { .. } => {
                "disk_pressure"
            }
            ProvisionError::NodeNotReady { .. } | ProvisionError::NoReadyNodes { .. } => {
                "node_not_ready"
            }
            ProvisionError::AttributesClassOnLocal(_)
            | ProvisionError::NoAttributesClass(_)
            | ProvisionError::AttributesClassDriver { .. } => "attributes_class",
            ProvisionError::Backend { .. } => "node_failed",
            ProvisionError::Driver { .. } => "driver_failed",
        }
    }
}

/// The driver that provisions this claim, if the claim asks for one.
pub fn claim_provisioner<'a>(claim: &'a Claim, class: Option<&'a StorageClass>) -> Option<&'a str> {
    let ann = claim.annotations();
    ann.get(ANN_STORAGE_PROVISIONER)
        .or_else(|| ann.get(ANN_BETA_STORAGE_PROVISIONER))
        .map(String::as_str)
        .or_else(|| class.map(|c| c.provisioner.as_str()))
}

/// PV and Volume name for a claim, as external-provisioner names PVs.
pub fn volume_name(claim: &Claim) -> Option<String> {
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
    // Before the populator's kinds too: upstream checks access to
    // another namespace whatever the source is.
    if let source::Lookup::Refused(refused) = &view.source {
        return Provision::Fail(refused.clone().into());
    }
    if source::left_to_populator(claim) {
        return Provision::LeftToPopulator;
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
            // Resolved again for the PV: a name template may use a claim
            // annotation that changed since the Volume was written.
            if volume.spec.driver != local::DRIVER_NAME
                && let Err(e) = secrets::all_refs(
                    &volume.spec.parameters,
                    &template_values(view.claim, &volume.name_any()),
                )
            {
                return Provision::Fail(e.into());
            }
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

pub(super) fn check_room_on(
    view: &ClaimView,
    node: &str,
    bytes: i64,
) -> Result<(), ProvisionError> {
    refuse_not_ready(view, node)?;
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
pub(super) fn choose_node(view: &ClaimView, bytes: i64) -> Result<String, ProvisionError> {
    let live = ready_nodes(view)?;
    let pressured: BTreeMap<&str, &str> = live
        .iter()
        .filter(|n| n.spec.driver == local::DRIVER_NAME)
        .filter_map(|n| Some((n.spec.node.as_str(), capacity::pressure(n)?)))
        .collect();
    let mut free = capacity::free_bytes(&live, view.promised);
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

/// A node whose agent stopped reporting (its StorageNode `Ready=False`,
/// written by the controller's node liveness job) takes no new volume.
fn refuse_not_ready(view: &ClaimView, node: &str) -> Result<(), ProvisionError> {
    let silent = view
        .storage_nodes
        .iter()
        .filter(|n| n.spec.node == node)
        .find_map(|n| capacity::not_ready(n));
    match silent {
        Some(message) => Err(ProvisionError::NodeNotReady {
            node: node.to_string(),
            message: message.to_string(),
        }),
        None => Ok(()),
    }
}

/// The StorageNodes whose agents still report; an error when every agent
/// of our driver went silent (not the same as having none).
fn ready_nodes<'a>(view: &ClaimView<'a>) -> Result<Vec<&'a StorageNode>, ProvisionError> {
    let ours = || {
        view.storage_nodes
            .iter()
            .copied()
            .filter(|n| n.spec.driver == local::DRIVER_NAME)
    };
    let live: Vec<_> = ours()
        .filter(|n| capacity::not_ready(n).is_none())
        .collect();
    if live.is_empty() && ours().next().is_some() {
        let nodes: Vec<_> = ours().map(|n| n.spec.node.as_str()).collect();
        return Err(ProvisionError::NoReadyNodes {
            nodes: nodes.join(", "),
        });
    }
    Ok(live)
}

pub(super) fn requested_bytes(claim: &Claim) -> Result<i64, ProvisionError> {
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

pub(super) fn template_values<'a>(claim: &'a Claim, pv_name: &'a str) -> TemplateValues<'a> {
    TemplateValues {
        pv_name,
        claim_namespace: claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim_name: claim.metadata.name.as_deref().unwrap_or_default(),
        claim_annotations: claim.annotations(),
    }
}

#[cfg(test)]
mod tests;
