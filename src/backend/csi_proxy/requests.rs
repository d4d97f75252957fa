//! What the controller asks the driver for and gets back, in our types.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::backend::secrets::Secrets;
use crate::proto::csi::v1 as csi;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};

/// What ListVolumes says: each volume's ID, with the IDs of the nodes it
/// is published to.
pub type Published = BTreeMap<String, Vec<String>>;

/// A volume the driver created.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreatedVolume {
    pub volume_id: String,
    pub capacity_bytes: i64,
    pub volume_context: BTreeMap<String, String>,
    /// First accessible-topology segment, if the driver reported any.
    pub topology: BTreeMap<String, String>,
}

/// What ControllerExpandVolume answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    pub capacity_bytes: i64,
    pub node_expansion_required: bool,
}

/// What CreateVolume is asked for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub capacity_bytes: i64,
    pub parameters: BTreeMap<String, String>,
    pub secrets: Secrets,
    pub capability: Capability,
    /// Segments the volume must be reachable from (the scheduler's node).
    pub requisite: Vec<BTreeMap<String, String>>,
    /// The claim's VolumeAttributesClass parameters.
    pub mutable_parameters: BTreeMap<String, String>,
}

/// How the volume will be used, as in the PV.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capability {
    pub block: bool,
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    /// Kubernetes access mode: ReadWriteOnce, ReadOnlyMany, ReadWriteMany, ReadWriteOncePod.
    pub access_mode: String,
}

impl Capability {
    /// How a PV is used: its volume mode, first access mode, fsType and
    /// mount options.
    pub fn of_pv(pv: &PersistentVolume) -> Capability {
        let spec = pv.spec.clone().unwrap_or_default();
        let csi = spec.csi.clone().unwrap_or_default();
        Capability {
            block: spec.volume_mode.as_deref() == Some("Block"),
            fs_type: csi.fs_type.unwrap_or_default(),
            mount_flags: spec.mount_options.unwrap_or_default(),
            access_mode: spec
                .access_modes
                .and_then(|m| m.first().cloned())
                .unwrap_or_default(),
        }
    }

    pub fn to_csi(&self) -> csi::VolumeCapability {
        let mode = match self.access_mode.as_str() {
            "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
            "ReadWriteMany" => Mode::MultiNodeMultiWriter,
            "ReadWriteOncePod" => Mode::SingleNodeSingleWriter,
            _ => Mode::SingleNodeWriter,
        };
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone(),
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: String::new(),
            })
        };
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_map_kubernetes_access_modes() {
        let cap = Capability {
            access_mode: "ReadWriteOncePod".into(),
            fs_type: "xfs".into(),
            ..Default::default()
        }
        .to_csi();
        assert_eq!(
            cap.access_mode.unwrap().mode,
            Mode::SingleNodeSingleWriter as i32
        );
        assert!(matches!(cap.access_type, Some(AccessType::Mount(m)) if m.fs_type == "xfs"));
    }
}
