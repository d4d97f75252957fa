//! Storage backends. Backends know storage, not Kubernetes.

pub mod local;
