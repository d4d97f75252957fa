//! CSI Controller for the local backend, on the one node `stowage csi`
//! serves. (In a cluster, `stowage controller` does this job through Volume
//! objects instead; this exists so csi-sanity and the upstream sidecars can
//! drive the same backend code.)

use std::collections::BTreeMap;

use tonic::{Request, Response};

use super::{CsiError, CsiResult, VolumeLocks, check_capability, required};
use crate::backend::local::room::{self, Policy, Room};
use crate::backend::local::{self, Layout, Parameters, Store};
use crate::proto::csi::v1::{self as csi, controller_server::Controller};

pub struct ControllerService {
    pub store: Store,
    pub node: String,
    /// What this endpoint may promise to volumes (`--capacity`).
    pub room: Policy,
    pub locks: VolumeLocks,
}

const DEFAULT_BYTES: i64 = 1 << 30;

impl ControllerService {
    fn topology(&self) -> Vec<csi::Topology> {
        vec![csi::Topology {
            segments: [(local::TOPOLOGY_KEY.to_string(), self.node.clone())]
                .into_iter()
                .collect(),
        }]
    }

    /// Size of an existing volume, or None when there is none.
    pub(super) async fn existing_bytes(&self, id: &str) -> Result<Option<(Layout, i64)>, CsiError> {
        if let Ok(meta) = tokio::fs::metadata(self.store.image_path(id)?).await {
            return Ok(Some((Layout::Image, meta.len() as i64)));
        }
        if tokio::fs::metadata(self.store.dir_path(id)?)
            .await
            .is_ok_and(|m| m.is_dir())
        {
            return Ok(Some((Layout::Dir, 0)));
        }
        Ok(None)
    }

    /// Capacity and what the images present promise, as the node agent
    /// measures them: CreateVolume, ControllerExpandVolume and GetCapacity
    /// all judge by this one measure.
    fn room(&self) -> Result<Room, CsiError> {
        room::measure(&self.store, self.room).map_err(|e| {
            CsiError::Internal(format!("measuring {}: {e}", self.store.root().display()))
        })
    }

    fn volume(&self, id: &str, bytes: i64, params: Parameters) -> csi::Volume {
        let mut context = BTreeMap::new();
        context.insert(
            "layout".to_string(),
            if params.layout == Layout::Dir {
                "dir"
            } else {
                "image"
            }
            .to_string(),
        );
        context.insert("fsType".to_string(), params.fs_type.as_str().to_string());
        csi::Volume {
            capacity_bytes: bytes,
            volume_id: id.to_string(),
            volume_context: context.into_iter().collect(),
            content_source: None,
            accessible_topology: self.topology(),
        }
    }
}

