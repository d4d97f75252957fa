//! The content plan's effects, each as csi-snapshotter makes it: the
//! being-created annotation around CreateSnapshot, status through the
//! status subresource, errors into `status.error` with a Warning event,
//! the driver's snapshot deleted before snapshot-controller's finalizer
//! goes.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::local;
use super::plan::{self, Step};
use crate::backend::csi_proxy::{CsiDriver, Snapshot};
use crate::controller::protocol::{
    PARAM_SNAPSHOT_CONTENT_NAME, PARAM_SNAPSHOT_NAME, PARAM_SNAPSHOT_NAMESPACE,
};
use crate::controller::secrets::{self, SecretFor, SecretRef, Secrets};
use crate::controller::{Context, Error};
use crate::kubeapi;
use crate::snapshot_api::{
    ANN_BEING_CREATED, ANN_SECRET_NAME, ANN_SECRET_NAMESPACE, CONTENT_FINALIZER,
    VolumeSnapshotContent, class_resource,
};

/// What a step found out about readiness: whether to look again.
pub enum Outcome {
    Done,
    NotReady,
}

/// Where the content's snapshots are cut.
pub enum Backend<'a> {
    Driver(&'a CsiDriver),
    /// `local.stowage.dev`: snapshot Volumes the node agents cut.
    Local,
}

pub async fn apply(
    ctx: &Context,
    backend: &Backend<'_>,
    content: &VolumeSnapshotContent,
    step: Step,
) -> Result<Outcome, Error> {
    let api = Api::<VolumeSnapshotContent>::all(ctx.client.clone());
    let on = Effects {
        ctx,
        backend,
        api: &api,
        content,
    };
    match step {
        Step::Nothing => Ok(Outcome::Done),
        Step::Settle => {
            set_being_created(&api, content, false).await?;
            Ok(Outcome::Done)
        }
        Step::Create { volume_handle } => {
            let result = on.create(&volume_handle).await;
            let what = "Failed to create snapshot";
            on.report(result, "SnapshotCreationFailed", what).await
        }
        Step::Check { snapshot_handle } => {
            let result = on.check(&snapshot_handle).await;
            let what = "Failed to check and update snapshot content";
            on.report(result, "SnapshotContentCheckandUpdateFailed", what)
                .await
        }
        Step::Delete {
            snapshot_handle,
            finalizer,
        } => {
            if let Some(handle) = snapshot_handle
                && !on.delete(&handle).await?
            {
                return Ok(Outcome::NotReady);
            }
            if finalizer {
                kubeapi::remove_finalizer(
                    &api,
                    &api.get(&content.name_any()).await?,
                    CONTENT_FINALIZER,
                )
                .await?;
            }
            Ok(Outcome::Done)
        }
    }
}

/// One content and what its effects work with.
struct Effects<'a> {
    ctx: &'a Context,
    backend: &'a Backend<'a>,
    api: &'a Api<VolumeSnapshotContent>,
    content: &'a VolumeSnapshotContent,
}

impl Effects<'_> {
    /// A failure of create or check: in `status.error` (once per message)
    /// with a Warning event, then returned for the job's backoff.
    async fn report(
        &self,
        result: Result<Outcome, Error>,
        reason: &str,
        what: &str,
    ) -> Result<Outcome, Error> {
        let Err(error) = result else {
            return result;
        };
        let message = format!("{what}: {error}");
        let shown = self
            .content
            .status
            .as_ref()
            .and_then(|s| s.error.as_ref()?.message.as_deref())
            == Some(message.as_str());
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let status = json!({
            "readyToUse": false,
            "error": { "time": now, "message": message },
        });
        if kubeapi::merge_status_unless_shown(self.api, self.content, shown, status).await? {
            self.ctx
                .event(
                    self.content,
                    EventType::Warning,
                    reason,
                    "Snapshot",
                    &message,
                )
                .await;
        }
        Err(error)
    }

    async fn create(&self, volume_handle: &str) -> Result<Outcome, Error> {
        let name = self.content.name_any();
        let invalid = |m: String| Error::Snapshot(m);
        let class = self
            .content
            .spec
            .volume_snapshot_class_name
            .as_deref()
            .ok_or_else(|| {
                invalid(format!(
                    "failed to take snapshot {name} without a snapshot class"
                ))
            })?;
        let mut parameters =
            plan::driver_parameters(&class_parameters(self.ctx, class).await?).map_err(invalid)?;
        if self.ctx.extra_create_metadata {
            let by = &self.content.spec.volume_snapshot_ref;
            parameters.insert(
                PARAM_SNAPSHOT_NAME.into(),
                by.name.clone().unwrap_or_default(),
            );
            parameters.insert(
                PARAM_SNAPSHOT_NAMESPACE.into(),
                by.namespace.clone().unwrap_or_default(),
            );
            parameters.insert(PARAM_SNAPSHOT_CONTENT_NAME.into(), name.clone());
        }
        let snapshot_name = plan::snapshot_name(self.content).ok_or_else(|| {
            invalid(format!(
                "cannot create snapshot: snapshot content {name} not bound to a snapshot"
            ))
        })?;
        let secrets = content_secrets(self.ctx, self.content).await?;
        let content = set_being_created(self.api, self.content, true).await?;
        let cut = match self.backend {
            Backend::Driver(driver) => driver
                .create_snapshot(&snapshot_name, volume_handle, parameters, secrets)
                .await
                .map_err(Error::from),
            Backend::Local => local::cut(self.ctx, &snapshot_name, volume_handle).await,
        };
        match cut {
            Ok(snapshot) => {
                crate::failpoint::hit("controller-after-create-snapshot");
                let outcome = write_status(self.api, &content, &snapshot).await?;
                set_being_created(self.api, &content, false).await?;
                Ok(outcome)
            }
            Err(e) => {
                // Only a final answer means nothing is being cut any more.
                let ended = match &e {
                    Error::Driver(e) => e.is_final(),
                    Error::Snapshot(_) => true,
                    _ => false,
                };
                if ended {
                    set_being_created(self.api, &content, false).await?;
                }
                Err(e)
            }
        }
    }

    async fn check(&self, handle: &str) -> Result<Outcome, Error> {
        let snapshot = match self.backend {
            Backend::Driver(driver) => {
                let secrets = list_secrets(self.ctx, self.content).await?;
                driver.snapshot_status(handle, secrets).await?
            }
            Backend::Local => local::status(self.ctx, handle).await?,
        };
        write_status(self.api, self.content, &snapshot).await
    }

    /// Deletes the snapshot; false while it is still going (a local snapshot
    /// waits for its node agent).
    async fn delete(&self, handle: &str) -> Result<bool, Error> {
        let failed = |note: &str| {
            let note = note.to_string();
            async move {
                self.ctx
                    .event(
                        self.content,
                        EventType::Warning,
                        "SnapshotDeleteError",
                        "Snapshot",
                        &note,
                    )
                    .await
            }
        };
        let secrets = match content_secrets(self.ctx, self.content).await {
            Ok(s) => s,
            Err(e) => {
                failed("Failed to get snapshot credentials").await;
                return Err(e);
            }
        };
        let deleted = match self.backend {
            Backend::Driver(driver) => driver
                .delete_snapshot(handle, secrets)
                .await
                .map(|()| true)
                .map_err(Error::from),
            Backend::Local => local::delete(self.ctx, handle).await,
        };
        match deleted {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                failed(&format!("Failed to delete snapshot: {e}")).await;
                return Err(e);
            }
        }
        crate::failpoint::hit("controller-after-delete-snapshot");
        let cleared = json!({
            "snapshotHandle": null, "readyToUse": null, "creationTime": null, "restoreSize": null,
        });
        kubeapi::merge_status(self.api, self.content, cleared).await?;
        Ok(true)
    }
}

