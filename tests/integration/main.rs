//! Integration tests against a real local control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler). See harness.rs.

mod binder_coexistence;
mod controller_lifecycle;
mod crash;
mod crash_delete;
mod crash_provision;
mod crash_proxy;
mod crd_evolution;
mod csi_node;
mod csi_sanity;
mod expansion;
mod external_driver;
mod failpoints;
mod fixtures;
mod harness;
mod hung_driver;
mod image;
mod json_logs;
mod leader_election;
mod leader_takeover;
mod manifests;
mod metrics;
mod node_calls;
mod node_format;
mod node_handover;
mod node_socket;
mod process_exit;
mod provisioning;
mod proxy_attach;
mod proxy_driver;
mod proxy_secrets;
mod proxy_wffc;
mod real_node;
mod retry_backoff;
mod scale;
mod volume_api;
