//! What is mounted where (from /proc/self/mountinfo), and mount/umount.
//! Every node operation checks here first, so repeating one is harmless.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::backend::local::{LocalError, run};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
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

pub async fn mount(
    source: &Path,
    target: &Path,
    fs_type: Option<&str>,
    options: &[String],
) -> Result<(), LocalError> {
    let mut cmd = Command::new("mount");
    if let Some(fs) = fs_type {
        cmd.args(["-t", fs]);
    }
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    cmd.arg(source).arg(target);
    run(cmd).await
}

/// Bind-mounts `source` on `target`; read-only needs a second, remount step.
pub async fn bind(
    source: &Path,
    target: &Path,
    readonly: bool,
    options: &[String],
) -> Result<(), LocalError> {
    mount(source, target, None, &["bind".to_string()]).await?;
    if readonly || !options.is_empty() {
        let mut opts = vec!["remount".to_string(), "bind".to_string()];
        if readonly {
            opts.push("ro".into());
        }
        opts.extend(options.iter().cloned());
        if let Err(e) = mount(Path::new("none"), target, None, &opts).await {
            let _ = unmount(target).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `target`; nothing mounted is fine.
pub async fn unmount(target: &Path) -> Result<(), LocalError> {
    while mounted_at(target)
        .map_err(|source| LocalError::Io {
            op: "reading mountinfo",
            path: target.into(),
            source,
        })?
        .is_some()
    {
        let mut cmd = Command::new("umount");
        cmd.arg(target);
        run(cmd).await?;
    }
    Ok(())
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
