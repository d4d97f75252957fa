//! What is mounted where (from /proc/self/mountinfo), and mount/umount.
//! Every node operation checks here first, so repeating one is harmless.
//! Request paths are mounted on and unmounted through descriptors
//! (beneath.rs), never by their text alone.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::beneath::{Beneath, fd_path};
use super::loop_device;
use super::process::{HostError, io, run};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// major:minor of the mounted filesystem.
    pub dev: String,
    pub mount_point: PathBuf,
    /// Path inside the source filesystem that is mounted (for bind mounts).
    pub root: String,
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
    /// Whether mounts made under this one propagate to its peers
    /// (mountinfo's optional field `shared:N`).
    pub shared: bool,
}

/// Parses mountinfo(5). Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let dev = fields.get(2)?.to_string();
    let root = unescape(fields.get(3)?);
    let mount_point = PathBuf::from(unescape(fields.get(4)?));
    let mut options: Vec<String> = fields.get(5)?.split(',').map(String::from).collect();
    let shared = fields.iter().skip(6).any(|f| f.starts_with("shared:"));
    let mut right = right.split(' ');
    let fs_type = right.next()?.to_string();
    let source = unescape(right.next()?);
    options.extend(
        right
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|o| !o.is_empty())
            .map(String::from),
    );
    Some(Mount {
        dev,
        mount_point,
        root,
        fs_type,
        source,
        options,
        shared,
    })
}

/// mountinfo writes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn current() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The mount that holds `path`: the topmost one whose mount point is the
/// longest prefix of it.
pub fn holding<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .rev()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
}

/// The topmost mount at exactly `path`, if any.
pub fn mounted_at(path: &Path) -> std::io::Result<Option<Mount>> {
    Ok(current()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// mount(8), told not to canonicalise: the paths given are either ours or
/// `/proc/<pid>/fd/N` names of descriptors, which canonicalising would
/// turn back into text that a symlink could redirect.
pub async fn mount(
    source: &Path,
    target: &Path,
    fs_type: Option<&str>,
    options: &[String],
) -> Result<(), HostError> {
    let mut cmd = Command::new("mount");
    cmd.arg("--no-canonicalize");
    if let Some(fs) = fs_type {
        cmd.args(["-t", fs]);
    }
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    cmd.arg(source).arg(target);
    run(cmd).await
}

/// Mounts `source` on the directory or file open as `target_fd`, with the
/// mount options a volume capability asks for.
pub async fn mount_on(
    source: &Path,
    target_fd: &OwnedFd,
    fs_type: Option<&str>,
    options: &[String],
) -> Result<(), HostError> {
    mount(source, &fd_path(target_fd), fs_type, options).await
}

/// Bind-mounts `source` on `target` (open as `target_fd`); read-only
/// needs a second, remount step, on the new mount itself.
pub async fn bind(
    source: &Path,
    target: &Beneath,
    target_fd: &OwnedFd,
    readonly: bool,
    options: &[String],
) -> Result<(), HostError> {
    mount_on(source, target_fd, None, &["bind".to_string()]).await?;
    if readonly || !options.is_empty() {
        let mut opts = vec!["remount".to_string(), "bind".to_string()];
        if readonly {
            opts.push("ro".into());
        }
        opts.extend(options.iter().cloned());
        let remounted = match target.open().map_err(io("opening", &target.path))? {
            Some(top) => mount(Path::new("none"), &fd_path(&top), None, &opts).await,
            None => Err(io("opening", &target.path)(
                std::io::ErrorKind::NotFound.into(),
            )),
        };
        if let Err(e) = remounted {
            let _ = target.unmount();
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `target`, each only if `ours` says
/// stowage made it; nothing mounted is fine.
pub fn unmount(target: &Beneath, ours: impl Fn(&Mount) -> bool) -> Result<(), HostError> {
    while let Some(m) = mounted_at(&target.path).map_err(io("reading mountinfo", &target.path))? {
        if !ours(&m) {
            return Err(HostError::NotOurMount {
                path: target.path.clone(),
                device: m.source,
                fs_type: m.fs_type,
            });
        }
        target.unmount().map_err(io("unmounting", &target.path))?;
    }
    Ok(())
}

/// Whether `m` is a mount stowage makes of the volume whose image is
/// `image` or whose directory is `dir` (both as the kernel names them):
/// its loop device mounted (staging, or a publish bound from the staging
/// mount), the loop device node bound (block publish), or the directory
/// bound.
pub fn made_from(m: &Mount, image: &Path, dir: &Path) -> bool {
    let loop_name = if m.source.starts_with("/dev/loop") {
        Path::new(&m.source).file_name()
    } else {
        Path::new(&m.root)
            .file_name()
            .filter(|n| n.as_encoded_bytes().starts_with(b"loop"))
    };
    if let Some(name) = loop_name {
        // A device node bound for a block publish outlives the loop
        // device's attachment (kubelet may unstage first after a crash):
        // a loop device with nothing behind it holds no one's data.
        // The loop device may since have been given to another of our
        // images: the bind is still ours, and unmounting it only takes
        // that device away from the pod.
        let bound_node = !m.source.starts_with("/dev/loop");
        match loop_device::backing_file(name) {
            Some(b) if b == image => return true,
            Some(b) if bound_node && b.parent() == image.parent() => return true,
            None if bound_node => return true,
            _ => {}
        }
    }
    // A deleted directory shows as ".../name//deleted".
    let root = m.root.strip_suffix("//deleted").unwrap_or(&m.root);
    let tail = dir.iter().rev().take(2).collect::<Vec<_>>();
    let same_tail = Path::new(root)
        .iter()
        .rev()
        .take(2)
        .eq(tail.iter().copied());
    same_tail && device_of(dir.parent().unwrap_or(dir)).is_some_and(|d| d == m.dev)
}

/// major:minor of the filesystem holding `path`, as mountinfo writes it.
fn device_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    Some(format!("{}:{}", libc::major(dev), libc::minor(dev)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
100 29 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/x/globalmount rw,relatime shared:50 - ext4 /dev/loop3 rw
101 29 7:3 / /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pvc\\040a/mount ro,relatime shared:50 - ext4 /dev/loop3 rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt2"));
        assert_eq!(m[0].fs_type, "ext3");
        assert!(m[0].options.contains(&"noatime".to_string()));
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(
            m[2].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pvc a/mount")
        );
        assert!(m[2].options.contains(&"ro".to_string()));
    }

    #[test]
    fn propagation_and_the_mount_holding_a_path() {
        let m = parse_mountinfo(SAMPLE);
        assert!(!m[0].shared, "master:1 alone is a slave mount, not shared");
        assert!(m[1].shared);
        let held = holding(
            &m,
            Path::new("/var/lib/kubelet/plugins/kubernetes.io/csi/x/globalmount/sub"),
        );
        assert_eq!(held.map(|m| m.source.as_str()), Some("/dev/loop3"));
        assert_eq!(holding(&m, Path::new("/elsewhere")), None);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_mountinfo("not a mountinfo line\n\n").is_empty());
    }
}
