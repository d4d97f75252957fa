//! Integration tests against a real local control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler). See harness.rs.

mod controller_lifecycle;
mod crash_safety;
mod crd_evolution;
mod csi_sanity;
mod expansion;
mod external_driver;
mod fixtures;
mod harness;
mod image;
mod leader_election;
mod manifests;
mod metrics;
mod node_handover;
mod node_socket;
mod provisioning;
mod proxy_attach;
mod proxy_driver;
mod real_node;
mod scale;
mod volume_api;
