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
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
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

fn repo_root() -> &'static Path {
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
        start_cluster()
    })
}

fn start_cluster() -> Cluster {
    let script = repo_root().join("scripts/cluster.sh");
    let mut child = Command::new("bash")
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
    let kubeconfig = Kubeconfig::read_from(&cluster().kubeconfig).expect("reading kubeconfig");
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
        let client = client().await;
        let name = unique_name(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "stowage.dev/test": "true" } }
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating test namespace");
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
