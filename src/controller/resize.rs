//! external-resizer's job for `local.stowage.dev`, keyed by claim.
//!
//! A bound claim whose request exceeds its capacity moves through the states
//! kubelet and kubectl know from external-resizer (with
//! RecoverVolumeExpansionFailure, GA since 1.34): `allocatedResources` set and
//! `ControllerResizeInProgress` → the Volume's `capacityBytes` grows and its
//! node agent grows the image → the PV's capacity follows → either
//! `NodeResizePending` with the `FileSystemResizePending` condition, after
//! which kubelet's NodeExpandVolume grows the filesystem and writes the new
//! capacity, or (plain directories) the new capacity at once.
//!
//! Every step is read back from the objects, so a crash between steps
//! resumes where it stopped; no step shrinks anything.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};

use super::informer::Informers;
use super::job::{Job, Retry};
use super::{Context, Error, capacity, claim_of_pv, claim_of_volume};
use crate::backend::local::{self, Parameters};
use crate::crd::{Volume, VolumePhase};
use crate::quantity::{format_bytes, parse_bytes};

pub const CONTROLLER_RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
pub const CONTROLLER_RESIZE_INFEASIBLE: &str = "ControllerResizeInfeasible";
pub const NODE_RESIZE_PENDING: &str = "NodeResizePending";
pub const NODE_RESIZE_IN_PROGRESS: &str = "NodeResizeInProgress";
pub const NODE_RESIZE_INFEASIBLE: &str = "NodeResizeInfeasible";

/// Claim conditions that belong to resizing; the rest are left as found.
const RESIZE_CONDITIONS: [&str; 4] = [
    "Resizing",
    "FileSystemResizePending",
    "ControllerResizeError",
    "NodeResizeError",
];

/// kubelet's and external-resizer's wording, so `kubectl describe` reads alike.
const FS_RESIZE_PENDING_MESSAGE: &str =
    "Waiting for user to (re-)start a pod to finish file system resize of volume on node.";

/// Everything `plan` looks at for one claim.
pub struct ResizeView<'a> {
    pub claim: &'a PersistentVolumeClaim,
    pub pv: Option<&'a PersistentVolume>,
    pub class: Option<&'a StorageClass>,
    pub volume: Option<&'a Volume>,
    /// Free bytes on the Volume's node; None when no agent runs there.
    pub free_on_node: Option<i64>,
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
}

impl ResizeError {
    /// Whether only the user can fix it by asking for less (kubelet and
    /// kubectl read `ControllerResizeInfeasible` as that).
    pub fn infeasible(&self) -> bool {
        matches!(self, ResizeError::NoRoom { .. })
    }
}

fn storage<V>(map: Option<&std::collections::BTreeMap<String, V>>) -> Option<&V> {
    map?.get("storage")
}

