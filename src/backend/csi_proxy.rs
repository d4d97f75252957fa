//! The proxy backend: another vendor's CSI driver, reached over its
//! controller socket. stowage does the sidecars' jobs and calls the driver
//! exactly where external-provisioner and external-attacher would.
//!
//! The channel is lazy and reconnects by itself, so a driver that restarts
//! (or starts after us) is picked up without restarting stowage; until its
//! capabilities are known every call fails with `Unavailable` and the
//! caller's retry (with backoff) tries again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request};

use super::secrets::Secrets;
use crate::proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};

/// `NAME=unix:///path/to/csi.sock`, as given to `--csi-driver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverEndpoint {
    pub name: String,
    pub socket: PathBuf,
}

impl std::str::FromStr for DriverEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || format!("{s:?}: expected NAME=unix:///path/to/csi.sock");
        let (name, endpoint) = s.split_once('=').ok_or_else(usage)?;
        let path = endpoint.strip_prefix("unix://").ok_or_else(usage)?;
        if name.is_empty() || !path.starts_with('/') {
            return Err(usage());
        }
        Ok(DriverEndpoint {
            name: name.to_string(),
            socket: PathBuf::from(path),
        })
    }
}

/// What the driver said it can do, asked once per connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub create_delete: bool,
    pub publish_unpublish: bool,
    pub expand: bool,
    pub accessibility_constraints: bool,
}

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
        }
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

/// One CSI driver's controller service.
#[derive(Clone)]
pub struct CsiDriver {
    pub name: String,
    socket: PathBuf,
    channel: Channel,
    capabilities: Arc<OnceCell<Capabilities>>,
    timeout: Duration,
}

impl std::fmt::Debug for CsiDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsiDriver")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .finish()
    }
}

/// A volume the driver created.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreatedVolume {
    pub volume_id: String,
    pub capacity_bytes: i64,
    pub volume_context: BTreeMap<String, String>,
    /// First accessible-topology segment, if the driver reported any.
    pub topology: BTreeMap<String, String>,
}

/// What CreateVolume is asked for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub capacity_bytes: i64,
    pub parameters: BTreeMap<String, String>,
    pub secrets: Secrets,
    pub capability: Capability,
    /// Segments the volume must be reachable from (the scheduler's node).
    pub requisite: Vec<BTreeMap<String, String>>,
}

/// How the volume will be used, as in the PV.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capability {
    pub block: bool,
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    /// Kubernetes access mode: ReadWriteOnce, ReadOnlyMany, ReadWriteMany, ReadWriteOncePod.
    pub access_mode: String,
}

impl Capability {
    pub fn to_csi(&self) -> csi::VolumeCapability {
        let mode = match self.access_mode.as_str() {
            "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
            "ReadWriteMany" => Mode::MultiNodeMultiWriter,
            "ReadWriteOncePod" => Mode::SingleNodeSingleWriter,
            _ => Mode::SingleNodeWriter,
        };
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone(),
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: String::new(),
            })
        };
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access_type),
        }
    }
}

