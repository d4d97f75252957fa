//! `stowage node`'s one socket, driven as kubelet drives it: plugin
//! registration, then CSI Identity and Node on the same socket, on a volume
//! the controller provisioned; path traversal refused; a restart of the
//! agent leaves mounts working.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::runtime::wait::await_condition;
use stowage::proto::csi::v1 as csi;
use stowage::proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use stowage::proto::pluginregistration as reg;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, free_port, http_get, unique_name,
};

const NODE: &str = "socket-node";

pub(crate) async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connecting to the node socket")
}

async fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never appeared", path.display());
}

/// GetInfo exactly as kubelet's plugin watcher sends it: grpc-go dialing a
/// bare socket path puts that path, percent-encoded, in `:authority`, which
/// no Rust HTTP/2 client will produce, so the frames are written by hand.
async fn get_info_as_kubelet(socket: &Path) -> reg::PluginInfo {
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let authority: String = socket.to_str().unwrap().replace('/', "%2F");
    let headers = fluke_hpack::Encoder::new().encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/pluginregistration.Registration/GetInfo"),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]);
    let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &headers)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // DATA: empty InfoRequest, END_STREAM
    conn.write_all(&out).await.unwrap();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head)
            .await
            .expect("server closed before answering");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await.unwrap();
        match head[3] {
            0x3 => panic!("stream reset, error code {:?}", &payload),
            0x4 if head[4] & 0x1 == 0 => conn.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
            0x0 if payload.len() >= 5 => return reg::PluginInfo::decode(&payload[5..]).unwrap(),
            _ => {}
        }
    }
}

fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

