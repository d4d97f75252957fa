//! What the controller asks the driver for and gets back, in our types.

use std::collections::BTreeMap;

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
    /// The accessible-topology segments the driver reported, in its order:
    /// the volume can be used from a node in any one of them.
    pub accessible_topology: Vec<BTreeMap<String, String>>,
}

/// What ControllerExpandVolume answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    pub capacity_bytes: i64,
    pub node_expansion_required: bool,
}

/// A snapshot as the driver describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub size_bytes: i64,
    /// Nanoseconds since the Unix epoch; 0 when the driver gave none.
    pub creation_time_ns: i64,
    pub ready: bool,
}

impl From<csi::Snapshot> for Snapshot {
    fn from(s: csi::Snapshot) -> Self {
        let time = s.creation_time.unwrap_or_default();
        Snapshot {
            id: s.snapshot_id,
            size_bytes: s.size_bytes,
            creation_time_ns: time
                .seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(i64::from(time.nanos)),
            ready: s.ready_to_use,
        }
    }
}

/// What GetCapacity answered for one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub available_bytes: i64,
    /// The largest single volume, when the driver says (it may be less
    /// than what is available: a pool split over disks).
    pub maximum_volume_bytes: Option<i64>,
}

/// What CreateVolume is asked for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub capacity_bytes: i64,
    pub parameters: BTreeMap<String, String>,
    pub secrets: Secrets,
    /// One per access mode of the claim, as external-provisioner asks.
    pub capabilities: Vec<Capability>,
    /// Segments the volume must be reachable from.
    pub requisite: Vec<BTreeMap<String, String>>,
    /// The requisite segments, most preferred first.
    pub preferred: Vec<BTreeMap<String, String>>,
    /// The claim's VolumeAttributesClass parameters.
    pub mutable_parameters: BTreeMap<String, String>,
    /// A snapshot to restore or a volume to clone.
    pub content_source: Option<crate::crd::VolumeSource>,
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
    /// The access mode as csi-lib-utils maps one: a driver without
    /// SINGLE_NODE_MULTI_WRITER knows a single writer per node only, which
    /// ReadWriteOnce and ReadWriteOncePod both become.
    pub fn to_csi(&self, single_node_multi_writer: bool) -> csi::VolumeCapability {
        let mode = match (self.access_mode.as_str(), single_node_multi_writer) {
            ("ReadOnlyMany", _) => Mode::MultiNodeReaderOnly,
            ("ReadWriteMany", _) => Mode::MultiNodeMultiWriter,
            ("ReadWriteOncePod", true) => Mode::SingleNodeSingleWriter,
            (_, true) => Mode::SingleNodeMultiWriter,
            (_, false) => Mode::SingleNodeWriter,
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
        let mode = |access_mode: &str, snmw: bool| {
            let cap = Capability {
                access_mode: access_mode.into(),
                fs_type: "xfs".into(),
                ..Default::default()
            }
            .to_csi(snmw);
            assert!(matches!(cap.access_type, Some(AccessType::Mount(m)) if m.fs_type == "xfs"));
            Mode::try_from(cap.access_mode.unwrap().mode).unwrap()
        };
        let table = [
            (
                "ReadWriteOnce",
                Mode::SingleNodeWriter,
                Mode::SingleNodeMultiWriter,
            ),
            (
                "ReadWriteOncePod",
                Mode::SingleNodeWriter,
                Mode::SingleNodeSingleWriter,
            ),
            (
                "ReadOnlyMany",
                Mode::MultiNodeReaderOnly,
                Mode::MultiNodeReaderOnly,
            ),
            (
                "ReadWriteMany",
                Mode::MultiNodeMultiWriter,
                Mode::MultiNodeMultiWriter,
            ),
        ];
        for (access_mode, without, with) in table {
            assert_eq!(mode(access_mode, false), without, "{access_mode}");
            assert_eq!(
                mode(access_mode, true),
                with,
                "{access_mode} with SINGLE_NODE_MULTI_WRITER"
            );
        }
    }
}
