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

/// Write requests served by the API server so far, per resource.
pub async fn api_writes(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
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
        if !matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY") {
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
