//! Running host commands (mkfs, losetup, mount, blkid...): a non-zero exit
//! is an error that carries what the command said.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::Command;

/// What can go wrong touching the host: the error every `host` module
/// returns, mapped to a gRPC code once, in `csi`.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is a mount of {device} ({fs_type}) that stowage did not make; refusing to \
         unmount it: unmount it by hand if it is stale"
    )]
    NotOurMount {
        path: PathBuf,
        device: String,
        fs_type: String,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

pub fn io(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> HostError + use<> {
    let path = path.to_path_buf();
    move |source| HostError::Io { op, path, source }
}

/// Runs a command to completion; a non-zero exit is an error carrying its
/// stderr.
pub async fn run(cmd: Command) -> Result<(), HostError> {
    output(cmd).await.map(drop)
}

/// Like `run`, returning what the command printed on stdout.
pub async fn output(mut cmd: Command) -> Result<String, HostError> {
    let shown = format!("{:?}", cmd.as_std());
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| HostError::Command {
            command: shown.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HostError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
