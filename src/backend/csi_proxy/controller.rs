//! The controller service calls, each where external-provisioner or
//! external-attacher would make it.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Code;

use super::{
    Capability, CreateRequest, CreatedVolume, CsiDriver, Expanded, ProxyError, Published, Room,
    Snapshot,
};
use crate::backend::secrets::Secrets;
use crate::crd::VolumeSource;
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
        let content_source = req
            .content_source
            .as_ref()
            .map(|s| self.content_source(s))
            .transpose()?;
        let asked_source = content_source.is_some();
        let message = csi::CreateVolumeRequest {
            name: req.name.clone(),
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
            secrets: req.secrets.clone().into_csi(),
            volume_content_source: content_source,
            accessibility_requirements: accessibility,
            mutable_parameters: req.mutable_parameters.into_iter().collect(),
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
        if asked_source && volume.content_source.is_none() {
            // Not what was asked for: an empty volume where data was
            // expected. external-provisioner deletes it, and so do we, so
            // that the retry asks afresh.
            self.delete_volume(&volume.volume_id, req.secrets.clone())
                .await?;
            return Err(ProxyError::ContentSourceIgnored {
                driver: self.name.clone(),
                volume: req.name,
            });
        }
        Ok(CreatedVolume {
            volume_id: volume.volume_id,
            capacity_bytes: volume.capacity_bytes,
            volume_context: volume.volume_context.into_iter().collect(),
            accessible_topology: volume
                .accessible_topology
                .into_iter()
                .map(|t| t.segments.into_iter().collect())
                .collect(),
        })
    }

    /// CreateVolume's content source, if the driver can start from it.
    fn content_source(
        &self,
        source: &VolumeSource,
    ) -> Result<csi::VolumeContentSource, ProxyError> {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource as CsiVolume};
        let r#type = match source {
            VolumeSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            VolumeSource::Handle(id) => Type::Volume(CsiVolume {
                volume_id: id.clone(),
            }),
            VolumeSource::Volume(_) => return Err(self.unsupported("a Volume by name as a source")),
        };
        Ok(csi::VolumeContentSource {
            r#type: Some(r#type),
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

    /// ControllerExpandVolume to at least `bytes`: the size the driver
    /// reports (never less than asked), and whether kubelet must expand
    /// on the node too.
    pub async fn expand_volume(
        &self,
        volume_id: &str,
        bytes: i64,
        capability: &Capability,
        secrets: Secrets,
    ) -> Result<Expanded, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.expand {
            return Err(self.unsupported("EXPAND_VOLUME"));
        }
        let message = csi::ControllerExpandVolumeRequest {
            volume_id: volume_id.to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            secrets: secrets.into_csi(),
            volume_capability: Some(capability.to_csi(caps.single_node_multi_writer)),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.controller_expand_volume(self.request(message));
        let response = self
            .timed("/csi.v1.Controller/ControllerExpandVolume", call)
            .await
            .map_err(|s| self.rpc_error("ControllerExpandVolume", s))?;
        Ok(Expanded {
            capacity_bytes: response.capacity_bytes.max(bytes),
            node_expansion_required: response.node_expansion_required,
        })
    }

    /// ControllerModifyVolume with a VolumeAttributesClass's parameters.
    pub async fn modify_volume(
        &self,
        volume_id: &str,
        mutable_parameters: BTreeMap<String, String>,
        secrets: Secrets,
    ) -> Result<(), ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.modify {
            return Err(self.unsupported("MODIFY_VOLUME"));
        }
        let message = csi::ControllerModifyVolumeRequest {
            volume_id: volume_id.to_string(),
            secrets: secrets.into_csi(),
            mutable_parameters: mutable_parameters.into_iter().collect(),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.controller_modify_volume(self.request(message));
        self.timed("/csi.v1.Controller/ControllerModifyVolume", call)
            .await
            .map_err(|s| self.rpc_error("ControllerModifyVolume", s))?;
        Ok(())
    }

    /// GetCapacity for volumes of a class with `parameters` in `segment`,
    /// asked as external-provisioner asks it: no volume capabilities (room
    /// is taken to be independent of them).
    pub async fn get_capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        segment: &BTreeMap<String, String>,
    ) -> Result<Room, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.get_capacity {
            return Err(self.unsupported("GET_CAPACITY"));
        }
        let message = csi::GetCapacityRequest {
            volume_capabilities: Vec::new(),
            parameters: parameters.clone().into_iter().collect(),
            accessible_topology: Some(csi::Topology {
                segments: segment.clone().into_iter().collect(),
            }),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.get_capacity(self.request(message));
        let response = self
            .timed("/csi.v1.Controller/GetCapacity", call)
            .await
            .map_err(|s| self.rpc_error("GetCapacity", s))?;
        Ok(Room {
            available_bytes: response.available_capacity.max(0),
            maximum_volume_bytes: response.maximum_volume_size.map(|m| m.max(0)),
        })
    }

    /// CreateSnapshot by name (idempotent: asked again while not ready,
    /// as csi-snapshotter polls).
    pub async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: BTreeMap<String, String>,
        secrets: Secrets,
    ) -> Result<Snapshot, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.create_delete_snapshot {
            return Err(self.unsupported("CREATE_DELETE_SNAPSHOT"));
        }
        let message = csi::CreateSnapshotRequest {
            source_volume_id: source_volume_id.to_string(),
            name: name.to_string(),
            secrets: secrets.into_csi(),
            parameters: parameters.into_iter().collect(),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.create_snapshot(self.request(message));
        let response = self
            .timed("/csi.v1.Controller/CreateSnapshot", call)
            .await
            .map_err(|s| self.rpc_error("CreateSnapshot", s))?;
        Ok(Snapshot::from(response.snapshot.unwrap_or_default()))
    }

    /// DeleteSnapshot; one the driver no longer knows counts as deleted.
    pub async fn delete_snapshot(
        &self,
        snapshot_id: &str,
        secrets: Secrets,
    ) -> Result<(), ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.create_delete_snapshot {
            return Err(self.unsupported("CREATE_DELETE_SNAPSHOT"));
        }
        let message = csi::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_string(),
            secrets: secrets.into_csi(),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.delete_snapshot(self.request(message));
        match self.timed("/csi.v1.Controller/DeleteSnapshot", call).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.rpc_error("DeleteSnapshot", s)),
        }
    }

    /// The state of one snapshot by its ID (ListSnapshots), as
    /// csi-snapshotter checks a pre-provisioned one. A driver without
    /// LIST_SNAPSHOTS cannot say: the snapshot is taken to be ready.
    pub async fn snapshot_status(
        &self,
        snapshot_id: &str,
        secrets: Secrets,
    ) -> Result<Snapshot, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.list_snapshots {
            return Ok(Snapshot {
                id: snapshot_id.to_string(),
                ready: true,
                ..Snapshot::default()
            });
        }
        let message = csi::ListSnapshotsRequest {
            max_entries: 0,
            starting_token: String::new(),
            source_volume_id: String::new(),
            snapshot_id: snapshot_id.to_string(),
            secrets: secrets.into_csi(),
        };
        let mut client = ControllerClient::new(self.channel.clone());
        let call = client.list_snapshots(self.request(message));
        let response = self
            .timed("/csi.v1.Controller/ListSnapshots", call)
            .await
            .map_err(|s| self.rpc_error("ListSnapshots", s))?;
        let entry = response.entries.into_iter().find_map(|e| e.snapshot);
        entry
            .map(Snapshot::from)
            .ok_or_else(|| ProxyError::SnapshotNotFound {
                driver: self.name.clone(),
                id: snapshot_id.to_string(),
            })
    }

    /// ListVolumes, page after page: every volume the driver holds, with
    /// the node IDs it says the volume is published to. An entry without a
    /// status is published nowhere, as external-attacher reads it.
    pub async fn list_volumes(&self) -> Result<Published, ProxyError> {
        let caps = self.capabilities().await?;
        if !caps.list_volumes {
            return Err(self.unsupported("LIST_VOLUMES"));
        }
        let mut client = ControllerClient::new(self.channel.clone());
        let mut published = Published::new();
        let mut tokens = BTreeSet::new();
        let mut token = String::new();
        loop {
            let message = csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: token,
            };
            let page = self
                .timed(
                    "/csi.v1.Controller/ListVolumes",
                    client.list_volumes(self.request(message)),
                )
                .await
                .map_err(|s| self.rpc_error("ListVolumes", s))?;
            for entry in page.entries {
                if let Some(volume) = entry.volume {
                    let nodes = entry.status.map(|s| s.published_node_ids);
                    published.insert(volume.volume_id, nodes.unwrap_or_default());
                }
            }
            if page.next_token.is_empty() {
                return Ok(published);
            }
            // A token handed out twice would have us page for ever.
            if !tokens.insert(page.next_token.clone()) {
                return Err(ProxyError::EndlessPaging {
                    driver: self.name.clone(),
                    token: page.next_token,
                });
            }
            token = page.next_token;
        }
    }
}
