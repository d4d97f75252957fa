//! CreateVolume parity with external-provisioner: the same claims and
//! classes, once through external-provisioner (the version pinned in
//! tests/sidecars) and once through `stowage controller --csi-driver`,
//! each side in front of its own Kubernetes CSI mock driver recording every
//! call (`--record`). The two drivers' CreateVolumeRequests must be equal
//! claim by claim, apart from what must differ: the volume name
//! (`pvc-<claim UID>`) and, in `--extra-create-metadata`'s parameters, the
//! claim's namespace and the PV's name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::external_driver::ExternalDriver;
use crate::fixtures::{is_bound, wait};
use crate::harness::{
    Binder, TestNamespace, bare_cluster_of, client_for_path, repo_root, unique_name,
};
use crate::proxy_driver::{apply, proxy_controller};

const NODES: [&str; 2] = ["parity-a", "parity-b"];
/// Valued per node by the harness, so that the cluster has two segments.
const NODE_KEY: &str = "topology.stowage.dev/node";
const CREATE: &str = "/csi.v1.Controller/CreateVolume";

/// A claim of the scene: name, class (suffix), access modes, volume mode,
/// size, and the node its consumer pod is pinned to (WaitForFirstConsumer).
struct Case {
    claim: &'static str,
    class: &'static str,
    modes: &'static [&'static str],
    block: bool,
    size: &'static str,
    consumer_on: Option<&'static str>,
}

const fn case(claim: &'static str, class: &'static str, modes: &'static [&'static str]) -> Case {
    Case {
        claim,
        class,
        modes,
        block: false,
        size: "100M",
        consumer_on: None,
    }
}

const CASES: [Case; 11] = [
    case("rwo", "plain", &["ReadWriteOnce"]),
    case("rwop", "plain", &["ReadWriteOncePod"]),
    case("rox", "plain", &["ReadOnlyMany"]),
    case("rwx", "plain", &["ReadWriteMany"]),
    case("two-modes", "plain", &["ReadWriteOnce", "ReadOnlyMany"]),
    // StatefulSet-like names: external-provisioner rotates Immediate
    // classes' preferred topology by the name's hash and ordinal.
    case("data-web-1", "plain", &["ReadWriteOnce"]),
    Case {
        size: "1Gi",
        ..case("full", "full", &["ReadWriteOnce"])
    },
    Case {
        block: true,
        ..case("block", "full", &["ReadWriteOnce"])
    },
    case("zoned", "zoned", &["ReadWriteOnce"]),
    Case {
        consumer_on: Some("parity-b"),
        ..case("late", "late", &["ReadWriteOnce"])
    },
    Case {
        consumer_on: Some("parity-a"),
        ..case("late-zoned", "late-zoned", &["ReadWriteOncePod"])
    },
];

