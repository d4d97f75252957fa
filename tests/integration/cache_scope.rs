//! The controller caches only what could be stowage's: other drivers'
//! bound claims, their claimed PVs and their VolumeAttachments stay out
//! (counted on /metrics, `stowage_cached_objects`); another driver's claim
//! leaves the cache once bound; a PV of stowage's bound to another
//! provisioner's claim is never released for that claim's absence from
//! the cache.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::fixtures::{claim, is_bound, storage_class, wait};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, free_port, unique_name,
};
use crate::metrics::{scrape_until, value};

const NODE: &str = "scope-node";
const OTHER: &str = "other.example.com";
const BOUND_ELSEWHERE: usize = 12;

fn cached(kind: &str) -> String {
    format!("stowage_cached_objects{{kind=\"{kind}\"}}")
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .expect("patching status");
}

/// A claim of `class` (annotated for `provisioner` as kcm does when it
/// provisions, or not at all for a static bind).
async fn claim_of(
    ns: &TestNamespace,
    name: &str,
    class: &str,
    provisioner: Option<&str>,
) -> PersistentVolumeClaim {
    let annotations = provisioner
        .map(|p| json!({ "volume.kubernetes.io/storage-provisioner": p }))
        .unwrap_or(json!({}));
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": annotations },
        "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": "1Gi" } } },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await
        .expect("creating claim")
}

/// Binds `claim` to a new PV of `driver`, in the order kcm's binder writes.
async fn bind_to_new_pv(
    client: &Client,
    ns: &TestNamespace,
    claim: &PersistentVolumeClaim,
    driver: &str,
) -> String {
    let pv_name = format!("pvc-{}", claim.uid().unwrap());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": { "name": pv_name, "annotations": { "pv.kubernetes.io/provisioned-by": driver } },
        "spec": {
            "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": claim.spec.as_ref().unwrap().storage_class_name,
            "claimRef": { "namespace": ns.name, "name": claim.name_any(), "uid": claim.uid() },
            "csi": { "driver": driver, "volumeHandle": pv_name },
        },
    }))
    .unwrap();
    let pvs = Api::<PersistentVolume>::all(client.clone());
    pvs.create(&PostParams::default(), &pv)
        .await
        .expect("creating PV");
    patch_status(&pvs, &pv_name, json!({ "phase": "Bound" })).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    let bind = json!({
        "metadata": { "annotations": { "pv.kubernetes.io/bind-completed": "yes" } },
        "spec": { "volumeName": pv_name },
    });
    claims
        .patch(
            &claim.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&bind),
        )
        .await
        .expect("binding claim");
    let bound = json!({ "phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": { "storage": "1Gi" } });
    patch_status(&claims, &claim.name_any(), bound).await;
    pv_name
}

async fn other_class(client: &Client, name: &str) {
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": name }, "provisioner": OTHER, "volumeBindingMode": "Immediate",
    }))
    .unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("creating the other class");
}

#[tokio::test]
async fn other_drivers_bound_objects_stay_out_of_the_cache() {
    let kubeconfig = bare_cluster("scope", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "scope").await;
    let (ours, other) = (format!("{}-ours", ns.name), format!("{}-other", ns.name));
    storage_class(&client, &ours, "Immediate", "Delete", &[]).await;
    other_class(&client, &other).await;

    // Before the controller starts: another driver's bound claims, one of
    // them attached; one of its claims still pending.
    let mut attached = None;
    for i in 0..BOUND_ELSEWHERE {
        let c = claim_of(&ns, &format!("elsewhere-{i}"), &other, Some(OTHER)).await;
        attached = Some(bind_to_new_pv(&client, &ns, &c, OTHER).await);
    }
    let va: VolumeAttachment = serde_json::from_value(json!({
        "metadata": { "name": unique_name("va-other") },
        "spec": { "attacher": OTHER, "nodeName": NODE, "source": { "persistentVolumeName": attached } },
    }))
    .unwrap();
    Api::<VolumeAttachment>::all(client.clone())
        .create(&PostParams::default(), &va)
        .await
        .expect("creating the other driver's attachment");
    let waiting = claim_of(&ns, "waiting", &other, Some(OTHER)).await;
    // A PV of stowage's driver, bound statically to a claim of the other
    // class: the claim is out of the cache, the PV must stay Bound.
    let foreign = claim_of(&ns, "foreign-on-ours", &other, None).await;
    let ours_pv = bind_to_new_pv(&client, &ns, &foreign, "local.stowage.dev").await;

    let data = std::env::temp_dir().join(unique_name("stowage-scope"));
    let agent = Process::node(&kubeconfig, NODE, &data, "scope-node");
    let addr = format!("127.0.0.1:{}", free_port());
    let args = [
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        &addr,
    ];
    let controller = Process::start(&kubeconfig, &args, &[], "scope-controller");
    let url = format!("http://{addr}/metrics");

    claim(&ns, "mine", &ours, "20Mi", &["ReadWriteOnce"]).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    wait(&claims, "mine", "Bound", is_bound).await;
    // Kept: "mine" and "waiting"; the PVs of "mine" and `ours_pv`.
    let body = scrape_until(&url, &cached("PersistentVolume"), |v| v == 2.0).await;
    assert_eq!(
        value(&body, &cached("PersistentVolumeClaim")),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value(&body, &cached("VolumeAttachment")),
        Some(0.0),
        "{body}"
    );
    assert_eq!(value(&body, &cached("StorageClass")), Some(2.0), "{body}");

    // The pending one, once bound elsewhere, leaves.
    bind_to_new_pv(&client, &ns, &waiting, OTHER).await;
    let body = scrape_until(&url, &cached("PersistentVolumeClaim"), |v| v == 1.0).await;
    assert_eq!(
        value(&body, &cached("PersistentVolume")),
        Some(2.0),
        "{body}"
    );

    // Every PV was reconciled at start; ours bound to the uncached claim is
    // still Bound, its claim untouched.
    let reclaims = "stowage_reconciles_total{job=\"reclaim\"}";
    scrape_until(&url, reclaims, |v| v >= 2.0).await;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&ours_pv)
        .await
        .unwrap();
    assert_eq!(
        pv.status.and_then(|s| s.phase).as_deref(),
        Some("Bound"),
        "{}",
        controller.log()
    );
    assert!(claims.get_opt("foreign-on-ours").await.unwrap().is_some());

    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
