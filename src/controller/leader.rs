//! Leader election on a `coordination.k8s.io/v1` Lease, with the semantics
//! client-go's leaderelection package uses, so `kubectl get lease` reads the
//! same: the holder renews `renewTime` every `retry_period`; anyone may take
//! the lease once `renewTime + leaseDurationSeconds` has passed; a holder that
//! cannot renew within `renew_deadline` stops acting.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

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
    #[error("lost the leader lease {namespace}/{name}: not renewed within {deadline:?}")]
    Lost {
        namespace: String,
        name: String,
        deadline: Duration,
    },
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
}

impl LeaderElector {
    pub fn new(client: Client, config: ElectionConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// Returns once this process holds the lease.
    pub async fn acquire(&self) {
        let mut waiting_on = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "became leader");
                    return;
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

    /// Renews the lease until it cannot within `renew_deadline`; returns the
    /// reason. The caller must stop acting at once when this returns.
    pub async fn hold(&self) -> ElectionError {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => return self.lost(),
                Err(e) => tracing::warn!(error = %e, "renewing leader lease failed"),
            }
            if last_renewal.elapsed() > self.config.renew_deadline {
                return self.lost();
            }
        }
    }

    /// Gives the lease up so a standby takes over without waiting it out.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.lease_name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        if let Err(e) = self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing leader lease failed");
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
        let lease = self.api.get_opt(&self.config.lease_name).await.ok()??;
        lease.spec?.holder_identity
    }

    /// One attempt: Ok(true) when we hold the lease afterwards. Writes use
    /// the read resourceVersion, so two candidates cannot both win.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.config.lease_name).await?;
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
                self.api.create(&PostParams::default(), &lease).await
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
                self.api
                    .replace(&self.config.lease_name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote first; we will see their lease next round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(plan(None, "a", Timestamp::now()), LeaseDecision::Create);
    }

    #[test]
    fn own_lease_is_renewed_without_a_transition() {
        let l = lease(Some("a"), 1, 15);
        assert_eq!(
            plan(Some(&l), "a", Timestamp::now()),
            LeaseDecision::Take { transitions: 3 }
        );
    }

    #[test]
    fn live_lease_of_another_is_waited_for() {
        let l = lease(Some("b"), 5, 15);
        assert_eq!(
            plan(Some(&l), "a", Timestamp::now()),
            LeaseDecision::Wait { holder: "b".into() }
        );
    }

    #[test]
    fn expired_lease_is_taken_with_a_transition() {
        let l = lease(Some("b"), 20, 15);
        assert_eq!(
            plan(Some(&l), "a", Timestamp::now()),
            LeaseDecision::Take { transitions: 4 }
        );
    }

    #[test]
    fn released_lease_is_taken() {
        let l = lease(None, 0, 15);
        assert_eq!(
            plan(Some(&l), "a", Timestamp::now()),
            LeaseDecision::Take { transitions: 4 }
        );
    }
}
