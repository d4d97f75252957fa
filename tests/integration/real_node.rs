//! A real kubelet with containerd: stowage registers with kubelet through
//! its socket, and pods scheduled by kube-scheduler mount stowage volumes,
//! write, and read back after the first pod is gone.

use std::time::Instant;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{claim, gone, storage_class, wait};
use crate::harness::{
    Process, REAL_NODE, TestNamespace, client_for_path, real_node, repo_root, unique_name,
};

fn pod(name: &str, claim: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "c",
                "image": "stowage.dev/busybox:1",
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            }],
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": claim } }],
        },
    }))
    .unwrap()
}

fn phase(p: Option<&Pod>) -> Option<String> {
    p.and_then(|p| p.status.as_ref()?.phase.clone())
}

#[tokio::test]
async fn pods_write_and_read_a_stowage_volume_on_a_real_kubelet() {
    let node = real_node();
    let client = client_for_path(&node.kubeconfig).await;
    // As `kubectl apply -f manifests/` would: without it kubelet waits for
    // an attach that never comes.
    let driver: CSIDriver = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("manifests/30-csidriver.yaml")).unwrap(),
    )
    .unwrap();
    let drivers = Api::<CSIDriver>::all(client.clone());
    if drivers
        .get_opt("local.stowage.dev")
        .await
        .unwrap()
        .is_none()
    {
        drivers
            .create(&PostParams::default(), &driver)
            .await
            .unwrap();
    }
    let data = std::env::temp_dir().join(unique_name("stowage-real-node"));
    let data_arg = data.to_str().unwrap().to_string();
    let kubelet_arg = node.kubelet_dir.to_str().unwrap().to_string();
    let agent = Process::start(
        &node.kubeconfig,
        &[
            "node",
            "--node-name",
            REAL_NODE,
            "--data-dir",
            &data_arg,
            "--kubelet-dir",
            &kubelet_arg,
            "--capacity",
            "2Gi",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
        "real-node-agent",
    );
    let controller = Process::start(
        &node.kubeconfig,
        &[
            "controller",
            "--leader-elect=false",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
        "real-node-controller",
    );

    // kubelet found our socket, asked GetInfo and NodeGetInfo, and wrote CSINode.
    let csinodes = Api::<CSINode>::all(client.clone());
    let registered = wait(
        &csinodes,
        REAL_NODE,
        "listing local.stowage.dev",
        |n: Option<&CSINode>| {
            n.is_some_and(|n| n.spec.drivers.iter().any(|d| d.name == "local.stowage.dev"))
        },
    )
    .await
    .unwrap();
    let driver = registered
        .spec
        .drivers
        .iter()
        .find(|d| d.name == "local.stowage.dev")
        .unwrap();
    assert_eq!(driver.node_id, REAL_NODE);
    assert_eq!(
        driver.topology_keys.as_deref(),
        Some(&["topology.stowage.dev/node".to_string()][..])
    );

    let ns = TestNamespace::new_with(client.clone(), "real").await;
    let class = format!("{}-wffc", ns.name);
    storage_class(&client, &class, "WaitForFirstConsumer", "Delete", &[]).await;
    let uid = claim(&ns, "data", &class, "64Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let pods = ns.api::<Pod>();

    let started = Instant::now();
    pods.create(
        &PostParams::default(),
        &pod(
            "writer",
            "data",
            "echo 'hello from a pod' > /data/hello && sync",
        ),
    )
    .await
    .unwrap();
    let done = wait(&pods, "writer", "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "writer pod: {:?}",
        done.unwrap().status
    );
    println!(
        "writer pod finished {:?} after creation, with a fresh volume",
        started.elapsed()
    );
    assert_eq!(
        done.unwrap().spec.unwrap().node_name.as_deref(),
        Some(REAL_NODE)
    );
    pods.delete("writer", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pods, "writer", "deleted", gone).await;

    // The same data, from a second pod.
    pods.create(
        &PostParams::default(),
        &pod(
            "reader",
            "data",
            "test \"$(cat /data/hello)\" = 'hello from a pod'",
        ),
    )
    .await
    .unwrap();
    let done = wait(&pods, "reader", "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "reader did not find the data"
    );
    pods.delete("reader", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pods, "reader", "deleted", gone).await;

    // Deleting everything leaves nothing: no PV, Volume, image, mount or loop device.
    let pv_name = format!("pvc-{uid}");
    ns.api::<PersistentVolumeClaim>()
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(
        &Api::<PersistentVolume>::all(client.clone()),
        &pv_name,
        "deleted",
        gone,
    )
    .await;
    wait(
        &Api::<Volume>::all(client.clone()),
        &pv_name,
        "deleted",
        gone,
    )
    .await;
    assert!(
        !data.join(format!("volumes/{pv_name}.img")).exists(),
        "image left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&pv_name),
        "mounts of {pv_name} left behind"
    );
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&loops.stdout).contains(&data_arg),
        "loop device left behind"
    );

    agent.stop();
    controller.stop();
    let _ = std::fs::remove_dir_all(&data);
}
