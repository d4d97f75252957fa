//! Secrets through `--csi-driver` as external-provisioner handles them,
//! with the controller running as its ServiceAccount under the manifests'
//! RBAC: reading Secrets needs manifests/optional/controller-secrets.yaml,
//! and a claim says so until it is applied; claim annotations name Secrets
//! for every call but the provisioner's; templates that give no valid name,
//! or use what a namespace may not, and Secret values CSI cannot carry are
//! each explained on the claim, naming the parameter or key; no secret
//! value reaches the controller's log.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Secret};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::fixtures::{TIMEOUT, events, is_bound, wait};
use crate::harness::{TestNamespace, bare_cluster, client_for_path, csi_server, unique_name};
use crate::proxy_driver::{immediate_class, proxy_controller};
use crate::service_accounts::{
    CONTROLLER_ACCOUNT, account_kubeconfig, apply_manifest, install_controller_identity,
};

const DRIVER: &str = "secret-rules.stowage.dev";
const P: &str = "csi.storage.k8s.io";

/// Waits for a `reason` event on `claim` whose note contains every one of
/// `words`; returns the note.
async fn explained(ns: &TestNamespace, claim: &str, reason: &str, words: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let all = events(ns, claim).await;
        if let Some((_, note)) = all
            .iter()
            .find(|(r, n)| r == reason && words.iter().all(|w| n.contains(w)))
        {
            return note.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event on {claim} saying {words:?}: {all:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn secret(ns: &TestNamespace, name: &str, data: &[(&str, &[u8])]) {
    let mut secret: Secret =
        serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    secret.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect::<BTreeMap<_, _>>(),
    );
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

async fn claim_with(ns: &TestNamespace, name: &str, class: &str, annotations: serde_json::Value) {
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": annotations },
        "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": "16Mi" } } },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
}

async fn class(
    admin: &Client,
    ns: &TestNamespace,
    suffix: &str,
    params: serde_json::Value,
) -> String {
    immediate_class(admin, &format!("{}-{suffix}", ns.name), DRIVER, params).await
}

#[tokio::test]
async fn secrets_follow_upstreams_rules_and_need_their_own_rbac() {
    let kubeconfig = bare_cluster("secret-rules", &[]);
    let admin = client_for_path(&kubeconfig).await;
    install_controller_identity(&kubeconfig);
    let dir = std::env::temp_dir().join(unique_name("stowage-secret-rules"));
    let (socket, kubelet) = (dir.join("csi.sock"), dir.join("kubelet"));
    std::fs::create_dir_all(&kubelet).unwrap();
    let server = csi_server(
        &socket,
        &dir.join("data"),
        &kubelet,
        "rules-node",
        &["--driver-name", DRIVER],
        "secret-rules-server",
    );
    let as_controller = account_kubeconfig(&kubeconfig, &admin, CONTROLLER_ACCOUNT).await;
    let controller = proxy_controller(
        &as_controller,
        DRIVER,
        &socket,
        &["--serve-local=false"],
        "secret-rules-controller",
    );
    let ns = TestNamespace::new_with(admin.clone(), "secret-rules").await;
    let password = unique_name("s3cret-value");
    secret(&ns, "creds", &[("password", password.as_bytes())]).await;

    annotations_name_secrets_once_reading_them_is_granted(&kubeconfig, &admin, &ns).await;
    every_refusal_names_what_to_fix(&admin, &ns).await;

    let log = controller.log();
    assert!(
        !log.contains(&password),
        "a secret value reached the controller's log"
    );
    controller.stop();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Names from claim annotations, for every call but the provisioner's;
/// without the optional manifest the claim says what to apply.
async fn annotations_name_secrets_once_reading_them_is_granted(
    kubeconfig: &std::path::Path,
    admin: &Client,
    ns: &TestNamespace,
) {
    let annotated = class(
        admin,
        ns,
        "annotated",
        json!({
            format!("{P}/provisioner-secret-name"): "creds",
            format!("{P}/provisioner-secret-namespace"): "${pvc.namespace}",
            format!("{P}/node-publish-secret-name"): "${pvc.annotations['example.com/publish']}",
            format!("{P}/node-publish-secret-namespace"): "${pvc.namespace}",
        }),
    )
    .await;
    claim_with(
        ns,
        "data",
        &annotated,
        json!({ "example.com/publish": "team-publish" }),
    )
    .await;
    // Without the optional manifest the claim says what to apply.
    explained(
        ns,
        "data",
        "ProvisioningFailed",
        &["manifests/optional/controller-secrets.yaml", "creds"],
    )
    .await;
    apply_manifest(kubeconfig, "optional/controller-secrets.yaml", &[]);
    let claims = ns.api::<PersistentVolumeClaim>();
    let uid = wait(&claims, "data", "Bound", is_bound)
        .await
        .unwrap()
        .uid()
        .unwrap();
    let pv = Api::<PersistentVolume>::all(admin.clone())
        .get(&format!("pvc-{uid}"))
        .await
        .unwrap();
    let publish = pv
        .spec
        .unwrap()
        .csi
        .unwrap()
        .node_publish_secret_ref
        .unwrap();
    assert_eq!(
        (publish.name.as_deref(), publish.namespace.as_deref()),
        (Some("team-publish"), Some(ns.name.as_str()))
    );
}

/// Each refusal names the parameter (or the Secret's key) to fix.
async fn every_refusal_names_what_to_fix(admin: &Client, ns: &TestNamespace) {
    let cases = [
        (
            "ns-from-claim",
            json!({
                format!("{P}/node-stage-secret-name"): "s",
                format!("{P}/node-stage-secret-namespace"): "${pvc.name}",
            }),
            json!({}),
            vec![
                format!("{P}/node-stage-secret-namespace"),
                "${pvc.name}".into(),
            ],
        ),
        (
            "provisioner-annotation",
            json!({
                format!("{P}/provisioner-secret-name"): "${pvc.annotations['example.com/p']}",
                format!("{P}/provisioner-secret-namespace"): "${pvc.namespace}",
            }),
            json!({ "example.com/p": "creds" }),
            vec![format!("{P}/provisioner-secret-name")],
        ),
        (
            "not-a-name",
            json!({
                format!("{P}/controller-publish-secret-name"): "${pvc.annotations['example.com/p']}",
                format!("{P}/controller-publish-secret-namespace"): "${pvc.namespace}",
            }),
            json!({ "example.com/p": "Not_A_Name" }),
            vec![
                format!("{P}/controller-publish-secret-name"),
                "Not_A_Name".into(),
                "DNS-1123".into(),
            ],
        ),
        (
            "binary",
            json!({
                format!("{P}/provisioner-secret-name"): "binary",
                format!("{P}/provisioner-secret-namespace"): ns.name,
            }),
            json!({}),
            vec!["\"key.der\"".into(), "not UTF-8".into()],
        ),
    ];
    secret(
        ns,
        "binary",
        &[("key.der", &[0x30, 0x82, 0xff, 0xfe]), ("ok", b"text")],
    )
    .await;
    for (name, params, annotations, words) in cases {
        let class = class(admin, ns, name, params).await;
        claim_with(ns, name, &class, annotations).await;
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        explained(ns, name, "ProvisioningFailed", &words).await;
    }
}
