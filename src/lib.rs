//! stowage: one Kubernetes operator that does the jobs of the CSI sidecars
//! (provisioner, attacher, resizer, snapshotter, health monitor, registrar,
//! liveness probe) in-process.

pub mod controller;
pub mod crd;
//TMP pub mod proto;
pub mod telemetry;
