use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stowage::telemetry::{self, LogFormat};

/// stowage: the CSI sidecars' jobs in one Kubernetes operator.
///
/// One binary, several roles. A cluster runs `stowage controller` as a
/// Deployment and `stowage node` as a DaemonSet; `stowage csi` exposes a
/// backend as a plain CSI endpoint for conformance tests and comparisons.
#[derive(Parser, Debug)]
#[command(version = telemetry::LONG_VERSION, propagate_version = true)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "STOWAGE_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Cluster-wide jobs: provisions PersistentVolumes for claims, binds
    /// them and reclaims released ones (the jobs of external-provisioner and
    /// the PV binder). Runs as a leader-elected Deployment.
    Controller(stowage::controller::Config),
    /// Node plugin: serves CSI Identity and Node to kubelet on the
    /// plugin-registration socket, registers itself and answers liveness
    /// (replaces node-driver-registrar and livenessprobe). Runs as a DaemonSet.
    Node(stowage::node::Config),
    /// Serve one backend as a plain CSI endpoint (Identity, Controller,
    /// Node), so csi-sanity and the upstream sidecars can drive the same code.
    Csi(stowage::csi::serve::Config),
    /// Release the Volumes of a node deleted from the cluster for good: the
    /// controller then removes each (PV and Volume, not the data, which
    /// went with the node) once its claim is deleted. Refuses while the
    /// Node exists.
    ReleaseNode(stowage::controller::release::Args),
    /// Print the CustomResourceDefinitions stowage needs, as YAML, for
    /// `kubectl apply -f -`.
    Crds,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Once JSON logging is on, a log collector parses every line the
    // process writes, the last one included.
    let json_error = cli.log_format == LogFormat::Json
        && !matches!(cli.command, Command::Crds | Command::ReleaseNode(_));
    let result = match cli.command {
        Command::Crds => stowage::crd::to_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(|e| anyhow::anyhow!("rendering CRDs: {e}")),
        Command::ReleaseNode(args) => stowage::controller::release::release_node(args)
            .await
            .map_err(anyhow::Error::from),
        Command::Controller(config) => {
            telemetry::init_logging(cli.log_format);
            stowage::controller::run(config)
                .await
                .map_err(anyhow::Error::from)
        }
        Command::Node(config) => {
            telemetry::init_logging(cli.log_format);
            stowage::node::run(config)
                .await
                .map_err(anyhow::Error::from)
        }
        Command::Csi(config) => {
            telemetry::init_logging(cli.log_format);
            stowage::csi::serve::run(config)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors already name their causes; the chain would repeat them.
            if json_error {
                tracing::error!("{e}");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
