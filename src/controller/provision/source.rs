//! A claim's `dataSource` (or `dataSourceRef`) as CreateVolume's content
//! source, checked as external-provisioner v6 checks it: a VolumeSnapshot
//! bound to a ready content of the class's driver, or a bound claim of the
//! same driver (a clone), each no larger than the new claim and, unless
//! allowed, of the same volume mode.
//!
//! A source in another namespace needs a ReferenceGrant there (`grant`).
//!
//! `requested` and `content_source` are pure; `lookup` reads what they
//! need (the grants and the snapshot and its content from the API server,
//! the source claim and its PV from the caches).

use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::{ProvisionError, requested_bytes};
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::controller::{Context, Error};
use crate::crd::VolumeSource;
use crate::kubeapi;
use crate::quantity::parse_bytes;
use crate::snapshot_api::{self, VolumeSnapshot, VolumeSnapshotContent};

pub mod grant;

pub const KIND_SNAPSHOT: &str = "VolumeSnapshot";
pub const KIND_CLAIM: &str = "PersistentVolumeClaim";
/// external-provisioner's finalizer on a claim being cloned.
pub const CLONE_FINALIZER: &str = "provisioner.storage.kubernetes.io/cloning-protection";
/// external-provisioner's finalizer on a snapshot being restored.
pub const SNAPSHOT_SOURCE_FINALIZER: &str =
    "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection";

/// What the claim asks to start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub kind: String,
    pub name: String,
    pub api_group: String,
    /// Where the source is: the claim's namespace unless its
    /// `dataSourceRef` names another.
    pub namespace: String,
}

/// `dataSource` wins over `dataSourceRef`, as upstream reads them. Whether
/// a source in another namespace may be used is `lookup`'s to find out.
pub fn requested(claim: &Claim) -> Option<Requested> {
    let spec = claim.spec.as_ref()?;
    let own = claim.namespace().unwrap_or_default();
    if let Some(source) = &spec.data_source {
        return Some(Requested {
            kind: source.kind.clone(),
            name: source.name.clone(),
            api_group: source.api_group.clone().unwrap_or_default(),
            namespace: own,
        });
    }
    let source = spec.data_source_ref.as_ref()?;
    Some(Requested {
        kind: source.kind.clone(),
        name: source.name.clone(),
        api_group: source.api_group.clone().unwrap_or_default(),
        namespace: source
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or(own),
    })
}

/// Whether the claim's data source is a kind neither restore nor clone:
/// a volume populator's, which upstream leaves alone.
pub fn left_to_populator(claim: &Claim) -> bool {
    requested(claim).is_some_and(|r| r.kind != KIND_SNAPSHOT && r.kind != KIND_CLAIM)
}

/// What `lookup` found for the requested source.
#[derive(Debug, Clone, Default)]
pub enum Lookup {
    #[default]
    Nothing,
    /// A source in another namespace that the claim may not use.
    Refused(grant::AccessError),
    Snapshot {
        /// The driver has CREATE_DELETE_SNAPSHOT.
        supported: bool,
        snapshot: Option<Box<VolumeSnapshot>>,
        content: Option<Box<VolumeSnapshotContent>>,
    },
    Claim {
        /// The driver has CLONE_VOLUME.
        supported: bool,
        claim: Option<Box<Claim>>,
        pv: Option<Box<Pv>>,
    },
}

