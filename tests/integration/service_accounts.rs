//! Acting as the ServiceAccounts in manifests/, with real tokens: the
//! manifests' RBAC and admission objects applied to a bare control plane,
//! and tokens from the TokenRequest API, bound to a Pod the way kubelet
//! binds the tokens of the pods it runs (so the API server adds the Pod's
//! node to the token's user as `authentication.kubernetes.io/node-name`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde::Deserialize;
use serde_json::json;

use crate::harness::{repo_root, unique_name, upstream_binary};

pub const NAMESPACE: &str = "stowage-system";
pub const NODE_ACCOUNT: &str = "stowage-node";
pub const CONTROLLER_ACCOUNT: &str = "stowage-controller";

/// Server-side applies the objects of `kinds` from manifests/`file`
/// (all of them when `kinds` is empty) with kubectl, as a user would.
pub fn apply_manifest(kubeconfig: &Path, file: &str, kinds: &[&str]) {
    let text = std::fs::read_to_string(repo_root().join("manifests").join(file)).unwrap();
    let mut picked = String::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default();
        if kinds.is_empty() || kinds.contains(&kind) {
            picked.push_str("---\n");
            picked.push_str(&serde_yaml::to_string(&value).unwrap());
        }
    }
    kubectl_apply(kubeconfig, &picked);
}

/// `kubectl apply --server-side -f -` of `objects`; panics with kubectl's
/// message when it fails.
pub fn kubectl_apply(kubeconfig: &Path, objects: &str) {
    let mut child = Command::new(upstream_binary("kubectl"))
        .env("KUBECONFIG", kubeconfig)
        .args(["apply", "--server-side", "--force-conflicts", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), objects.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node agent's identity: its namespace, ServiceAccount, RBAC and
/// admission policy from manifests/ (not its DaemonSet: no kubelet runs
/// these nodes).
pub fn install_node_identity(kubeconfig: &Path) {
    apply_manifest(kubeconfig, "00-namespace.yaml", &[]);
    apply_manifest(
        kubeconfig,
        "40-node.yaml",
        &["ServiceAccount", "ClusterRole", "ClusterRoleBinding"],
    );
    apply_manifest(kubeconfig, "45-node-authority.yaml", &[]);
}

/// The controller's identity: its namespace, ServiceAccount and RBAC from
/// manifests/, without the optional Secrets manifest.
pub fn install_controller_identity(kubeconfig: &Path) {
    apply_manifest(kubeconfig, "00-namespace.yaml", &[]);
    apply_manifest(kubeconfig, "10-controller-rbac.yaml", &[]);
}

/// The controller's ServiceAccount and RBAC as the manifests make them,
/// and a kubeconfig that acts as it.
pub async fn controller_account(kubeconfig: &Path, admin: &Client) -> PathBuf {
    install_controller_identity(kubeconfig);
    account_kubeconfig(kubeconfig, admin, CONTROLLER_ACCOUNT).await
}

/// A kubeconfig for a stowage process acting as `account` (a token bound
/// to nothing: the controller's identity does not depend on a node).
pub async fn account_kubeconfig(kubeconfig: &Path, admin: &Client, account: &str) -> PathBuf {
    kubeconfig_with_token(kubeconfig, &token(admin, account, None).await, account)
}

/// A Pod of `account` on `node` that never runs (no kubelet serves these
/// nodes): what a token is bound to. It tolerates everything, so that the
/// node going NotReady without a kubelet does not evict it (which would
/// end its tokens).
pub async fn bound_pod(client: &Client, account: &str, node: &str) -> String {
    let name = unique_name(&format!("{account}-{node}"));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "nodeName": node,
            "serviceAccountName": account,
            "automountServiceAccountToken": false,
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{ "name": "agent", "image": "stowage.dev/never-run:0" }],
        },
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await
        .expect("creating the pod a token is bound to");
    name
}

/// A token for `account` from the TokenRequest API, bound to `pod` when
/// given (as kubelet's are), otherwise bound to nothing.
pub async fn token(client: &Client, account: &str, pod: Option<&str>) -> String {
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": pod.map(|p| json!({ "apiVersion": "v1", "kind": "Pod", "name": p })),
        }
    }))
    .unwrap();
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    answer.status.and_then(|s| s.token).expect("a token")
}

/// The admin kubeconfig with its user replaced by `token`.
fn with_token(kubeconfig: &Path, token: &str) -> Kubeconfig {
    let mut config = Kubeconfig::read_from(kubeconfig).expect("reading kubeconfig");
    for user in &mut config.auth_infos {
        user.auth_info = Some(AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        });
    }
    config
}

/// A client of the same API server that authenticates with `token` only.
pub async fn client_with_token(kubeconfig: &Path, token: &str) -> Client {
    let config = Config::from_custom_kubeconfig(
        with_token(kubeconfig, token),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig usable");
    Client::try_from(config).expect("building client")
}

/// A kubeconfig file that authenticates with `token` only, beside the
/// admin's (its CA path is shared), for a stowage process.
pub fn kubeconfig_with_token(kubeconfig: &Path, token: &str, name: &str) -> PathBuf {
    let path = kubeconfig.with_file_name(format!("{}.kubeconfig", unique_name(name)));
    let text = serde_yaml::to_string(&with_token(kubeconfig, token)).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// The node agent on `node`, as the API server will see it: a client with
/// a token of stowage-node bound to a Pod on that node.
pub async fn node_agent_client(kubeconfig: &Path, admin: &Client, node: &str) -> Client {
    let pod = bound_pod(admin, NODE_ACCOUNT, node).await;
    client_with_token(kubeconfig, &token(admin, NODE_ACCOUNT, Some(&pod)).await).await
}
