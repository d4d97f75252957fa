//! Paths that come in requests (staging, target and volume paths). Each is
//! checked as text first: absolute, normal components only, under the
//! kubelet directory, and (on a real node) one of the shapes kubelet
//! builds. It is then opened beneath the kubelet directory without
//! following any symlink (beneath.rs), and the node works through that.
//!
//! The shapes, from kubelet's pkg/volume/csi (csi_attacher.go,
//! csi_mounter.go, csi_block.go), relative to the kubelet directory:
//! - staging, filesystem: `plugins/kubernetes.io/csi/<driver>/<sha256 of
//!   the volume handle>/globalmount`, or before Kubernetes 1.24
//!   `plugins/kubernetes.io/csi/pv/<pv>/globalmount`;
//! - staging, block: `plugins/kubernetes.io/csi/volumeDevices/staging/<pv>`;
//! - publish, filesystem: `pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`;
//! - publish, block: `plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<pod uid>`.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use super::beneath::Beneath;

/// Which request paths a node service accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Layout {
    /// Only the paths kubelet builds (see the module doc).
    #[default]
    Kubelet,
    /// Any path beneath the kubelet directory: for csi-sanity, which makes
    /// its own staging and target directories.
    Beneath,
}

/// The field a path comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// staging_target_path
    Staging,
    /// target_path
    Target,
    /// volume_path (stats, expansion): either of the above
    Volume,
}

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("{0:?} contains \"..\", \".\", \"//\" or a NUL byte")]
    NotNormal(String),
    #[error("{path:?} is not beneath {root:?}")]
    Outside { path: String, root: String },
    #[error("{path:?} is not a path kubelet gives for {role}: expected {expected}")]
    NotKubelet {
        path: String,
        role: &'static str,
        expected: &'static str,
    },
    #[error("{path:?} runs through a symlink or leaves {root:?}; request paths must not")]
    Symlink { path: String, root: String },
    #[error("{path:?} runs through something that is not a directory")]
    NotDirectory { path: String },
    #[error("{path:?} is too long")]
    TooLong { path: String },
    #[error("opening {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl PathError {
    /// Whether the path is simply not there (which some calls answer with
    /// NotFound or success rather than InvalidArgument).
    pub fn is_missing(&self) -> bool {
        matches!(self, PathError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

const STAGING: &str = "<kubelet-dir>/plugins/kubernetes.io/csi/<driver>/<sha256>/globalmount, \
     .../csi/pv/<pv>/globalmount or .../csi/volumeDevices/staging/<pv>";
const TARGET: &str = "<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount or \
     <kubelet-dir>/plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<pod-uid>";
const VOLUME: &str = "a staging or target path kubelet gives";

fn is_staging(rel: &[&OsStr]) -> bool {
    let s: Vec<&[u8]> = rel.iter().map(|c| c.as_encoded_bytes()).collect();
    matches!(
        s[..],
        [
            b"plugins",
            b"kubernetes.io",
            b"csi",
            b"volumeDevices",
            b"staging",
            _
        ]
    ) || matches!(s[..], [b"plugins", b"kubernetes.io", b"csi", d, _, b"globalmount"] if d != b"volumeDevices")
}

fn is_target(rel: &[&OsStr]) -> bool {
    let s: Vec<&[u8]> = rel.iter().map(|c| c.as_encoded_bytes()).collect();
    matches!(
        s[..],
        [b"pods", _, b"volumes", b"kubernetes.io~csi", _, b"mount"]
            | [
                b"plugins",
                b"kubernetes.io",
                b"csi",
                b"volumeDevices",
                b"publish",
                _,
                _
            ]
    )
}

/// Checks `requested` as text: absolute, normal, beneath `root`, and of a
/// shape `layout` allows for `role`. Returns the components below `root`.
pub fn check<'a>(
    requested: &'a str,
    root: &Path,
    layout: Layout,
    role: Role,
) -> Result<Vec<&'a OsStr>, PathError> {
    let path = Path::new(requested);
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute(requested.into()));
    }
    // Path::components quietly drops "." and repeated slashes; refuse
    // them instead, so that the path checked is the path used.
    let normal = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal
        || requested.contains('\0')
        || requested.contains("//")
        || requested.contains("/./")
        || requested.ends_with("/.")
        || requested.ends_with('/')
    {
        return Err(PathError::NotNormal(requested.into()));
    }
    let rel: Vec<&OsStr> = match path.strip_prefix(root) {
        Ok(rel) => rel.iter().collect(),
        Err(_) => {
            return Err(PathError::Outside {
                path: requested.into(),
                root: root.display().to_string(),
            });
        }
    };
    if rel.is_empty() {
        return Err(PathError::Outside {
            path: requested.into(),
            root: root.display().to_string(),
        });
    }
    let (fits, name, expected) = match role {
        Role::Staging => (is_staging(&rel), "a staging path", STAGING),
        Role::Target => (is_target(&rel), "a target path", TARGET),
        Role::Volume => (is_staging(&rel) || is_target(&rel), "a volume path", VOLUME),
    };
    if layout == Layout::Kubelet && !fits {
        return Err(PathError::NotKubelet {
            path: requested.into(),
            role: name,
            expected,
        });
    }
    Ok(rel)
}