/// Reads the source a claim of `driver` names; Nothing for kinds a
/// populator handles. A source in another namespace is first checked
/// against the ReferenceGrants there, whatever its kind, as upstream does.
pub async fn lookup(
    ctx: &Context,
    claim: &Claim,
    driver: &str,
    requested: &Requested,
) -> Result<Lookup, Error> {
    if let Err(refused) = grant::allowed(ctx, claim, requested).await? {
        return Ok(Lookup::Refused(refused));
    }
    if requested.kind != KIND_SNAPSHOT && requested.kind != KIND_CLAIM {
        return Ok(Lookup::Nothing);
    }
    // Local volumes can be both; a driver says what it can.
    let (snapshots, clones) = match ctx.drivers.get(driver) {
        Some(csi) => {
            let caps = csi.capabilities().await?;
            (caps.create_delete_snapshot, caps.clone_volume)
        }
        None if ctx.serves(driver) => (true, true),
        None => return Ok(Lookup::Nothing),
    };
    let namespace = &requested.namespace;
    if requested.kind == KIND_SNAPSHOT {
        let snapshots_api = Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), namespace);
        let snapshot = snapshots_api.get_opt(&requested.name).await?;
        let bound = snapshot.as_ref().and_then(|s| {
            s.status
                .as_ref()?
                .bound_volume_snapshot_content_name
                .clone()
        });
        let content = match bound {
            Some(name) => {
                Api::<VolumeSnapshotContent>::all(ctx.client.clone())
                    .get_opt(&name)
                    .await?
            }
            None => None,
        };
        return Ok(Lookup::Snapshot {
            supported: snapshots,
            snapshot: snapshot.map(Box::new),
            content: content.map(Box::new),
        });
    }
    let source = ctx
        .stores
        .claims
        .get(&ObjectRef::new(&requested.name).within(namespace));
    let pv_name = source
        .as_ref()
        .and_then(|c| c.spec.as_ref()?.volume_name.clone())
        .unwrap_or_default();
    let pv = ctx.stores.pvs.get(&ObjectRef::new(&pv_name));
    Ok(Lookup::Claim {
        supported: clones,
        claim: source.map(|c| Box::new(c.as_ref().clone())),
        pv: pv.map(|p| Box::new(p.as_ref().clone())),
    })
}

/// The node holding the local Volume a found source names (a snapshot
/// Volume, or the cloned claim's Volume), as the Volume cache has it.
pub fn local_node(ctx: &Context, lookup: &Lookup) -> Option<String> {
    let handle = match lookup {
        Lookup::Nothing | Lookup::Refused(_) => return None,
        Lookup::Snapshot { content, .. } => {
            content.as_ref()?.status.as_ref()?.snapshot_handle.clone()?
        }
        Lookup::Claim { pv, .. } => pv
            .as_ref()?
            .spec
            .as_ref()?
            .csi
            .as_ref()?
            .volume_handle
            .clone(),
    };
    ctx.stores
        .volumes
        .get(&ObjectRef::new(&handle))?
        .spec
        .node
        .clone()
}

/// The content source for a claim of a class of `driver`, or None when
/// it names none. Every refusal says what to change.
pub fn content_source(
    claim: &Claim,
    driver: &str,
    requested: &Requested,
    lookup: &Lookup,
) -> Result<Option<VolumeSource>, ProvisionError> {
    if requested.name.is_empty() {
        return Err(ProvisionError::Source("dataSource names no object".into()));
    }
    match lookup {
        Lookup::Nothing => Ok(None),
        Lookup::Refused(refused) => Err(refused.clone().into()),
        Lookup::Snapshot {
            supported,
            snapshot,
            content,
        } => {
            if requested.api_group != snapshot_api::GROUP {
                return Err(ProvisionError::Source(format!(
                    "dataSource kind VolumeSnapshot must have apiGroup {}, not {:?}",
                    snapshot_api::GROUP,
                    requested.api_group
                )));
            }
            if !supported {
                return Err(ProvisionError::Source(format!(
                    "CSI driver {driver} does not support snapshot restore: controller CREATE_DELETE_SNAPSHOT capability is not reported"
                )));
            }
            snapshot_source(
                claim,
                driver,
                &requested.name,
                snapshot.as_deref(),
                content.as_deref(),
            )
            .map(Some)
        }
        Lookup::Claim {
            supported,
            claim: source,
            pv,
        } => {
            if !supported {
                return Err(ProvisionError::Source(format!(
                    "CSI driver {driver} does not support clone operations: controller CLONE_VOLUME capability is not reported"
                )));
            }
            clone_source(
                claim,
                driver,
                &requested.name,
                source.as_deref(),
                pv.as_deref(),
            )
            .map(Some)
        }
    }
}

