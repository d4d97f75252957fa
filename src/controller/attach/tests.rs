use crate::controller::cached_pv::Pv;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use serde_json::json;

use super::*;

const DRIVER: &str = "hostpath.csi.k8s.io";

fn va(name: &str, node: &str) -> VolumeAttachment {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "attacher": DRIVER, "nodeName": node, "source": { "persistentVolumeName": "pv-1" } },
    }))
    .unwrap()
}

fn pv(mode: &str, with_finalizer: bool) -> Pv {
    let mut pv: Pv = serde_json::from_value(json!({
        "metadata": { "name": "pv-1" },
        "spec": { "accessModes": [mode], "csi": { "driver": DRIVER, "volumeHandle": "h-1" } },
    }))
    .unwrap();
    if with_finalizer {
        pv.metadata.finalizers = Some(vec![finalizer(DRIVER)]);
    }
    pv
}

fn prepared(mut v: VolumeAttachment) -> VolumeAttachment {
    v.metadata.finalizers = Some(vec![finalizer(DRIVER)]);
    v.metadata.annotations = Some([(ANN_NODE_ID.to_string(), "id-a".to_string())].into());
    v
}

fn view<'a>(
    va: &'a VolumeAttachment,
    pv: Option<&'a Pv>,
    others: &'a [&'a VolumeAttachment],
) -> AttachView<'a> {
    AttachView {
        va,
        pv,
        node_id: Some("id-a".into()),
        node_exists: true,
        others,
    }
}

#[test]
fn finalizer_names_match_external_attacher() {
    assert_eq!(finalizer(DRIVER), "external-attacher/hostpath-csi-k8s-io");
}

#[test]
fn attach_records_finalizers_before_publishing() {
    let v = va("va-1", "a");
    let p = pv("ReadWriteOnce", false);
    assert_eq!(
        plan(&view(&v, Some(&p), &[])),
        Attach::Prepare {
            node_id: "id-a".into()
        }
    );
    let v = prepared(v);
    let p = pv("ReadWriteOnce", true);
    assert_eq!(
        plan(&view(&v, Some(&p), &[])),
        Attach::Publish {
            node_id: "id-a".into()
        }
    );
}

#[test]
fn a_single_node_volume_is_never_published_to_two_nodes() {
    let mut there = prepared(va("va-b", "b"));
    there.status = Some(serde_json::from_value(json!({ "attached": true })).unwrap());
    let v = prepared(va("va-a", "a"));
    let p = pv("ReadWriteOnce", true);
    let Attach::Refuse(e) = plan(&view(&v, Some(&p), &[&there])) else {
        panic!("published twice");
    };
    assert!(e.to_string().contains("attached to node b"), "{e}");
    let shared = pv("ReadWriteMany", true);
    assert_eq!(
        plan(&view(&v, Some(&shared), &[&there])),
        Attach::Publish {
            node_id: "id-a".into()
        }
    );
}

#[test]
fn detach_uses_the_recorded_node_id_even_when_the_node_is_gone() {
    let mut v = prepared(va("va-1", "a"));
    v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let mut gone = view(&v, None, &[]);
    gone.node_exists = false;
    gone.node_id = None;
    assert_eq!(
        plan(&gone),
        Attach::Unpublish {
            node_id: Some("id-a".into())
        }
    );
    let undeleted = va("va-2", "a");
    let mut orphan = view(&undeleted, None, &[]);
    orphan.node_exists = false;
    assert_eq!(plan(&orphan), Attach::DeleteOrphan);
    let mut attached = prepared(va("va-3", "a"));
    attached.status = Some(serde_json::from_value(json!({ "attached": true })).unwrap());
    let mut orphan = view(&attached, None, &[]);
    orphan.node_exists = false;
    assert_eq!(plan(&orphan), Attach::DeleteOrphan);
}
