//! external-attacher's job for `--csi-driver`s whose CSIDriver has
//! `attachRequired: true`: kube-controller-manager's attach-detach
//! controller creates a VolumeAttachment per (volume, node); we call
//! ControllerPublish/Unpublish and report in its status.
//!
//! The protocol is external-attacher's, so kcm, kubelet and kubectl read it
//! as usual: finalizer `external-attacher/<driver>` on the VA and the PV
//! before the first publish, the node ID kept in an annotation so a detach
//! works after the node is gone, `status.attached` with `attachmentMetadata`,
//! and `attachError`/`detachError` with the driver's message.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::informer::Informers;
use super::job::{Job, Retry, trigger};
use super::secrets::{self, SecretRef, Secrets};
use super::{Context, Error};
use crate::backend::csi_proxy::Capability;
use crate::kubeapi;

/// Where external-attacher keeps the node ID it published to.
pub const ANN_NODE_ID: &str = "csi.alpha.kubernetes.io/node-id";
/// kubelet's map of driver name → node ID on the Node object.
pub const ANN_NODE_IDS: &str = "csi.volume.kubernetes.io/nodeid";

/// external-attacher's finalizer name for a driver: anything but letters,
/// digits and '-' becomes '-'.
pub fn finalizer(driver: &str) -> String {
    let sanitized: String = driver
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("external-attacher/{sanitized}")
}

/// Everything `plan` looks at for one VolumeAttachment.
pub struct AttachView<'a> {
    pub va: &'a VolumeAttachment,
    pub pv: Option<&'a PersistentVolume>,
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

fn pv_name(va: &VolumeAttachment) -> Option<&str> {
    va.spec.source.persistent_volume_name.as_deref()
}

fn attached(va: &VolumeAttachment) -> bool {
    va.status.as_ref().is_some_and(|s| s.attached)
}

