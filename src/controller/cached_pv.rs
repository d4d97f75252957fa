//! The PersistentVolume as the controller caches it.
//!
//! k8s-openapi's `PersistentVolume` is 3.4 KB inline, because its spec
//! inlines some thirty volume sources (NFS, iSCSI, RBD, cloud disks...)
//! that stowage never reads; with tens of thousands of PVs in the cache
//! that was most of the controller's memory. This type keeps the fields
//! stowage reads, named as k8s-openapi names them so reading code is the
//! same, and serde drops the rest while the watch decodes. Dropping the
//! volume sources alone leaves 1.2 KB, so the parts that are big and
//! mostly unread are slimmed too: of the claimRef its name, namespace and
//! UID; of the status its phase; the CSI source's five secret references,
//! nearly always absent, are boxed (8 bytes when absent instead of 48).
//! The capacity and the volume attributes, a BTreeMap's node of eleven
//! slots for their one or two entries, are `CompactMap`s.
//! The test below holds the type under a quarter of the full one.
//!
//! Whoever starts reading another PV field must add it here; a field not
//! here is silently absent from every cached PV.
//!
//! A cached PV is not the whole object, so it must never be written back
//! whole (create, replace, server-side apply of the object): that would
//! erase what was dropped. It deliberately does not implement `Serialize`,
//! which makes kube refuse those calls at compile time; writes go through
//! patches of the fields they change.
//!
//! Every struct takes `#[serde(default)]`: k8s-openapi fills a missing
//! required field with its default, and one object that failed to decode
//! would fail the whole list of the watch.

use k8s_openapi::api::core::v1::{PersistentVolume, SecretReference, VolumeNodeAffinity};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use serde::Deserialize;

use crate::compact_map::CompactMap;

/// A PersistentVolume with only what stowage reads of it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "PvWire")]
pub struct Pv {
    /// Without its annotations: see `annotations`.
    pub metadata: ObjectMeta,
    /// `metadata.annotations`, compact (`cached_view`).
    pub annotations: CompactMap<String, String>,
    pub spec: Option<PvSpec>,
    pub status: Option<PvStatus>,
}

/// The part of `PersistentVolumeSpec` stowage reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PvSpec {
    pub access_modes: Option<Vec<String>>,
    pub capacity: Option<CompactMap<String, Quantity>>,
    pub claim_ref: Option<ClaimRef>,
    pub csi: Option<CsiSource>,
    pub mount_options: Option<Vec<String>>,
    pub node_affinity: Option<VolumeNodeAffinity>,
    pub persistent_volume_reclaim_policy: Option<String>,
    pub storage_class_name: Option<String>,
    pub volume_attributes_class_name: Option<String>,
    pub volume_mode: Option<String>,
}

/// The part of the claimRef (an `ObjectReference`) stowage reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClaimRef {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
}

/// `CSIPersistentVolumeSource`, its rarely set secret references boxed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CsiSource {
    pub driver: String,
    pub volume_handle: String,
    pub fs_type: Option<String>,
    pub read_only: Option<bool>,
    pub volume_attributes: Option<CompactMap<String, String>>,
    pub controller_expand_secret_ref: Option<Box<SecretReference>>,
    pub controller_publish_secret_ref: Option<Box<SecretReference>>,
    pub node_expand_secret_ref: Option<Box<SecretReference>>,
    pub node_publish_secret_ref: Option<Box<SecretReference>>,
    pub node_stage_secret_ref: Option<Box<SecretReference>>,
}

/// The part of `PersistentVolumeStatus` stowage reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PvStatus {
    pub phase: Option<String>,
}

