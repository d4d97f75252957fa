//! stowage in place of external-provisioner and external-attacher for a
//! driver nobody here wrote: csi-driver-host-path's `hostpathplugin`
//! (`--enable-attach`, CSIDriver `attachRequired: true`), with
//! kube-controller-manager's attach-detach controller creating the
//! VolumeAttachments.
//!
//! The host-path test is ignored in `just test`: the Go module proxy refuses
//! github.com/kubernetes-csi/csi-driver-host-path, so no script of ours can
//! build it on a fresh machine. `just test-proxy /path/to/hostpathplugin`
//! runs it against a binary built from a checkout
//! (`go build -mod=vendor ./cmd/hostpathplugin`). The last test runs in
//! `just test`: the same proxy path against `stowage csi`'s socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass, VolumeAttachment};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::fixtures::{claim, gone, is_bound, wait, wait_for_event};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, csi_server, unique_name,
};

const DRIVER: &str = "hostpath.csi.k8s.io";
const NODE: &str = "hp-node";
const TOPOLOGY_KEY: &str = "topology.hostpath.csi/node";

struct Plugin {
    child: Child,
}

impl Plugin {
    fn start(binary: &Path, socket: &Path, state: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(binary)
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--drivername={DRIVER}"))
            .arg(format!("--nodeid={NODE}"))
            .arg(format!("--statedir={}", state.display()))
            .arg("--enable-attach")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        Plugin { child }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plugin_binary() -> PathBuf {
    let path = std::env::var("STOWAGE_HOSTPATHPLUGIN").unwrap_or_else(|_| {
        panic!(
            "set STOWAGE_HOSTPATHPLUGIN to a hostpathplugin binary (csi-driver-host-path's \
             cmd/hostpathplugin; the Go module proxy does not serve that module)"
        )
    });
    let path = PathBuf::from(path);
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

pub(crate) async fn apply<K>(api: &Api<K>, value: serde_json::Value)
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
fn proxy_controller(
    kubeconfig: &Path,
    driver: &str,
    socket: &Path,
    extra: &[&str],
    log_name: &str,
) -> Process {
    let endpoint = format!("{driver}=unix://{}", socket.display());
    let mut args = vec![
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
        "--csi-driver",
        &endpoint,
        "--csi-timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    Process::start(kubeconfig, &args, &[], log_name)
}

/// An `Immediate`, `Delete` StorageClass for `provisioner`; returns its name.
pub(crate) async fn immediate_class(
    client: &kube::Client,
    name: &str,
    provisioner: &str,
    parameters: serde_json::Value,
) -> String {
    apply(
        &Api::<StorageClass>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": { "name": name },
                "provisioner": provisioner, "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
                "parameters": parameters }),
    )
    .await;
    name.to_string()
}

/// The VolumeAttachment of `pv` once it reads attached.
async fn attached_va(vas: &Api<VolumeAttachment>, pv: &str) -> VolumeAttachment {
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

#[tokio::test]
#[ignore = "needs a hostpathplugin binary: run `just test-proxy PATH`"]
async fn provisions_attaches_detaches_and_deletes_through_the_host_path_driver() {
    let binary = plugin_binary();
    let kubeconfig = bare_cluster("proxy-driver", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let dir = std::env::temp_dir().join(unique_name("stowage-hostpath"));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("csi.sock");
    let state = dir.join("state");
    let mut plugin = Some(Plugin::start(&binary, &socket, &state));

    // What kubelet and the driver's deployment would have set up.
    apply(
        &Api::<CSIDriver>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": DRIVER },
                "spec": { "attachRequired": true, "podInfoOnMount": false } }),
    )
    .await;
    Api::<Node>::all(client.clone())
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": {
                "labels": { TOPOLOGY_KEY: NODE },
                "annotations": { "volumes.kubernetes.io/controller-managed-attach-detach": "true" },
            }})),
        )
        .await
        .unwrap();
    apply(
        &Api::<CSINode>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": { "name": NODE },
                "spec": { "drivers": [{ "name": DRIVER, "nodeID": NODE, "topologyKeys": [TOPOLOGY_KEY] }] } }),
    )
    .await;

    let controller = proxy_controller(&kubeconfig, DRIVER, &socket, &[], "proxy-controller");
    let ns = TestNamespace::new_with(client.clone(), "proxy").await;
    let class = immediate_class(&client, &format!("{}-hostpath", ns.name), DRIVER, json!({})).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    let uid = claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, "data", "Bound", is_bound).await;
    let pv_name = format!("pvc-{uid}");
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let pv = pvs.get(&pv_name).await.unwrap();
    let spec = pv.spec.clone().unwrap();
    let handle = spec.csi.as_ref().unwrap().volume_handle.clone();
    assert_eq!(spec.csi.as_ref().unwrap().driver, DRIVER);
    assert_ne!(handle, pv_name, "the driver's own volume ID");
    let affinity = serde_json::to_string(&spec.node_affinity).unwrap();
    assert!(affinity.contains(TOPOLOGY_KEY), "{affinity}");
    assert_eq!(pv.annotations()["pv.kubernetes.io/provisioned-by"], DRIVER);
    // Immediate: CreateVolume was asked for every segment the driver runs in.
    let volume = Api::<stowage::crd::Volume>::all(client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    assert_eq!(
        volume.spec.requisite_topology,
        vec![[(TOPOLOGY_KEY.to_string(), NODE.to_string())].into()]
    );

    // A pod on the node: kcm creates the VolumeAttachment, we attach it.
    let pods = ns.api::<Pod>();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "user" },
        "spec": { "containers": [{ "name": "c", "image": "none" }],
                  "volumes": [{ "name": "d", "persistentVolumeClaim": { "claimName": "data" } }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let vas = Api::<VolumeAttachment>::all(client.clone());
    let attached = attached_va(&vas, &pv_name).await;
    assert_eq!(attached.spec.node_name, NODE);
    assert!(
        attached
            .finalizers()
            .contains(&"external-attacher/hostpath-csi-k8s-io".to_string())
    );
    assert_eq!(
        attached.annotations()["csi.alpha.kubernetes.io/node-id"],
        NODE
    );
    let pv = pvs.get(&pv_name).await.unwrap();
    assert!(
        pv.finalizers()
            .contains(&"external-attacher/hostpath-csi-k8s-io".to_string())
    );

    // The pod goes: kcm deletes the VolumeAttachment once we detached it.
    pods.delete("user", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait(&pods, "user", "deleted", gone).await;
    wait(&vas, &attached.name_any(), "detached and deleted", gone).await;

    // The node goes while the volume is attached there: we detach it.
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("again".into()),
            ..Default::default()
        },
        ..pod
    };
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let again = attached_va(&vas, &pv_name).await;
    Api::<Node>::all(client.clone())
        .delete(NODE, &DeleteParams::default())
        .await
        .unwrap();
    wait(
        &vas,
        &again.name_any(),
        "detached after its node went",
        gone,
    )
    .await;
    pods.delete("again", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();

    // The claim goes: DeleteVolume, then the PV.
    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pvs, &pv_name, "deleted", gone).await;
    assert!(
        !holds(&state, &handle),
        "the driver still holds volume {handle}"
    );

    // The driver away for a while: a clear event, then recovery on its own.
    drop(plugin.take());
    claim(&ns, "later", &class, "16Mi", &["ReadWriteOnce"]).await;
    let note = wait_for_event(&ns, "later", "ProvisioningFailed").await;
    assert!(note.contains("not answering"), "{note}");
    plugin = Some(Plugin::start(&binary, &socket, &state));
    wait(&claims, "later", "Bound", is_bound).await;
    claims
        .delete("later", &DeleteParams::default())
        .await
        .unwrap();
    controller.stop();
    drop(plugin);
    let _ = std::fs::remove_dir_all(&dir);
}

pub(crate) fn holds(dir: &Path, handle: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name().to_string_lossy().contains(handle)
                || (e.path().is_dir() && holds(&e.path(), handle))
        })
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
    let controller = proxy_controller(
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
