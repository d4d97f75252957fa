//! Versions of objects that this replica's own writes replaced.
//!
//! A job that writes one object twice in a pass (the claim's `volumeName`,
//! then its status) is woken again by the watch event of the first write,
//! after the second one is already done. The cache then shows a version
//! that no longer exists; a plan made from it repeats the second write,
//! which the API server refuses (409), and the job plans once more. Under
//! a burst that was most claims: the repeat costs a request, a requeue and
//! a plan each. Knowing which versions it replaced, the job waits for the
//! watch instead: the event of its newest write is still to come, and
//! wakes it again.
//!
//! Versions are opaque strings: a version is known stale only because this
//! replica wrote over it, never by comparing it with another.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Superseded {
    /// Replaced versions, by object uid.
    replaced: Mutex<HashMap<String, Vec<String>>>,
}

impl Superseded {
    /// A write to the object `uid` over its version `old` succeeded.
    pub fn replaced(&self, uid: &str, old: &str) {
        let mut replaced = self.replaced.lock().expect("superseded poisoned");
        let versions = replaced.entry(uid.to_string()).or_default();
        if !versions.iter().any(|v| v == old) {
            versions.push(old.to_string());
        }
    }

    /// Whether `version` of the object `uid` is one that this replica's
    /// writes replaced, so the watch has a newer version still to deliver.
    /// Any other version means the cache has caught up (or someone else
    /// wrote since): what was recorded for the object is dropped.
    pub fn is_stale(&self, uid: &str, version: &str) -> bool {
        let mut replaced = self.replaced.lock().expect("superseded poisoned");
        match replaced.get(uid) {
            Some(versions) if versions.iter().any(|v| v == version) => true,
            Some(_) => {
                replaced.remove(uid);
                false
            }
            None => false,
        }
    }

    /// The object is gone: no event of it is still to come.
    pub fn forget(&self, uid: &str) {
        self.replaced
            .lock()
            .expect("superseded poisoned")
            .remove(uid);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.replaced.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_written_over_are_stale_until_the_watch_delivers_a_newer_one() {
        let s = Superseded::default();
        // volumeName patch over "10" gave "11"; status patch over "11" gave "12".
        s.replaced("uid", "10");
        s.replaced("uid", "11");
        assert!(s.is_stale("uid", "10"));
        assert!(s.is_stale("uid", "11"));
        assert!(!s.is_stale("uid", "12"), "our newest write is current");
        assert_eq!(s.len(), 0, "caught up: nothing left to remember");
        assert!(
            !s.is_stale("uid", "11"),
            "once caught up, no version is held back again"
        );
    }

    #[test]
    fn a_version_written_by_someone_else_is_acted_on() {
        let s = Superseded::default();
        s.replaced("uid", "10");
        assert!(!s.is_stale("uid", "15"));
        assert!(!s.is_stale("other-uid", "10"), "versions are per object");
    }

    #[test]
    fn the_version_a_failed_write_left_is_not_held_back() {
        let s = Superseded::default();
        // volumeName patch over "10" gave "11"; the status patch then failed:
        // "11" is the newest version and must be planned from again.
        s.replaced("uid", "10");
        assert!(!s.is_stale("uid", "11"));
    }

    #[test]
    fn a_deleted_object_is_forgotten() {
        let s = Superseded::default();
        s.replaced("uid", "10");
        s.forget("uid");
        assert_eq!(s.len(), 0);
        assert!(!s.is_stale("uid", "10"));
    }
}
