//! The stacks compared, and how each is started against the driver's socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// stowage's default `--workers`.
const STOWAGE_WORKERS: u32 = 16;
/// What stands for "no client-side rate limit" in client-go's flags.
const UNLIMITED_QPS: u32 = 100_000;

#[derive(Clone, Copy, PartialEq)]
pub enum Stack {
    SidecarsDefault,
    SidecarsRaised,
    Stowage,
    /// stowage binding at once instead of giving kcm's binder its head start.
    StowageNoGrace,
}

/// In the order they run: the two stacks at their defaults first, on the
/// freshest control plane.
pub const ALL: [Stack; 4] = [
    Stack::SidecarsDefault,
    Stack::Stowage,
    Stack::StowageNoGrace,
    Stack::SidecarsRaised,
];

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Stack::SidecarsDefault => "sidecars-default",
            Stack::SidecarsRaised => "sidecars-raised",
            Stack::Stowage => "stowage",
            Stack::StowageNoGrace => "stowage-grace-0s",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Stack::SidecarsDefault => {
                "external-provisioner v6.4.0 + external-attacher v4.13.0, default flags (QPS 5, burst 10; 100 and 10 workers)"
            }
            Stack::SidecarsRaised => {
                "the same sidecars, QPS/burst 100000 (unlimited, as stowage), 100 and 16 workers"
            }
            Stack::Stowage => {
                "stowage controller --csi-driver, default flags (no client-side limit, 16 workers, --kcm-binder-grace 2s)"
            }
            Stack::StowageNoGrace => "the same with --kcm-binder-grace=0s",
        }
    }

    fn is_stowage(self) -> bool {
        matches!(self, Stack::Stowage | Stack::StowageNoGrace)
    }
}

/// Where the stack's binaries are and what they talk to.
pub struct Setup<'a> {
    pub stowage: &'a Path,
    pub sidecars: &'a Path,
    pub kubeconfig: &'a str,
    pub driver_name: &'a str,
    /// More flags for stowage (STOWAGE_BENCH_CONTROLLER_ARGS).
    pub stowage_args: &'a [String],
}

/// The stack's processes, serving the driver at `socket`; they die when
/// the returned handles are dropped.
pub fn start(
    stack: Stack,
    setup: &Setup,
    socket: &Path,
    log: &dyn Fn(&str) -> anyhow::Result<Stdio>,
) -> anyhow::Result<Vec<Child>> {
    let spawn = |binary: PathBuf, args: Vec<String>, name: &str| -> anyhow::Result<Child> {
        anyhow::ensure!(
            binary.exists(),
            "{} missing: run scripts/build-sidecars.sh",
            binary.display()
        );
        Ok(Command::new(&binary)
            .args(args)
            .env("KUBECONFIG", setup.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log(name)?)
            .kill_on_drop(true)
            .spawn()?)
    };
    if stack.is_stowage() {
        let mut args = vec![
            "controller".into(),
            "--leader-elect=false".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            format!(
                "--csi-driver={}=unix://{}",
                setup.driver_name,
                socket.display()
            ),
        ];
        if stack == Stack::StowageNoGrace {
            args.push("--kcm-binder-grace=0s".into());
        }
        args.extend(setup.stowage_args.iter().cloned());
        return Ok(vec![spawn(setup.stowage.to_path_buf(), args, "stowage")?]);
    }
    let raised = stack == Stack::SidecarsRaised;
    let common = |workers: u32| {
        let mut args = vec![
            format!("--csi-address={}", socket.display()),
            format!("--kubeconfig={}", setup.kubeconfig),
            "--leader-election=false".to_string(),
            "--v=1".to_string(),
        ];
        if raised {
            args.push(format!("--kube-api-qps={UNLIMITED_QPS}"));
            args.push(format!("--kube-api-burst={UNLIMITED_QPS}"));
            args.push(format!("--worker-threads={workers}"));
        }
        args
    };
    Ok(vec![
        spawn(
            setup.sidecars.join("csi-provisioner"),
            common(100.max(STOWAGE_WORKERS)),
            "csi-provisioner",
        )?,
        spawn(
            setup.sidecars.join("csi-attacher"),
            common(10.max(STOWAGE_WORKERS)),
            "csi-attacher",
        )?,
    ])
}
