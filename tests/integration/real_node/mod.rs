//! A real kubelet with containerd: stowage registers with kubelet through
//! its socket, and pods scheduled by kube-scheduler mount stowage volumes,
//! write, and read back after the first pod is gone; snapshots, restores
//! and clones carry the bytes.

mod expand;
mod layouts;
mod restart;
mod snapshots;

use std::time::Instant;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{self, claim, gone, phase, storage_class, wait};
use crate::harness::{
    Process, REAL_NODE, TestNamespace, client_for_path, real_node, repo_root, unique_name,
};

/// Storage needs no pod network: these pods keep CNI out of the picture.
pub(crate) fn pod(name: &str, claim: &str, script: &str) -> Pod {
    let mut pod = fixtures::pod(name, claim, script);
    pod.spec.as_mut().unwrap().host_network = Some(true);
    pod
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
    let start_agent = || {
        Process::start(
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
        )
    };
    let agent = start_agent();
    let controller = Process::controller(&node.kubeconfig, "real-node-controller");

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

    // Block mode: the pod gets the raw device and reads back what it wrote.
    let block: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": "raw" },
        "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                  "resources": { "requests": { "storage": "16Mi" } } },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &block)
        .await
        .unwrap();
    let mut raw = pod(
        "raw",
        "raw",
        "echo raw-bytes | dd of=/dev/xvda bs=512 count=1 conv=sync && dd if=/dev/xvda bs=9 count=1 | grep -q raw-bytes",
    );
    let spec = raw.spec.as_mut().unwrap();
    spec.containers[0].volume_mounts = None;
    spec.containers[0].volume_devices = Some(vec![
        serde_json::from_value(json!({ "name": "data", "devicePath": "/dev/xvda" })).unwrap(),
    ]);
    pods.create(&PostParams::default(), &raw).await.unwrap();
    let done = wait(&pods, "raw", "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "block pod could not write and read its device"
    );
    pods.delete("raw", &DeleteParams::default()).await.unwrap();
    wait(&pods, "raw", "deleted", gone).await;

    expand::under_a_running_pod_then_offline(&ns, &client).await;

    let agent =
        restart::agent_restart_keeps_a_running_pod(&node, &ns, &class, agent, start_agent).await;
    layouts::dir_volume_in_a_pod(&ns, &data).await;
    snapshots::of_a_mounted_volume_restored_and_cloned(&ns, &client, &node.kubeconfig, &class)
        .await;
    pods.delete("busy", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait(&pods, "busy", "deleted", gone).await;
    for name in ["raw", "busy", "grow"] {
        ns.api::<PersistentVolumeClaim>()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let volumes = Api::<Volume>::all(client.clone());
    for _ in 0..300 {
        let left = volumes.list(&Default::default()).await.unwrap().items.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        volumes
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "Volumes left behind"
    );
    let images: Vec<_> = std::fs::read_dir(data.join("volumes")).unwrap().collect();
    assert!(images.is_empty(), "image files left behind: {images:?}");

    agent.stop();
    controller.stop();
    let _ = std::fs::remove_dir_all(&data);
}
