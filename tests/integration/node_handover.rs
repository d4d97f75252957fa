//! The node agent during installs and rolling updates: readiness that says
//! what is wrong with the kubelet directory, and a second agent on the same
//! node taking over from the first without both ever acting.

use std::path::Path;
use std::time::Duration;

use crate::harness::{
    Process, client, free_port, http_get, install_crds, kubeconfig, unique_name, wait_http,
};

fn agent(data: &Path, kubelet: &Path, node: &str, port: u16, log: &str) -> Process {
    Process::start(
        &kubeconfig(),
        &[
            "node",
            "--node-name",
            node,
            "--data-dir",
            data.to_str().unwrap(),
            "--kubelet-dir",
            kubelet.to_str().unwrap(),
            "--capacity",
            "1Gi",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[("POD_NAME", log)],
        log,
    )
}

fn run(cmd: &str, args: &[&str]) {
    let status = std::process::Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

#[tokio::test]
async fn readiness_names_a_missing_or_unshared_kubelet_dir() {
    install_crds(&client().await).await;
    let root = std::env::temp_dir().join(unique_name("stowage-ready"));
    let kubelet = root.join("kubelet");
    let port = free_port();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let node = unique_name("ready-node");
    let agent = agent(&root.join("data"), &kubelet, &node, port, "ready-node");

    let body = wait_http(&ready, "naming the missing directory", |s, b| {
        s == 503 && b.contains("missing")
    })
    .await;
    assert!(body.contains(kubelet.to_str().unwrap()), "{body}");
    assert!(
        !kubelet.exists(),
        "the agent created the kubelet directory itself"
    );

    std::fs::create_dir_all(&kubelet).unwrap();
    let body = wait_http(&ready, "naming the unshared mount", |s, b| {
        s == 503 && b.contains("not a shared mount")
    })
    .await;
    assert!(body.contains("mountPropagation: Bidirectional"), "{body}");

    let dir = kubelet.to_str().unwrap();
    run("mount", &["--bind", dir, dir]);
    run("mount", &["--make-rshared", dir]);
    let ok = wait_http(&ready, "ready", |s, _| s == 200).await;
    agent.stop();
    run("umount", &["-l", dir]);
    assert_eq!(ok, "ok");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Two agents for one node, as a DaemonSet rolled with maxSurge runs them:
/// the second waits for the data directory, the first hands over and goes
/// idle (not ready, still alive), the second takes kubelet's socket.
#[tokio::test]
async fn a_second_agent_takes_over_from_the_first() {
    install_crds(&client().await).await;
    let root = std::env::temp_dir().join(unique_name("stowage-handover"));
    let (data, kubelet) = (root.join("data"), root.join("kubelet"));
    std::fs::create_dir_all(&kubelet).unwrap();
    let node = unique_name("handover-node");
    let socket = kubelet.join("plugins_registry/local.stowage.dev-reg.sock");
    let (old_port, new_port) = (free_port(), free_port());
    let metrics = |port: u16| format!("http://127.0.0.1:{port}/metrics");

    let old = agent(&data, &kubelet, &node, old_port, "handover-old");
    wait_http(&metrics(old_port), "serving", |s, _| s == 200).await;
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = std::fs::metadata(&socket).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert!(first.is_ok(), "the first agent made no socket");

    let new = agent(&data, &kubelet, &node, new_port, "handover-new");
    // The old agent gives way: not ready, but alive (a DaemonSet deletes it).
    let why = wait_http(
        &format!("http://127.0.0.1:{old_port}/readyz"),
        "stepping aside",
        |s, b| s == 503 && b.contains("handed over"),
    )
    .await;
    assert!(why.contains("handed over"), "{why}");
    wait_http(
        &format!("http://127.0.0.1:{new_port}/readyz"),
        "acting",
        // Acting; this kubelet directory is no shared mount, which is all
        // that keeps it from being ready.
        |s, b| s == 200 || (s == 503 && !b.contains("not acting")),
    )
    .await;
    let second = std::fs::metadata(&socket).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert!(second.is_ok(), "no socket after the hand-over");
    assert_ne!(
        first.unwrap(),
        second.unwrap(),
        "the new agent took the socket over"
    );
    let (status, _) = http_get(&format!("http://127.0.0.1:{old_port}/healthz")).await;
    assert_eq!(
        status, 200,
        "the idle agent stays alive until it is stopped"
    );

    // Stopping the old agent leaves the new one's socket alone.
    old.stop();
    assert!(
        socket.exists(),
        "the old agent removed the new agent's socket"
    );
    new.stop();
    std::fs::remove_dir_all(&root).unwrap();
}
