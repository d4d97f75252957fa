//! Request paths opened without following symlinks and without leaving
//! the kubelet directory: `openat2(2)` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS` from a descriptor of the root, one component at a
//! time. What the node then does to the path (create, mount on, unmount,
//! remove) goes through the descriptor it got, so a symlink planted after
//! the check cannot redirect it: there is no check-then-use gap.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A path beneath a root: the directory holding it, open, and its name
/// there. The object itself is opened on demand, because it changes when
/// something is mounted on it.
#[derive(Debug)]
pub struct Beneath {
    parent: OwnedFd,
    name: OsString,
    /// The path the request gave, for mountinfo and messages.
    pub path: PathBuf,
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// openat2 of one relative name under `dir`, refusing symlinks, magic
/// links and anything that resolves outside `dir`.
fn openat2(dir: RawFd, name: &OsStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // RESOLVE_NO_SYMLINKS refuses a final symlink too (ELOOP).
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { 0o640 } else { 0 };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `name` is NUL-terminated and `how` is a valid open_how of
    // the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn mkdirat(dir: RawFd, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: `c` is NUL-terminated; mkdirat never follows a final symlink.
    match check(unsafe { libc::mkdirat(dir, c.as_ptr(), 0o750) }) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

/// `/proc/<pid>/fd/<n>`: a name for an open descriptor that other
/// processes we start (mount(8)) can use too. The kernel resolves it to
/// the very file the descriptor holds, whatever its path now names.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

impl Beneath {
    /// Opens the directory holding `rel` (relative, normal components
    /// only) beneath `root`, creating the missing ones when `create`.
    pub fn resolve(root: &Path, rel: &[&OsStr], create: bool) -> io::Result<Beneath> {
        let (name, dirs) = rel
            .split_last()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))?;
        let root_c = cstr(root.as_os_str())?;
        // SAFETY: `root_c` is NUL-terminated. The root is configuration,
        // trusted to follow its own symlinks (/var/lib/kubelet may be one).
        let fd = check(unsafe {
            libc::open(
                root_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
        for component in dirs {
            if create {
                mkdirat(dir.as_raw_fd(), component)?;
            }
            dir = openat2(dir.as_raw_fd(), component, libc::O_PATH | libc::O_DIRECTORY)?;
        }
        let mut path = root.to_path_buf();
        path.extend(rel);
        Ok(Beneath {
            parent: dir,
            name: name.to_os_string(),
            path,
        })
    }

    /// The object at the path as it is now (the root of whatever is
    /// mounted there, if anything); None when there is nothing.
    pub fn open(&self) -> io::Result<Option<OwnedFd>> {
        match openat2(self.parent.as_raw_fd(), &self.name, libc::O_PATH) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A directory at the path, made if missing.
    pub fn mkdir(&self) -> io::Result<OwnedFd> {
        mkdirat(self.parent.as_raw_fd(), &self.name)?;
        openat2(
            self.parent.as_raw_fd(),
            &self.name,
            libc::O_PATH | libc::O_DIRECTORY,
        )
    }

    /// A regular file at the path (a block volume's bind target), made if
    /// missing.
    pub fn create_file(&self) -> io::Result<OwnedFd> {
        openat2(
            self.parent.as_raw_fd(),
            &self.name,
            libc::O_CREAT | libc::O_WRONLY,
        )
    }

    /// Unmounts the topmost mount at the path. The path is looked up from
    /// the parent's descriptor and a final symlink is not followed; the
    /// mount itself is not held open, which would make it busy.
    pub fn unmount(&self) -> io::Result<()> {
        let mut through = fd_path(&self.parent).into_os_string();
        through.push("/");
        through.push(&self.name);
        let c = cstr(&through)?;
        // SAFETY: `c` is NUL-terminated.
        check(unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) }).map(drop)
    }

    /// Removes what is at the path (a directory or a file), if anything.
    pub fn remove(&self) -> io::Result<()> {
        let c = cstr(&self.name)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        let dir = self.parent.as_raw_fd();
        // SAFETY: `c` is NUL-terminated and `st` writable.
        let rc =
            unsafe { libc::fstatat(dir, c.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        match check(rc) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // SAFETY: fstatat returned 0, so it filled `st`.
        let is_dir = unsafe { st.assume_init() }.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: `c` is NUL-terminated; unlinkat never follows symlinks.
        match check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("stowage-beneath-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn rel(s: &str) -> Vec<&OsStr> {
        s.split('/').map(OsStr::new).collect()
    }

    #[test]
    fn creates_and_removes_beneath_the_root() {
        let r = root("create");
        let b = Beneath::resolve(&r, &rel("a/b/c"), true).unwrap();
        assert_eq!(b.path, r.join("a/b/c"));
        assert!(b.open().unwrap().is_none());
        b.mkdir().unwrap();
        assert!(r.join("a/b/c").is_dir());
        b.remove().unwrap();
        assert!(!r.join("a/b/c").exists());
        b.remove().unwrap();
        let _ = std::fs::remove_dir_all(&r);
    }

    #[test]
    fn symlinks_anywhere_are_refused() {
        let r = root("symlink");
        let outside = root("symlink-outside");
        std::os::unix::fs::symlink(&outside, r.join("out")).unwrap();
        std::os::unix::fs::symlink("sub", r.join("inside")).unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        for path in ["out/x", "inside/x"] {
            let e = Beneath::resolve(&r, &rel(path), true).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{path}: {e}");
        }
        // The final component: neither followed nor replaced.
        let b = Beneath::resolve(&r, &rel("out"), true).unwrap();
        assert_eq!(b.mkdir().unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(
            b.create_file().unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        assert_eq!(b.open().unwrap_err().raw_os_error(), Some(libc::ELOOP));
        b.remove().unwrap();
        assert!(outside.is_dir(), "removing the link removed its target");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        let _ = std::fs::remove_dir_all(&r);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
