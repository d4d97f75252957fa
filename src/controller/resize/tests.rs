use k8s_openapi::api::storage::v1::StorageClass;
use serde_json::json;

use super::*;
use crate::backend::local;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::{VolumePhase, VolumeStatus};
use crate::testing;

const MI: i64 = 1 << 20;

fn claim(request: &str, capacity: &str) -> Claim {
    serde_json::from_value(json!({
        "metadata": { "name": "data", "namespace": "ns", "uid": "u1" },
        "spec": { "volumeName": "pvc-u1", "storageClassName": "fast",
                  "resources": { "requests": { "storage": request } } },
        "status": { "phase": "Bound", "capacity": { "storage": capacity } },
    }))
    .unwrap()
}

fn with_resize(mut c: Claim, allocated: &str, status: &str) -> Claim {
    let s = c.status.as_mut().unwrap();
    s.allocated_resources = Some(
        [(
            "storage".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(allocated.into()),
        )]
        .into(),
    );
    s.allocated_resource_statuses = Some([("storage".into(), status.into())].into());
    c
}

/// A claim asking 128Mi of a 64Mi volume, the resize at `status`.
fn growing(status: &str) -> Claim {
    with_resize(claim("128Mi", "64Mi"), "128Mi", status)
}

fn pv(capacity: &str) -> Pv {
    serde_json::from_value(json!({
        "metadata": { "name": "pvc-u1" },
        "spec": { "capacity": { "storage": capacity },
                  "claimRef": { "namespace": "ns", "name": "data", "uid": "u1" },
                  "csi": { "driver": local::DRIVER_NAME, "volumeHandle": "pvc-u1" } },
    }))
    .unwrap()
}

fn class(expandable: Option<bool>) -> StorageClass {
    let mut c = testing::storage_class("fast", local::DRIVER_NAME, None, &[]);
    c.allow_volume_expansion = expandable;
    c
}

fn volume(spec_bytes: i64, ready_bytes: Option<i64>, layout: &str) -> Volume {
    let mut spec = testing::volume_spec(local::DRIVER_NAME, spec_bytes);
    spec.parameters = [("layout".to_string(), layout.to_string())].into();
    spec.node = Some("n1".into());
    spec.persistent_volume_name = Some("pvc-u1".into());
    let mut v = testing::volume("pvc-u1", spec);
    v.metadata.generation = Some(2);
    v.status = ready_bytes.map(|b| VolumeStatus {
        phase: VolumePhase::Ready,
        observed_generation: Some(2),
        capacity_bytes: Some(b),
        ..Default::default()
    });
    v
}

fn plan_with(
    claim: &Claim,
    pv_: &Pv,
    class_: Option<&StorageClass>,
    volume_: Option<&Volume>,
    free: Option<i64>,
) -> Resize {
    plan(&ResizeView {
        claim,
        pv: Some(pv_),
        class: class_,
        volume: volume_,
        free_on_node: free,
        remote_expands: None,
    })
}

/// A `--csi-driver`'s PV (no Volume of ours), its driver offering
/// EXPAND_VOLUME or not.
fn plan_remote(claim: &Claim, capacity: &str, expands: bool) -> Resize {
    let mut p = pv(capacity);
    p.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "mock.csi.k8s.io".into();
    plan(&ResizeView {
        claim,
        pv: Some(&p),
        class: Some(&class(Some(true))),
        volume: None,
        free_on_node: None,
        remote_expands: Some(expands),
    })
}

#[test]
fn a_driver_volume_is_expanded_in_the_driver_until_the_claim_records_it() {
    let c = claim("128Mi", "64Mi");
    assert_eq!(
        plan_remote(&c, "64Mi", true),
        Resize::Start {
            request: "128Mi".into()
        }
    );
    let c = with_resize(c, "128Mi", CONTROLLER_RESIZE_IN_PROGRESS);
    assert_eq!(
        plan_remote(&c, "64Mi", true),
        Resize::ExpandInDriver { bytes: 128 * MI }
    );
    // The PV grew before a crash: asked again (idempotent), to learn
    // whether the node must expand too.
    assert_eq!(
        plan_remote(&c, "128Mi", true),
        Resize::ExpandInDriver { bytes: 128 * MI }
    );
    // Infeasible, then the user asks for less: started again at that size.
    let refused = growing(CONTROLLER_RESIZE_INFEASIBLE);
    assert_eq!(
        plan_remote(&refused, "64Mi", true),
        Resize::ExpandInDriver { bytes: 128 * MI }
    );
    let less = with_resize(claim("96Mi", "64Mi"), "128Mi", CONTROLLER_RESIZE_INFEASIBLE);
    assert_eq!(
        plan_remote(&less, "64Mi", true),
        Resize::Start {
            request: "96Mi".into()
        }
    );
    // kubelet's turn, then done: nothing for us.
    let on_node = growing(NODE_RESIZE_PENDING);
    assert_eq!(plan_remote(&on_node, "128Mi", true), Resize::Nothing);
    assert_eq!(
        plan_remote(&claim("128Mi", "128Mi"), "128Mi", true),
        Resize::Nothing
    );
}

#[test]
fn a_driver_without_controller_expansion_leaves_it_to_the_node() {
    let c = growing(CONTROLLER_RESIZE_IN_PROGRESS);
    assert_eq!(
        plan_remote(&c, "64Mi", false),
        Resize::ResizePv { bytes: 128 * MI }
    );
    assert_eq!(plan_remote(&c, "128Mi", false), Resize::AwaitNodeExpansion);
}

