use k8s_openapi::api::storage::v1::VolumeAttachment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde_json::json;

use super::*;
use crate::backend::csi_proxy::Published;
use crate::controller::attach::{ANN_NODE_ID, finalizer};
use crate::controller::cached_pv::Pv;

const DRIVER: &str = "mock.csi.example";

/// A VA of `pv` on node `node`, prepared by us for node ID `id-<node>`.
fn va(name: &str, node: &str) -> VolumeAttachment {
    let mut va: VolumeAttachment = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "attacher": DRIVER, "nodeName": node, "source": { "persistentVolumeName": "pv-1" } },
    }))
    .unwrap();
    va.metadata.finalizers = Some(vec![finalizer(DRIVER)]);
    va.metadata.annotations = Some([(ANN_NODE_ID.to_string(), format!("id-{node}"))].into());
    va
}

fn attached(mut va: VolumeAttachment) -> VolumeAttachment {
    va.status = Some(serde_json::from_value(json!({ "attached": true })).unwrap());
    va
}

/// Being deleted; `ours` whether our finalizer still holds it.
fn deleting(mut va: VolumeAttachment, ours: bool) -> VolumeAttachment {
    va.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    if !ours {
        va.metadata.finalizers = Some(vec!["example.com/keep".into()]);
    }
    va
}

fn pv() -> Pv {
    serde_json::from_value(json!({
        "metadata": { "name": "pv-1" },
        "spec": { "accessModes": ["ReadWriteOnce"], "csi": { "driver": DRIVER, "volumeHandle": "h-1" } },
    }))
    .unwrap()
}

fn published(entries: &[(&str, &[&str])]) -> Published {
    entries
        .iter()
        .map(|(h, nodes)| (h.to_string(), nodes.iter().map(|n| n.to_string()).collect()))
        .collect()
}

/// The repairs `plan` decides, as (VA name, node ID, fix).
fn decide(vas: &[VolumeAttachment], pv: Option<&Pv>, p: &Published) -> Vec<(String, String, Fix)> {
    let views: Vec<_> = vas
        .iter()
        .map(|va| DriftView {
            va,
            pv,
            node_id: Some(format!("id-{}", va.spec.node_name)),
        })
        .collect();
    plan(&views, DRIVER, p)
        .into_iter()
        .map(|r| {
            assert_eq!(r.handle, "h-1");
            (r.va.name_any(), r.node_id, r.fix)
        })
        .collect()
}

#[test]
fn attached_volumes_the_driver_lost_are_published_again() {
    let on_a = || attached(va("va-a", "a"));
    let rows: &[(&str, VolumeAttachment, Published, Option<Fix>)] = &[
        (
            "published there",
            on_a(),
            published(&[("h-1", &["id-a"])]),
            None,
        ),
        (
            "published elsewhere only",
            on_a(),
            published(&[("h-1", &["id-b"])]),
            Some(Fix::Republish),
        ),
        (
            "published nowhere",
            on_a(),
            published(&[("h-1", &[])]),
            Some(Fix::Republish),
        ),
        (
            "unknown to the driver",
            on_a(),
            published(&[("h-2", &["id-a"])]),
            Some(Fix::Republish),
        ),
        (
            "not attached yet, not published",
            va("va-a", "a"),
            published(&[]),
            None,
        ),
        (
            "not attached yet, published: on its way",
            va("va-a", "a"),
            published(&[("h-1", &["id-a"])]),
            None,
        ),
    ];
    for (row, v, p, fix) in rows {
        let want: Vec<_> = fix
            .iter()
            .map(|f| ("va-a".to_string(), "id-a".to_string(), *f))
            .collect();
        assert_eq!(
            decide(std::slice::from_ref(v), Some(&pv()), p),
            want,
            "{row}"
        );
    }
}

#[test]
fn detached_volumes_the_driver_still_holds_are_unpublished_again() {
    let there = published(&[("h-1", &["id-a"])]);
    let rows: &[(&str, Vec<VolumeAttachment>, &Published, Option<Fix>)] = &[
        (
            "let go, still published",
            vec![deleting(va("va-a", "a"), false)],
            &there,
            Some(Fix::Unpublish),
        ),
        (
            "let go, attached status, still published",
            vec![attached(deleting(va("va-a", "a"), false))],
            &there,
            Some(Fix::Unpublish),
        ),
        (
            "let go, not published",
            vec![deleting(va("va-a", "a"), false)],
            &published(&[]),
            None,
        ),
        (
            "still ours: the attach job detaches it",
            vec![attached(deleting(va("va-a", "a"), true))],
            &there,
            None,
        ),
        (
            "still ours, already gone from the driver",
            vec![attached(deleting(va("va-a", "a"), true))],
            &published(&[]),
            None,
        ),
        (
            "another VA uses the volume on that node",
            vec![deleting(va("va-a", "a"), false), attached(va("va-a2", "a"))],
            &there,
            None,
        ),
        (
            "another VA uses the volume on another node",
            vec![deleting(va("va-a", "a"), false), attached(va("va-b", "b"))],
            &published(&[("h-1", &["id-a", "id-b"])]),
            Some(Fix::Unpublish),
        ),
    ];
    for (row, vas, p, fix) in rows {
        let want: Vec<_> = fix
            .iter()
            .map(|f| ("va-a".to_string(), "id-a".to_string(), *f))
            .collect();
        assert_eq!(decide(vas, Some(&pv()), p), want, "{row}");
    }
}

#[test]
fn what_cannot_be_compared_is_left_alone() {
    let nowhere = published(&[]);
    let mut other = attached(va("va-o", "a"));
    other.spec.attacher = "other.csi.example".into();
    assert_eq!(
        decide(&[other], Some(&pv()), &nowhere),
        vec![],
        "another driver's"
    );
    let v = attached(va("va-a", "a"));
    assert_eq!(
        decide(std::slice::from_ref(&v), None, &nowhere),
        vec![],
        "PV not in the cache"
    );
    let mut unprepared = v.clone();
    unprepared.metadata.annotations = None;
    let views = [DriftView {
        va: &unprepared,
        pv: Some(&pv()),
        node_id: None,
    }];
    assert_eq!(
        plan(&views, DRIVER, &nowhere),
        vec![],
        "no node ID anywhere"
    );
}

#[test]
fn the_node_id_compared_is_the_one_published_to() {
    // The driver re-registered on node a under a new ID: the attach job
    // publishes to the recorded one, so that is the one to find.
    let v = attached(va("va-a", "a"));
    let p = pv();
    // The caches know node a by its new ID; the driver reports it published
    // to `ids`. What it must fix, per node ID.
    let on_new_id = |va: &VolumeAttachment, ids: &[&str]| {
        let views = [DriftView {
            va,
            pv: Some(&p),
            node_id: Some("id-a-new".into()),
        }];
        plan(&views, DRIVER, &published(&[("h-1", ids)]))
            .into_iter()
            .map(|r| (r.node_id, r.fix))
            .collect::<Vec<_>>()
    };
    assert_eq!(on_new_id(&v, &["id-a"]), vec![]);
    assert_eq!(
        on_new_id(&v, &["id-a-new"]),
        vec![("id-a".to_string(), Fix::Republish)]
    );
    // Not prepared yet: the ID the caches know.
    let mut unprepared = v.clone();
    unprepared.metadata.annotations = None;
    assert_eq!(on_new_id(&unprepared, &["id-a-new"]), vec![]);
}
