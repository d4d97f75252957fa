//! Per-object exponential retry delays, shared by every job of both roles:
//! a failing object is retried at 1s, 2s, 4s... not in a loop, and one
//! success resets it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;

/// Cap for errors that can clear without anyone acting (a driver briefly
/// away, a conflict): retried often enough to notice soon.
const CAP_TRANSIENT: Duration = Duration::from_secs(16);
/// Cap for errors someone has to fix: no point asking every few seconds.
const CAP_NEEDS_FIX: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Failures {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    count: u32,
    retry_at: Instant,
}

/// A reconcile this close to its retry time is the retry itself.
const EARLY: Duration = Duration::from_millis(100);

impl Failures {
    /// Counts one more failure of `object`; returns how long to wait before
    /// the next try.
    pub fn backoff(&self, object: &ObjectReference, may_resolve_itself: bool) -> Duration {
        let mut entries = self.entries.lock().expect("failure map poisoned");
        let entry = entries.entry(key(object)).or_insert(Entry {
            count: 0,
            retry_at: Instant::now(),
        });
        entry.count = entry.count.saturating_add(1);
        let wait = delay(entry.count, may_resolve_itself);
        entry.retry_at = Instant::now() + wait;
        wait
    }

    /// How long `object` must still wait after its last failure, when a
    /// reconcile comes early: woken by a status write (our own report of
    /// that failure among them) rather than by its retry. A job calls this
    /// before repeating the failed call, so that the call is repeated at the
    /// backoff's pace, not at the pace of watch events.
    pub fn wait_left(&self, object: &ObjectReference) -> Option<Duration> {
        let entries = self.entries.lock().expect("failure map poisoned");
        let left = entries
            .get(&key(object))?
            .retry_at
            .saturating_duration_since(Instant::now());
        (left > EARLY).then_some(left)
    }

    pub fn forget(&self, object: &ObjectReference) {
        self.entries
            .lock()
            .expect("failure map poisoned")
            .remove(&key(object));
    }
}

/// The wait after the `n`th failure in a row (n ≥ 1).
fn delay(n: u32, may_resolve_itself: bool) -> Duration {
    let cap = if may_resolve_itself {
        CAP_TRANSIENT
    } else {
        CAP_NEEDS_FIX
    };
    Duration::from_secs(1u64 << (n.max(1) - 1).min(9)).min(cap)
}

fn key(object: &ObjectReference) -> String {
    format!(
        "{}/{}/{}",
        object.kind.as_deref().unwrap_or_default(),
        object.namespace.as_deref().unwrap_or_default(),
        object.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Volume".into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn delays_double_up_to_their_cap_and_reset_on_success() {
        let failures = Failures::default();
        let a = object("a");
        let seen: Vec<u64> = (0..7)
            .map(|_| failures.backoff(&a, true).as_secs())
            .collect();
        assert_eq!(seen, [1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(failures.backoff(&object("b"), true).as_secs(), 1);
        failures.forget(&a);
        assert_eq!(failures.backoff(&a, true).as_secs(), 1);
    }

    #[test]
    fn an_early_reconcile_learns_how_long_to_wait() {
        let failures = Failures::default();
        let a = object("a");
        assert_eq!(failures.wait_left(&a), None, "never failed");
        failures.backoff(&a, true);
        failures.backoff(&a, true);
        let left = failures.wait_left(&a).expect("2 s to wait");
        assert!(left > Duration::from_millis(1500) && left <= Duration::from_secs(2));
        failures.forget(&a);
        assert_eq!(failures.wait_left(&a), None, "forgotten on success");
    }

    #[test]
    fn errors_that_need_a_person_back_off_to_minutes() {
        let failures = Failures::default();
        let a = object("a");
        let last = (0..12).map(|_| failures.backoff(&a, false)).last();
        assert_eq!(last, Some(Duration::from_secs(300)));
    }
}
