//! Names Kubernetes and the upstream sidecars use, which we must match so
//! that kube-controller-manager, kube-scheduler, kubelet and kubectl read our
//! objects as theirs.

/// PV annotation naming the provisioner that created it.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Where external-provisioner records the Secret its DeleteVolume needs.
pub const ANN_DELETION_SECRET_NAME: &str = "volume.kubernetes.io/provisioner-deletion-secret-name";
pub const ANN_DELETION_SECRET_NAMESPACE: &str =
    "volume.kubernetes.io/provisioner-deletion-secret-namespace";
/// PVC annotation kcm sets when a claim's class has an external provisioner.
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// PVC annotation the scheduler sets for `WaitForFirstConsumer` claims.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Set on a claim once binding is complete.
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// Set on the object whose half of the binding a controller wrote.
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// external-provisioner's finalizer: the PV outlives its backend volume.
pub const PV_PROVISIONER_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";

pub const BINDING_WAIT_FOR_FIRST_CONSUMER: &str = "WaitForFirstConsumer";

/// CreateVolume parameters external-provisioner adds with
/// `--extra-create-metadata`.
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PARAM_PV_NAME: &str = "csi.storage.k8s.io/pv/name";
/// csi-snapshotter's `--extra-create-metadata` for CreateSnapshot.
pub const PARAM_SNAPSHOT_NAME: &str = "csi.storage.k8s.io/volumesnapshot/name";
pub const PARAM_SNAPSHOT_NAMESPACE: &str = "csi.storage.k8s.io/volumesnapshot/namespace";
pub const PARAM_SNAPSHOT_CONTENT_NAME: &str = "csi.storage.k8s.io/volumesnapshotcontent/name";
