//! The controller's metrics: the jobs' (see `telemetry::jobs`), the
//! provisioning backlog, claim-to-Bound latency and cache sizes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::controller::cached_claim::Claim;
use crate::telemetry::jobs::JobMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub jobs: JobMetrics,
    /// Claim creation to Bound, as the user waits for it.
    pub claim_bound_seconds: Histogram,
    /// Claims of our classes not bound yet: the provisioning backlog.
    pub claims_pending: Gauge,
    /// Objects each watch's cache holds (only stowage's, see `scope`).
    pub cached_objects: Family<KindLabels, Gauge>,
    /// CSIStorageCapacity objects published (`--enable-capacity`).
    pub storage_capacities: Gauge,
    /// UIDs of claims whose bind time was observed (forgotten on deletion).
    bound_claims: Arc<Mutex<HashSet<String>>>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            jobs: JobMetrics::register(registry),
            claim_bound_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            claims_pending: Gauge::default(),
            cached_objects: Family::default(),
            storage_capacities: Gauge::default(),
            bound_claims: Arc::default(),
        };
        registry.register(
            "claims_pending",
            "Claims of stowage's classes that are not bound yet",
            m.claims_pending.clone(),
        );
        registry.register(
            "cached_objects",
            "Objects in the controller's cache, per kind: other drivers' bound claims, \
             claimed PVs and VolumeAttachments are left out",
            m.cached_objects.clone(),
        );
        registry.register(
            "storage_capacities",
            "CSIStorageCapacity objects published, one per StorageClass and topology segment \
             (a node, for local.stowage.dev)",
            m.storage_capacities.clone(),
        );
        registry.register(
            "claim_bound_duration_seconds",
            "Time from a claim's creation to stowage binding it",
            m.claim_bound_seconds.clone(),
        );
        m
    }

    /// Observes a claim's creation-to-Bound time, once per claim.
    pub fn observe_claim_bound(&self, claim: &Claim) {
        let Some(uid) = claim.metadata.uid.clone() else {
            return;
        };
        if !self
            .bound_claims
            .lock()
            .expect("bound set poisoned")
            .insert(uid)
        {
            return;
        }
        if let Some(created) = &claim.metadata.creation_timestamp {
            let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(created.0);
            self.claim_bound_seconds
                .observe(elapsed.as_secs_f64().max(0.0));
        }
    }

    pub fn forget_claim(&self, uid: &str) {
        self.bound_claims
            .lock()
            .expect("bound set poisoned")
            .remove(uid);
    }
}
