//! How a test's stowage process ended, and ending it the hard way: what the
//! crash and takeover tests need beyond harness.rs's start and stop.

use std::time::Duration;

use crate::harness::Process;

impl Process {
    /// Waits for the process to end by itself and returns its exit code
    /// (as hold.sh passes it on: 128+N for signal N); None on timeout.
    pub async fn exit_code_within(&mut self, timeout: Duration) -> Option<i32> {
        if !self.exited_within(timeout).await {
            return None;
        }
        let status = self.child.try_wait().expect("polling child")?;
        Some(status.code().expect("hold.sh exits, it is not killed"))
    }

    /// SIGKILLs the stowage process itself (not hold.sh, which would stop
    /// it gracefully): no shutdown path runs, no lease is released.
    pub fn kill9(&self) {
        let holder = self.child.id();
        let child = stowage_child_of(holder)
            .unwrap_or_else(|| panic!("no stowage process under hold.sh {holder}"));
        // SAFETY: kill(2) on a pid we just found as our own grandchild.
        let rc = unsafe { libc::kill(child, libc::SIGKILL) };
        let error = std::io::Error::last_os_error();
        assert_eq!(rc, 0, "kill -9 {child}: {error}");
    }
}

/// The pid of the `stowage` process whose parent is `parent`.
fn stowage_child_of(parent: u32) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && head.ends_with("(stowage")).then_some(pid)
        })
}