/// `check`, then opens the directory holding the path beneath `root`
/// without following symlinks (creating missing directories when
/// `create`).
pub fn resolve(
    requested: &str,
    root: &Path,
    layout: Layout,
    role: Role,
    create: bool,
) -> Result<Beneath, PathError> {
    let (canonical, rel) = check_against(requested, root, layout, role)?;
    Beneath::resolve(&canonical, &rel, create).map_err(|source| opening(requested, root, source))
}

/// `check` against the root as configured or as the kernel names it:
/// kubelet names paths by its --root-dir, which may itself be a symlink;
/// mountinfo names them by what it resolves to.
fn check_against<'a>(
    requested: &'a str,
    root: &Path,
    layout: Layout,
    role: Role,
) -> Result<(PathBuf, Vec<&'a OsStr>), PathError> {
    let canonical = canonical_root(root);
    let rel = check(requested, root, layout, role)
        .or_else(|e| check(requested, &canonical, layout, role).map_err(|_| e))?;
    Ok((canonical, rel))
}

/// The text checks of `resolve` alone, for a request's validation before
/// anything is looked at on disk.
pub fn check_only(
    requested: &str,
    root: &Path,
    layout: Layout,
    role: Role,
) -> Result<(), PathError> {
    check_against(requested, root, layout, role).map(drop)
}

/// What an error from opening a request path means for the caller.
pub fn opening(requested: &str, root: &Path, source: std::io::Error) -> PathError {
    let path = requested.to_string();
    match source.raw_os_error() {
        Some(libc::ELOOP | libc::EXDEV) => PathError::Symlink {
            path,
            root: root.display().to_string(),
        },
        Some(libc::ENOTDIR) => PathError::NotDirectory { path },
        Some(libc::ENAMETOOLONG) => PathError::TooLong { path },
        _ => PathError::Io { path, source },
    }
}

/// The root as the kernel names it (symlinks in the configured kubelet
/// directory resolved), so that paths compare with mountinfo's.
pub fn canonical_root(root: &Path) -> PathBuf {
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROOT: &str = "/var/lib/kubelet";

    fn ok(p: &str, role: Role) -> bool {
        check(p, Path::new(ROOT), Layout::Kubelet, role).is_ok()
    }

    #[test]
    fn kubelets_own_shapes_are_accepted() {
        let sha = "a".repeat(64);
        let staging = [
            format!("{ROOT}/plugins/kubernetes.io/csi/local.stowage.dev/{sha}/globalmount"),
            format!("{ROOT}/plugins/kubernetes.io/csi/pv/pvc-1/globalmount"),
            format!("{ROOT}/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-1"),
        ];
        let target = [
            format!("{ROOT}/pods/0f-1/volumes/kubernetes.io~csi/pvc-1/mount"),
            format!("{ROOT}/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/0f-1"),
        ];
        for p in &staging {
            assert!(
                ok(p, Role::Staging) && ok(p, Role::Volume) && !ok(p, Role::Target),
                "{p}"
            );
        }
        for p in &target {
            assert!(
                ok(p, Role::Target) && ok(p, Role::Volume) && !ok(p, Role::Staging),
                "{p}"
            );
        }
    }

    #[test]
    fn other_paths_are_refused_with_the_shapes() {
        for p in [
            format!("{ROOT}/pods/x/volumes/kubernetes.io~csi/pvc-1/mount/deeper"),
            format!("{ROOT}/pods/x/volumes/kubernetes.io~empty-dir/v/mount"),
            format!("{ROOT}/plugins/kubernetes.io/csi/volumeDevices/x/globalmount"),
            format!("{ROOT}/plugins_registry/x"),
            format!("{ROOT}/pods"),
        ] {
            let e = check(&p, Path::new(ROOT), Layout::Kubelet, Role::Target).unwrap_err();
            assert!(matches!(e, PathError::NotKubelet { .. }), "{p}: {e}");
            assert!(
                e.to_string().contains("kubernetes.io~csi/<pv>/mount"),
                "{e}"
            );
        }
    }

    #[test]
    fn text_that_is_not_one_plain_path_is_refused() {
        let root = Path::new(ROOT);
        let refused = |p: &str| check(p, root, Layout::Beneath, Role::Target).unwrap_err();
        assert!(matches!(refused("relative/x"), PathError::NotAbsolute(_)));
        for p in [
            "/var/lib/kubelet/../etc",
            "/var/lib/kubelet/./x",
            "/var/lib/kubelet//x",
            "/var/lib/kubelet/x/",
            "/var/lib/kubelet/x\0y",
        ] {
            assert!(matches!(refused(p), PathError::NotNormal(_)), "{p:?}");
        }
        for p in ["/etc/passwd", "/var/lib/kubeletx/a", "/var/lib/kubelet"] {
            assert!(matches!(refused(p), PathError::Outside { .. }), "{p:?}");
        }
    }

    proptest! {
        #[test]
        fn nothing_accepted_lies_outside_the_root(
            parts in proptest::collection::vec("[a-z.~]{1,4}|\\.\\.|\\.|", 0..8),
            layout in prop_oneof![Just(Layout::Kubelet), Just(Layout::Beneath)],
        ) {
            let p = format!("{ROOT}/{}", parts.join("/"));
            if let Ok(rel) = check(&p, Path::new(ROOT), layout, Role::Volume) {
                prop_assert!(!rel.is_empty());
                prop_assert!(rel.iter().all(|c| *c != ".." && *c != "." && !c.is_empty()));
                let mut joined = PathBuf::from(ROOT);
                joined.extend(&rel);
                prop_assert_eq!(joined, PathBuf::from(&p));
            }
        }
    }
}
