//! `just bench-scale N`: the controller starting on a cluster that already
//! holds N claims, N PVs, N/2 Volumes and N/10 VolumeAttachments (half of
//! the claims another driver's), then 1000 new claims on top. Not a test:
//! it prints figures and writes them to target/bench/scale-N.{md,csv}.
//!
//! Two runs, one after the other, each on its own control plane:
//! - `empty`: a second, fresh control plane (`scripts/cluster.sh serve`),
//!   nothing pre-populated: the baseline;
//! - `N`: the control plane this runs under, populated through the API
//!   first (64 requests in flight), then left until kube-controller-manager
//!   has caught up (API writes below 5/s).
//!
//! Per run: four `stowage node` agents, one claim waiting, then `stowage
//! controller` starts. "Started" is its log line `controller started`
//! (every watch has listed; it acts from then on); "first Bound" is the
//! waiting claim Bound. Both are counted from spawning the process. Then
//! it waits for the control plane to come to rest (15 s windows, until one
//! is no less busy than the one before), shows what that last window
//! cost, and makes three
//! rounds of 1000 claims of an Immediate class, 32 creates in flight, each
//! to all Bound: the table shows the median round, and every round's rate
//! is listed, since one round on a saturated 2-core machine varies.
//!
//! Run under `scripts/cluster.sh run` (KUBECONFIG set).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use stowage::crd::StorageNode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot};

#[path = "common/mod.rs"]
mod common;
#[path = "bench_scale/populate.rs"]
mod populate;
#[path = "bench_scale/report.rs"]
mod report;
use common::{
    api_reads, api_writes, cpu_seconds, machine_busy_seconds, peak_rss_kib, percentile, total_delta,
};
use populate::{NEW, Populated};

const NODES: usize = 4;
const NEW_CLAIMS: usize = 1000;
/// Rounds of NEW_CLAIMS; the median is reported.
const ROUNDS: usize = 3;
/// The window CPU use at rest is measured over: kube-controller-manager's
/// PV binder resyncs every claim and PV each 15 s (its default
/// `--pvclaimbinder-sync-period`), so every window holds one resync and
/// windows compare like for like.
const IDLE: Duration = Duration::from_secs(15);
/// Windows waited at most for the control plane to come to rest.
const REST_WINDOWS: usize = 8;
/// A window busier than the one before it by less than this (cores) is
/// rest: what the population and the controller's start left is done.
const REST_MARGIN: f64 = 0.05;
/// Creates in flight for the new claims, as bench-provision and bench-compare.
const CREATE_CONCURRENCY: usize = 32;
const LIMIT: Duration = Duration::from_secs(900);

/// One run's figures.
pub struct Run {
    pub label: String,
    pub populated: Option<Populated>,
    pub settle_s: f64,
    pub started_s: f64,
    pub first_bound_s: f64,
    pub rss_ready_mib: f64,
    pub rss_peak_mib: f64,
    /// From spawning the controller to the end of the first window at
    /// rest, when the rounds start.
    pub at_rest_s: f64,
    /// CPU cores each process used over that window.
    pub idle_cores: Vec<(String, f64)>,
    /// The median round.
    pub claims: ClaimFigures,
    /// Every round's claims/s, in order.
    pub rounds: Vec<f64>,
}

pub struct ClaimFigures {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub writes_per_volume: f64,
    pub reads_per_volume: f64,
    /// CPU seconds spent while the new claims were made and bound, per
    /// process (the controller, the agents, each control-plane program,
    /// this benchmark) and the whole machine's busy time; with the phase's
    /// wall time, to tell which one the rate waited on.
    pub cpu: Vec<(String, f64)>,
    pub wall_s: f64,
    /// API writes per new volume, by resource (at least 0.05).
    pub writes_by_resource: Vec<(String, f64)>,
    /// Requests the API server refused or failed meanwhile (all clients),
    /// by verb, resource and code: 409s are writers racing each other.
    pub refused: Vec<(String, f64)>,
    /// Reads meanwhile (all clients), by verb and resource.
    pub reads: Vec<(String, f64)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "50000".into())
        .parse()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    common::release_stowage()?;
    let kubeconfig = PathBuf::from(
        std::env::var("KUBECONFIG")
            .map_err(|_| anyhow::anyhow!("run me under scripts/cluster.sh run"))?,
    );

    eprintln!("== empty cluster (a second control plane)");
    let plane = SecondControlPlane::start(&root).await?;
    let empty = run(&plane.kubeconfig, 0, "empty").await;
    plane.stop().await;
    let empty = empty?;
    eprintln!("== {n} claims pre-populated");
    let full = run(&kubeconfig, n, &n.to_string()).await?;

    let (markdown, csv) = report::render(n, &[empty, full]);
    print!("{markdown}");
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("scale-{n}.md")), &markdown)?;
    std::fs::write(out.join(format!("scale-{n}.csv")), &csv)?;
    eprintln!("written: target/bench/scale-{n}.md and .csv");
    Ok(())
}

