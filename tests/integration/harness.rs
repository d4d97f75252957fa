//! Test harness: one real control plane per test run, a fresh namespace per
//! test.
//!
//! `just test` starts the control plane once (scripts/cluster.sh run) and
//! passes its kubeconfig in `STOWAGE_TEST_KUBECONFIG`. Without it (a bare
//! `cargo test`), the first test to ask starts one with `cluster.sh serve`,
//! which tears everything down when this process exits and closes its stdin.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config, ResourceExt};

struct Cluster {
    kubeconfig: PathBuf,
    /// Keeps `cluster.sh serve` alive: it stops when this pipe closes.
    _server: Option<Child>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static CLUSTER_WITHOUT_BINDER: OnceLock<Cluster> = OnceLock::new();
/// One cell per name: tests asking for the same bare cluster at once wait
/// for the first to start it instead of each starting their own.
/// Bare clusters in use, by name: shared by the tests that use one at the
/// same time, and stopped once the last of them is done, so that a run
/// never holds every cluster it ever started (each costs memory and inotify
/// instances, of which a machine has 128 by default).
static BARE_CLUSTERS: std::sync::Mutex<Vec<(&'static str, Weak<ClusterCell>)>> =
    std::sync::Mutex::new(Vec::new());

type ClusterCell = OnceLock<Cluster>;

const WITHOUT_BINDER: &str = "*,-persistentvolume-binder-controller";

/// kube-controller-manager's controllers, all on or with the PV binder off
/// (then stowage alone binds our claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binder {
    Kcm,
    StowageOnly,
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        if let Some(path) = std::env::var_os("STOWAGE_TEST_KUBECONFIG") {
            let kubeconfig = PathBuf::from(path);
            assert!(
                kubeconfig.is_file(),
                "STOWAGE_TEST_KUBECONFIG={} is not a file",
                kubeconfig.display()
            );
            return Cluster {
                kubeconfig,
                _server: None,
            };
        }
        start_cluster(None)
    })
}

fn cluster_for(binder: Binder) -> &'static Cluster {
    match binder {
        Binder::Kcm => cluster(),
        Binder::StowageOnly => {
            CLUSTER_WITHOUT_BINDER.get_or_init(|| start_cluster(Some(WITHOUT_BINDER)))
        }
    }
}

fn start_cluster(kcm_controllers: Option<&str>) -> Cluster {
    start_cluster_with(kcm_controllers, false)
}

fn start_cluster_with(kcm_controllers: Option<&str>, with_node: bool) -> Cluster {
    start_cluster_env(kcm_controllers, with_node, &[])
}

fn start_cluster_env(
    kcm_controllers: Option<&str>,
    with_node: bool,
    env: &[(&str, &str)],
) -> Cluster {
    let script = repo_root().join("scripts/cluster.sh");
    let mut command = Command::new("bash");
    command.envs(env.iter().copied());
    if with_node {
        command.env("STOWAGE_WITH_NODE", "1");
    }
    if let Some(controllers) = kcm_controllers {
        command.env("STOWAGE_KCM_CONTROLLERS", controllers);
    }
    command.env_remove("STOWAGE_CLUSTER_DIR");
    let mut child = command
        .arg(&script)
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading cluster.sh output");
        if let Some(path) = line.strip_prefix("kubeconfig=") {
            return Cluster {
                kubeconfig: PathBuf::from(path),
                _server: Some(child),
            };
        }
    }
    let status = child.wait().expect("waiting for cluster.sh");
    panic!(
        "the local control plane did not start ({status}) (scripts/cluster.sh serve ended without a \
         kubeconfig); its error is printed above"
    );
}

/// A client for the test control plane, bound to the calling test's runtime.
pub async fn client() -> Client {
    client_for(&cluster().kubeconfig).await
}

pub async fn client_for_path(path: &Path) -> Client {
    client_for(path).await
}

async fn client_for(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig usable");
    Client::try_from(config).expect("building client")
}

