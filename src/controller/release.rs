//! Releasing the Volumes of a node deleted from the cluster.
//!
//! A node-local Volume's finalizer is removed by its node's agent once the
//! data is deleted. When the node itself is gone, no agent will: the
//! Volume, and the PV waiting on it, would stay forever. An admin who knows
//! the node is gone for good annotates its Volumes
//! `stowage.dev/release-node=<node>` (`stowage release-node NODE` does it
//! for every Volume of the node); the controller then drops the finalizer
//! of each such Volume once it is being deleted (its claim deleted, reclaim
//! `Delete`), and only while that Node does not exist, asked of the API
//! server rather than the cache. The data went with the node.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::informer::Informers;
use super::job::{Job, JobRun, Retry};
use super::{Context, Error};
use crate::crd::{NODE_LABEL, VOLUME_FINALIZER, Volume};
use crate::kubeapi;

pub const ANN_RELEASE_NODE: &str = "stowage.dev/release-node";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Not asked for, or nothing left to release.
    Skip,
    /// Asked for, but not safe: why.
    Refuse(String),
    /// Released; the finalizer goes once the Volume is deleted.
    Wait,
    DropFinalizer,
}

pub fn plan(volume: &Volume, node_exists: bool) -> Release {
    let Some(asked) = volume.annotations().get(ANN_RELEASE_NODE) else {
        return Release::Skip;
    };
    let node = volume.spec.node.as_deref().unwrap_or_default();
    if asked != node {
        return Release::Refuse(format!(
            "{ANN_RELEASE_NODE}={asked} but the volume is on {node:?}: nothing released"
        ));
    }
    if node_exists {
        return Release::Refuse(format!(
            "node {node} still exists, and its agent deletes the data itself: nothing released; \
             delete the Node first if it is gone for good"
        ));
    }
    if !volume.finalizers().iter().any(|f| f == VOLUME_FINALIZER) {
        return Release::Skip;
    }
    if volume.metadata.deletion_timestamp.is_none() {
        return Release::Wait;
    }
    Release::DropFinalizer
}

/// The job: every Volume change, acted on only for annotated Volumes.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let volumes = informers.volumes.subscribe();
    let controller = Controller::for_shared_stream(volumes, ctx.stores.volumes.clone());
    let job = Job {
        name: "release",
        retry: Retry::BackoffUnlessGone,
    };
    job.run(controller, reconcile, ctx)
}

#[tracing::instrument(skip_all, fields(volume = %volume.name_any()))]
async fn reconcile(volume: Arc<Volume>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !volume.annotations().contains_key(ANN_RELEASE_NODE) {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.jobs.reconcile_timer("release");
    let node = volume.spec.node.clone().unwrap_or_default();
    let exists = !node.is_empty()
        && Api::<Node>::all(ctx.client.clone())
            .get_opt(&node)
            .await?
            .is_some();
    match plan(&volume, exists) {
        Release::Skip => {}
        Release::Refuse(why) => {
            ctx.event(
                &*volume,
                EventType::Warning,
                "ReleaseRefused",
                "Release",
                &why,
            )
            .await;
        }
        Release::Wait => {
            let note = format!(
                "released from node {node}: removed without its data once its claim is deleted"
            );
            ctx.event(
                &*volume,
                EventType::Normal,
                "ReleasePending",
                "Release",
                &note,
            )
            .await;
        }
        Release::DropFinalizer => {
            let api = Api::<Volume>::all(ctx.client.clone());
            kubeapi::remove_finalizer(&api, volume.as_ref(), VOLUME_FINALIZER).await?;
            tracing::info!(%node, "volume released from a deleted node");
        }
    }
    Ok(Action::await_change())
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot reach the Kubernetes API: {0}. Set KUBECONFIG")]
    Connect(#[source] kube::Error),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "node {0} still exists: its agent deletes its volumes' data itself. Release only the \
         volumes of a node deleted for good (`kubectl delete node {0}` first)"
    )]
    NodeExists(String),
}

/// `stowage release-node NODE`: annotates every Volume of a deleted node
/// so that the controller lets them go, and says what is left to do.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The deleted node whose Volumes to release.
    pub node: String,
}

pub async fn release_node(args: Args) -> Result<(), ReleaseError> {
    let client = crate::kubeapi::client("release")
        .await
        .map_err(ReleaseError::Connect)?;
    let node = &args.node;
    if Api::<Node>::all(client.clone())
        .get_opt(node)
        .await?
        .is_some()
    {
        return Err(ReleaseError::NodeExists(node.clone()));
    }
    let api = Api::<Volume>::all(client);
    let volumes = api
        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}")))
        .await?;
    if volumes.items.is_empty() {
        println!("no stowage Volumes on node {node}");
    }
    let patch = json!({ "metadata": { "annotations": { ANN_RELEASE_NODE: node } } });
    for volume in volumes.items {
        api.patch(
            &volume.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        let claim = volume
            .spec
            .claim
            .as_ref()
            .map(|c| format!("; delete claim {}/{} to remove it", c.namespace, c.name))
            .unwrap_or_default();
        println!("volume {} released{claim}", volume.name_any());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(node: &str, annotation: Option<&str>, deleting: bool) -> Volume {
        let mut v: Volume = serde_json::from_value(json!({
            "apiVersion": "stowage.dev/v1alpha1", "kind": "Volume",
            "metadata": { "name": "pvc-1", "finalizers": [VOLUME_FINALIZER] },
            "spec": { "driver": "local.stowage.dev", "capacityBytes": 1, "accessModes": [], "node": node },
        }))
        .unwrap();
        if let Some(a) = annotation {
            v.annotations_mut()
                .insert(ANN_RELEASE_NODE.into(), a.into());
        }
        if deleting {
            v.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        v
    }

    #[test]
    fn only_a_deleting_volume_of_a_node_gone_and_named_loses_its_finalizer() {
        assert_eq!(plan(&volume("a", None, true), false), Release::Skip);
        assert_eq!(
            plan(&volume("a", Some("a"), true), false),
            Release::DropFinalizer
        );
        assert_eq!(plan(&volume("a", Some("a"), false), false), Release::Wait);
        assert!(
            matches!(plan(&volume("a", Some("a"), true), true), Release::Refuse(w) if w.contains("still exists"))
        );
        assert!(
            matches!(plan(&volume("a", Some("b"), true), false), Release::Refuse(w) if w.contains("on \"a\""))
        );
        let mut done = volume("a", Some("a"), true);
        done.metadata.finalizers = Some(vec![]);
        assert_eq!(plan(&done, false), Release::Skip);
    }
}