impl CsiDriver {
    /// Does not dial: the channel connects on first use and again after
    /// every failure.
    pub fn new(endpoint: &DriverEndpoint, timeout: Duration) -> Self {
        let socket = endpoint.socket.clone();
        let dial = socket.clone();
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let dial = dial.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(dial).await?,
                    ))
                }
            }));
        CsiDriver {
            name: endpoint.name.clone(),
            socket,
            channel,
            capabilities: Arc::new(OnceCell::new()),
            timeout,
        }
    }

    /// The call's request, logged at debug level: requests that carry
    /// secrets print only their keys (see build.rs).
    fn request<T: std::fmt::Debug>(&self, message: T) -> Request<T> {
        tracing::debug!(driver = %self.name, request = ?message, "calling the driver");
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    fn rpc_error(&self, op: &'static str, status: tonic::Status) -> ProxyError {
        match status.code() {
            Code::Unavailable => ProxyError::Unavailable {
                driver: self.name.clone(),
                socket: self.socket.display().to_string(),
                message: status.message().to_string(),
            },
            Code::Cancelled | Code::DeadlineExceeded => ProxyError::Timeout {
                driver: self.name.clone(),
                socket: self.socket.display().to_string(),
                op,
                timeout: self.timeout,
            },
            code => ProxyError::Rpc {
                driver: self.name.clone(),
                op,
                code,
                message: status.message().to_string(),
            },
        }
    }

    /// GetPluginInfo, GetPluginCapabilities and ControllerGetCapabilities,
    /// once; later calls reuse the answer.
    pub async fn capabilities(&self) -> Result<Capabilities, ProxyError> {
        self.capabilities
            .get_or_try_init(|| self.discover())
            .await
            .cloned()
    }

    async fn discover(&self) -> Result<Capabilities, ProxyError> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let info = identity
            .get_plugin_info(self.request(csi::GetPluginInfoRequest {}))
            .await
            .map_err(|s| self.rpc_error("GetPluginInfo", s))?
            .into_inner();
        if info.name != self.name {
            return Err(ProxyError::WrongDriver {
                expected: self.name.clone(),
                actual: info.name,
                socket: self.socket.display().to_string(),
            });
        }
        let plugin = identity
            .get_plugin_capabilities(self.request(csi::GetPluginCapabilitiesRequest {}))
            .await
            .map_err(|s| self.rpc_error("GetPluginCapabilities", s))?
            .into_inner();
        use csi::plugin_capability::{Type as PluginType, service::Type as Service};
        let mut caps = Capabilities::default();
        let mut controller_service = false;
        for c in plugin.capabilities {
            if let Some(PluginType::Service(s)) = c.r#type {
                match Service::try_from(s.r#type) {
                    Ok(Service::ControllerService) => controller_service = true,
                    Ok(Service::VolumeAccessibilityConstraints) => {
                        caps.accessibility_constraints = true
                    }
                    _ => {}
                }
            }
        }
        if controller_service {
            let controller = ControllerClient::new(self.channel.clone())
                .controller_get_capabilities(self.request(csi::ControllerGetCapabilitiesRequest {}))
                .await
                .map_err(|s| self.rpc_error("ControllerGetCapabilities", s))?
                .into_inner();
            use csi::controller_service_capability::{Type as CType, rpc::Type as Rpc};
            for c in controller.capabilities {
                if let Some(CType::Rpc(rpc)) = c.r#type {
                    match Rpc::try_from(rpc.r#type) {
                        Ok(Rpc::CreateDeleteVolume) => caps.create_delete = true,
                        Ok(Rpc::PublishUnpublishVolume) => caps.publish_unpublish = true,
                        Ok(Rpc::ExpandVolume) => caps.expand = true,
                        _ => {}
                    }
                }
            }
        }
        tracing::info!(driver = %self.name, ?caps, "CSI driver capabilities");
        Ok(caps)
    }

    fn unsupported(&self, what: &'static str) -> ProxyError {
        ProxyError::Unsupported {
            driver: self.name.clone(),
            what,
        }
    }

    /// CreateVolume by name: the driver returns the same volume when the
    /// name is asked again, which is what makes retries safe.
    pub async fn create_volume(&self, req: CreateRequest) -> Result<CreatedVolume, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.create_delete {
            return Err(self.unsupported("CREATE_DELETE_VOLUME"));
        }
        let topology = |segments: &Vec<BTreeMap<String, String>>| {
            segments
                .iter()
                .map(|s| csi::Topology {
                    segments: s.clone().into_iter().collect(),
                })
                .collect::<Vec<_>>()
        };
        let accessibility =
            (caps.accessibility_constraints && !req.requisite.is_empty()).then(|| {
                csi::TopologyRequirement {
                    requisite: topology(&req.requisite),
                    preferred: topology(&req.requisite),
                }
            });
        let message = csi::CreateVolumeRequest {
            name: req.name,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: req.capacity_bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![req.capability.to_csi()],
            parameters: req.parameters.into_iter().collect(),
            secrets: req.secrets.into_csi(),
            volume_content_source: None,
            accessibility_requirements: accessibility,
            mutable_parameters: Default::default(),
        };
        let volume = ControllerClient::new(self.channel.clone())
            .create_volume(self.request(message))
            .await
            .map_err(|s| self.rpc_error("CreateVolume", s))?
            .into_inner()
            .volume
            .unwrap_or_default();
        Ok(CreatedVolume {
            volume_id: volume.volume_id,
            capacity_bytes: volume.capacity_bytes,
            volume_context: volume.volume_context.into_iter().collect(),
            topology: volume
                .accessible_topology
                .into_iter()
                .next()
                .map(|t| t.segments.into_iter().collect())
                .unwrap_or_default(),
        })
    }

    /// DeleteVolume; a volume the driver no longer knows counts as deleted.
    pub async fn delete_volume(&self, volume_id: &str, secrets: Secrets) -> Result<(), ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.create_delete {
            return Err(self.unsupported("CREATE_DELETE_VOLUME"));
        }
        let message = csi::DeleteVolumeRequest {
            volume_id: volume_id.to_string(),
            secrets: secrets.into_csi(),
        };
        match ControllerClient::new(self.channel.clone())
            .delete_volume(self.request(message))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.rpc_error("DeleteVolume", s)),
        }
    }

    /// ControllerPublishVolume; returns the publish context for the VA's
    /// `attachmentMetadata`.
    pub async fn publish(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &Capability,
        readonly: bool,
        volume_context: BTreeMap<String, String>,
        secrets: Secrets,
    ) -> Result<BTreeMap<String, String>, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.publish_unpublish {
            return Err(self.unsupported("PUBLISH_UNPUBLISH_VOLUME"));
        }
        let message = csi::ControllerPublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            volume_capability: Some(capability.to_csi()),
            readonly,
            secrets: secrets.into_csi(),
            volume_context: volume_context.into_iter().collect(),
        };
        let response = ControllerClient::new(self.channel.clone())
            .controller_publish_volume(self.request(message))
            .await
            .map_err(|s| self.rpc_error("ControllerPublishVolume", s))?
            .into_inner();
        Ok(response.publish_context.into_iter().collect())
    }

    /// ControllerUnpublishVolume; a volume or node the driver no longer
    /// knows counts as detached.
    pub async fn unpublish(
        &self,
        volume_id: &str,
        node_id: &str,
        secrets: Secrets,
    ) -> Result<(), ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.publish_unpublish {
            return Ok(());
        }
        let message = csi::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            secrets: secrets.into_csi(),
        };
        match ControllerClient::new(self.channel.clone())
            .controller_unpublish_volume(self.request(message))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.rpc_error("ControllerUnpublishVolume", s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_the_form() {
        let e: DriverEndpoint = "hostpath.csi.k8s.io=unix:///run/csi/csi.sock"
            .parse()
            .unwrap();
        assert_eq!(e.name, "hostpath.csi.k8s.io");
        assert_eq!(e.socket, PathBuf::from("/run/csi/csi.sock"));
        for bad in [
            "x",
            "x=/run/csi.sock",
            "=unix:///a",
            "x=unix://rel/a",
            "x=tcp://h:1",
        ] {
            let err = bad.parse::<DriverEndpoint>().unwrap_err();
            assert!(err.contains("NAME=unix:///path"), "{bad}: {err}");
        }
    }

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

    #[test]
    fn capabilities_map_kubernetes_access_modes() {
        let cap = Capability {
            access_mode: "ReadWriteOncePod".into(),
            fs_type: "xfs".into(),
            ..Default::default()
        }
        .to_csi();
        assert_eq!(
            cap.access_mode.unwrap().mode,
            Mode::SingleNodeSingleWriter as i32
        );
        assert!(matches!(cap.access_type, Some(AccessType::Mount(m)) if m.fs_type == "xfs"));
    }
}
