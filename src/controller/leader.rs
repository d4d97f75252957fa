//! Leader election on a `coordination.k8s.io/v1` Lease, with the semantics
//! client-go's leaderelection package uses, so `kubectl get lease` reads the
//! same: the holder renews `renewTime` every `retry_period`; anyone may take
//! the lease once `renewTime + leaseDurationSeconds` has passed; a holder that
//! cannot renew within `renew_deadline` stops acting.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error(
        "lost the leader lease {namespace}/{name}: no renewal succeeded within the renew \
         deadline ({deadline:?}); stopped acting before the lease could expire for another replica"
    )]
    Lost {
        namespace: String,
        name: String,
        deadline: Duration,
    },
    #[error(
        "lost the leader lease {namespace}/{name}: another replica holds it now; stopped acting"
    )]
    Taken { namespace: String, name: String },
    #[error(
        "leader election: renew deadline {renew_deadline:?} must be shorter than the lease \
         duration {lease_duration:?}, or two replicas could act at once"
    )]
    Timing {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
}

/// Why renewing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// No renewal landed within the renew deadline of the last one.
    Deadline,
    /// The lease names another holder.
    Taken,
}

/// Renews every `retry_period` until no renewal lands within
/// `renew_deadline` of the last one (counted from when that renewal was
/// sent, as its `renewTime` says). An attempt that hangs is abandoned at
/// the deadline, so the caller stops acting before `lease_duration` could
/// hand the lease to another replica. `renewed` hears of each success.
pub async fn keep_renewing<F, Fut, E>(
    acquired: Instant,
    retry_period: Duration,
    renew_deadline: Duration,
    mut renew: F,
    renewed: impl Fn(Instant),
) -> Stop
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let mut last = acquired;
    loop {
        let deadline = last + renew_deadline;
        tokio::time::sleep_until((Instant::now() + retry_period).min(deadline)).await;
        let sent = Instant::now();
        if sent >= deadline {
            return Stop::Deadline;
        }
        match tokio::time::timeout_at(deadline, renew()).await {
            Ok(Ok(true)) => {
                last = sent;
                renewed(sent);
            }
            Ok(Ok(false)) => return Stop::Taken,
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing leader lease failed"),
            Err(_) => {
                tracing::warn!(
                    ?renew_deadline,
                    "renewing leader lease did not finish in time"
                );
                return Stop::Deadline;
            }
        }
    }
}

/// When this replica last renewed its lease, for `/healthz`; None while it
/// does not hold it.
#[derive(Debug, Default)]
pub struct Renewals {
    last: Mutex<Option<Instant>>,
}

impl Renewals {
    pub fn last(&self) -> Option<Instant> {
        *self.last.lock().expect("renewals lock poisoned")
    }

    fn set(&self, at: Option<Instant>) {
        *self.last.lock().expect("renewals lock poisoned") = at;
    }
}

/// What to do with the lease as it stands, decided without I/O.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    /// No lease object yet: create it holding it.
    Create,
    /// Ours, or free to take: write it with us as holder.
    Take { transitions: i32 },
    /// Someone else holds a live lease.
    Wait { holder: String },
}