/// A name unique within this test run, safe as a Kubernetes object name.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A namespace created for one test.
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        Self::new_with(client().await, prefix).await
    }

    pub async fn new_with(client: Client, prefix: &str) -> Self {
        let name = unique_name(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "stowage.dev/test": "true" } }
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating test namespace");
        // The API server refuses pods until the namespace's default
        // ServiceAccount exists; kube-controller-manager makes it.
        let accounts =
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &name);
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(
                accounts,
                "default",
                |a: Option<&k8s_openapi::api::core::v1::ServiceAccount>| a.is_some(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("no default ServiceAccount in {name} after 60s"))
        .expect("watching ServiceAccounts");
        TestNamespace { client, name }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

/// Applies stowage's CRDs (server-side apply, as `kubectl apply
/// --server-side` would) and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Vec<CustomResourceDefinition> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply("stowage-tests").force();
    let mut applied = Vec::new();
    for crd in stowage::crd::all() {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .expect("applying CRD");
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        let crd = tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established after 30s"))
            .expect("watching CRD")
            .expect("CRD exists");
        applied.push(crd);
    }
    applied
}

/// The directory a build script of ours prints (building, or reusing
/// its cache, first).
pub fn built_by(script: &str) -> PathBuf {
    let script = repo_root().join(script);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Fake nodes each test stack has: Node objects (no kubelet) with a
/// `stowage node` agent each, and the volume capacity each agent offers.
pub const NODES: [(&str, &str); 3] = [
    ("node-a", "4Gi"),
    ("node-b", "4Gi"),
    ("node-small", "100Mi"),
];

/// stowage running against a control plane: `stowage controller` and one
/// `stowage node` per entry of NODES, alive until the test process exits.
pub struct Stack {
    pub kubeconfig: PathBuf,
    pub data_root: PathBuf,
    _processes: Vec<Child>,
}

static STACK: OnceLock<Stack> = OnceLock::new();
static STACK_WITHOUT_BINDER: OnceLock<Stack> = OnceLock::new();

pub fn stack(binder: Binder) -> &'static Stack {
    let cell = match binder {
        Binder::Kcm => &STACK,
        Binder::StowageOnly => &STACK_WITHOUT_BINDER,
    };
    cell.get_or_init(|| {
        let kubeconfig = cluster_for(binder).kubeconfig.clone();
        prepare(&kubeconfig, &NODES.map(|(n, _)| n));

        let data_root = std::env::temp_dir().join(unique_name("stowage-test-data"));
        let mut processes = Vec::new();
        for (node, capacity) in NODES {
            let dir = data_root.join(node);
            processes.push(hold(
                &kubeconfig,
                Some(&dir),
                &[
                    "node",
                    "--node-name",
                    node,
                    "--data-dir",
                    dir.to_str().unwrap(),
                    "--capacity",
                    capacity,
                    "--metrics-addr",
                    "127.0.0.1:0",
                ],
                &format!("node-{node}"),
            ));
        }
        // The controller's holder also removes the data root when the run
        // ends (each agent's holder removes only its own directory).
        processes.push(hold(
            &kubeconfig,
            Some(&data_root),
            &[
                "controller",
                "--leader-elect=false",
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            "controller",
        ));
        wait_for_storage_nodes(&kubeconfig, &NODES.map(|(n, _)| n));
        Stack {
            kubeconfig,
            data_root,
            _processes: processes,
        }
    })
}

/// Installs the CRDs and creates Node objects. Runs inside whichever test
/// came first, on a thread of its own to stay off that test's runtime.
fn prepare(kubeconfig: &Path, nodes: &[&str]) {
    let path = kubeconfig.to_path_buf();
    let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let client = client_for(&path).await;
            install_crds(&client).await;
            // The controller's namespace, as the install makes it: its
            // CSIStorageCapacity objects live there.
            let ns: Namespace = serde_json::from_value(
                serde_json::json!({ "metadata": { "name": "stowage-system" } }),
            )
            .unwrap();
            match Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("creating namespace stowage-system: {e}"),
            }
            for node in &nodes {
                create_node(&client, node).await;
            }
        })
    })
    .join()
    .expect("cluster set-up failed");
}

