//! PVs a pending claim could bind, kept up to date from the PV watch: the
//! unclaimed PVs of each class (kcm's static match candidates) and the PV
//! whose claimRef names a claim. A claim looking for its PV reads these
//! few, not every PV in the cluster.
//!
//! Nearly every PV of a cluster is bound, so the index holds about one
//! claim entry per PV: each PV's name and its claim are allocated once and
//! shared by the maps, and a claim named by one PV holds that name alone
//! rather than a set.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::controller::cached_pv::Pv;
use kube::ResourceExt;

/// Namespace and name of a claim, in one allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClaimKey {
    /// The namespace followed by the name.
    text: Arc<str>,
    /// Where the name starts. Compared along with `text`, so that no
    /// spelling of one pair can pass for another.
    split: usize,
}

impl ClaimKey {
    fn new(namespace: &str, name: &str) -> Self {
        ClaimKey {
            text: [namespace, name].concat().into(),
            split: namespace.len(),
        }
    }
}

/// The PVs naming one claim, in name order. Almost always one.
#[derive(Debug)]
enum Names {
    One(Arc<str>),
    /// Two or more, sorted and unique.
    Many(Vec<Arc<str>>),
}

impl Names {
    fn insert(&mut self, name: Arc<str>) {
        match self {
            Names::One(one) if *one == name => {}
            Names::One(one) => {
                let mut many = vec![one.clone(), name];
                many.sort();
                *self = Names::Many(many);
            }
            Names::Many(many) => {
                if let Err(at) = many.binary_search(&name) {
                    many.insert(at, name);
                }
            }
        }
    }

    /// Removes `name`; true once none is left.
    fn remove(&mut self, name: &str) -> bool {
        match self {
            Names::One(one) => &**one == name,
            Names::Many(many) => {
                if let Ok(at) = many.binary_search_by(|n| (**n).cmp(name)) {
                    many.remove(at);
                }
                if let [last] = many.as_slice() {
                    *self = Names::One(last.clone());
                }
                false
            }
        }
    }

    fn as_slice(&self) -> &[Arc<str>] {
        match self {
            Names::One(one) => std::slice::from_ref(one),
            Names::Many(many) => many,
        }
    }
}

#[derive(Debug, Default)]
pub struct StaticPvs {
    /// PV name → what it was indexed under, to undo on change.
    indexed: HashMap<Arc<str>, Entry>,
    unclaimed: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    by_claim: HashMap<ClaimKey, Names>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// No claimRef: a candidate for claims of this class.
    Unclaimed(Arc<str>),
    /// Reserved for (or bound to) this claim.
    Claimed(ClaimKey),
}

impl StaticPvs {
    pub fn apply(&mut self, pv: &Pv) {
        let name = pv.name_any();
        let name = self.remove(&name).unwrap_or_else(|| name.into());
        let spec = pv.spec.as_ref();
        let entry = match spec.and_then(|s| s.claim_ref.as_ref()) {
            Some(r) => {
                let key = ClaimKey::new(
                    r.namespace.as_deref().unwrap_or_default(),
                    r.name.as_deref().unwrap_or_default(),
                );
                let key = match self.by_claim.get_key_value(&key) {
                    Some((shared, _)) => shared.clone(),
                    None => key,
                };
                self.by_claim
                    .entry(key.clone())
                    .and_modify(|names| names.insert(name.clone()))
                    .or_insert_with(|| Names::One(name.clone()));
                Entry::Claimed(key)
            }
            None => {
                let class = spec
                    .and_then(|s| s.storage_class_name.as_deref())
                    .unwrap_or_default();
                let class = match self.unclaimed.get_key_value(class) {
                    Some((shared, _)) => shared.clone(),
                    None => Arc::from(class),
                };
                self.unclaimed
                    .entry(class.clone())
                    .or_default()
                    .insert(name.clone());
                Entry::Unclaimed(class)
            }
        };
        self.indexed.insert(name, entry);
    }

    pub fn delete(&mut self, pv: &Pv) {
        self.remove(&pv.name_any());
    }

    /// Undoes what `name` was indexed under, giving back its name to be
    /// indexed again without another allocation.
    fn remove(&mut self, name: &str) -> Option<Arc<str>> {
        let (name, entry) = self.indexed.remove_entry(name)?;
        match entry {
            Entry::Unclaimed(class) => {
                if let Some(set) = self.unclaimed.get_mut(&class) {
                    set.remove(&name);
                    if set.is_empty() {
                        self.unclaimed.remove(&class);
                    }
                }
            }
            Entry::Claimed(claim) => {
                if self
                    .by_claim
                    .get_mut(&claim)
                    .is_some_and(|n| n.remove(&name))
                {
                    self.by_claim.remove(&claim);
                }
            }
        }
        Some(name)
    }

    /// The PVs a claim of `class` in `namespace`/`name` could bind:
    /// the class's unclaimed PVs and any PV whose claimRef names it.
    pub fn candidates(&self, class: &str, namespace: &str, name: &str) -> Vec<String> {
        let key = ClaimKey::new(namespace, name);
        self.unclaimed
            .get(class)
            .into_iter()
            .flatten()
            .chain(
                self.by_claim
                    .get(&key)
                    .map(Names::as_slice)
                    .unwrap_or_default(),
            )
            .map(|n| n.to_string())
            .collect()
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

    #[test]
    fn several_pvs_naming_one_claim_are_all_candidates_in_name_order() {
        let mut index = StaticPvs::default();
        index.apply(&pv("free", "fast", None));
        for name in ["pv-c", "pv-a", "pv-b"] {
            index.apply(&pv(name, "fast", Some("c")));
        }
        // Applied again unchanged: listed once.
        index.apply(&pv("pv-a", "fast", Some("c")));
        assert_eq!(
            index.candidates("fast", "ns", "c"),
            ["free", "pv-a", "pv-b", "pv-c"]
        );
        index.delete(&pv("pv-b", "fast", Some("c")));
        assert_eq!(
            index.candidates("fast", "ns", "c"),
            ["free", "pv-a", "pv-c"]
        );
        index.delete(&pv("pv-a", "fast", Some("c")));
        assert_eq!(index.candidates("fast", "ns", "c"), ["free", "pv-c"]);
        // Moved to another claim: gone from this one's, and the claim with
        // it.
        index.apply(&pv("pv-c", "fast", Some("d")));
        assert_eq!(index.candidates("fast", "ns", "c"), ["free"]);
        assert_eq!(index.candidates("fast", "ns", "d"), ["free", "pv-c"]);
        assert_eq!(index.by_claim.len(), 1);
        // A claim's namespace and name are told apart however they split.
        assert!(index.candidates("fast", "n", "sd") == ["free"]);
    }
}
