//! No silent overcommit: what a node offers follows its data filesystem's
//! free space, a full one stops new volumes and warns the claims there,
//! preallocated images really hold their blocks, and CreateVolume,
//! ControllerExpandVolume and NodeExpandVolume judge size by one measure.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Api;
use stowage::crd::{ConditionStatus, StorageNode};
use stowage::proto::csi::v1 as csi;
use tonic::Code;

use crate::csi_node::{CsiNode, MIB, capability, tool};
use crate::fixtures::{
    TIMEOUT, claim, events, is_bound, storage_class, wait, wait_for_event, wait_for_stowage_event,
};
use crate::harness::{Process, TestNamespace, bare_cluster, client_for_path, unique_name};

/// Bytes of an image's blocks actually allocated (`stat -c %b` × 512).
fn allocated(image: &Path) -> i64 {
    std::fs::metadata(image).unwrap().blocks() as i64 * 512
}

fn create_request(id: &str, bytes: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn expand_request(id: &str, bytes: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// README: "`preallocate: "true"` allocates every block of the image".
/// A sparse image holds only what mkfs wrote; a preallocated one holds its
/// whole size, after mkfs and after growing, and is still a filesystem
/// that stages and keeps data.
#[tokio::test]
async fn preallocated_images_hold_their_blocks_and_sparse_ones_do_not() {
    let mut csi = CsiNode::start("node-capacity-prealloc", &[]).await;
    let thick = [("preallocate", "true")];
    for (id, params) in [("thick", &thick[..]), ("thin", &[][..])] {
        csi.controller
            .create_volume(create_request(id, 64 * MIB, params))
            .await
            .expect("CreateVolume");
    }
    let (thick, thin) = (csi.image("thick"), csi.image("thin"));
    assert!(
        allocated(&thick) >= 64 * MIB,
        "preallocated: {} bytes allocated",
        allocated(&thick)
    );
    assert!(
        allocated(&thin) < 16 * MIB,
        "sparse: {} bytes allocated",
        allocated(&thin)
    );
    let du = tool("du", &["-k", thick.to_str().unwrap()]);
    let du_kib: i64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert!(du_kib >= 64 * 1024, "du says {du}");

    for id in ["thick", "thin"] {
        csi.controller
            .controller_expand_volume(expand_request(id, 96 * MIB))
            .await
            .expect("ControllerExpandVolume");
    }
    assert_eq!(std::fs::metadata(&thick).unwrap().len() as i64, 96 * MIB);
    assert!(
        allocated(&thick) >= 96 * MIB,
        "growth of a preallocated image is allocated"
    );
    assert!(allocated(&thin) < 16 * MIB, "growth of a sparse one is not");

    // mkfs did not punch holes into it, and it is still a filesystem.
    tool("e2fsck", &["-fn", thick.to_str().unwrap()]);
    csi.stage("thick").await;
    std::fs::write(csi.staging("thick").join("kept"), "data").unwrap();
    csi.unstage("thick").await;
    csi.finish().await;
}

/// README: "CreateVolume and expansion are judged by the same room".
/// `--capacity 100Mi`: a new volume bigger than the node is OutOfRange, one
/// that fits the node but not what is left is ResourceExhausted; growth
/// beyond what is left is OutOfRange, from the controller and on the node.
#[tokio::test]
async fn create_and_expand_judge_by_what_is_not_promised_yet() {
    let mut csi = CsiNode::start("node-capacity-room", &["--capacity", "100Mi"]).await;
    for id in ["a", "b"] {
        csi.controller
            .create_volume(create_request(id, 40 * MIB, &[]))
            .await
            .expect("CreateVolume");
    }
    let refused = |id, bytes| {
        let mut controller = csi.controller.clone();
        async move {
            controller
                .create_volume(create_request(id, bytes, &[]))
                .await
                .expect_err("CreateVolume beyond the room")
        }
    };
    let e = refused("c", 30 * MIB).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("20971520 of its 104857600 bytes"),
        "{}",
        e.message()
    );
    let e = refused("d", 200 * MIB).await;
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(!csi.image("c").exists() && !csi.image("d").exists());

    // 20Mi left: a grows into it and not one MiB further.
    csi.controller
        .controller_expand_volume(expand_request("a", 60 * MIB))
        .await
        .expect("growth within the room");
    let e = csi
        .controller
        .controller_expand_volume(expand_request("a", 61 * MIB))
        .await
        .expect_err("growth beyond the room");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(
        std::fs::metadata(csi.image("a")).unwrap().len() as i64,
        60 * MIB
    );

    // NodeExpandVolume on a staged volume is held to the same.
    csi.stage("b").await;
    let e = csi
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "b".into(),
            volume_path: csi.staging("b").to_str().unwrap().into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 41 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(capability()),
            ..Default::default()
        })
        .await
        .expect_err("NodeExpandVolume beyond the room");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(
        std::fs::metadata(csi.image("b")).unwrap().len() as i64,
        40 * MIB
    );
    let capacity = csi
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capacity.available_capacity, 0);
    csi.unstage("b").await;
    csi.finish().await;
}

/// A small ext4 filesystem loop-mounted as a node agent's data directory;
/// unmounted (and its loop device freed) when dropped.
struct SmallDisk {
    work: PathBuf,
    mount: PathBuf,
}

