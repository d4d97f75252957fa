//! What the controller reports on /metrics, counted exactly: a control plane
//! and a controller of its own, so that no other test's claims move the
//! figures.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::DeleteParams;

use crate::fixtures::{TIMEOUT, claim, is_bound, storage_class, wait, wait_for_event};
use crate::harness::{
    Process, TestNamespace, bare_cluster, client_for_path, free_port, http_get, unique_name,
    wait_http,
};

const NODE: &str = "metrics-node";

/// The value of the series whose name and labels are exactly `series`
/// (`name` or `name{label="v"}`); None when the body lacks it.
pub(crate) fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes `url` until the series satisfies `cond`; returns the body. The
/// controller updates some figures just after the API shows the change that
/// caused them.
pub(crate) async fn scrape_until(url: &str, series: &str, cond: impl Fn(f64) -> bool) -> String {
    wait_http(
        url,
        &format!("serving {series} as expected"),
        |status, body| status == 200 && value(body, series).is_some_and(&cond),
    )
    .await
}

#[tokio::test]
async fn metrics_count_claims_binds_and_failures_exactly() {
    let kubeconfig = bare_cluster("metrics", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let ns = TestNamespace::new_with(client.clone(), "metrics").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    let data = std::env::temp_dir().join(unique_name("stowage-metrics"));
    let agent = Process::node(&kubeconfig, NODE, &data, "metrics-node");
    let addr = format!("127.0.0.1:{}", free_port());
    let controller = Process::start(
        &kubeconfig,
        &[
            "controller",
            "--leader-elect=false",
            "--metrics-addr",
            &addr,
        ],
        &[],
        "metrics-controller",
    );
    let url = format!("http://{addr}/metrics");

    // At rest: nothing pending, nothing bound, the build it runs.
    let body = scrape_until(&url, "stowage_claims_pending", |v| v == 0.0).await;
    assert_eq!(
        value(&body, "stowage_claim_bound_duration_seconds_count"),
        Some(0.0)
    );
    let build_info = format!(
        "stowage_build_info{{version=\"{}\",commit=\"{}\"}}",
        stowage::telemetry::VERSION,
        stowage::telemetry::COMMIT
    );
    assert_eq!(value(&body, &build_info), Some(1.0), "{body}");
    let claim_reconciles = "stowage_reconciles_total{job=\"claim\"}";
    let before = value(&body, claim_reconciles).unwrap_or(0.0);

    // A claim no node can hold stays pending and counts as a failure.
    claim(&ns, "too-big", &class, "5Gi", &["ReadWriteOnce"]).await;
    wait_for_event(&ns, "too-big", "ProvisioningFailed").await;
    let failures = "stowage_reconcile_failures_total{job=\"claim\",error=\"no_room\"}";
    let body = scrape_until(&url, failures, |v| v >= 1.0).await;
    assert_eq!(value(&body, "stowage_claims_pending"), Some(1.0), "{body}");

    // Two that fit: bound, each observed once, the backlog back to the one.
    for name in ["one", "two"] {
        claim(&ns, name, &class, "20Mi", &["ReadWriteOnce"]).await;
    }
    let claims = ns.api::<PersistentVolumeClaim>();
    for name in ["one", "two"] {
        wait(&claims, name, "Bound", is_bound).await;
    }
    let count = "stowage_claim_bound_duration_seconds_count";
    let body = scrape_until(&url, count, |v| v == 2.0).await;
    assert_eq!(value(&body, "stowage_claims_pending"), Some(1.0), "{body}");
    assert!(
        value(&body, claim_reconciles).unwrap_or(0.0) >= before + 3.0,
        "three claims, fewer reconciles:\n{body}"
    );
    assert!(
        value(
            &body,
            "stowage_reconcile_duration_seconds_count{job=\"claim\"}"
        )
        .unwrap_or(0.0)
            >= 3.0,
        "reconcile durations not observed:\n{body}"
    );
    let bound_sum = value(&body, "stowage_claim_bound_duration_seconds_sum").unwrap();
    assert!(
        bound_sum > 0.0 && bound_sum < TIMEOUT.as_secs_f64() * 2.0,
        "claim-to-Bound seconds summed over two claims: {bound_sum}"
    );

    // Deleting the unplaceable claim empties the backlog; binding figures
    // stay as they were (a deletion is not a bind).
    let uid = claims.get("too-big").await.unwrap().uid().unwrap();
    claims
        .delete("too-big", &DeleteParams::default())
        .await
        .unwrap();
    let body = scrape_until(&url, "stowage_claims_pending", |v| v == 0.0).await;
    assert_eq!(value(&body, count), Some(2.0), "{body}");
    assert!(
        !body.contains(&uid),
        "claim UIDs must not become labels:\n{body}"
    );

    let (status, _) = http_get(&url.replace("/metrics", "/healthz")).await;
    assert_eq!(status, 200, "/healthz of a controller that works");
    let log = controller.log();
    assert!(
        log.contains("claim bound") && !log.contains('\x1b'),
        "plain log lines, without terminal colour codes:\n{log}"
    );
    controller.stop();
    agent.stop();
    let _ = std::fs::remove_dir_all(&data);
}
