//! A compact map for the small string maps of cached objects.
//!
//! A `BTreeMap` with a single entry allocates a whole leaf node, eleven
//! key and value slots (some 540 bytes for `String` keys and values), and
//! the maps of a cached claim, PV or Volume (capacity, requests, CSI volume
//! attributes, parameters) hold one or two entries. This keeps the entries
//! in one boxed slice sorted by key: exactly as many slots as entries, and
//! an empty map allocates nothing.
//!
//! It reads from a JSON object as a `BTreeMap` does (sorted by key, the
//! last of duplicate keys wins), writes the same object, has the same JSON
//! schema, and offers the reading half of its API. Lookups are binary
//! searches, which for a handful of entries is as fast as the tree. It is
//! meant to be built once, when the watch decodes or an object is made:
//! `insert` reallocates the slice each time, and code that changes a map
//! much, or an API that takes a `BTreeMap`, converts (`to_btree`).

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Index;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// A map stored as a boxed slice of entries sorted by key.
#[derive(Clone, PartialEq, Eq)]
pub struct CompactMap<K, V> {
    entries: Box<[(K, V)]>,
}

impl<K, V> CompactMap<K, V> {
    pub fn new() -> Self {
        CompactMap {
            entries: Box::new([]),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the entries take on the heap.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        size_of_val(&*self.entries)
    }

    /// The entries in key order, as `BTreeMap::iter` yields them.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter {
            inner: self.entries.iter(),
        }
    }
}

impl<K: Ord, V> CompactMap<K, V> {
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let at = self
            .entries
            .binary_search_by(|(k, _)| k.borrow().cmp(key))
            .ok()?;
        Some(&self.entries[at].1)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Adds or replaces the entry for `key`, giving back the value it
    /// replaced, as `BTreeMap::insert` does.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.entries.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(at) => Some(std::mem::replace(&mut self.entries[at].1, value)),
            Err(at) => {
                let mut entries = std::mem::take(&mut self.entries).into_vec();
                entries.insert(at, (key, value));
                self.entries = entries.into_boxed_slice();
                None
            }
        }
    }

    /// Sorts `entries` by key, keeping the last of equal keys as
    /// `BTreeMap::insert` would.
    fn from_entries(mut entries: Vec<(K, V)>) -> Self {
        // Stable, so that among equal keys the later entry stays later.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // dedup_by drops the first argument, the later of two equal keys;
        // swapping first moves its value into the one kept.
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        CompactMap {
            entries: entries.into_boxed_slice(),
        }
    }
}

