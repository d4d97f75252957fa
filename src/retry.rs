//! Per-object exponential retry delays, shared by every job of both roles:
//! a failing object is retried at 1s, 2s, 4s... not in a loop, and one
//! success resets it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;

/// Cap for errors that can clear without anyone acting (a driver briefly
/// away, a conflict): retried often enough to notice soon.
const CAP_TRANSIENT: Duration = Duration::from_secs(16);
/// Cap for errors someone has to fix: no point asking every few seconds.
const CAP_NEEDS_FIX: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Failures {
    counts: Mutex<HashMap<String, u32>>,
}

impl Failures {
    /// Counts one more failure of `object`; returns how long to wait before
    /// the next try.
    pub fn backoff(&self, object: &ObjectReference, may_resolve_itself: bool) -> Duration {
        let mut counts = self.counts.lock().expect("failure map poisoned");
        let n = counts.entry(key(object)).or_default();
        *n = n.saturating_add(1);
        delay(*n, may_resolve_itself)
    }

    pub fn forget(&self, object: &ObjectReference) {
        self.counts
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
    fn errors_that_need_a_person_back_off_to_minutes() {
        let failures = Failures::default();
        let a = object("a");
        let last = (0..12).map(|_| failures.backoff(&a, false)).last();
        assert_eq!(last, Some(Duration::from_secs(300)));
    }
}
