//! stowage installed as users install it, on a real kubelet node: its own
//! image, `kubectl apply -k manifests/`, its pods under its manifests'
//! ServiceAccounts and RBAC (nothing of stowage runs with admin
//! credentials here); then upgraded by image tag under load, rolled back,
//! and given a tag that does not exist. The API server's audit log must
//! show no request of theirs refused, but for the one step that takes a
//! permission away on purpose.

mod audit;
#[allow(dead_code)]
#[path = "../integration/fixtures.rs"]
mod fixtures;
#[allow(dead_code)]
#[path = "../integration/harness.rs"]
mod harness;
mod overlay;
mod roll;

/// Prints a figure and keeps it in target/test-reports/install.txt, since
/// the test harness swallows the output of tests that pass.
macro_rules! report {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        let dir = harness::repo_root().join("target/test-reports");
        std::fs::create_dir_all(&dir).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("install.txt"))
            .unwrap();
        std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes()).unwrap();
    }};
}

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};

use fixtures::{claim, gone, is_bound, phase, pod, storage_class, wait, wait_for_event};
use harness::{REAL_NODE, TestNamespace, client_for_path, real_node_without_stowage};
use overlay::{IMAGE, Overlay};
use roll::{ClaimLoad, LeaseWatch, MountWatch, NAMESPACE, wait_rolled_out};

const ROLL_TIMEOUT: Duration = Duration::from_secs(240);