/// Blocks until every node agent has reported what it offers, so that tests
/// start from a cluster whose capacity is known.
pub fn wait_for_storage_nodes(kubeconfig: &Path, nodes: &[&str]) {
    let path = kubeconfig.to_path_buf();
    let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let api = Api::<stowage::crd::StorageNode>::all(client_for(&path).await);
            for node in &nodes {
                let reported = await_condition(
                    api.clone(),
                    node,
                    |n: Option<&stowage::crd::StorageNode>| n.is_some_and(|n| n.status.is_some()),
                );
                tokio::time::timeout(Duration::from_secs(60), reported)
                    .await
                    .unwrap_or_else(|_| {
                        panic!("node agent {node} never reported; see target/test-logs/")
                    })
                    .expect("watching StorageNodes");
            }
        })
    })
    .join()
    .expect("waiting for node agents");
}

/// A control plane of its own, with no stowage running and no kcm binder
/// (so every write is stowage's): for tests that start, kill and restart
/// stowage processes themselves.
/// Each `name` gets its own, so that tests running at once do not see each
/// other's stowage processes.
pub fn bare_cluster(name: &'static str, nodes: &[&str]) -> BareCluster {
    bare_cluster_of(name, nodes, Binder::StowageOnly)
}

/// As bare_cluster, with kube-controller-manager's PV binder on or off.
pub fn bare_cluster_of(name: &'static str, nodes: &[&str], binder: Binder) -> BareCluster {
    let cell = {
        let mut cells = BARE_CLUSTERS.lock().unwrap();
        cells.retain(|(_, cell)| cell.strong_count() > 0);
        match cells
            .iter()
            .find_map(|(n, cell)| (*n == name).then(|| cell.upgrade()))
        {
            Some(Some(cell)) => cell,
            _ => {
                let cell: Arc<OnceLock<Cluster>> = Arc::default();
                cells.push((name, Arc::downgrade(&cell)));
                cell
            }
        }
    };
    let controllers = (binder == Binder::StowageOnly).then_some(WITHOUT_BINDER);
    let cluster = cell.get_or_init(|| start_cluster(controllers));
    prepare(&cluster.kubeconfig, nodes);
    BareCluster(cell)
}

/// A bare cluster of its own (not shared by name) whose API server writes
/// an audit log of every request by stowage-system's ServiceAccounts, at
/// `audit_log(&cluster)`. Its API server has WatchList off, as Kubernetes
/// 1.30, 1.31 and 1.33 ship: the watches list in pages there, so the
/// `list` grants they need are used and checked; the streamed watches of
/// every other cluster need `watch` alone.
pub fn audited_cluster(nodes: &[&str]) -> BareCluster {
    let cell: Arc<OnceLock<Cluster>> = Arc::default();
    let env = [
        ("STOWAGE_AUDIT", "1"),
        ("STOWAGE_APISERVER_FEATURE_GATES", "WatchList=false"),
    ];
    cell.get_or_init(|| start_cluster_env(Some(WITHOUT_BINDER), false, &env));
    prepare(&cell.get().unwrap().kubeconfig, nodes);
    BareCluster(cell)
}

pub fn audit_log(cluster: &BareCluster) -> PathBuf {
    cluster.parent().unwrap().join("logs/audit.log")
}

/// A bare cluster's kubeconfig path; the cluster stops when the last test
/// holding it drops it (`cluster.sh serve` ends when its stdin closes).
#[derive(Clone)]
pub struct BareCluster(Arc<OnceLock<Cluster>>);

impl std::ops::Deref for BareCluster {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self
            .0
            .get()
            .expect("started before it is handed out")
            .kubeconfig
    }
}

impl AsRef<Path> for BareCluster {
    fn as_ref(&self) -> &Path {
        self
    }
}

