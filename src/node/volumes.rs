//! Carries out the Volumes assigned to this node: creates the data when a
//! Volume appears, deletes it when the Volume is deleted, and reports in
//! `Volume.status`.

use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;

use super::{Error, NodeContext};
use crate::backend::local::Parameters;
use crate::crd::{Outstanding, VOLUME_FINALIZER, Volume, VolumeMode, VolumePhase, VolumeSource};
use crate::kubeapi;

/// What this node must do for one Volume, decided from the object alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeWork {
    /// Not ours (another node), or already done.
    Nothing,
    /// Create (or finish creating) the data with this many bytes.
    Create { bytes: i64 },
    /// The Volume is being deleted: remove the data, then our finalizer.
    Delete,
}

pub fn plan(volume: &Volume, node: &str) -> NodeWork {
    if volume.spec.node.as_deref() != Some(node) {
        return NodeWork::Nothing;
    }
    match volume.outstanding() {
        Outstanding::Nothing => NodeWork::Nothing,
        Outstanding::Create => NodeWork::Create {
            bytes: volume.spec.capacity_bytes,
        },
        Outstanding::Delete => NodeWork::Delete,
    }
}

#[tracing::instrument(skip_all, fields(volume = %volume.name_any()))]
pub async fn reconcile(volume: Arc<Volume>, ctx: Arc<NodeContext>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("node_volume");
    let name = volume.name_any();
    let api = Api::<Volume>::all(ctx.client.clone());
    match plan(&volume, &ctx.node) {
        NodeWork::Nothing => {}
        NodeWork::Create { bytes } => {
            let params = match Parameters::parse(&volume.spec.parameters) {
                Ok(p) => p,
                Err(e) => {
                    let message = e.to_string();
                    report(&api, &volume, Report::failed("InvalidParameters", &message)).await?;
                    return Ok(Action::await_change());
                }
            };
            let format = volume.spec.volume_mode == VolumeMode::Filesystem;
            let created = match &volume.spec.source {
                None => ctx.store.create(&name, params, bytes, format).await,
                Some(VolumeSource::Volume(from) | VolumeSource::Snapshot(from)) => {
                    copy_of(&ctx, &name, from, bytes).await
                }
                Some(VolumeSource::Handle(handle)) => {
                    let message = format!(
                        "a local volume starts from another local Volume, not from a driver's handle ({handle})"
                    );
                    report(&api, &volume, Report::failed("InvalidSource", &message)).await?;
                    return Ok(Action::await_change());
                }
            };
            match created {
                Ok(actual) => {
                    crate::failpoint::hit("node-before-ready-reported");
                    tracing::info!(bytes = actual, "volume data ready");
                    let msg = format!("{} bytes on node {}", actual, ctx.node);
                    let ready = Report {
                        phase: VolumePhase::Ready,
                        capacity: Some(actual),
                        reason: "Created",
                        message: &msg,
                    };
                    report(&api, &volume, ready).await?;
                }
                Err(e) => {
                    let message = e.to_string();
                    report(&api, &volume, Report::failed("CreateFailed", &message)).await?;
                    return Err(e.into());
                }
            }
        }
        NodeWork::Delete => {
            // kubelet may not have unstaged yet: deleting now would pull the
            // data from under a mount and strand its loop device.
            let image = ctx.store.image_path(&name)?;
            if let Some(dev) = crate::host::loop_device::find(&image).await? {
                return Err(Error::InUse {
                    volume: name,
                    device: dev.display().to_string(),
                });
            }
            ctx.store.delete(&name).await?;
            crate::failpoint::hit("node-after-data-deleted");
            tracing::info!("volume data deleted");
            crate::kubeapi::remove_finalizer(&api, &volume, VOLUME_FINALIZER).await?;
        }
    }
    ctx.failures.forget(&volume.object_ref(&()));
    Ok(Action::await_change())
}

/// A new volume as a copy of Volume `from`'s image on this node (a
/// snapshot is a Volume too), its filesystem frozen for the copy when it
/// is mounted, so that a volume in use is copied as it stood.
async fn copy_of(
    ctx: &NodeContext,
    name: &str,
    from: &str,
    bytes: i64,
) -> Result<i64, crate::backend::local::LocalError> {
    let source = ctx.store.image_path(from)?;
    let mount = crate::host::freeze::filesystem_mount_of(&source)?;
    let frozen = mount
        .as_deref()
        .map(crate::host::freeze::freeze)
        .transpose()?;
    if frozen.is_some() {
        tracing::info!(source = from, "filesystem frozen for the copy");
    }
    ctx.store.create_from(name, &source, bytes).await
}

