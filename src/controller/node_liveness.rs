//! Nodes whose agent went silent, and nodes deleted from the cluster:
//! nothing waits on them silently.
//!
//! - A StorageNode whose `status.heartbeatTime` is older than
//!   `--node-heartbeat-timeout` gets `Ready=False` (`HeartbeatExpired`),
//!   written here. Placement then skips the node (`provision`), the
//!   capacity job stops publishing it, a `NodeHeartbeatExpired` Warning
//!   goes on the StorageNode and on the claims waiting there (placed there
//!   by the scheduler, or with a Volume there not made yet). The agent's
//!   next report replaces the conditions, which clears it.
//! - A Volume whose node has no Node object any more (deleted from the
//!   cluster; its StorageNode goes with it, owned by the Node) can be
//!   neither served nor deleted by an agent: its PV (or claim) gets a
//!   `NodeDeleted` Warning naming the way out (`stowage release-node`,
//!   see `release`), once per Volume and controller start.

use futures::FutureExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::capacity::{self, READY, REASON_HEARTBEAT_EXPIRED};
use super::informer::Informers;
use super::job::{self, JobRun};
use super::{Config, Context, Error};
use crate::backend::local;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::{ConditionStatus, StorageNode, Volume, VolumeCondition, VolumePhase};
use crate::kubeapi;

const JOB: &str = "node_liveness";

/// A node to mark, with the message its condition and events carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Silent {
    pub node: String,
    pub message: String,
}

/// The StorageNodes of our driver whose last report is older than
/// `timeout` and that are not marked yet. A node that never reported has
/// no heartbeat and offers nothing anyway.
pub fn silent_nodes(nodes: &[&StorageNode], now: Timestamp, timeout: Duration) -> Vec<Silent> {
    nodes
        .iter()
        .filter(|n| n.spec.driver == local::DRIVER_NAME && capacity::not_ready(n).is_none())
        .filter_map(|n| {
            let last = n.status.as_ref()?.heartbeat_time.as_ref()?.0;
            let age = now.duration_since(last).as_secs_f64();
            (age > timeout.as_secs_f64()).then(|| Silent {
                node: n.spec.node.clone(),
                message: format!(
                    "the stowage agent on {} last reported at {last} ({}s ago, more than \
                     --node-heartbeat-timeout {}s): no new volumes go there until it reports again",
                    n.spec.node,
                    age as i64,
                    timeout.as_secs()
                ),
            })
        })
        .collect()
}

/// Volumes on a node that has no Node object, not reported yet.
pub fn on_gone_nodes<'a>(
    volumes: &[&'a Volume],
    node_exists: impl Fn(&str) -> bool,
    reported: &HashSet<String>,
) -> Vec<&'a Volume> {
    volumes
        .iter()
        .copied()
        .filter(|v| v.spec.node.as_deref().is_some_and(|n| !node_exists(n)))
        .filter(|v| !reported.contains(&v.name_any()))
        .collect()
}

/// The job: a pass every quarter of the timeout (at most 15 s), and at
/// once when a Node is deleted.
pub fn controller(ctx: Arc<Context>, informers: &mut Informers, config: &Config) -> JobRun {
    let wake = Arc::new(Notify::new());
    let poke = wake.clone();
    informers.nodes.on_delete(move |_| poke.notify_one());
    let timeout = config.node_heartbeat_timeout;
    let enabled = config.serve_local;
    async move {
        if enabled {
            run(ctx, wake, timeout).await;
        }
    }
    .boxed()
}

async fn run(ctx: Arc<Context>, wake: Arc<Notify>, timeout: Duration) {
    let period = (timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
    let mut reported = HashSet::new();
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(period) => {}
        }
        let Some(_pass) = ctx.gate.enter().await else {
            return;
        };
        let _timer = ctx.metrics.jobs.reconcile_timer(JOB);
        if let Err(e) = pass(&ctx, timeout, &mut reported).await {
            job::pass_failed(&ctx, JOB, "checking node liveness", &e);
        }
    }
}

async fn pass(
    ctx: &Context,
    timeout: Duration,
    reported: &mut HashSet<String>,
) -> Result<(), Error> {
    let nodes = ctx.stores.storage_nodes.state();
    let refs: Vec<_> = nodes.iter().map(|n| n.as_ref()).collect();
    for silent in silent_nodes(&refs, Timestamp::now(), timeout) {
        let node = refs
            .iter()
            .find(|n| n.spec.node == silent.node)
            .expect("planned from this list");
        mark_silent(ctx, node, &silent).await?;
    }
    let volumes = ctx.stores.volumes.state();
    let refs: Vec<_> = volumes.iter().map(|v| v.as_ref()).collect();
    let exists = |n: &str| ctx.stores.nodes.get(&ObjectRef::new(n)).is_some();
    for volume in on_gone_nodes(&refs, exists, reported) {
        report_gone_node(ctx, volume).await;
        reported.insert(volume.name_any());
    }
    Ok(())
}

