//! stowage binds its claims itself while kube-controller-manager's PV binder
//! runs too, as in every real cluster: the binder must never find a claim
//! it considers broken (phase Lost, a binding warning), not even on the
//! periodic full resyncs that come after the burst.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::fixtures::{TIMEOUT, claim, is_bound, storage_class, wait, wait_for_event};
use crate::harness::{Binder, TestNamespace, stack};

const CLAIMS: usize = 20;

#[tokio::test]
async fn kcm_binder_never_marks_stowage_claims_lost() {
    let stack = stack(Binder::Kcm);
    let ns = TestNamespace::new_with(stack.client().await, "coexist").await;
    let class = format!("{}-c", ns.name);
    storage_class(&ns.client, &class, "Immediate", "Delete", &[]).await;
    let lost = record_lost_claims(&ns);

    let names: Vec<String> = (0..CLAIMS).map(|i| format!("c-{i}")).collect();
    for name in &names {
        claim(&ns, name, &class, "16Mi", &["ReadWriteOnce"]).await;
    }
    let claims = ns.api::<PersistentVolumeClaim>();
    for name in &names {
        wait(&claims, name, "Bound", is_bound).await;
    }

    // kcm's binder looks at every claim again on each periodic resync; two
    // of them have passed once its event on a claim nobody provisions has
    // been counted twice more.
    let resyncs = ResyncClock::start(&ns).await;
    resyncs.wait_for(2).await;

    assert!(
        lost.lock().unwrap().is_empty(),
        "claims marked Lost: {:?}",
        lost.lock().unwrap()
    );
    for name in &names {
        let c = claims.get(name).await.unwrap();
        assert!(is_bound(Some(&c)), "{name} no longer Bound: {:?}", c.status);
        assert_eq!(
            c.spec.unwrap().volume_name,
            Some(format!("pvc-{}", c.metadata.uid.unwrap())),
            "{name} bound to another PV"
        );
    }
    let warnings: Vec<_> = ns
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) != Some("sentinel"))
        .map(|e| (e.reason, e.note))
        .collect();
    assert!(warnings.is_empty(), "warnings on the claims: {warnings:?}");
}

/// Names of the namespace's claims ever seen in phase Lost.
fn record_lost_claims(ns: &TestNamespace) -> Arc<Mutex<Vec<String>>> {
    let lost = Arc::new(Mutex::new(Vec::new()));
    let seen = lost.clone();
    let api = ns.api::<PersistentVolumeClaim>();
    tokio::spawn(async move {
        let mut claims = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(c)) = claims.next().await {
            if c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost") {
                seen.lock().unwrap().push(c.name_any());
            }
        }
    });
    lost
}

/// Counts kcm's binder resyncs through a claim of a provisioner nobody
/// runs: the binder posts `ExternalProvisioning` on it at every sync, and
/// the API server aggregates the repeats into one event's count.
struct ResyncClock {
    ns: TestNamespace,
    start: i32,
}

impl ResyncClock {
    async fn start(ns: &TestNamespace) -> Self {
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": { "name": format!("{}-nobody", ns.name) },
            "provisioner": "example.com/nobody",
            "volumeBindingMode": "Immediate",
        }))
        .unwrap();
        Api::<StorageClass>::all(ns.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .unwrap();
        claim(
            ns,
            "sentinel",
            &class.name_any(),
            "16Mi",
            &["ReadWriteOnce"],
        )
        .await;
        wait_for_event(ns, "sentinel", "ExternalProvisioning").await;
        let ns = TestNamespace {
            client: ns.client.clone(),
            name: ns.name.clone(),
        };
        let start = Self::count(&ns).await;
        ResyncClock { ns, start }
    }

    async fn count(ns: &TestNamespace) -> i32 {
        ns.api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("ExternalProvisioning"))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("sentinel"))
            .map(|e| e.deprecated_count.unwrap_or(1))
            .sum()
    }

    async fn wait_for(&self, more: i32) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let now = Self::count(&self.ns).await;
            if now >= self.start + more {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kcm's binder resynced {} times in {TIMEOUT:?}, not {more}",
                now - self.start
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
