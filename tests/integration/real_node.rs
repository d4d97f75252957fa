//! A real kubelet with containerd: stowage registers with kubelet through
//! its socket, and pods scheduled by kube-scheduler mount stowage volumes,
//! write, and read back after the first pod is gone.

use std::time::Instant;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{self, claim, gone, phase, storage_class, wait};
use crate::harness::{
    Process, REAL_NODE, TestNamespace, client_for_path, real_node, repo_root, unique_name,
};

/// Storage needs no pod network: these pods keep CNI out of the picture.
fn pod(name: &str, claim: &str, script: &str) -> Pod {
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

    expand_under_a_running_pod_then_offline(&ns, &client).await;

    // Restarting the node agent under a running pod does not disturb it:
    // what the pod wrote before is there after, it keeps writing, and the
    // restarted agent tears the volume down when the pod goes.
    claim(&ns, "busy", &class, "16Mi", &["ReadWriteOnce"]).await;
    pods.create(
        &PostParams::default(),
        &pod(
            "busy",
            "busy",
            "echo before > /data/marker && sync; \
             while true; do date >> /data/log; sleep 0.2; done",
        ),
    )
    .await
    .unwrap();
    wait(&pods, "busy", "running", |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    let lines = |out: &str| out.lines().count();
    let kubeconfig = &node.kubeconfig;
    wait_until("the pod writing", || {
        lines(&fixtures::exec(kubeconfig, &ns, "busy", "cat /data/log")) > 0
    })
    .await;
    let busy_pv = format!(
        "pvc-{}",
        ns.api::<PersistentVolumeClaim>()
            .get("busy")
            .await
            .unwrap()
            .uid()
            .unwrap()
    );
    let mounted_before = mount_points_of(&busy_pv);
    assert_eq!(
        mounted_before.len(),
        2,
        "staging and pod mounts of {busy_pv}: {mounted_before:?}"
    );
    agent.stop();
    let written_while_down = lines(&fixtures::exec(kubeconfig, &ns, "busy", "cat /data/log"));
    let agent = start_agent();
    assert!(
        agent
            .logged("registered with kubelet", fixtures::TIMEOUT)
            .await,
        "the restarted agent never registered with kubelet"
    );
    let out = fixtures::exec(
        kubeconfig,
        &ns,
        "busy",
        "echo after >> /data/marker && sync && cat /data/marker",
    );
    assert_eq!(out, "before\nafter\n", "the volume lost or refused data");
    wait_until("the pod still appending", || {
        lines(&fixtures::exec(kubeconfig, &ns, "busy", "cat /data/log")) > written_while_down
    })
    .await;
    // kubelet finds the volume where it left it, for the unpublish and
    // unstage that come when the pod goes.
    assert_eq!(
        mount_points_of(&busy_pv),
        mounted_before,
        "mounts changed across the agent restart"
    );
    let running = pods.get("busy").await.unwrap();
    assert_eq!(
        phase(Some(&running)).as_deref(),
        Some("Running"),
        "pod disturbed by the agent restart"
    );
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

/// xfs, because growing a mounted ext4 needs CAP_SYS_RESOURCE, which test
/// sandboxes may lack (the DaemonSet has it).
async fn expand_under_a_running_pod_then_offline(ns: &TestNamespace, client: &kube::Client) {
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

/// Polls `cond` (a blocking check) until it holds, up to fixtures::TIMEOUT.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + fixtures::TIMEOUT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "not {what} after {:?}",
            fixtures::TIMEOUT
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The host's mount points of `volume`'s device: kubelet's per-pod
/// directory (which carries the PV name) and every other mount of the same
/// device, such as the staging mount (named by a hash of the handle); sorted.
fn mount_points_of(volume: &str) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // (mount point, source device) of each line.
    let mounts: Vec<(&str, &str)> = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            Some((left.split(' ').nth(4)?, right.split(' ').nth(1)?))
        })
        .collect();
    let Some(device) = mounts
        .iter()
        .find(|(point, _)| point.contains(volume))
        .map(|(_, device)| *device)
    else {
        return Vec::new();
    };
    let mut points: Vec<String> = mounts
        .iter()
        .filter(|(_, d)| *d == device)
        .map(|(p, _)| p.to_string())
        .collect();
    points.sort();
    points
}