impl<K: Clone + Ord, V: Clone> CompactMap<K, V> {
    /// A `BTreeMap` with the same entries, for code that needs one.
    pub fn to_btree(&self) -> BTreeMap<K, V> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl<K, V> Default for CompactMap<K, V> {
    fn default() -> Self {
        CompactMap::new()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for CompactMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// What `CompactMap::iter` returns: `(&K, &V)` as a `BTreeMap` yields.
#[derive(Clone, Debug)]
pub struct Iter<'a, K, V> {
    inner: std::slice::Iter<'a, (K, V)>,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<K, V> ExactSizeIterator for Iter<'_, K, V> {}

impl<'a, K, V> IntoIterator for &'a CompactMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Iter<'a, K, V> {
        self.iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for CompactMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        CompactMap::from_entries(iter.into_iter().collect())
    }
}

impl<K: Ord, V, const N: usize> From<[(K, V); N]> for CompactMap<K, V> {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for CompactMap<K, V> {
    fn from(map: BTreeMap<K, V>) -> Self {
        // Already sorted and unique.
        CompactMap {
            entries: map.into_iter().collect(),
        }
    }
}

impl<K: Ord, V: PartialEq> PartialEq<BTreeMap<K, V>> for CompactMap<K, V> {
    fn eq(&self, other: &BTreeMap<K, V>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

/// `map[key]`, panicking on a missing key as `BTreeMap` does.
impl<K, V, Q> Index<&Q> for CompactMap<K, V>
where
    K: Ord + Borrow<Q>,
    Q: Ord + ?Sized,
{
    type Output = V;

    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no entry found for key")
    }
}

impl<'de, K, V> Deserialize<'de> for CompactMap<K, V>
where
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
        where
            K: Deserialize<'de> + Ord,
            V: Deserialize<'de>,
        {
            type Value = CompactMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                // No more than serde's own cap on a size hint from input.
                let hint = access.size_hint().unwrap_or(0).min(4096);
                let mut entries = Vec::with_capacity(hint);
                while let Some(entry) = access.next_entry()? {
                    entries.push(entry);
                }
                Ok(CompactMap::from_entries(entries))
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// Serialized as the JSON object it was read from, so that a map can be
/// copied into a patch. The cached PV and claim holding one stay without
/// `Serialize` all the same: only the Volume, which stowage owns whole,
/// is written as an object.
impl<K: Serialize, V: Serialize> Serialize for CompactMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A `BTreeMap`'s schema, so that a CRD field changing to a `CompactMap`
/// leaves the CRD as it was.
impl<K: JsonSchema, V: JsonSchema> JsonSchema for CompactMap<K, V> {
    fn inline_schema() -> bool {
        BTreeMap::<K, V>::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        BTreeMap::<K, V>::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        BTreeMap::<K, V>::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        BTreeMap::<K, V>::json_schema(generator)
    }
}

/// A map of strings read alike whether it is a `BTreeMap` (as k8s-openapi
/// gives a StorageClass's parameters) or a `CompactMap` (a Volume's), for
/// the functions that check parameters of either.
pub trait StringMap {
    fn get(&self, key: &str) -> Option<&String>;

    /// The entries in key order.
    fn iter(&self) -> impl Iterator<Item = (&String, &String)>;

    fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(k, _)| k)
    }
}

impl StringMap for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&String> {
        BTreeMap::get(self, key)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        BTreeMap::iter(self)
    }
}

impl StringMap for CompactMap<String, String> {
    fn get(&self, key: &str) -> Option<&String> {
        CompactMap::get(self, key)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        CompactMap::iter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Map = CompactMap<String, String>;

    fn both(text: &str) -> (Map, BTreeMap<String, String>) {
        let compact: Map = serde_json::from_str(text).unwrap();
        let btree: BTreeMap<String, String> = serde_json::from_str(text).unwrap();
        (compact, btree)
    }

    #[test]
    fn reads_objects_as_a_btree_map_does() {
        let objects = [
            r#"{}"#,
            r#"{"storage": "10Gi"}"#,
            r#"{"z": "1", "a": "2", "m": "3", "b": "4", "y": "5"}"#,
            // serde_json passes duplicate keys on; BTreeMap keeps the last.
            r#"{"b": "1", "a": "2", "b": "3", "a": "4", "b": "5"}"#,
        ];
        for text in objects {
            let (compact, btree) = both(text);
            assert_eq!(compact, btree, "{text}");
            assert_eq!(compact.to_btree(), btree, "{text}");
            assert!(compact.iter().eq(btree.iter()), "{text}");
            assert_eq!(compact.len(), btree.len());
            assert_eq!(compact.is_empty(), btree.is_empty());
            for key in ["a", "b", "m", "storage", "absent"] {
                assert_eq!(compact.get(key), btree.get(key), "{text} {key}");
                assert_eq!(compact.contains_key(key), btree.contains_key(key));
            }
            assert_eq!(
                serde_json::to_value(&compact).unwrap(),
                serde_json::to_value(&btree).unwrap()
            );
        }
        let (dup, _) = both(r#"{"b": "1", "a": "2", "b": "3", "a": "4", "b": "5"}"#);
        assert_eq!(dup.get("a").map(String::as_str), Some("4"));
        assert_eq!(dup.get("b").map(String::as_str), Some("5"));
    }

    #[test]
    fn refuses_what_a_btree_map_refuses() {
        for value in [json!(null), json!([]), json!("a"), json!({"a": 1})] {
            let compact = serde_json::from_value::<Map>(value.clone()).is_err();
            let btree = serde_json::from_value::<BTreeMap<String, String>>(value).is_err();
            assert!(compact && btree);
        }
    }

    #[test]
    fn builds_from_entries_as_a_btree_map_does() {
        let entries = [("b", 1), ("a", 2), ("b", 3)].map(|(k, v)| (k.to_string(), v));
        let compact = CompactMap::from(entries.clone());
        assert_eq!(compact, BTreeMap::from(entries.clone()));
        assert_eq!(CompactMap::from(BTreeMap::from(entries)), compact);
    }

    #[test]
    fn inserts_as_a_btree_map_does() {
        let mut compact = Map::new();
        let mut btree = BTreeMap::new();
        for (k, v) in [("m", "1"), ("a", "2"), ("z", "3"), ("m", "4"), ("b", "5")] {
            let (k, v) = (k.to_string(), v.to_string());
            assert_eq!(compact.insert(k.clone(), v.clone()), btree.insert(k, v));
            assert_eq!(compact, btree);
        }
        assert_eq!(compact["m"], btree["m"]);
        assert_eq!(
            size_of_val(&*compact.entries),
            4 * size_of::<(String, String)>()
        );
    }

    #[test]
    #[should_panic(expected = "no entry found for key")]
    fn indexing_a_missing_key_panics() {
        let _ = &Map::new()["absent"];
    }

    #[test]
    fn has_a_btree_maps_schema() {
        fn schema<T: JsonSchema>() -> serde_json::Value {
            serde_json::to_value(schemars::schema_for!(T)).unwrap()
        }
        assert_eq!(schema::<Map>(), schema::<BTreeMap<String, String>>());
        assert_eq!(
            schema::<CompactMap<String, i64>>(),
            schema::<BTreeMap<String, i64>>()
        );
        assert_eq!(Map::schema_id(), BTreeMap::<String, String>::schema_id());
        assert_eq!(
            Map::inline_schema(),
            BTreeMap::<String, String>::inline_schema()
        );
    }

    #[test]
    fn reads_a_btree_map_and_a_compact_map_alike() {
        fn read(map: &impl StringMap) -> String {
            let found = (
                map.get("a"),
                map.contains_key("z"),
                map.keys().collect::<Vec<_>>(),
            );
            format!("{found:?} {:?}", map.iter().collect::<Vec<_>>())
        }
        let (compact, btree) = both(r#"{"b": "1", "a": "2"}"#);
        assert_eq!(read(&compact), read(&btree));
    }

    #[test]
    fn is_a_fraction_of_a_btree_map() {
        // A boxed slice is a pointer and a length, and the pointer being
        // non-null lets `Option` take no more room: the map fields of the
        // cached types cost what an `Option<BTreeMap>` (24 bytes) does or
        // less.
        assert!(size_of::<Map>() <= 16);
        assert!(size_of::<Option<Map>>() <= 16);
        // On the heap one entry takes one entry's room, where std's
        // BTreeMap allocates a leaf of eleven (2 * B - 1, B = 6) key and
        // value slots whatever it holds: 48 bytes here against some 540.
        let (one, _) = both(r#"{"storage": "10Gi"}"#);
        let entry = size_of::<(String, String)>();
        assert_eq!(size_of_val(&*one.entries), entry);
        // And an empty one allocates nothing.
        assert_eq!(size_of_val(&*Map::new().entries), 0);
    }
}
