//! Snapshots of `local.stowage.dev` volumes: a snapshot is a Volume too,
//! on its source's node, with no claim and `spec.source` naming the
//! Volume it copies; the node agent cuts it (its filesystem frozen if
//! mounted) and reports it Ready, and deletes its image when it goes, as
//! for any Volume. So the intent is recorded before any data, the node's
//! capacity counts it, and only that node's agent may report on it.

use std::sync::Arc;

use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use crate::backend::csi_proxy::Snapshot;
use crate::backend::local::{self, Layout, Parameters};
use crate::controller::provision::new_volume;
use crate::controller::{Context, Error};
use crate::crd::{AccessMode, ReclaimPolicy, Volume, VolumePhase, VolumeSource, VolumeSpec};
use crate::kubeapi;

/// The snapshot Volume `name` of Volume `source`, written if it is not
/// yet; as far as the node agent got with it. Polled until ready, so both
/// are read from the Volume cache: a cache behind the API server only
/// makes the create answer 409, or the poll come again.
pub async fn cut(ctx: &Context, name: &str, source: &str) -> Result<Snapshot, Error> {
    if let Some(existing) = cached(ctx, name) {
        return described(&existing);
    }
    let from = cached(ctx, source).ok_or_else(|| {
        Error::Snapshot(format!(
            "volume {source} does not exist: there is nothing to snapshot"
        ))
    })?;
    let volume = snapshot_volume(name, &from)?;
    let api = Api::<Volume>::all(ctx.client.clone());
    match api.create(&PostParams::default(), &volume).await {
        Ok(created) => described(&created),
        Err(kube::Error::Api(s)) if s.code == 409 => described(&api.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

fn cached(ctx: &Context, name: &str) -> Option<Arc<Volume>> {
    ctx.stores.volumes.get(&ObjectRef::new(name))
}

/// The Volume that records a snapshot of `from`.
fn snapshot_volume(name: &str, from: &Volume) -> Result<Volume, Error> {
    let source = from.name_any();
    let node = from.spec.node.clone().ok_or_else(|| {
        Error::Snapshot(format!(
            "volume {source} has no node yet: snapshot it once it is provisioned"
        ))
    })?;
    let params = Parameters::parse(&from.spec.parameters).unwrap_or_default();
    if params.layout == Layout::Dir {
        return Err(Error::Snapshot(format!(
            "volume {source} has layout dir: snapshots need image volumes (the class's default layout)"
        )));
    }
    let bytes = from
        .status
        .as_ref()
        .and_then(|s| s.capacity_bytes)
        .unwrap_or(from.spec.capacity_bytes);
    let volume = new_volume(
        name,
        VolumeSpec {
            driver: local::DRIVER_NAME.to_string(),
            parameters: from.spec.parameters.clone(),
            capacity_bytes: bytes,
            access_modes: vec![AccessMode::ReadWriteOnce],
            volume_mode: from.spec.volume_mode,
            node: Some(node),
            requisite_topology: Vec::new(),
            preferred_topology: Vec::new(),
            mount_options: Vec::new(),
            source: Some(VolumeSource::Volume(source)),
            claim: None,
            persistent_volume_name: None,
            reclaim_policy: ReclaimPolicy::Delete,
            volume_attributes_class_name: None,
            mutable_parameters: Default::default(),
        },
    );
    Ok(volume)
}

/// A snapshot Volume as the content's status reads it: ready once its
/// node agent reported it Ready; its failure, in its words.
fn described(volume: &Volume) -> Result<Snapshot, Error> {
    let status = volume.status.clone().unwrap_or_default();
    if status.phase == VolumePhase::Failed {
        return Err(Error::Snapshot(format!(
            "node {} could not cut snapshot {}: {}",
            volume.spec.node.clone().unwrap_or_default(),
            volume.name_any(),
            status.last_error.unwrap_or_default()
        )));
    }
    let ready = status.phase == VolumePhase::Ready
        && status.observed_generation == volume.metadata.generation;
    let created = volume
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_nanosecond() as i64);
    Ok(Snapshot {
        id: volume.name_any(),
        size_bytes: status.capacity_bytes.unwrap_or(volume.spec.capacity_bytes),
        creation_time_ns: created,
        ready,
    })
}

/// A pre-provisioned local snapshot: the snapshot Volume its handle names.
pub async fn status(ctx: &Context, handle: &str) -> Result<Snapshot, Error> {
    let found = cached(ctx, handle)
        .ok_or_else(|| Error::Snapshot(format!("snapshot {handle} does not exist on any node")))?;
    if found.spec.claim.is_some() || found.spec.source.is_none() {
        return Err(Error::Snapshot(format!(
            "{handle} is a volume, not a snapshot: name a snapshot Volume"
        )));
    }
    described(&found)
}

/// Deletes the snapshot Volume (once: the polls that follow only look);
/// true once it is gone (its node agent has removed the image and its
/// finalizer).
pub async fn delete(ctx: &Context, handle: &str) -> Result<bool, Error> {
    let api = Api::<Volume>::all(ctx.client.clone());
    let Some(volume) = cached(ctx, handle) else {
        // Gone for the cache; the API server confirms before the content
        // lets go of it, or a snapshot Volume would be left unowned.
        return Ok(!kubeapi::exists_with_uid(&api, handle, None).await?);
    };
    if volume.metadata.deletion_timestamp.is_none() {
        kubeapi::delete(&api, handle, volume.uid()).await?;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{NODE_LABEL, VOLUME_FINALIZER};
    use crate::testing::{volume, volume_spec};

    fn source(node: Option<&str>, layout: Option<&str>) -> Volume {
        let mut spec = volume_spec(local::DRIVER_NAME, 64 << 20);
        spec.node = node.map(str::to_string);
        if let Some(layout) = layout {
            spec.parameters.insert("layout".into(), layout.into());
        }
        volume("pvc-1", spec)
    }

    #[test]
    fn a_snapshot_is_a_volume_on_its_sources_node_copying_it() {
        let snap = snapshot_volume("snapshot-u", &source(Some("n1"), None)).unwrap();
        assert_eq!(snap.spec.node.as_deref(), Some("n1"));
        assert_eq!(snap.spec.source, Some(VolumeSource::Volume("pvc-1".into())));
        assert_eq!(snap.spec.capacity_bytes, 64 << 20);
        assert_eq!(snap.spec.claim, None);
        assert_eq!(
            snap.labels().get(NODE_LABEL).map(String::as_str),
            Some("n1")
        );
        assert!(snap.finalizers().iter().any(|f| f == VOLUME_FINALIZER));
        // Not ready until its agent says so.
        assert!(!described(&snap).unwrap().ready);
    }

    #[test]
    fn what_cannot_be_snapshotted_says_why() {
        let dir = snapshot_volume("s", &source(Some("n1"), Some("dir"))).unwrap_err();
        assert!(dir.to_string().contains("layout dir"), "{dir}");
        let nowhere = snapshot_volume("s", &source(None, None)).unwrap_err();
        assert!(nowhere.to_string().contains("no node yet"), "{nowhere}");
    }
}