pub fn plan(view: &AttachView) -> Attach {
    let va = view.va;
    let ours = finalizer(&va.spec.attacher);
    let has_finalizer = va.finalizers().contains(&ours);
    if va.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Attach::Nothing;
        }
        if attached(va) || va.annotations().contains_key(ANN_NODE_ID) {
            let node_id = va
                .annotations()
                .get(ANN_NODE_ID)
                .cloned()
                .or_else(|| view.node_id.clone());
            return Attach::Unpublish { node_id };
        }
        return Attach::Release;
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
    let modes = pv
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    let shared = modes
        .iter()
        .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany");
    if !shared
        && let Some(other) = view
            .others
            .iter()
            .find(|o| o.spec.node_name != va.spec.node_name && attached(o))
    {
        return Attach::Refuse(AttachError::MultiAttach {
            pv: pv.name_any(),
            other: other.spec.node_name.clone(),
            mode: modes
                .first()
                .cloned()
                .unwrap_or_else(|| "ReadWriteOnce".into()),
        });
    }
    let Some(node_id) = va
        .annotations()
        .get(ANN_NODE_ID)
        .cloned()
        .or_else(|| view.node_id.clone())
    else {
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

/// The driver's node ID: the CSINode's entry, else kubelet's annotation.
/// From the caches; a Node missing there is confirmed with the API server,
/// since a stale cache must not detach a volume in use.
async fn node_id(ctx: &Context, node: &str, driver: &str) -> Result<(bool, Option<String>), Error> {
    let meta = ctx.stores.nodes.get(&ObjectRef::new(node));
    let exists = meta.is_some()
        || Api::<Node>::all(ctx.client.clone())
            .get_metadata_opt(node)
            .await?
            .is_some();
    if !exists {
        return Ok((false, None));
    }
    if let Some(csinode) = ctx.stores.csinodes.get(&ObjectRef::new(node))
        && let Some(d) = csinode.spec.drivers.iter().find(|d| d.name == driver)
    {
        return Ok((true, Some(d.node_id.clone())));
    }
    let from_annotation = meta
        .as_ref()
        .and_then(|n| n.annotations().get(ANN_NODE_IDS))
        .and_then(|json| serde_json::from_str::<BTreeMap<String, String>>(json).ok())
        .and_then(|ids| ids.get(driver).cloned());
    Ok((true, from_annotation))
}

fn capability(pv: &PersistentVolume) -> Capability {
    let spec = pv.spec.clone().unwrap_or_default();
    let csi = spec.csi.clone().unwrap_or_default();
    Capability {
        block: spec.volume_mode.as_deref() == Some("Block"),
        fs_type: csi.fs_type.unwrap_or_default(),
        mount_flags: spec.mount_options.unwrap_or_default(),
        access_mode: spec
            .access_modes
            .and_then(|m| m.first().cloned())
            .unwrap_or_default(),
    }
}

async fn publish_secrets(ctx: &Context, pv: &PersistentVolume) -> Result<Secrets, Error> {
    let r = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .and_then(|c| c.controller_publish_secret_ref.as_ref());
    match r {
        Some(r) => Ok(secrets::read(
            &ctx.client,
            &SecretRef {
                namespace: r.namespace.clone().unwrap_or_default(),
                name: r.name.clone().unwrap_or_default(),
            },
            secrets::SecretFor::ControllerPublish,
        )
        .await?),
        None => Ok(Secrets::default()),
    }
}

fn error_status(message: &str) -> serde_json::Value {
    json!({ "time": k8s_openapi::jiff::Timestamp::now().to_string(), "message": message })
}

/// The attach job, on its own queue: a pod start never waits behind
/// provisioning. A Node deleted gets its VolumeAttachments detached.
pub fn controller(
    ctx: Arc<Context>,
    informers: &mut Informers,
) -> impl Future<Output = ()> + Send + 'static {
    let attachments = informers.attachments.subscribe();
    let (requeue, requeues) = trigger::<VolumeAttachment>();
    let store = ctx.stores.attachments.clone();
    informers
        .nodes
        .on_delete(move |node: &PartialObjectMeta<Node>| {
            let name = node.name_any();
            for va in store.state() {
                if va.spec.node_name == name {
                    let _ = requeue.send(ObjectRef::from_obj(va.as_ref()));
                }
            }
        });
    let controller = Controller::for_shared_stream(attachments, ctx.stores.attachments.clone())
        .reconcile_on(requeues);
    // Detached and deleted between the cache's view and our write: 404.
    let job = Job {
        name: "attach",
        retry: Retry::BackoffUnlessGone,
    };
    job.run(controller, reconcile, ctx)
}

