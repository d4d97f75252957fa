//! What went wrong talking to the driver, and whether a retry can help.

use std::time::Duration;

use tonic::Code;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("CSI driver {driver} at {socket} is not answering: {message}")]
    Unavailable {
        driver: String,
        socket: String,
        message: String,
    },
    #[error("CSI driver at {socket} calls itself {actual:?}, not {expected:?}: fix --csi-driver")]
    WrongDriver {
        expected: String,
        actual: String,
        socket: String,
    },
    #[error("CSI driver {driver} does not support {what}")]
    Unsupported { driver: String, what: &'static str },
    #[error("{driver} {op}: {code:?}: {message}")]
    Rpc {
        driver: String,
        op: &'static str,
        code: Code,
        message: String,
    },
    #[error(
        "CSI driver {driver} created {volume} without the content source it was asked for (volume content source missing); the empty volume was deleted"
    )]
    ContentSourceIgnored { driver: String, volume: String },
    #[error("CSI driver {driver} has no snapshot {id}")]
    SnapshotNotFound { driver: String, id: String },
    #[error(
        "CSI driver {driver}'s ListVolumes gave next_token {token:?} twice: its pages never end"
    )]
    EndlessPaging { driver: String, token: String },
    /// A driver that accepts the call and never answers is as stuck as
    /// one whose socket is gone, and the user needs the same pointer.
    #[error(
        "CSI driver {driver} at {socket} is not answering: {op} got no answer within {timeout:?} (--csi-timeout)"
    )]
    Timeout {
        driver: String,
        socket: String,
        op: &'static str,
        timeout: Duration,
    },
}

impl ProxyError {
    /// The gRPC code the driver answered with (or ours for local failures).
    pub fn code(&self) -> Code {
        match self {
            ProxyError::Unavailable { .. } => Code::Unavailable,
            ProxyError::WrongDriver { .. } => Code::FailedPrecondition,
            ProxyError::Unsupported { .. } => Code::Unimplemented,
            ProxyError::Rpc { code, .. } => *code,
            ProxyError::Timeout { .. } => Code::DeadlineExceeded,
            ProxyError::EndlessPaging { .. } => Code::Internal,
            ProxyError::ContentSourceIgnored { .. } => Code::Internal,
            ProxyError::SnapshotNotFound { .. } => Code::NotFound,
        }
    }

    /// Whether only asking for something else can help: external-resizer
    /// marks an expansion or a modification `Infeasible` on these codes.
    pub fn is_infeasible(&self) -> bool {
        matches!(
            self.code(),
            Code::InvalidArgument | Code::OutOfRange | Code::NotFound
        )
    }

    /// Whether the same call can never succeed without a change by the
    /// user: external-provisioner's "final" errors. Everything else
    /// (timeouts, Unavailable, Aborted, ...) may still be in flight and is
    /// retried with the same name, which the driver must treat idempotently.
    pub fn is_final(&self) -> bool {
        matches!(
            self.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::Unimplemented
                | Code::PermissionDenied
                | Code::Unauthenticated
        ) || matches!(
            self,
            ProxyError::Rpc {
                code: Code::ResourceExhausted,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_errors_are_the_ones_a_retry_cannot_fix() {
        let rpc = |code| ProxyError::Rpc {
            driver: "d".into(),
            op: "CreateVolume",
            code,
            message: String::new(),
        };
        assert!(rpc(Code::InvalidArgument).is_final());
        assert!(rpc(Code::ResourceExhausted).is_final());
        assert!(!rpc(Code::Aborted).is_final());
        assert!(!rpc(Code::Internal).is_final());
        let timeout = ProxyError::Timeout {
            driver: "d".into(),
            socket: "/run/d.sock".into(),
            op: "CreateVolume",
            timeout: Duration::from_secs(1),
        };
        assert!(
            !timeout.is_final(),
            "a timed-out create may still be running"
        );
        let shown = timeout.to_string();
        assert!(
            shown.contains("d at /run/d.sock is not answering"),
            "{shown}"
        );
    }
}
