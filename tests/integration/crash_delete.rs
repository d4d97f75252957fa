//! Crashes on the way out and on the way up: the controller or node agent
//! dies between the steps of reclaiming a deleted claim's data, or of
//! growing a volume. After a restart nothing is leaked (no Volume, PV or
//! image) and nothing is lost (the grown image keeps its filesystem and
//! the data written before the crash).

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::controller::protocol::PV_PROVISIONER_FINALIZER;
use stowage::crd::{VOLUME_FINALIZER, Volume};

use crate::crash::{
    Armed, assert_image, controller, files_for, node_agent, objects_for_claim, read_from_image,
    write_into_image,
};
use crate::crash_provision::{CRASH_CLUSTER, Site};
use crate::fixtures::{claim, gone, is_bound, wait};
use crate::harness::Binder;

const RECLAIM_STEPS: [(bool, &str); 3] = [
    (true, "controller-after-volume-deleted"),
    (true, "controller-after-pv-deleted"),
    (false, "node-after-data-deleted"),
];
const GROW_STEPS: [(bool, &str); 2] = [
    (true, "controller-after-volume-grown"),
    (false, "node-after-image-grown"),
];

#[tokio::test]
async fn killed_at_any_reclaim_step_leaks_nothing() {
    let _only = CRASH_CLUSTER.lock().await;
    let site = Site::new("crash", Binder::StowageOnly, &[]).await;
    for (in_controller, step) in RECLAIM_STEPS {
        reclaim_through_crash(&site, in_controller, step).await;
    }
}

async fn reclaim_through_crash(site: &Site, in_controller: bool, step: &'static str) {
    let armed = Armed::new(step);
    let env = armed.env();
    let (controller_env, node_env): (&[_], &[_]) = if in_controller {
        (&env, &[])
    } else {
        (&[], &env)
    };
    let (kc, node) = (&site.kubeconfig, site.node);
    let mut agent = node_agent(kc, node, &site.data, node_env, "reclaim-node");
    let mut ctl = controller(kc, controller_env, "reclaim-controller");
    let claims = site.ns.api::<PersistentVolumeClaim>();
    let uid = claim(&site.ns, step, &site.class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, step, "Bound", is_bound).await;
    assert!(site.image(&uid).exists(), "{step}: no image once Bound");

    claims.delete(step, &DeleteParams::default()).await.unwrap();
    let crash_log = if in_controller {
        armed.assert_fired(&mut ctl).await
    } else {
        armed.assert_fired(&mut agent).await
    };
    assert_left_midway(site, step, &uid).await;
    if in_controller {
        ctl = controller(kc, &[], "reclaim-controller");
    } else {
        agent = node_agent(kc, node, &site.data, &[], "reclaim-node");
    }

    let name = format!("pvc-{uid}");
    let pvs = Api::<PersistentVolume>::all(site.client.clone());
    wait(&pvs, &name, "deleted after the restart", gone).await;
    let volumes = Api::<Volume>::all(site.client.clone());
    wait(&volumes, &name, "deleted after the restart", gone).await;
    assert_eq!(
        objects_for_claim(&site.client, &uid).await,
        (0, 0),
        "{step}"
    );
    let left = files_for(&site.volumes_dir(), &uid);
    assert!(left.is_empty(), "{step}: data left behind: {left:?}");
    crash_log.assert_kept();
    ctl.stop();
    agent.stop();
}

/// What the crash at `step` left for the restarted process to finish, so
/// that the test shows the restart, not the dead process, finished it.
async fn assert_left_midway(site: &Site, step: &str, uid: &str) {
    let name = format!("pvc-{uid}");
    let pvs = Api::<PersistentVolume>::all(site.client.clone());
    let volumes = Api::<Volume>::all(site.client.clone());
    match step {
        "controller-after-volume-deleted" => {
            // The node still does its part; the PV waits for a controller.
            wait(&volumes, &name, "deleted by its node", gone).await;
            assert!(!site.image(uid).exists(), "{step}: image kept");
            let pv = pvs.get(&name).await.unwrap();
            assert!(pv.metadata.deletion_timestamp.is_none(), "{step}: {pv:?}");
        }
        "controller-after-pv-deleted" => {
            let pv = pvs.get(&name).await.unwrap();
            assert!(pv.metadata.deletion_timestamp.is_some(), "{step}: {pv:?}");
            let held = pv
                .finalizers()
                .iter()
                .any(|f| f == PV_PROVISIONER_FINALIZER);
            assert!(held, "{step}: PV without our finalizer: {pv:?}");
        }
        "node-after-data-deleted" => {
            assert!(!site.image(uid).exists(), "{step}: image kept");
            let volume = volumes.get(&name).await.unwrap();
            let held = volume.finalizers().iter().any(|f| f == VOLUME_FINALIZER);
            assert!(held, "{step}: Volume without its finalizer: {volume:?}");
        }
        other => panic!("no midway check for {other}"),
    }
}

