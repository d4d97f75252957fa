//! The controller service calls, each where external-provisioner or
//! external-attacher would make it.

use std::collections::BTreeMap;

use tonic::Code;

use super::{Capability, CreateRequest, CreatedVolume, CsiDriver, ProxyError};
use crate::backend::secrets::Secrets;
use crate::proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;

impl CsiDriver {
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
                    preferred: topology(&req.preferred),
                }
            });
        let message = csi::CreateVolumeRequest {
            name: req.name,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: req.capacity_bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: req
                .capabilities
                .iter()
                .map(|c| c.to_csi(caps.single_node_multi_writer))
                .collect(),
            parameters: req.parameters.into_iter().collect(),
            secrets: req.secrets.into_csi(),
            volume_content_source: None,
            accessibility_requirements: accessibility,
            mutable_parameters: Default::default(),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let volume = self
            .timed(
                "/csi.v1.Controller/CreateVolume",
                client.create_volume(self.request(message)),
            )
            .await
            .map_err(|s| self.rpc_error("CreateVolume", s))?
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
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.delete_volume(self.request(message));
        match self.timed("/csi.v1.Controller/DeleteVolume", call).await {
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
            volume_capability: Some(capability.to_csi(caps.single_node_multi_writer)),
            readonly,
            secrets: secrets.into_csi(),
            volume_context: volume_context.into_iter().collect(),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.controller_publish_volume(self.request(message));
        let response = self
            .timed("/csi.v1.Controller/ControllerPublishVolume", call)
            .await
            .map_err(|s| self.rpc_error("ControllerPublishVolume", s))?;
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
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.controller_unpublish_volume(self.request(message));
        match self
            .timed("/csi.v1.Controller/ControllerUnpublishVolume", call)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.rpc_error("ControllerUnpublishVolume", s)),
        }
    }
}
