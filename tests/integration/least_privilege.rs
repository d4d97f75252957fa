//! Least privilege, proven against a real API server: the controller's pod
//! passes Pod Security admission at `restricted`, and with the API
//! server's audit log on, a controller and a node agent running as their
//! ServiceAccounts (real tokens, the manifests' RBAC and admission policy)
//! through provisioning, expansion and deletion are never refused, and use
//! every verb on every resource their roles grant.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use stowage::crd::Volume;

use crate::fixtures::{claim, gone, is_bound, storage_class, wait};
use crate::harness::{
    Process, TestNamespace, audit_log, audited_cluster, client_for_path, repo_root, unique_name,
    upstream_binary,
};
use crate::service_accounts::{
    CONTROLLER_ACCOUNT, NAMESPACE, NODE_ACCOUNT, account_kubeconfig, bound_pod,
    install_controller_identity, install_node_identity, kubeconfig_with_token, token,
};

/// (API group, resource[/subresource], verb)
type Permission = (String, String, String);

/// Grants no flow here uses, with the flow that does. Keep this short:
/// each entry is a permission this test cannot vouch for.
const USED_ELSEWHERE: &[(&str, &str, &str, &str)] = &[
    // (account, "group:resource", verb, the test whose flow uses it)
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshotcontents",
        "get",
        "proxy_snapshot.rs: the content read back before its finalizer goes",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshotcontents",
        "list",
        "proxy_snapshot.rs: the snapshot job's watch",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshotcontents",
        "watch",
        "proxy_snapshot.rs: the snapshot job's watch",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshotcontents",
        "patch",
        "proxy_snapshot.rs: the being-created annotation and the finalizer",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshotcontents/status",
        "patch",
        "proxy_snapshot.rs: a cut snapshot's handle and readiness",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshotclasses",
        "get",
        "proxy_snapshot.rs: the class's parameters",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshots",
        "get",
        "proxy_snapshot.rs: a claim restored from a snapshot",
    ),
    (
        "stowage-controller",
        "snapshot.storage.k8s.io:volumesnapshots",
        "patch",
        "proxy_snapshot.rs: the restore source's finalizer",
    ),
    (
        "stowage-controller",
        "gateway.networking.k8s.io:referencegrants",
        "list",
        "cross_namespace_source.rs: the grants of a source's namespace, and their watch",
    ),
    (
        "stowage-controller",
        "gateway.networking.k8s.io:referencegrants",
        "watch",
        "cross_namespace_source.rs: a claim asked again once a grant is created",
    ),
    (
        "stowage-controller",
        "storage.k8s.io:volumeattributesclasses",
        "get",
        "proxy_modify.rs: a claim naming a VolumeAttributesClass",
    ),
    (
        "stowage-controller",
        ":persistentvolumes",
        "get",
        "controller_lifecycle.rs: a claim deleted before its PV",
    ),
    (
        "stowage-controller",
        ":nodes",
        "get",
        "proxy_attach.rs: a VolumeAttachment whose Node is gone",
    ),
    (
        "stowage-controller",
        "storage.k8s.io:volumeattachments",
        "patch",
        "proxy_attach.rs: the attacher's finalizer",
    ),
    (
        "stowage-controller",
        "storage.k8s.io:volumeattachments",
        "delete",
        "proxy_attach.rs: a deleted Node",
    ),
    (
        "stowage-controller",
        "storage.k8s.io:volumeattachments/status",
        "patch",
        "proxy_attach.rs: attached",
    ),
    (
        "stowage-controller",
        "stowage.dev:volumes",
        "get",
        "local_snapshot.rs: a snapshot Volume confirmed gone",
    ),
    (
        "stowage-controller",
        "stowage.dev:volumes/status",
        "patch",
        "proxy_driver.rs: a --csi-driver Volume",
    ),
    (
        "stowage-controller",
        "stowage.dev:storagenodes/status",
        "patch",
        "dead_nodes.rs: an agent that stopped reporting",
    ),
    (
        "stowage-node",
        "events.k8s.io:events",
        "create",
        "node_capacity.rs: NodeDiskPressure on the claims of a full node",
    ),
    (
        "stowage-node",
        "events.k8s.io:events",
        "patch",
        "node_capacity.rs: the same warning repeated",
    ),
];

