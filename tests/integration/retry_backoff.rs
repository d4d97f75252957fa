//! A failure that does not go away is retried at growing intervals, not in
//! a loop, and explained once: the node agent's mkfs failing for a Volume,
//! a driver refusing ControllerPublish, and capacity passes failing while
//! the objects they follow keep changing.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::Volume;

use crate::external_driver::ExternalDriver;
use crate::fixtures::{TIMEOUT, claim, is_bound, storage_class, wait, wait_for_event};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, free_port, http_get, unique_name,
    wait_for_storage_nodes, wait_http,
};
use crate::proxy_attach::{Scene, wait_for_va};
use crate::proxy_driver::proxy_controller;

const NODE: &str = "backoff-node";

/// A `mkfs.ext4` ahead of the real one on PATH that fails as a dying disk
/// would, and records when it was called.
fn failing_mkfs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("mkfs.ext4");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ndate +%s.%N >> {}\necho 'mkfs.ext4: simulated write error' >&2\nexit 1\n",
            dir.join("calls").display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", script.to_str().unwrap()])
        .status()
        .unwrap();
}

fn calls(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_failing_mkfs_is_retried_at_growing_intervals() {
    let kubeconfig = bare_cluster("backoff", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "backoff").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let work = std::env::temp_dir().join(unique_name("stowage-backoff"));
    let shim = work.join("bin");
    failing_mkfs(&shim);
    let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap());
    let data = work.join("data");
    let data_arg = data.to_str().unwrap();
    let agent = Process::start(
        &kubeconfig,
        &[
            "node",
            "--node-name",
            NODE,
            "--data-dir",
            data_arg,
            "--capacity",
            "1Gi",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("PATH", &path)],
        "backoff-node",
    );
    // Provisioning then fails on mkfs, not on an agent yet to report.
    wait_for_storage_nodes(&kubeconfig, &[NODE]);
    let controller = Process::controller(&kubeconfig, "backoff-controller");

    let uid = claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let note = wait_for_event(&ns, "data", "ProvisioningFailed").await;
    assert!(note.contains("simulated write error"), "{note}");

    // 1 s, 2 s, 4 s, 8 s apart: five calls within about 15 s, never dozens.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while calls(&shim).len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mkfs retried {} times in {TIMEOUT:?}",
            calls(&shim).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let times = calls(&shim);
    assert_growing(&times);

    // One failure, one status: the Volume is not rewritten at every retry.
    let volumes = Api::<Volume>::all(client.clone());
    let volume = volumes.get(&format!("pvc-{uid}")).await.unwrap();
    let status = volume.status.unwrap();
    let since = status.conditions[0].last_transition_time.0;
    let first = k8s_openapi::jiff::Timestamp::from_millisecond((times[0] * 1000.0) as i64).unwrap();
    assert!(
        since <= first + k8s_openapi::jiff::SignedDuration::from_secs(2),
        "the Failed condition was rewritten at a later retry ({since}; first failure {first})"
    );

    // The disk mended: the next retry succeeds with no one acting.
    std::fs::remove_file(shim.join("mkfs.ext4")).unwrap();
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "data",
        "Bound",
        is_bound,
    )
    .await;
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&work);
}

/// The mock driver refuses a second volume on a node (`--attach-limit=1`,
/// ResourceExhausted): the VolumeAttachment says so, ControllerPublish is
/// asked again 1, 2, 4, 8 s apart, and the volume is attached on its own
/// once the first one leaves the node.
#[tokio::test]
async fn a_refused_controller_publish_is_retried_at_growing_intervals() {
    let node = "publish-node";
    let kubeconfig = bare_cluster("publish-backoff", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let driver = ExternalDriver::mock("backoff.csi.stowage.test").with_args(&["--attach-limit=1"]);
    let _running = driver.start();
    Scene::install(&client, &driver, &[node]).await;
    let controller = proxy_controller(
        &kubeconfig,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        "publish-backoff-controller",
    );
    let s = Scene::new(client.clone(), driver, "publish-backoff").await;
    let (pv_a, handle_a) = s.provision("a").await;
    let (pv_b, handle_b) = s.provision("b").await;
    s.start_pod("first", node, "a").await;
    s.attached(&pv_a, node, &handle_a).await;

    s.start_pod("second", node, "b").await;
    let va = wait_for_va(&s.vas, &pv_b, "refused", |st| st.attach_error.is_some()).await;
    let message = va
        .status
        .unwrap()
        .attach_error
        .unwrap()
        .message
        .unwrap_or_default();
    assert!(
        message.contains("Cannot attach any more volumes"),
        "{message}"
    );
    let publishes = || publish_times(&s.driver.log(), &handle_b);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while publishes().len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ControllerPublish of {handle_b} asked {} times in {TIMEOUT:?}",
            publishes().len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_growing(&publishes());

    s.delete_pod("first").await;
    s.attached(&pv_b, node, &handle_b).await;
    controller.stop();
}

/// When the mock driver's log shows ControllerPublishVolume of `handle`
/// being asked, in seconds since midnight.
fn publish_times(log: &str, handle: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("/ControllerPublishVolume"))
        .filter(|l| l.contains(&format!("volume_id:\"{handle}\"")))
        .filter_map(|l| {
            let time = l.split_whitespace().nth(1)?;
            let mut hms = time.split(':').map(|p| p.parse::<f64>().ok());
            Some(hms.next()?? * 3600.0 + hms.next()?? * 60.0 + hms.next()??)
        })
        .collect()
}