#[tokio::test]
async fn killed_at_any_grow_step_keeps_data_and_filesystem() {
    let _only = CRASH_CLUSTER.lock().await;
    let site = Site::new("crash", Binder::StowageOnly, &[]).await;
    Api::<StorageClass>::all(site.client.clone())
        .patch(
            &site.class,
            &PatchParams::default(),
            &Patch::Merge(json!({ "allowVolumeExpansion": true })),
        )
        .await
        .unwrap();
    for (in_controller, step) in GROW_STEPS {
        grow_through_crash(&site, in_controller, step).await;
    }
}

async fn grow_through_crash(site: &Site, in_controller: bool, step: &'static str) {
    let armed = Armed::new(step);
    let env = armed.env();
    let (controller_env, node_env): (&[_], &[_]) = if in_controller {
        (&env, &[])
    } else {
        (&[], &env)
    };
    let (kc, node) = (&site.kubeconfig, site.node);
    let mut agent = node_agent(kc, node, &site.data, node_env, "grow-node");
    let mut ctl = controller(kc, controller_env, "grow-controller");
    let claims = site.ns.api::<PersistentVolumeClaim>();
    let uid = claim(&site.ns, step, &site.class, "20Mi", &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();
    wait(&claims, step, "Bound", is_bound).await;
    let image = site.image(&uid);
    write_into_image(&image, "proof", step);

    let patch = json!({ "spec": { "resources": { "requests": { "storage": "40Mi" } } } });
    claims
        .patch(step, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let crash_log = if in_controller {
        let log = armed.assert_fired(&mut ctl).await;
        assert_grow_left_midway(site, step, &uid).await;
        ctl = controller(kc, &[], "grow-controller");
        log
    } else {
        let log = armed.assert_fired(&mut agent).await;
        assert_grow_left_midway(site, step, &uid).await;
        agent = node_agent(kc, node, &site.data, &[], "grow-node");
        log
    };

    let pending = |c: Option<&PersistentVolumeClaim>| {
        let statuses = c.and_then(|c| c.status.as_ref()?.allocated_resource_statuses.as_ref());
        statuses.and_then(|s| s.get("storage")).map(String::as_str) == Some("NodeResizePending")
    };
    wait(&claims, step, "grown up to the node", pending).await;
    let name = format!("pvc-{uid}");
    let pv = Api::<PersistentVolume>::all(site.client.clone())
        .get(&name)
        .await
        .unwrap();
    assert_eq!(
        pv.spec.unwrap().capacity.unwrap()["storage"].0,
        "40Mi",
        "{step}"
    );
    let volume = Api::<Volume>::all(site.client.clone())
        .get(&name)
        .await
        .unwrap();
    let reported = volume.status.and_then(|s| s.capacity_bytes);
    assert_eq!(reported, Some(40 << 20), "{step}: Volume status");
    assert_image(&image, 40 << 20, "ext4", step);
    assert_eq!(
        read_from_image(&image, "proof"),
        step,
        "{step}: data written before"
    );
    assert_eq!(
        objects_for_claim(&site.client, &uid).await,
        (1, 1),
        "{step}"
    );
    crash_log.assert_kept();
    ctl.stop();
    agent.stop();
}

/// What the crash at `step` left of a growth from 20Mi to 40Mi, for the
/// restarted process to finish.
async fn assert_grow_left_midway(site: &Site, step: &str, uid: &str) {
    let name = format!("pvc-{uid}");
    match step {
        "controller-after-volume-grown" => {
            let pv = Api::<PersistentVolume>::all(site.client.clone())
                .get(&name)
                .await
                .unwrap();
            let capacity = pv.spec.unwrap().capacity.unwrap()["storage"].0.clone();
            assert_eq!(capacity, "20Mi", "{step}: the PV grew without a controller");
        }
        "node-after-image-grown" => {
            let len = std::fs::metadata(site.image(uid)).unwrap().len();
            assert_eq!(
                len,
                40 << 20,
                "{step}: the image was grown before the crash"
            );
            let volume = Api::<Volume>::all(site.client.clone())
                .get(&name)
                .await
                .unwrap();
            let reported = volume.status.and_then(|s| s.capacity_bytes);
            assert_eq!(
                reported,
                Some(20 << 20),
                "{step}: reported before the crash"
            );
        }
        other => panic!("no midway check for {other}"),
    }
}
