//! Controller metrics: operation counts and latencies per job.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub job: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<JobLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub reconcile_seconds: Family<JobLabels, Histogram>,
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
        let reconcile_seconds = Family::<JobLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let m = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            reconcile_seconds,
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
            "CSIStorageCapacity objects published, one per StorageClass of local.stowage.dev and node",
            m.storage_capacities.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles run, per job",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, per job and error",
            m.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, per job",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "claim_bound_duration_seconds",
            "Time from a claim's creation to stowage binding it",
            m.claim_bound_seconds.clone(),
        );
        m
    }

    /// Observes a claim's creation-to-Bound time, once per claim.
    pub fn observe_claim_bound(&self, claim: &k8s_openapi::api::core::v1::PersistentVolumeClaim) {
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

    /// Counts a reconcile and observes its duration when the guard drops.
    pub fn reconcile_timer(&self, job: &str) -> ReconcileTimer {
        let labels = JobLabels {
            job: job.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_seconds.get_or_create(&labels).clone(),
        }
    }

    pub fn reconcile_failed(&self, job: &str, error: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                job: job.to_string(),
                error: error.to_string(),
            })
            .inc();
    }
}

pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