super::cached_view::cached_view!(
    Pv,
    PersistentVolume,
    PvWire {
        spec: PvSpec,
        status: PvStatus
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{Api, Resource};
    use serde_json::json;

    /// A PV as the API server returns one of a CSI driver's, with the
    /// fields stowage drops (an NFS source here) as well.
    fn full_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": "pvc-1234",
                "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"team": "a"},
                "annotations": {"pv.kubernetes.io/provisioned-by": "csi.example.com"},
                "finalizers": ["kubernetes.io/pv-protection", "external-attacher/csi-example-com"],
                "creationTimestamp": "2024-05-01T10:00:00Z",
                "deletionTimestamp": "2024-05-02T10:00:00Z",
            },
            "spec": {
                "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
                "capacity": {"storage": "10Gi"},
                "claimRef": {
                    "kind": "PersistentVolumeClaim", "apiVersion": "v1",
                    "namespace": "ns", "name": "data", "uid": "c-1", "resourceVersion": "7",
                },
                "csi": {
                    "driver": "csi.example.com",
                    "volumeHandle": "vol-1",
                    "fsType": "ext4",
                    "readOnly": false,
                    "volumeAttributes": {"storage.kubernetes.io/csiProvisionerIdentity": "x"},
                    "controllerExpandSecretRef": {"name": "s", "namespace": "ns"},
                    "controllerPublishSecretRef": {"name": "p", "namespace": "ns"},
                    "nodeExpandSecretRef": {"name": "ne", "namespace": "ns"},
                    "nodePublishSecretRef": {"name": "np", "namespace": "ns"},
                    "nodeStageSecretRef": {"name": "ns", "namespace": "ns"},
                },
                "nfs": {"server": "nfs.example.com", "path": "/export"},
                "mountOptions": ["noatime"],
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "topology.example.com/zone", "operator": "In", "values": ["z1"]},
                ]}]}},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "fast",
                "volumeAttributesClassName": "gold",
                "volumeMode": "Filesystem",
            },
            "status": {
                "phase": "Bound",
                "message": "m",
                "reason": "r",
                "lastPhaseTransitionTime": "2024-05-01T10:00:01Z",
            },
        })
    }

    #[test]
    fn keeps_every_field_it_has_as_k8s_openapi_reads_it() {
        let full: PersistentVolume = serde_json::from_value(full_json()).unwrap();
        let slim: Pv = serde_json::from_value(full_json()).unwrap();
        assert_eq!(Pv::from(&full), slim);
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
            f.capacity.is_some(),
            f.mount_options.is_some(),
            f.node_affinity.is_some(),
            f.persistent_volume_reclaim_policy.is_some(),
            f.storage_class_name.is_some(),
            f.volume_attributes_class_name.is_some(),
            f.volume_mode.is_some(),
        ];
        assert!(set.iter().all(|s| *s));
        assert_eq!(s.access_modes, f.access_modes);
        assert_eq!(s.capacity.map(|c| c.to_btree()), f.capacity);
        assert_eq!(s.mount_options, f.mount_options);
        assert_eq!(s.node_affinity, f.node_affinity);
        let reclaim = &s.persistent_volume_reclaim_policy;
        assert_eq!(reclaim, &f.persistent_volume_reclaim_policy);
        assert_eq!(s.storage_class_name, f.storage_class_name);
        let attributes_class = &s.volume_attributes_class_name;
        assert_eq!(attributes_class, &f.volume_attributes_class_name);
        assert_eq!(s.volume_mode, f.volume_mode);
        let (r, fr) = (s.claim_ref.unwrap(), f.claim_ref.unwrap());
        assert_eq!(
            (r.name, r.namespace, r.uid),
            (fr.name, fr.namespace, fr.uid)
        );
        let (c, fc) = (s.csi.unwrap(), f.csi.unwrap());
        assert_eq!((c.driver, c.volume_handle), (fc.driver, fc.volume_handle));
        assert_eq!((c.fs_type, c.read_only), (fc.fs_type, fc.read_only));
        let attributes = c.volume_attributes.map(|a| a.to_btree());
        assert_eq!(attributes, fc.volume_attributes);
        let secret = |r: Option<Box<SecretReference>>| r.map(|r| *r);
        let secrets = [
            (
                c.controller_expand_secret_ref,
                fc.controller_expand_secret_ref,
            ),
            (
                c.controller_publish_secret_ref,
                fc.controller_publish_secret_ref,
            ),
            (c.node_expand_secret_ref, fc.node_expand_secret_ref),
            (c.node_publish_secret_ref, fc.node_publish_secret_ref),
            (c.node_stage_secret_ref, fc.node_stage_secret_ref),
        ];
        for (slim, full) in secrets {
            assert!(full.is_some());
            assert_eq!(secret(slim), full);
        }
        assert_eq!(slim.status.unwrap().phase, full.status.unwrap().phase);
    }

    #[test]
    fn reads_a_pv_without_spec_or_status() {
        let pv: Pv = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
        assert_eq!(pv.metadata.name.as_deref(), Some("a"));
        assert_eq!((pv.spec, pv.status), (None, None));
    }

    #[test]
    fn is_a_fraction_of_the_full_pv_inline() {
        let (slim, full) = (size_of::<Pv>(), size_of::<PersistentVolume>());
        assert!(
            slim * 4 < full,
            "Pv is {slim} bytes, PersistentVolume {full}"
        );
    }

    #[test]
    fn is_listed_and_watched_where_the_full_pv_is() {
        assert_eq!(Pv::kind(&()), PersistentVolume::kind(&()));
        assert_eq!(Pv::api_version(&()), PersistentVolume::api_version(&()));
        assert_eq!(Pv::plural(&()), PersistentVolume::plural(&()));
        assert_eq!(
            Pv::url_path(&(), None),
            PersistentVolume::url_path(&(), None)
        );
        let _: fn(kube::Client) -> Api<Pv> = Api::all;
    }
}
