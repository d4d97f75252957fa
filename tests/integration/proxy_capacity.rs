//! CSIStorageCapacity for a `--csi-driver` that offers GET_CAPACITY, as
//! external-provisioner's `--enable-capacity` publishes it: one object per
//! WaitForFirstConsumer class and topology segment (the distinct values of
//! the keys the driver's CSINodes register), with the driver's figures,
//! which kube-scheduler then follows.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, CSIStorageCapacity, StorageClass};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::external_driver::ExternalDriver;
use crate::fixtures::{TIMEOUT, claim, is_bound, wait};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, unique_name};
use crate::multi_node::{CONTROLLER_NAMESPACE, consumer, scheduled_node};
use crate::proxy_attach::Scene;
use crate::proxy_driver::{driver_class, immediate_class, proxy_controller};

const ZONE: &str = "topology.example.com/zone";
const NODES: [(&str, &str); 3] = [("cap-a1", "a"), ("cap-a2", "a"), ("cap-b1", "b")];
const GI: i64 = 1 << 30;

/// (class, nodeTopology matchLabels, capacity, maximumVolumeSize) of what
/// stowage published for `driver`, sorted.
type Published = Vec<(String, BTreeMap<String, String>, String, Option<String>)>;

async fn published(client: &Client, driver: &str) -> Published {
    let api = Api::<CSIStorageCapacity>::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let selector = format!(
        "csi.storage.k8s.io/managed-by=stowage-controller,csi.storage.k8s.io/drivername={driver}"
    );
    let mut out: Published = api
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            let labels = c
                .node_topology
                .and_then(|t| t.match_labels)
                .unwrap_or_default();
            let capacity = c.capacity.map(|q| q.0).unwrap_or_default();
            (
                c.storage_class_name,
                labels,
                capacity,
                c.maximum_volume_size.map(|q| q.0),
            )
        })
        .collect();
    out.sort();
    out
}

async fn wait_published(client: &Client, driver: &str, want: &Published) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let got = published(client, driver).await;
        if &got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CSIStorageCapacity of {driver}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The GetCapacity requests the driver recorded, as (parameters, segment).
fn capacity_requests(record: &std::path::Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["method"] == "/csi.v1.Controller/GetCapacity")
        .map(|l| {
            let r = &l["request"];
            (
                r["parameters"].clone(),
                r["accessible_topology"]["segments"].clone(),
            )
        })
        .collect()
}

/// Zone a has 1Gi, zone b 3Gi, no volume over 2Gi: one object per zone
/// for the WaitForFirstConsumer class (none for the Immediate one), asked
/// with the class's parameters; a pod preferring zone a whose claim needs
/// 1.5Gi goes to zone b on the first try (the scheduler compares a claim
/// with `maximumVolumeSize` when there is one); a zone whose driver left goes,
/// and so does the class.
#[tokio::test]
async fn a_drivers_capacity_is_published_per_segment_and_followed_by_the_scheduler() {
    let names = NODES.map(|(n, _)| n);
    let kubeconfig = bare_cluster("driver-capacity", &names);
    let client = client_for_path(&kubeconfig).await;
    let record = std::env::temp_dir().join(unique_name("stowage-capacity-record"));
    let capacity = format!("--capacity=a={GI},b={}", 3 * GI);
    let maximum = format!("--max-volume-size={}", 2 * GI);
    let record_arg = format!("--record={}", record.display());
    let driver = ExternalDriver::mock("capacity.csi.stowage.test").with_args(&[
        &capacity,
        &maximum,
        &record_arg,
    ]);
    let _running = driver.start();
    let (mock_key, mock_value) = driver.topology.clone();
    Scene::install_with_keys(&client, &driver, &names, &[&mock_key, ZONE]).await;
    for (node, zone) in NODES {
        Api::<Node>::all(client.clone())
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { ZONE: zone } } })),
            )
            .await
            .unwrap();
    }
    Api::<CSIDriver>::all(client.clone())
        .patch(
            &driver.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "storageCapacity": true } })),
        )
        .await
        .unwrap();
    let controller = proxy_controller(
        &kubeconfig,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        "driver-capacity-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "driver-capacity").await;
    let class = format!("{}-wffc", ns.name);
    driver_class(
        &client,
        &class,
        &driver.name,
        "WaitForFirstConsumer",
        json!({ "pool": "fast" }),
    )
    .await;
    let classes = Api::<StorageClass>::all(client.clone());
    immediate_class(
        &client,
        &format!("{}-now", ns.name),
        &driver.name,
        json!({}),
    )
    .await;

    let zone = |z: &str| {
        BTreeMap::from([
            (mock_key.clone(), mock_value.clone()),
            (ZONE.to_string(), z.to_string()),
        ])
    };
    let entry = |z: &str, capacity: &str, maximum: &str| {
        (
            class.clone(),
            zone(z),
            capacity.to_string(),
            Some(maximum.to_string()),
        )
    };
    wait_published(
        &client,
        &driver.name,
        &vec![entry("a", "1Gi", "1Gi"), entry("b", "3Gi", "2Gi")],
    )
    .await;
    let asked = capacity_requests(&record);
    assert!(!asked.is_empty(), "GetCapacity never recorded");
    for (parameters, segment) in &asked {
        assert_eq!(parameters, &json!({ "pool": "fast" }), "{asked:?}");
        assert_eq!(segment[&mock_key], json!(mock_value), "{asked:?}");
        assert!(segment[ZONE] == "a" || segment[ZONE] == "b", "{asked:?}");
    }

    claim(&ns, "data", &class, "1536Mi", &["ReadWriteOnce"]).await;
    let pods = ns.api::<Pod>();
    pods.create(
        &PostParams::default(),
        &consumer("app", "data", Some("cap-a1")),
    )
    .await
    .unwrap();
    assert_eq!(scheduled_node(&pods, "app").await, "cap-b1");
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "data",
        "Bound",
        is_bound,
    )
    .await;

    // The driver no longer runs in zone b.
    Api::<CSINode>::all(client.clone())
        .delete("cap-b1", &DeleteParams::default())
        .await
        .unwrap();
    wait_published(&client, &driver.name, &vec![entry("a", "1Gi", "1Gi")]).await;
    classes
        .delete(&class, &DeleteParams::default())
        .await
        .unwrap();
    wait_published(&client, &driver.name, &vec![]).await;
    controller.stop();
    let _ = std::fs::remove_file(&record);
}
