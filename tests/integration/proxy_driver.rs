//! The proxy backend in `just test` against `stowage csi`'s socket, and the
//! helpers the proxy tests share. proxy_attach.rs drives a driver written
//! elsewhere (Kubernetes' CSI mock driver, or csi-driver-host-path) through
//! provisioning, attach and detach.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttachment};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::external_driver::holds;
use crate::fixtures::{claim, gone, is_bound, wait, wait_for_event};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, csi_server, free_port, unique_name,
};
use crate::metrics::scrape_until;

pub async fn apply<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.patch(
        &object.name_any(),
        &PatchParams::apply("stowage-test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap();
}

/// `stowage controller --csi-driver DRIVER=unix://SOCKET` with a short
/// call deadline, and `extra` arguments.
pub fn proxy_controller(
    kubeconfig: &Path,
    driver: &str,
    socket: &Path,
    extra: &[&str],
    log_name: &str,
) -> Process {
    proxy_controller_with_metrics(kubeconfig, driver, socket, extra, log_name).0
}

/// `proxy_controller`, and the URL of its `/metrics`.
pub fn proxy_controller_with_metrics(
    kubeconfig: &Path,
    driver: &str,
    socket: &Path,
    extra: &[&str],
    log_name: &str,
) -> (Process, String) {
    let endpoint = format!("{driver}=unix://{}", socket.display());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        &addr,
        "--csi-driver",
        &endpoint,
        "--csi-timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    let controller = Process::start(kubeconfig, &args, &[], log_name);
    (controller, format!("http://{addr}/metrics"))
}

/// `csi_sidecar_operations_seconds_count` of one driver, method and code.
pub(crate) fn csi_calls(driver: &str, method: &str, code: &str) -> String {
    format!(
        "csi_sidecar_operations_seconds_count{{driver_name=\"{driver}\",method_name=\"/csi.v1.{method}\",grpc_status_code=\"{code}\"}}"
    )
}

/// An `Immediate`, `Delete` StorageClass for `provisioner`; returns its name.
pub async fn immediate_class(
    client: &kube::Client,
    name: &str,
    provisioner: &str,
    parameters: serde_json::Value,
) -> String {
    driver_class(client, name, provisioner, "Immediate", parameters).await
}

/// A `Delete` StorageClass for `provisioner` binding as `mode`; returns
/// its name.
pub async fn driver_class(
    client: &kube::Client,
    name: &str,
    provisioner: &str,
    mode: &str,
    parameters: serde_json::Value,
) -> String {
    apply(
        &Api::<StorageClass>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": { "name": name },
                "provisioner": provisioner, "volumeBindingMode": mode, "reclaimPolicy": "Delete",
                "parameters": parameters }),
    )
    .await;
    name.to_string()
}

