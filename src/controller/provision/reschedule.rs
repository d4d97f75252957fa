//! Giving a `WaitForFirstConsumer` claim back to the scheduler, as
//! external-provisioner does when CreateVolume answers ResourceExhausted:
//! when the node kube-scheduler picked cannot hold the volume, the claim's
//! `volume.kubernetes.io/selected-node` annotation is removed. The
//! scheduler's wait for the claim to bind then fails ("selectedNode
//! annotation reset"), and it places the pod again, on what it knows now.
//! With CSIStorageCapacity published this should be rare: it covers a
//! node filled between the scheduler's look and ours, and clusters that
//! run with `--enable-capacity=false`.

use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::ProvisionError;
use crate::controller::cached_claim::Claim;
use crate::controller::protocol::{ANN_SELECTED_NODE, BINDING_WAIT_FOR_FIRST_CONSUMER};
use crate::controller::{Context, Error, job};

/// The node to give up, when `error` is one another node could avoid and
/// the scheduler chose this one. Errors a new node cannot fix (the claim's
/// own parameters, a failure after the Volume was written to its node) keep
/// the scheduler's choice.
pub(super) fn node_to_give_up<'a>(
    claim: &'a Claim,
    class: Option<&StorageClass>,
    error: &ProvisionError,
) -> Option<&'a str> {
    let wffc = class.and_then(|c| c.volume_binding_mode.as_deref())
        == Some(BINDING_WAIT_FOR_FIRST_CONSUMER);
    let another_node_could = matches!(
        error,
        ProvisionError::NoRoomOnNode { .. }
            | ProvisionError::DiskPressure { .. }
            | ProvisionError::NodeWithoutAgent(_)
            | ProvisionError::NodeNotReady { .. }
    );
    let selected = claim.annotations().get(ANN_SELECTED_NODE)?;
    (wffc && another_node_could).then_some(selected.as_str())
}

/// Removes the annotation, only from the claim as it was read (a newer
/// choice by the scheduler is kept: the write then conflicts and the claim
/// is planned again), and says why on the claim.
#[tracing::instrument(skip_all, fields(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any()), node = %node))]
pub(super) async fn give_back(
    ctx: &Context,
    claim: &Claim,
    node: &str,
    error: &ProvisionError,
) -> Result<(), Error> {
    let api = Api::<Claim>::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let patch = json!({ "metadata": {
        "resourceVersion": claim.resource_version(),
        "annotations": { ANN_SELECTED_NODE: null },
    }});
    api.patch(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    tracing::info!(%error, "selected node cannot hold the volume; asked the scheduler again");
    job::count_failure(ctx, "claim", "rescheduled");
    ctx.event(
        claim,
        EventType::Warning,
        "Rescheduling",
        "Provision",
        &format!(
            "{error}; removed {ANN_SELECTED_NODE}={node} so that the scheduler picks another node"
        ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(selected: Option<&str>) -> Claim {
        let annotations: std::collections::BTreeMap<_, _> = selected
            .map(|n| (ANN_SELECTED_NODE, n))
            .into_iter()
            .collect();
        serde_json::from_value(json!({ "metadata": { "name": "c", "annotations": annotations } }))
            .unwrap()
    }

    fn class(mode: &str) -> StorageClass {
        crate::testing::storage_class("s", "local.stowage.dev", Some(mode), &[])
    }

    #[test]
    fn only_errors_another_node_avoids_give_the_claim_back() {
        let no_room = ProvisionError::NoRoomOnNode {
            node: "a".into(),
            wanted: "1Gi".into(),
            free: "0".into(),
        };
        let silent = ProvisionError::NodeNotReady {
            node: "a".into(),
            message: "silent".into(),
        };
        let pressure = ProvisionError::DiskPressure {
            node: "a".into(),
            message: "full".into(),
        };
        let wffc = class(BINDING_WAIT_FOR_FIRST_CONSUMER);
        let placed = claim(Some("a"));
        for error in [
            &no_room,
            &silent,
            &pressure,
            &ProvisionError::NodeWithoutAgent("a".into()),
        ] {
            assert_eq!(
                node_to_give_up(&placed, Some(&wffc), error),
                Some("a"),
                "{error}"
            );
        }
        // Nothing to give back: no choice made, or the class's own binding.
        assert_eq!(node_to_give_up(&claim(None), Some(&wffc), &no_room), None);
        let immediate = class("Immediate");
        assert_eq!(node_to_give_up(&placed, Some(&immediate), &no_room), None);
        // Another node would not help.
        for error in [
            ProvisionError::NoSize,
            ProvisionError::BlockOnDir,
            ProvisionError::Backend {
                node: "a".into(),
                message: "mkfs failed".into(),
            },
        ] {
            assert_eq!(
                node_to_give_up(&placed, Some(&wffc), &error),
                None,
                "{error}"
            );
        }
    }
}
