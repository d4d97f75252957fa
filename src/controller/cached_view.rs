//! What makes a slim cached type (`cached_pv`, `cached_claim`) stand for
//! its full Kubernetes kind: the full type's API coordinates, so `Api` and
//! the watches reach the same URL and can never drift from it, its
//! metadata, and a conversion from the full object (for tests and for code
//! that holds one from the API).

/// `cached_view!(Slim, Full)`: `Slim` (with a `metadata: ObjectMeta`
/// field) is served as `Full`.
macro_rules! cached_view {
    ($slim:ty, $full:ty) => {
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