/// What the roles bound to `account` in manifests/ grant.
fn granted(account: &str) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for file in ["10-controller-rbac.yaml", "40-node.yaml"] {
        let text = std::fs::read_to_string(repo_root().join("manifests").join(file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let role = serde_yaml::Value::deserialize(doc).unwrap();
            let kind = role["kind"].as_str().unwrap_or_default();
            let name = role["metadata"]["name"].as_str().unwrap_or_default();
            // Every role in these files is bound to the account it is named after.
            if !matches!(kind, "ClusterRole" | "Role") || !name.starts_with(account) {
                continue;
            }
            for rule in role["rules"].as_sequence().unwrap() {
                let strings = |key: &str| -> Vec<String> {
                    serde_yaml::from_value(rule[key].clone()).unwrap()
                };
                for group in strings("apiGroups") {
                    for resource in strings("resources") {
                        for verb in strings("verbs") {
                            out.insert((group.clone(), resource.clone(), verb));
                        }
                    }
                }
            }
        }
    }
    assert!(!out.is_empty(), "no role for {account} in manifests/");
    out
}

/// What `account` did, from the audit log, and the calls refused to it.
fn used(audit: &Path, account: &str) -> (BTreeSet<Permission>, Vec<String>) {
    let user = format!("system:serviceaccount:{NAMESPACE}:{account}");
    let (mut used, mut refused) = (BTreeSet::new(), Vec::new());
    let text = std::fs::read_to_string(audit).unwrap();
    for line in text.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        if event["user"]["username"] != user.as_str() || event["stage"] != "ResponseComplete" {
            continue;
        }
        let object = &event["objectRef"];
        let mut resource = object["resource"].as_str().unwrap_or_default().to_string();
        if let Some(sub) = object["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let group = object["apiGroup"].as_str().unwrap_or_default().to_string();
        let verb = event["verb"].as_str().unwrap_or_default().to_string();
        let code = event["responseStatus"]["code"].as_i64().unwrap_or_default();
        if code == 403 {
            refused.push(format!(
                "{verb} {group}/{resource}: {}",
                event["responseStatus"]["message"]
            ));
        }
        // A server-side apply that made the object was authorized as
        // `create` as well.
        if verb == "patch" && code == 201 {
            used.insert((group.clone(), resource.clone(), "create".into()));
        }
        used.insert((group, resource, verb));
    }
    (used, refused)
}

fn check_account(audit: &Path, account: &str) {
    let (used, refused) = used(audit, account);
    assert!(refused.is_empty(), "{account} was refused: {refused:#?}");
    let elsewhere: BTreeSet<Permission> = USED_ELSEWHERE
        .iter()
        .filter(|(a, ..)| *a == account)
        .map(|(_, r, v, _)| {
            let (group, resource) = r.split_once(':').unwrap();
            (group.to_string(), resource.to_string(), v.to_string())
        })
        .collect();
    let show = |ps: &mut dyn Iterator<Item = &Permission>| -> String {
        ps.map(|(g, r, v)| format!("\n  {v} {g}/{r}")).collect()
    };
    let unused: Vec<_> = granted(account)
        .into_iter()
        .filter(|p| !used.contains(p) && !elsewhere.contains(p))
        .collect();
    assert!(
        unused.is_empty(),
        "{account} is granted, and never used:{}\nit used:{}",
        show(&mut unused.iter()),
        show(&mut used.iter())
    );
}

