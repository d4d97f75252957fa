//! Growing a volume under a running pod, then while no pod uses it.

use std::time::Instant;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::pod;
use crate::fixtures::{claim, gone, phase, storage_class, wait};
use crate::harness::TestNamespace;

/// xfs, because growing a mounted ext4 needs CAP_SYS_RESOURCE, which test
/// sandboxes may lack (the DaemonSet has it).
pub async fn under_a_running_pod_then_offline(ns: &TestNamespace, client: &kube::Client) {
    let class = format!("{}-grow", ns.name);
    storage_class(
        client,
        &class,
        "WaitForFirstConsumer",
        "Delete",
        &[("fsType", "xfs")],
    )
    .await;
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(client.clone())
        .patch(
            &class,
            &PatchParams::default(),
            &Patch::Merge(json!({ "allowVolumeExpansion": true })),
        )
        .await
        .unwrap();
    claim(ns, "grow", &class, "300Mi", &["ReadWriteOnce"]).await;
    let pods = ns.api::<Pod>();
    let claims = ns.api::<PersistentVolumeClaim>();
    // The pod records the size of /data (KiB) it started with, then waits
    // until it sees more: the size xfs reports is not the image size.
    let grower = "df -k /data | awk 'NR==2{print $2}' > /data/before; \
                  for i in $(seq 150); do s=$(df -k /data | awk 'NR==2{print $2}'); \
                  if [ $s -gt $(cat /data/before) ]; then echo $s > /data/after; exit 0; fi; \
                  sleep 1; done; exit 1";
    pods.create(&PostParams::default(), &pod("grower", "grow", grower))
        .await
        .unwrap();
    wait(&pods, "grower", "running", |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    let resize = |size: &'static str| {
        let claims = claims.clone();
        async move {
            let patch = json!({ "spec": { "resources": { "requests": { "storage": size } } } });
            claims
                .patch("grow", &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    let started = Instant::now();
    resize("400Mi").await;
    let done = wait(&pods, "grower", "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "the running pod never saw its filesystem grow"
    );
    println!(
        "online expansion seen in the pod after {:?}",
        started.elapsed()
    );
    let capacity = |c: Option<&PersistentVolumeClaim>, want: &str| {
        c.and_then(|c| c.status.as_ref()).is_some_and(|s| {
            s.capacity
                .as_ref()
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.as_str())
                == Some(want)
                && s.allocated_resource_statuses
                    .as_ref()
                    .is_none_or(|m| m.is_empty())
                && s.conditions.as_ref().is_none_or(|c| c.is_empty())
        })
    };
    wait(
        &claims,
        "grow",
        "resized by kubelet",
        move |c: Option<&PersistentVolumeClaim>| capacity(c, "400Mi"),
    )
    .await;
    pods.delete("grower", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pods, "grower", "deleted", gone).await;

    // Offline: the claim waits at NodeResizePending until a pod mounts it,
    // and kubelet grows the filesystem before the container starts.
    resize("500Mi").await;
    wait(
        &claims,
        "grow",
        "waiting for the node",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| {
                c.status
                    .as_ref()?
                    .allocated_resource_statuses
                    .as_ref()?
                    .get("storage")
                    .cloned()
            })
            .as_deref()
                == Some("NodeResizePending")
        },
    )
    .await;
    pods.create(
        &PostParams::default(),
        &pod(
            "reader2",
            "grow",
            "test $(df -k /data | awk 'NR==2{print $2}') -gt $(cat /data/after)",
        ),
    )
    .await
    .unwrap();
    let done = wait(&pods, "reader2", "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "the filesystem was not grown before the pod started"
    );
    wait(
        &claims,
        "grow",
        "resized by kubelet",
        move |c: Option<&PersistentVolumeClaim>| capacity(c, "500Mi"),
    )
    .await;
    pods.delete("reader2", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pods, "reader2", "deleted", gone).await;
}