#[tokio::test]
async fn kubelet_registers_and_stages_publishes_through_one_socket() {
    let kubeconfig = bare_cluster("socket", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "socket").await;
    let data = std::env::temp_dir().join(unique_name("stowage-socket"));
    let kubelet = data.join("kubelet");
    let data_arg = data.to_str().unwrap().to_string();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let node_args = [
        "node",
        "--node-name",
        NODE,
        "--data-dir",
        &data_arg,
        "--capacity",
        "1Gi",
        "--metrics-addr",
        &metrics_addr,
    ];
    let mut agent = Process::start(&kubeconfig, &node_args, &[], "socket-node");
    let controller = Process::controller(&kubeconfig, "socket-controller");
    let socket = kubelet.join("plugins_registry/local.stowage.dev-reg.sock");
    wait_for(&socket).await;
    let channel = connect(&socket).await;

    // What kubelet's plugin watcher does first, with its odd :authority.
    let info = get_info_as_kubelet(&socket).await;
    assert_eq!(
        (info.r#type.as_str(), info.name.as_str()),
        ("CSIPlugin", "local.stowage.dev")
    );
    let mut registration = reg::registration_client::RegistrationClient::new(channel.clone());
    let info = registration
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "local.stowage.dev");
    assert_eq!(
        info.endpoint, "",
        "empty endpoint: kubelet uses this same socket"
    );
    assert!(info.supported_versions.contains(&"1.0.0".to_string()));
    registration
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let (status, metrics) = http_get(&format!("http://{metrics_addr}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("stowage_node_kubelet_registered 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "\nstowage_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            stowage::telemetry::VERSION,
            stowage::telemetry::COMMIT
        )),
        "{metrics}"
    );
    let (status, _) = http_get(&format!("http://{metrics_addr}/healthz")).await;
    assert_eq!(status, 200, "/healthz of a registered node agent");

    // Then CSI on the same socket.
    let mut identity = csi::identity_client::IdentityClient::new(channel.clone());
    let plugin = identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.name, "local.stowage.dev");
    assert_eq!(
        identity
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let mut node = csi::node_client::NodeClient::new(channel);
    let info = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.stowage.dev/node"],
        NODE
    );

    // A real volume, provisioned through the cluster.
    let class = format!("{}-c", ns.name);
    crate::fixtures::storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    crate::fixtures::claim(&ns, "data", &class, "20Mi", &["ReadWriteOnce"]).await;
    let bound = await_condition(
        ns.api::<PersistentVolumeClaim>(),
        "data",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.spec.as_ref()?.volume_name.as_deref())
                .is_some()
        },
    );
    let claim = tokio::time::timeout(Duration::from_secs(60), bound)
        .await
        .expect("claim bound")
        .unwrap()
        .unwrap();
    let pv_name = claim.spec.unwrap().volume_name.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    let volume_id = pv.spec.unwrap().csi.unwrap().volume_handle;

    let staging = kubelet.join(format!(
        "plugins/kubernetes.io/csi/local.stowage.dev/{pv_name}/globalmount"
    ));
    let target = kubelet.join(format!(
        "pods/pod-uid/volumes/kubernetes.io~csi/{pv_name}/mount"
    ));
    let stage = |volume_id: &str, staging: &Path| csi::NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.to_str().unwrap().into(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    };
    let publish = |target: &Path| csi::NodePublishVolumeRequest {
        volume_id: volume_id.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    };

    // Traversal attempts: refused, and nothing created or mounted.
    let err = node
        .node_stage_volume(stage("../../etc", &staging))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let escape = PathBuf::from("/tmp").join(unique_name("stowage-escape"));
    let err = node
        .node_publish_volume(publish(&escape))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!escape.exists(), "{} was created", escape.display());
    let outside = std::env::temp_dir().join(unique_name("stowage-outside"));
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(kubelet.join("pods")).unwrap();
    std::os::unix::fs::symlink(&outside, kubelet.join("pods/link")).unwrap();
    let err = node
        .node_stage_volume(stage(&volume_id, &kubelet.join("pods/link/globalmount")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "something was made outside the kubelet dir"
    );

    // Stage and publish, twice each: the second call finds the work done.
    for _ in 0..2 {
        node.node_stage_volume(stage(&volume_id, &staging))
            .await
            .expect("staging");
        node.node_publish_volume(publish(&target))
            .await
            .expect("publishing");
    }
    assert!(is_mounted(&staging) && is_mounted(&target));
    std::fs::write(target.join("hello"), "written through the pod mount").unwrap();
    let stats = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume_id.clone(),
            volume_path: target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert!(bytes.total > 10 << 20 && bytes.used > 0, "{bytes:?}");
    assert!(
        stats
            .usage
            .iter()
            .any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32 && u.used > 0)
    );
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Restart the agent: the mounts stay, and it picks up where it was.
    agent.stop();
    assert!(
        is_mounted(&target),
        "stopping the agent unmounted the pod's volume"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("hello")).unwrap(),
        "written through the pod mount"
    );
    agent = Process::start(&kubeconfig, &node_args, &[], "socket-node");
    wait_for(&socket).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut node = csi::node_client::NodeClient::new(connect(&socket).await);
    node.node_publish_volume(publish(&target))
        .await
        .expect("publish after restart");

    // Tear down, twice each, leaving no mount and no loop device.
    for _ in 0..2 {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            target_path: target.to_str().unwrap().into(),
        })
        .await
        .expect("unpublishing");
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging.to_str().unwrap().into(),
        })
        .await
        .expect("unstaging");
    }
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    assert!(!target.exists(), "target path left behind");
    let image = data.join(format!("volumes/{volume_id}.img"));
    let mut loops = String::new();
    for _ in 0..50 {
        loops = String::from_utf8_lossy(
            &std::process::Command::new("losetup")
                .arg("-a")
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        if !loops.contains(image.to_str().unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !loops.contains(image.to_str().unwrap()),
        "loop device left: {loops}"
    );

    agent.stop();
    assert!(!socket.exists(), "socket left behind after shutdown");
    controller.stop();
    let _ = std::fs::remove_dir_all(&outside);
    let _ = std::fs::remove_dir_all(&data);
}