/// Populates `n` claims (if any), starts agents and the controller, and
/// measures its start and 1000 new claims.
async fn run(kubeconfig: &Path, n: usize, label: &str) -> anyhow::Result<Run> {
    let client = common::client_for(kubeconfig).await?;
    common::install_crds(&client).await?;
    populate::namespaces_and_classes(&client).await?;
    // Before the agents start: a Volume without its status yet would look
    // like work to them.
    let populated = match n {
        0 => None,
        n => Some(populate::run(&client, n, NODES).await?),
    };
    if let Some(p) = &populated {
        eprintln!(
            "populated {} objects ({} writes) in {:.1} s",
            p.objects(),
            p.writes,
            p.secs
        );
    }
    let settle_s = settle(&client).await?;
    let data = std::env::temp_dir().join(format!("stowage-scale-{}-{label}", std::process::id()));
    let agents = common::start_node_agents(&client, Some(kubeconfig), &data, NODES).await?;
    wait_for_storage_nodes(&client).await?;

    let bound = BoundClaims::watch(Api::namespaced(client.clone(), NEW));
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NEW);
    claims
        .create(&PostParams::default(), &claim("waiting"))
        .await?;
    let spawned = Instant::now();
    let (controller, started) = start_controller(kubeconfig)?;
    let pid = controller.id().expect("controller running");
    let started_s = tokio::time::timeout(LIMIT, started)
        .await
        .map_err(|_| anyhow::anyhow!("controller not started after {LIMIT:?}"))?
        .map_err(|_| anyhow::anyhow!("controller exited before it started"))?
        .duration_since(spawned)
        .as_secs_f64();
    bound.wait_for(&["waiting".to_string()], LIMIT).await?;
    let first_bound_s = bound.get("waiting").unwrap().duration_since(spawned);
    let rss_ready_mib = peak_rss_kib(pid) as f64 / 1024.0;
    eprintln!(
        "controller started after {started_s:.2} s, first claim Bound after {:.2} s, RSS {rss_ready_mib:.1} MiB",
        first_bound_s.as_secs_f64()
    );

    let mut pids = Processes {
        controller: pid,
        agents: agents.iter().filter_map(|a| a.id()).collect(),
        cluster_dir: kubeconfig.parent().unwrap_or(Path::new("/")).to_path_buf(),
    };
    let idle_cores = pids.at_rest().await;
    let at_rest_s = spawned.elapsed().as_secs_f64();
    eprintln!("at rest after {at_rest_s:.0} s");
    let mut rounds = Vec::new();
    // After the first round, as before there were rounds: each round adds
    // 1000 claims, PVs and Volumes to the caches.
    let mut rss_peak_mib = 0.0;
    for round in 0..ROUNDS {
        let figures = new_claims(&client, &bound, &mut pids, round).await?;
        let rss = peak_rss_kib(pid) as f64 / 1024.0;
        eprintln!(
            "round {round}: {:.1} claims/s, peak RSS {rss:.1} MiB",
            figures.per_s
        );
        if round == 0 {
            rss_peak_mib = rss;
        }
        rounds.push(figures);
    }
    let rates: Vec<f64> = rounds.iter().map(|r| r.per_s).collect();
    rounds.sort_by(|a, b| a.per_s.total_cmp(&b.per_s));
    let figures = rounds.swap_remove(ROUNDS / 2);
    drop(controller);
    drop(agents);
    let _ = std::fs::remove_dir_all(&data);
    Ok(Run {
        label: label.to_string(),
        populated,
        settle_s,
        started_s,
        first_bound_s: first_bound_s.as_secs_f64(),
        rss_ready_mib,
        rss_peak_mib,
        at_rest_s,
        idle_cores,
        claims: figures,
        rounds: rates,
    })
}

