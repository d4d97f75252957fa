//! Integration tests against a real local control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler). See harness.rs.

mod controller_lifecycle;
mod crash_safety;
mod crd_evolution;
mod csi_node;
mod csi_sanity;
mod expansion;
mod fixtures;
mod harness;
mod hung_driver;
mod image;
mod json_logs;
mod leader_election;
mod manifests;
mod node_calls;
mod node_handover;
mod node_socket;
mod provisioning;
mod proxy_driver;
mod real_node;
mod scale;
mod volume_api;
