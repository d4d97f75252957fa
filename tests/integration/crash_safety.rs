//! The controller or node agent dies at every step between "Volume written"
//! and "claim Bound"; after a restart the claim is bound with exactly one
//! Volume, one PV and one image file.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{ListParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::harness::{Process, TestNamespace, bare_cluster, client_for_path, unique_name};

const NODE: &str = "crash-node";

const CONTROLLER_STEPS: [&str; 4] = [
    "controller-after-volume-created",
    "controller-after-pv-created",
    "controller-after-pv-bound",
    "controller-after-claim-volume-name",
];
const NODE_STEPS: [&str; 3] = [
    "node-after-image-sized",
    "node-after-mkfs",
    "node-before-ready-reported",
];

#[tokio::test]
async fn killed_at_any_step_provisions_exactly_once() {
    let kubeconfig = bare_cluster("crash", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "crash").await;
    let data = std::env::temp_dir().join(unique_name("stowage-crash-data"));
    let data_arg = data.to_str().unwrap().to_string();
    let node_args = [
        "node",
        "--node-name",
        NODE,
        "--data-dir",
        &data_arg,
        "--capacity",
        "10Gi",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let controller_args = [
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
    ];

    let class = format!("{}-crash", ns.name);
    crate::fixtures::storage_class(&client, &class, "Immediate", "Delete", &[]).await;

    // (which process crashes, at which step)
    let cases = CONTROLLER_STEPS
        .iter()
        .map(|s| (true, *s))
        .chain(NODE_STEPS.iter().map(|s| (false, *s)));
    for (in_controller, step) in cases {
        let crash = [("STOWAGE_FAILPOINT", step)];
        let (controller_env, node_env): (&[_], &[_]) = if in_controller {
            (&crash, &[])
        } else {
            (&[], &crash)
        };
        let mut node = Process::start(&kubeconfig, &node_args, node_env, "crash-node");
        let mut controller = Process::start(
            &kubeconfig,
            &controller_args,
            controller_env,
            "crash-controller",
        );

        let claim_name = step.to_string();
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": { "name": claim_name },
            "spec": {
                "storageClassName": class,
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": "20Mi" } },
            },
        }))
        .unwrap();
        let uid = ns
            .api::<PersistentVolumeClaim>()
            .create(&PostParams::default(), &claim)
            .await
            .unwrap()
            .uid()
            .unwrap();

        let crashed = if in_controller {
            &mut controller
        } else {
            &mut node
        };
        assert!(
            crashed.exited_within(Duration::from_secs(60)).await,
            "{step}: the failpoint was never reached"
        );
        // Restart whichever died.
        if in_controller {
            controller = Process::start(&kubeconfig, &controller_args, &[], "crash-controller");
        } else {
            node = Process::start(&kubeconfig, &node_args, &[], "crash-node");
        }

        let bound = await_condition(
            ns.api::<PersistentVolumeClaim>(),
            &claim_name,
            |c: Option<&PersistentVolumeClaim>| {
                c.and_then(|c| c.status.as_ref()?.phase.as_deref()) == Some("Bound")
            },
        );
        tokio::time::timeout(Duration::from_secs(60), bound)
            .await
            .unwrap_or_else(|_| panic!("{step}: claim not Bound after restart"))
            .unwrap();

        let volumes = Api::<Volume>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let for_claim: Vec<_> = volumes
            .items
            .iter()
            .filter(|v| v.spec.claim.as_ref().is_some_and(|c| c.uid == uid))
            .collect();
        assert_eq!(for_claim.len(), 1, "{step}: Volumes for the claim");
        let pvs = Api::<PersistentVolume>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let pvs_for_claim = pvs
            .items
            .iter()
            .filter(|pv| {
                pv.spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|r| r.uid.as_deref())
                    == Some(uid.as_str())
            })
            .count();
        assert_eq!(pvs_for_claim, 1, "{step}: PVs for the claim");
        let files: Vec<_> = std::fs::read_dir(data.join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.contains(&uid))
            .collect();
        assert_eq!(
            files,
            [format!("pvc-{uid}.img")],
            "{step}: files for the claim"
        );

        controller.stop();
        node.stop();
    }
    let _ = std::fs::remove_dir_all(&data);
}
