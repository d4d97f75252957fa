//! The node's StorageNode: what it offers (capacity, free bytes) and its
//! `DiskPressure` condition, reported on start and every
//! `--report-interval`. When the condition turns True, the claims of this
//! node's sparse volumes get a Warning event (their writes may now fail
//! with ENOSPC); when it turns False again, a Normal one.

use crate::telemetry::events::Recorder;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Reporter as EventReporter};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::room::{self, Room};
use super::{Config, Error, FIELD_MANAGER, NodeContext};
use crate::backend::local::{self, Parameters};
use crate::crd::{
    ConditionStatus, DISK_PRESSURE, NODE_LABEL, StorageNode, Volume, VolumeCondition,
};

pub const REASON_BELOW_RESERVE: &str = "FreeSpaceBelowReserve";
pub const REASON_ABOVE_RESERVE: &str = "FreeSpaceAboveReserve";

pub struct Reporter {
    recorder: Recorder,
    data_dir: String,
}

/// The DiskPressure condition for a measurement, keeping the transition
/// time of `previous` while its status stays.
pub fn pressure_condition(room: &Room, previous: Option<&VolumeCondition>) -> VolumeCondition {
    let (status, reason, message) = match room.pressure() {
        Some(p) => (ConditionStatus::True, REASON_BELOW_RESERVE, p.to_string()),
        None => (
            ConditionStatus::False,
            REASON_ABOVE_RESERVE,
            format!(
                "the data filesystem has {} bytes free, at least its reserve of {} bytes",
                room.disk.available, room.reserve
            ),
        ),
    };
    let last_transition_time =
        previous
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| {
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                )
            });
    VolumeCondition {
        type_: DISK_PRESSURE.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: None,
    }
}

/// Whether a change of the condition is news for the claims: a turn to
/// True or back to False, not the first False of a healthy node.
pub fn is_news(previous: Option<&VolumeCondition>, now: &VolumeCondition) -> bool {
    match previous {
        Some(p) => p.status != now.status,
        None => now.status == ConditionStatus::True,
    }
}

impl Reporter {
    pub fn new(ctx: &NodeContext, config: &Config) -> Self {
        Reporter {
            recorder: Recorder::new(
                ctx.client.clone(),
                EventReporter {
                    controller: "stowage-node".into(),
                    instance: Some(ctx.node.clone()),
                },
            ),
            data_dir: config.data_dir.display().to_string(),
        }
    }

    /// Publishes this node's StorageNode (server-side apply, so it is
    /// idempotent), then warns claims if the pressure changed.
    pub async fn report(&self, ctx: &NodeContext) -> Result<(), Error> {
        let room = room::measure(&ctx.store, ctx.room).map_err(|source| Error::DataDir {
            path: self.data_dir.clone().into(),
            source,
        })?;
        let api = Api::<StorageNode>::all(ctx.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let object = json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "StorageNode",
            "metadata": { "name": ctx.node, "ownerReferences": node_owner(ctx).await? },
            "spec": { "driver": local::DRIVER_NAME, "node": ctx.node },
        });
        let current = api
            .patch(&ctx.node, &params, &Patch::Apply(&object))
            .await?;
        let previous = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == DISK_PRESSURE));
        let condition = pressure_condition(&room, previous);
        let status = json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "StorageNode",
            "status": {
                "capacityBytes": room.capacity,
                "availableBytes": room.disk.available,
                "reserveBytes": room.reserve,
                "dataDir": self.data_dir,
                "conditions": [condition],
                "heartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            },
        });
        api.patch_status(&ctx.node, &params, &Patch::Apply(&status))
            .await?;
        if is_news(previous, &condition) {
            if condition.status == ConditionStatus::True {
                tracing::warn!(message = %condition.message, "data filesystem under pressure");
            } else {
                tracing::info!(message = %condition.message, "data filesystem pressure relieved");
            }
            self.tell_claims(ctx, &condition).await?;
        }
        Ok(())
    }

    /// An event on the claim of each sparse volume on this node. Images
    /// made with `preallocate` hold their blocks already and are spared.
    async fn tell_claims(
        &self,
        ctx: &NodeContext,
        condition: &VolumeCondition,
    ) -> Result<(), Error> {
        let api = Api::<Volume>::all(ctx.client.clone());
        let mine = ListParams::default().labels(&format!("{NODE_LABEL}={}", ctx.node));
        let (type_, reason) = match condition.status {
            ConditionStatus::True => (EventType::Warning, "NodeDiskPressure"),
            _ => (EventType::Normal, "NodeDiskPressureRelieved"),
        };
        let note = format!("node {}: {}", ctx.node, condition.message);
        for volume in api.list(&mine).await? {
            let preallocated =
                Parameters::parse(&volume.spec.parameters).is_ok_and(|p| p.preallocate);
            let Some(claim) = volume.spec.claim.as_ref().filter(|_| !preallocated) else {
                continue;
            };
            let regarding = claim.object_reference();
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note.chars().take(1000).collect()),
                action: "CheckFreeSpace".into(),
                secondary: None,
            };
            // Events are for people: one that cannot be posted is logged,
            // and the report itself stands.
            if let Err(e) = self.recorder.publish(&event, &regarding).await {
                tracing::warn!(error = %e, claim = %claim.name, volume = %volume.name_any(), "posting event failed");
            }
        }
        Ok(())
    }
}

