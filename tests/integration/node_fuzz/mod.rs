//! Any input to the CSI Node and Controller handlers, called in-process on
//! a temporary data directory and kubelet directory with real loop
//! devices, mkfs and mounts: ids, paths (`..`, symlinks planted in the
//! kubelet tree pointing outside it, NUL bytes, very long and odd
//! Unicode), capabilities, sizes up to the int64 limits and secrets. Every
//! call ends in success or a gRPC error with a message, none panics or
//! hangs, nothing outside the two directories changes (a sentinel file
//! outside keeps its bytes and mtime, its directory stays as it was) and
//! no mount of ours appears outside the kubelet directory.
//!
//! A fixed seed and case count keep it repeatable; each (call, code) met
//! is printed with one message, under --nocapture.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use stowage::backend::local::Store;
use stowage::backend::local::room::{Policy, Reserve};
use stowage::csi::VolumeLocks;
use stowage::csi::controller::ControllerService;
use stowage::csi::node::NodeService;
use stowage::host::paths::Layout;
use stowage::proto::csi::v1 as csi;
use stowage::proto::csi::v1::controller_server::Controller;
use stowage::proto::csi::v1::node_server::Node;
use tonic::Request;

use crate::harness::unique_name;

mod inputs;
use inputs::{Call, block_cap, calls, kind, mount_cap};

const MIB: i64 = 1 << 20;
const CASES: u32 = 400;

/// The directories and services under test, and what must not change.
struct World {
    work: PathBuf,
    kubelet: PathBuf,
    data: PathBuf,
    outside: PathBuf,
    sentinel: PathBuf,
    sentinel_mtime: SystemTime,
    strict: NodeService,
    beneath: NodeService,
    controller: ControllerService,
    mounts_before: HashSet<String>,
}

fn mountinfo_points() -> HashSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .collect()
}