fn bytes_of(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> Option<i64> {
    parse_bytes(&q?.0).ok()
}

pub fn plan(view: &ResizeView) -> Resize {
    let claim = view.claim;
    let Some(pv) = view.pv else {
        return Resize::Nothing;
    };
    if claim.metadata.deletion_timestamp.is_some() || !bound_to(pv, claim) {
        return Resize::Nothing;
    }
    let Some(request) = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| storage(r.requests.as_ref()))
        .cloned()
    else {
        return Resize::Nothing;
    };
    let status = claim.status.clone().unwrap_or_default();
    let (Some(requested), Some(current)) = (
        bytes_of(Some(&request)),
        bytes_of(storage(status.capacity.as_ref())),
    ) else {
        return Resize::Nothing;
    };
    if requested <= current {
        return Resize::Nothing;
    }
    let resize_status = storage(status.allocated_resource_statuses.as_ref()).map(String::as_str);
    let allocated = bytes_of(storage(status.allocated_resources.as_ref()));
    let on_node = matches!(
        resize_status,
        Some(NODE_RESIZE_PENDING | NODE_RESIZE_IN_PROGRESS | NODE_RESIZE_INFEASIBLE)
    );
    if on_node && allocated.is_some_and(|a| requested <= a) {
        return Resize::Nothing;
    }

    let Some(class) = view.class else {
        return Resize::Refuse(ResizeError::NoClass);
    };
    if class.allow_volume_expansion != Some(true) {
        return Resize::Refuse(ResizeError::NotExpandable(class.name_any()));
    }
    let Some(volume) = view.volume else {
        return Resize::Refuse(ResizeError::NotProvisioned(pv.name_any()));
    };
    let started = allocated == Some(requested)
        && matches!(
            resize_status,
            Some(CONTROLLER_RESIZE_IN_PROGRESS | CONTROLLER_RESIZE_INFEASIBLE)
        );
    if !started {
        return Resize::Start { request: request.0 };
    }

    let node = volume.spec.node.clone().unwrap_or_default();
    if volume.spec.capacity_bytes < requested {
        let more = requested - volume.spec.capacity_bytes;
        return match view.free_on_node {
            None => Resize::Refuse(ResizeError::NoAgent(node)),
            Some(free) if free < more => Resize::Refuse(ResizeError::NoRoom {
                node,
                more: format_bytes(more),
                free: format_bytes(free.max(0)),
                most: format_bytes(volume.spec.capacity_bytes + free.max(0)),
            }),
            // Room again after an infeasible attempt: say we are at it.
            Some(_) if resize_status == Some(CONTROLLER_RESIZE_INFEASIBLE) => {
                Resize::Start { request: request.0 }
            }
            Some(_) => Resize::GrowVolume { bytes: requested },
        };
    }
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

fn bound_to(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let Some(spec) = pv.spec.as_ref() else {
        return false;
    };
    let ours = spec
        .csi
        .as_ref()
        .is_some_and(|c| c.driver == local::DRIVER_NAME);
    let claim_ref = spec.claim_ref.as_ref();
    ours && claim.uid().is_some()
        && claim_ref.and_then(|r| r.uid.clone()) == claim.uid()
        && claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
            == Some(pv.name_any().as_str())
}

/// The claim's conditions with the resize ones replaced by `new`.
fn conditions_with(
    claim: &PersistentVolumeClaim,
    new: Option<(&str, &str)>,
) -> Vec<PersistentVolumeClaimCondition> {
    let mut out: Vec<_> = claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !RESIZE_CONDITIONS.contains(&c.type_.as_str()))
        .collect();
    if let Some((type_, message)) = new {
        out.push(PersistentVolumeClaimCondition {
            type_: type_.into(),
            status: "True".into(),
            message: (!message.is_empty()).then(|| message.into()),
            last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            ..Default::default()
        });
    }
    out
}

/// The expansion job, on its own queue: an expansion never waits behind a
/// provisioning storm.
pub fn controller(
    ctx: Arc<Context>,
    informers: &mut Informers,
) -> impl Future<Output = ()> + Send + 'static {
    let claims = informers.claims.subscribe();
    let volumes = informers.volumes.subscribe();
    let pvs = informers.pvs.subscribe();
    let controller = Controller::for_shared_stream(claims, ctx.stores.claims.clone())
        .watches_shared_stream(volumes, claim_of_volume)
        .watches_shared_stream(pvs, claim_of_pv);
    let job = Job {
        name: "resize",
        retry: Retry::Backoff,
    };
    job.run(controller, reconcile, ctx)
}