/// Retry intervals that start at about a second and at least grow by half
/// each time.
fn assert_growing(times: &[f64]) {
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= 0.8,
        "retried {:.2} s after the first failure: {gaps:?}",
        gaps[0]
    );
    for pair in gaps.windows(2) {
        assert!(
            pair[1] >= pair[0] * 1.5,
            "retry intervals do not grow: {gaps:?}"
        );
    }
}

/// Failed capacity passes, summed over their reasons.
fn capacity_failures(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("stowage_reconcile_failures_total{job=\"storage_capacity\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The controller's namespace missing, every capacity pass fails. A change
/// to the class every 200 ms would wake a pass each (coalesced over 500
/// ms); after a failure they wait for its backoff, 1, 2, 4 s, so that the
/// failures stay a handful. Once the namespace exists the next retry
/// publishes, with no change needed to wake it.
#[tokio::test]
async fn failing_capacity_passes_back_off_while_changes_arrive() {
    let node = "capacity-backoff-node";
    let kubeconfig = bare_cluster("capacity-backoff", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let namespace = unique_name("capacity-home");
    let class = format!("{namespace}-c");
    storage_class(&client, &class, "WaitForFirstConsumer", "Delete", &[]).await;
    let data = std::env::temp_dir().join(unique_name("stowage-capacity-backoff"));
    let agent = Process::node(&kubeconfig, node, &data, "capacity-backoff-node");
    wait_for_storage_nodes(&kubeconfig, &[node]);
    let addr = format!("127.0.0.1:{}", free_port());
    let controller = Process::start(
        &kubeconfig,
        &[
            "controller",
            "--leader-elect=false",
            "--leader-election-namespace",
            &namespace,
            "--metrics-addr",
            &addr,
        ],
        &[],
        "capacity-backoff-controller",
    );
    let url = format!("http://{addr}/metrics");
    let body = wait_http(&url, "a failed capacity pass", |status, body| {
        status == 200 && capacity_failures(body) >= 1.0
    })
    .await;
    let before = capacity_failures(&body);

    let classes = Api::<StorageClass>::all(client.clone());
    let start = tokio::time::Instant::now();
    let mut changes = 0;
    while start.elapsed() < Duration::from_secs(10) {
        let label = json!({ "metadata": { "labels": { "change": changes.to_string() } } });
        classes
            .patch(&class, &PatchParams::default(), &Patch::Merge(&label))
            .await
            .unwrap();
        changes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = http_get(&url).await;
    let during = capacity_failures(&body) - before;
    // Retries 1, 2 and 4 s apart fit 3 or 4 passes in 10 s; a pass per
    // change, 15 or more.
    assert!(
        (1.0..=5.0).contains(&during),
        "{during} failed capacity passes while the class changed {changes} times in 10 s"
    );

    let home: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": namespace } })).unwrap();
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .create(&PostParams::default(), &home)
        .await
        .unwrap();
    let published = Api::<CSIStorageCapacity>::namespaced(client.clone(), &namespace);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let found = published.list(&ListParams::default()).await.unwrap().items;
        if found.iter().any(|c| c.storage_class_name == class) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CSIStorageCapacity for {class} in {namespace} {TIMEOUT:?} after it was created"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    controller.stop();
    agent.stop();
    classes.delete(&class, &Default::default()).await.unwrap();
    namespaces
        .delete(&namespace, &Default::default())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
