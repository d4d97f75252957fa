//! PVs a pending claim could bind, kept up to date from the PV watch: the
//! unclaimed PVs of each class (kcm's static match candidates) and the PV
//! whose claimRef names a claim. A claim looking for its PV reads these
//! few, not every PV in the cluster.

use std::collections::{BTreeSet, HashMap};

use crate::controller::cached_pv::Pv;
use kube::ResourceExt;

/// Namespace and name of a claim.
type ClaimKey = (String, String);

#[derive(Debug, Default)]
pub struct StaticPvs {
    /// PV name → what it was indexed under, to undo on change.
    indexed: HashMap<String, Entry>,
    unclaimed: HashMap<String, BTreeSet<String>>,
    by_claim: HashMap<ClaimKey, BTreeSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// No claimRef: a candidate for claims of this class.
    Unclaimed(String),
    /// Reserved for (or bound to) this claim.
    Claimed(ClaimKey),
}

impl StaticPvs {
    pub fn apply(&mut self, pv: &Pv) {
        let name = pv.name_any();
        self.remove(&name);
        let spec = pv.spec.as_ref();
        let entry = match spec.and_then(|s| s.claim_ref.as_ref()) {
            Some(r) => Entry::Claimed((
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            )),
            None => Entry::Unclaimed(
                spec.and_then(|s| s.storage_class_name.clone())
                    .unwrap_or_default(),
            ),
        };
        match &entry {
            Entry::Unclaimed(class) => self.unclaimed.entry(class.clone()).or_default(),
            Entry::Claimed(claim) => self.by_claim.entry(claim.clone()).or_default(),
        }
        .insert(name.clone());
        self.indexed.insert(name, entry);
    }

    pub fn delete(&mut self, pv: &Pv) {
        self.remove(&pv.name_any());
    }

    fn remove(&mut self, name: &str) {
        let Some(entry) = self.indexed.remove(name) else {
            return;
        };
        match entry {
            Entry::Unclaimed(class) => remove_from(&mut self.unclaimed, &class, name),
            Entry::Claimed(claim) => remove_from(&mut self.by_claim, &claim, name),
        }
    }

    /// The PVs a claim of `class` in `namespace`/`name` could bind:
    /// the class's unclaimed PVs and any PV whose claimRef names it.
    pub fn candidates(&self, class: &str, namespace: &str, name: &str) -> Vec<String> {
        let key = (namespace.to_string(), name.to_string());
        self.unclaimed
            .get(class)
            .into_iter()
            .chain(self.by_claim.get(&key))
            .flatten()
            .cloned()
            .collect()
    }
}

fn remove_from<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, BTreeSet<String>>,
    key: &K,
    name: &str,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(name);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pv(name: &str, class: &str, claim: Option<&str>) -> Pv {
        let claim_ref = claim.map(|c| json!({ "namespace": "ns", "name": c }));
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "storageClassName": class, "claimRef": claim_ref },
        }))
        .unwrap()
    }

    #[test]
    fn candidates_follow_claim_refs_and_classes() {
        let mut index = StaticPvs::default();
        index.apply(&pv("free-fast", "fast", None));
        index.apply(&pv("free-slow", "slow", None));
        index.apply(&pv("taken", "fast", Some("other")));
        index.apply(&pv("mine", "fast", Some("c")));
        assert_eq!(index.candidates("fast", "ns", "c"), ["free-fast", "mine"]);
        // Claimed since: no longer a candidate for anyone else.
        index.apply(&pv("free-fast", "fast", Some("other")));
        assert_eq!(index.candidates("fast", "ns", "c"), ["mine"]);
        index.delete(&pv("mine", "fast", Some("c")));
        assert!(index.candidates("fast", "ns", "c").is_empty());
        assert_eq!(index.candidates("slow", "ns", "x"), ["free-slow"]);
        index.delete(&pv("free-slow", "slow", None));
        assert!(index.indexed.len() == 2 && index.unclaimed.is_empty());
    }
}
