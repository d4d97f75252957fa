//! A CSI driver that accepts connections and never answers (hung, not
//! gone): the README promises that each call gives up after
//! `--csi-timeout`, that the claim gets a `ProvisioningFailed` event saying
//! the driver at that socket is not answering, and that the claim is
//! provisioned without user action once the driver answers again. The
//! socket-gone case is proxy_driver's
//! provisions_and_deletes_through_a_csi_socket_and_waits_out_its_absence.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::Api;
use serde_json::json;

use crate::external_driver::holds;
use crate::fixtures::{claim, is_bound, wait, wait_for_event};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, csi_server, unique_name,
};
use crate::proxy_driver::{SOCKET_DRIVER, apply, immediate_class};

/// Listens on `socket`, accepts every connection and holds it open without
/// reading or writing a byte, until the task is aborted (which closes them).
fn hung_driver(socket: &Path) -> tokio::task::JoinHandle<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            held.push(conn);
        }
    })
}

/// A controller that serves only SOCKET_DRIVER, at `socket`, giving up on
/// each call after 2 s.
fn controller(kubeconfig: &Path, socket: &Path) -> Process {
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
        "2s",
    ];
    Process::start(kubeconfig, &args, &[], "hung-driver-controller")
}

#[tokio::test]
async fn a_hung_driver_times_out_with_an_event_and_recovers_on_its_own() {
    let kubeconfig = bare_cluster("hung-driver", &[]);
    let client = client_for_path(&kubeconfig).await;
    let dir = std::env::temp_dir().join(unique_name("stowage-hung"));
    let (socket, data, kubelet) = (dir.join("csi.sock"), dir.join("data"), dir.join("kubelet"));
    std::fs::create_dir_all(&kubelet).unwrap();
    let hung = hung_driver(&socket);
    apply(
        &Api::<CSIDriver>::all(client.clone()),
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": SOCKET_DRIVER },
                "spec": { "attachRequired": false, "podInfoOnMount": false } }),
    )
    .await;
    let controller = controller(&kubeconfig, &socket);
    let ns = TestNamespace::new_with(client.clone(), "hung").await;
    let class = immediate_class(
        &client,
        &format!("{}-hung", ns.name),
        SOCKET_DRIVER,
        json!({ "layout": "dir" }),
    )
    .await;

    let created = Instant::now();
    claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"]).await;
    let note = wait_for_event(&ns, "data", "ProvisioningFailed").await;
    let waited = created.elapsed();
    assert!(note.contains("not answering"), "{note}");
    assert!(
        note.contains(&socket.display().to_string()),
        "names the socket: {note}"
    );
    // The first call cannot give up before the deadline, and must not wait
    // much longer than it (the event is written right after).
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "ProvisioningFailed after {waited:?} with --csi-timeout 2s"
    );

    // The driver comes back (hung process replaced by a working one).
    hung.abort();
    let _ = hung.await;
    let server = csi_server(
        &socket,
        &data,
        &kubelet,
        "csi-node",
        &["--driver-name", SOCKET_DRIVER],
        "hung-driver-server",
    );
    let claims = ns.api::<PersistentVolumeClaim>();
    let bound = wait(&claims, "data", "Bound", is_bound).await.unwrap();
    let pv = bound.spec.unwrap().volume_name.unwrap();
    let handle = crate::fixtures::volume_handle(&client, &pv).await;
    assert!(
        holds(&data, &handle),
        "no data for {handle}: not the new driver's volume"
    );
    controller.stop();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
