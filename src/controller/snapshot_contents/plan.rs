//! What csi-snapshotter would do next with one VolumeSnapshotContent,
//! decided from the object alone.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::backend::csi_proxy::Snapshot;
use crate::controller::secrets;
use crate::snapshot_api::{
    ANN_BEING_CREATED, ANN_BEING_DELETED, ANN_GROUP_HANDLE, CONTENT_FINALIZER,
    VolumeSnapshotContent, VolumeSnapshotContentStatus,
};

/// The next step for a content of a driver stowage serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// CreateSnapshot of the volume; again while it is not ready (the
    /// driver answers the same snapshot for the same name).
    Create {
        volume_handle: String,
    },
    /// A pre-provisioned snapshot not known ready: ListSnapshots.
    Check {
        snapshot_handle: String,
    },
    /// Ready: only the being-created annotation is left to remove.
    Settle,
    /// The content is going: DeleteSnapshot (policy Delete, a snapshot
    /// cut), then our hold on it goes.
    Delete {
        snapshot_handle: Option<String>,
        finalizer: bool,
    },
}

/// A pre-provisioned content bound to no VolumeSnapshot may go at once;
/// a bound one once snapshot-controller says its VolumeSnapshot is
/// deleted, and never while CreateSnapshot may be in flight.
fn should_delete(content: &VolumeSnapshotContent) -> bool {
    if content.metadata.deletion_timestamp.is_none() {
        return false;
    }
    let annotations = content.annotations();
    let unbound_static = content.spec.source.snapshot_handle.is_some()
        && content
            .spec
            .volume_snapshot_ref
            .uid
            .as_deref()
            .unwrap_or_default()
            .is_empty();
    unbound_static
        || (!annotations.contains_key(ANN_BEING_CREATED)
            && annotations.contains_key(ANN_BEING_DELETED))
}

pub fn plan(content: &VolumeSnapshotContent) -> Step {
    let source = &content.spec.source;
    if source.volume_handle.is_none() && source.snapshot_handle.is_none() {
        return Step::Nothing;
    }
    let status = content.status.as_ref();
    let in_group = content.annotations().contains_key(ANN_GROUP_HANDLE)
        || status.is_some_and(|s| s.volume_group_snapshot_handle.is_some());
    if should_delete(content) {
        let handle = status.and_then(|s| s.snapshot_handle.clone());
        let delete = content.spec.deletion_policy == "Delete" && !in_group;
        let finalizer = content.finalizers().iter().any(|f| f == CONTENT_FINALIZER);
        let snapshot_handle = handle.filter(|_| delete);
        if snapshot_handle.is_none() && !finalizer {
            return Step::Nothing;
        }
        return Step::Delete {
            snapshot_handle,
            finalizer,
        };
    }
    if in_group {
        return Step::Nothing;
    }
    if status.and_then(|s| s.ready_to_use) == Some(true) {
        return if content.annotations().contains_key(ANN_BEING_CREATED) {
            Step::Settle
        } else {
            Step::Nothing
        };
    }
    if let Some(handle) = &source.snapshot_handle {
        let handle = status
            .and_then(|s| s.snapshot_handle.clone())
            .unwrap_or_else(|| handle.clone());
        return Step::Check {
            snapshot_handle: handle,
        };
    }
    Step::Create {
        volume_handle: source.volume_handle.clone().unwrap_or_default(),
    }
}

/// The name the snapshot is cut under: the VolumeSnapshot's UID, so that
/// every retry (and csi-snapshotter, had it run before) asks for the same
/// one.
pub fn snapshot_name(content: &VolumeSnapshotContent) -> Option<String> {
    let uid = content.spec.volume_snapshot_ref.uid.as_deref()?;
    (!uid.is_empty()).then(|| format!("snapshot-{uid}"))
}

/// The status after the driver described the snapshot, as
/// csi-snapshotter writes it: what is set is never overwritten, a size
/// only when known, and an error cleared once the snapshot is ready.
/// None when nothing changes.
pub fn status_after(
    current: Option<&VolumeSnapshotContentStatus>,
    snapshot: &Snapshot,
) -> Option<VolumeSnapshotContentStatus> {
    let mut next = current.cloned().unwrap_or_default();
    next.snapshot_handle
        .get_or_insert_with(|| snapshot.id.clone());
    next.creation_time.get_or_insert(snapshot.creation_time_ns);
    if snapshot.size_bytes > 0 && next.restore_size.is_none() {
        next.restore_size = Some(snapshot.size_bytes);
    }
    if next.ready_to_use != Some(snapshot.ready) {
        if snapshot.ready {
            next.error = None;
        }
        next.ready_to_use = Some(snapshot.ready);
    }
    (Some(&next) != current).then_some(next)
}

/// The class's parameters as the driver sees them. Keys under
/// `csi.storage.k8s.io/` are the snapshotter Secrets' and go; any other
/// there is a mistake the user must fix.
pub fn driver_parameters(
    class: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    const KNOWN: [&str; 8] = [
        "snapshotter-secret-name",
        "snapshotter-secret-namespace",
        "snapshotter-list-secret-name",
        "snapshotter-list-secret-namespace",
        "group-snapshotter-secret-name",
        "group-snapshotter-secret-namespace",
        "group-snapshotter-get-secret-name",
        "group-snapshotter-get-secret-namespace",
    ];
    if let Some(key) = class.keys().find(|k| {
        k.strip_prefix(secrets::PREFIX)
            .is_some_and(|rest| !KNOWN.contains(&rest))
    }) {
        return Err(format!(
            "found unknown parameter key {key:?} with reserved namespace {}: remove it from the VolumeSnapshotClass",
            secrets::PREFIX
        ));
    }
    Ok(secrets::driver_parameters(class))
}

#[cfg(test)]
mod tests;
