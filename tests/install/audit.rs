//! The API server's audit log of stowage's ServiceAccounts (the test
//! cluster writes one when started with `STOWAGE_AUDIT=1`): every request
//! they make as installed, with the answer it got.

use std::path::{Path, PathBuf};

use serde_json::Value;

pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub fn of(kubeconfig: &Path) -> Self {
        let path = kubeconfig.parent().unwrap().join("logs/audit.log");
        assert!(
            path.is_file(),
            "no audit log at {}: the cluster was started without STOWAGE_AUDIT=1",
            path.display()
        );
        AuditLog { path }
    }

    /// Where the log ends now; requests after this point come after it.
    pub fn mark(&self) -> usize {
        std::fs::read(&self.path).unwrap().len()
    }

    /// The requests between two marks (to the end without `to`) that the
    /// API server refused, one line each: who, verb, resource, message.
    pub fn refusals(&self, from: usize, to: Option<usize>) -> Vec<String> {
        let log = std::fs::read(&self.path).unwrap();
        let end = to.unwrap_or(log.len()).min(log.len());
        String::from_utf8_lossy(&log[from..end])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["responseStatus"]["code"] == 403)
            .map(|e| {
                let o = &e["objectRef"];
                format!(
                    "{} {} {}/{}/{}: {}",
                    e["user"]["username"].as_str().unwrap_or_default(),
                    e["verb"].as_str().unwrap_or_default(),
                    o["apiGroup"].as_str().unwrap_or_default(),
                    o["resource"].as_str().unwrap_or_default(),
                    o["subresource"].as_str().unwrap_or_default(),
                    e["responseStatus"]["message"].as_str().unwrap_or_default(),
                )
            })
            .collect()
    }
}
