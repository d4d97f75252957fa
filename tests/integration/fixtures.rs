//! Objects and waits the integration tests share.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{ListParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Resource};
use serde_json::json;

use crate::harness::TestNamespace;

/// Generous: several control planes start at once on a 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(120);

pub async fn storage_class(
    client: &Client,
    name: &str,
    binding_mode: &str,
    reclaim: &str,
    params: &[(&str, &str)],
) -> StorageClass {
    let params: BTreeMap<_, _> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": name },
        "provisioner": "local.stowage.dev",
        "volumeBindingMode": binding_mode,
        "reclaimPolicy": reclaim,
        "parameters": params,
        "mountOptions": ["noatime"],
    }))
    .unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("creating class")
}

pub async fn claim(
    ns: &TestNamespace,
    name: &str,
    class: &str,
    size: &str,
    modes: &[&str],
) -> PersistentVolumeClaim {
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "storageClassName": class,
            "accessModes": modes,
            "resources": { "requests": { "storage": size } },
        },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await
        .expect("creating claim")
}

/// A busybox pod that runs `script` once, with `claim` mounted at /data.
pub fn pod(name: &str, claim: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
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

pub fn phase(p: Option<&Pod>) -> Option<String> {
    p.and_then(|p| p.status.as_ref()?.phase.clone())
}

pub async fn wait<K>(api: &Api<K>, name: &str, what: &str, cond: impl Condition<K>) -> Option<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    tokio::time::timeout(TIMEOUT, await_condition(api.clone(), name, cond))
        .await
        .unwrap_or_else(|_| panic!("{name}: not {what} after {TIMEOUT:?}"))
        .expect("watching")
}

pub fn is_bound(c: Option<&PersistentVolumeClaim>) -> bool {
    c.and_then(|c| c.status.as_ref()?.phase.as_deref()) == Some("Bound")
}

pub fn gone<K>(o: Option<&K>) -> bool {
    o.is_none()
}

/// Events about `name` in the namespace, as `kubectl describe` shows them.
pub async fn events(ns: &TestNamespace, name: &str) -> Vec<(String, String)> {
    events_from(ns, name, None).await
}

/// Events about `name`, only those `reporter` posted when given.
async fn events_from(
    ns: &TestNamespace,
    name: &str,
    reporter: Option<&str>,
) -> Vec<(String, String)> {
    let list = ns
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .expect("listing events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| reporter.is_none() || e.reporting_controller.as_deref() == reporter)
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Waits for an event `reason` about `name` (events are posted after the
/// change they describe); returns its note.
/// The CSI volume handle of PersistentVolume `pv`.
pub async fn volume_handle(client: &Client, pv: &str) -> String {
    let pv = Api::<PersistentVolume>::all(client.clone()).get(pv).await;
    pv.unwrap().spec.unwrap().csi.unwrap().volume_handle
}

pub async fn wait_for_event(ns: &TestNamespace, name: &str, reason: &str) -> String {
    wait_for_event_from(ns, name, reason, None).await
}

/// Waits for an event `reason` about `name` whose note contains `part`
/// (earlier events of that reason may say something else); returns it.
pub async fn wait_for_note(ns: &TestNamespace, name: &str, reason: &str, part: &str) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let events = events_from(ns, name, None).await;
        let found = events.iter().find(|(r, n)| r == reason && n.contains(part));
        if let Some((_, note)) = found {
            return note.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event on {name} saying {part:?}: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// As wait_for_event, for an event stowage's controller posted (kcm's PV
/// binder posts some of the same reasons).
pub async fn wait_for_stowage_event(ns: &TestNamespace, name: &str, reason: &str) -> String {
    wait_for_event_from(ns, name, reason, Some("stowage-controller")).await
}

async fn wait_for_event_from(
    ns: &TestNamespace,
    name: &str,
    reason: &str,
    reporter: Option<&str>,
) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let events = events_from(ns, name, reporter).await;
        if let Some((_, note)) = events.iter().find(|(r, _)| r == reason) {
            return note.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event on {name} from {}: {events:?}",
            reporter.unwrap_or("anyone")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubectl exec POD -- /bin/sh -c SCRIPT` in the namespace (through the API
/// server to kubelet, as users do); returns its stdout, fails on a non-zero
/// exit.
pub fn exec(kubeconfig: &std::path::Path, ns: &TestNamespace, pod: &str, script: &str) -> String {
    let out = std::process::Command::new(crate::harness::upstream_binary("kubectl"))
        .env("KUBECONFIG", kubeconfig)
        .args(["exec", "-n", &ns.name, pod, "--", "/bin/sh", "-c", script])
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl exec {pod} -- {script:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
