//! The binding plan's effects: kcm's binder's writes, each carrying the
//! resourceVersion it was planned from.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{BindSteps, Binding};
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::controller::protocol::*;
use crate::controller::{Context, Error};

/// Plans the binding of `claim` among `pvs` and writes it.
pub async fn bind(
    ctx: &Context,
    claim: &Claim,
    class: Option<&StorageClass>,
    pvs: &[Arc<Pv>],
) -> Result<Action, Error> {
    let pv_refs: Vec<_> = pvs.iter().map(|p| p.as_ref()).collect();
    match super::plan(claim, class, &pv_refs, |c| ctx.serves(&c.provisioner)) {
        Binding::Skip => {}
        // Whoever wrote the last half (we or kcm's binder), the user waited
        // until now.
        Binding::Done => ctx.metrics.observe_claim_bound(claim),
        Binding::Bind(steps) => {
            let pv = pvs
                .iter()
                .find(|p| p.name_any() == steps.pv)
                .expect("planned from this list");
            if let Some(wait) = kcm_binder_grace(claim, pv, ctx.kcm_binder_grace) {
                return Ok(Action::requeue(wait));
            }
            apply_binding(ctx, claim, pv, &steps).await?;
        }
    }
    Ok(Action::await_change())
}

/// kcm's binder marks the claims it works on with the storage-provisioner
/// annotation. When it is there, it will bind our PV itself: writing the
/// same objects at the same moment only makes one of us fail (and kcm then
/// posts a warning event on the claim). So we give it a short head start,
/// and bind only what it has not bound by then; with the binder disabled
/// the annotation never appears and we bind at once.
fn kcm_binder_grace(claim: &Claim, pv: &Pv, grace: Duration) -> Option<Duration> {
    let ann = claim.annotations();
    let kcm_binder =
        ann.contains_key(ANN_STORAGE_PROVISIONER) || ann.contains_key(ANN_BETA_STORAGE_PROVISIONER);
    let created = pv.metadata.creation_timestamp.as_ref()?.0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(created);
    let left = grace.as_secs_f64() - age.as_secs_f64();
    (kcm_binder && left > 0.0).then(|| Duration::from_secs_f64(left))
}

/// Writes kcm's binding: PV claimRef, PV phase, claim volumeName and
/// annotations, claim status. Each write carries the resourceVersion it was
/// planned from, so a concurrent writer (kcm's binder) wins cleanly and we
/// replan from what it wrote.
async fn apply_binding(
    ctx: &Context,
    claim: &Claim,
    pv: &Pv,
    steps: &BindSteps,
) -> Result<(), Error> {
    let pvs = Api::<Pv>::all(ctx.client.clone());
    let claims =
        Api::<Claim>::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let pp = PatchParams::default();
    let mut pv_version = pv.resource_version();
    if steps.set_claim_ref {
        let patch = json!({
            "metadata": {
                "resourceVersion": pv_version,
                "annotations": { ANN_BOUND_BY_CONTROLLER: "yes" },
            },
            "spec": { "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(), "name": claim.name_any(),
                "uid": claim.uid(), "resourceVersion": claim.resource_version(),
            }},
        });
        pv_version = pvs
            .patch(&steps.pv, &pp, &Patch::Merge(&patch))
            .await?
            .resource_version();
    }
    if steps.set_pv_phase {
        let patch = json!({ "metadata": { "resourceVersion": pv_version }, "status": { "phase": "Bound" } });
        pvs.patch_status(&steps.pv, &pp, &Patch::Merge(&patch))
            .await?;
        crate::failpoint::hit("controller-after-pv-bound");
    }
    let mut claim_version = claim.resource_version();
    if steps.set_claim_volume_name {
        let patch = json!({
            "metadata": {
                "resourceVersion": claim_version,
                "annotations": { ANN_BIND_COMPLETED: "yes", ANN_BOUND_BY_CONTROLLER: "yes" },
            },
            "spec": { "volumeName": steps.pv },
        });
        let written = claims
            .patch(&claim.name_any(), &pp, &Patch::Merge(&patch))
            .await?
            .resource_version();
        superseded(ctx, claim, claim_version.as_deref());
        claim_version = written;
        crate::failpoint::hit("controller-after-claim-volume-name");
    }
    if steps.set_claim_status {
        let spec = pv.spec.clone().unwrap_or_default();
        let patch = json!({
            "metadata": { "resourceVersion": claim_version },
            "status": {
                "phase": "Bound",
                "accessModes": spec.access_modes,
                "capacity": spec.capacity,
                // As kcm's binder: set when the claim becomes Bound, then
                // the modify job's alone.
                "currentVolumeAttributesClassName": spec.volume_attributes_class_name,
            },
        });
        claims
            .patch_status(&claim.name_any(), &pp, &Patch::Merge(&patch))
            .await?;
        superseded(ctx, claim, claim_version.as_deref());
        tracing::info!(pv = %steps.pv, "claim bound");
    }
    Ok(())
}

/// Our write replaced the claim at `version`: a pass woken with it is
/// skipped (see `superseded`).
fn superseded(ctx: &Context, claim: &Claim, version: Option<&str>) {
    if let (Some(uid), Some(version)) = (claim.uid(), version) {
        ctx.superseded.replaced(&uid, version);
    }
}
