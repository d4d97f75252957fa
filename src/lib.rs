//! stowage: one Kubernetes operator that does the jobs of the CSI sidecars
//! (provisioner, attacher, resizer, snapshotter, health monitor, registrar,
//! liveness probe) in-process.

pub mod backend;
pub mod controller;
pub mod crd;
pub mod csi;
pub mod failpoint;
pub mod kubeapi;
pub mod node;
pub mod proto;
pub mod quantity;
pub mod retry;
pub mod telemetry;
