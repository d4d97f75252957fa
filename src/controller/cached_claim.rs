//! The PersistentVolumeClaim as the controller caches it.
//!
//! As with the cached PV (`cached_pv`), this keeps the fields stowage
//! reads, named as k8s-openapi names them so reading code is the same,
//! and serde drops the rest while the watch decodes. k8s-openapi's claim
//! inlines every spec and status field, most of them nearly always absent;
//! here the rarely set references (dataSource, dataSourceRef, selector,
//! modifyVolumeStatus) are boxed, and the resource maps (requests,
//! capacity, allocated resources and their statuses), a BTreeMap's node of
//! eleven slots for their one entry, are `CompactMap`s, and so are the
//! annotations (`cached_view`). That takes the claim from 1008 bytes
//! inline to 672, most of it the ObjectMeta; the test below holds it
//! under 700.
//!
//! Whoever starts reading another claim field must add it here; a field
//! not here is silently absent from every cached claim. Conditions are
//! kept whole (k8s-openapi's type) because the resize job writes the list
//! back with one condition changed.
//!
//! A cached claim is not the whole object, so it must never be written
//! back whole (create, replace, server-side apply of the object): that
//! would erase what was dropped. It deliberately does not implement
//! `Serialize`, which makes kube refuse those calls at compile time;
//! writes go through patches of the fields they change.
//!
//! Every struct takes `#[serde(default)]`: k8s-openapi fills a missing
//! required field with its default, and one object that failed to decode
//! would fail the whole list of the watch.

use k8s_openapi::api::core::v1::{
    ModifyVolumeStatus, PersistentVolumeClaim, PersistentVolumeClaimCondition,
    TypedLocalObjectReference, TypedObjectReference,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ObjectMeta;
use serde::Deserialize;

use crate::compact_map::CompactMap;

/// A PersistentVolumeClaim with only what stowage reads of it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "ClaimWire")]
pub struct Claim {
    /// Without its annotations: see `annotations`.
    pub metadata: ObjectMeta,
    /// `metadata.annotations`, compact (`cached_view`).
    pub annotations: CompactMap<String, String>,
    pub spec: Option<ClaimSpec>,
    pub status: Option<ClaimStatus>,
}

/// The part of `PersistentVolumeClaimSpec` stowage reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClaimSpec {
    pub access_modes: Option<Vec<String>>,
    pub data_source: Option<Box<TypedLocalObjectReference>>,
    pub data_source_ref: Option<Box<TypedObjectReference>>,
    pub resources: Option<Resources>,
    pub selector: Option<Box<LabelSelector>>,
    pub storage_class_name: Option<String>,
    pub volume_attributes_class_name: Option<String>,
    pub volume_mode: Option<String>,
    pub volume_name: Option<String>,
}

/// The part of `VolumeResourceRequirements` stowage reads: no limits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub requests: Option<CompactMap<String, Quantity>>,
}

/// The part of `PersistentVolumeClaimStatus` stowage reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClaimStatus {
    pub allocated_resource_statuses: Option<CompactMap<String, String>>,
    pub allocated_resources: Option<CompactMap<String, Quantity>>,
    pub capacity: Option<CompactMap<String, Quantity>>,
    pub conditions: Option<Vec<PersistentVolumeClaimCondition>>,
    pub current_volume_attributes_class_name: Option<String>,
    pub modify_volume_status: Option<Box<ModifyVolumeStatus>>,
    pub phase: Option<String>,
}

