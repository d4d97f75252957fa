//! CSI gRPC services for the local backend: Identity, Controller and Node,
//! one file each. `stowage node` serves Identity + Node to kubelet;
//! `stowage csi` serves all three on one endpoint for csi-sanity and the
//! upstream sidecars.

pub mod controller;
mod ext4;
pub mod identity;
pub mod node;
pub mod serve;
mod snapshots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Code, Status};

use crate::backend::local::LocalError;
use crate::backend::local::room::RoomError;
use crate::host::HostError;
use crate::host::filesystem::ProbeError;
use crate::host::paths::PathError;
use crate::proto::csi::v1 as csi;

/// Errors of CSI calls, each knowing its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A paging token this endpoint never gave (the spec's code for it).
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Local(LocalError),
    #[error(transparent)]
    Host(#[from] HostError),
    /// What is on a device is in doubt, or not what was asked for: the user
    /// (or an operator) has to look before anything is formatted.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// A new volume the node cannot hold: never (OutOfRange) or not now
    /// (ResourceExhausted, which external-provisioner reads as "try
    /// elsewhere").
    #[error("{0}")]
    NoRoom(RoomError),
    /// Growth the node cannot hold; the spec's code for a capacity the
    /// plugin will not give is OutOfRange either way.
    #[error("{0}")]
    CannotGrow(RoomError),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn code(&self) -> Code {
        match self {
            CsiError::Path(PathError::Io { .. }) => Code::Internal,
            CsiError::InvalidArgument(_) | CsiError::Path(_) => Code::InvalidArgument,
            CsiError::Local(LocalError::InvalidName(_)) => Code::InvalidArgument,
            // A size the data directory's filesystem cannot hold in a file.
            CsiError::Host(HostError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EFBIG) =>
            {
                Code::OutOfRange
            }
            // A preallocation the data filesystem has no blocks for.
            CsiError::Host(HostError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                Code::ResourceExhausted
            }
            CsiError::NoRoom(RoomError::BeyondCapacity { .. }) | CsiError::CannotGrow(_) => {
                Code::OutOfRange
            }
            CsiError::NoRoom(RoomError::NoRoom { .. }) => Code::ResourceExhausted,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::FailedPrecondition(_) | CsiError::Probe(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::Host(HostError::NotOurMount { .. }) => Code::FailedPrecondition,
            CsiError::Local(_) | CsiError::Host(_) | CsiError::Internal(_) => Code::Internal,
        }
    }
}

/// A host failure inside the backend is a host failure: one variant to
/// map to a gRPC code.
impl From<LocalError> for CsiError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Host(e) => CsiError::Host(e),
            e => CsiError::Local(e),
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

pub type CsiResult<T> = Result<tonic::Response<T>, Status>;

pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        Err(CsiError::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// Local volumes live on one node: only single-node access modes work.
pub fn check_capability(cap: &csi::VolumeCapability) -> Result<(), CsiError> {
    use csi::volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => {
            return Err(CsiError::InvalidArgument(
                "volume_capability.access_mode is required".into(),
            ));
        }
        other => {
            return Err(CsiError::InvalidArgument(format!(
                "access mode {} is not supported: local volumes live on one node",
                other.as_str_name()
            )));
        }
    }
    if cap.access_type.is_none() {
        return Err(CsiError::InvalidArgument(
            "volume_capability needs block or mount".into(),
        ));
    }
    Ok(())
}

/// One lock per volume id: operations on a volume run one at a time.
#[derive(Default, Clone)]
pub struct VolumeLocks {
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl VolumeLocks {
    pub async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .expect("lock map poisoned")
            .entry(id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}