#[tracing::instrument(skip_all, fields(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any())))]
pub async fn reconcile(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.serve_local {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.jobs.reconcile_timer("resize");
    let s = &ctx.stores;
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    if pv_name.is_empty() {
        return Ok(Action::await_change());
    }
    let pv = s.pvs.get(&ObjectRef::new(&pv_name));
    let class = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .and_then(|name| s.classes.get(&ObjectRef::new(name)));
    let volume_name = pv
        .as_ref()
        .and_then(|p| p.spec.as_ref()?.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .unwrap_or_default();
    let volume = s.volumes.get(&ObjectRef::new(&volume_name));
    let free_on_node = volume.as_ref().and_then(|v| {
        let nodes = s.storage_nodes.state();
        let nodes: Vec<_> = nodes.iter().map(|n| n.as_ref()).collect();
        let promised = ctx
            .promised
            .lock()
            .expect("capacity index poisoned")
            .per_node();
        capacity::free_on(&nodes, &promised, v.spec.node.as_deref()?)
    });
    let view = ResizeView {
        claim: &claim,
        pv: pv.as_deref(),
        class: class.as_deref(),
        volume: volume.as_deref(),
        free_on_node,
    };
    let step = plan(&view);
    tracing::debug!(?step, "planned");
    let claims = Api::<PersistentVolumeClaim>::namespaced(
        ctx.client.clone(),
        &claim.namespace().unwrap_or_default(),
    );
    let pp = PatchParams::default();
    let patch_status = |status: Value| {
        let patch = json!({
            "metadata": { "resourceVersion": claim.resource_version() },
            "status": status,
        });
        let claims = claims.clone();
        let name = claim.name_any();
        let pp = pp.clone();
        async move {
            claims
                .patch_status(&name, &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
    };
    match step {
        Resize::Nothing | Resize::WaitForNode => {}
        Resize::Refuse(e) => {
            ctx.event(
                &*claim,
                EventType::Warning,
                "VolumeResizeFailed",
                "Resize",
                &e.to_string(),
            )
            .await;
            ctx.metrics.jobs.reconcile_failed("resize", "refused");
            let current = claim
                .status
                .as_ref()
                .and_then(|s| storage(s.allocated_resource_statuses.as_ref()).cloned());
            if e.infeasible() && current.as_deref() != Some(CONTROLLER_RESIZE_INFEASIBLE) {
                patch_status(json!({
                    "allocatedResourceStatuses": { "storage": CONTROLLER_RESIZE_INFEASIBLE },
                    "conditions": conditions_with(&claim, Some(("ControllerResizeError", &e.to_string()))),
                }))
                .await?;
            }
            return Ok(Action::requeue(ctx.backoff(&claim.object_ref(&()), true)));
        }
        Resize::Start { request } => {
            patch_status(json!({
                "allocatedResources": { "storage": request },
                "allocatedResourceStatuses": { "storage": CONTROLLER_RESIZE_IN_PROGRESS },
                "conditions": conditions_with(&claim, Some(("Resizing", ""))),
            }))
            .await?;
            ctx.event(
                &*claim,
                EventType::Normal,
                "Resizing",
                "Resize",
                &format!("External resizer is resizing volume {pv_name}"),
            )
            .await;
        }
        Resize::GrowVolume { bytes } => {
            let volume = volume.expect("planned from it");
            let patch = json!({
                "metadata": { "resourceVersion": volume.resource_version() },
                "spec": { "capacityBytes": bytes },
            });
            Api::<Volume>::all(ctx.client.clone())
                .patch(&volume.name_any(), &pp, &Patch::Merge(&patch))
                .await?;
            crate::failpoint::hit("controller-after-volume-grown");
            tracing::info!(bytes, volume = %volume.name_any(), "volume growing");
        }
        Resize::ResizePv { bytes } => {
            let patch = json!({ "spec": { "capacity": { "storage": format_bytes(bytes) } } });
            Api::<PersistentVolume>::all(ctx.client.clone())
                .patch(&pv_name, &pp, &Patch::Merge(&patch))
                .await?;
            tracing::info!(bytes, pv = %pv_name, "PV capacity updated");
        }
        Resize::AwaitNodeExpansion => {
            patch_status(json!({
                "allocatedResourceStatuses": { "storage": NODE_RESIZE_PENDING },
                "conditions": conditions_with(&claim, Some(("FileSystemResizePending", FS_RESIZE_PENDING_MESSAGE))),
            }))
            .await?;
            ctx.event(
                &*claim,
                EventType::Normal,
                "FileSystemResizeRequired",
                "Resize",
                "Require file system resize of volume on node",
            )
            .await;
        }
        Resize::Finish { bytes } => {
            patch_status(json!({
                "capacity": { "storage": format_bytes(bytes) },
                "allocatedResourceStatuses": { "storage": null },
                "conditions": conditions_with(&claim, None),
            }))
            .await?;
            ctx.event(
                &*claim,
                EventType::Normal,
                "VolumeResizeSuccessful",
                "Resize",
                "Resize volume succeeded",
            )
            .await;
            ctx.forget_failures(&claim.object_ref(&()));
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests;
