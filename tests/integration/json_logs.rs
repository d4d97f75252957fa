//! `--log-format json`: every line a stowage process writes is one JSON
//! object with a timestamp, a level, a target and a message, and the span
//! it was written in (with its fields) where there is one. Checked on the
//! three roles doing real work, and on a process exiting with an error.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde_json::Value;

use crate::csi_node::CsiNode;
use crate::fixtures::{claim, is_bound, storage_class, wait};
use crate::harness::{Process, TestNamespace, bare_cluster, client_for_path, unique_name};

const NODE: &str = "json-node";
const JSON: [&str; 2] = ["--log-format", "json"];

/// Parses every line of `log`, checking the fields each must have; fails
/// naming the first line that is not right.
fn json_lines(who: &str, log: &str) -> Vec<Value> {
    assert!(!log.trim().is_empty(), "{who} wrote nothing");
    let mut out = Vec::new();
    for line in log.lines() {
        let fail = |why: &str| panic!("{who}: {why}: {line:?}");
        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line) else {
            fail("not a JSON object")
        };
        let stamp = o.get("timestamp").and_then(Value::as_str);
        if stamp
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .is_none()
        {
            fail("no RFC 3339 timestamp");
        }
        let level = o.get("level").and_then(Value::as_str).unwrap_or_default();
        if !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level) {
            fail("no level");
        }
        if !o.get("target").is_some_and(Value::is_string) {
            fail("no target");
        }
        if !o.get("message").is_some_and(Value::is_string) {
            fail("no message");
        }
        let named = |s: &Value| s.get("name").is_some_and(Value::is_string);
        if o.get("span").is_some_and(|s| !named(s)) {
            fail("a span without a name");
        }
        if let Some(spans) = o.get("spans")
            && !spans.as_array().is_some_and(|a| a.iter().all(named))
        {
            fail("spans that are not a list of named spans");
        }
        out.push(Value::Object(o));
    }
    out
}

/// The first line whose message is `message`.
fn find<'a>(lines: &'a [Value], message: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_in_every_role() {
    csi_role().await;
    controller_and_node_roles().await;
    failed_start().await;
}

/// `stowage csi`, staging a volume: events carry their fields.
async fn csi_role() {
    let mut csi = CsiNode::start("json-logs-csi", &JSON).await;
    csi.create("json", 32 << 20).await;
    csi.stage("json").await;
    csi.unstage("json").await;
    let log = csi.log();
    csi.finish().await;
    let lines = json_lines("stowage csi", &log);
    assert_eq!(
        find(&lines, "volume staged")["volume"],
        "json",
        "event fields"
    );
}

/// `stowage controller` and `stowage node` provisioning a claim: their
/// reconciles run in spans that name their object.
async fn controller_and_node_roles() {
    let kubeconfig = bare_cluster("json-logs", &[NODE]);
    let client = client_for_path(&kubeconfig).await;
    let data = std::env::temp_dir().join(unique_name("stowage-json"));
    let data_arg = data.to_str().unwrap().to_string();
    let node_args = [
        "node",
        "--log-format",
        "json",
        "--node-name",
        NODE,
        "--data-dir",
        &data_arg,
        "--capacity",
        "1Gi",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let node = Process::start(&kubeconfig, &node_args, &[], "json-logs-node");
    let controller_args = [
        "controller",
        "--log-format",
        "json",
        "--leader-elect=false",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let controller = Process::start(&kubeconfig, &controller_args, &[], "json-logs-controller");
    let ns = TestNamespace::new_with(client.clone(), "json").await;
    let class = format!("{}-c", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[]).await;
    claim(&ns, "data", &class, "16Mi", &["ReadWriteOnce"]).await;
    let bound = wait(
        &ns.api::<PersistentVolumeClaim>(),
        "data",
        "Bound",
        is_bound,
    )
    .await;
    let pv = bound.unwrap().spec.unwrap().volume_name.unwrap();
    let (controller_log, node_log) = (controller.log(), node.log());
    controller.stop();
    node.stop();
    let _ = std::fs::remove_dir_all(&data);
    let claim = format!("{}/data", ns.name);
    for (who, log, key, value) in [
        ("controller", controller_log, "claim", claim.as_str()),
        ("node", node_log, "volume", pv.as_str()),
    ] {
        let lines = json_lines(who, &log);
        assert!(
            lines.iter().any(|l| l["span"][key] == value),
            "{who}: no line in a span with {key}={value}:\n{log}"
        );
    }
}

/// A process that cannot start says why, in JSON too.
async fn failed_start() {
    let mut failing = Process::start(
        Path::new("/nonexistent-kubeconfig"),
        &["controller", "--log-format", "json", "--leader-elect=false"],
        &[],
        "json-logs-failing",
    );
    assert!(failing.exited_within(Duration::from_secs(30)).await);
    let lines = json_lines("a controller that cannot start", &failing.log());
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the Kubernetes API"),
        "{last}"
    );
}
