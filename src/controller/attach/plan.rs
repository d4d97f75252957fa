//! What to do with one VolumeAttachment, decided from a snapshot of it, its
//! PV, its node and the PV's other attachments. No API calls here.

use std::sync::Arc;

use crate::controller::cached_pv::Pv;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::ResourceExt;

use super::{ANN_NODE_ID, finalizer};

/// Everything `plan` looks at for one VolumeAttachment.
pub struct AttachView<'a> {
    pub va: &'a VolumeAttachment,
    pub pv: Option<&'a Pv>,
    /// The driver's ID for the node, if known.
    pub node_id: Option<String>,
    /// Whether the Node object exists.
    pub node_exists: bool,
    /// Other VolumeAttachments of the same PV.
    pub others: &'a [&'a VolumeAttachment],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    Nothing,
    /// The node is gone: delete the VA, which detaches it.
    DeleteOrphan,
    /// Record finalizers and the node ID before the driver sees anything.
    Prepare {
        node_id: String,
    },
    Publish {
        node_id: String,
    },
    Refuse(AttachError),
    Unpublish {
        node_id: Option<String>,
    },
    /// Detached: let the VA go.
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("PersistentVolume {0} not found")]
    NoPv(String),
    #[error("inline volumes are not supported by stowage: use a PersistentVolume")]
    Inline,
    #[error(
        "node {node} has no node ID for {driver}: its CSINode lists no such driver; is the driver's node plugin running there?"
    )]
    NoNodeId { node: String, driver: String },
    #[error(
        "volume {pv} is attached to node {other}; a {mode} volume is published to one node at a time: delete the pod there first"
    )]
    MultiAttach {
        pv: String,
        other: String,
        mode: String,
    },
}

impl AttachError {
    /// The `error` label of `stowage_reconcile_failures_total{job="attach"}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AttachError::NoPv(_) => "no_pv",
            AttachError::Inline => "inline_volume",
            AttachError::NoNodeId { .. } => "no_node_id",
            AttachError::MultiAttach { .. } => "multi_attach",
        }
    }
}

pub(super) fn pv_name(va: &VolumeAttachment) -> Option<&str> {
    va.spec.source.persistent_volume_name.as_deref()
}

pub(super) fn attached(va: &VolumeAttachment) -> bool {
    va.status.as_ref().is_some_and(|s| s.attached)
}

/// The node ID a VA is (to be) published to: the one recorded on it at
/// prepare time, else `known` now.
pub(super) fn publish_node_id(va: &VolumeAttachment, known: Option<&str>) -> Option<String> {
    va.annotations()
        .get(ANN_NODE_ID)
        .map(String::as_str)
        .or(known)
        .map(str::to_string)
}

fn recorded_node_id(view: &AttachView) -> Option<String> {
    publish_node_id(view.va, view.node_id.as_deref())
}

pub fn plan(view: &AttachView) -> Attach {
    let va = view.va;
    let ours = finalizer(&va.spec.attacher);
    let has_finalizer = va.finalizers().contains(&ours);
    if va.metadata.deletion_timestamp.is_some() {
        return plan_detach(view, has_finalizer);
    }
    if !view.node_exists {
        return Attach::DeleteOrphan;
    }
    if attached(va) {
        return Attach::Nothing;
    }
    if va.spec.source.inline_volume_spec.is_some() {
        return Attach::Refuse(AttachError::Inline);
    }
    let Some(pv) = view.pv else {
        return Attach::Refuse(AttachError::NoPv(
            pv_name(va).unwrap_or_default().to_string(),
        ));
    };
    if let Some(refusal) = attached_elsewhere(view, pv) {
        return Attach::Refuse(refusal);
    }
    let Some(node_id) = recorded_node_id(view) else {
        return Attach::Refuse(AttachError::NoNodeId {
            node: va.spec.node_name.clone(),
            driver: va.spec.attacher.clone(),
        });
    };
    let pv_has_finalizer = pv.finalizers().contains(&ours);
    if !has_finalizer || !pv_has_finalizer || !va.annotations().contains_key(ANN_NODE_ID) {
        return Attach::Prepare { node_id };
    }
    Attach::Publish { node_id }
}

/// A VA being deleted: unpublish if it was (or may have been) published,
/// then let it go.
fn plan_detach(view: &AttachView, has_finalizer: bool) -> Attach {
    let va = view.va;
    if !has_finalizer {
        return Attach::Nothing;
    }
    if attached(va) || va.annotations().contains_key(ANN_NODE_ID) {
        return Attach::Unpublish {
            node_id: recorded_node_id(view),
        };
    }
    Attach::Release
}

/// A single-node volume already attached to another node.
fn attached_elsewhere(view: &AttachView, pv: &Pv) -> Option<AttachError> {
    let va = view.va;
    let modes = pv
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    let shared = modes
        .iter()
        .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany");
    if shared {
        return None;
    }
    let other = view
        .others
        .iter()
        .find(|o| o.spec.node_name != va.spec.node_name && attached(o))?;
    Some(AttachError::MultiAttach {
        pv: pv.name_any(),
        other: other.spec.node_name.clone(),
        mode: modes
            .first()
            .cloned()
            .unwrap_or_else(|| "ReadWriteOnce".into()),
    })
}

/// Whether a PV being deleted may drop our finalizer: no VolumeAttachment
/// names it any more.
pub fn pv_released(pv: &Pv, attachments: &[Arc<VolumeAttachment>]) -> Option<String> {
    let driver = pv.spec.as_ref()?.csi.as_ref()?.driver.clone();
    let ours = finalizer(&driver);
    let name = pv.name_any();
    (pv.metadata.deletion_timestamp.is_some()
        && pv.finalizers().contains(&ours)
        && !attachments
            .iter()
            .any(|a| pv_name(a) == Some(name.as_str())))
    .then_some(ours)
}
