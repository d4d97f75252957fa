//! The container image `scripts/build-image.sh` writes: one archive that is
//! both an OCI image layout and a `docker load` archive, that containerd
//! imports, and whose tools and libraries really run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stowage::telemetry::{COMMIT, VERSION};

use crate::harness::{build_image_command, repo_root, unique_name};

const NAME: &str = "stowage.dev/stowage";
/// Another tag for the same code, as the next release would be.
const NEXT_TAG: &str = "0.1.0-next";

/// An image archive as `scripts/build-image.sh` wrote it, unpacked for
/// inspection in a directory of its own.
struct Archive {
    path: PathBuf,
    /// The archive's sha256 right after it was written.
    sha256: String,
    dir: PathBuf,
}

impl Archive {
    /// Runs the script, for the crate version or another tag.
    fn build(tag: Option<&str>) -> Self {
        // One build at a time: they share the release binary, the Debian
        // cache and the archive of the default tag.
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        let out = run(&mut build_image_command(tag));
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            format!("stowage-{}.tar", tag.unwrap_or(VERSION))
        );
        let dir = std::env::temp_dir().join(unique_name("stowage-image"));
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(&dir));
        Archive {
            sha256: sha256(&path),
            path,
            dir,
        }
    }

    fn json(&self, name: &str) -> Value {
        let text = std::fs::read(self.dir.join(name)).unwrap();
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The blob with this digest, after checking that its content has it.
    fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("{digest} is not sha256"));
        let path = self.dir.join("blobs/sha256").join(hex);
        assert_eq!(sha256(&path), hex, "content of blob {digest}");
        path
    }

    /// The OCI manifest index.json names for `NAME:tag`.
    fn manifest(&self, tag: &str) -> Value {
        let layout = self.json("oci-layout");
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index = self.json("index.json");
        assert_eq!(index["schemaVersion"], 2);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "{index}");
        let entry = &manifests[0];
        assert_eq!(
            entry["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let annotations = &entry["annotations"];
        assert_eq!(
            annotations["io.containerd.image.name"],
            format!("{NAME}:{tag}")
        );
        assert_eq!(annotations["org.opencontainers.image.ref.name"], tag);
        let digest = entry["digest"].as_str().unwrap();
        let path = self.blob(digest);
        assert_eq!(
            entry["size"].as_u64().unwrap(),
            std::fs::metadata(&path).unwrap().len()
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn layer_digests(&self, tag: &str) -> Vec<String> {
        self.manifest(tag)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }

    /// The layers unpacked in order into a fresh directory.
    fn rootfs(&self) -> PathBuf {
        let root = self.dir.join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        for digest in self.layer_digests(VERSION) {
            run(Command::new("tar")
                .arg("-xzf")
                .arg(self.blob(&digest))
                .arg("-C")
                .arg(&root));
        }
        root
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn gunzipped_sha256(path: &Path) -> String {
    let out = run(Command::new("bash")
        .arg("-c")
        .arg("gzip -dc \"$1\" | sha256sum")
        .arg("-")
        .arg(path));
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn image_archive_is_an_oci_layout_and_a_docker_archive() {
    let archive = Archive::build(None);
    let manifest = archive.manifest(VERSION);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(archive.blob(config_digest)).unwrap()).unwrap();
    let layers = archive.layer_digests(VERSION);
    assert_eq!(layers.len(), 2, "Debian tools, then stowage: {manifest}");

    // What `docker load` reads: the same blobs under the image's name.
    let docker = archive.json("manifest.json");
    let docker = docker.as_array().unwrap();
    assert_eq!(docker.len(), 1, "{docker:?}");
    assert_eq!(
        docker[0]["RepoTags"],
        serde_json::json!([format!("{NAME}:{VERSION}")])
    );
    let blob_path = |digest: &str| format!("blobs/sha256/{}", &digest[7..]);
    assert_eq!(docker[0]["Config"], blob_path(config_digest));
    let docker_layers: Vec<&str> = docker[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(
        docker_layers,
        layers.iter().map(|d| blob_path(d)).collect::<Vec<_>>()
    );

    // Each layer's diff_id is the digest of its uncompressed tar.
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(diff_ids.len(), layers.len());
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        let uncompressed = gunzipped_sha256(&archive.blob(layer));
        assert_eq!(*diff_id, format!("sha256:{uncompressed}"), "layer {layer}");
    }

    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let run_config = &config["config"];
    assert_eq!(
        run_config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/stowage"])
    );
    assert_eq!(run_config["User"], "0");
    let path_env = run_config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e.as_str()?.strip_prefix("PATH="))
        .expect("PATH in the image's environment");
    for dir in ["/usr/local/bin", "/usr/sbin", "/sbin", "/bin"] {
        assert!(path_env.split(':').any(|d| d == dir), "PATH={path_env}");
    }
    let labels = &run_config["Labels"];
    let head = run(Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(["rev-parse", "HEAD"]));
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        String::from_utf8(head.stdout).unwrap().trim()
    );
    assert_eq!(labels["org.opencontainers.image.title"], "stowage");
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{labels}"
    );

    // Small enough to pull quickly onto every node.
    let size = std::fs::metadata(&archive.path).unwrap().len();
    assert!(size < 50 << 20, "archive is {size} bytes");
}

#[test]
fn image_build_is_reproducible_and_a_tag_changes_only_names() {
    let first = Archive::build(None);
    let next = Archive::build(Some(NEXT_TAG));
    // The layers are the same bytes, so a node that has one of the two
    // pulls only config and manifest for the other.
    assert_eq!(first.layer_digests(VERSION), next.layer_digests(NEXT_TAG));
    assert_ne!(first.manifest(VERSION), next.manifest(NEXT_TAG));
    let docker = next.json("manifest.json");
    assert_eq!(
        docker[0]["RepoTags"],
        serde_json::json!([format!("{NAME}:{NEXT_TAG}")])
    );
    let again = Archive::build(None);
    assert_eq!(again.sha256, first.sha256, "rebuilt archive differs");
}

/// A containerd of its own: root, state and socket in a temporary directory.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl Containerd {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("stowage-containerd"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{socket}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting containerd (scripts/install-deps.sh installs it)");
        let mut containerd = Containerd { dir, socket, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.socket.exists() {
            if let Ok(Some(status)) = containerd.child.try_wait() {
                panic!("containerd exited: {status}\n{}", containerd.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd socket never appeared\n{}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, namespace: &str, args: &[&str]) -> String {
        let out = run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The image `ctr images ls` lists in `namespace` under `NAME:VERSION`:
/// (media type, manifest digest), once `ctr images check` found all its
/// blobs.
fn imported(containerd: &Containerd, namespace: &str) -> (String, String) {
    let reference = format!("{NAME}:{VERSION}");
    // REF TYPE DIGEST SIZE PLATFORMS LABELS
    let listed = containerd.ctr(namespace, &["images", "ls"]);
    let row: Vec<&str> = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference.as_str()))
        .unwrap_or_else(|| panic!("{reference} not imported:\n{listed}"))
        .split_whitespace()
        .collect();
    let check = containerd.ctr(
        namespace,
        &["images", "check", &format!("name=={reference}")],
    );
    assert!(check.contains("complete (3/3)"), "{check}");
    (row[1].to_string(), row[2].to_string())
}

#[test]
fn containerd_imports_the_image_under_its_name() {
    let archive = Archive::build(None);
    let manifest_digest = archive.json("index.json")["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let containerd = Containerd::start();
    // Importing unpacks the layers, which checks them against the diff_ids.
    containerd.ctr(
        "k8s.io",
        &["images", "import", archive.path.to_str().unwrap()],
    );
    assert_eq!(
        imported(&containerd, "k8s.io"),
        (
            "application/vnd.oci.image.manifest.v1+json".to_string(),
            manifest_digest
        )
    );

    // The same blobs with manifest.json alone, as an older `docker save`
    // writes them: containerd reads that format as docker's.
    let docker_only = archive.dir.join("docker-only.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&docker_only)
        .arg("-C")
        .arg(&archive.dir)
        .args(["manifest.json", "blobs"]));
    containerd.ctr(
        "docker",
        &["images", "import", docker_only.to_str().unwrap()],
    );
    let (media_type, _) = imported(&containerd, "docker");
    assert_eq!(
        media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
}

/// Runs `args` in a chroot of the image's root filesystem with /proc and
/// /dev, as in a container, in a mount namespace of its own that takes
/// these mounts with it when it ends.
fn in_image(root: &Path, args: &[&str]) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && exec chroot "$0" "$@""#)
        .arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("chroot {args:?}: {e}"))
}

#[test]
fn image_tools_and_their_libraries_run() {
    let archive = Archive::build(None);
    let root = archive.rootfs();
    let mut failures = BTreeMap::new();
    let mut check = |args: &[&str], success: bool, expect: &str| {
        let out = in_image(&root, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() != success || !text.contains(expect) {
            failures.insert(args.join(" "), format!("{}: {text}", out.status));
        }
    };
    check(
        &["/usr/local/bin/stowage", "--version"],
        true,
        &format!("stowage {VERSION} (commit {COMMIT})"),
    );
    check(&["stowage", "node", "--version"], true, VERSION);
    check(&["mkfs.ext4", "-V"], true, "mke2fs 1.47");
    check(&["mkfs.xfs", "-V"], true, "mkfs.xfs version 6.");
    check(&["losetup", "--version"], true, "losetup from util-linux");
    check(&["blkid", "--version"], true, "blkid from util-linux");
    check(&["mount", "--version"], true, "mount from util-linux");
    check(&["umount", "--version"], true, "umount from util-linux");
    check(&["e2fsck", "-V"], true, "e2fsck 1.47");
    check(&["resize2fs"], false, "Usage: resize2fs");
    check(&["dumpe2fs", "-V"], true, "dumpe2fs 1.47");
    check(&["blockdev", "--version"], true, "blockdev from util-linux");
    check(&["xfs_growfs", "-V"], true, "xfs_growfs version 6.");

    // And they do their work: on image files, as the node agent does on
    // loop devices.
    for (name, size) in [("ext4.img", 32 << 20), ("xfs.img", 320 << 20)] {
        let file = std::fs::File::create(root.join("tmp").join(name)).unwrap();
        file.set_len(size).unwrap();
    }
    check(&["mkfs.ext4", "-q", "-F", "/tmp/ext4.img"], true, "");
    check(
        &["e2fsck", "-f", "-n", "/tmp/ext4.img"],
        true,
        "/tmp/ext4.img",
    );
    check(&["resize2fs", "/tmp/ext4.img", "48M"], true, "is now");
    check(&["mkfs.xfs", "-q", "/tmp/xfs.img"], true, "");
    check(
        &["blkid", "-o", "value", "-s", "TYPE", "/tmp/xfs.img"],
        true,
        "xfs",
    );
    check(
        &["blkid", "-o", "value", "-s", "TYPE", "/tmp/ext4.img"],
        true,
        "ext4",
    );
    assert!(failures.is_empty(), "{failures:#?}");

    // What the image was made from, at which versions.
    let packages = std::fs::read_to_string(root.join("usr/share/stowage/packages.txt")).unwrap();
    for package in ["libc6 ", "mount ", "util-linux ", "e2fsprogs ", "xfsprogs "] {
        assert!(
            packages.lines().any(|l| l.starts_with(package)),
            "packages.txt lacks {package}:\n{packages}"
        );
    }
    let beside = archive
        .path
        .with_file_name(format!("stowage-{VERSION}.packages.txt"));
    assert_eq!(std::fs::read_to_string(beside).unwrap(), packages);
    assert!(root.join("usr/share/doc/xfsprogs/copyright").is_file());
}

/// Every program stowage runs is one the image carries: the node agent runs
/// in the image, where a program missing from scripts/build-image.sh's
/// TOOLS fails only on a real node, at the first call that needs it.
#[test]
fn every_program_stowage_runs_is_in_the_image() {
    let script = std::fs::read_to_string(repo_root().join("scripts/build-image.sh")).unwrap();
    let tools: Vec<&str> = script
        .lines()
        .find_map(|l| l.strip_prefix("TOOLS=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("a TOOLS=(...) line in scripts/build-image.sh")
        .split_whitespace()
        .collect();
    let mut missing = Vec::new();
    let mut seen = 0;
    for file in rust_files(&repo_root().join("src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for program in text.split("Command::new(\"").skip(1) {
            let program = program.split('"').next().unwrap();
            seen += 1;
            if !tools.contains(&program) {
                missing.push(format!("{program} ({})", file.display()));
            }
        }
    }
    assert!(seen >= 10, "found only {seen} programs run from src/");
    assert!(
        missing.is_empty(),
        "programs stowage runs that the image lacks (add them to TOOLS): {missing:?}"
    );
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}
