//! kubelet's plugin registration, served on the same socket as CSI Identity
//! and Node: kubelet finds `<driver>-reg.sock` in plugins_registry, calls
//! GetInfo, and — since the endpoint we return is empty — talks CSI to this
//! very socket. No node-driver-registrar.

use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::gauge::Gauge;

use tonic::{Request, Response, Status};

use crate::proto::pluginregistration::{self as reg, registration_server::Registration};

/// CSI versions this plugin serves.
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

pub struct RegistrationService {
    pub driver: String,
    /// 1 once kubelet reported success, 0 after a failure, -1 before either.
    pub registered: Gauge<i64, AtomicI64>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        tracing::info!(driver = %self.driver, "kubelet asked for plugin info");
        Ok(Response::new(reg::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.driver.clone(),
            endpoint: String::new(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with kubelet");
            self.registered.set(1);
        } else {
            tracing::error!(driver = %self.driver, error = %status.error, "kubelet refused the registration");
            self.registered.set(0);
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}