pub fn plan(lease: Option<&Lease>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            LeaseDecision::Take { transitions: 1 }
        } else {
            LeaseDecision::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let transitions = spec.lease_transitions.unwrap_or(0);
    if holder == identity {
        return LeaseDecision::Take { transitions };
    }
    let expires = spec
        .renew_time
        .as_ref()
        .map(|t| t.0)
        .zip(spec.lease_duration_seconds)
        .map(|(renewed, secs)| renewed + SignedDuration::from_secs(i64::from(secs)));
    match expires {
        Some(expires) if !holder.is_empty() && expires > now => LeaseDecision::Wait { holder },
        _ => LeaseDecision::Take {
            transitions: transitions + 1,
        },
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: ElectionConfig,
    renewals: Arc<Renewals>,
}

/// A lease call that took longer than the renew deadline.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl LeaderElector {
    pub fn new(client: Client, config: ElectionConfig) -> Result<Self, ElectionError> {
        if config.renew_deadline >= config.lease_duration {
            return Err(ElectionError::Timing {
                renew_deadline: config.renew_deadline,
                lease_duration: config.lease_duration,
            });
        }
        Ok(LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            renewals: Arc::default(),
        })
    }

    pub fn renewals(&self) -> Arc<Renewals> {
        self.renewals.clone()
    }

    pub fn renew_deadline(&self) -> Duration {
        self.config.renew_deadline
    }

    /// Returns once this process holds the lease, with the moment the
    /// winning attempt was sent (its `renewTime`).
    pub async fn acquire(&self) -> Instant {
        let mut waiting_on = None;
        loop {
            let sent = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "became leader");
                    self.renewals.set(Some(sent));
                    return sent;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: lease update failed"),
            }
            let holder = self.current_holder().await;
            if holder != waiting_on {
                tracing::info!(holder = ?holder, "waiting for the leader lease");
                waiting_on = holder;
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the lease from `acquired` on until it cannot within
    /// `renew_deadline`; returns the reason. The caller must stop acting at
    /// once when this returns.
    pub async fn hold(&self, acquired: Instant) -> ElectionError {
        let stop = keep_renewing(
            acquired,
            self.config.retry_period,
            self.config.renew_deadline,
            || self.try_acquire_or_renew(),
            |at| self.renewals.set(Some(at)),
        )
        .await;
        self.renewals.set(None);
        match stop {
            Stop::Deadline => self.lost(),
            Stop::Taken => ElectionError::Taken {
                namespace: self.config.namespace.clone(),
                name: self.config.lease_name.clone(),
            },
        }
    }

    /// Gives the lease up so a standby takes over without waiting it out.
    /// Bounded by the renew deadline as a whole: it runs on the way out,
    /// within the pod's termination grace period.
    pub async fn release(&self) {
        self.renewals.set(None);
        if tokio::time::timeout(self.config.renew_deadline, self.try_release())
            .await
            .is_err()
        {
            tracing::warn!("releasing leader lease timed out");
        }
    }

    async fn try_release(&self) {
        let Ok(Some(mut lease)) = self.call(self.api.get_opt(&self.config.lease_name)).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .call(
                self.api
                    .replace(&self.config.lease_name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => tracing::info!(lease = %self.config.lease_name, "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "releasing leader lease failed"),
        }
    }

    /// One API call, abandoned after the renew deadline: a call that hangs
    /// must not keep the elector from noticing that time is up.
    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CallError> {
        let limit = self.config.renew_deadline;
        match tokio::time::timeout(limit, request).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CallError::TimedOut(limit)),
        }
    }

    fn lost(&self) -> ElectionError {
        ElectionError::Lost {
            namespace: self.config.namespace.clone(),
            name: self.config.lease_name.clone(),
            deadline: self.config.renew_deadline,
        }
    }

    async fn current_holder(&self) -> Option<String> {
        let lease = self
            .call(self.api.get_opt(&self.config.lease_name))
            .await
            .ok()??;
        lease.spec?.holder_identity
    }

    /// One attempt: Ok(true) when we hold the lease afterwards. Writes use
    /// the read resourceVersion, so two candidates cannot both win.
    async fn try_acquire_or_renew(&self) -> Result<bool, CallError> {
        let now = Timestamp::now();
        let current = self.call(self.api.get_opt(&self.config.lease_name)).await?;
        let decision = plan(current.as_ref(), &self.config.identity, now);
        let spec_for = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let result = match decision {
            LeaseDecision::Wait { .. } => return Ok(false),
            LeaseDecision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.lease_name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec_for(0, None)),
                };
                self.call(self.api.create(&PostParams::default(), &lease))
                    .await
            }
            LeaseDecision::Take { transitions } => {
                let mut lease = current.expect("Take is only planned for an existing lease");
                let ours = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(self.config.identity.as_str());
                let acquired = if ours {
                    lease.spec.as_ref().and_then(|s| s.acquire_time.clone())
                } else {
                    None
                };
                lease.spec = Some(spec_for(transitions, acquired));
                self.call(
                    self.api
                        .replace(&self.config.lease_name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote first; we will see their lease next round.
            Err(CallError::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