fn snapshot_source(
    claim: &Claim,
    driver: &str,
    name: &str,
    snapshot: Option<&VolumeSnapshot>,
    content: Option<&VolumeSnapshotContent>,
) -> Result<VolumeSource, ProvisionError> {
    let fail = |m: String| Err(ProvisionError::Source(m));
    let Some(snapshot) = snapshot else {
        return fail(format!("VolumeSnapshot {name} does not exist"));
    };
    if snapshot.metadata.deletion_timestamp.is_some()
        && !snapshot
            .finalizers()
            .iter()
            .any(|f| f == SNAPSHOT_SOURCE_FINALIZER)
    {
        return fail(format!("snapshot {name} is being deleted"));
    }
    let status = snapshot.status.clone().unwrap_or_default();
    let Some(content_name) = status.bound_volume_snapshot_content_name.as_deref() else {
        return fail(format!("snapshot {name} not bound"));
    };
    let Some(content) = content else {
        return fail(format!(
            "snapshotcontent {content_name} for snapshot {name} does not exist"
        ));
    };
    let back = &content.spec.volume_snapshot_ref;
    if back.name.as_deref() != Some(name)
        || back.namespace != snapshot.namespace()
        || back.uid != snapshot.uid()
    {
        return fail(format!(
            "snapshotcontent {content_name} for snapshot {name} is bound to a different snapshot"
        ));
    }
    if content.spec.driver != driver {
        return fail(format!(
            "snapshotcontent {content_name} for snapshot {name} is not handled by CSI driver {driver} of the StorageClass"
        ));
    }
    if status.ready_to_use != Some(true) {
        return fail(format!("snapshot {name} is not Ready"));
    }
    let Some(handle) = content
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
    else {
        return fail(format!(
            "snapshot handle of {content_name} is not available"
        ));
    };
    if let Some(restore) = status.restore_size.as_ref() {
        let restore = parse_bytes(&restore.0).unwrap_or(0);
        let wanted = requested_bytes(claim)?;
        if wanted < restore {
            return fail(format!(
                "requested volume size {wanted} is less than the size {restore} for the source snapshot {name}: request at least that"
            ));
        }
    }
    check_mode_change(claim, content)?;
    Ok(VolumeSource::Snapshot(handle))
}

/// `--prevent-volume-mode-conversion` (on by default upstream): a
/// snapshot of one mode restores in another only when its content allows.
fn check_mode_change(claim: &Claim, content: &VolumeSnapshotContent) -> Result<(), ProvisionError> {
    let wanted = claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref());
    let (Some(source), Some(wanted)) = (content.spec.source_volume_mode.as_deref(), wanted) else {
        return Ok(());
    };
    if source == wanted {
        return Ok(());
    }
    let allowed = content
        .annotations()
        .get(snapshot_api::ANN_ALLOW_MODE_CHANGE)
        .and_then(|v| v.parse::<bool>().ok());
    if allowed == Some(true) {
        return Ok(());
    }
    Err(ProvisionError::Source(format!(
        "requested volume {}/{} modifies the mode of the source volume ({source} to {wanted}) but does not have permission to do so: \
         set {}: \"true\" on snapshotcontent {}",
        claim.namespace().unwrap_or_default(),
        claim.name_any(),
        snapshot_api::ANN_ALLOW_MODE_CHANGE,
        content.name_any()
    )))
}