#[tokio::test]
async fn stowage_is_never_refused_and_uses_every_permission_it_is_granted() {
    let node = "lp-node";
    let cluster = audited_cluster(&[node]);
    let admin = client_for_path(&cluster).await;
    install_controller_identity(&cluster);
    install_node_identity(&cluster);
    let pod = bound_pod(&admin, NODE_ACCOUNT, node).await;
    let as_node = kubeconfig_with_token(
        &cluster,
        &token(&admin, NODE_ACCOUNT, Some(&pod)).await,
        "lp-node",
    );
    let as_controller = account_kubeconfig(&cluster, &admin, CONTROLLER_ACCOUNT).await;

    let data = std::env::temp_dir().join(unique_name("stowage-least-privilege"));
    let agent = Process::node(&as_node, node, &data, "lp-node");
    // With leader election, as deployed: its Lease in stowage-system, and
    // the pod of a Deployment whose owner chain it follows.
    let pod_name = deployment_pod(&admin).await;
    let controller = Process::start(
        &as_controller,
        &["controller", "--metrics-addr", "127.0.0.1:0"],
        &[("POD_NAME", &pod_name), ("POD_NAMESPACE", NAMESPACE)],
        "lp-controller",
    );

    provision_grow_delete(&admin, &cluster).await;

    // The leader gives its Lease back on SIGTERM.
    controller
        .terminate(std::time::Duration::from_secs(30))
        .await;
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
    let audit = audit_log(&cluster);
    check_account(&audit, CONTROLLER_ACCOUNT);
    check_account(&audit, NODE_ACCOUNT);
}

/// A claim provisioned, grown and deleted, then one that cannot fit
/// (retried, so its repeated event is patched).
async fn provision_grow_delete(admin: &kube::Client, cluster: &crate::harness::BareCluster) {
    let ns = TestNamespace::new_with(admin.clone(), "least-privilege").await;
    let class = format!("{}-dir", ns.name);
    storage_class(admin, &class, "Immediate", "Delete", &[("layout", "dir")]).await;
    let expandable = json!({ "allowVolumeExpansion": true });
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(admin.clone())
        .patch(&class, &PatchParams::default(), &Patch::Merge(&expandable))
        .await
        .unwrap();
    let claims = ns.api::<PersistentVolumeClaim>();
    let before = class_capacity(admin, &class, |_| true).await;
    let uid = claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, "data", "Bound", is_bound).await;
    // The class's CSIStorageCapacity follows the volume (a patch), before
    // anything else changes it: its passes are coalesced.
    class_capacity(admin, &class, |now| now < before).await;
    let grow = json!({ "spec": { "resources": { "requests": { "storage": "32Mi" } } } });
    claims
        .patch("data", &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .unwrap();
    wait(
        &claims,
        "data",
        "grown",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| {
                c.status
                    .as_ref()?
                    .capacity
                    .as_ref()?
                    .get("storage")
                    .cloned()
            })
            .is_some_and(|q| q.0 == "32Mi")
        },
    )
    .await;
    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(
        &Api::<Volume>::all(admin.clone()),
        &format!("pvc-{uid}"),
        "deleted",
        gone,
    )
    .await;
    wait(
        &Api::<PersistentVolume>::all(admin.clone()),
        &format!("pvc-{uid}"),
        "deleted",
        gone,
    )
    .await;
    // A claim that cannot fit is retried, and its repeated event patched.
    claim(&ns, "too-big", &class, "2Gi", &["ReadWriteOnce"]).await;
    asked(&audit_log(cluster), CONTROLLER_ACCOUNT, "patch", "events").await;

    // The class's CSIStorageCapacity, owned by the controller's Deployment,
    // followed the volume, and goes with the class.
    asked(
        &audit_log(cluster),
        CONTROLLER_ACCOUNT,
        "patch",
        "csistoragecapacities",
    )
    .await;
    let capacities = Api::<CSIStorageCapacity>::namespaced(admin.clone(), NAMESPACE)
        .list(&Default::default())
        .await
        .unwrap();
    let ours: Vec<_> = capacities
        .items
        .iter()
        .filter(|c| c.storage_class_name == class)
        .collect();
    assert_eq!(ours.len(), 1, "{capacities:?}");
    let owners = ours[0].owner_references();
    assert!(
        owners.len() == 1 && owners[0].kind == "Deployment" && owners[0].name == CONTROLLER_ACCOUNT,
        "{owners:?}"
    );
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(admin.clone())
        .delete(&class, &DeleteParams::default())
        .await
        .unwrap();
    asked(
        &audit_log(cluster),
        CONTROLLER_ACCOUNT,
        "delete",
        "csistoragecapacities",
    )
    .await;
}

