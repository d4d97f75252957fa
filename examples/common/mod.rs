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

/// GET and LIST requests served by the API server so far, keyed by "VERB
/// resource": one LIST of a large collection costs the API server more than
/// thousands of GETs (watches are long-lived and counted once, so they are
/// left out).
pub async fn api_reads(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    api_requests_by(client, |verb, resource, _| {
        READ_VERBS
            .contains(&verb)
            .then(|| format!("{verb} {resource}"))
    })
    .await
}

async fn api_requests(client: &Client, verbs: &[&str]) -> anyhow::Result<BTreeMap<String, f64>> {
    api_requests_by(client, |verb, resource, _| {
        verbs.contains(&verb).then(|| resource.to_string())
    })
    .await
}

/// Requests the API server refused or failed so far (4xx and 5xx), keyed
/// by "VERB resource code": conflicts between writers show here as 409s.
pub async fn api_refusals(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    api_requests_by(client, |verb, resource, code| {
        (code.starts_with('4') || code.starts_with('5'))
            .then(|| format!("{verb} {resource} {code}"))
    })
    .await
}

/// apiserver_request_total summed under the key `key` gives each series
/// (from its verb, resource[/subresource] and code; None skips it).
async fn api_requests_by(
    client: &Client,
    key: impl Fn(&str, &str, &str) -> Option<String>,
) -> anyhow::Result<BTreeMap<String, f64>> {
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
        let (Some(verb), Some(code)) = (label("verb"), label("code")) else {
            continue;
        };
        let resource = match (label("resource"), label("subresource")) {
            (Some(r), Some(s)) if !s.is_empty() => format!("{r}/{s}"),
            (Some(r), _) => r,
            _ => continue,
        };
        let Some(key) = key(&verb, &resource, &code) else {
            continue;
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_default() += value;
    }
    Ok(out)
}

/// Each key's increase from `before` to `after`, where it grew.
pub fn increases(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Vec<(String, f64)> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, grew)| *grew > 0.0)
        .collect()
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

/// A client for the control plane `kubeconfig` points at.
pub async fn client_for(kubeconfig: &std::path::Path) -> anyhow::Result<Client> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// Applies stowage's CRDs and gives the API server a moment to serve them.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    let crds = kube::Api::<CustomResourceDefinition>::all(client.clone());
    for crd in stowage::crd::all() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    Ok(())
}

/// Name of the `i`th node the benchmarks run a `stowage node` agent for.
pub fn agent_node(i: usize) -> String {
    format!("bench-{i}")
}

/// `count` Node objects (bench-0, ...) and a `stowage node` agent for each,
/// its data under `data`, talking to the control plane of `kubeconfig`
/// (None: the inherited KUBECONFIG). The agents die with the returned handles.
pub async fn start_node_agents(
    client: &Client,
    kubeconfig: Option<&std::path::Path>,
    data: &std::path::Path,
    count: usize,
) -> anyhow::Result<Vec<tokio::process::Child>> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::PostParams;
    let stowage = release_stowage()?;
    let mut children = Vec::new();
    for i in 0..count {
        let node = agent_node(i);
        std::fs::create_dir_all(data.join(format!("{node}-kubelet")))?;
        let obj: Node =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": node, "labels": {
            "kubernetes.io/hostname": node, "topology.stowage.dev/node": node } } }))?;
        // Already there on a second run against the same control plane.
        let _ = kube::Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &obj)
            .await;
        let mut command = tokio::process::Command::new(&stowage);
        command
            .args(["node", "--node-name", &node, "--capacity", "100Ti"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.join(&node))
            .arg("--kubelet-dir")
            .arg(data.join(format!("{node}-kubelet")))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(kubeconfig) = kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        children.push(command.spawn()?);
    }
    Ok(children)
}

/// Creates namespace `name` unless it exists (`stowage-system`: where the
/// controller publishes CSIStorageCapacity, as the install makes it).
pub async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))?;
    match kube::Api::<Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        // Already there on a second run against the same control plane.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// CPU seconds (user + system) used so far by each process of the local
/// control plane whose state directory is `cluster_dir` (their command
/// lines name it), summed per program: etcd, kube-apiserver, ...
pub fn control_plane_cpu(cluster_dir: &std::path::Path) -> BTreeMap<String, f64> {
    let needle = cluster_dir.to_string_lossy().into_owned();
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(program) = args.first().and_then(|a| a.rsplit('/').next()) else {
            continue;
        };
        let known = [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ];
        if known.contains(&program) && args.iter().any(|a| a.contains(&needle)) {
            *out.entry(program.to_string()).or_default() += cpu_seconds(pid);
        }
    }
    out
}

/// CPU seconds (user + system) process `pid` has used so far; 0 once it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may itself hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Seconds all cores together spent busy (not idle, not waiting on I/O)
/// since boot, from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