fn clone_source(
    claim: &Claim,
    driver: &str,
    name: &str,
    source: Option<&Claim>,
    pv: Option<&Pv>,
) -> Result<VolumeSource, ProvisionError> {
    let fail = |m: String| Err(ProvisionError::Source(m));
    let Some(source) = source else {
        return fail(format!(
            "the PVC DataSource {name} does not exist (or is not of a class stowage serves)"
        ));
    };
    let phase = source.status.as_ref().and_then(|s| s.phase.clone());
    if phase.as_deref() != Some("Bound") {
        return fail(format!(
            "the PVC DataSource {name} must have a status of Bound. Got {}",
            phase.unwrap_or_default()
        ));
    }
    if source.metadata.deletion_timestamp.is_some() {
        return fail(format!(
            "the PVC DataSource {name} is currently being deleted"
        ));
    }
    let class_of = |c: &Claim| c.spec.as_ref()?.storage_class_name.clone();
    if class_of(source).is_none() {
        return fail(format!(
            "the source PVC ({name}) storageclass cannot be empty"
        ));
    }
    let source_bytes = requested_bytes(source).unwrap_or(0);
    let wanted = requested_bytes(claim)?;
    if wanted < source_bytes {
        return fail(format!(
            "new PVC request must be greater than or equal in size to the specified PVC data source, requested {wanted} but source is {source_bytes}"
        ));
    }
    let csi = pv.and_then(|p| p.spec.as_ref()?.csi.as_ref());
    let claim_ref = pv.and_then(|p| p.spec.as_ref()?.claim_ref.as_ref());
    let pv_bound = pv.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Bound");
    let matches = claim_ref.is_some_and(|r| {
        r.uid == source.uid()
            && r.name.as_deref() == Some(name)
            && r.namespace == source.namespace()
    });
    let Some(csi) = csi.filter(|c| c.driver == driver && matches && pv_bound) else {
        return fail(format!("claim {name} in dataSource not bound or invalid"));
    };
    let mode = |c: &Claim| {
        c.spec
            .as_ref()
            .and_then(|s| s.volume_mode.clone())
            .unwrap_or_else(|| "Filesystem".into())
    };
    if mode(source) != mode(claim) {
        return fail(format!(
            "the source PVC and destination PVCs must have the same volume mode for cloning. Source is {}, but new PVC requested {}",
            mode(source),
            mode(claim)
        ));
    }
    Ok(VolumeSource::Handle(csi.volume_handle.clone()))
}

/// Keeps the source from going while the new volume is cut from it, as
/// external-provisioner does: its finalizer on the source claim (a
/// clone) or the VolumeSnapshot (a restore). Written before the Volume,
/// so a crash in between leaves the source protected, never exposed.
pub async fn protect(ctx: &Context, claim: &Claim) -> Result<(), Error> {
    let Some(requested) = requested(claim) else {
        return Ok(());
    };
    let namespace = &requested.namespace;
    match requested.kind.as_str() {
        KIND_CLAIM => {
            let api = Api::<Claim>::namespaced(ctx.client.clone(), namespace);
            if let Some(source) = api.get_opt(&requested.name).await? {
                kubeapi::add_finalizer(&api, &source, CLONE_FINALIZER).await?;
            }
        }
        KIND_SNAPSHOT => {
            let api = Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), namespace);
            if let Some(snapshot) = api.get_opt(&requested.name).await? {
                match kubeapi::add_finalizer(&api, &snapshot, SNAPSHOT_SOURCE_FINALIZER).await {
                    // Upstream goes on without it when RBAC refuses.
                    Err(kube::Error::Api(s)) if s.code == 403 => {
                        tracing::warn!(snapshot = %requested.name, "may not protect the source snapshot: {}", s.message);
                    }
                    other => other?,
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Once the PV exists the snapshot may go: its finalizer is removed.
/// A failure is logged, as upstream logs it; the snapshot then keeps the
/// finalizer (its deletion waits) until it is removed by hand.
pub async fn release_snapshot(ctx: &Context, claim: &Claim) {
    let Some(requested) = requested(claim) else {
        return;
    };
    if requested.kind != KIND_SNAPSHOT {
        return;
    }
    let api = Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), &requested.namespace);
    let result = match api.get_opt(&requested.name).await {
        Ok(Some(snapshot)) => {
            kubeapi::remove_finalizer(&api, &snapshot, SNAPSHOT_SOURCE_FINALIZER).await
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(snapshot = %requested.name, error = %e, "could not remove {SNAPSHOT_SOURCE_FINALIZER}");
    }
}

#[cfg(test)]
mod tests;
