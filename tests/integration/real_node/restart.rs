//! The node agent restarted under a running pod.

use std::time::Instant;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::PostParams;

use super::pod;
use crate::fixtures::{self, claim, phase, wait};
use crate::harness::{Process, RealNode, TestNamespace};

/// Restarting the node agent under a running pod does not disturb it: what
/// the pod wrote before is there after, it keeps writing, and kubelet's
/// mounts stay where they were. Returns the restarted agent.
pub async fn agent_restart_keeps_a_running_pod(
    node: &RealNode,
    ns: &TestNamespace,
    class: &str,
    agent: Process,
    start_agent: impl Fn() -> Process,
) -> Process {
    let pods = ns.api::<Pod>();
    claim(ns, "busy", class, "16Mi", &["ReadWriteOnce"]).await;
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
        lines(&fixtures::exec(kubeconfig, ns, "busy", "cat /data/log")) > 0
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
    let written_while_down = lines(&fixtures::exec(kubeconfig, ns, "busy", "cat /data/log"));
    let agent = start_agent();
    assert!(
        agent
            .logged("registered with kubelet", fixtures::TIMEOUT)
            .await,
        "the restarted agent never registered with kubelet"
    );
    let out = fixtures::exec(
        kubeconfig,
        ns,
        "busy",
        "echo after >> /data/marker && sync && cat /data/marker",
    );
    assert_eq!(out, "before\nafter\n", "the volume lost or refused data");
    wait_until("the pod still appending", || {
        lines(&fixtures::exec(kubeconfig, ns, "busy", "cat /data/log")) > written_while_down
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
    agent
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
