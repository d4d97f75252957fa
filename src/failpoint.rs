//! Crash points for the crash-safety tests: with `STOWAGE_FAILPOINT=<name>`
//! set, the process aborts (as if killed with SIGKILL) the first time it
//! reaches `hit(<name>)`. Unset, `hit` costs one comparison.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| {
        std::env::var("STOWAGE_FAILPOINT")
            .ok()
            .filter(|s| !s.is_empty())
    });
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