/// The Node as the StorageNode's owner, so that the garbage collector
/// deletes the StorageNode with the Node. Asked on every report, not
/// remembered: a Node deleted and registered again has a new UID, and an
/// owner that no longer exists would have the StorageNode collected at
/// once. A Node that does not exist (yet) owns nothing.
async fn node_owner(ctx: &NodeContext) -> Result<Vec<serde_json::Value>, Error> {
    let node = Api::<Node>::all(ctx.client.clone())
        .get_opt(&ctx.node)
        .await?;
    Ok(node
        .and_then(|n| n.uid())
        .map(|uid| json!({ "apiVersion": "v1", "kind": "Node", "name": ctx.node, "uid": uid }))
        .into_iter()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::room::{Disk, Own, Policy, Reserve};

    fn room(available: i64) -> Room {
        let policy = Policy {
            capacity: None,
            reserve: Reserve::Bytes(100),
        };
        Room::plan(
            policy,
            Disk {
                total: 1000,
                available,
            },
            Own::default(),
        )
    }

    #[test]
    fn the_condition_names_free_bytes_and_the_reserve() {
        let c = pressure_condition(&room(99), None);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, REASON_BELOW_RESERVE)
        );
        assert!(
            c.message.contains("99 bytes free") && c.message.contains("reserve of 100 bytes"),
            "{}",
            c.message
        );
        let c = pressure_condition(&room(100), None);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, REASON_ABOVE_RESERVE)
        );
        assert!(c.message.contains("100 bytes free"), "{}", c.message);
    }

    #[test]
    fn the_transition_time_stays_while_the_status_does() {
        let first = pressure_condition(&room(10), None);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let again = pressure_condition(&room(20), Some(&first));
        assert_eq!(again.last_transition_time, first.last_transition_time);
        let recovered = pressure_condition(&room(500), Some(&again));
        assert_ne!(recovered.last_transition_time, first.last_transition_time);
    }

    #[test]
    fn claims_hear_of_turns_only() {
        let fine = pressure_condition(&room(500), None);
        let full = pressure_condition(&room(5), None);
        assert!(!is_news(None, &fine), "a healthy node starting is no news");
        assert!(is_news(None, &full), "a node starting full is");
        assert!(is_news(Some(&fine), &full));
        assert!(!is_news(Some(&full), &full));
        assert!(is_news(Some(&full), &fine));
        assert!(!is_news(Some(&fine), &fine));
    }
}
