//! Claims not bound yet, indexed by what they wait for, kept up to date
//! from the claim watch: so that a Volume deleted wakes only the claims
//! its room could serve, and the backlog gauge is a sum over classes, not a
//! scan of every claim in the cluster on every reconcile.

use std::collections::{BTreeMap, HashMap, HashSet};

use kube::runtime::reflector::ObjectRef;

use super::protocol::ANN_SELECTED_NODE;
use crate::controller::cached_claim::Claim;

type Key = ObjectRef<Claim>;

/// Where a pending claim waits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    class: String,
    /// The node the scheduler picked (WaitForFirstConsumer), if any.
    node: Option<String>,
}

#[derive(Debug, Default)]
pub struct PendingClaims {
    claims: HashMap<Key, Waiting>,
    on_node: HashMap<String, HashSet<Key>>,
    /// Pending claims with no node picked, by class.
    unscheduled: HashMap<String, HashSet<Key>>,
    per_class: BTreeMap<String, usize>,
}

impl PendingClaims {
    /// A claim created or changed.
    pub fn apply(&mut self, claim: &Claim) {
        let key = ObjectRef::from_obj(claim);
        self.remove(&key);
        let pending = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .filter(|c| !c.is_empty());
        let (true, Some(class)) = (pending, class) else {
            return;
        };
        let node = claim.annotations().get(ANN_SELECTED_NODE).cloned();
        match &node {
            Some(node) => self.on_node.entry(node.clone()).or_default(),
            None => self.unscheduled.entry(class.clone()).or_default(),
        }
        .insert(key.clone());
        *self.per_class.entry(class.clone()).or_default() += 1;
        self.claims.insert(key, Waiting { class, node });
    }

    pub fn delete(&mut self, claim: &Claim) {
        self.remove(&ObjectRef::from_obj(claim));
    }

    fn remove(&mut self, key: &Key) {
        let Some(waiting) = self.claims.remove(key) else {
            return;
        };
        let (index, bucket) = match &waiting.node {
            Some(node) => (&mut self.on_node, node),
            None => (&mut self.unscheduled, &waiting.class),
        };
        if let Some(set) = index.get_mut(bucket) {
            set.remove(key);
            if set.is_empty() {
                index.remove(bucket);
            }
        }
        if let Some(n) = self.per_class.get_mut(&waiting.class) {
            *n -= 1;
            if *n == 0 {
                self.per_class.remove(&waiting.class);
            }
        }
    }

    /// Pending claims the scheduler placed on `node`.
    pub fn on_node(&self, node: &str) -> Vec<Key> {
        self.on_node
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Pending claims of `class` with no node picked yet.
    pub fn unscheduled(&self, class: &str) -> Vec<Key> {
        self.unscheduled
            .get(class)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Pending claims of the classes `counted` accepts.
    pub fn count(&self, mut counted: impl FnMut(&str) -> bool) -> usize {
        self.per_class
            .iter()
            .filter(|(class, _)| counted(class))
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(name: &str, class: &str, phase: &str, node: Option<&str>) -> Claim {
        let annotations: BTreeMap<_, _> =
            node.map(|n| (ANN_SELECTED_NODE, n)).into_iter().collect();
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "ns", "annotations": annotations },
            "spec": { "storageClassName": class },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    fn names(keys: Vec<Key>) -> Vec<String> {
        let mut names: Vec<_> = keys.into_iter().map(|k| k.name).collect();
        names.sort();
        names
    }

    #[test]
    fn claims_are_found_where_they_wait() {
        let mut index = PendingClaims::default();
        index.apply(&claim("wffc", "local", "Pending", Some("node-a")));
        index.apply(&claim("elsewhere", "local", "Pending", Some("node-b")));
        index.apply(&claim("immediate", "fast", "Pending", None));
        index.apply(&claim("bound", "fast", "Bound", None));
        assert_eq!(names(index.on_node("node-a")), ["wffc"]);
        assert_eq!(names(index.unscheduled("fast")), ["immediate"]);
        assert_eq!(index.count(|_| true), 3);
        assert_eq!(index.count(|c| c == "fast"), 1);
    }

    #[test]
    fn a_claim_moves_when_it_changes_and_leaves_when_bound_or_deleted() {
        let mut index = PendingClaims::default();
        index.apply(&claim("c", "local", "Pending", None));
        index.apply(&claim("c", "local", "Pending", Some("node-a")));
        assert!(index.unscheduled("local").is_empty());
        assert_eq!(names(index.on_node("node-a")), ["c"]);
        assert_eq!(index.count(|_| true), 1);
        index.apply(&claim("c", "local", "Bound", Some("node-a")));
        assert!(index.on_node("node-a").is_empty());
        assert_eq!(index.count(|_| true), 0);
        index.apply(&claim("d", "local", "Pending", None));
        index.delete(&claim("d", "local", "Pending", None));
        assert_eq!(index.count(|_| true), 0);
        assert!(
            index.claims.is_empty() && index.unscheduled.is_empty() && index.per_class.is_empty()
        );
    }
}
