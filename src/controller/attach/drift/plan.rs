//! Where a driver and its VolumeAttachments disagree, decided from a
//! snapshot of both. No API or driver calls here.

use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::ResourceExt;

use super::super::finalizer;
use super::super::plan::{attached, publish_node_id};
use crate::backend::csi_proxy::Published;
use crate::controller::cached_pv::Pv;

/// One VolumeAttachment as the caches show it.
pub struct DriftView<'a> {
    pub va: &'a VolumeAttachment,
    /// Its PersistentVolume, if in the cache.
    pub pv: Option<&'a Pv>,
    /// The driver's ID for the VA's node as the caches know it now.
    pub node_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// The VA says attached but the driver does not have the volume
    /// published to the node: mark it detached, and the attach job
    /// publishes it again.
    Republish,
    /// We let the VA go (it is being deleted, our finalizer is off), yet
    /// the driver still has the volume published to the node: unpublish
    /// it again.
    Unpublish,
}

/// One disagreement and what repairs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Repair<'a> {
    pub va: &'a VolumeAttachment,
    pub pv: &'a Pv,
    pub handle: String,
    pub node_id: String,
    pub fix: Fix,
}

/// The volume and node one view is about, when both are known.
struct Target<'a> {
    view: &'a DriftView<'a>,
    pv: &'a Pv,
    handle: &'a str,
    node_id: String,
}

fn target<'a>(view: &'a DriftView<'a>, driver: &str) -> Option<Target<'a>> {
    if view.va.spec.attacher != driver {
        return None;
    }
    let pv = view.pv?;
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    // The ID the attach job publishes to, so that a node whose driver
    // re-registered under a new ID is not "repaired" for ever.
    let node_id = publish_node_id(view.va, view.node_id.as_deref())?;
    Some(Target {
        view,
        pv,
        handle: &csi.volume_handle,
        node_id,
    })
}

/// external-attacher's reconcile, for the VAs of `driver`: a VA whose
/// attached status disagrees with `published` (ListVolumes, asked after
/// the VAs were read) is repaired. VAs whose PV, handle or node ID is
/// unknown are left alone, as upstream leaves them.
///
/// Two of upstream's cases need nothing here: a VA not attached whose
/// volume is published is on its way (or refused for a reason the driver
/// cannot see, such as another node holding a single-node volume), and a
/// VA being deleted that still carries our finalizer is being detached by
/// the attach job.
pub fn plan<'a>(
    views: &'a [DriftView<'a>],
    driver: &str,
    published: &Published,
) -> Vec<Repair<'a>> {
    let targets: Vec<_> = views.iter().filter_map(|v| target(v, driver)).collect();
    let ours = finalizer(driver);
    let is_published = |t: &Target| {
        published
            .get(t.handle)
            .is_some_and(|nodes| nodes.contains(&t.node_id))
    };
    let live = |t: &Target| t.view.va.metadata.deletion_timestamp.is_none();
    targets
        .iter()
        .filter_map(|t| {
            let va = t.view.va;
            let fix = if live(t) {
                (attached(va) && !is_published(t)).then_some(Fix::Republish)?
            } else {
                // Another VA still using the volume on that node (one not
                // made by kcm, whose names are one per volume and node)
                // must keep it.
                let needed = targets
                    .iter()
                    .any(|o| live(o) && o.handle == t.handle && o.node_id == t.node_id);
                (is_published(t) && !va.finalizers().contains(&ours) && !needed)
                    .then_some(Fix::Unpublish)?
            };
            Some(Repair {
                va,
                pv: t.pv,
                handle: t.handle.to_string(),
                node_id: t.node_id.clone(),
                fix,
            })
        })
        .collect()
}
