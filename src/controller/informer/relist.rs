//! The relist diff: a watch that was cut lists again, and whatever the
//! new list lacks (or holds with another UID) was deleted meanwhile.

use std::collections::HashMap;
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Kind;

/// A relist in progress: the cache as it was before the list began.
pub(crate) struct Relist<K: Kind> {
    before: HashMap<ObjectRef<K>, Arc<K>>,
}

impl<K: Kind> Default for Relist<K> {
    fn default() -> Self {
        Relist {
            before: HashMap::new(),
        }
    }
}

/// What a relist changed in the cache.
#[derive(Debug)]
pub(crate) struct RelistChanges<K> {
    /// Gone from the list, or replaced by a new object of the same name.
    pub deleted: Vec<Arc<K>>,
    /// New, or changed since the cache last saw them.
    pub changed: Vec<Arc<K>>,
}

impl<K: Kind> Relist<K> {
    pub fn begin(before: Vec<Arc<K>>) -> Self {
        Relist {
            before: before
                .into_iter()
                .map(|o| (ObjectRef::from_obj(o.as_ref()), o))
                .collect(),
        }
    }

    /// Compares the list that replaced the cache (`after`) with the cache.
    pub fn finish(mut self, after: &[Arc<K>]) -> RelistChanges<K> {
        let mut changes = RelistChanges {
            deleted: Vec::new(),
            changed: Vec::new(),
        };
        for o in after {
            match self.before.remove(&ObjectRef::from_obj(o.as_ref())) {
                Some(old) if old.uid() != o.uid() => {
                    changes.deleted.push(old);
                    changes.changed.push(o.clone());
                }
                Some(old) if old.resource_version() == o.resource_version() => {}
                _ => changes.changed.push(o.clone()),
            }
        }
        changes.deleted.extend(self.before.into_values());
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    use crate::testing::config_map as object;

    fn names(objects: &[Arc<ConfigMap>]) -> Vec<String> {
        let mut names: Vec<_> = objects.iter().map(|o| o.name_any()).collect();
        names.sort();
        names
    }

    #[test]
    fn relist_compares_by_uid_and_version() {
        let before = vec![
            Arc::new(object("same", "1", "1")),
            Arc::new(object("changed", "2", "1")),
            Arc::new(object("gone", "3", "1")),
            Arc::new(object("replaced", "4", "1")),
        ];
        let after = vec![
            Arc::new(object("same", "1", "1")),
            Arc::new(object("changed", "2", "2")),
            Arc::new(object("replaced", "5", "2")),
            Arc::new(object("new", "6", "1")),
        ];
        let changes = Relist::begin(before).finish(&after);
        assert_eq!(names(&changes.deleted), ["gone", "replaced"]);
        assert_eq!(names(&changes.changed), ["changed", "new", "replaced"]);
    }
}
