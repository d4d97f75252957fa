//! Paths that come in requests (target and staging paths) are checked before
//! anything is created or mounted: absolute, no `..`, and inside the allowed
//! root even after following symlinks.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("{0:?} contains \"..\" or other non-normal components")]
    NotNormal(String),
    #[error("{path:?} is outside {root:?}")]
    Outside { path: String, root: String },
}

/// Checks `requested` lexically, then resolves the longest existing prefix
/// and checks that it still lies under `root` (canonicalised).
pub fn check(requested: &str, root: &Path) -> Result<PathBuf, PathError> {
    let path = Path::new(requested);
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute(requested.into()));
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        || requested.contains('\0')
    {
        return Err(PathError::NotNormal(requested.into()));
    }
    let outside = || PathError::Outside {
        path: requested.into(),
        root: root.display().to_string(),
    };
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    if !path.starts_with(&root) {
        return Err(outside());
    }
    // Follow whatever exists of the path: a symlink there must not lead out.
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let resolved = existing.canonicalize().map_err(|_| outside())?;
    if !resolved.starts_with(&root) {
        return Err(outside());
    }
    Ok(rest.into_iter().rev().fold(resolved, |p, n| p.join(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn root() -> tempdir::TempDir {
        tempdir::TempDir::new()
    }

    mod tempdir {
        /// A directory removed on drop.
        pub struct TempDir(pub std::path::PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("stowage-paths-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                TempDir(p.canonicalize().unwrap())
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn accepts_paths_under_the_root() {
        let r = root();
        let p = format!("{}/pods/x/volumes/mount", r.0.display());
        assert_eq!(check(&p, &r.0).unwrap(), PathBuf::from(&p));
    }

    #[test]
    fn refuses_relative_dotdot_and_outside() {
        let r = root();
        assert!(matches!(
            check("relative/x", &r.0),
            Err(PathError::NotAbsolute(_))
        ));
        let up = format!("{}/../etc", r.0.display());
        assert!(matches!(check(&up, &r.0), Err(PathError::NotNormal(_))));
        assert!(matches!(
            check("/etc/passwd", &r.0),
            Err(PathError::Outside { .. })
        ));
    }

    #[test]
    fn refuses_symlinks_that_lead_out() {
        let r = root();
        std::os::unix::fs::symlink("/etc", r.0.join("escape")).unwrap();
        let p = format!("{}/escape/x", r.0.display());
        assert!(matches!(check(&p, &r.0), Err(PathError::Outside { .. })));
    }

    proptest! {
        #[test]
        fn nothing_accepted_lies_outside_the_root(parts in proptest::collection::vec("[a-z.]{1,4}|\\.\\.|/", 0..8)) {
            let r = root();
            let p = format!("{}/{}", r.0.display(), parts.join("/"));
            if let Ok(resolved) = check(&p, &r.0) {
                prop_assert!(resolved.starts_with(&r.0));
                prop_assert!(!resolved.components().any(|c| c == Component::ParentDir));
            }
        }
    }
}