/// The classes, named `<prefix>-<suffix>`, for `driver`.
fn classes(driver: &str, prefix: &str, mock_key: &str) -> Vec<Value> {
    let p = "csi.storage.k8s.io";
    let class = |suffix: &str, mode: &str, extra: Value| {
        let mut c = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": { "name": format!("{prefix}-{suffix}") },
            "provisioner": driver, "volumeBindingMode": mode, "reclaimPolicy": "Delete",
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let zones = json!([{ "matchLabelExpressions": [{ "key": NODE_KEY, "values": ["parity-b", "parity-a"] }] }]);
    vec![
        class("plain", "Immediate", json!({})),
        class(
            "full",
            "Immediate",
            json!({
                "parameters": {
                    "kind": "fast",
                    format!("{p}/fstype"): "xfs",
                    format!("{p}/provisioner-secret-name"): "${pvc.name}-creds",
                    format!("{p}/provisioner-secret-namespace"): "${pvc.namespace}",
                    format!("{p}/node-stage-secret-name"): "stage-${pv.name}",
                    format!("{p}/node-stage-secret-namespace"): "${pvc.namespace}",
                },
                "mountOptions": ["noatime", "nodiratime"],
            }),
        ),
        class("zoned", "Immediate", json!({ "allowedTopologies": zones })),
        class("late", "WaitForFirstConsumer", json!({})),
        class(
            "late-zoned",
            "WaitForFirstConsumer",
            json!({ "allowedTopologies": [{ "matchLabelExpressions": [
                { "key": mock_key, "values": ["some-mock-node"] },
                { "key": NODE_KEY, "values": ["parity-a", "parity-b"] },
            ] }] }),
        ),
    ]
}

/// One side of the comparison: a mock driver recording its calls, and the
/// namespace where that side's claims live.
struct Side {
    driver: ExternalDriver,
    record: PathBuf,
    ns: Option<TestNamespace>,
    /// Claim name → UID.
    uids: BTreeMap<String, String>,
}

impl Side {
    fn new(name: &str, dir: &Path) -> Self {
        let record = dir.join(format!("{name}.jsonl"));
        let driver =
            ExternalDriver::mock(name).with_args(&[&format!("--record={}", record.display())]);
        Side {
            driver,
            record,
            ns: None,
            uids: BTreeMap::new(),
        }
    }

    fn ns(&self) -> &TestNamespace {
        self.ns.as_ref().expect("scene created")
    }

    /// Classes, Secrets, claims and consumer pods of this side.
    async fn create_scene(&mut self, client: &Client, prefix: &str) {
        let ns = TestNamespace::new_with(client.clone(), prefix).await;
        let (mock_key, _) = &self.driver.topology;
        for class in classes(&self.driver.name, &ns.name, mock_key) {
            apply(&Api::<StorageClass>::all(client.clone()), class).await;
        }
        for case in CASES.iter().filter(|c| c.class == "full") {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": { "name": format!("{}-creds", case.claim) },
                "stringData": { "user": "parity", "password": "s3cret" },
            }))
            .unwrap();
            ns.api::<Secret>()
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
        }
        for case in &CASES {
            let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                "metadata": { "name": case.claim },
                "spec": {
                    "storageClassName": format!("{}-{}", ns.name, case.class),
                    "accessModes": case.modes,
                    "volumeMode": if case.block { "Block" } else { "Filesystem" },
                    "resources": { "requests": { "storage": case.size } },
                },
            }))
            .unwrap();
            let created = ns
                .api::<PersistentVolumeClaim>()
                .create(&PostParams::default(), &claim)
                .await
                .unwrap();
            self.uids
                .insert(case.claim.to_string(), created.uid().unwrap());
            if let Some(node) = case.consumer_on {
                ns.api::<Pod>()
                    .create(&PostParams::default(), &consumer(case.claim, node))
                    .await
                    .unwrap();
            }
        }
        self.ns = Some(ns);
    }

    async fn wait_bound(&self) {
        let claims = self.ns().api::<PersistentVolumeClaim>();
        for case in &CASES {
            wait(&claims, case.claim, "Bound", is_bound).await;
        }
    }

    /// The CreateVolumeRequests the driver recorded, by claim name, each
    /// with the names that must differ replaced by placeholders. Every
    /// request for one volume must be the same (retries ask again by name).
    fn requests(&self) -> BTreeMap<String, Value> {
        let text = std::fs::read_to_string(&self.record)
            .unwrap_or_else(|e| panic!("{}: {e}", self.record.display()));
        let claims: BTreeMap<String, &str> = self
            .uids
            .iter()
            .map(|(claim, uid)| (format!("pvc-{uid}"), claim.as_str()))
            .collect();
        let mut out = BTreeMap::<String, Value>::new();
        for line in text.lines() {
            let call: Value = serde_json::from_str(line).unwrap();
            if call["method"] != CREATE {
                continue;
            }
            let mut request = call["request"].clone();
            if let Some(unknown) = call.get("unknown_fields") {
                request["unknown_fields"] = unknown.clone();
            }
            let pv = request["name"].as_str().unwrap().to_string();
            let claim = claims.get(&pv).unwrap_or_else(|| {
                panic!(
                    "{}: CreateVolume for {pv}, no claim of ours",
                    self.driver.name
                )
            });
            normalise(&mut request, &pv, &self.ns().name);
            if let Some(earlier) = out.get(*claim) {
                assert_eq!(
                    earlier, &request,
                    "{}: two different CreateVolumeRequests for {claim}",
                    self.driver.name
                );
            }
            out.insert(claim.to_string(), request);
        }
        out
    }
}

/// A pod using `claim`, left to kube-scheduler but allowed only on `node`.
fn consumer(claim: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": format!("{claim}-consumer") },
        "spec": {
            "nodeSelector": { "kubernetes.io/hostname": node },
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{ "name": "c", "image": "none" }],
            "volumes": [{ "name": "d", "persistentVolumeClaim": { "claimName": claim } }],
        },
    }))
    .unwrap()
}

/// What must differ between the two sides, replaced by placeholders: the
/// volume's name, and the claim's namespace and the PV's name where
/// `--extra-create-metadata` puts them.
fn normalise(request: &mut Value, pv: &str, namespace: &str) {
    request["name"] = json!("<pv name>");
    if let Some(parameters) = request["parameters"].as_object_mut() {
        for value in parameters.values_mut() {
            if value == pv {
                *value = json!("<pv name>");
            } else if value == namespace {
                *value = json!("<claim namespace>");
            }
        }
    }
}

