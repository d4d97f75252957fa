//! A leader that dies without a word (SIGKILL: no release) keeps its Lease
//! until the Lease expires; only then does the standby take it, and it
//! then does the leader's work.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::jiff::SignedDuration;

use crate::fixtures::{claim, is_bound, storage_class, wait};
use crate::harness::{Process, TestNamespace, bare_cluster, client_for_path, unique_name};

const LEASE: &str = "stowage-controller";
/// The controller's leaseDurationSeconds.
const LEASE_SECONDS: i64 = 15;
/// Both replicas read this machine's clock; allow for rounding and for
/// a renewal in flight when the leader died.
const SLACK: SignedDuration = SignedDuration::from_secs(1);

fn replica(kubeconfig: &Path, ns: &str, id: &str) -> Process {
    let args = [
        "controller",
        "--leader-election-namespace",
        ns,
        "--identity",
        id,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    Process::start(kubeconfig, &args, &[], &format!("takeover-{id}"))
}

fn holder_is(id: &'static str) -> impl Fn(Option<&Lease>) -> bool {
    move |l| l.and_then(|l| l.spec.as_ref()?.holder_identity.as_deref()) == Some(id)
}

#[tokio::test]
async fn standby_takes_over_a_killed_leader_once_its_lease_expires() {
    let node = "takeover-node";
    let kubeconfig = bare_cluster("takeover", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "takeover").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let data = std::env::temp_dir().join(unique_name("stowage-takeover"));
    let agent = Process::node(&kubeconfig, node, &data, "takeover-node");
    let leases = ns.api::<Lease>();
    let claims = ns.api::<PersistentVolumeClaim>();

    let mut first = replica(&kubeconfig, &ns.name, "first");
    wait(&leases, LEASE, "held by first", holder_is("first")).await;
    let second = replica(&kubeconfig, &ns.name, "second");
    assert!(
        second
            .logged("waiting for the leader lease", Duration::from_secs(30))
            .await,
        "the standby never saw the lease held"
    );
    claim(&ns, "before", &class, "20Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "before", "Bound by the leader", is_bound).await;

    first.kill9();
    let code = first.exit_code_within(Duration::from_secs(10)).await;
    assert_eq!(code, Some(128 + libc::SIGKILL), "the leader's end");
    assert!(!first.log().contains("released the leader lease"));
    let old = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(old.holder_identity.as_deref(), Some("first"), "{old:?}");
    assert_eq!(old.lease_duration_seconds, Some(LEASE_SECONDS as i32));
    let renewed = old.renew_time.expect("renewTime").0;

    wait(&leases, LEASE, "held by second", holder_is("second")).await;
    let new = leases.get(LEASE).await.unwrap().spec.unwrap();
    let acquired = new.acquire_time.expect("acquireTime").0;
    let expired = renewed + SignedDuration::from_secs(LEASE_SECONDS);
    assert!(
        acquired >= expired - SLACK,
        "taken at {acquired}, before the lease renewed at {renewed} expired ({expired})"
    );
    assert_eq!(
        new.lease_transitions,
        old.lease_transitions.map(|t| t + 1),
        "one hand-over"
    );

    claim(&ns, "after", &class, "20Mi", &["ReadWriteOnce"]).await;
    wait(&claims, "after", "Bound by the new leader", is_bound).await;
    second.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
