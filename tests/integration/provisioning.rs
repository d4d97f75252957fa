//! Dynamic provisioning, binding and reclaim for `local.stowage.dev`,
//! against the real control plane, both with kube-controller-manager's PV
//! binder running and with it disabled.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::{Volume, VolumePhase};

use crate::fixtures::{TIMEOUT, claim, gone, is_bound, storage_class, wait, wait_for_event};
use crate::harness::{Binder, Stack, TestNamespace, stack};

async fn setup(binder: Binder, prefix: &str) -> (&'static Stack, TestNamespace) {
    let stack = stack(binder);
    let ns = TestNamespace::new_with(stack.client().await, prefix).await;
    (stack, ns)
}

async fn provisions_binds_and_deletes(binder: Binder) {
    let (stack, ns) = setup(binder, "prov").await;
    let client = ns.client.clone();
    let class = format!("{}-immediate", ns.name);
    storage_class(&client, &class, "Immediate", "Delete", &[("fsType", "xfs")]).await;
    let created = claim(&ns, "data", &class, "300Mi", &["ReadWriteOnce"]).await;
    let uid = created.uid().unwrap();

    let claims = ns.api::<PersistentVolumeClaim>();
    let bound = wait(&claims, "data", "Bound", is_bound).await.unwrap();
    let pv_name = format!("pvc-{uid}");
    assert_eq!(
        bound.spec.as_ref().unwrap().volume_name.as_deref(),
        Some(pv_name.as_str())
    );
    let ann = bound.annotations();
    assert_eq!(
        ann.get("pv.kubernetes.io/bind-completed")
            .map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        ann.get("pv.kubernetes.io/bound-by-controller")
            .map(String::as_str),
        Some("yes")
    );
    let status = bound.status.as_ref().unwrap();
    assert_eq!(status.capacity.as_ref().unwrap()["storage"].0, "300Mi");
    assert_eq!(
        status.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );

    let pvs = Api::<PersistentVolume>::all(client.clone());
    let pv = wait(&pvs, &pv_name, "Bound", |pv: Option<&PersistentVolume>| {
        pv.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Bound")
    })
    .await
    .unwrap();
    assert_eq!(
        pv.annotations()["pv.kubernetes.io/provisioned-by"],
        "local.stowage.dev"
    );
    // The field manager comes from our user agent: `kubectl get -o yaml
    // --show-managed-fields` names who wrote what.
    let managers: Vec<_> = pv
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert!(managers.contains(&"stowage-controller"), "{managers:?}");
    assert!(
        pv.finalizers()
            .contains(&"external-provisioner.volume.kubernetes.io/finalizer".to_string())
    );
    let spec = pv.spec.as_ref().unwrap();
    let claim_ref = spec.claim_ref.as_ref().unwrap();
    assert_eq!(
        (claim_ref.name.as_deref(), claim_ref.uid.as_deref()),
        (Some("data"), Some(uid.as_str()))
    );
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    assert_eq!(spec.storage_class_name.as_deref(), Some(class.as_str()));
    assert_eq!(
        spec.mount_options.as_deref(),
        Some(&["noatime".to_string()][..])
    );
    assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
    let csi = spec.csi.as_ref().unwrap();
    assert_eq!(
        (csi.driver.as_str(), csi.fs_type.as_deref()),
        ("local.stowage.dev", Some("xfs"))
    );
    let term = &spec
        .node_affinity
        .as_ref()
        .unwrap()
        .required
        .as_ref()
        .unwrap()
        .node_selector_terms[0];
    let expr = &term.match_expressions.as_ref().unwrap()[0];
    assert_eq!(expr.key, "topology.stowage.dev/node");
    let node = expr.values.as_ref().unwrap()[0].clone();

    // The durable record, and the real image file on that node.
    let volume = Api::<Volume>::all(client.clone())
        .get(&pv_name)
        .await
        .expect("Volume exists");
    assert_eq!(volume.status.as_ref().unwrap().phase, VolumePhase::Ready);
    assert_eq!(volume.spec.node.as_deref(), Some(node.as_str()));
    let image = stack.volume_dir(&node).join(format!("{pv_name}.img"));
    let meta = std::fs::metadata(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    assert_eq!(meta.len(), 300 << 20);
    let note = wait_for_event(&ns, "data", "ProvisioningSucceeded").await;
    assert!(note.contains(&pv_name), "{note}");

    // Delete: data, Volume and PV all go.
    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    wait(&pvs, &pv_name, "deleted", gone).await;
    wait(&Api::<Volume>::all(client), &pv_name, "deleted", gone).await;
    assert!(
        !image.exists(),
        "image file {} left behind",
        image.display()
    );
}

#[tokio::test]
async fn provisions_binds_and_deletes_with_kcm_binder() {
    provisions_binds_and_deletes(Binder::Kcm).await;
}

#[tokio::test]
async fn provisions_binds_and_deletes_without_kcm_binder() {
    provisions_binds_and_deletes(Binder::StowageOnly).await;
}

async fn retain_keeps_data(binder: Binder) {
    let (stack, ns) = setup(binder, "retain").await;
    let class = format!("{}-retain", ns.name);
    storage_class(&ns.client, &class, "Immediate", "Retain", &[]).await;
    let uid = claim(&ns, "keep", &class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    let claims = ns.api::<PersistentVolumeClaim>();
    wait(&claims, "keep", "Bound", is_bound).await;
    let pv_name = format!("pvc-{uid}");
    claims
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();

    let pvs = Api::<PersistentVolume>::all(ns.client.clone());
    wait(
        &pvs,
        &pv_name,
        "Released",
        |pv: Option<&PersistentVolume>| {
            pv.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Released")
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let note = loop {
        let list = Api::<Event>::all(ns.client.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        if let Some(e) = list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("VolumeRetained")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pv_name.as_str())
        }) {
            break e.note.unwrap_or_default();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no VolumeRetained event on {pv_name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(note.contains("Retain"), "{note}");
    let volume = Api::<Volume>::all(ns.client.clone())
        .get(&pv_name)
        .await
        .expect("Volume kept");
    let node = volume.spec.node.unwrap();
    assert!(
        stack
            .volume_dir(&node)
            .join(format!("{pv_name}.img"))
            .exists(),
        "retained data deleted"
    );
    assert!(
        pvs.get_opt(&pv_name).await.unwrap().is_some(),
        "retained PV deleted"
    );
}

#[tokio::test]
async fn retain_keeps_pv_volume_and_data_with_kcm_binder() {
    retain_keeps_data(Binder::Kcm).await;
}

#[tokio::test]
async fn retain_keeps_pv_volume_and_data_without_kcm_binder() {
    retain_keeps_data(Binder::StowageOnly).await;
}

async fn bad_input_is_explained(binder: Binder) {
    let (_, ns) = setup(binder, "bad").await;
    // (claim name, class parameters, size, access modes, what the event must say)
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
    );
    let cases: [Case; 5] = [
        (
            "unknown-param",
            &[("fstype", "ext4")],
            "1Gi",
            &["ReadWriteOnce"],
            &["\"fstype\"", "fsType"],
        ),
        (
            "bad-fstype",
            &[("fsType", "btrfs")],
            "1Gi",
            &["ReadWriteOnce"],
            &["btrfs", "ext4 or xfs"],
        ),
        (
            "rox",
            &[],
            "1Gi",
            &["ReadOnlyMany"],
            &["ReadOnlyMany", "one node"],
        ),
        (
            "rwx",
            &[],
            "1Gi",
            &["ReadWriteMany"],
            &["ReadWriteMany", "ReadWriteOnce"],
        ),
        (
            "too-big",
            &[],
            "100Ti",
            &["ReadWriteOnce"],
            &["no node can hold 100Ti", "request less"],
        ),
    ];
    for (name, params, size, modes, expected) in cases {
        let class = format!("{}-{name}", ns.name);
        storage_class(&ns.client, &class, "Immediate", "Delete", params).await;
        claim(&ns, name, &class, size, modes).await;
        // kcm's binder may say "storageclass not found" first, before its
        // cache has the class: the explanation asked for is stowage's.
        let note = crate::fixtures::wait_for_stowage_event(&ns, name, "ProvisioningFailed").await;
        for part in expected {
            assert!(
                note.contains(part),
                "{name}: event {note:?} should mention {part:?}"
            );
        }
        let c = ns.api::<PersistentVolumeClaim>().get(name).await.unwrap();
        assert_eq!(
            c.status.and_then(|s| s.phase).as_deref(),
            Some("Pending"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn bad_input_gets_provisioning_failed_events_with_kcm_binder() {
    bad_input_is_explained(Binder::Kcm).await;
}

#[tokio::test]
async fn bad_input_gets_provisioning_failed_events_without_kcm_binder() {
    bad_input_is_explained(Binder::StowageOnly).await;
}

/// `WaitForFirstConsumer`: nothing happens until the real kube-scheduler
/// places a pod and names the node; the volume is then made on that node.
async fn wait_for_first_consumer(binder: Binder) {
    let (stack, ns) = setup(binder, "wffc").await;
    let class = format!("{}-wffc", ns.name);
    storage_class(&ns.client, &class, "WaitForFirstConsumer", "Delete", &[]).await;
    let uid = claim(&ns, "late", &class, "50Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    // Once stowage has said it waits, it has seen the claim and chosen not
    // to provision it.
    crate::fixtures::wait_for_stowage_event(&ns, "late", "WaitForFirstConsumer").await;
    assert!(
        Api::<Volume>::all(ns.client.clone())
            .get_opt(&format!("pvc-{uid}"))
            .await
            .unwrap()
            .is_none(),
        "provisioned before any consumer existed"
    );

    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "consumer" },
        "spec": {
            "nodeSelector": { "kubernetes.io/hostname": "node-b" },
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{ "name": "c", "image": "busybox", "command": ["true"] }],
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": "late" } }],
        },
    }))
    .unwrap();
    ns.api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();

    let claims = ns.api::<PersistentVolumeClaim>();
    let bound = wait(&claims, "late", "Bound", is_bound).await.unwrap();
    assert_eq!(
        bound
            .annotations()
            .get("volume.kubernetes.io/selected-node")
            .map(String::as_str),
        Some("node-b")
    );
    let volume = Api::<Volume>::all(ns.client.clone())
        .get(&format!("pvc-{uid}"))
        .await
        .unwrap();
    assert_eq!(volume.spec.node.as_deref(), Some("node-b"));
    assert!(
        stack
            .volume_dir("node-b")
            .join(format!("pvc-{uid}.img"))
            .exists()
    );
    let pods = ns.api::<Pod>();
    let scheduled = wait(&pods, "consumer", "scheduled", |p: Option<&Pod>| {
        p.and_then(|p| p.spec.as_ref()?.node_name.as_deref())
            .is_some()
    })
    .await
    .unwrap();
    assert_eq!(scheduled.spec.unwrap().node_name.as_deref(), Some("node-b"));
}

#[tokio::test]
async fn wait_for_first_consumer_follows_the_scheduler_with_kcm_binder() {
    wait_for_first_consumer(Binder::Kcm).await;
}

#[tokio::test]
async fn wait_for_first_consumer_follows_the_scheduler_without_kcm_binder() {
    wait_for_first_consumer(Binder::StowageOnly).await;
}

/// Pre-created PVs of our class: the smallest one that fits is bound.
async fn static_binding(binder: Binder) {
    let (_, ns) = setup(binder, "static").await;
    let class = format!("{}-static", ns.name);
    storage_class(&ns.client, &class, "Immediate", "Retain", &[]).await;
    let pvs = Api::<PersistentVolume>::all(ns.client.clone());
    for (suffix, size, label) in [
        ("small", "1Gi", "a"),
        ("fits", "2Gi", "a"),
        ("big", "5Gi", "a"),
        ("other", "2Gi", "b"),
    ] {
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": { "name": format!("{}-{suffix}", ns.name), "labels": { "tier": label } },
            "spec": {
                "capacity": { "storage": size },
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": class,
                "csi": { "driver": "local.stowage.dev", "volumeHandle": format!("static-{suffix}") },
            },
        }))
        .unwrap();
        pvs.create(&PostParams::default(), &pv).await.unwrap();
    }
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": "picky" },
        "spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "1500Mi" } },
            "selector": { "matchLabels": { "tier": "a" } },
        },
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
    let bound = wait(
        &ns.api::<PersistentVolumeClaim>(),
        "picky",
        "Bound",
        is_bound,
    )
    .await
    .unwrap();
    assert_eq!(
        bound.spec.unwrap().volume_name,
        Some(format!("{}-fits", ns.name))
    );
    assert_eq!(bound.status.unwrap().capacity.unwrap()["storage"].0, "2Gi");
    let pv = pvs.get(&format!("{}-fits", ns.name)).await.unwrap();
    assert_eq!(
        pv.spec.unwrap().claim_ref.unwrap().name.as_deref(),
        Some("picky")
    );
    for suffix in ["small", "fits", "big", "other"] {
        pvs.delete(&format!("{}-{suffix}", ns.name), &DeleteParams::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn static_pvs_bind_smallest_fit_with_kcm_binder() {
    static_binding(Binder::Kcm).await;
}

#[tokio::test]
async fn static_pvs_bind_smallest_fit_without_kcm_binder() {
    static_binding(Binder::StowageOnly).await;
}

/// A claim that does not fit is told why and given back to the scheduler,
/// and is provisioned once space is freed and the node chosen again. The
/// scheduler's choice is stood in for by setting the selected-node
/// annotation on a node with 100Mi.
#[tokio::test]
async fn claim_is_provisioned_once_capacity_is_freed() {
    let (_, ns) = setup(Binder::StowageOnly, "room").await;
    let class = format!("{}-small", ns.name);
    storage_class(&ns.client, &class, "WaitForFirstConsumer", "Delete", &[]).await;
    let claims = ns.api::<PersistentVolumeClaim>();
    for name in ["first", "second"] {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": { "name": name, "annotations": { "volume.kubernetes.io/selected-node": "node-small" } },
            "spec": {
                "storageClassName": class,
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": "60Mi" } },
            },
        }))
        .unwrap();
        claims.create(&PostParams::default(), &claim).await.unwrap();
        if name == "first" {
            wait(&claims, "first", "Bound", is_bound).await;
        }
    }
    let note = wait_for_event(&ns, "second", "ProvisioningFailed").await;
    assert!(
        note.contains("node-small") && note.contains("free"),
        "{note}"
    );
    // The node is given back to the scheduler, which would place the pod
    // again; the test stands in for it until the claim binds.
    crate::fixtures::wait_for_stowage_event(&ns, "second", "Rescheduling").await;
    claims
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let second = claims.get("second").await.unwrap();
        if is_bound(Some(&second)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "second: not Bound");
        if !second
            .annotations()
            .contains_key("volume.kubernetes.io/selected-node")
        {
            let placed = json!({ "metadata": { "annotations": {
                "volume.kubernetes.io/selected-node": "node-small" } } });
            claims
                .patch("second", &PatchParams::default(), &Patch::Merge(&placed))
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
