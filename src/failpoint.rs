//! Crash points for the crash-safety tests: with `STOWAGE_FAILPOINT=<name>`
//! set, the process ends the first time it reaches `hit(<name>)`, as if
//! killed with SIGKILL: `_exit`, so no destructor, flush, lease release or
//! shutdown path runs. Unset, `hit` costs one comparison.
//!
//! A test must tell this crash from any other way out (a panic exits 101, an
//! error 1, SIGTERM 0 or 143, SIGKILL 137), so the process first writes
//! `failpoint <name>: aborting` to stderr and the name to the file
//! `STOWAGE_FAILPOINT_MARKER` names (if set), then exits with `EXIT_STATUS`.

use std::sync::OnceLock;

/// The exit status of a process stopped by a failpoint, and of nothing else.
pub const EXIT_STATUS: i32 = 86;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| {
        std::env::var("STOWAGE_FAILPOINT")
            .ok()
            .filter(|s| !s.is_empty())
    });
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        if let Some(marker) = std::env::var_os("STOWAGE_FAILPOINT_MARKER") {
            // Best effort: a test that finds no marker fails, which is what
            // a marker that could not be written should make it do.
            let _ = std::fs::write(marker, name);
        }
        // SAFETY: _exit only ends the process; skipping destructors and
        // buffered output is the point.
        unsafe { libc::_exit(EXIT_STATUS) }
    }
}
