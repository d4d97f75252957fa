//! CSI Identity.

use tonic::{Request, Response};

use super::CsiResult;
use crate::proto::csi::v1::{self as csi, identity_server::Identity};

pub struct IdentityService {
    pub driver: String,
    /// Whether this endpoint also serves the Controller service.
    pub controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> CsiResult<csi::GetPluginInfoResponse> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.driver.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> CsiResult<csi::GetPluginCapabilitiesResponse> {
        use csi::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
        let service = |t: service::Type| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut capabilities = vec![
            service(service::Type::VolumeAccessibilityConstraints),
            csi::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        if self.controller {
            capabilities.push(service(service::Type::ControllerService));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<csi::ProbeRequest>) -> CsiResult<csi::ProbeResponse> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
