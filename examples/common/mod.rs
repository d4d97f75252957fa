//! Helpers the benchmarks share (included with `#[path]`, not an example).
#![allow(dead_code)]

use std::collections::BTreeMap;

use kube::Client;

/// Value at quantile `p` (0..=1) of sorted `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "DELETE", "APPLY"];
const READ_VERBS: &[&str] = &["GET", "LIST"];

/// Write requests served by the API server so far, per resource.
pub async fn api_writes(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    api_requests(client, WRITE_VERBS).await
}

/// GET and LIST requests served by the API server so far, per resource
/// (watches are long-lived and counted once, so they are left out).
pub async fn api_reads(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    api_requests(client, READ_VERBS).await
}

async fn api_requests(client: &Client, verbs: &[&str]) -> anyhow::Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |key: &str| {
            let start = line.find(&format!("{key}=\""))? + key.len() + 2;
            Some(line[start..].split('"').next()?.to_string())
        };
        let Some(verb) = label("verb") else { continue };
        if !verbs.contains(&verb.as_str()) {
            continue;
        }
        let resource = match (label("resource"), label("subresource")) {
            (Some(r), Some(s)) if !s.is_empty() => format!("{r}/{s}"),
            (Some(r), _) => r,
            _ => continue,
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(resource).or_default() += value;
    }
    Ok(out)
}

/// Sum of the increases from `before` to `after`.
pub fn total_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> f64 {
    after
        .iter()
        .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// target/release/stowage, which the benchmarks start; an error says how to
/// build it.
pub fn release_stowage() -> anyhow::Result<std::path::PathBuf> {
    let stowage = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/stowage");
    anyhow::ensure!(
        stowage.exists(),
        "{} missing: run `cargo build --release` first",
        stowage.display()
    );
    Ok(stowage)
}
