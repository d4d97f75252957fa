//! What every reconcile shares: the informer caches, the event recorder,
//! the drivers and per-object retry state.

use crate::telemetry::csi_calls::CsiCalls;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::telemetry::events::Recorder;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttachment};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};

use crate::backend::csi_proxy::CsiDriver;
use crate::backend::local;
use crate::crd::{StorageNode, Volume};

use super::{
    Config, Error, Metrics, capacity, forbidden, health, lifecycle, pending, static_pvs, superseded,
};

/// The informer caches, one per kind, shared by every job.
#[derive(Clone)]
pub struct Stores {
    pub claims: Store<Claim>,
    pub pvs: Store<Pv>,
    pub classes: Store<StorageClass>,
    pub volumes: Store<Volume>,
    pub storage_nodes: Store<StorageNode>,
    pub attachments: Store<VolumeAttachment>,
    pub csinodes: Store<CSINode>,
    /// Nodes' metadata only (labels, annotations): all that attach and
    /// topology need, at a fraction of a full Node's size.
    pub nodes: Store<PartialObjectMeta<Node>>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    pub stores: Stores,
    /// The `--csi-driver`s, by name.
    pub drivers: BTreeMap<String, CsiDriver>,
    /// `--serve-local`.
    pub serve_local: bool,
    /// `--extra-create-metadata`.
    pub extra_create_metadata: bool,
    /// `--cross-namespace-data-sources`.
    pub cross_namespace_sources: bool,
    /// `--kcm-binder-grace`.
    pub kcm_binder_grace: Duration,
    /// `--attach-reconcile-interval`.
    pub attach_reconcile_interval: Duration,
    recorder: Recorder,
    failures: crate::retry::Failures,
    /// Whether reconciles may act now.
    pub gate: lifecycle::Gate,
    /// `--workers`: objects each job works on at once.
    pub workers: u16,
    /// Claims not bound yet, by what they wait for.
    pub(crate) pending: Mutex<pending::PendingClaims>,
    /// Bytes promised on each node, from the Volume watch.
    pub(crate) promised: Mutex<capacity::Promised>,
    /// PVs a claim looking for one could bind, from the PV watch.
    pub(crate) static_pvs: Mutex<static_pvs::StaticPvs>,
    /// Claim versions the claim job's own writes replaced.
    pub(crate) superseded: superseded::Superseded,
    /// What `/healthz` judges; a watch opened late is added here.
    pub(crate) watches: health::Watches,
}

impl Context {
    pub(super) fn new(
        config: &Config,
        client: Client,
        metrics: Metrics,
        csi_calls: CsiCalls,
        stores: Stores,
        identity: String,
        watches: health::Watches,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "stowage-controller".into(),
                instance: Some(identity),
            },
        );
        Context {
            client,
            metrics,
            stores,
            drivers: config
                .csi_drivers
                .iter()
                .map(|e| {
                    let driver = CsiDriver::new(e, config.csi_timeout);
                    (e.name.clone(), driver.with_calls(csi_calls.clone()))
                })
                .collect(),
            serve_local: config.serve_local,
            extra_create_metadata: config.extra_create_metadata,
            cross_namespace_sources: config.cross_namespace_data_sources,
            kcm_binder_grace: config.kcm_binder_grace,
            attach_reconcile_interval: config.attach_reconcile_interval,
            recorder,
            failures: crate::retry::Failures::default(),
            gate: lifecycle::Gate::default(),
            workers: config.workers,
            pending: Mutex::default(),
            promised: Mutex::default(),
            static_pvs: Mutex::default(),
            superseded: superseded::Superseded::default(),
            watches,
        }
    }

    /// Whether stowage provisions for this provisioner name.
    pub fn serves(&self, provisioner: &str) -> bool {
        (self.serve_local && provisioner == local::DRIVER_NAME)
            || self.drivers.contains_key(provisioner)
    }

    /// Posts an event on `object` in the background: events are for people,
    /// so they stay off the provisioning path, and failing to post is logged.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        self.publish(object, event(type_, reason, action, note));
    }

    /// Merges `status` into a claim's status at the version the cache saw
    /// (see `kubeapi::merge_status_at`): the resize and modify jobs' writes.
    pub async fn patch_claim_status(
        &self,
        claim: &Claim,
        status: serde_json::Value,
    ) -> Result<(), Error> {
        let claims = kube::Api::namespaced(
            self.client.clone(),
            &kube::ResourceExt::namespace(claim).unwrap_or_default(),
        );
        crate::kubeapi::merge_status_at(&claims, claim, status).await?;
        Ok(())
    }

    /// An API call that RBAC refused gets an event on the object waiting for
    /// it, naming the verb and resource to grant; other errors are reported
    /// by their jobs.
    pub fn report_if_forbidden<K: Resource<DynamicType = ()>>(&self, object: &K, error: &Error) {
        let status = match error {
            Error::Kube(kube::Error::Api(status)) => status,
            // Reading Secrets has a manifest of its own, which the error names.
            Error::SecretRead(e) if e.is_forbidden() => {
                let note = e.to_string();
                tracing::error!("{note}");
                self.publish(object, forbidden_event(&note));
                return;
            }
            _ => return,
        };
        let Some(refusal) = forbidden::Refusal::from_status(status) else {
            return;
        };
        let note = refusal.note("stowage-controller");
        tracing::error!(verb = %refusal.verb, resource = %refusal.resource, "{note}");
        self.publish(object, forbidden_event(&note));
    }

    fn publish<K: Resource<DynamicType = ()>>(&self, object: &K, event: Event) {
        let recorder = self.recorder.clone();
        let reference = object.object_ref(&());
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, reason = event.reason, "posting event failed");
            }
        });
    }

    /// Per-object retry delay: see crate::retry.
    pub fn backoff(&self, object: &ObjectReference, may_resolve_itself: bool) -> Duration {
        self.failures.backoff(object, may_resolve_itself)
    }

    pub fn forget_failures(&self, object: &ObjectReference) {
        self.failures.forget(object);
    }

    /// See crate::retry::Failures::wait_left.
    pub fn retry_not_yet(&self, object: &ObjectReference) -> Option<Duration> {
        self.failures.wait_left(object)
    }
}

fn event(type_: EventType, reason: &str, action: &str, note: &str) -> Event {
    Event {
        type_,
        reason: reason.into(),
        // The API server refuses longer notes.
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    }
}

fn forbidden_event(note: &str) -> Event {
    event(EventType::Warning, "Forbidden", "Authorize", note)
}
