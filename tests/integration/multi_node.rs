//! A control plane of its own with several Node objects the scheduler
//! sees, a `stowage node` agent for each (no kubelet: pods stay Pending on
//! the node kube-scheduler picks, which is what these tests look at) and
//! one `stowage controller`.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::harness::{
    BareCluster, Binder, Process, bare_cluster_of, client_for_path, unique_name,
    wait_for_storage_nodes,
};

/// Where the controller publishes CSIStorageCapacity (its namespace).
pub const CONTROLLER_NAMESPACE: &str = "stowage-system";

pub struct MultiNode {
    pub cluster: BareCluster,
    pub client: Client,
    pub agents: Vec<(String, Option<Process>)>,
    _controller: Process,
    data: PathBuf,
}

impl MultiNode {
    /// `nodes`: (name, --capacity) each. The CSIDriver says
    /// `storageCapacity: capacity` and the controller runs with
    /// `--enable-capacity=capacity` plus `controller_args`.
    pub async fn start(
        cluster_name: &'static str,
        nodes: &[(&str, &str)],
        capacity: bool,
        controller_args: &[&str],
    ) -> Self {
        let names: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
        let cluster = bare_cluster_of(cluster_name, &names, Binder::Kcm);
        let client = client_for_path(&cluster).await;
        let driver: CSIDriver = serde_json::from_value(json!({
            "metadata": { "name": "local.stowage.dev" },
            "spec": {
                "attachRequired": false,
                "storageCapacity": capacity,
                "volumeLifecycleModes": ["Persistent"],
            },
        }))
        .unwrap();
        Api::<CSIDriver>::all(client.clone())
            .create(&PostParams::default(), &driver)
            .await
            .expect("creating the CSIDriver");
        let data = std::env::temp_dir().join(unique_name("stowage-multi-node"));
        let mut agents = Vec::new();
        for (node, size) in nodes {
            let agent = agent(&cluster, &data, node, size);
            agents.push((node.to_string(), Some(agent)));
        }
        // The controller's first list holds every node's offer: a pod
        // placed at once is judged by capacity, not by a missing agent.
        wait_for_storage_nodes(&cluster, &names);
        let enable = format!("--enable-capacity={capacity}");
        let mut args = vec![
            "controller",
            "--leader-elect=false",
            "--metrics-addr",
            "127.0.0.1:0",
            &enable,
        ];
        args.extend_from_slice(controller_args);
        let controller =
            Process::start(&cluster, &args, &[], &format!("{cluster_name}-controller"));
        MultiNode {
            cluster,
            client,
            agents,
            _controller: controller,
            data,
        }
    }

    /// Stops the agent of `node` (SIGTERM), as a node whose agent died.
    pub fn stop_agent(&mut self, node: &str) {
        let entry = self.agents.iter_mut().find(|(n, _)| n == node).unwrap();
        entry.1.take().expect("agent running").stop();
    }

    /// Starts the agent of `node` again, on the same data.
    pub fn restart_agent(&mut self, node: &str, size: &str) {
        let agent = agent(&self.cluster, &self.data, node, size);
        let entry = self.agents.iter_mut().find(|(n, _)| n == node).unwrap();
        entry.1 = Some(agent);
    }

    /// The CSIStorageCapacity objects stowage published, as (class, node,
    /// maximumVolumeSize).
    pub async fn capacities(&self) -> Vec<(String, String, String)> {
        let api = Api::<CSIStorageCapacity>::namespaced(self.client.clone(), CONTROLLER_NAMESPACE);
        let list = api
            .list(&ListParams::default().labels("csi.storage.k8s.io/managed-by=stowage-controller"))
            .await
            .unwrap();
        let mut out: Vec<_> = list
            .items
            .into_iter()
            .map(|c| {
                let node = c
                    .node_topology
                    .and_then(|t| t.match_labels)
                    .and_then(|l| l.get("topology.stowage.dev/node").cloned())
                    .unwrap_or_default();
                let max = c.maximum_volume_size.map(|q| q.0).unwrap_or_default();
                (c.storage_class_name, node, max)
            })
            .collect();
        out.sort();
        out
    }

    /// Waits until the published capacities of `class` are `want`
    /// ((node, maximumVolumeSize) each, sorted by node).
    pub async fn wait_capacities(&self, class: &str, want: &[(&str, &str)]) {
        let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
        loop {
            let got: Vec<(String, String)> = self
                .capacities()
                .await
                .into_iter()
                .filter(|(c, ..)| c == class)
                .map(|(_, n, m)| (n, m))
                .collect();
            let matches = got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|((n, m), (wn, wm))| n == wn && m == wm);
            if matches {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "CSIStorageCapacity of {class}: {got:?}, want {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
}

impl Drop for MultiNode {
    fn drop(&mut self) {
        for (_, agent) in self.agents.drain(..) {
            if let Some(agent) = agent {
                agent.stop();
            }
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn agent(cluster: &BareCluster, data: &std::path::Path, node: &str, size: &str) -> Process {
    let dir = data.join(node);
    Process::start(
        cluster,
        &[
            "node",
            "--node-name",
            node,
            "--data-dir",
            dir.to_str().unwrap(),
            "--capacity",
            size,
            "--report-interval",
            "2s",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
        &format!("agent-{node}"),
    )
}

/// A pod that uses `claim` and never runs (no kubelet behind the nodes):
/// it tolerates the taints a Node without kubelet gets, nothing else, and
/// prefers `preferred` when given.
pub fn consumer(name: &str, claim: &str, preferred: Option<&str>) -> Pod {
    let mut pod = json!({
        "metadata": { "name": name },
        "spec": {
            "automountServiceAccountToken": false,
            "tolerations": [
                { "key": "node.kubernetes.io/unreachable", "operator": "Exists" },
                { "key": "node.kubernetes.io/not-ready", "operator": "Exists" },
            ],
            "containers": [{ "name": "c", "image": "stowage.dev/never-run:0" }],
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": claim } }],
        },
    });
    if let Some(node) = preferred {
        pod["spec"]["affinity"] = json!({ "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "preference": { "matchExpressions": [{
                    "key": "kubernetes.io/hostname", "operator": "In", "values": [node],
                }]},
            }],
        }});
    }
    serde_json::from_value(pod).unwrap()
}

/// Sets or clears a NoSchedule taint `stowage.dev/test-hold` on `node`.
pub async fn hold(client: &Client, node: &str, held: bool) {
    let taints = if held {
        json!([{ "key": "stowage.dev/test-hold", "effect": "NoSchedule" }])
    } else {
        json!(null)
    };
    let patch = json!({ "spec": { "taints": taints } });
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The node kube-scheduler put `pod` on, once it did.
pub async fn scheduled_node(pods: &Api<Pod>, pod: &str) -> String {
    let scheduled = crate::fixtures::wait(pods, pod, "scheduled", |p: Option<&Pod>| {
        p.and_then(|p| p.spec.as_ref()?.node_name.as_deref())
            .is_some()
    })
    .await
    .unwrap();
    scheduled.spec.unwrap().node_name.unwrap()
}
