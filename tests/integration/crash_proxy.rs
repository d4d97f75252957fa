//! The proxy backend's crash points: the controller dies right after a CSI
//! driver's CreateVolume succeeded (before the Volume records the handle),
//! and right after its DeleteVolume succeeded (before the Volume's
//! finalizer comes off). The driver is `stowage csi` on a unix socket, so
//! what it holds is visible in its data directory.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::{VOLUME_FINALIZER, Volume};

use crate::crash::{Armed, assert_image, files_for, objects_for_claim};
use crate::fixtures::{claim, gone, is_bound, wait};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, csi_server, unique_name,
};
use crate::proxy_driver::{SOCKET_DRIVER, apply, immediate_class};

/// `stowage controller` for the socket driver alone.
pub fn proxy_controller(kubeconfig: &Path, socket: &Path, env: &[(&str, &str)]) -> Process {
    let endpoint = format!("{SOCKET_DRIVER}=unix://{}", socket.display());
    let args = [
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
        "--serve-local=false",
        "--csi-driver",
        &endpoint,
        "--csi-timeout",
        "5s",
    ];
    Process::start(kubeconfig, &args, env, "crash-proxy-controller")
}

/// `stowage csi` serving SOCKET_DRIVER on a unix socket, with its CSIDriver:
/// what it holds is files under `data`.
pub struct SocketDriver {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub server: Process,
}

impl SocketDriver {
    pub async fn start(client: &kube::Client, name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(&format!("stowage-{name}")));
        let (socket, data, kubelet) = (dir.join("csi.sock"), dir.join("data"), dir.join("kubelet"));
        std::fs::create_dir_all(&kubelet).unwrap();
        let driver_args = ["--driver-name", SOCKET_DRIVER];
        let log = format!("{name}-csi");
        let server = csi_server(&socket, &data, &kubelet, "csi-node", &driver_args, &log);
        apply(
            &Api::<CSIDriver>::all(client.clone()),
            json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": SOCKET_DRIVER },
                    "spec": { "attachRequired": false, "podInfoOnMount": false } }),
        )
        .await;
        SocketDriver {
            dir,
            socket,
            data,
            server,
        }
    }
}

#[tokio::test]
async fn proxy_killed_after_create_or_delete_volume_leaks_nothing() {
    let kubeconfig = bare_cluster("crash-proxy", &[]);
    let client = client_for_path(&kubeconfig).await;
    let SocketDriver {
        dir,
        socket,
        data,
        server,
    } = SocketDriver::start(&client, "crash-proxy").await;
    let ns = TestNamespace::new_with(client.clone(), "crash-proxy").await;
    let class = format!("{}-socket", ns.name);
    immediate_class(&client, &class, SOCKET_DRIVER, json!({})).await;
    let volumes_dir = data.join("volumes");

    let created = Armed::new("controller-after-create-volume");
    let mut ctl = proxy_controller(&kubeconfig, &socket, &created.env());
    let uid = claim(&ns, "data", &class, "20000Ki", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let created_log = created.assert_fired(&mut ctl).await;
    let name = format!("pvc-{uid}");
    let volumes = Api::<Volume>::all(client.clone());
    let volume = volumes.get(&name).await.unwrap();
    let handle = volume.status.and_then(|s| s.volume_handle);
    assert_eq!(
        handle, None,
        "the crash came before the handle was recorded"
    );
    let image = volumes_dir.join(format!("{name}.img"));
    assert!(
        image.exists(),
        "the driver created nothing before the crash"
    );

    // The restarted controller is armed for the way out: provisioning
    // must not pass through that point.
    let deleted = Armed::new("controller-after-delete-volume");
    let mut ctl = proxy_controller(&kubeconfig, &socket, &deleted.env());
    let claims = ns.api::<PersistentVolumeClaim>();
    wait(&claims, "data", "Bound after the restart", is_bound).await;
    assert_eq!(objects_for_claim(&client, &uid).await, (1, 1));
    assert_eq!(files_for(&volumes_dir, &uid), [format!("{name}.img")]);
    assert_image(&image, 20 << 20, "ext4", "created through the proxy");

    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    let deleted_log = deleted.assert_fired(&mut ctl).await;
    assert!(!image.exists(), "DeleteVolume did not reach the driver");
    let volume = volumes.get(&name).await.unwrap();
    let held = volume.finalizers().iter().any(|f| f == VOLUME_FINALIZER);
    assert!(held, "the crash came before the finalizer went: {volume:?}");

    let ctl = proxy_controller(&kubeconfig, &socket, &[]);
    let pvs = Api::<PersistentVolume>::all(client.clone());
    wait(&volumes, &name, "deleted after the restart", gone).await;
    wait(&pvs, &name, "deleted after the restart", gone).await;
    assert_eq!(objects_for_claim(&client, &uid).await, (0, 0));
    let left = files_for(&volumes_dir, &uid);
    assert!(left.is_empty(), "left in the driver: {left:?}");
    created_log.assert_kept();
    deleted_log.assert_kept();
    ctl.stop();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
