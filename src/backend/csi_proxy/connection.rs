//! Where the driver listens, the lazy channel to it, and what it says it
//! can do (asked once per connection).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::sync::OnceCell;
use tonic::transport::{Endpoint, Uri};
use tonic::{Code, Request};

use super::{CsiDriver, ProxyError};
use crate::proto::csi::v1 as csi;
use crate::telemetry::csi_calls::CsiCalls;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;

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
    /// MODIFY_VOLUME: ControllerModifyVolume (VolumeAttributesClass).
    pub modify: bool,
    pub accessibility_constraints: bool,
    /// SINGLE_NODE_MULTI_WRITER: the driver tells ReadWriteOnce (many
    /// writers on one node) from ReadWriteOncePod (one writer).
    pub single_node_multi_writer: bool,
    pub list_volumes: bool,
    pub list_volumes_published_nodes: bool,
    /// GET_CAPACITY: the driver can say how much room a segment has
    /// (published as CSIStorageCapacity).
    pub get_capacity: bool,
    /// CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS (the state of a
    /// pre-provisioned snapshot), CLONE_VOLUME (a volume as CreateVolume's
    /// content source).
    pub create_delete_snapshot: bool,
    pub list_snapshots: bool,
    pub clone_volume: bool,
}

impl Capabilities {
    /// Whether ListVolumes tells which nodes each volume is published to:
    /// what external-attacher needs before it compares VolumeAttachments
    /// with the driver.
    pub fn lists_published_nodes(&self) -> bool {
        self.list_volumes && self.list_volumes_published_nodes
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
            calls: CsiCalls::default(),
        }
    }

    /// Counts this driver's calls into `calls` (the role's registry).
    pub fn with_calls(mut self, calls: CsiCalls) -> Self {
        self.calls = calls;
        self
    }

    /// Runs one call and observes it in `csi_sidecar_operations_seconds`
    /// under its full gRPC method name, whatever its outcome.
    pub(super) async fn timed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let start = Instant::now();
        let result = call.await;
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.calls
            .observe(&self.name, method, code, start.elapsed());
        result.map(tonic::Response::into_inner)
    }

    /// The call's request, logged at debug level: requests that carry
    /// secrets print only their keys (see build.rs).
    pub(super) fn request<T: std::fmt::Debug>(&self, message: T) -> Request<T> {
        tracing::debug!(driver = %self.name, request = ?message, "calling the driver");
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    pub(super) fn rpc_error(&self, op: &'static str, status: tonic::Status) -> ProxyError {
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
        let info = self
            .timed(
                "/csi.v1.Identity/GetPluginInfo",
                identity.get_plugin_info(self.request(csi::GetPluginInfoRequest {})),
            )
            .await
            .map_err(|s| self.rpc_error("GetPluginInfo", s))?;
        if info.name != self.name {
            return Err(ProxyError::WrongDriver {
                expected: self.name.clone(),
                actual: info.name,
                socket: self.socket.display().to_string(),
            });
        }
        let plugin = self
            .timed(
                "/csi.v1.Identity/GetPluginCapabilities",
                identity
                    .get_plugin_capabilities(self.request(csi::GetPluginCapabilitiesRequest {})),
            )
            .await
            .map_err(|s| self.rpc_error("GetPluginCapabilities", s))?;
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
            let mut client = ControllerClient::new(self.channel.clone());
            let controller = self
                .timed(
                    "/csi.v1.Controller/ControllerGetCapabilities",
                    client.controller_get_capabilities(
                        self.request(csi::ControllerGetCapabilitiesRequest {}),
                    ),
                )
                .await
                .map_err(|s| self.rpc_error("ControllerGetCapabilities", s))?;
            use csi::controller_service_capability::{Type as CType, rpc::Type as Rpc};
            for c in controller.capabilities {
                if let Some(CType::Rpc(rpc)) = c.r#type {
                    match Rpc::try_from(rpc.r#type) {
                        Ok(Rpc::CreateDeleteVolume) => caps.create_delete = true,
                        Ok(Rpc::PublishUnpublishVolume) => caps.publish_unpublish = true,
                        Ok(Rpc::ExpandVolume) => caps.expand = true,
                        Ok(Rpc::ModifyVolume) => caps.modify = true,
                        Ok(Rpc::ListVolumes) => caps.list_volumes = true,
                        Ok(Rpc::ListVolumesPublishedNodes) => {
                            caps.list_volumes_published_nodes = true
                        }
                        Ok(Rpc::SingleNodeMultiWriter) => caps.single_node_multi_writer = true,
                        Ok(Rpc::GetCapacity) => caps.get_capacity = true,
                        Ok(Rpc::CreateDeleteSnapshot) => caps.create_delete_snapshot = true,
                        Ok(Rpc::ListSnapshots) => caps.list_snapshots = true,
                        Ok(Rpc::CloneVolume) => caps.clone_volume = true,
                        _ => {}
                    }
                }
            }
        }
        tracing::info!(driver = %self.name, ?caps, "CSI driver capabilities");
        Ok(caps)
    }

    pub(super) fn unsupported(&self, what: &'static str) -> ProxyError {
        ProxyError::Unsupported {
            driver: self.name.clone(),
            what,
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
}
