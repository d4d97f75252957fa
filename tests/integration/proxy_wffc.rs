//! `WaitForFirstConsumer` through `--csi-driver`: kube-scheduler picks the
//! node, and CreateVolume prefers that node's topology (its CSINode's keys
//! for the driver, valued from the Node's labels) among every node's with
//! the same keys, as external-provisioner asks it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::external_driver::ExternalDriver;
use crate::fixtures::{claim, is_bound, wait};
use crate::harness::{TestNamespace, bare_cluster, client_for_path};
use crate::proxy_attach::Scene;
use crate::proxy_driver::{driver_class, proxy_controller};

const NODES: [&str; 2] = ["wffc-a", "wffc-b"];
/// A second topology key whose value differs per node (the harness labels
/// every node with it), so that the requested segment names the node.
const NODE_KEY: &str = "topology.stowage.dev/node";

#[tokio::test]
async fn wait_for_first_consumer_prefers_the_chosen_nodes_topology() {
    let kubeconfig = bare_cluster("proxy-wffc", &NODES);
    let client = client_for_path(&kubeconfig).await;
    let driver = ExternalDriver::mock("wffc.csi.stowage.test");
    let _running = driver.start();
    let (mock_key, mock_value) = driver.topology.clone();
    Scene::install_with_keys(&client, &driver, &NODES, &[&mock_key, NODE_KEY]).await;
    let controller = proxy_controller(
        &kubeconfig,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        "proxy-wffc-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "proxy-wffc").await;
    let class = format!("{}-wffc", ns.name);
    driver_class(
        &client,
        &class,
        &driver.name,
        "WaitForFirstConsumer",
        json!({}),
    )
    .await;
    let uid = claim(&ns, "late", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();

    // Scheduled by kube-scheduler (not placed): only b is allowed.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "consumer" },
        "spec": {
            "nodeSelector": { "kubernetes.io/hostname": "wffc-b" },
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{ "name": "c", "image": "none" }],
            "volumes": [{ "name": "d", "persistentVolumeClaim": { "claimName": "late" } }],
        },
    }))
    .unwrap();
    ns.api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "late",
        "Bound",
        is_bound,
    )
    .await;

    let volume = Api::<stowage::crd::Volume>::all(client.clone())
        .get(&format!("pvc-{uid}"))
        .await
        .unwrap();
    let segment = |node: &str| -> BTreeMap<String, String> {
        [
            (mock_key.clone(), mock_value.clone()),
            (NODE_KEY.to_string(), node.to_string()),
        ]
        .into()
    };
    assert_eq!(
        volume.spec.requisite_topology,
        vec![segment("wffc-a"), segment("wffc-b")],
        "CreateVolume's requisite topology"
    );
    assert_eq!(
        volume.spec.preferred_topology,
        vec![segment("wffc-b"), segment("wffc-a")],
        "CreateVolume's preferred topology: the scheduler's node first"
    );
    let log = driver.log();
    assert!(
        log.lines()
            .any(|l| l.contains("/CreateVolume") && l.contains("wffc-b")),
        "the driver was not asked for wffc-b's segment:\n{log}"
    );
    let placed = wait(&ns.api::<Pod>(), "consumer", "placed", |p: Option<&Pod>| {
        p.and_then(|p| p.spec.as_ref()?.node_name.clone()).is_some()
    })
    .await
    .unwrap();
    assert_eq!(placed.spec.unwrap().node_name.as_deref(), Some("wffc-b"));
    controller.stop();
}
