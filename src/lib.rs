//! stowage: one Kubernetes operator that does the jobs of the CSI sidecars
//! (external-provisioner, external-attacher, external-resizer,
//! node-driver-registrar, livenessprobe) in-process.
//!
//! Layers, each using only those below it (see `docs/architecture.md`;
//! `layers.rs` checks it):
//! - `compact_map`, the small sorted map `crd` and the caches hold;
//! - leaves: `host` (mounts, loop devices, paths, commands, sockets),
//!   `proto`, `quantity`, `retry`, `failpoint`, `kubeapi`, `telemetry`, `crd`,
//!   `snapshot_api` (external-snapshotter's kinds);
//! - `backend`: where volumes live (`local` images, `csi_proxy` to a driver);
//! - `csi`: the CSI services over `backend` and `host`;
//! - the roles: `controller` (the sidecars' jobs) and `node` (the agent,
//!   serving `csi` to kubelet).

pub mod backend;
pub mod compact_map;
pub mod controller;
pub mod crd;
pub mod csi;
pub mod failpoint;
pub mod host;
pub mod kubeapi;
#[cfg(test)]
mod layers;
pub mod node;
pub mod proto;
pub mod quantity;
pub mod retry;
pub mod snapshot_api;
pub mod telemetry;
#[cfg(test)]
mod testing;
