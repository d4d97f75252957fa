//! Per-job reconcile metrics, the same for every role: how often each job
//! ran, how long it took, and why it failed.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

#[derive(Clone)]
pub struct JobMetrics {
    pub reconciles: Family<JobLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub reconcile_seconds: Family<JobLabels, Histogram>,
}

impl JobMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = JobMetrics {
            reconciles: Family::default(),
            failures: Family::default(),
            reconcile_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
        };
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
        m
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
