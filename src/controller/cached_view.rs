//! What makes a slim cached type (`cached_pv`, `cached_claim`) stand for
//! its full Kubernetes kind: the full type's API coordinates, so `Api` and
//! the watches reach the same URL and can never drift from it, its
//! metadata, and a conversion from the full object (for tests and for code
//! that holds one from the API).
//!
//! The annotations move out of the metadata while the watch decodes, into
//! a `CompactMap` beside it: ObjectMeta's BTreeMap allocates a node of
//! eleven slots (some 560 bytes) for a claim's four protocol annotations
//! or a PV's one, on every cached object. `annotations()` on the slim type
//! reads them there, and takes precedence over kube's `ResourceExt`
//! method, which would read the now empty metadata field.

/// `cached_view!(Slim, Full, Wire { spec: Spec, status: Status })`:
/// `Slim` (with `metadata`, `annotations`, `spec` and `status` fields) is
/// served as `Full`, and decodes through `Wire`, which it defines.
macro_rules! cached_view {
    ($slim:ident, $full:ty, $wire:ident { spec: $spec:ty, status: $status:ty }) => {
        /// The object as the API sends it, before its annotations move.
        #[derive(Default, serde::Deserialize)]
        #[serde(default)]
        struct $wire {
            metadata: kube::api::ObjectMeta,
            spec: Option<$spec>,
            status: Option<$status>,
        }

        impl From<$wire> for $slim {
            fn from(mut wire: $wire) -> $slim {
                let annotations = wire.metadata.annotations.take().unwrap_or_default();
                $slim {
                    metadata: wire.metadata,
                    annotations: annotations.into(),
                    spec: wire.spec,
                    status: wire.status,
                }
            }
        }

        impl $slim {
            /// The object's annotations (not `metadata.annotations`, which
            /// the cached object leaves empty).
            pub fn annotations(&self) -> &$crate::compact_map::CompactMap<String, String> {
                &self.annotations
            }
        }

        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }

        impl From<&$full> for $slim {
            fn from(full: &$full) -> $slim {
                let json = serde_json::to_value(full).expect("a Kubernetes object serializes");
                serde_json::from_value(json).expect("a serialized object reads as its cached view")
            }
        }
    };
}

pub(crate) use cached_view;

/// The slim object's metadata is the full one's but for the annotations,
/// which sit beside it, all of them.
#[cfg(test)]
pub(crate) fn assert_annotations_moved(
    slim: &kube::api::ObjectMeta,
    annotations: &crate::compact_map::CompactMap<String, String>,
    full: &kube::api::ObjectMeta,
) {
    let mut meta = full.clone();
    let moved = meta.annotations.take().unwrap_or_default();
    assert!(!moved.is_empty(), "the fixture has annotations");
    assert_eq!(annotations, &moved, "moved out of the metadata");
    assert_eq!(slim, &meta);
}
