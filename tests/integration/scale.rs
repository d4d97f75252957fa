//! The controller on a cluster it does not have to itself: thousands of
//! other provisioners' claims already there, SIGTERM while it waits for the
//! lease and while its caches load, and a watch that cannot list.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use stowage::crd::StorageNode;

use crate::fixtures::{TIMEOUT, claim, is_bound, storage_class, wait};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, free_port, http_get, unique_name,
};

const NODE: &str = "scale-node";
/// Well within a pod's default termination grace period (30s).
const STOP_WITHIN: Duration = Duration::from_secs(10);

fn controller(kubeconfig: &std::path::Path, ns: &str, id: &str, extra: &[&str]) -> Process {
    let mut args = vec![
        "controller",
        "--leader-election-namespace",
        ns,
        "--identity",
        id,
    ];
    if !extra.contains(&"--metrics-addr") {
        args.extend(["--metrics-addr", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Process::start(kubeconfig, &args, &[], &format!("scale-{id}"))
}

/// Stops `process` with SIGTERM and checks that it ended by itself, cleanly
/// and in time.
async fn stops_cleanly(process: Process, what: &str) {
    let (took, status) = process
        .terminate(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("{what}: still running 20s after SIGTERM"));
    assert!(
        took < STOP_WITHIN,
        "{what}: took {took:?} to stop after SIGTERM"
    );
    assert!(
        status.success(),
        "{what}: exited with {status} after SIGTERM"
    );
}

async fn holder(ns: &TestNamespace) -> Option<String> {
    let lease = ns
        .api::<Lease>()
        .get_opt("stowage-controller")
        .await
        .unwrap()?;
    lease.spec?.holder_identity
}

/// A node agent that has reported what it offers.
async fn node_agent(
    kubeconfig: &std::path::Path,
    client: &Client,
) -> (Process, std::path::PathBuf) {
    let data = std::env::temp_dir().join(unique_name("stowage-scale"));
    let agent = Process::node(kubeconfig, NODE, &data, "scale-node");
    wait(
        &Api::<StorageNode>::all(client.clone()),
        NODE,
        "reported",
        |n: Option<&StorageNode>| n.is_some_and(|n| n.status.is_some()),
    )
    .await;
    (agent, data)
}

/// `count` claims of a class nobody here provisions, created 32 at a time.
async fn other_provisioners_claims(ns: &TestNamespace, count: usize) {
    let class = format!("{}-other", ns.name);
    let sc: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": class },
        "provisioner": "other.example.com",
        "volumeBindingMode": "Immediate",
    }))
    .unwrap();
    Api::<StorageClass>::all(ns.client.clone())
        .create(&PostParams::default(), &sc)
        .await
        .expect("creating the other class");
    let api = ns.api::<PersistentVolumeClaim>();
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                "metadata": { "name": format!("other-{i}") },
                "spec": {
                    "storageClassName": class,
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": "1Gi" } },
                },
            }))
            .unwrap();
            async move { api.create(&PostParams::default(), &claim).await }
        })
        .buffer_unordered(32)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("creating other provisioners' claims");
}

/// More claims than any buffer between a watch and a job used to hold:
/// the controller still lists them all, starts, provisions its own claim,
/// and stops at once on SIGTERM, giving its lease up.
#[tokio::test]
async fn a_cluster_full_of_other_claims_does_not_stall_the_controller() {
    let kubeconfig = bare_cluster("scale", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "scale").await;
    other_provisioners_claims(&ns, 3000).await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let (agent, data) = node_agent(&kubeconfig, &client).await;

    let leader = controller(&kubeconfig, &ns.name, "crowded", &[]);
    assert!(
        leader.logged("controller started", TIMEOUT).await,
        "the controller never started with 3000 other claims in the cluster:\n{}",
        leader.log()
    );
    claim(&ns, "ours", &class, "20Mi", &["ReadWriteOnce"]).await;
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "ours",
        "Bound",
        is_bound,
    )
    .await;
    assert_eq!(holder(&ns).await.as_deref(), Some("crowded"));

    stops_cleanly(leader, "leader").await;
    assert_eq!(holder(&ns).await, None, "the lease was not released");
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// A standby blocked on another replica's live lease stops on SIGTERM
/// without touching that lease.
#[tokio::test]
async fn sigterm_while_waiting_for_the_lease_stops_at_once() {
    let kubeconfig = bare_cluster("scale", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "standby").await;
    let lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": "stowage-controller" },
        "spec": {
            "holderIdentity": "the-other-replica",
            "leaseDurationSeconds": 3600,
            "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
        },
    }))
    .unwrap();
    ns.api::<Lease>()
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();

    let standby = controller(&kubeconfig, &ns.name, "standby", &[]);
    assert!(
        standby
            .logged("waiting for the leader lease", TIMEOUT)
            .await,
        "the standby never reached the lease:\n{}",
        standby.log()
    );
    stops_cleanly(standby, "standby").await;
    assert_eq!(holder(&ns).await.as_deref(), Some("the-other-replica"));
}