/// What a report says; written only when it differs from what the Volume
/// already shows, so that a failure retried by backoff does not wake the
/// next attempt with its own status write.
struct Report<'a> {
    phase: VolumePhase,
    capacity: Option<i64>,
    reason: &'a str,
    message: &'a str,
}

impl<'a> Report<'a> {
    fn failed(reason: &'a str, message: &'a str) -> Self {
        Report {
            phase: VolumePhase::Failed,
            capacity: None,
            reason,
            message,
        }
    }

    fn ready_status(&self) -> &'static str {
        if self.phase == VolumePhase::Ready {
            "True"
        } else {
            "False"
        }
    }

    fn last_error(&self) -> Option<&str> {
        (self.phase == VolumePhase::Failed).then_some(self.message)
    }

    fn already_shown(&self, volume: &Volume) -> bool {
        let Some(status) = volume.status.as_ref() else {
            return false;
        };
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        status.phase == self.phase
            && status.observed_generation == volume.metadata.generation
            && status.last_error.as_deref() == self.last_error()
            && (self.capacity.is_none() || status.capacity_bytes == self.capacity)
            && ready.is_some_and(|c| c.reason == self.reason && c.message == self.message)
    }

    /// The condition's transition time: kept while its status stays.
    fn transition_time(&self, volume: &Volume) -> String {
        volume
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .filter(|c| format!("{:?}", c.status) == self.ready_status())
            .map(|c| c.last_transition_time.0.to_string())
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().to_string())
    }
}

async fn report(api: &Api<Volume>, volume: &Volume, report: Report<'_>) -> Result<(), Error> {
    let mut status = json!({
        "phase": report.phase,
        "observedGeneration": volume.metadata.generation,
        "conditions": [{
            "type": "Ready",
            "status": report.ready_status(),
            "reason": report.reason,
            "message": report.message,
            "lastTransitionTime": report.transition_time(volume),
            "observedGeneration": volume.metadata.generation,
        }],
        "lastError": report.last_error(),
    });
    if let Some(bytes) = report.capacity {
        status["capacityBytes"] = json!(bytes);
        status["volumeHandle"] = json!(volume.name_any());
    }
    let shown = report.already_shown(volume);
    kubeapi::merge_status_unless_shown(api, volume, shown, status).await?;
    Ok(())
}

pub fn error_policy(volume: Arc<Volume>, error: &Error, ctx: Arc<NodeContext>) -> Action {
    tracing::warn!(volume = %volume.name_any(), %error, "node volume work failed");
    ctx.metrics
        .reconcile_failed("node_volume", error.metric_label());
    // Waiting for kubelet to let go, or the API briefly away, clears by
    // itself; a failing mkfs or a full disk needs someone.
    let may_resolve_itself = matches!(error, Error::InUse { .. } | Error::Kube(_));
    Action::requeue(
        ctx.failures
            .backoff(&volume.object_ref(&()), may_resolve_itself),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VolumeStatus;
    use crate::testing;

    fn volume(node: &str) -> Volume {
        let mut spec = testing::volume_spec("local.stowage.dev", 1 << 24);
        spec.node = Some(node.into());
        testing::volume("pvc-1", spec)
    }

    #[test]
    fn another_nodes_volume_is_left_alone() {
        assert_eq!(plan(&volume("b"), "a"), NodeWork::Nothing);
    }

    #[test]
    fn new_volume_is_created_with_its_size() {
        assert_eq!(plan(&volume("a"), "a"), NodeWork::Create { bytes: 1 << 24 });
    }

    #[test]
    fn ready_volume_of_this_generation_is_done() {
        let mut v = volume("a");
        v.status = Some(VolumeStatus {
            phase: VolumePhase::Ready,
            observed_generation: Some(1),
            ..Default::default()
        });
        assert_eq!(plan(&v, "a"), NodeWork::Nothing);
        v.metadata.generation = Some(2);
        assert_eq!(
            plan(&v, "a"),
            NodeWork::Create { bytes: 1 << 24 },
            "new generation is redone"
        );
    }

    #[test]
    fn deleted_volume_is_removed_until_the_finalizer_is_gone() {
        let mut v = volume("a");
        v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert_eq!(plan(&v, "a"), NodeWork::Delete);
        v.metadata.finalizers = None;
        assert_eq!(plan(&v, "a"), NodeWork::Nothing);
    }
}