#[test]
fn another_drivers_volume_is_not_ours_to_expand() {
    let c = claim("128Mi", "64Mi");
    let mut p = pv("64Mi");
    p.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "other.csi.k8s.io".into();
    let view = ResizeView {
        claim: &c,
        pv: Some(&p),
        class: Some(&class(Some(true))),
        volume: None,
        free_on_node: None,
        remote_expands: None,
    };
    assert_eq!(plan(&view), Resize::Nothing);
}

#[test]
fn a_claim_at_its_request_needs_nothing() {
    let c = claim("64Mi", "64Mi");
    let v = volume(64 * MI, Some(64 * MI), "image");
    let step = plan_with(&c, &pv("64Mi"), Some(&class(Some(true))), Some(&v), Some(0));
    assert_eq!(step, Resize::Nothing);
}

#[test]
fn expansion_walks_through_the_kubelet_states_for_images() {
    let k = class(Some(true));
    let c = claim("128Mi", "64Mi");
    let small = volume(64 * MI, Some(64 * MI), "image");
    let p = pv("64Mi");
    assert_eq!(
        plan_with(&c, &p, Some(&k), Some(&small), Some(GI)),
        Resize::Start {
            request: "128Mi".into()
        }
    );
    let c = with_resize(c, "128Mi", CONTROLLER_RESIZE_IN_PROGRESS);
    assert_eq!(
        plan_with(&c, &p, Some(&k), Some(&small), Some(GI)),
        Resize::GrowVolume { bytes: 128 * MI }
    );
    let mut growing = volume(128 * MI, Some(64 * MI), "image");
    growing.metadata.generation = Some(3);
    assert_eq!(
        plan_with(&c, &p, Some(&k), Some(&growing), Some(GI)),
        Resize::WaitForNode
    );
    let grown = volume(128 * MI, Some(128 * MI), "image");
    assert_eq!(
        plan_with(&c, &p, Some(&k), Some(&grown), Some(GI)),
        Resize::ResizePv { bytes: 128 * MI }
    );
    let p = pv("128Mi");
    assert_eq!(
        plan_with(&c, &p, Some(&k), Some(&grown), Some(GI)),
        Resize::AwaitNodeExpansion
    );
    let c = with_resize(c, "128Mi", NODE_RESIZE_PENDING);
    assert_eq!(
        plan_with(&c, &p, Some(&k), Some(&grown), Some(GI)),
        Resize::Nothing,
        "kubelet's turn"
    );
}

#[test]
fn directories_finish_without_the_node() {
    let c = growing(CONTROLLER_RESIZE_IN_PROGRESS);
    let v = volume(128 * MI, Some(128 * MI), "dir");
    assert_eq!(
        plan_with(
            &c,
            &pv("128Mi"),
            Some(&class(Some(true))),
            Some(&v),
            Some(GI)
        ),
        Resize::Finish { bytes: 128 * MI }
    );
}

#[test]
fn classes_without_expansion_are_refused_with_the_fix() {
    let c = claim("128Mi", "64Mi");
    let v = volume(64 * MI, Some(64 * MI), "image");
    for k in [class(None), class(Some(false))] {
        let Resize::Refuse(e) = plan_with(&c, &pv("64Mi"), Some(&k), Some(&v), Some(GI)) else {
            panic!("not refused");
        };
        assert!(e.to_string().contains("allowVolumeExpansion: true"), "{e}");
        assert!(!e.infeasible());
    }
}

#[test]
fn no_room_is_infeasible_and_says_how_much_fits() {
    let c = with_resize(claim("1Gi", "64Mi"), "1Gi", CONTROLLER_RESIZE_IN_PROGRESS);
    let v = volume(64 * MI, Some(64 * MI), "image");
    let Resize::Refuse(e) = plan_with(
        &c,
        &pv("64Mi"),
        Some(&class(Some(true))),
        Some(&v),
        Some(100 * MI),
    ) else {
        panic!("not refused");
    };
    assert!(e.infeasible());
    assert_eq!(
        e.to_string(),
        "node n1 cannot grow the volume by 960Mi: it has 100Mi free; free space there or request at most 164Mi"
    );
    // The user asks for less (allowed above status.capacity): work resumes.
    let c = with_resize(claim("128Mi", "64Mi"), "1Gi", CONTROLLER_RESIZE_INFEASIBLE);
    assert_eq!(
        plan_with(
            &c,
            &pv("64Mi"),
            Some(&class(Some(true))),
            Some(&v),
            Some(100 * MI)
        ),
        Resize::Start {
            request: "128Mi".into()
        }
    );
}

#[test]
fn static_volumes_and_unbound_claims() {
    let c = claim("128Mi", "64Mi");
    assert!(matches!(
        plan_with(&c, &pv("64Mi"), Some(&class(Some(true))), None, None),
        Resize::Refuse(ResizeError::NotProvisioned(_))
    ));
    let mut other = pv("64Mi");
    other.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().uid = Some("u2".into());
    assert_eq!(
        plan_with(&c, &other, Some(&class(Some(true))), None, None),
        Resize::Nothing
    );
}

const GI: i64 = 1 << 30;
