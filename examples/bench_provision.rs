//! `just bench-provision N`: N claims on an `Immediate` class, provisioned
//! and bound by stowage on a real local control plane. Not a test: it prints
//! figures (and writes them to target/bench/).
//!
//! Run under `scripts/cluster.sh run` (KUBECONFIG set). Starts its own
//! `stowage node` agents and `stowage controller` from target/release.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

#[path = "common/mod.rs"]
mod common;
use common::{api_writes, peak_rss_kib, percentile};

const NODES: usize = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "100".into())
        .parse()?;
    let layout = std::env::var("STOWAGE_BENCH_LAYOUT").unwrap_or_else(|_| "dir".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stowage = common::release_stowage()?;
    let client = Client::try_default().await?;

    // CRDs, Node objects and the node agents.
    common::install_crds(&client).await?;
    let data = std::env::temp_dir().join(format!("stowage-bench-{}", std::process::id()));
    let mut children = common::start_node_agents(&client, None, &data, NODES).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // STOWAGE_BENCH_CONTROLLER_ARGS: more flags, e.g. `--kcm-binder-grace 0s`.
    let extra = std::env::var("STOWAGE_BENCH_CONTROLLER_ARGS").unwrap_or_default();
    let controller = tokio::process::Command::new(&stowage)
        .args([
            "controller",
            "--leader-elect=false",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(extra.split_whitespace())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let controller_pid = controller.id().expect("controller running");
    children.push(controller);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let ns = format!("bench-{}", std::process::id());
    let nsobj: Namespace = serde_json::from_value(json!({ "metadata": { "name": ns } }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &nsobj)
        .await?;
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": ns },
        "provisioner": "local.stowage.dev",
        "volumeBindingMode": "Immediate",
        "parameters": { "layout": layout },
    }))?;
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await?;

    let writes_before = api_writes(&client).await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);

    // Watch first, so no Bound transition is missed.
    let watch_claims = claims.clone();
    let lost = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen_lost = lost.clone();
    let watcher_task = tokio::spawn(async move {
        let mut bound = HashMap::new();
        let mut stream = watcher(watch_claims, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(claim) = stream.try_next().await.transpose() {
            let Ok(claim) = claim else { continue };
            if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost") {
                seen_lost.lock().unwrap().insert(claim.name_any());
            }
            if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                bound.entry(claim.name_any()).or_insert_with(Instant::now);
                if bound.len() == n {
                    return bound;
                }
            }
        }
        bound
    });

    let start = Instant::now();
    let created: HashMap<String, Instant> = futures::stream::iter(0..n)
        .map(|i| {
            let claims = claims.clone();
            async move {
                let name = format!("claim-{i:05}");
                let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "spec": { "storageClassName": claims_class(&claims), "accessModes": ["ReadWriteOnce"],
                              "resources": { "requests": { "storage": "16Mi" } } },
                }))
                .unwrap();
                let t = Instant::now();
                claims.create(&PostParams::default(), &claim).await.expect("creating claim");
                (name, t)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let bound = tokio::time::timeout(Duration::from_secs(600), watcher_task)
        .await
        .map_err(|_| anyhow::anyhow!("not all {n} claims bound within 10 minutes"))??;
    let elapsed = bound
        .values()
        .max()
        .map(|t| t.duration_since(start))
        .unwrap_or_default();
    let mut latencies: Vec<f64> = bound
        .iter()
        .map(|(name, t)| t.duration_since(created[name]).as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&latencies, p);

    let writes_after = api_writes(&client).await?;
    let mut per_resource = BTreeMap::new();
    for (resource, after) in &writes_after {
        let delta = after - writes_before.get(resource).copied().unwrap_or(0.0);
        if delta > 0.0 {
            per_resource.insert(resource.clone(), delta / n as f64);
        }
    }
    let total_writes: f64 = per_resource.values().sum();
    let rss_kib = peak_rss_kib(controller_pid);
    let (lost, warnings) = binder_verdict(&client, &ns, lost).await?;

    let mut report = String::new();
    report.push_str(&format!("stowage provisioning benchmark: {n} claims, Immediate, layout {layout}, {NODES} node agents\n"));
    report.push_str(&format!(
        "claims/s to all Bound       {:.1}\n",
        n as f64 / elapsed.as_secs_f64()
    ));
    report.push_str(&format!(
        "all Bound after             {:.2} s\n",
        elapsed.as_secs_f64()
    ));
    report.push_str(&format!("claim->Bound p50            {:.0} ms\n", pct(0.5)));
    report.push_str(&format!(
        "claim->Bound p99            {:.0} ms\n",
        pct(0.99)
    ));
    report.push_str(&format!("API writes per volume       {total_writes:.1} (all clients, from apiserver_request_total)\n"));
    for (resource, w) in &per_resource {
        report.push_str(&format!("  {resource:<30}{w:.2}\n"));
    }
    report.push_str(&format!(
        "controller peak RSS         {:.1} MiB\n",
        rss_kib as f64 / 1024.0
    ));
    report.push_str(&format!(
        "claims ever Lost            {lost} (kcm's binder: {})\n",
        std::env::var("STOWAGE_KCM_CONTROLLERS").unwrap_or_else(|_| "on".into())
    ));
    report.push_str(&format!("warnings on claims          {warnings:?}\n"));
    report.push_str(&format!("controller flags            {extra}\n"));
    print!("{report}");
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("provision-{n}.txt")), &report)?;

    drop(children);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// How many claims were ever seen Lost (counted once kcm's binder has had a
/// full resync, 15 s, to look at every bound claim again), and the warning
/// events on claims by reason.
async fn binder_verdict(
    client: &Client,
    ns: &str,
    lost: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
) -> anyhow::Result<(usize, BTreeMap<String, usize>)> {
    tokio::time::sleep(Duration::from_secs(16)).await;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    for claim in claims.list(&Default::default()).await? {
        if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost") {
            lost.lock().unwrap().insert(claim.name_any());
        }
    }
    let mut warnings = BTreeMap::new();
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
    for e in events.list(&Default::default()).await? {
        if e.type_.as_deref() == Some("Warning") {
            if !warnings.contains_key(e.reason.as_deref().unwrap_or_default()) {
                println!(
                    "first {} warning: {}",
                    e.reason.as_deref().unwrap_or_default(),
                    e.note.as_deref().unwrap_or_default()
                );
            }
            *warnings.entry(e.reason.unwrap_or_default()).or_default() +=
                e.deprecated_count.unwrap_or(1).max(1) as usize;
        }
    }
    let lost = lost.lock().unwrap().len();
    Ok((lost, warnings))
}

fn claims_class(claims: &Api<PersistentVolumeClaim>) -> String {
    claims.namespace().unwrap_or_default().to_string()
}
