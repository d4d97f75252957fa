//! The next step for one claim's expansion, decided from a snapshot of the
//! claim, its PV, StorageClass and Volume, and the room on the Volume's
//! node. No API calls here.

use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use super::{
    CONTROLLER_RESIZE_IN_PROGRESS, CONTROLLER_RESIZE_INFEASIBLE, NODE_RESIZE_IN_PROGRESS,
    NODE_RESIZE_INFEASIBLE, NODE_RESIZE_PENDING,
};
use crate::backend::local::{self, Parameters};
use crate::compact_map::CompactMap;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::{Volume, VolumePhase, VolumeStatus};
use crate::quantity::{format_bytes, parse_bytes};

/// Everything `plan` looks at for one claim.
pub struct ResizeView<'a> {
    pub claim: &'a Claim,
    pub pv: Option<&'a Pv>,
    pub class: Option<&'a StorageClass>,
    pub volume: Option<&'a Volume>,
    /// Free bytes on the Volume's node; None when no agent runs there.
    pub free_on_node: Option<i64>,
    /// When the PV's driver is a `--csi-driver`: whether it offers
    /// EXPAND_VOLUME (ControllerExpandVolume).
    pub remote_expands: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resize {
    /// Not ours, not asked, or kubelet's turn.
    Nothing,
    /// Cannot be done as asked: tell the user what to change.
    Refuse(ResizeError),
    /// Record the size being worked towards: `allocatedResources`,
    /// `ControllerResizeInProgress`, condition `Resizing`.
    Start { request: String },
    /// Ask the node agent for more room.
    GrowVolume { bytes: i64 },
    /// The node agent is growing the data.
    WaitForNode,
    /// The backend holds `bytes`: the PV says so.
    ResizePv { bytes: i64 },
    /// kubelet must grow the filesystem (or loop device) on the node.
    AwaitNodeExpansion,
    /// Nothing left on the node: the claim has its new capacity.
    Finish { bytes: i64 },
    /// ControllerExpandVolume to `bytes` on the PV's `--csi-driver`, then
    /// the PV, and the node or the claim, from its answer. Asked again
    /// until the claim records the outcome: the call is idempotent.
    ExpandInDriver { bytes: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    #[error(
        "StorageClass {0} does not allow volume expansion: set allowVolumeExpansion: true on it to expand this claim"
    )]
    NotExpandable(String),
    #[error("claim has no StorageClass, so it cannot be expanded")]
    NoClass,
    #[error(
        "PersistentVolume {0} was not provisioned by stowage (it has no Volume object), so it cannot be expanded"
    )]
    NotProvisioned(String),
    #[error(
        "node {node} cannot grow the volume by {more}: it has {free} free; free space there or request at most {most}"
    )]
    NoRoom {
        node: String,
        more: String,
        free: String,
        most: String,
    },
    #[error("node {0} runs no stowage node agent, so the volume cannot grow until one runs there")]
    NoAgent(String),
    #[error("node {node} failed to grow the volume: {message}")]
    Backend { node: String, message: String },
    #[error("{message}")]
    Driver { message: String, infeasible: bool },
}

impl ResizeError {
    /// Whether only the user can fix it by asking for less (kubelet and
    /// kubectl read `ControllerResizeInfeasible` as that).
    pub fn infeasible(&self) -> bool {
        matches!(
            self,
            ResizeError::NoRoom { .. }
                | ResizeError::Driver {
                    infeasible: true,
                    ..
                }
        )
    }

    /// The `error` label of `stowage_reconcile_failures_total{job="resize"}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ResizeError::NotExpandable(_) => "not_expandable",
            ResizeError::NoClass => "no_class",
            ResizeError::NotProvisioned(_) => "not_provisioned",
            ResizeError::NoRoom { .. } => "no_room",
            ResizeError::NoAgent(_) => "no_agent",
            ResizeError::Backend { .. } => "grow_failed",
            ResizeError::Driver { .. } => "driver_failed",
        }
    }
}

pub(super) fn storage<V>(map: Option<&CompactMap<String, V>>) -> Option<&V> {
    map?.get("storage")
}

fn bytes_of(q: Option<&Quantity>) -> Option<i64> {
    parse_bytes(&q?.0).ok()
}

/// A claim asking for more than it has, and how far its resize has come.
struct Asked<'a> {
    /// The request as written in the claim's spec.
    request: Quantity,
    requested: i64,
    /// `allocatedResourceStatuses[storage]`.
    resize_status: Option<&'a str>,
    /// `allocatedResources[storage]`, in bytes.
    allocated: Option<i64>,
}

impl Asked<'_> {
    /// Whether the claim's status already records this request as ours to do.
    fn started(&self) -> bool {
        self.allocated == Some(self.requested)
            && matches!(
                self.resize_status,
                Some(CONTROLLER_RESIZE_IN_PROGRESS | CONTROLLER_RESIZE_INFEASIBLE)
            )
    }
}

