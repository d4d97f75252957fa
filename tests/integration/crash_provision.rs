//! The controller or node agent dies at every step between "Volume written"
//! and "claim Bound", with kube-controller-manager's PV binder off and on;
//! after a restart the claim is bound with exactly one Volume, one PV and
//! one image of the requested size and filesystem.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::{Client, ResourceExt};
use stowage::controller::protocol::ANN_STORAGE_PROVISIONER;

use crate::crash::{Armed, assert_image, controller, files_for, node_agent, objects_for_claim};
use crate::fixtures::{claim, is_bound, storage_class, wait};
use crate::harness::{Binder, TestNamespace, bare_cluster_of, client_for_path, unique_name};

/// Only one test at a time may run stowage on the "crash" control plane:
/// two controllers would both act on every claim.
pub static CRASH_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
pub const CRASH_NODE: &str = "crash-node";

/// (crashing process is the controller, failpoint)
const PROVISION_STEPS: [(bool, &str); 7] = [
    (true, "controller-after-volume-created"),
    (true, "controller-before-pv-created"),
    (true, "controller-after-pv-created"),
    (true, "controller-after-pv-bound"),
    (true, "controller-after-claim-volume-name"),
    (false, "node-after-image-sized"),
    (false, "node-after-mkfs"),
];
const NODE_REPORT_STEP: (bool, &str) = (false, "node-before-ready-reported");
/// kcm's binder binds our PV within stowage's grace period, so stowage's
/// own binding steps (after-pv-bound, after-claim-volume-name) are not
/// reached with it on.
const KCM_BINDS: [&str; 2] = [
    "controller-after-pv-bound",
    "controller-after-claim-volume-name",
];

/// One control plane, node and StorageClass for a run of crash cases.
pub struct Site {
    pub kubeconfig: crate::harness::BareCluster,
    pub client: Client,
    pub ns: TestNamespace,
    pub class: String,
    pub data: PathBuf,
    pub node: &'static str,
    pub binder: Binder,
}

impl Site {
    pub async fn new(cluster: &'static str, binder: Binder, params: &[(&str, &str)]) -> Self {
        let kubeconfig = bare_cluster_of(cluster, &[CRASH_NODE], binder);
        let client = client_for_path(&kubeconfig).await;
        let ns = TestNamespace::new_with(client.clone(), cluster).await;
        let class = format!("{}-c", ns.name);
        storage_class(&client, &class, "Immediate", "Delete", params).await;
        let data = std::env::temp_dir().join(unique_name("stowage-crash-data"));
        Site {
            kubeconfig,
            client,
            ns,
            class,
            data,
            node: CRASH_NODE,
            binder,
        }
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.data.join("volumes")
    }

    pub fn image(&self, uid: &str) -> PathBuf {
        self.volumes_dir().join(format!("pvc-{uid}.img"))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

#[tokio::test]
async fn killed_at_any_step_provisions_exactly_once() {
    let _only = CRASH_CLUSTER.lock().await;
    let site = Site::new("crash", Binder::StowageOnly, &[]).await;
    let steps = PROVISION_STEPS.iter().chain([&NODE_REPORT_STEP]);
    for &(in_controller, step) in steps {
        // 20000Ki is not a whole MiB: the image is rounded up to 20Mi.
        provision_through_crash(&site, in_controller, step, "20000Ki", 20 << 20, "ext4").await;
    }
}

#[tokio::test]
async fn killed_at_any_provisioning_step_with_kcm_binder_provisions_exactly_once() {
    let site = Site::new("crash-kcm", Binder::Kcm, &[("fsType", "xfs")]).await;
    let steps = PROVISION_STEPS
        .iter()
        .chain([&NODE_REPORT_STEP])
        .filter(|(_, s)| !KCM_BINDS.contains(s));
    for &(in_controller, step) in steps {
        // 307000Ki rounds up to 300Mi, xfs's smallest.
        provision_through_crash(&site, in_controller, step, "307000Ki", 300 << 20, "xfs").await;
    }
}

/// Crashes one process at `step` while provisioning a claim of `size`,
/// restarts it, and checks the result.
async fn provision_through_crash(
    site: &Site,
    in_controller: bool,
    step: &'static str,
    size: &str,
    image_bytes: u64,
    fs: &str,
) {
    let armed = Armed::new(step);
    let env = armed.env();
    let (controller_env, node_env): (&[_], &[_]) = if in_controller {
        (&env, &[])
    } else {
        (&[], &env)
    };
    let (kc, node) = (&site.kubeconfig, site.node);
    let mut agent = node_agent(kc, node, &site.data, node_env, "crash-node");
    let mut ctl = controller(kc, controller_env, "crash-controller");
    let uid = claim(&site.ns, step, &site.class, size, &["ReadWriteOnce"])
        .await
        .uid()
        .unwrap();

    let crash_log = if in_controller {
        let log = armed.assert_fired(&mut ctl).await;
        ctl = controller(kc, &[], "crash-controller");
        log
    } else {
        let log = armed.assert_fired(&mut agent).await;
        agent = node_agent(kc, node, &site.data, &[], "crash-node");
        log
    };
    let claims = site.ns.api::<PersistentVolumeClaim>();
    let bound = wait(&claims, step, "Bound after the restart", is_bound).await;
    // kcm's binder marks the claims it works on: the mode under test is the
    // one this cluster runs.
    let marked = bound
        .unwrap()
        .annotations()
        .contains_key(ANN_STORAGE_PROVISIONER);
    assert_eq!(
        marked,
        site.binder == Binder::Kcm,
        "{step}: kcm's binder mark"
    );
    assert_provisioned_once(site, step, &uid, image_bytes, fs).await;
    crash_log.assert_kept();
    ctl.stop();
    agent.stop();
}

/// Exactly one Volume, PV and image for the claim, and the image is whole.
pub async fn assert_provisioned_once(site: &Site, step: &str, uid: &str, bytes: u64, fs: &str) {
    let (volumes, pvs) = objects_for_claim(&site.client, uid).await;
    assert_eq!(volumes, 1, "{step}: Volumes for the claim");
    assert_eq!(pvs, 1, "{step}: PVs for the claim");
    assert_eq!(
        files_for(&site.volumes_dir(), uid),
        [format!("pvc-{uid}.img")],
        "{step}: files for the claim"
    );
    assert_image(&site.image(uid), bytes, fs, step);
}