impl World {
    async fn new() -> World {
        let work = std::env::temp_dir().join(unique_name("stowage-fuzz"));
        let (kubelet, data, outside) = (
            work.join("kubelet"),
            work.join("data"),
            work.join("outside"),
        );
        for d in [&kubelet, &data, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        let sentinel = outside.join("sentinel");
        std::fs::write(&sentinel, "must stay").unwrap();
        plant_symlinks(&kubelet, &outside);
        let room = Policy {
            capacity: Some(512 * MIB),
            reserve: Reserve::Bytes(0),
        };
        let node = |paths| NodeService {
            store: Store::new(&data),
            room,
            node: "fuzz".into(),
            kubelet_dir: kubelet.clone(),
            paths,
            locks: VolumeLocks::default(),
            refusals: None,
        };
        let world = World {
            strict: node(Layout::Kubelet),
            beneath: node(Layout::Beneath),
            controller: ControllerService {
                store: Store::new(&data),
                node: "fuzz".into(),
                room,
                locks: VolumeLocks::default(),
            },
            sentinel_mtime: std::fs::metadata(&sentinel).unwrap().modified().unwrap(),
            mounts_before: mountinfo_points(),
            work,
            kubelet,
            data,
            outside,
            sentinel,
        };
        for (id, params, block) in [
            ("vol-a", "image", false),
            ("vol-d", "dir", false),
            ("vol-b", "image", true),
        ] {
            let cap = if block {
                block_cap()
            } else {
                mount_cap("ext4", &[])
            };
            let params = [("layout".to_string(), params.to_string())].into();
            let request = Call::Create(id.into(), 32 * MIB, 0, vec![cap], params);
            world
                .call(request)
                .await
                .expect("creating the volumes the cases use");
        }
        world
    }

    /// Runs one call; Err is its gRPC status.
    async fn call(&self, call: Call) -> Result<(), tonic::Status> {
        match call {
            Call::Stage(..) | Call::Unstage(..) | Call::Publish(..) | Call::Unpublish(..) => {
                self.mount_call(call).await
            }
            Call::Stats(..) | Call::Expand(..) => self.usage_call(call).await,
            _ => self.controller_call(call).await,
        }
    }

    async fn mount_call(&self, call: Call) -> Result<(), tonic::Status> {
        use csi::*;
        // Calls with a path of even length go to a node accepting only
        // kubelet's shapes, the others to one accepting any path beneath
        // the kubelet directory: both layouts meet every kind of path.
        let n = |strict: bool| if strict { &self.strict } else { &self.beneath };
        match call {
            Call::Stage(volume_id, staging_target_path, volume_capability, secrets) => {
                let strict = staging_target_path.len() % 2 == 0;
                let r = NodeStageVolumeRequest {
                    volume_id,
                    staging_target_path,
                    volume_capability,
                    secrets,
                    ..Default::default()
                };
                n(strict).node_stage_volume(Request::new(r)).await.map(drop)
            }
            Call::Unstage(volume_id, staging_target_path) => {
                let strict = staging_target_path.len() % 2 == 0;
                let r = NodeUnstageVolumeRequest {
                    volume_id,
                    staging_target_path,
                };
                n(strict)
                    .node_unstage_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            Call::Publish(
                volume_id,
                target_path,
                staging_target_path,
                volume_capability,
                readonly,
            ) => {
                let strict = target_path.len() % 2 == 0;
                let r = NodePublishVolumeRequest {
                    volume_id,
                    target_path,
                    staging_target_path,
                    volume_capability,
                    readonly,
                    ..Default::default()
                };
                n(strict)
                    .node_publish_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            Call::Unpublish(volume_id, target_path) => {
                let strict = target_path.len() % 2 == 0;
                let r = NodeUnpublishVolumeRequest {
                    volume_id,
                    target_path,
                };
                n(strict)
                    .node_unpublish_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            _ => unreachable!("not a mount call"),
        }
    }

    async fn usage_call(&self, call: Call) -> Result<(), tonic::Status> {
        use csi::*;
        let range = |required_bytes, limit_bytes| {
            Some(CapacityRange {
                required_bytes,
                limit_bytes,
            })
        };
        match call {
            Call::Stats(volume_id, volume_path) => {
                let r = NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path,
                    staging_target_path: String::new(),
                };
                self.strict
                    .node_get_volume_stats(Request::new(r))
                    .await
                    .map(drop)
            }
            Call::Expand(volume_id, volume_path, required, limit) => {
                let r = NodeExpandVolumeRequest {
                    volume_id,
                    volume_path,
                    capacity_range: range(required, limit),
                    ..Default::default()
                };
                self.strict
                    .node_expand_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            _ => unreachable!("not a usage call"),
        }
    }

    async fn controller_call(&self, call: Call) -> Result<(), tonic::Status> {
        use csi::*;
        let range = |required_bytes, limit_bytes| {
            Some(CapacityRange {
                required_bytes,
                limit_bytes,
            })
        };
        match call {
            Call::Create(name, required, limit, volume_capabilities, parameters) => {
                let r = CreateVolumeRequest {
                    name,
                    capacity_range: range(required, limit),
                    volume_capabilities,
                    parameters,
                    ..Default::default()
                };
                self.controller
                    .create_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            Call::Delete(volume_id) => {
                let r = DeleteVolumeRequest {
                    volume_id,
                    secrets: HashMap::new(),
                };
                self.controller
                    .delete_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            Call::ControllerExpand(volume_id, required, limit) => {
                let r = ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range: range(required, limit),
                    ..Default::default()
                };
                self.controller
                    .controller_expand_volume(Request::new(r))
                    .await
                    .map(drop)
            }
            Call::Validate(volume_id, volume_capabilities) => {
                let r = ValidateVolumeCapabilitiesRequest {
                    volume_id,
                    volume_capabilities,
                    ..Default::default()
                };
                self.controller
                    .validate_volume_capabilities(Request::new(r))
                    .await
                    .map(drop)
            }
            _ => unreachable!("not a controller call"),
        }
    }

    /// Nothing outside the work directory's kubelet and data directories
    /// changed, and no mount of ours is anywhere but under kubelet.
    fn check_untouched(&self) -> Result<(), String> {
        let bytes =
            std::fs::read_to_string(&self.sentinel).map_err(|e| format!("sentinel: {e}"))?;
        let mtime = std::fs::metadata(&self.sentinel)
            .and_then(|m| m.modified())
            .map_err(|e| e.to_string())?;
        if bytes != "must stay" || mtime != self.sentinel_mtime {
            return Err(format!("the sentinel changed: {bytes:?}"));
        }
        let entries: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if entries != [std::ffi::OsString::from("sentinel")] {
            return Err(format!("the outside directory now holds {entries:?}"));
        }
        let (work, kubelet, data) = (
            self.work.to_str().unwrap(),
            self.kubelet.to_str().unwrap(),
            self.data.to_str().unwrap(),
        );
        for line in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
        {
            let fields: Vec<&str> = line.split(' ').collect();
            let (root, point) = (fields[3], fields[4]);
            if self.mounts_before.contains(point) || point.starts_with(&format!("{kubelet}/")) {
                continue;
            }
            let source = line
                .split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').nth(1))
                .unwrap_or("");
            let ours =
                point.starts_with(work) || root.contains(data) || loop_of_ours(source, root, data);
            if ours {
                return Err(format!("a mount outside the kubelet directory: {line}"));
            }
        }
        Ok(())
    }

    /// Unmounts and detaches whatever the cases left, and removes it all.
    fn clean(&self) {
        let work = self.work.to_str().unwrap();
        // Mounts may be stacked; each round takes the top ones off.
        for _ in 0..10 {
            let mut points: Vec<String> = mountinfo_points()
                .into_iter()
                .filter(|p| p.starts_with(work))
                .collect();
            if points.is_empty() {
                break;
            }
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = std::process::Command::new("umount")
                    .args(["-l", &p])
                    .status();
            }
        }
        let out = std::process::Command::new("losetup")
            .arg("-a")
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(work))
        {
            if let Some((dev, _)) = line.split_once(':') {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", dev])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Whether a mount's device is a loop device on one of our images.
fn loop_of_ours(source: &str, root: &str, data: &str) -> bool {
    let name = Path::new(source)
        .file_name()
        .or_else(|| Path::new(root).file_name());
    name.and_then(|n| {
        std::fs::read_to_string(Path::new("/sys/block").join(n).join("loop/backing_file")).ok()
    })
    .is_some_and(|b| b.starts_with(data))
}

/// Symlinks a careless node would follow out of the kubelet directory:
/// at a directory on the way, at the final component, and one to a file.
fn plant_symlinks(kubelet: &Path, outside: &Path) {
    let link = |at: &str, to: &Path| {
        let at = kubelet.join(at);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(to, at).unwrap();
    };
    link("pods/evil", outside);
    link("pods/p1/volumes/kubernetes.io~csi/link", outside);
    link("pods/p2/volumes/kubernetes.io~csi/vol-a/mount", outside);
    link("plugins/kubernetes.io/csi/evil", outside);
    link(
        "plugins/kubernetes.io/csi/local.stowage.dev/vol-x/globalmount",
        outside,
    );
    link(
        "plugins/kubernetes.io/csi/volumeDevices/publish/vol-b/p3",
        &outside.join("sentinel"),
    );
    link("plugins/kubernetes.io/csi/up", Path::new(".."));
}

#[test]
fn node_and_controller_calls_survive_any_input() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let world = rt.block_on(World::new());
    let seen = std::sync::Mutex::new(BTreeMap::<(&str, String), (u32, String)>::new());
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let strategy = calls(world.kubelet.to_str().unwrap().to_string());
    let result = runner.run(&strategy, |call| {
        let what = kind(&call);
        let outcome = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), world.call(call.clone())).await
        });
        let outcome = outcome.map_err(|_| TestCaseError::fail(format!("{call:?} hung")))?;
        let code = match &outcome {
            Ok(()) => "Ok".to_string(),
            Err(status) => {
                prop_assert!(
                    !status.message().is_empty(),
                    "{call:?}: no message in {status:?}"
                );
                prop_assert_ne!(
                    status.code(),
                    tonic::Code::Unknown,
                    "{:?}: {:?}",
                    call,
                    status
                );
                format!("{:?}", status.code())
            }
        };
        world
            .check_untouched()
            .map_err(|e| TestCaseError::fail(format!("after {call:?}: {e}")))?;
        let message = outcome
            .err()
            .map(|s| s.message().to_string())
            .unwrap_or_default();
        let mut seen = seen.lock().unwrap();
        let entry = seen.entry((what, code)).or_insert((0, message));
        entry.0 += 1;
        Ok(())
    });
    for ((what, code), (count, example)) in seen.into_inner().unwrap() {
        println!("{what:28} {code:18} {count:4}  e.g. {example:.200}");
    }
    world.clean();
    result.unwrap();
}