impl SmallDisk {
    fn new(mib: i64) -> SmallDisk {
        let work = std::env::temp_dir().join(unique_name("stowage-small-disk"));
        let mount = work.join("data");
        std::fs::create_dir_all(&mount).unwrap();
        let image = work.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len((mib * MIB) as u64)
            .unwrap();
        tool("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        tool(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                mount.to_str().unwrap(),
            ],
        );
        SmallDisk { work, mount }
    }

    fn available(&self) -> i64 {
        let out = tool("stat", &["-f", "-c", "%a %S", self.mount.to_str().unwrap()]);
        let mut it = out.split_whitespace().map(|n| n.parse::<i64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

const NODE: &str = "small-disk-node";
const RESERVE: i64 = 16 * MIB;

async fn storage_node(
    api: &Api<StorageNode>,
    what: &str,
    ok: impl Fn(&StorageNode) -> bool,
) -> StorageNode {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(node) = api.get(NODE).await
            && node.status.is_some()
            && ok(&node)
        {
            return node;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "StorageNode never {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pressure(node: &StorageNode) -> Option<(ConditionStatus, String, String)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "DiskPressure")?;
    Some((c.status, c.reason.clone(), c.message.clone()))
}

/// README: "capacity is the data filesystem's free space, plus what
/// stowage's images hold, less the reserve". On a 128 MiB ext4 data
/// directory: capacity starts at free − reserve and stays there while a
/// preallocated image takes 16 MiB of blocks; a file written by someone
/// else below the reserve sets DiskPressure (naming free bytes and reserve),
/// warns the sparse volume's claim but not the preallocated one's, and
/// turns a new claim away saying why; removing the file lifts it all and
/// the waiting claim binds.
#[tokio::test]
async fn a_full_data_filesystem_sets_disk_pressure_and_stops_placement() {
    let kubeconfig = bare_cluster("node-capacity", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "capacity").await;
    let (thin, thick) = (format!("{}-thin", ns.name), format!("{}-thick", ns.name));
    storage_class(&client, &thin, "Immediate", "Delete", &[]).await;
    storage_class(
        &client,
        &thick,
        "Immediate",
        "Delete",
        &[("preallocate", "true")],
    )
    .await;
    let disk = SmallDisk::new(128);
    let reserve = RESERVE.to_string();
    let agent = Process::start(
        &kubeconfig,
        &[
            "node",
            "--node-name",
            NODE,
            "--data-dir",
            disk.mount.to_str().unwrap(),
            "--capacity-reserve",
            &reserve,
            "--report-interval",
            "1s",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
        "node-capacity-agent",
    );
    let nodes = Api::<StorageNode>::all(client.clone());
    let first = storage_node(&nodes, "reported", |_| true).await;
    let status = first.status.clone().unwrap();
    assert_eq!(status.reserve_bytes, RESERVE);
    assert_eq!(
        status.capacity_bytes,
        status.available_bytes - RESERVE,
        "no images yet"
    );
    assert_eq!(pressure(&first).map(|p| p.0), Some(ConditionStatus::False));
    let controller = Process::controller(&kubeconfig, "node-capacity-controller");

    claim(&ns, "thick", &thick, "16Mi", &["ReadWriteOnce"]).await;
    claim(&ns, "thin", &thin, "16Mi", &["ReadWriteOnce"]).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    for name in ["thick", "thin"] {
        wait(&claims, name, "Bound", is_bound).await;
    }
    // 16 MiB fewer free, 16 MiB more held: the capacity stays.
    let held = storage_node(&nodes, "reporting the images", |n| {
        n.status.as_ref().unwrap().available_bytes < status.available_bytes - 15 * MIB
    })
    .await
    .status
    .unwrap();
    let drift = (held.capacity_bytes - status.capacity_bytes).abs();
    assert!(
        drift < MIB,
        "capacity {} then {}",
        status.capacity_bytes,
        held.capacity_bytes
    );

    // Someone else fills the disk to 4 MiB below the reserve.
    let filler = disk.mount.join("filler");
    let fill = disk.available() - RESERVE + 4 * MIB;
    tool(
        "fallocate",
        &["-l", &fill.to_string(), filler.to_str().unwrap()],
    );
    let full = storage_node(&nodes, "under DiskPressure", |n| {
        pressure(n).is_some_and(|p| p.0 == ConditionStatus::True)
    })
    .await;
    let (_, reason, message) = pressure(&full).unwrap();
    let free = full.status.as_ref().unwrap().available_bytes;
    assert_eq!(reason, "FreeSpaceBelowReserve");
    assert!(
        message.contains(&format!("{free} bytes free"))
            && message.contains(&format!("reserve of {RESERVE} bytes")),
        "{message}"
    );

    let note = wait_for_event(&ns, "thin", "NodeDiskPressure").await;
    assert!(note.contains(NODE) && note.contains("bytes free"), "{note}");
    claim(&ns, "more", &thin, "16Mi", &["ReadWriteOnce"]).await;
    let note = wait_for_stowage_event(&ns, "more", "ProvisioningFailed").await;
    assert!(
        note.contains("disk pressure") && note.contains(NODE) && note.contains("bytes free"),
        "{note}"
    );
    let thick_heard: Vec<_> = events(&ns, "thick")
        .await
        .into_iter()
        .filter(|(r, _)| r.starts_with("NodeDiskPressure"))
        .collect();
    assert!(
        thick_heard.is_empty(),
        "a preallocated volume was warned: {thick_heard:?}"
    );

    std::fs::remove_file(&filler).unwrap();
    let relieved = storage_node(&nodes, "relieved", |n| {
        pressure(n).is_some_and(|p| p.0 == ConditionStatus::False)
    })
    .await;
    assert_eq!(pressure(&relieved).unwrap().1, "FreeSpaceAboveReserve");
    wait_for_event(&ns, "thin", "NodeDiskPressureRelieved").await;
    wait(&claims, "more", "Bound", is_bound).await;
    controller.stop();
    agent.stop();
}
