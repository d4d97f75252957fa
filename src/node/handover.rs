//! Two node agents on one node, for a moment: a DaemonSet rolled with
//! `maxSurge` starts the new agent before it stops the old one, so that an
//! image that cannot be pulled leaves the old agent serving. Only one of
//! them may act on the node's volumes, so the data directory has a lock:
//! whoever holds it acts. A newer agent that finds the lock taken leaves a
//! request beside it; the holder sees it, stops acting, lets go of the lock
//! and stays idle (not ready) until it is stopped.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LOCK_FILE: &str = ".agent.lock";
const REQUEST_FILE: &str = ".agent.handover";
const POLL: Duration = Duration::from_millis(200);

/// Held for as long as this agent acts on the node; dropping it lets go.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
    request: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("lock {path}: {source}")]
pub struct LockError {
    path: PathBuf,
    source: std::io::Error,
}

fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Takes the data directory's lock, asking its holder to hand over if
/// another agent has it. `me` names this agent in the request (pod name or
/// pid) so that the holder's log says to whom it handed over.
pub async fn acquire(data_dir: &Path, me: &str) -> Result<AgentLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let request = data_dir.join(REQUEST_FILE);
    let err = |source| LockError {
        path: path.clone(),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    if !try_lock(&file).map_err(err)? {
        tracing::info!(lock = %path.display(), "another node agent acts on this node; asking it to hand over");
        std::fs::write(&request, me).map_err(err)?;
        while !try_lock(&file).map_err(err)? {
            tokio::time::sleep(POLL).await;
        }
        tracing::info!(lock = %path.display(), "took over from the previous node agent");
    }
    // A request left by an agent that died before it got the lock is void.
    let _ = std::fs::remove_file(&request);
    Ok(AgentLock {
        _file: file,
        request,
    })
}

impl AgentLock {
    /// Returns when a newer agent asks this one to hand over, with its name.
    pub async fn handover_requested(&self) -> String {
        loop {
            if let Ok(who) = std::fs::read_to_string(&self.request) {
                return who;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_agent_waits_for_the_first_to_hand_over() {
        let dir = std::env::temp_dir().join(format!("stowage-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = acquire(&dir, "old").await.unwrap();
        let dir2 = dir.clone();
        let second = tokio::spawn(async move { acquire(&dir2, "new").await.unwrap() });
        let asked = tokio::time::timeout(Duration::from_secs(10), first.handover_requested())
            .await
            .expect("the holder hears the request");
        assert_eq!(asked, "new");
        assert!(!second.is_finished(), "the lock is still held");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the newer agent gets the lock once it is let go")
            .unwrap();
        assert!(
            !dir.join(REQUEST_FILE).exists(),
            "the request is gone once served"
        );
        drop(second);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