/// A kubeconfig acting as `user` (impersonated by the admin), whom RBAC
/// lets do all the controller does except read CSINodes.
async fn kubeconfig_without_csinodes(
    admin: &std::path::Path,
    client: &Client,
    user: &str,
) -> std::path::PathBuf {
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": { "name": user },
        "rules": [
            { "apiGroups": [""], "resources": ["*"], "verbs": ["*"] },
            { "apiGroups": ["storage.k8s.io"],
              "resources": ["storageclasses", "volumeattachments", "volumeattachments/status"],
              "verbs": ["*"] },
            { "apiGroups": ["stowage.dev"], "resources": ["*"], "verbs": ["*"] },
            { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"] },
            { "apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["*"] },
            { "apiGroups": ["apiextensions.k8s.io"],
              "resources": ["customresourcedefinitions"], "verbs": ["get", "list"] },
        ],
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": user },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    for entry in config["users"].as_sequence_mut().expect("kubeconfig users") {
        entry["user"]["as"] = user.into();
    }
    let path = std::env::temp_dir().join(format!("{user}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// A leader whose CSINode watch cannot list (RBAC forbids it) never acts,
/// says so on /healthz once the watch has stalled for
/// --health-stall-timeout, renews its lease meanwhile, and on SIGTERM stops
/// and releases it.
#[tokio::test]
async fn sigterm_while_caches_load_releases_the_lease() {
    let admin = bare_cluster("scale", &[NODE]);
    let client = client_for_path(&admin).await;
    let ns = TestNamespace::new_with(client.clone(), "loading").await;
    let user = unique_name("stowage-no-csinodes");
    let kubeconfig = kubeconfig_without_csinodes(&admin, &client, &user).await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let loading = controller(
        &kubeconfig,
        &ns.name,
        "loading",
        &["--metrics-addr", &metrics, "--health-stall-timeout", "2s"],
    );
    let leases = ns.api::<Lease>();
    wait(
        &leases,
        "stowage-controller",
        "held",
        |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref()?.holder_identity.as_deref()) == Some("loading")
        },
    )
    .await;

    let healthz = format!("http://{metrics}/healthz");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let (status, body) = loop {
        let (status, body) = http_get(&healthz).await;
        if status != 200 || tokio::time::Instant::now() >= deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        status, 503,
        "/healthz stayed ok with a watch that cannot list"
    );
    assert!(body.contains("CSINode watch"), "/healthz said: {body}");
    // Renewing does not wait for the caches: the lease moves on.
    let unhealthy_at = k8s_openapi::jiff::Timestamp::now();
    wait(
        &leases,
        "stowage-controller",
        "renewed",
        |l: Option<&Lease>| {
            let Some(spec) = l.and_then(|l| l.spec.as_ref()) else {
                return false;
            };
            spec.holder_identity.as_deref() == Some("loading")
                && spec.renew_time.as_ref().is_some_and(|t| t.0 > unhealthy_at)
        },
    )
    .await;
    assert!(
        !loading.log().contains("controller started"),
        "started with a cache that never listed"
    );

    stops_cleanly(loading, "loading leader").await;
    assert_eq!(holder(&ns).await, None, "the lease was not released");
    let _ = std::fs::remove_file(&kubeconfig);
}