fn claim(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "storageClassName": NEW, "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": "16Mi" } } },
    }))
    .expect("claim literal")
}

/// `stowage controller` for the control plane of `kubeconfig`, and when it
/// logged `controller started`. Its log is drained (and its
/// warnings passed on) so that a full pipe never stalls it.
fn start_controller(kubeconfig: &Path) -> anyhow::Result<(Child, oneshot::Receiver<Instant>)> {
    let mut child = Command::new(common::release_stowage()?)
        .args(["controller", "--leader-elect=false"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube_runtime=warn,tower=warn,hyper=warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let (started, started_rx) = oneshot::channel();
    let mut started = Some(started);
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    tokio::spawn(async move {
        let mut shown = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("controller started") {
                if let Some(started) = started.take() {
                    let _ = started.send(Instant::now());
                }
            } else if (line.contains("WARN") || line.contains("ERROR")) && shown < 20 {
                shown += 1;
                eprintln!("controller: {line}");
            }
        }
    });
    Ok((child, started_rx))
}

/// Waits until API writes (all clients) fall below 10 in 2 s, so that
/// kube-controller-manager's reaction to the population is over before the
/// controller starts. Returns how long that took.
async fn settle(client: &Client) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut last = api_writes(client).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = api_writes(client).await?;
        if total_delta(&last, &now) < 10.0 || start.elapsed() > Duration::from_secs(600) {
            return Ok(start.elapsed().as_secs_f64());
        }
        last = now;
    }
}