#[tracing::instrument(skip_all, fields(va = %va.name_any(), node = %va.spec.node_name))]
pub async fn reconcile(va: Arc<VolumeAttachment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(driver) = ctx.drivers.get(&va.spec.attacher) else {
        return Ok(Action::await_change());
    };
    let _timer = ctx.metrics.jobs.reconcile_timer("attach");
    let pv = pv_name(&va).and_then(|n| ctx.stores.pvs.get(&ObjectRef::new(n)));
    let (node_exists, node_id) = node_id(&ctx, &va.spec.node_name, &driver.name).await?;
    let all = ctx.stores.attachments.state();
    let others: Vec<_> = all
        .iter()
        .filter(|o| o.name_any() != va.name_any() && pv_name(o) == pv_name(&va))
        .map(|o| o.as_ref())
        .collect();
    let step = plan(&AttachView {
        va: &va,
        pv: pv.as_deref(),
        node_id,
        node_exists,
        others: &others,
    });
    tracing::debug!(?step, "planned");
    // A refused or failed attach is asked again at its backoff's pace; our
    // own attachError write must not wake it at once (external-attacher
    // ignores status-only changes for the same reason).
    if matches!(step, Attach::Refuse(_) | Attach::Publish { .. })
        && let Some(left) = ctx.retry_not_yet(&va.object_ref(&()))
    {
        return Ok(Action::requeue(left));
    }
    let vas = Api::<VolumeAttachment>::all(ctx.client.clone());
    let pp = PatchParams::default();
    let ours = finalizer(&driver.name);
    match step {
        Attach::Nothing => {}
        Attach::DeleteOrphan => {
            tracing::info!("node is gone; detaching");
            kubeapi::delete(&vas, &va.name_any(), va.uid()).await?;
        }
        Attach::Refuse(e) => {
            vas.patch_status(
                &va.name_any(),
                &pp,
                &Patch::Merge(json!({ "status": { "attached": false, "attachError": error_status(&e.to_string()) } })),
            )
            .await?;
            ctx.metrics.jobs.reconcile_failed("attach", "refused");
            return Ok(Action::requeue(ctx.backoff(&va.object_ref(&()), true)));
        }
        Attach::Prepare { node_id } => {
            let pv = pv.expect("planned with a PV");
            if !pv.finalizers().contains(&ours) {
                let mut finalizers = pv.finalizers().to_vec();
                finalizers.push(ours.clone());
                let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": pv.resource_version() } });
                Api::<PersistentVolume>::all(ctx.client.clone())
                    .patch(&pv.name_any(), &pp, &Patch::Merge(patch))
                    .await?;
            }
            let mut finalizers = va.finalizers().to_vec();
            if !finalizers.contains(&ours) {
                finalizers.push(ours.clone());
            }
            let patch = json!({ "metadata": {
                "finalizers": finalizers,
                "annotations": { ANN_NODE_ID: node_id },
                "resourceVersion": va.resource_version(),
            }});
            vas.patch(&va.name_any(), &pp, &Patch::Merge(patch)).await?;
        }
        Attach::Publish { node_id } => {
            let pv = pv.expect("planned with a PV");
            let csi = pv
                .spec
                .as_ref()
                .and_then(|s| s.csi.clone())
                .unwrap_or_default();
            let secrets = publish_secrets(&ctx, &pv).await?;
            let result = driver
                .publish(
                    &csi.volume_handle,
                    &node_id,
                    &capability(&pv),
                    csi.read_only.unwrap_or(false),
                    csi.volume_attributes.unwrap_or_default(),
                    secrets,
                )
                .await;
            match result {
                Ok(context) => {
                    vas.patch_status(
                        &va.name_any(),
                        &pp,
                        &Patch::Merge(json!({ "status": {
                            "attached": true, "attachmentMetadata": context, "attachError": null,
                        }})),
                    )
                    .await?;
                    tracing::info!(volume = %csi.volume_handle, "attached");
                    ctx.forget_failures(&va.object_ref(&()));
                }
                Err(e) => {
                    vas.patch_status(
                        &va.name_any(),
                        &pp,
                        &Patch::Merge(json!({ "status": { "attached": false, "attachError": error_status(&e.to_string()) } })),
                    )
                    .await?;
                    return Err(e.into());
                }
            }
        }
        Attach::Unpublish { node_id } => {
            let handle = pv
                .as_ref()
                .and_then(|p| p.spec.as_ref()?.csi.as_ref())
                .map(|c| c.volume_handle.clone());
            if let (Some(handle), Some(node_id)) = (handle, node_id) {
                let secrets = match &pv {
                    Some(pv) => publish_secrets(&ctx, pv).await?,
                    None => Secrets::default(),
                };
                if let Err(e) = driver.unpublish(&handle, &node_id, secrets).await {
                    vas.patch_status(
                        &va.name_any(),
                        &pp,
                        &Patch::Merge(
                            json!({ "status": { "detachError": error_status(&e.to_string()) } }),
                        ),
                    )
                    .await?;
                    return Err(e.into());
                }
                tracing::info!(volume = %handle, "detached");
            }
            let detached = vas.patch_status(
                &va.name_any(),
                &pp,
                &Patch::Merge(json!({ "status": { "attached": false, "detachError": null, "attachmentMetadata": null } })),
            )
            .await?;
            kubeapi::remove_finalizer(&vas, &detached, &ours).await?;
        }
        Attach::Release => kubeapi::remove_finalizer(&vas, &va, &ours).await?,
    }
    Ok(Action::await_change())
}

/// Whether a PV being deleted may drop our finalizer: no VolumeAttachment
/// names it any more.
pub fn pv_released(pv: &PersistentVolume, attachments: &[Arc<VolumeAttachment>]) -> Option<String> {
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

#[cfg(test)]
mod tests;