/// Where `a` and `b` differ, one line per JSON path.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<_> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (x.get(k), y.get(k));
                let (va, vb) = (va.unwrap_or(&Value::Null), vb.unwrap_or(&Value::Null));
                differences(va, vb, &format!("{path}.{k}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                differences(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("  {path}: external-provisioner {a}, stowage {b}")),
        _ => {}
    }
}

/// Both drivers on both nodes (CSINodes listing the mock's key and the
/// per-node key), and each driver's CSIDriver.
async fn install_drivers(client: &Client, drivers: &[&ExternalDriver]) {
    for driver in drivers {
        apply(
            &Api::<CSIDriver>::all(client.clone()),
            json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": driver.name },
                    "spec": { "attachRequired": false, "podInfoOnMount": false } }),
        )
        .await;
    }
    let (key, value) = &drivers[0].topology;
    let entries: Vec<Value> = drivers
        .iter()
        .map(|d| json!({ "name": d.name, "nodeID": d.node_id, "topologyKeys": [key, NODE_KEY] }))
        .collect();
    for node in NODES {
        Api::<Node>::all(client.clone())
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { key: value } } })),
            )
            .await
            .unwrap();
        apply(
            &Api::<CSINode>::all(client.clone()),
            json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": { "name": node },
                    "spec": { "drivers": entries } }),
        )
        .await;
    }
}

/// external-provisioner from scripts/build-sidecars.sh, as deployments run
/// it beside a driver with `--extra-create-metadata`; killed when dropped.
struct ExternalProvisioner(Child);

impl ExternalProvisioner {
    fn start(kubeconfig: &Path, socket: &Path) -> Self {
        let script = repo_root().join("scripts/build-sidecars.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("csi-provisioner")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "scripts/build-sidecars.sh csi-provisioner failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary =
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("csi-provisioner");
        let log = repo_root().join("target/test-logs").join(format!(
            "create-parity-csi-provisioner-{}.log",
            std::process::id()
        ));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let log = std::fs::File::create(log).unwrap();
        // csi-provisioner prefers $KUBECONFIG to --kubeconfig, and the test
        // process's names the shared stack's control plane.
        let child = Command::new(&binary)
            .env("KUBECONFIG", kubeconfig)
            .arg(format!("--csi-address={}", socket.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--leader-election=false",
                "--extra-create-metadata",
                "--v=4",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        ExternalProvisioner(child)
    }
}

impl Drop for ExternalProvisioner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn create_parity_with_external_provisioner() {
    // kcm's binder on: external-provisioner provisions only claims it has
    // annotated, and leaves binding to it.
    let kubeconfig = bare_cluster_of("create-parity", &NODES, Binder::Kcm);
    let client = client_for_path(&kubeconfig).await;
    let dir = std::env::temp_dir().join(unique_name("stowage-create-parity"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut upstream = Side::new("upstream.parity.csi.stowage.test", &dir);
    let mut ours = Side::new("stowage.parity.csi.stowage.test", &dir);
    let _drivers = (upstream.driver.start(), ours.driver.start());
    install_drivers(&client, &[&upstream.driver, &ours.driver]).await;
    let _provisioner = ExternalProvisioner::start(&kubeconfig, &upstream.driver.socket);
    let controller = proxy_controller(
        &kubeconfig,
        &ours.driver.name,
        &ours.driver.socket,
        &["--serve-local=false", "--extra-create-metadata"],
        "create-parity-controller",
    );
    upstream.create_scene(&client, "parity-upstream").await;
    ours.create_scene(&client, "parity-stowage").await;
    upstream.wait_bound().await;
    ours.wait_bound().await;

    let (theirs, mine) = (upstream.requests(), ours.requests());
    let mut report = Vec::new();
    for case in &CASES {
        let (a, b) = (theirs.get(case.claim), mine.get(case.claim));
        let (Some(a), Some(b)) = (a, b) else {
            report.push(format!(
                "{}: CreateVolume asked by external-provisioner {}, by stowage {}",
                case.claim,
                a.is_some(),
                b.is_some()
            ));
            continue;
        };
        let mut diff = Vec::new();
        differences(a, b, "", &mut diff);
        if !diff.is_empty() {
            report.push(format!(
                "{}:\n{}\n  external-provisioner: {a}\n  stowage:              {b}",
                case.claim,
                diff.join("\n")
            ));
        }
    }
    assert!(
        report.is_empty(),
        "CreateVolumeRequests differ (records in {}):\n{}",
        dir.display(),
        report.join("\n")
    );
    // The comparison saw what it compares: extra metadata, a secret, mount
    // flags, requisite and preferred topology, on both sides.
    let full = theirs["full"].to_string();
    for seen in [
        "csi.storage.k8s.io/pvc/name",
        "s3cret",
        "nodiratime",
        "preferred",
    ] {
        assert!(full.contains(seen), "{seen} not in {full}");
    }
    controller.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
