//! `just bench-compare N [PLUGIN]`: stowage against the CSI sidecars it
//! replaces, in one run, on the same control plane and the same driver:
//! Kubernetes' CSI mock driver (`mock-csi-driver` from
//! scripts/build-mock-driver.sh, topology on), or csi-driver-host-path's
//! `hostpathplugin --enable-attach` when PLUGIN names one. CSIDriver
//! `attachRequired: true` either way. Not a test: it prints figures and
//! writes them to target/bench/compare-N.{md,csv}.
//!
//! Stacks, one after another, each with a fresh driver instance:
//! - `sidecars-default`: external-provisioner + external-attacher at their
//!   default flags (kube-controller-manager's binder binds the claims);
//! - `stowage`: `stowage controller --csi-driver` at its defaults;
//! - `stowage-grace-0s`: the same binding at once (`--kcm-binder-grace=0s`)
//!   rather than giving kcm's binder its 2 s head start;
//! - `sidecars-raised`: the sidecars with the API budget and workers of
//!   stowage (no client-side rate limit, at least 16 workers).
//!
//! Per stack: 200 claims one at a time on the idle cluster, each waited for
//! (STOWAGE_BENCH_IDLE_CLAIMS to change), then N claims at once to all
//! Bound, then N pods on the one Node object (which kube-controller-manager's
//! attach-detach controller turns into VolumeAttachments) to all attached,
//! then teardown. STOWAGE_BENCH_STACKS (comma-separated names) runs a
//! subset; STOWAGE_BENCH_CONTROLLER_ARGS adds flags to stowage.
//!
//! Run under `scripts/cluster.sh run` (KUBECONFIG set) with
//! STOWAGE_SIDECARS naming the directory scripts/build-sidecars.sh prints
//! and, for the mock, STOWAGE_MOCK_DRIVER its binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use kube::Client;

#[path = "bench_compare/cluster.rs"]
mod cluster;
#[path = "common/mod.rs"]
mod common;
#[path = "bench_compare/driver.rs"]
mod driver;
#[path = "bench_compare/report.rs"]
mod report;
#[path = "bench_compare/run.rs"]
mod run;
#[path = "bench_compare/stack.rs"]
mod stack;
#[path = "bench_compare/watch.rs"]
mod watch;

use driver::Driver;
use stack::Stack;

/// Issue 12 asks for idle latency over at least 200 claims.
const IDLE_CLAIMS: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bench_compare N [PATH/TO/hostpathplugin]"))?
        .parse()?;
    let driver = Driver::from_args(args.next())?;
    let sidecars = PathBuf::from(std::env::var("STOWAGE_SIDECARS").map_err(|_| {
        anyhow::anyhow!("set STOWAGE_SIDECARS to the directory scripts/build-sidecars.sh prints")
    })?);
    let idle_claims = match std::env::var("STOWAGE_BENCH_IDLE_CLAIMS") {
        Ok(v) => v.parse()?,
        Err(_) => IDLE_CLAIMS,
    };
    let stowage_args: Vec<String> = std::env::var("STOWAGE_BENCH_CONTROLLER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let stowage = common::release_stowage()?;
    let kubeconfig = std::env::var("KUBECONFIG")
        .map_err(|_| anyhow::anyhow!("run me under scripts/cluster.sh run"))?;
    let setup = stack::Setup {
        stowage: &stowage,
        sidecars: &sidecars,
        kubeconfig: &kubeconfig,
        driver_name: driver.name(),
        stowage_args: &stowage_args,
    };
    let client = Client::try_default().await?;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(out.join("logs"))?;

    cluster::set_up(&client, &driver).await?;
    let heartbeat = tokio::spawn(cluster::keep_node_ready(client.clone()));
    let only = std::env::var("STOWAGE_BENCH_STACKS").ok();
    let stacks = stack::ALL.into_iter().filter(|s| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == s.name()))
    });
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for stack in stacks {
        eprintln!("== {} ({n} claims, {idle_claims} idle)", stack.name());
        let bench = Bench {
            client: &client,
            driver: &driver,
            setup: &setup,
            out: &out,
            n,
            idle_claims,
        };
        // A stack that fails is reported and the others still run: a full
        // run takes the better part of an hour.
        match bench.run(stack).await {
            Ok(figures) => results.push(figures),
            Err(e) => {
                eprintln!("{}: {e:#}", stack.name());
                failed.push(format!("{}: {e:#}", stack.name()));
            }
        }
        // Written after each stack, so a long run's figures survive its end.
        write_report(&out, n, &driver, &results, &failed, false)?;
    }
    heartbeat.abort();
    write_report(&out, n, &driver, &results, &failed, true)?;
    anyhow::ensure!(failed.is_empty(), "{} stack(s) failed", failed.len());
    Ok(())
}

struct Bench<'a> {
    client: &'a Client,
    driver: &'a Driver,
    setup: &'a stack::Setup<'a>,
    out: &'a Path,
    n: usize,
    idle_claims: usize,
}

impl Bench<'_> {
    /// A fresh driver instance, the stack against it, its figures.
    async fn run(&self, stack: Stack) -> anyhow::Result<run::Figures> {
        let work = std::env::temp_dir().join(format!(
            "stowage-compare-{}-{}",
            std::process::id(),
            stack.name()
        ));
        std::fs::create_dir_all(&work)?;
        let socket = work.join("csi.sock");
        let log = |name: &str| -> anyhow::Result<Stdio> {
            let file = format!("compare-{}-{}-{name}.log", self.n, stack.name());
            Ok(std::fs::File::create(self.out.join("logs").join(file))?.into())
        };
        let driver = self
            .driver
            .start(&socket, &work, log(self.driver.short())?)
            .await?;
        let processes = stack::start(stack, self.setup, &socket, &log)?;
        let figures = run::run_stack(
            self.client,
            stack,
            self.driver.name(),
            self.n,
            self.idle_claims,
            &processes,
        )
        .await;
        drop(processes);
        drop(driver);
        let _ = std::fs::remove_dir_all(&work);
        figures
    }
}

fn write_report(
    out: &Path,
    n: usize,
    driver: &Driver,
    results: &[run::Figures],
    failed: &[String],
    print: bool,
) -> anyhow::Result<()> {
    let (mut markdown, csv) = report::report(n, driver.describe(), results);
    for f in failed {
        markdown.push_str(&format!("\nfailed: {f}\n"));
    }
    std::fs::write(out.join(format!("compare-{n}.md")), &markdown)?;
    std::fs::write(out.join(format!("compare-{n}.csv")), &csv)?;
    if print {
        print!("{markdown}");
        eprintln!("written: target/bench/compare-{n}.md and .csv");
    }
    Ok(())
}