async fn run_to_completion(ns: &TestNamespace, pod: Pod) -> String {
    let api = ns.api::<Pod>();
    let name = pod.name_any();
    api.create(&PostParams::default(), &pod).await.unwrap();
    let done = wait(&api, &name, "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    // Through the API server, which asks kubelet: `kubectl logs`.
    let logs = api.logs(&name, &LogParams::default()).await.unwrap();
    assert_eq!(
        phase(done.as_ref()).as_deref(),
        Some("Succeeded"),
        "pod {name} failed: {logs}"
    );
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    wait(&api, &name, "deleted", gone).await;
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn install_upgrade_and_roll_back_by_image_tag() {
    let node = real_node_without_stowage();
    let client = client_for_path(&node.kubeconfig).await;
    let overlay = Overlay::new(&node);
    let audit = audit::AuditLog::of(&node.kubeconfig);
    let installed = audit.mark();
    let v1 = env!("CARGO_PKG_VERSION").to_string();
    let v2 = format!("{v1}-next");
    let started = Instant::now();
    overlay.build_and_import(&v1);
    overlay.build_and_import(&v2);
    report!("images built and imported in {:?}", started.elapsed());
    let archive = harness::repo_root().join(format!("target/image/stowage-{v1}.tar"));
    report!(
        "image archive: {} bytes",
        std::fs::metadata(archive).unwrap().len()
    );

    // Install.
    let started = Instant::now();
    overlay.apply(&v1);
    wait_rolled_out(&client, &format!("{IMAGE}:{v1}"), ROLL_TIMEOUT).await;
    report!("installed and running in {:?}", started.elapsed());
    runs_as_its_own_service_accounts(&client).await;
    let csinode = wait(
        &Api::<CSINode>::all(client.clone()),
        REAL_NODE,
        "listing local.stowage.dev",
        |n: Option<&CSINode>| {
            n.is_some_and(|n| n.spec.drivers.iter().any(|d| d.name == "local.stowage.dev"))
        },
    )
    .await;
    assert!(csinode.is_some(), "the node agent registered from its pod");

    let ns = TestNamespace::new_with(client.clone(), "install").await;
    let wffc = harness::unique_name("install-wffc");
    let immediate = harness::unique_name("install-now");
    storage_class(&client, &wffc, "WaitForFirstConsumer", "Delete", &[]).await;
    storage_class(
        &client,
        &immediate,
        "Immediate",
        "Delete",
        &[("layout", "dir")],
    )
    .await;

    data_survives_a_pod_restart(&ns, &wffc).await;
    let taken = audit.mark();
    missing_permission_is_named_on_the_claim(&overlay, &client, &ns, &immediate, &v1).await;
    let given_back = audit.mark();
    assert!(
        !audit.refusals(taken, Some(given_back)).is_empty(),
        "the audit log shows no refusal while a permission was taken away"
    );

    // Upgrade, then back, each under load.
    let mut writer = start_writer(&ns, &wffc, &node.kubelet_dir).await;
    for (from, to) in [(&v1, &v2), (&v2, &v1)] {
        roll_under_load(&overlay, &client, &ns, &immediate, &mut writer, from, to).await;
    }
    writer.finish(&overlay, &ns).await;

    a_missing_tag_leaves_the_old_pods_serving(&overlay, &client, &ns, &immediate, &v1).await;

    let refused: Vec<String> = [
        audit.refusals(installed, Some(taken)),
        audit.refusals(given_back, None),
    ]
    .concat();
    assert!(
        refused.is_empty(),
        "stowage's ServiceAccounts were refused as installed:\n{}",
        refused.join("\n")
    );
}

async fn runs_as_its_own_service_accounts(client: &Client) {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .unwrap();
    for p in &pods.items {
        let spec = p.spec.as_ref().unwrap();
        let expected = if p.name_any().starts_with("stowage-controller") {
            "stowage-controller"
        } else {
            "stowage-node"
        };
        assert_eq!(spec.service_account_name.as_deref(), Some(expected));
        let token = spec.volumes.iter().flatten().any(|v| v.projected.is_some());
        assert!(token, "{} has no projected token", p.name_any());
    }
}

async fn data_survives_a_pod_restart(ns: &TestNamespace, class: &str) {
    claim(ns, "data", class, "64Mi", &["ReadWriteOnce"]).await;
    let wrote = run_to_completion(
        ns,
        pod(
            "writer",
            "data",
            "echo written-before-restart > /data/f && sync && cat /data/f",
        ),
    )
    .await;
    assert_eq!(wrote.trim(), "written-before-restart");
    let read = run_to_completion(ns, pod("reader", "data", "cat /data/f")).await;
    assert_eq!(read.trim(), "written-before-restart", "the data survived");
}

/// The controller's role without `create` on PersistentVolumes: the claim
/// says what to grant; applying the manifests again fixes it.
async fn missing_permission_is_named_on_the_claim(
    overlay: &Overlay,
    client: &Client,
    ns: &TestNamespace,
    class: &str,
    tag: &str,
) {
    let roles = Api::<ClusterRole>::all(client.clone());
    let mut role = roles.get("stowage-controller").await.unwrap();
    for rule in role.rules.iter_mut().flatten() {
        if rule
            .resources
            .iter()
            .flatten()
            .any(|r| r == "persistentvolumes")
        {
            rule.verbs.retain(|v| v != "create");
        }
    }
    roles
        .replace("stowage-controller", &PostParams::default(), &role)
        .await
        .unwrap();
    claim(ns, "refused", class, "16Mi", &["ReadWriteOnce"]).await;
    let note = wait_for_event(ns, "refused", "Forbidden").await;
    assert!(
        note.contains("\"create\"") && note.contains("persistentvolumes"),
        "{note}"
    );
    overlay.apply(tag);
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "refused",
        "Bound",
        is_bound,
    )
    .await;
}

/// A pod that appends a counter to a file and syncs it every 100 ms, and
/// stops (exit 1) at the first failed write.
struct Writer {
    kubelet_dir: std::path::PathBuf,
    mount: Option<MountWatch>,
}

async fn start_writer(ns: &TestNamespace, class: &str, kubelet_dir: &std::path::Path) -> Writer {
    claim(ns, "log", class, "64Mi", &["ReadWriteOnce"]).await;
    let script = "i=0; while [ ! -f /data/stop ]; do \
                  echo $i >> /data/log || { echo write failed at $i; exit 1; }; \
                  sync || { echo sync failed at $i; exit 1; }; \
                  i=$((i+1)); sleep 0.1; done; echo wrote $i lines";
    let api = ns.api::<Pod>();
    api.create(&PostParams::default(), &pod("appender", "log", script))
        .await
        .unwrap();
    wait(&api, "appender", "Running", |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    Writer {
        kubelet_dir: kubelet_dir.to_path_buf(),
        mount: None,
    }
}

impl Writer {
    /// Starts watching the writer's volume mount in kubelet's pod directory.
    async fn watch_mount(&mut self, ns: &TestNamespace) {
        let pod = ns.api::<Pod>().get("appender").await.unwrap();
        let claim = ns.api::<PersistentVolumeClaim>().get("log").await.unwrap();
        let pv = claim.spec.unwrap().volume_name.unwrap();
        let mount = self
            .kubelet_dir
            .join("pods")
            .join(pod.uid().unwrap())
            .join("volumes/kubernetes.io~csi")
            .join(pv)
            .join("mount");
        assert!(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(mount.to_str().unwrap()),
            "{} is not mounted",
            mount.display()
        );
        self.mount = Some(MountWatch::start(mount));
    }

    fn check_mount(&mut self, path_hint: &str) {
        let (samples, missing) = self.mount.take().unwrap().finish();
        assert!(samples > 0, "the mount watch took no sample");
        report!("{path_hint}: the writer's mount was there in all {samples} samples");
        assert_eq!(
            missing, 0,
            "the writer's mount was gone in {missing} of {samples} samples ({path_hint})"
        );
    }

    async fn finish(self, overlay: &Overlay, ns: &TestNamespace) {
        let api = ns.api::<Pod>();
        let p = api.get("appender").await.unwrap();
        assert_eq!(
            phase(Some(&p)).as_deref(),
            Some("Running"),
            "{:?}",
            p.status
        );
        // `kubectl exec`: the API server reaches kubelet for it.
        overlay.kubectl(&[
            "exec",
            "-n",
            &ns.name,
            "appender",
            "--",
            "/bin/sh",
            "-c",
            "touch /data/stop",
        ]);
        let logs = run_to_completion_existing(ns, "appender").await;
        let lines: u64 = logs
            .trim()
            .strip_prefix("wrote ")
            .and_then(|s| s.strip_suffix(" lines"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("writer said {logs:?}"));
        let check = run_to_completion(
            ns,
            pod(
                "checker",
                "log",
                "awk 'NR-1 != $1 { print \"line \" NR \" reads \" $1; exit 1 } END { print NR }' /data/log",
            ),
        )
        .await;
        assert_eq!(
            check.trim(),
            lines.to_string(),
            "every write is on disk, in order"
        );
        report!("the writer wrote {lines} lines across the rolls, all intact");
    }
}

async fn run_to_completion_existing(ns: &TestNamespace, name: &str) -> String {
    let api = ns.api::<Pod>();
    let done = wait(&api, name, "finished", |p: Option<&Pod>| {
        matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    let logs = api.logs(name, &LogParams::default()).await.unwrap();
    assert_eq!(phase(done.as_ref()).as_deref(), Some("Succeeded"), "{logs}");
    logs
}

async fn roll_under_load(
    overlay: &Overlay,
    client: &Client,
    ns: &TestNamespace,
    class: &str,
    writer: &mut Writer,
    from: &str,
    to: &str,
) {
    writer.watch_mount(ns).await;
    let leases = LeaseWatch::start(client);
    let load = ClaimLoad::start(ns, class, &format!("roll-{to}").replace('.', "-"));
    load.wait_for_more_bound(2, Duration::from_secs(30)).await;
    let started = Instant::now();
    overlay.apply(to);
    wait_rolled_out(client, &format!("{IMAGE}:{to}"), ROLL_TIMEOUT).await;
    let rolled = started.elapsed();
    // The new version provisions before the load stops.
    load.wait_for_more_bound(2, Duration::from_secs(30)).await;
    let latencies = load.finish(Duration::from_secs(30)).await;
    let slowest = latencies.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        latencies.iter().all(|(_, d)| *d <= Duration::from_secs(30)),
        "a claim took over 30 s to bind during the roll {from} → {to}: {latencies:?}"
    );
    let handovers = leases.handovers();
    assert!(
        !handovers.is_empty(),
        "the Lease never changed hands during the roll {from} → {to}"
    );
    for (old, new, gap, released) in &handovers {
        assert!(
            released,
            "{old} did not release the Lease on SIGTERM; {new} had to wait for it to expire"
        );
        report!("leader {old} → {new}: {gap:?} without a leader");
    }
    let phase = phase(ns.api::<Pod>().get("appender").await.ok().as_ref());
    assert_eq!(phase.as_deref(), Some("Running"), "the writer kept running");
    report!(
        "roll {from} → {to}: {rolled:?}; {} claims created during it, all Bound, slowest {slowest:?}",
        latencies.len()
    );
    writer.check_mount(&format!("roll {from} → {to}"));
}

/// `newTag` naming an image that does not exist: the new pods cannot
/// start, and the old ones keep serving until the tag is fixed.
async fn a_missing_tag_leaves_the_old_pods_serving(
    overlay: &Overlay,
    client: &Client,
    ns: &TestNamespace,
    class: &str,
    good: &str,
) {
    overlay.apply("0.0.0-does-not-exist");
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + ROLL_TIMEOUT;
    // Both roles tried the new tag and failed to get the image.
    loop {
        let stuck = pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|cs| cs.first()?.state.as_ref()?.waiting.as_ref()?.reason.clone())
                    .is_some_and(|r| r.contains("ImageNeverPull") || r.contains("ImagePull"))
            })
            .count();
        if stuck >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no pod of the new tag failed to get its image"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let d = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get("stowage-controller")
        .await
        .unwrap();
    assert_eq!(
        d.status.unwrap().ready_replicas,
        Some(2),
        "old replicas serve"
    );
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .get("stowage-node")
        .await
        .unwrap();
    assert_eq!(
        ds.status.unwrap().number_ready,
        1,
        "the old node agent serves"
    );
    claim(ns, "during-bad-tag", class, "16Mi", &["ReadWriteOnce"]).await;
    wait(
        &ns.api::<PersistentVolumeClaim>(),
        "during-bad-tag",
        "Bound",
        is_bound,
    )
    .await;
    overlay.apply(good);
    wait_rolled_out(client, &format!("{IMAGE}:{good}"), ROLL_TIMEOUT).await;
}