async fn wait_for_storage_nodes(client: &Client) -> anyhow::Result<()> {
    let api = Api::<StorageNode>::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = api.list(&ListParams::default()).await?;
        if nodes.items.iter().filter(|n| n.status.is_some()).count() >= NODES {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "node agents not reporting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 1000 claims at once, to all Bound.
async fn new_claims(
    client: &Client,
    bound: &BoundClaims,
    pids: &mut Processes,
    round: usize,
) -> anyhow::Result<ClaimFigures> {
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NEW);
    let writes_before = api_writes(client).await?;
    let reads_before = api_reads(client).await?;
    let cpu_before = pids.cpu();
    let refused_before = common::api_refusals(client).await?;
    let start = Instant::now();
    let created: HashMap<String, Instant> = futures::stream::iter(0..NEW_CLAIMS)
        .map(|i| {
            let claims = claims.clone();
            async move {
                let name = format!("new-{round}-{i:05}");
                let t = Instant::now();
                claims.create(&PostParams::default(), &claim(&name)).await?;
                anyhow::Ok((name, t))
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect()
        .await?;
    let names: Vec<String> = created.keys().cloned().collect();
    bound.wait_for(&names, LIMIT).await?;
    let elapsed = bound.last(&names).duration_since(start).as_secs_f64();
    let cpu = pids
        .cpu()
        .into_iter()
        .zip(cpu_before)
        .map(|((name, after), (_, before))| (name, after - before))
        .collect();
    let mut ms: Vec<f64> = names
        .iter()
        .map(|n| {
            bound
                .get(n)
                .unwrap()
                .duration_since(created[n])
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let refused_after = common::api_refusals(client).await?;
    let refused = common::increases(&refused_before, &refused_after);
    let writes_after = api_writes(client).await?;
    let writes = total_delta(&writes_before, &writes_after);
    let writes_by_resource = common::increases(&writes_before, &writes_after)
        .into_iter()
        .map(|(resource, n)| (resource, n / NEW_CLAIMS as f64))
        .filter(|(_, per_volume)| *per_volume >= 0.05)
        .collect();
    let reads_after = api_reads(client).await?;
    let reads = total_delta(&reads_before, &reads_after);
    Ok(ClaimFigures {
        per_s: NEW_CLAIMS as f64 / elapsed,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        writes_per_volume: writes / NEW_CLAIMS as f64,
        reads_per_volume: reads / NEW_CLAIMS as f64,
        writes_by_resource,
        refused,
        reads: common::increases(&reads_before, &reads_after),
        cpu,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// The processes whose CPU time the new-claims phase reports.
struct Processes {
    controller: u32,
    agents: Vec<u32>,
    cluster_dir: PathBuf,
}

impl Processes {
    /// Waits until the control plane is at rest: the controller's first
    /// pass over every object, kube-controller-manager's and the API
    /// server's work on a fresh population, are over once a window of IDLE
    /// is no longer less busy than the one before it. Returns the cores
    /// each process used over that last window.
    async fn at_rest(&mut self) -> Vec<(String, f64)> {
        let busy = |cores: &[(String, f64)]| {
            cores
                .iter()
                .find(|(name, _)| name == "machine busy")
                .map_or(0.0, |(_, c)| *c)
        };
        let mut last = self.idle_cores(IDLE).await;
        for _ in 1..REST_WINDOWS {
            let next = self.idle_cores(IDLE).await;
            let settled = busy(&next) > busy(&last) - REST_MARGIN;
            last = next;
            if settled {
                break;
            }
        }
        last
    }

    /// CPU cores each process used over the next `window`.
    async fn idle_cores(&mut self, window: Duration) -> Vec<(String, f64)> {
        let before = self.cpu();
        tokio::time::sleep(window).await;
        self.cpu()
            .into_iter()
            .zip(before)
            .map(|((name, after), (_, before))| (name, (after - before) / window.as_secs_f64()))
            .collect()
    }

    /// CPU seconds so far, in a fixed order of names.
    fn cpu(&mut self) -> Vec<(String, f64)> {
        let plane = common::control_plane_cpu(&self.cluster_dir);
        let mut out = vec![
            ("stowage controller".into(), cpu_seconds(self.controller)),
            (
                format!("{NODES} node agents"),
                self.agents.iter().map(|p| cpu_seconds(*p)).sum(),
            ),
        ];
        for program in [
            "kube-apiserver",
            "etcd",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            out.push((program.into(), plane.get(program).copied().unwrap_or(0.0)));
        }
        out.push(("this benchmark".into(), cpu_seconds(std::process::id())));
        out.push(("machine busy".into(), machine_busy_seconds()));
        out
    }
}

/// When each claim of a namespace was first seen Bound.
#[derive(Clone, Default)]
struct BoundClaims {
    at: Arc<Mutex<HashMap<String, Instant>>>,
    changed: Arc<Notify>,
}

impl BoundClaims {
    /// Watches from now on (before anything is created, so that no Bound
    /// is missed) until the program ends.
    fn watch(api: Api<PersistentVolumeClaim>) -> Self {
        let this = Self::default();
        let seen = this.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(claim) = stream.next().await {
                let Ok(claim) = claim else { continue };
                if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                    let mut at = seen.at.lock().unwrap();
                    at.entry(claim.name_any()).or_insert_with(Instant::now);
                    seen.changed.notify_waiters();
                }
            }
        });
        this
    }

    async fn wait_for(&self, names: &[String], limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            let missing = {
                let at = self.at.lock().unwrap();
                names.iter().filter(|n| !at.contains_key(*n)).count()
            };
            if missing == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{missing} of {} claims not Bound after {limit:?}",
                names.len()
            );
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    fn get(&self, name: &str) -> Option<Instant> {
        self.at.lock().unwrap().get(name).copied()
    }

    fn last(&self, names: &[String]) -> Instant {
        names.iter().filter_map(|n| self.get(n)).max().unwrap()
    }
}

/// A fresh control plane beside the one we run under (`cluster.sh serve`),
/// torn down when its stdin closes.
struct SecondControlPlane {
    child: Child,
    kubeconfig: PathBuf,
}

impl SecondControlPlane {
    async fn start(root: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("bash")
            .arg(root.join("scripts/cluster.sh"))
            .arg("serve")
            // Ours names the outer control plane's state directory.
            .env_remove("STOWAGE_CLUSTER_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        while let Some(line) = lines.next_line().await? {
            if let Some(path) = line.strip_prefix("kubeconfig=") {
                return Ok(Self {
                    child,
                    kubeconfig: PathBuf::from(path),
                });
            }
        }
        anyhow::bail!("scripts/cluster.sh serve ended without a kubeconfig (its error is above)")
    }

    /// Closes its stdin and waits for the teardown.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
    }
}
