//! What is on a device before NodeStage formats or mounts it, from
//! `blkid -p` (the device itself, never blkid's cache: a reused loop device
//! would otherwise report what it held before).
//!
//! A format is destructive, so only one answer permits it: blkid's exit
//! status 2, "nothing found". Every other doubt (blkid failing, missing, or
//! finding several signatures) stops the call and says what to check; the
//! user's data is never formatted on a guess.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// No signature at all (blkid exit status 2): safe to format.
    Empty,
    /// A filesystem of this type ("ext4", "xfs", ...).
    Filesystem(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "blkid could not be run to check {device} before formatting it ({source}); \
         the node agent needs util-linux's blkid on its PATH"
    )]
    NotRun {
        device: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "blkid -p {device} found more than one signature (exit status 8, ambivalent); \
         refusing to format or mount it: list them with `wipefs --no-act {device}` and \
         remove the stale ones (`wipefs -o OFFSET`) once the data is saved"
    )]
    Ambivalent { device: PathBuf },
    #[error(
        "blkid -p {device} failed ({status}: {stderr}); refusing to format or mount a device \
         whose contents are unknown: check the device and the node's kernel log, then retry"
    )]
    Failed {
        device: PathBuf,
        status: String,
        stderr: String,
    },
    #[error(
        "{device} holds a signature that is not a filesystem ({tags}); refusing to format \
         over it: inspect it with `wipefs --no-act {device}`"
    )]
    NotAFilesystem { device: PathBuf, tags: String },
    #[error(
        "{device} holds a {found} filesystem but {wanted} was requested; refusing to mount \
         or format it: set the volume's fsType to {found}, or move the data off it"
    )]
    Mismatch {
        device: PathBuf,
        found: String,
        wanted: String,
    },
}

/// Probes `dev` with `blkid -p -o export`.
pub async fn probe(dev: &Path) -> Result<Contents, ProbeError> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| ProbeError::NotRun {
            device: dev.into(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    interpret(
        dev,
        out.status.code(),
        &stdout,
        &String::from_utf8_lossy(&out.stderr),
    )
}

/// blkid(8): 0 found, 2 nothing found, 4 usage or other error, 8 ambivalent
/// low-level probe. A status killed by a signal has no code.
fn interpret(
    dev: &Path,
    code: Option<i32>,
    stdout: &str,
    stderr: &str,
) -> Result<Contents, ProbeError> {
    match code {
        Some(2) => Ok(Contents::Empty),
        Some(8) => Err(ProbeError::Ambivalent { device: dev.into() }),
        Some(0) => {
            let tags: BTreeMap<&str, &str> =
                stdout.lines().filter_map(|l| l.split_once('=')).collect();
            match tags.get("TYPE") {
                Some(fs) if !fs.is_empty() => Ok(Contents::Filesystem(fs.to_string())),
                // A partition table or another non-filesystem signature.
                _ => Err(ProbeError::NotAFilesystem {
                    device: dev.into(),
                    tags: stdout.trim().replace('\n', " "),
                }),
            }
        }
        other => Err(ProbeError::Failed {
            device: dev.into(),
            status: other.map_or_else(|| "killed".to_string(), |c| format!("exit status {c}")),
            stderr: stderr.trim().to_string(),
        }),
    }
}

/// Whether a device holding `contents` may be mounted as `wanted`: only the
/// same type (an empty device is formatted first).
pub fn check_type(dev: &Path, contents: &Contents, wanted: &str) -> Result<(), ProbeError> {
    match contents {
        Contents::Filesystem(found) if found != wanted => Err(ProbeError::Mismatch {
            device: dev.into(),
            found: found.clone(),
            wanted: wanted.into(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> &'static Path {
        Path::new("/dev/loop9")
    }

    #[test]
    fn only_exit_status_2_means_empty() {
        assert_eq!(interpret(dev(), Some(2), "", "").unwrap(), Contents::Empty);
        for code in [Some(1), Some(4), Some(8), Some(3), None] {
            assert!(
                interpret(dev(), code, "", "").is_err(),
                "{code:?} allowed a format"
            );
        }
    }

    #[test]
    fn a_found_filesystem_is_named() {
        let out = "DEVNAME=/dev/loop9\nUUID=1\nBLOCK_SIZE=4096\nTYPE=xfs\nUSAGE=filesystem\n";
        assert_eq!(
            interpret(dev(), Some(0), out, "").unwrap(),
            Contents::Filesystem("xfs".into())
        );
    }

    #[test]
    fn a_signature_without_a_type_is_not_empty() {
        let e = interpret(dev(), Some(0), "DEVNAME=/dev/loop9\nPTTYPE=dos\n", "").unwrap_err();
        assert!(matches!(e, ProbeError::NotAFilesystem { .. }), "{e}");
        assert!(e.to_string().contains("PTTYPE=dos"), "{e}");
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = interpret(dev(), Some(8), "", "").unwrap_err().to_string();
        assert!(e.contains("wipefs --no-act /dev/loop9"), "{e}");
        let e = interpret(dev(), Some(4), "", "I/O error")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exit status 4") && e.contains("I/O error"),
            "{e}"
        );
        let e = check_type(dev(), &Contents::Filesystem("xfs".into()), "ext4")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xfs filesystem but ext4 was requested"), "{e}");
        assert!(check_type(dev(), &Contents::Empty, "ext4").is_ok());
        assert!(check_type(dev(), &Contents::Filesystem("ext4".into()), "ext4").is_ok());
    }
}
