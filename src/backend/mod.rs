//! Storage backends. Backends know storage, not Kubernetes.

pub mod csi_proxy;
pub mod local;
pub mod secrets;