/// `scripts/build-image.sh [TAG]`, run as `just image` runs it: without the
/// variables cargo sets for a test (CARGO_PKG_*, OUT_DIR, ...), which the
/// nested release build would take for a change and rebuild for.
pub fn build_image_command(tag: Option<&str>) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/build-image.sh"))
        .args(tag);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let keep = matches!(key.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR");
        if !keep && (key.starts_with("CARGO_") || key == "OUT_DIR" || key == "CARGO") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `stowage csi` serving on `socket` (a stale one is removed first), with
/// its volumes under `data`, paths checked against `kubelet`, and `extra`
/// arguments; returns once the socket exists.
pub fn csi_server(
    socket: &Path,
    data: &Path,
    kubelet: &Path,
    node: &str,
    extra: &[&str],
    log_name: &str,
) -> Process {
    csi_server_with_env(socket, data, kubelet, node, extra, &[], log_name)
}

/// `csi_server` with extra environment (a PATH with fake tools ahead).
pub fn csi_server_with_env(
    socket: &Path,
    data: &Path,
    kubelet: &Path,
    node: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    log_name: &str,
) -> Process {
    let _ = std::fs::remove_file(socket);
    let endpoint = format!("unix://{}", socket.display());
    let mut args = vec![
        "csi",
        "--endpoint",
        &endpoint,
        "--node-name",
        node,
        "--data-dir",
        data.to_str().unwrap(),
        "--kubelet-dir",
        kubelet.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = Process::start(Path::new("/dev/null"), &args, env, log_name);
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        socket.exists(),
        "stowage csi did not create {}; see target/test-logs/",
        socket.display()
    );
    server
}

/// One `stowage` process under scripts/hold.sh.
pub struct Process {
    pub(crate) child: Child,
    log: PathBuf,
}

impl Process {
    pub fn start(kubeconfig: &Path, args: &[&str], env: &[(&str, &str)], log_name: &str) -> Self {
        // A restart under the same name must not truncate the log of the
        // run before it (a crash's last lines are the evidence).
        let log_name = &numbered_log_name(log_name);
        Process {
            child: spawn_held(kubeconfig, None, args, env, log_name),
            log: log_path(log_name),
        }
    }

    /// Waits until the process's log has a line containing `text`; false
    /// on timeout.
    pub async fn logged(&self, text: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(text)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (through hold.sh, which kills after 5s) and waits up
    /// to `timeout` for the process to end; returns how long it took and
    /// its exit status (137: it had to be killed), or None on timeout.
    pub async fn terminate(
        mut self,
        timeout: Duration,
    ) -> Option<(Duration, std::process::ExitStatus)> {
        let start = tokio::time::Instant::now();
        drop(self.child.stdin.take());
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("polling child") {
                return Some((start.elapsed(), status));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// `stowage controller` without leader election, metrics on any port.
    pub fn controller(kubeconfig: &Path, log_name: &str) -> Self {
        Self::start(
            kubeconfig,
            &[
                "controller",
                "--leader-elect=false",
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[],
            log_name,
        )
    }

    /// `stowage node` for `node` with its volumes under `data`, room for
    /// 1Gi, metrics on any port.
    pub fn node(kubeconfig: &Path, node: &str, data: &Path, log_name: &str) -> Self {
        Self::start(
            kubeconfig,
            &[
                "node",
                "--node-name",
                node,
                "--data-dir",
                data.to_str().unwrap(),
                "--capacity",
                "1Gi",
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[],
            log_name,
        )
    }

    /// Waits for the process to end by itself; false on timeout.
    pub async fn exited_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().expect("polling child").is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Stops it (SIGTERM via hold.sh) and waits.
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Stack {
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await
    }

    /// Where `stowage node` for `node` keeps its volumes.
    pub fn volume_dir(&self, node: &str) -> PathBuf {
        self.data_root.join(node).join("volumes")
    }
}

fn hold(kubeconfig: &Path, cleanup: Option<&Path>, args: &[&str], log_name: &str) -> Child {
    spawn_held(kubeconfig, cleanup, args, &[], log_name)
}

fn log_path(log_name: &str) -> PathBuf {
    repo_root()
        .join("target/test-logs")
        .join(format!("{log_name}-{}.log", std::process::id()))
}

/// Starts `stowage ARGS` under scripts/hold.sh, logging to target/test-logs.
fn spawn_held(
    kubeconfig: &Path,
    cleanup: Option<&Path>,
    args: &[&str],
    env: &[(&str, &str)],
    log_name: &str,
) -> Child {
    let log_file = log_path(log_name);
    std::fs::create_dir_all(log_file.parent().unwrap()).unwrap();
    let log = std::fs::File::create(log_file).unwrap();
    let mut command = Command::new("bash");
    command.arg(repo_root().join("scripts/hold.sh"));
    if let Some(dir) = cleanup {
        command.arg("--cleanup").arg(dir);
    }
    command
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_stowage"))
        .args(args);
    // A node agent gets a kubelet directory of its own inside its data
    // directory, so that its socket never lands in the host's
    // /var/lib/kubelet and goes away with the data.
    if args.first() == Some(&"node") && !args.contains(&"--kubelet-dir") {
        let data = args
            .iter()
            .position(|a| *a == "--data-dir")
            .map(|i| args[i + 1])
            .expect("node needs --data-dir");
        let kubelet = format!("{data}/kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        command.arg("--kubelet-dir").arg(kubelet);
    }
    command
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,stowage=debug")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting stowage")
}

/// A Node object as kubelet would register it, Ready, labelled with its
/// hostname and stowage's topology key. No kubelet runs behind it.
pub async fn create_node(client: &Client, name: &str) {
    use k8s_openapi::api::core::v1::Node;
    let api = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": {
            "kubernetes.io/hostname": name,
            "topology.stowage.dev/node": name,
        }},
    }))
    .unwrap();
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => return,
        Err(e) => panic!("creating node {name}: {e}"),
    }
    let status = serde_json::json!({ "status": {
        "capacity": { "cpu": "4", "memory": "8Gi", "pods": "110" },
        "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "test node", "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string() }],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("setting node status");
}

/// GET over plain HTTP/1.0 on loopback; returns (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `url` until its status and body satisfy `ok` (a refused
/// connection counts as status 0); returns the body.
pub async fn wait_http(url: &str, what: &str, ok: impl Fn(u16, &str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let (status, body) = match tokio::net::TcpStream::connect(
            url.trim_start_matches("http://").split('/').next().unwrap(),
        )
        .await
        {
            Ok(_) => http_get(url).await,
            Err(_) => (0, String::new()),
        };
        if ok(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url}: not {what}; last answer {status} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Path of an upstream binary built by scripts/build-control-plane.sh
/// (kubectl, csi-sanity, ...).
pub fn upstream_binary(name: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/build-control-plane.sh"))
        .output()
        .expect("running scripts/build-control-plane.sh");
    assert!(
        out.status.success(),
        "building upstream binaries failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name);
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// The kubeconfig of the shared control plane.
pub fn kubeconfig() -> PathBuf {
    cluster().kubeconfig.clone()
}

/// A control plane with a real node: kubelet and containerd (see
/// scripts/node.sh), named `REAL_NODE`.
pub struct RealNode {
    pub kubeconfig: PathBuf,
    /// kubelet's root directory (its plugins_registry, pods, ...).
    pub kubelet_dir: PathBuf,
}

pub const REAL_NODE: &str = "localhost";

pub fn real_node() -> RealNode {
    let node = real_node_without_stowage();
    prepare(&node.kubeconfig, &[]);
    node
}

/// The same control plane and node, with nothing of stowage installed: for
/// tests that install it as users do.
pub fn real_node_without_stowage() -> RealNode {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    // Audited: the install test reads what stowage's accounts were refused.
    let cluster = CLUSTER.get_or_init(|| start_cluster_env(None, true, &[("STOWAGE_AUDIT", "1")]));
    let kubelet_dir = cluster.kubeconfig.parent().unwrap().join("node/kubelet");
    assert!(
        kubelet_dir.is_dir(),
        "kubelet root {} missing",
        kubelet_dir.display()
    );
    RealNode {
        kubeconfig: cluster.kubeconfig.clone(),
        kubelet_dir,
    }
}

/// `log_name` for its first start in this run, `log_name.N` for the Nth.
fn numbered_log_name(log_name: &str) -> String {
    static STARTS: std::sync::Mutex<Vec<(String, u32)>> = std::sync::Mutex::new(Vec::new());
    let mut starts = STARTS.lock().unwrap();
    let n = match starts.iter_mut().find(|(name, _)| name == log_name) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            starts.push((log_name.to_string(), 1));
            1
        }
    };
    if n == 1 {
        log_name.to_string()
    } else {
        format!("{log_name}.{n}")
    }
}

impl Process {
    /// Where this start's output goes.
    pub fn log_file(&self) -> &Path {
        &self.log
    }
}