/// The size to create for a capacity range, or OutOfRange.
fn size_for(range: Option<&csi::CapacityRange>, params: Parameters) -> Result<i64, CsiError> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(CsiError::InvalidArgument(
            "capacity_range bytes must not be negative".into(),
        ));
    }
    if limit > 0 && required > limit {
        return Err(CsiError::InvalidArgument(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required > 0 {
        required
    } else if limit > 0 {
        limit.min(DEFAULT_BYTES)
    } else {
        DEFAULT_BYTES
    };
    let bytes = params.checked_allocated_bytes(wanted).ok_or_else(|| {
        CsiError::OutOfRange(format!(
            "required_bytes {wanted} rounded up to whole MiB exceeds the largest size CSI can express"
        ))
    })?;
    if limit > 0 && bytes > limit {
        return Err(CsiError::OutOfRange(format!(
            "the smallest {} volume is {bytes} bytes, more than limit_bytes {limit}",
            params.fs_type.as_str()
        )));
    }
    Ok(bytes)
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> CsiResult<csi::CreateVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.name, "name")?;
        local::validate_volume_id(id).map_err(CsiError::from)?;
        if req.volume_capabilities.is_empty() {
            return Err(
                CsiError::InvalidArgument("volume_capabilities are required".into()).into(),
            );
        }
        // Sorted, so that of several bad keys the same one is named each time.
        let sorted: BTreeMap<_, _> = req.parameters.clone().into_iter().collect();
        let params =
            Parameters::parse(&sorted).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        let mut block = false;
        for cap in &req.volume_capabilities {
            check_capability(cap)?;
            block |= matches!(
                cap.access_type,
                Some(csi::volume_capability::AccessType::Block(_))
            );
        }
        if block && params.layout == Layout::Dir {
            return Err(CsiError::InvalidArgument("block access needs layout image".into()).into());
        }
        let source = match &req.volume_content_source {
            Some(_) if params.layout == Layout::Dir => {
                return Err(CsiError::InvalidArgument(
                    "a volume from a snapshot or a clone needs layout image".into(),
                )
                .into());
            }
            Some(s) => Some(self.source_image(s).await?),
            None => None,
        };
        let bytes = size_for(req.capacity_range.as_ref(), params)?;
        if let Some((_, smallest)) = &source {
            let limit = req.capacity_range.as_ref().map_or(0, |r| r.limit_bytes);
            if limit > 0 && *smallest > limit {
                return Err(CsiError::OutOfRange(format!(
                    "the source holds {smallest} bytes, more than limit_bytes {limit}"
                ))
                .into());
            }
        }
        let _guard = self.locks.lock(id).await;
        if let Some((layout, existing)) = self.existing_bytes(id).await? {
            // Idempotent only for the same request.
            let range = req.capacity_range.unwrap_or_default();
            let fits = layout == Layout::Dir
                || (existing >= range.required_bytes
                    && (range.limit_bytes == 0 || existing <= range.limit_bytes));
            if layout != params.layout || !fits {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} exists with a different size or layout"
                ))
                .into());
            }
            let mut volume = self.volume(id, existing.max(bytes), params);
            volume.content_source = req.volume_content_source;
            return Ok(Response::new(csi::CreateVolumeResponse {
                volume: Some(volume),
            }));
        }
        let bytes = source.as_ref().map_or(bytes, |(_, s)| bytes.max(*s));
        self.room()?
            .check_growth(0, bytes)
            .map_err(CsiError::NoRoom)?;
        let created = match &source {
            Some((image, _)) => self.store.create_from(id, image, bytes).await,
            None => self.store.create(id, params, bytes, !block).await,
        }
        .map_err(CsiError::from)?;
        tracing::info!(volume = id, bytes = created, "volume created");
        let mut volume = self.volume(id, created, params);
        volume.content_source = req.volume_content_source;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> CsiResult<csi::DeleteVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        // An id that could never have been ours is simply not there.
        if local::validate_volume_id(id).is_err() {
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        }
        let _guard = self.locks.lock(id).await;
        self.store.delete(id).await.map_err(CsiError::from)?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> CsiResult<csi::ControllerPublishVolumeResponse> {
        Err(tonic::Status::unimplemented("local volumes need no attach"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> CsiResult<csi::ControllerUnpublishVolumeResponse> {
        Err(tonic::Status::unimplemented("local volumes need no attach"))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> CsiResult<csi::ValidateVolumeCapabilitiesResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(
                CsiError::InvalidArgument("volume_capabilities are required".into()).into(),
            );
        }
        let exists =
            local::validate_volume_id(id).is_ok() && self.existing_bytes(id).await?.is_some();
        if !exists {
            return Err(CsiError::NotFound(format!("volume {id} does not exist")).into());
        }
        let unsupported = req
            .volume_capabilities
            .iter()
            .find_map(|c| check_capability(c).err());
        Ok(Response::new(match unsupported {
            Some(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        _: Request<csi::ListVolumesRequest>,
    ) -> CsiResult<csi::ListVolumesResponse> {
        Err(tonic::Status::unimplemented("ListVolumes is not offered"))
    }

    async fn get_capacity(
        &self,
        _: Request<csi::GetCapacityRequest>,
    ) -> CsiResult<csi::GetCapacityResponse> {
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: {
                let room = self.room()?;
                room.capacity.saturating_sub(room.own.promised).max(0)
            },
            maximum_volume_size: None,
            minimum_volume_size: Some(Parameters::default().allocated_bytes(1)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> CsiResult<csi::ControllerGetCapabilitiesResponse> {
        use csi::controller_service_capability::{Rpc, Type, rpc};
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::GetSnapshot,
            rpc::Type::CloneVolume,
        ]
        .into_iter()
        .map(|t| csi::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> CsiResult<csi::CreateSnapshotResponse> {
        let req = request.into_inner();
        let name = required(&req.name, "name")?;
        let volume = required(&req.source_volume_id, "source_volume_id")?;
        let info = self.cut(name, volume).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(super::snapshots::to_csi(&info)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> CsiResult<csi::DeleteSnapshotResponse> {
        let req = request.into_inner();
        let id = required(&req.snapshot_id, "snapshot_id")?;
        // An id that could never have been ours is simply not there.
        if local::validate_volume_id(id).is_ok() {
            self.store
                .delete_snapshot(id)
                .await
                .map_err(CsiError::from)?;
        }
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> CsiResult<csi::ListSnapshotsResponse> {
        Ok(Response::new(self.list(&request.into_inner()).await?))
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> CsiResult<csi::GetSnapshotResponse> {
        let req = request.into_inner();
        let id = required(&req.snapshot_id, "snapshot_id")?;
        let found = match local::validate_volume_id(id) {
            Ok(()) => self.store.snapshot(id).await.map_err(CsiError::from)?,
            Err(_) => None,
        };
        let info =
            found.ok_or_else(|| CsiError::NotFound(format!("snapshot {id} does not exist")))?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(super::snapshots::to_csi(&info)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> CsiResult<csi::ControllerExpandVolumeResponse> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let range = req
            .capacity_range
            .ok_or_else(|| CsiError::InvalidArgument("capacity_range is required".into()))?;
        local::validate_volume_id(id).map_err(CsiError::from)?;
        let _guard = self.locks.lock(id).await;
        let Some((layout, current)) = self.existing_bytes(id).await? else {
            return Err(CsiError::NotFound(format!("volume {id} does not exist")).into());
        };
        if layout == Layout::Dir {
            return Ok(Response::new(csi::ControllerExpandVolumeResponse {
                capacity_bytes: range.required_bytes,
                node_expansion_required: false,
            }));
        }
        if range.required_bytes < 0 || range.limit_bytes < 0 {
            return Err(CsiError::InvalidArgument(
                "capacity_range bytes must not be negative".into(),
            )
            .into());
        }
        let wanted = Parameters::default()
            .checked_allocated_bytes(range.required_bytes)
            .filter(|w| range.limit_bytes == 0 || *w <= range.limit_bytes)
            .ok_or_else(|| {
                CsiError::OutOfRange(format!(
                    "required_bytes {} rounded up to whole MiB exceeds limit_bytes {}",
                    range.required_bytes, range.limit_bytes
                ))
            })?;
        self.room()?
            .check_growth(current, wanted)
            .map_err(CsiError::CannotGrow)?;
        let bytes = if wanted > current {
            self.store.grow(id, wanted).await.map_err(CsiError::from)?
        } else {
            current
        };
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: bytes,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> CsiResult<csi::ControllerGetVolumeResponse> {
        Err(tonic::Status::unimplemented(
            "ControllerGetVolume is not offered",
        ))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> CsiResult<csi::ControllerModifyVolumeResponse> {
        Err(tonic::Status::unimplemented(
            "ControllerModifyVolume is not offered",
        ))
    }
}