/// A Deployment named like the controller's, in its namespace, whose pod
/// (made by kube-controller-manager, never run: no kubelet) the
/// controller takes for its own: returns the pod's name.
async fn deployment_pod(admin: &kube::Client) -> String {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Pod;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": CONTROLLER_ACCOUNT },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "lp-controller" } },
            "template": {
                "metadata": { "labels": { "app": "lp-controller" } },
                "spec": {
                    "automountServiceAccountToken": false,
                    "tolerations": [{ "operator": "Exists" }],
                    "containers": [{ "name": "c", "image": "stowage.dev/never-run:0" }],
                },
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(admin.clone(), NAMESPACE)
        .create(&Default::default(), &deployment)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(admin.clone(), NAMESPACE);
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let list = pods
            .list(&kube::api::ListParams::default().labels("app=lp-controller"))
            .await
            .unwrap();
        if let Some(pod) = list.items.first() {
            return pod.name_any();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kube-controller-manager made no pod for the Deployment"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The capacity the controller publishes for `class`, once it satisfies
/// `wanted`.
async fn class_capacity(admin: &kube::Client, class: &str, wanted: impl Fn(i64) -> bool) -> i64 {
    let api = Api::<CSIStorageCapacity>::namespaced(admin.clone(), NAMESPACE);
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let list = api.list(&Default::default()).await.unwrap();
        let published = list
            .items
            .iter()
            .find(|c| c.storage_class_name == class)
            .and_then(|c| c.capacity.as_ref())
            .and_then(|q| stowage::quantity::parse_bytes(&q.0).ok());
        if let Some(bytes) = published.filter(|b| wanted(*b)) {
            return bytes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CSIStorageCapacity of {class}: {published:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits until the audit log shows `account` asking for `verb` on
/// `resource`, whatever the answer (a refusal fails the test afterwards).
async fn asked(audit: &Path, account: &str, verb: &str, resource: &str) {
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let text = std::fs::read_to_string(audit).unwrap_or_default();
        let user = format!("system:serviceaccount:{NAMESPACE}:{account}");
        let seen = text.lines().any(|line| {
            let e: serde_json::Value = serde_json::from_str(line).unwrap();
            e["user"]["username"] == user.as_str()
                && e["verb"] == verb
                && e["objectRef"]["resource"] == resource
        });
        if seen {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{account} never asked to {verb} {resource}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `kubectl` with `stdin` piped in; returns (success, stdout, stderr).
fn kubectl(kubeconfig: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(upstream_binary("kubectl"))
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Admission at `restricted`, enforced on the Deployment's pod and warned
/// about on the Deployment itself.
#[tokio::test]
async fn the_controller_pod_meets_the_restricted_pod_security_profile() {
    let ns = TestNamespace::new("restricted").await;
    let kubeconfig = crate::harness::kubeconfig();
    let labels = json!({ "metadata": { "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(ns.client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    let text = std::fs::read_to_string(repo_root().join("manifests/20-controller.yaml")).unwrap();
    let mut deployment: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    deployment["metadata"]["namespace"] = json!(ns.name);
    let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": CONTROLLER_ACCOUNT, "namespace": ns.name } });
    let (ok, _, err) = kubectl(&kubeconfig, &["apply", "-f", "-"], &account.to_string());
    assert!(ok, "{err}");

    let (ok, out, err) = kubectl(
        &kubeconfig,
        &["apply", "--dry-run=server", "-f", "-"],
        &deployment.to_string(),
    );
    assert!(ok && !err.contains("PodSecurity"), "{out}{err}");
    let pod = json!({ "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "controller", "namespace": ns.name },
        "spec": deployment["spec"]["template"]["spec"] });
    let (ok, out, err) = kubectl(
        &kubeconfig,
        &["create", "--dry-run=server", "-f", "-"],
        &pod.to_string(),
    );
    assert!(
        ok,
        "the controller's pod is refused at restricted: {out}{err}"
    );
    assert!(
        out.contains("pod/controller created (server dry run)"),
        "{out}"
    );
}