/// The VolumeAttachment of `pv` once it reads attached.
pub async fn attached_va(vas: &Api<VolumeAttachment>, pv: &str) -> VolumeAttachment {
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let list = vas.list(&ListParams::default()).await.unwrap();
            if let Some(va) = list.items.into_iter().find(|v| {
                v.spec.source.persistent_volume_name.as_deref() == Some(pv)
                    && v.status.as_ref().is_some_and(|s| s.attached)
            }) {
                return va;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no VolumeAttachment of {pv} attached within 120s"))
}

/// `stowage csi` under a name of its own, so that the controller treats it
/// as any other driver.
pub(crate) const SOCKET_DRIVER: &str = "socket.stowage.dev";

/// The proxy backend in `just test`: a controller that serves no built-in
/// driver (`--serve-local=false`) provisions and deletes through a CSI
/// controller socket, here `stowage csi --driver-name socket.stowage.dev`,
/// and rides out the socket's absence.
#[tokio::test]
async fn provisions_and_deletes_through_a_csi_socket_and_waits_out_its_absence() {
    let kubeconfig = bare_cluster("proxy-csi", &[]);
    let client = client_for_path(&kubeconfig).await;
    let dir = std::env::temp_dir().join(unique_name("stowage-proxy-csi"));
    let (socket, data, kubelet) = (dir.join("csi.sock"), dir.join("data"), dir.join("kubelet"));
    std::fs::create_dir_all(&kubelet).unwrap();
    let server = csi_server(
        &socket,
        &data,
        &kubelet,
        "csi-node",
        &["--driver-name", SOCKET_DRIVER],
        "proxy-csi-server",
    );
    apply(
        &Api::<CSIDriver>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": SOCKET_DRIVER },
                "spec": { "attachRequired": false, "podInfoOnMount": false } }),
    )
    .await;
    let (controller, metrics) = proxy_controller_with_metrics(
        &kubeconfig,
        SOCKET_DRIVER,
        &socket,
        &["--serve-local=false"],
        "proxy-csi-controller",
    );
    let ns = TestNamespace::new_with(client.clone(), "proxy-csi").await;
    let class = immediate_class(
        &client,
        &format!("{}-socket", ns.name),
        SOCKET_DRIVER,
        json!({ "layout": "dir" }),
    )
    .await;
    let claims = ns.api::<PersistentVolumeClaim>();
    let uid = claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, "data", "Bound", is_bound).await;
    let pv_name = format!("pvc-{uid}");
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let spec = pvs.get(&pv_name).await.unwrap().spec.unwrap();
    let csi = spec.csi.as_ref().unwrap();
    assert_eq!(csi.driver, SOCKET_DRIVER);
    assert_eq!(
        csi.volume_attributes.as_ref().unwrap()["layout"],
        "dir",
        "the driver's volume context"
    );
    let affinity = serde_json::to_string(&spec.node_affinity).unwrap();
    assert!(
        affinity.contains("csi-node"),
        "the driver's topology: {affinity}"
    );
    let handle = csi.volume_handle.clone();
    assert!(
        holds(&data, &handle),
        "no data for {handle} under {}",
        data.display()
    );
    let volume = Api::<stowage::crd::Volume>::all(client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    assert_eq!(
        volume.status.unwrap().volume_handle.as_deref(),
        Some(handle.as_str())
    );

    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pvs, &pv_name, "deleted", gone).await;
    assert!(
        !holds(&data, &handle),
        "DeleteVolume never reached the driver"
    );
    // Every call counted as the sidecars count it, for their dashboards.
    for method in [
        "Identity/GetPluginInfo",
        "Identity/GetPluginCapabilities",
        "Controller/ControllerGetCapabilities",
        "Controller/CreateVolume",
    ] {
        scrape_until(&metrics, &csi_calls(SOCKET_DRIVER, method, "OK"), |n| {
            n >= 1.0
        })
        .await;
    }
    scrape_until(
        &metrics,
        &csi_calls(SOCKET_DRIVER, "Controller/DeleteVolume", "OK"),
        |n| n >= 1.0,
    )
    .await;

    // --serve-local=false: a local.stowage.dev claim is not this
    // controller's. Serving it, it would write a Volume for it (or fail
    // for want of node agents, with an event).
    let local = immediate_class(
        &client,
        &format!("{}-local", ns.name),
        "local.stowage.dev",
        json!({}),
    )
    .await;
    let uid = claim(&ns, "not-ours", &local, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    // Watch events arrive in order: once a claim made after it is Bound,
    // the controller has seen this one and had time to act on it.
    claim(&ns, "after", &class, "16Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "after", "Bound", is_bound).await;
    let volume = Api::<stowage::crd::Volume>::all(client.clone())
        .get_opt(&format!("pvc-{uid}"))
        .await
        .unwrap();
    assert!(volume.is_none(), "provisioned a local claim: {volume:?}");
    // This cluster runs no kcm binder: any event on the claim is ours.
    let events = crate::fixtures::events(&ns, "not-ours").await;
    assert!(events.is_empty(), "acted on a local claim: {events:?}");

    // The socket goes away: a clear event, then recovery on its own.
    server.stop();
    claim(&ns, "later", &class, "16Mi", &["ReadWriteOnce"]).await;
    let note = wait_for_event(&ns, "later", "ProvisioningFailed").await;
    assert!(note.contains("not answering"), "{note}");
    let unavailable = csi_calls(SOCKET_DRIVER, "Controller/CreateVolume", "Unavailable");
    scrape_until(&metrics, &unavailable, |n| n >= 1.0).await;
    assert!(
        note.contains(&socket.display().to_string()),
        "names the socket: {note}"
    );
    let server = csi_server(
        &socket,
        &data,
        &kubelet,
        "csi-node",
        &["--driver-name", SOCKET_DRIVER],
        "proxy-csi-server",
    );
    wait(&claims, "later", "Bound", is_bound).await;
    let later = claims
        .get("later")
        .await
        .unwrap()
        .spec
        .unwrap()
        .volume_name
        .unwrap();
    claims
        .delete("later", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pvs, &later, "deleted", gone).await;
    controller.stop();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
