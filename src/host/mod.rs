//! Mechanics of the host a node agent runs on: mounts, loop devices,
//! kubelet's request paths, filesystems, commands and sockets. A leaf: it
//! knows nothing of Kubernetes, CSI or stowage's objects, so `csi` and the
//! agent build on it and it on nothing of ours.

pub mod beneath;
pub mod filesystem;
pub mod freeze;
pub mod loop_device;
pub mod mounts;
pub mod paths;
pub mod process;
pub mod socket;
pub mod statvfs;

pub use process::HostError;
