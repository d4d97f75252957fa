//! Size and free space of the filesystem holding a path.

/// Usage of the filesystem holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: i64,
    pub available_bytes: i64,
    pub used_bytes: i64,
    pub total_inodes: i64,
    pub free_inodes: i64,
}

pub fn statvfs(path: &std::path::Path) -> std::io::Result<FsUsage> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is writable.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize as i64;
    Ok(FsUsage {
        total_bytes: st.f_blocks as i64 * frsize,
        available_bytes: st.f_bavail as i64 * frsize,
        used_bytes: (st.f_blocks as i64 - st.f_bfree as i64) * frsize,
        total_inodes: st.f_files as i64,
        free_inodes: st.f_ffree as i64,
    })
}