pub fn plan(view: &ResizeView) -> Resize {
    let Some(pv) = view.pv else {
        return Resize::Nothing;
    };
    let local = driver_of(pv) == Some(local::DRIVER_NAME);
    if !local && view.remote_expands.is_none() {
        return Resize::Nothing;
    }
    let Some(asked) = asked(view.claim, pv) else {
        return Resize::Nothing;
    };
    let Some(class) = view.class else {
        return Resize::Refuse(ResizeError::NoClass);
    };
    if class.allow_volume_expansion != Some(true) {
        return Resize::Refuse(ResizeError::NotExpandable(class.name_any()));
    }
    if let Some(expands) = view.remote_expands {
        return plan_remote(pv, asked, expands);
    }
    let Some(volume) = view.volume else {
        return Resize::Refuse(ResizeError::NotProvisioned(pv.name_any()));
    };
    if !asked.started() {
        return Resize::Start {
            request: asked.request.0,
        };
    }
    if volume.spec.capacity_bytes < asked.requested {
        return plan_growth(volume, view.free_on_node, asked);
    }
    let node = volume.spec.node.clone().unwrap_or_default();
    let Some(done) = volume.status.as_ref() else {
        return Resize::WaitForNode;
    };
    let this_generation = done.observed_generation == volume.metadata.generation;
    match done.phase {
        VolumePhase::Failed if this_generation => {
            return Resize::Refuse(ResizeError::Backend {
                node,
                message: done
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "unknown error".into()),
            });
        }
        VolumePhase::Ready if this_generation => {}
        _ => return Resize::WaitForNode,
    }
    plan_grown(pv, volume, done)
}

/// A `--csi-driver`'s volume, as external-resizer expands it: whether or
/// not stowage provisioned it (no Volume is needed). A driver without
/// EXPAND_VOLUME gets external-resizer's "trivial" resize: the PV grows
/// and kubelet's NodeExpandVolume does the rest.
fn plan_remote(pv: &Pv, asked: Asked, expands: bool) -> Resize {
    if !asked.started() {
        return Resize::Start {
            request: asked.request.0,
        };
    }
    if expands {
        return Resize::ExpandInDriver {
            bytes: asked.requested,
        };
    }
    let pv_bytes =
        bytes_of(pv.spec.as_ref().and_then(|s| storage(s.capacity.as_ref()))).unwrap_or(0);
    if pv_bytes < asked.requested {
        Resize::ResizePv {
            bytes: asked.requested,
        }
    } else {
        Resize::AwaitNodeExpansion
    }
}

/// The claim's request when it exceeds its capacity and the resize is not
/// already kubelet's to finish; None when there is nothing to do.
fn asked<'a>(claim: &'a Claim, pv: &Pv) -> Option<Asked<'a>> {
    if claim.metadata.deletion_timestamp.is_some() || !bound_to(pv, claim) {
        return None;
    }
    let request = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| storage(r.requests.as_ref()))
        .cloned()?;
    let status = claim.status.as_ref();
    let requested = bytes_of(Some(&request))?;
    let current = bytes_of(status.and_then(|s| storage(s.capacity.as_ref())))?;
    if requested <= current {
        return None;
    }
    let resize_status = status
        .and_then(|s| storage(s.allocated_resource_statuses.as_ref()))
        .map(String::as_str);
    let allocated = bytes_of(status.and_then(|s| storage(s.allocated_resources.as_ref())));
    let on_node = matches!(
        resize_status,
        Some(NODE_RESIZE_PENDING | NODE_RESIZE_IN_PROGRESS | NODE_RESIZE_INFEASIBLE)
    );
    if on_node && allocated.is_some_and(|a| requested <= a) {
        return None;
    }
    Some(Asked {
        request,
        requested,
        resize_status,
        allocated,
    })
}

/// The Volume is smaller than asked: grow it if its node has the room.
fn plan_growth(volume: &Volume, free_on_node: Option<i64>, asked: Asked) -> Resize {
    let node = volume.spec.node.clone().unwrap_or_default();
    let more = asked.requested - volume.spec.capacity_bytes;
    match free_on_node {
        None => Resize::Refuse(ResizeError::NoAgent(node)),
        Some(free) if free < more => Resize::Refuse(ResizeError::NoRoom {
            node,
            more: format_bytes(more),
            free: format_bytes(free.max(0)),
            most: format_bytes(volume.spec.capacity_bytes + free.max(0)),
        }),
        // Room again after an infeasible attempt: say we are at it.
        Some(_) if asked.resize_status == Some(CONTROLLER_RESIZE_INFEASIBLE) => Resize::Start {
            request: asked.request.0,
        },
        Some(_) => Resize::GrowVolume {
            bytes: asked.requested,
        },
    }
}

/// The Volume is Ready at its grown size: the PV, then the node or the
/// claim, follow.
fn plan_grown(pv: &Pv, volume: &Volume, done: &VolumeStatus) -> Resize {
    // Ready at this generation means grown to the spec's size. A remote
    // driver may have rounded up (its answer is the controller's own
    // record); a node agent's figure is not taken, so that it cannot grow
    // a PV beyond what was asked.
    let reported = done.capacity_bytes.filter(|_| volume.spec.node.is_none());
    let actual = reported
        .unwrap_or(volume.spec.capacity_bytes)
        .max(volume.spec.capacity_bytes);
    let pv_bytes =
        bytes_of(pv.spec.as_ref().and_then(|s| storage(s.capacity.as_ref()))).unwrap_or(0);
    if pv_bytes < actual {
        return Resize::ResizePv { bytes: actual };
    }
    let params = Parameters::parse(&volume.spec.parameters).unwrap_or_default();
    if params.needs_node_expansion() {
        Resize::AwaitNodeExpansion
    } else {
        Resize::Finish { bytes: pv_bytes }
    }
}

/// The CSI driver of a PV, if it is a CSI volume.
pub(super) fn driver_of(pv: &Pv) -> Option<&str> {
    Some(pv.spec.as_ref()?.csi.as_ref()?.driver.as_str())
}

fn bound_to(pv: &Pv, claim: &Claim) -> bool {
    let Some(spec) = pv.spec.as_ref() else {
        return false;
    };
    let claim_ref = spec.claim_ref.as_ref();
    claim.uid().is_some()
        && claim_ref.and_then(|r| r.uid.clone()) == claim.uid()
        && claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
            == Some(pv.name_any().as_str())
}
