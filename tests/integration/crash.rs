//! What the crash tests share: a failpoint armed in one process and proof
//! that it, and nothing else, ended that process; the node agent and
//! controller they restart; and what a crash may have left on disk or in
//! the API.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::ListParams;
use kube::{Api, Client};
use stowage::crd::Volume;

use crate::fixtures::TIMEOUT;
use crate::harness::{Process, unique_name};

/// A failpoint to arm in one process, with a marker file of its own.
pub struct Armed {
    pub step: &'static str,
    marker: String,
}

impl Armed {
    pub fn new(step: &'static str) -> Self {
        let marker = std::env::temp_dir().join(unique_name("stowage-failpoint"));
        Armed {
            step,
            marker: marker.to_str().unwrap().to_string(),
        }
    }

    pub fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("STOWAGE_FAILPOINT", self.step),
            ("STOWAGE_FAILPOINT_MARKER", &self.marker),
        ]
    }

    /// The process ended at this failpoint: failpoint status, marker and
    /// log line all present. Any other end (panic, error, signal) fails.
    pub async fn assert_fired(&self, process: &mut Process) -> CrashLog {
        let step = self.step;
        let log = process.log_file().display().to_string();
        let code = process.exit_code_within(TIMEOUT).await;
        assert_eq!(
            code,
            Some(stowage::failpoint::EXIT_STATUS),
            "{step}: exit code (None: still running; {} is the failpoint's); see {log}",
            stowage::failpoint::EXIT_STATUS
        );
        let marker = std::fs::read_to_string(&self.marker).unwrap_or_default();
        assert_eq!(marker, step, "{step}: failpoint marker {}", self.marker);
        let line = format!("failpoint {step}: aborting");
        assert!(
            process.log().contains(&line),
            "{step}: no '{line}' in {log}"
        );
        let _ = std::fs::remove_file(&self.marker);
        CrashLog {
            path: process.log_file().to_path_buf(),
            line,
        }
    }
}

/// The log of a run that crashed at a failpoint.
#[must_use = "check that the restart kept it"]
pub struct CrashLog {
    path: PathBuf,
    line: String,
}

impl CrashLog {
    /// The crashed run's log still says where it stopped: a restart under
    /// the same name must not have overwritten it.
    pub fn assert_kept(&self) {
        let log = std::fs::read_to_string(&self.path).unwrap_or_default();
        assert!(
            log.contains(&self.line),
            "the crashed run's log {} lost '{}' after the restart",
            self.path.display(),
            self.line
        );
    }
}

/// `stowage node` with room for 10Gi, its volumes under `data`.
pub fn node_agent(
    kubeconfig: &Path,
    node: &str,
    data: &Path,
    env: &[(&str, &str)],
    log: &str,
) -> Process {
    let args = [
        "node",
        "--node-name",
        node,
        "--data-dir",
        data.to_str().unwrap(),
        "--capacity",
        "10Gi",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    Process::start(kubeconfig, &args, env, log)
}

/// `stowage controller` without leader election.
pub fn controller(kubeconfig: &Path, env: &[(&str, &str)], log: &str) -> Process {
    let args = [
        "controller",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    Process::start(kubeconfig, &args, env, log)
}

/// Names in `dir` that belong to the claim with `uid` (none if `dir` is
/// missing).
pub fn files_for(dir: &Path, uid: &str) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains(uid))
        .collect();
    files.sort();
    files
}

/// The image is `bytes` long and carries an `fs` filesystem.
pub fn assert_image(image: &Path, bytes: u64, fs: &str, what: &str) {
    let len = std::fs::metadata(image)
        .unwrap_or_else(|e| panic!("{what}: {}: {e}", image.display()))
        .len();
    assert_eq!(len, bytes, "{what}: size of {}", image.display());
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(image)
        .output()
        .expect("running blkid");
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(found, fs, "{what}: filesystem on {}", image.display());
}

/// Writes `content` into the ext4 image as the file `name` (no mount).
pub fn write_into_image(image: &Path, name: &str, content: &str) {
    let source = PathBuf::from(format!("{}.{name}", image.display()));
    std::fs::write(&source, content).unwrap();
    debugfs(
        image,
        &["-w", "-R", &format!("write {} {name}", source.display())],
    );
    std::fs::remove_file(&source).unwrap();
    assert_eq!(read_from_image(image, name), content, "debugfs write");
}

/// The file `name` in the ext4 image (empty if missing).
pub fn read_from_image(image: &Path, name: &str) -> String {
    debugfs(image, &["-R", &format!("cat {name}")])
}

fn debugfs(image: &Path, args: &[&str]) -> String {
    let out = Command::new("debugfs")
        .args(args)
        .arg(image)
        .output()
        .expect("running debugfs");
    assert!(out.status.success(), "debugfs {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many Volumes and PVs name the claim with `uid`.
pub async fn objects_for_claim(client: &Client, uid: &str) -> (usize, usize) {
    let volumes = Api::<Volume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|v| v.spec.claim.as_ref().is_some_and(|c| c.uid == uid))
        .count();
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|pv| {
            let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            claim_ref.and_then(|r| r.uid.as_deref()) == Some(uid)
        })
        .count();
    (volumes, pvs)
}
