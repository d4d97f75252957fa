//! Fixtures shared by the unit tests: each builds the smallest object a
//! test can then change in the fields it is about.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::ObjectMeta;

use crate::backend::local;
use crate::crd::{
    AccessMode, ConditionStatus, StorageNode, StorageNodeSpec, StorageNodeStatus, VOLUME_FINALIZER,
    Volume, VolumeCondition, VolumeSpec,
};

/// A spec with nothing but a driver, a size and one access mode.
pub fn volume_spec(driver: &str, capacity_bytes: i64) -> VolumeSpec {
    VolumeSpec {
        driver: driver.into(),
        parameters: Default::default(),
        capacity_bytes,
        access_modes: vec![AccessMode::ReadWriteOnce],
        volume_mode: Default::default(),
        node: None,
        requisite_topology: Vec::new(),
        preferred_topology: Vec::new(),
        mount_options: Vec::new(),
        source: None,
        claim: None,
        persistent_volume_name: None,
        reclaim_policy: Default::default(),
        volume_attributes_class_name: None,
        mutable_parameters: Default::default(),
    }
}

/// The StorageNode `local.stowage.dev`'s agent on `name` reports, with
/// `capacity` bytes and nothing else.
pub fn storage_node(name: &str, capacity: i64) -> StorageNode {
    let mut n = StorageNode::new(
        name,
        StorageNodeSpec {
            driver: local::DRIVER_NAME.into(),
            node: name.into(),
        },
    );
    n.status = Some(StorageNodeStatus {
        capacity_bytes: capacity,
        ..Default::default()
    });
    n
}

/// A StorageClass of `provisioner`; `mode` is its volumeBindingMode
/// (unset: the API server's default, Immediate).
pub fn storage_class(
    name: &str,
    provisioner: &str,
    mode: Option<&str>,
    parameters: &[(&str, &str)],
) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        provisioner: provisioner.into(),
        volume_binding_mode: mode.map(String::from),
        parameters: Some(
            parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// A condition as an agent or the controller writes it, dated now.
pub fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
) -> VolumeCondition {
    VolumeCondition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ),
        observed_generation: None,
    }
}

/// A Volume as the controller writes it: generation 1, our finalizer.
pub fn volume(name: &str, spec: VolumeSpec) -> Volume {
    let mut v = Volume::new(name, spec);
    v.metadata.generation = Some(1);
    v.metadata.finalizers = Some(vec![VOLUME_FINALIZER.into()]);
    v
}

/// A namespaced object with a name, UID and resourceVersion: what the
/// informer's bookkeeping looks at.
pub fn config_map(name: &str, uid: &str, version: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}
