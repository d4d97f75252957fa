//! CreateSnapshot, DeleteSnapshot, ListSnapshots and CreateVolume's
//! content source for the local backend, as the CSI spec words them: a
//! snapshot's ID is its name (one path component, as volume IDs), asking
//! again for a name returns the same snapshot, and another source under
//! that name is AlreadyExists.

use super::CsiError;
use super::controller::ControllerService;
use crate::backend::local::snapshots::SnapshotInfo;
use crate::backend::local::{self, Layout};
use crate::proto::csi::v1 as csi;

pub fn to_csi(info: &SnapshotInfo) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: info.size_bytes,
        snapshot_id: info.id.clone(),
        source_volume_id: info.source_volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: info.created_ns.div_euclid(1_000_000_000),
            nanos: info.created_ns.rem_euclid(1_000_000_000) as i32,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

impl ControllerService {
    pub(super) async fn cut(&self, name: &str, volume: &str) -> Result<SnapshotInfo, CsiError> {
        local::validate_volume_id(name).map_err(CsiError::from)?;
        if let Some(existing) = self.store.snapshot(name).await? {
            if existing.source_volume != volume {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot {name} exists, cut from volume {}",
                    existing.source_volume
                )));
            }
            return Ok(existing);
        }
        let source = local::validate_volume_id(volume)
            .ok()
            .and(self.existing_bytes(volume).await?);
        match source {
            None => Err(CsiError::NotFound(format!(
                "volume {volume} does not exist"
            ))),
            Some((Layout::Dir, _)) => Err(CsiError::InvalidArgument(format!(
                "volume {volume} has layout dir: snapshots need image volumes"
            ))),
            Some((Layout::Image, _)) => {
                let _guard = self.locks.lock(volume).await;
                let info = self.store.cut_snapshot(name, volume).await?;
                tracing::info!(
                    snapshot = name,
                    volume,
                    bytes = info.size_bytes,
                    "snapshot cut"
                );
                Ok(info)
            }
        }
    }

    /// Snapshots matching the request's filters, a page of them: the
    /// starting token is the index of the first entry.
    pub(super) async fn list(
        &self,
        req: &csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, CsiError> {
        let all = self.store.snapshots().await?;
        let matching: Vec<_> = all
            .iter()
            .filter(|s| req.snapshot_id.is_empty() || s.id == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.source_volume == req.source_volume_id)
            .collect();
        let start = if req.starting_token.is_empty() {
            0
        } else {
            req.starting_token
                .parse::<usize>()
                .ok()
                .filter(|s| *s <= matching.len())
                .ok_or_else(|| {
                    CsiError::Aborted(format!(
                        "starting_token {:?} is not one this endpoint gave",
                        req.starting_token
                    ))
                })?
        };
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let page = match req.max_entries {
            0 => matching.len() - start,
            n => (n as usize).min(matching.len() - start),
        };
        let end = start + page;
        Ok(csi::ListSnapshotsResponse {
            entries: matching[start..end]
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(to_csi(s)),
                })
                .collect(),
            next_token: if end < matching.len() {
                end.to_string()
            } else {
                String::new()
            },
        })
    }

    /// The image a new volume starts from, with the smallest size it may
    /// have: a snapshot's, or (a clone) another image volume's.
    pub(super) async fn source_image(
        &self,
        source: &csi::VolumeContentSource,
    ) -> Result<(std::path::PathBuf, i64), CsiError> {
        use csi::volume_content_source::Type;
        match &source.r#type {
            Some(Type::Snapshot(s)) => {
                let found = match local::validate_volume_id(&s.snapshot_id) {
                    Ok(()) => self.store.snapshot(&s.snapshot_id).await?,
                    Err(_) => None,
                };
                let info = found.ok_or_else(|| {
                    CsiError::NotFound(format!("snapshot {} does not exist", s.snapshot_id))
                })?;
                Ok((self.store.snapshot_path(&info.id)?, info.size_bytes))
            }
            Some(Type::Volume(v)) => {
                let found = match local::validate_volume_id(&v.volume_id) {
                    Ok(()) => self.existing_bytes(&v.volume_id).await?,
                    Err(_) => None,
                };
                match found {
                    Some((Layout::Image, bytes)) => {
                        Ok((self.store.image_path(&v.volume_id)?, bytes))
                    }
                    Some((Layout::Dir, _)) => Err(CsiError::InvalidArgument(format!(
                        "volume {} has layout dir: clones need image volumes",
                        v.volume_id
                    ))),
                    None => Err(CsiError::NotFound(format!(
                        "volume {} does not exist",
                        v.volume_id
                    ))),
                }
            }
            None => Err(CsiError::InvalidArgument(
                "volume_content_source names neither a snapshot nor a volume".into(),
            )),
        }
    }
}
