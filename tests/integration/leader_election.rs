//! Two controller replicas: only one holds the Lease; the other takes over
//! when the first releases it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use stowage::controller::leader::{ElectionConfig, LeaderElector};

use crate::harness::TestNamespace;

fn config(ns: &str, identity: &str) -> ElectionConfig {
    ElectionConfig {
        namespace: ns.to_string(),
        lease_name: "stowage-controller".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn second_replica_waits_until_the_first_releases() {
    let ns = TestNamespace::new("leader").await;
    let first = LeaderElector::new(ns.client.clone(), config(&ns.name, "replica-a")).unwrap();
    let second = LeaderElector::new(ns.client.clone(), config(&ns.name, "replica-b")).unwrap();

    first.acquire().await;
    let lease = ns
        .api::<Lease>()
        .get("stowage-controller")
        .await
        .expect("lease exists");
    let spec = lease.spec.expect("lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));

    // The standby cannot take a live lease.
    let waited = tokio::time::timeout(Duration::from_secs(2), second.acquire()).await;
    assert!(
        waited.is_err(),
        "second replica became leader while the first held the lease"
    );

    first.release().await;
    tokio::time::timeout(Duration::from_secs(5), second.acquire())
        .await
        .expect("second replica did not take the released lease");
    let spec = ns
        .api::<Lease>()
        .get("stowage-controller")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}
