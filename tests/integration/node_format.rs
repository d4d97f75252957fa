//! NodeStage never formats on doubt, on real loop devices and the real
//! blkid: a blkid that fails, a device with two filesystem signatures, and
//! a filesystem of another type than the one asked for each end in
//! FailedPrecondition saying what to do, with the image left exactly as it
//! was, nothing mounted and no loop device kept.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use stowage::proto::csi::v1 as csi;
use stowage::proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use tonic::Code;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use crate::csi_node::{CsiNode, MIB, loops_of, mounts_at, tool, wait_until};
use crate::fixtures::{claim, is_bound, storage_class, volume_handle, wait, wait_for_event};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, unique_name, wait_for_storage_nodes,
};
use crate::node_socket::connect;

fn mount_capability(fs_type: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// A volume created as CreateVolume makes it: raw for block, formatted as
/// `fs_type` otherwise.
async fn create(csi: &mut CsiNode, id: &str, bytes: i64, fs_type: Option<&str>) {
    let capability = match fs_type {
        Some(fs) => mount_capability(fs),
        None => csi::VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            ..mount_capability("")
        },
    };
    csi.controller
        .create_volume(csi::CreateVolumeRequest {
            name: id.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability],
            parameters: fs_type
                .map(|fs| [("fsType".to_string(), fs.to_string())].into())
                .unwrap_or_default(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume");
}

async fn stage_as(csi: &mut CsiNode, id: &str, fs_type: &str) -> Result<(), tonic::Status> {
    let mut request = csi.stage_request(id);
    request.volume_capability = Some(mount_capability(fs_type));
    csi.node.node_stage_volume(request).await.map(drop)
}

/// A fingerprint of every byte of a file.
fn digest(path: &Path) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// `blkid -p` on an image: its exit status and what it printed.
fn blkid(image: &Path) -> (Option<i32>, String) {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(image)
        .output()
        .expect("running blkid; install util-linux");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.code(), text)
}

/// The refused stage left nothing behind and changed no byte.
async fn assert_untouched(csi: &CsiNode, id: &str, before: u64) {
    let image = csi.image(id);
    wait_until("the refused device's loop device let go", || {
        loops_of(&image).is_empty()
    })
    .await;
    assert_eq!(mounts_at(&csi.staging(id)), 0, "a refused stage mounted");
    assert_eq!(
        digest(&image),
        before,
        "the refused stage changed the image"
    );
}

fn failing_blkid(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("blkid");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'blkid: simulated read error on the device' >&2\nexit 4\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A raw volume (as a block volume is created) staged for a filesystem is
/// formatted only when blkid says it holds nothing; a blkid that fails
/// leaves it unformatted, and the same call succeeds once blkid works.
#[tokio::test]
async fn a_failing_blkid_formats_nothing() {
    let tools = std::env::temp_dir().join(unique_name("stowage-fake-blkid"));
    failing_blkid(&tools);
    let mut csi = CsiNode::start_with_tools("node-format-blkid", &[], Some(&tools)).await;
    let id = "doubt";
    create(&mut csi, id, 32 * MIB, None).await;
    let image = csi.image(id);
    assert_eq!(blkid(&image).0, Some(2), "a block volume starts raw");
    let before = digest(&image);

    let err = stage_as(&mut csi, id, "ext4").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("exit status 4")
            && err.message().contains("simulated read error")
            && err.message().contains("refusing to format"),
        "{}",
        err.message()
    );
    assert_untouched(&csi, id, before).await;
    assert_eq!(blkid(&image).0, Some(2), "formatted despite the failure");

    std::fs::remove_file(tools.join("blkid")).unwrap();
    stage_as(&mut csi, id, "ext4")
        .await
        .expect("stage once blkid works");
    assert_eq!(
        tool(
            "findmnt",
            &["-no", "FSTYPE", csi.staging(id).to_str().unwrap()]
        )
        .trim(),
        "ext4"
    );
    csi.unstage(id).await;
    csi.finish().await;
    let _ = std::fs::remove_dir_all(&tools);
}

/// An ext4 image with an xfs superblock written over its first sector:
/// blkid -p finds both and exits 8. Neither is trusted.
#[tokio::test]
async fn two_signatures_are_refused() {
    let mut csi = CsiNode::start("node-format-ambivalent", &[]).await;
    let id = "twofs";
    create(&mut csi, id, 32 * MIB, Some("ext4")).await;
    let image = csi.image(id);
    let donor = image.with_file_name("donor.xfs");
    let file = std::fs::File::create(&donor).unwrap();
    file.set_len(300 * MIB as u64).unwrap();
    tool("mkfs.xfs", &["-q", donor.to_str().unwrap()]);
    // xfs keeps its superblock in sector 0, which ext4 leaves unused.
    tool(
        "dd",
        &[
            &format!("if={}", donor.display()),
            &format!("of={}", image.display()),
            "bs=512",
            "count=1",
            "conv=notrunc",
        ],
    );
    std::fs::remove_file(&donor).unwrap();
    assert_eq!(
        blkid(&image).0,
        Some(8),
        "the image should carry two signatures"
    );
    let before = digest(&image);

    for fs in ["ext4", "xfs"] {
        let err = stage_as(&mut csi, id, fs).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{fs}: {err:?}");
        assert!(
            err.message().contains("more than one signature")
                && err.message().contains("wipefs --no-act"),
            "{}",
            err.message()
        );
        assert_untouched(&csi, id, before).await;
    }
    assert_eq!(blkid(&image).0, Some(8));
    csi.finish().await;
}

/// An xfs volume staged as ext4 is refused naming both types; its data is
/// still there when it is staged as xfs again.
#[tokio::test]
async fn a_filesystem_of_another_type_is_refused() {
    let mut csi = CsiNode::start("node-format-foreign", &[]).await;
    let id = "foreign";
    create(&mut csi, id, 300 * MIB, Some("xfs")).await;
    stage_as(&mut csi, id, "xfs").await.expect("staging as xfs");
    std::fs::write(csi.staging(id).join("kept"), "xfs data").unwrap();
    csi.unstage(id).await;
    let image = csi.image(id);
    wait_until("the loop device let go", || loops_of(&image).is_empty()).await;
    let before = digest(&image);

    let err = stage_as(&mut csi, id, "ext4").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("holds a xfs filesystem but ext4 was requested"),
        "{}",
        err.message()
    );
    assert_untouched(&csi, id, before).await;
    assert_eq!(blkid(&image), (Some(0), "xfs".to_string()));

    stage_as(&mut csi, id, "xfs")
        .await
        .expect("staging as xfs again");
    assert_eq!(
        std::fs::read_to_string(csi.staging(id).join("kept")).unwrap(),
        "xfs data"
    );
    csi.unstage(id).await;
    csi.finish().await;
}