super::cached_view::cached_view!(
    Claim,
    PersistentVolumeClaim,
    ClaimWire {
        spec: ClaimSpec,
        status: ClaimStatus
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{Api, Resource};
    use serde_json::json;

    /// A claim as the API server returns one mid-resize and mid-modify,
    /// with fields stowage drops (limits, status.accessModes) as well.
    fn full_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "data",
                "namespace": "ns",
                "uid": "c-1",
                "resourceVersion": "42",
                "labels": {"app": "db"},
                "annotations": {
                    "volume.kubernetes.io/storage-provisioner": "csi.example.com",
                    "pv.kubernetes.io/bind-completed": "yes",
                },
                "finalizers": ["kubernetes.io/pvc-protection"],
                "creationTimestamp": "2024-05-01T10:00:00Z",
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"},
                "dataSourceRef": {
                    "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                    "name": "snap", "namespace": "other",
                },
                "resources": {"requests": {"storage": "20Gi"}, "limits": {"storage": "30Gi"}},
                "selector": {
                    "matchLabels": {"tier": "fast"},
                    "matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}],
                },
                "storageClassName": "fast",
                "volumeAttributesClassName": "gold",
                "volumeMode": "Filesystem",
                "volumeName": "pvc-1234",
            },
            "status": {
                "phase": "Bound",
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "10Gi"},
                "allocatedResources": {"storage": "20Gi"},
                "allocatedResourceStatuses": {"storage": "ControllerResizeInProgress"},
                "conditions": [{
                    "type": "Resizing", "status": "True", "reason": "r", "message": "m",
                    "lastProbeTime": null, "lastTransitionTime": "2024-05-01T10:00:01Z",
                }],
                "currentVolumeAttributesClassName": "silver",
                "modifyVolumeStatus": {"status": "InProgress", "targetVolumeAttributesClassName": "gold"},
            },
        })
    }

    #[test]
    fn keeps_every_field_it_has_as_k8s_openapi_reads_it() {
        let full: PersistentVolumeClaim = serde_json::from_value(full_json()).unwrap();
        let slim: Claim = serde_json::from_value(full_json()).unwrap();
        assert_eq!(Claim::from(&full), slim);
        assert_eq!(slim.annotations(), &slim.annotations);
        super::super::cached_view::assert_annotations_moved(
            &slim.metadata,
            &slim.annotations,
            &full.metadata,
        );
        let (s, f) = (slim.spec.unwrap(), full.spec.unwrap());
        // The fixture sets every kept field, so a misspelt name shows.
        let set = [
            f.access_modes.is_some(),
            f.data_source.is_some(),
            f.data_source_ref.is_some(),
            f.selector.is_some(),
            f.storage_class_name.is_some(),
            f.volume_attributes_class_name.is_some(),
            f.volume_mode.is_some(),
            f.volume_name.is_some(),
        ];
        assert!(set.iter().all(|s| *s));
        assert_eq!(s.access_modes, f.access_modes);
        assert_eq!(s.data_source.map(|d| *d), f.data_source);
        assert_eq!(s.data_source_ref.map(|d| *d), f.data_source_ref);
        assert_eq!(s.selector.map(|d| *d), f.selector);
        assert_eq!(s.storage_class_name, f.storage_class_name);
        let attributes_class = &s.volume_attributes_class_name;
        assert_eq!(attributes_class, &f.volume_attributes_class_name);
        assert_eq!(s.volume_mode, f.volume_mode);
        assert_eq!(s.volume_name, f.volume_name);
        let requests = s.resources.unwrap().requests.unwrap();
        assert_eq!(requests, f.resources.unwrap().requests.unwrap());
        let (s, f) = (slim.status.unwrap(), full.status.unwrap());
        let set = [
            f.allocated_resource_statuses.is_some(),
            f.allocated_resources.is_some(),
            f.capacity.is_some(),
            f.conditions.is_some(),
            f.current_volume_attributes_class_name.is_some(),
            f.modify_volume_status.is_some(),
            f.phase.is_some(),
        ];
        assert!(set.iter().all(|s| *s));
        let statuses = s.allocated_resource_statuses.unwrap();
        assert_eq!(statuses, f.allocated_resource_statuses.unwrap());
        let allocated = s.allocated_resources.unwrap();
        assert_eq!(allocated, f.allocated_resources.unwrap());
        assert_eq!(s.capacity.unwrap(), f.capacity.unwrap());
        assert_eq!(s.conditions, f.conditions);
        let current = &s.current_volume_attributes_class_name;
        assert_eq!(current, &f.current_volume_attributes_class_name);
        assert_eq!(s.modify_volume_status.map(|m| *m), f.modify_volume_status);
        assert_eq!(s.phase, f.phase);
    }

    #[test]
    fn reads_a_claim_without_spec_or_status() {
        let claim: Claim = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
        assert_eq!(claim.metadata.name.as_deref(), Some("a"));
        assert_eq!((claim.spec, claim.status), (None, None));
    }

    #[test]
    fn is_well_below_the_full_claim_inline() {
        let (slim, full) = (size_of::<Claim>(), size_of::<PersistentVolumeClaim>());
        // 672 and 1008 bytes when written (the compact annotations beside
        // the metadata take 16); most of what is left is the ObjectMeta,
        // which both share.
        assert!(
            slim <= 700,
            "Claim is {slim} bytes, PersistentVolumeClaim {full}"
        );
        assert!(
            slim * 3 <= full * 2,
            "Claim is {slim} bytes, PersistentVolumeClaim {full}"
        );
    }

    #[test]
    fn is_listed_and_watched_where_the_full_claim_is() {
        type Full = PersistentVolumeClaim;
        assert_eq!(Claim::kind(&()), Full::kind(&()));
        assert_eq!(Claim::api_version(&()), Full::api_version(&()));
        assert_eq!(Claim::plural(&()), Full::plural(&()));
        assert_eq!(
            Claim::url_path(&(), Some("ns")),
            Full::url_path(&(), Some("ns"))
        );
        let _: fn(kube::Client, &str) -> Api<Claim> = Api::namespaced;
        let _: fn(kube::Client) -> Api<Claim> = Api::all;
    }
}