/// Writes what the driver said, if it changes the status; done once the
/// snapshot is ready.
async fn write_status(
    api: &Api<VolumeSnapshotContent>,
    content: &VolumeSnapshotContent,
    snapshot: &Snapshot,
) -> Result<Outcome, Error> {
    if let Some(status) = plan::status_after(content.status.as_ref(), snapshot) {
        let status = json!({
            "snapshotHandle": status.snapshot_handle,
            "creationTime": status.creation_time,
            "restoreSize": status.restore_size,
            "readyToUse": status.ready_to_use,
            "error": status.error,
        });
        kubeapi::merge_status(api, content, status).await?;
    }
    Ok(if snapshot.ready {
        Outcome::Done
    } else {
        Outcome::NotReady
    })
}

/// Adds or removes the being-created annotation; returns the content as
/// written (or as it was, when nothing changed).
async fn set_being_created(
    api: &Api<VolumeSnapshotContent>,
    content: &VolumeSnapshotContent,
    on: bool,
) -> Result<VolumeSnapshotContent, Error> {
    if content.annotations().contains_key(ANN_BEING_CREATED) == on {
        return Ok(content.clone());
    }
    let value = on.then_some("yes");
    let patch = json!({ "metadata": { "annotations": { ANN_BEING_CREATED: value } } });
    Ok(api
        .patch(
            &content.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

async fn class_parameters(ctx: &Context, class: &str) -> Result<BTreeMap<String, String>, Error> {
    let classes = Api::<DynamicObject>::all_with(ctx.client.clone(), &class_resource());
    let Some(found) = classes.get_opt(class).await? else {
        return Err(Error::Snapshot(format!(
            "VolumeSnapshotClass {class} does not exist: create it or name another"
        )));
    };
    Ok(serde_json::from_value(found.data["parameters"].clone()).unwrap_or_default())
}

/// The Secret snapshot-controller resolved for CreateSnapshot and
/// DeleteSnapshot, from the content's annotations.
async fn content_secrets(ctx: &Context, content: &VolumeSnapshotContent) -> Result<Secrets, Error> {
    let Some(secret) =
        SecretRef::annotated(content.annotations(), ANN_SECRET_NAME, ANN_SECRET_NAMESPACE)
    else {
        return Ok(Secrets::default());
    };
    if secret.name.is_empty() || secret.namespace.is_empty() {
        return Err(Error::Snapshot(format!(
            "cannot retrieve secrets for snapshot content {}: secret name or namespace not specified",
            content.name_any()
        )));
    }
    Ok(secrets::read(&ctx.client, &secret, SecretFor::Snapshotter).await?)
}

/// The list Secret of a pre-provisioned content's class, if it names one
/// (`${volumesnapshotcontent.name}` is the one template allowed).
async fn list_secrets(ctx: &Context, content: &VolumeSnapshotContent) -> Result<Secrets, Error> {
    let Some(class) = content.spec.volume_snapshot_class_name.as_deref() else {
        return Ok(Secrets::default());
    };
    let params = class_parameters(ctx, class).await?;
    let key = |k: &str| {
        params
            .get(&format!("{}snapshotter-list-secret-{k}", secrets::PREFIX))
            .map(|v| v.replace("${volumesnapshotcontent.name}", &content.name_any()))
    };
    match (key("name"), key("namespace")) {
        (Some(name), Some(namespace)) => {
            let secret = SecretRef { namespace, name };
            Ok(secrets::read(&ctx.client, &secret, SecretFor::Snapshotter).await?)
        }
        _ => Ok(Secrets::default()),
    }
}
