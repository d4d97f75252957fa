//! The proxy backend: another vendor's CSI driver, reached over its
//! controller socket. stowage does the sidecars' jobs and calls the driver
//! exactly where external-provisioner and external-attacher would.
//!
//! The channel is lazy and reconnects by itself, so a driver that restarts
//! (or starts after us) is picked up without restarting stowage; until its
//! capabilities are known every call fails with `Unavailable` and the
//! caller's retry (with backoff) tries again.

mod connection;
mod controller;
mod error;
mod requests;

pub use connection::{Capabilities, DriverEndpoint};
pub use error::ProxyError;
pub use requests::{Capability, CreateRequest, CreatedVolume, Expanded, Published, Room, Snapshot};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tonic::transport::Channel;

use crate::telemetry::csi_calls::CsiCalls;

/// One CSI driver's controller service.
#[derive(Clone)]
pub struct CsiDriver {
    pub name: String,
    socket: PathBuf,
    channel: Channel,
    capabilities: Arc<OnceCell<Capabilities>>,
    timeout: Duration,
    calls: CsiCalls,
}

impl std::fmt::Debug for CsiDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsiDriver")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .finish()
    }
}