/// Through the node agent, as kubelet calls it: a stage refused for doubt
/// is also a Warning on the volume's claim, which outlives the pod that
/// kubelet's own FailedMount event names.
#[tokio::test]
async fn a_refused_stage_is_told_on_the_claim() {
    const NODE: &str = "refusal-node";
    let kubeconfig = bare_cluster("node-refusal", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "node-refusal").await;
    let data = std::env::temp_dir().join(unique_name("stowage-refusal"));
    let agent = Process::node(&kubeconfig, NODE, &data, "node-refusal-node");
    wait_for_storage_nodes(&kubeconfig, &[NODE]);
    let controller = Process::controller(&kubeconfig, "node-refusal-controller");
    let class = format!("{}-ext4", ns.name);
    storage_class(
        &client,
        &class,
        "Immediate",
        "Delete",
        &[("fsType", "ext4")],
    )
    .await;
    claim(&ns, "data", &class, "32Mi", &["ReadWriteOnce"]).await;
    let bound = wait(
        &ns.api::<PersistentVolumeClaim>(),
        "data",
        "Bound",
        is_bound,
    )
    .await
    .unwrap();
    let pv = bound.spec.unwrap().volume_name.unwrap();
    let handle = volume_handle(&client, &pv).await;

    let kubelet = data.join("kubelet");
    let socket = stowage::node::socket_path(&kubelet);
    let mut node = csi::node_client::NodeClient::new(connect(&socket).await);
    let staging = kubelet.join(format!(
        "plugins/kubernetes.io/csi/local.stowage.dev/{pv}/globalmount"
    ));
    let err = node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: handle,
            staging_target_path: staging.to_str().unwrap().into(),
            volume_capability: Some(mount_capability("xfs")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let note = wait_for_event(&ns, "data", "StageRefused").await;
    assert!(
        note.contains(NODE) && note.contains("ext4") && note.contains("xfs"),
        "{note}"
    );
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
