//! Which objects the caches keep. Most PVs, claims and VolumeAttachments of
//! a large cluster belong to other drivers, and a PV alone is a 3.4 KiB
//! struct before its strings: caching them all cost more memory than
//! everything stowage does with its own. An object out of scope is left
//! out of the cache and of every job; one that leaves the scope (another
//! driver's claim getting bound) is dropped from the cache, and its
//! deletion hooks run, since for stowage it is gone.
//!
//! Every rule keeps an object while it could still become stowage's: a
//! claim until it is bound, a PV until it is claimed, and anything of a
//! class stowage serves or a class not known yet (claims and PVs are
//! watched once the classes are listed, so that is rare). Nothing acts on the
//! absence of an object from these caches without asking the API server
//! (reclaim confirms a missing claim with a GET), so a rule that drops too
//! much costs a request, never data.

use std::sync::Arc;

use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::runtime::reflector::{ObjectRef, Store};

use super::Context;
use super::informer::Informers;
use super::protocol::{ANN_BETA_STORAGE_PROVISIONER, ANN_PROVISIONED_BY, ANN_STORAGE_PROVISIONER};

/// Limits the claim, PV and VolumeAttachment caches to stowage's objects.
pub fn limit(ctx: &Arc<Context>, informers: &mut Informers) {
    informers.claims.keep_only(by_class(
        ctx,
        |o: &Claim| o.spec.as_ref()?.storage_class_name.as_deref(),
        |o, class, serves| claim(o, class, serves),
    ));
    informers.pvs.keep_only(by_class(
        ctx,
        |o: &Pv| o.spec.as_ref()?.storage_class_name.as_deref(),
        |o, class, serves| pv(o, class, serves),
    ));
    let c = ctx.clone();
    informers
        .attachments
        .keep_only(move |o| attachment(o, |p| c.serves(p)));
}

/// A rule of an object and the class it names (`class_name`), looked up
/// in the cache at each call: classes are watched, so a rule's answer
/// follows a class created after the object.
fn by_class<K>(
    ctx: &Arc<Context>,
    class_name: impl Fn(&K) -> Option<&str> + Send + Sync + 'static,
    rule: impl Fn(&K, Class, &dyn Fn(&str) -> bool) -> bool + Send + Sync + 'static,
) -> impl Fn(&K) -> bool + Send + Sync + 'static {
    let c = ctx.clone();
    move |o| {
        let cached = class(&c.stores.classes, class_name(o));
        rule(o, cached.as_class(), &|p| c.serves(p))
    }
}

/// The class an object names, as the cache knows it.
enum Cached {
    None,
    Unknown,
    Class(Arc<StorageClass>),
}

impl Cached {
    fn as_class(&self) -> Class<'_> {
        match self {
            Cached::None => Class::None,
            Cached::Unknown => Class::Unknown,
            Cached::Class(c) => Class::Provisioner(&c.provisioner),
        }
    }
}

fn class(classes: &Store<StorageClass>, name: Option<&str>) -> Cached {
    match name.filter(|n| !n.is_empty()) {
        None => Cached::None,
        Some(n) => classes
            .get(&ObjectRef::new(n))
            .map_or(Cached::Unknown, Cached::Class),
    }
}

/// What the class an object names tells about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class<'a> {
    /// No class (`""` or unset).
    None,
    /// Named, but not in the cache.
    Unknown,
    Provisioner(&'a str),
}

impl Class<'_> {
    fn served_or_unknown(self, serves: impl Fn(&str) -> bool) -> bool {
        match self {
            Class::None => false,
            Class::Unknown => true,
            Class::Provisioner(p) => serves(p),
        }
    }
}

/// A claim stays until it is bound to another provisioner's PV: its
/// provisioner is known (kcm's storage-provisioner annotation, or the
/// class) and not one stowage serves.
pub fn claim(claim: &Claim, class: Class, serves: impl Fn(&str) -> bool) -> bool {
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        && claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .is_some_and(|n| !n.is_empty());
    let ann = claim.annotations();
    let annotated = ann
        .get(ANN_STORAGE_PROVISIONER)
        .or_else(|| ann.get(ANN_BETA_STORAGE_PROVISIONER));
    !bound
        || match annotated {
            Some(p) => serves(p),
            None => class.served_or_unknown(serves),
        }
}