/// Writes `Ready=False` beside the agent's own conditions (only on the
/// StorageNode as read: a report that came meanwhile wins), then warns.
#[tracing::instrument(skip_all, fields(node = %silent.node))]
async fn mark_silent(ctx: &Context, node: &StorageNode, silent: &Silent) -> Result<(), Error> {
    let mut conditions: Vec<VolumeCondition> = node
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions.retain(|c| c.type_ != READY);
    conditions.push(VolumeCondition {
        type_: READY.into(),
        status: ConditionStatus::False,
        reason: REASON_HEARTBEAT_EXPIRED.into(),
        message: silent.message.clone(),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        observed_generation: None,
    });
    let api = Api::<StorageNode>::all(ctx.client.clone());
    let status = json!({ "conditions": conditions });
    match kubeapi::merge_status_at(&api, node, status).await {
        Err(e) if kubeapi::changed_meanwhile(&e) => return Ok(()),
        other => other?,
    };
    tracing::warn!(message = %silent.message, "node agent silent");
    let reason = "NodeHeartbeatExpired";
    ctx.event(
        node,
        EventType::Warning,
        reason,
        "CheckHeartbeat",
        &silent.message,
    )
    .await;
    for claim in waiting_on(ctx, &silent.node) {
        ctx.event(
            &claim,
            EventType::Warning,
            reason,
            "CheckHeartbeat",
            &silent.message,
        )
        .await;
    }
    Ok(())
}

/// Claims that wait on `node`: placed there by the scheduler and not
/// bound, or whose Volume there is not made yet.
fn waiting_on(ctx: &Context, node: &str) -> Vec<Claim> {
    let placed = ctx
        .pending
        .lock()
        .expect("pending index poisoned")
        .on_node(node);
    let mut claims: Vec<Claim> = placed
        .iter()
        .filter_map(|c| ctx.stores.claims.get(c))
        .map(|c| c.as_ref().clone())
        .collect();
    for volume in ctx.stores.volumes.state() {
        let unmade = volume
            .status
            .as_ref()
            .is_none_or(|s| s.phase != VolumePhase::Ready);
        if volume.spec.node.as_deref() != Some(node) || !unmade {
            continue;
        }
        if let Some(c) = &volume.spec.claim
            && !claims
                .iter()
                .any(|k| k.uid().as_deref() == Some(c.uid.as_str()))
        {
            claims.push(claim_ref(&c.namespace, &c.name, &c.uid));
        }
    }
    claims
}

fn claim_ref(namespace: &str, name: &str, uid: &str) -> Claim {
    serde_json::from_value(json!({ "metadata": {
        "namespace": namespace, "name": name, "uid": uid,
    }}))
    .expect("claim reference")
}

/// Tells the PV (or the claim, while there is no PV) what to do.
#[tracing::instrument(skip_all, fields(volume = %volume.name_any()))]
async fn report_gone_node(ctx: &Context, volume: &Volume) {
    let node = volume.spec.node.clone().unwrap_or_default();
    let note = format!(
        "node {node} was deleted from the cluster: volume {} was on it and no stowage agent \
         can serve or delete it. If the node is gone for good, run `stowage release-node {node}` \
         (or annotate the Volume {}={node}), then delete the claim: the PV and Volume are removed \
         without the data, which went with the node",
        volume.name_any(),
        super::release::ANN_RELEASE_NODE,
    );
    tracing::warn!("{note}");
    let pv = volume
        .spec
        .persistent_volume_name
        .as_ref()
        .and_then(|n| ctx.stores.pvs.get(&ObjectRef::<Pv>::new(n)));
    match (pv, &volume.spec.claim) {
        (Some(pv), _) => {
            ctx.event(
                pv.as_ref(),
                EventType::Warning,
                "NodeDeleted",
                "CheckNode",
                &note,
            )
            .await
        }
        (None, Some(c)) => {
            let claim = claim_ref(&c.namespace, &c.name, &c.uid);
            ctx.event(
                &claim,
                EventType::Warning,
                "NodeDeleted",
                "CheckNode",
                &note,
            )
            .await
        }
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests;