/// A PV stays when it is stowage's (its CSI driver or the provisioner that
/// made it), while no claim holds it (a static PV of any class may still
/// be bound to a claim of ours), or when its class is served or unknown:
/// a static PV of another driver bound to a claim of ours is still read
/// by the binder.
pub fn pv(pv: &Pv, class: Class, serves: impl Fn(&str) -> bool) -> bool {
    let spec = pv.spec.as_ref();
    let claimed = spec
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref())
        .is_some_and(|u| !u.is_empty());
    let driver = spec.and_then(|s| s.csi.as_ref()).map(|c| c.driver.as_str());
    let provisioned_by = pv.annotations().get(ANN_PROVISIONED_BY).map(String::as_str);
    !claimed
        || driver.is_some_and(&serves)
        || provisioned_by.is_some_and(&serves)
        || class.served_or_unknown(&serves)
}

/// A VolumeAttachment is stowage's when one of its drivers is the
/// attacher; `spec.attacher` never changes.
pub fn attachment(va: &VolumeAttachment, serves: impl Fn(&str) -> bool) -> bool {
    serves(&va.spec.attacher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OURS: &str = "local.stowage.dev";
    const OTHER: &str = "other.example.com";

    fn serves(p: &str) -> bool {
        p == OURS
    }

    fn claim_with(annotation: Option<&str>, phase: &str, volume: Option<&str>) -> Claim {
        let annotations = annotation
            .map(|p| json!({ ANN_STORAGE_PROVISIONER: p }))
            .unwrap_or(json!({}));
        serde_json::from_value(json!({
            "metadata": { "name": "c", "namespace": "ns", "annotations": annotations },
            "spec": { "storageClassName": "any", "volumeName": volume },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    #[test]
    fn claims_leave_only_once_bound_to_another_provisioner() {
        let other = Class::Provisioner(OTHER);
        let bound_other = claim_with(Some(OTHER), "Bound", Some("pv-1"));
        assert!(!claim(&bound_other, Class::Unknown, serves));
        assert!(claim(
            &claim_with(Some(OTHER), "Pending", None),
            other,
            serves
        ));
        let bound_ours = claim_with(Some(OURS), "Bound", Some("pv-1"));
        assert!(claim(&bound_ours, other, serves));
        // No annotation (kcm's binder off, or a static bind): the class decides.
        let unannotated = claim_with(None, "Bound", Some("pv-1"));
        assert!(!claim(&unannotated, other, serves));
        assert!(!claim(&unannotated, Class::None, serves));
        assert!(claim(&unannotated, Class::Provisioner(OURS), serves));
        assert!(
            claim(&unannotated, Class::Unknown, serves),
            "class not known yet"
        );
        // Bound in status but naming no PV yet: kept.
        assert!(claim(
            &claim_with(Some(OTHER), "Bound", None),
            other,
            serves
        ));
    }

    fn pv_with(driver: &str, provisioned_by: Option<&str>, claim_uid: Option<&str>) -> Pv {
        let annotations = provisioned_by
            .map(|p| json!({ ANN_PROVISIONED_BY: p }))
            .unwrap_or(json!({}));
        let claim_ref = claim_uid.map(|u| json!({ "namespace": "ns", "name": "c", "uid": u }));
        serde_json::from_value(json!({
            "metadata": { "name": "pv", "annotations": annotations },
            "spec": { "claimRef": claim_ref, "csi": { "driver": driver, "volumeHandle": "h" } },
        }))
        .unwrap()
    }

    #[test]
    fn pvs_leave_once_another_drivers_and_claimed() {
        let other = Class::Provisioner(OTHER);
        assert!(!pv(&pv_with(OTHER, Some(OTHER), Some("u")), other, serves));
        assert!(!pv(&pv_with(OTHER, None, Some("u")), Class::None, serves));
        assert!(
            pv(&pv_with(OTHER, None, None), other, serves),
            "available static PV"
        );
        let by_name = pv_with(OTHER, None, Some(""));
        assert!(pv(&by_name, other, serves), "pre-bound by name only");
        assert!(pv(&pv_with(OURS, None, Some("u")), other, serves));
        assert!(pv(&pv_with(OTHER, Some(OURS), Some("u")), other, serves));
        // Another driver's static PV, claimed in a class of ours.
        let in_our_class = pv_with(OTHER, None, Some("u"));
        assert!(pv(&in_our_class, Class::Provisioner(OURS), serves));
        assert!(pv(&in_our_class, Class::Unknown, serves));
    }

    #[test]
    fn attachments_are_ours_by_attacher() {
        let va = |attacher: &str| -> VolumeAttachment {
            serde_json::from_value(json!({
                "metadata": { "name": "va" },
                "spec": { "attacher": attacher, "nodeName": "n", "source": {} },
            }))
            .unwrap()
        };
        assert!(attachment(&va(OURS), serves));
        assert!(!attachment(&va(OTHER), serves));
    }
}
