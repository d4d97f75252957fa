//! stowage in place of external-provisioner and external-attacher for a
//! driver nobody here wrote, with kube-controller-manager's attach-detach
//! controller creating the VolumeAttachments for pods on (fake) nodes.
//!
//! In `just test` the driver is Kubernetes' own CSI mock driver
//! (scripts/build-mock-driver.sh), whose ListVolumes shows what it holds and
//! to which node IDs each volume is published, so every call stowage makes
//! is checked on the driver's side too. `just test-proxy PLUGIN` runs the
//! same lifecycle against csi-driver-host-path's `hostpathplugin`.

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, VolumeAttachment};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::external_driver::ExternalDriver;
use crate::fixtures::{claim, gone, is_bound, wait, wait_for_event};
use crate::harness::{TestNamespace, bare_cluster, client_for_path};
use crate::metrics::scrape_until;
use crate::proxy_driver::{
    apply, attached_va, csi_calls, immediate_class, proxy_controller, proxy_controller_with_metrics,
};
use crate::service_accounts::controller_account;

/// What one driver's test works with.
pub struct Scene {
    pub ns: TestNamespace,
    pub driver: ExternalDriver,
    pub class: String,
    pub claims: Api<PersistentVolumeClaim>,
    pub pvs: Api<PersistentVolume>,
    pub pods: Api<Pod>,
    pub vas: Api<VolumeAttachment>,
}

impl Scene {
    pub async fn new(client: Client, driver: ExternalDriver, prefix: &str) -> Self {
        let ns = TestNamespace::new_with(client.clone(), prefix).await;
        let class = immediate_class(
            &client,
            &format!("{}-class", ns.name),
            &driver.name,
            json!({}),
        )
        .await;
        Scene {
            claims: ns.api(),
            pods: ns.api(),
            pvs: Api::all(client.clone()),
            vas: Api::all(client.clone()),
            ns,
            driver,
            class,
        }
    }

    /// What kubelet and the driver's deployment would have set up: the
    /// CSIDriver (`attachRequired`), and on each node the driver's topology
    /// label, kcm-managed attach and a CSINode listing the driver.
    pub async fn install(client: &Client, driver: &ExternalDriver, nodes: &[&str]) {
        Self::install_with_keys(client, driver, nodes, &[&driver.topology.0]).await;
    }

    /// As install, with CSINodes listing `keys` as the driver's topology
    /// keys (a CSINode's driver entry cannot change once written).
    pub async fn install_with_keys(
        client: &Client,
        driver: &ExternalDriver,
        nodes: &[&str],
        keys: &[&str],
    ) {
        apply(
            &Api::<CSIDriver>::all(client.clone()),
            json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": { "name": driver.name },
                    "spec": { "attachRequired": true, "podInfoOnMount": false } }),
        )
        .await;
        let (key, value) = &driver.topology;
        for node in nodes {
            Api::<Node>::all(client.clone())
                .patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": {
                        "labels": { key: value },
                        "annotations": { "volumes.kubernetes.io/controller-managed-attach-detach": "true" },
                    }})),
                )
                .await
                .unwrap();
            apply(
                &Api::<CSINode>::all(client.clone()),
                json!({ "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": { "name": node },
                        "spec": { "drivers": [{ "name": driver.name, "nodeID": driver.node_id, "topologyKeys": keys }] } }),
            )
            .await;
        }
    }

    /// A claim provisioned through the driver: Bound, the PV carrying the
    /// driver's handle and topology, the driver holding the volume.
    /// Returns (PV name, handle).
    pub async fn provision(&self, name: &str) -> (String, String) {
        let uid = claim(&self.ns, name, &self.class, "16Mi", &["ReadWriteOnce"])
            .await
            .uid()
            .unwrap();
        wait(&self.claims, name, "Bound", is_bound).await;
        let pv_name = format!("pvc-{uid}");
        let pv = self.pvs.get(&pv_name).await.unwrap();
        let spec = pv.spec.clone().unwrap();
        let csi = spec.csi.as_ref().unwrap();
        assert_eq!(csi.driver, self.driver.name);
        let handle = csi.volume_handle.clone();
        assert_ne!(handle, pv_name, "the driver's own volume ID");
        let affinity = serde_json::to_string(&spec.node_affinity).unwrap();
        assert!(affinity.contains(&self.driver.topology.0), "{affinity}");
        assert_eq!(
            pv.annotations()["pv.kubernetes.io/provisioned-by"],
            self.driver.name
        );
        assert!(
            self.driver.volume(&handle).await.is_some(),
            "{} does not hold {handle}",
            self.driver.name
        );
        (pv_name, handle)
    }

    /// A pod using `claim` on `node` (placed there directly: the fake nodes
    /// have no kubelet, and it tolerates their turning unreachable).
    pub async fn start_pod(&self, name: &str, node: &str, claim: &str) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "none" }],
                      "tolerations": [{ "operator": "Exists" }],
                      "volumes": [{ "name": "d", "persistentVolumeClaim": { "claimName": claim } }] },
        }))
        .unwrap();
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }

    pub async fn delete_pod(&self, name: &str) {
        self.pods
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        wait(&self.pods, name, "deleted", gone).await;
    }

    /// The VolumeAttachment kcm made for `pv` on `node`, once attached, with
    /// external-attacher's finalizer and node ID, the PV's finalizer, and
    /// the driver's record of the publish.
    pub async fn attached(&self, pv: &str, node: &str, handle: &str) -> VolumeAttachment {
        let va = attached_va(&self.vas, pv).await;
        assert_eq!(va.spec.node_name, node);
        let finalizer = self.driver.finalizer();
        assert!(va.finalizers().contains(&finalizer), "{:?}", va.metadata);
        assert_eq!(
            va.annotations()["csi.alpha.kubernetes.io/node-id"],
            self.driver.node_id
        );
        let pv = self.pvs.get(pv).await.unwrap();
        assert!(pv.finalizers().contains(&finalizer), "{:?}", pv.metadata);
        self.assert_published(handle, &[&self.driver.node_id]).await;
        va
    }

    /// The node IDs the driver itself has `handle` published to (checked
    /// where the driver shows it).
    pub async fn assert_published(&self, handle: &str, nodes: &[&str]) {
        if let Some(published) = self.driver.published_to(handle).await {
            assert_eq!(
                published, nodes,
                "{} has {handle} published to {published:?}, expected {nodes:?}",
                self.driver.name
            );
        }
    }

    /// Deletes the claim; waits for the PV to go and checks the driver let
    /// the volume go.
    pub async fn delete_claim(&self, name: &str, pv: &str, handle: &str) {
        self.claims
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        wait(&self.pvs, pv, "deleted", gone).await;
        assert!(
            self.driver.volume(handle).await.is_none(),
            "DeleteVolume never reached {}: it still holds {handle}",
            self.driver.name
        );
    }
}

/// Provision → attach (pod on the node) → detach (pod gone) → attach while
/// the driver hangs (error, then attached once it answers) → detach when the
/// Node goes → DeleteVolume → driver down (event, then Bound once back).
async fn attach_lifecycle(driver: ExternalDriver, cluster: &'static str, node: &str) {
    let kubeconfig = bare_cluster(cluster, &[node]);
    let client = client_for_path(&kubeconfig).await;
    let mut running = Some(driver.start());
    Scene::install(&client, &driver, &[node]).await;
    // As deployed: the manifests' RBAC, which the attacher's work must
    // find enough (finalizers, status, a deleted Node's attachments).
    let as_controller = controller_account(&kubeconfig, &client).await;
    let controller = proxy_controller(
        &as_controller,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        &format!("{cluster}-controller"),
    );
    let s = Scene::new(client.clone(), driver, "proxy-attach").await;
    let (pv, handle) = s.provision("data").await;
    // Immediate: CreateVolume was asked for every segment the driver runs in.
    let volume = Api::<stowage::crd::Volume>::all(client.clone())
        .get(&pv)
        .await
        .unwrap();
    let (key, value) = s.driver.topology.clone();
    assert_eq!(volume.spec.requisite_topology, vec![[(key, value)].into()]);

    // A pod on the node: kcm creates the VolumeAttachment, we attach it;
    // the pod goes: we detach, kcm deletes the VolumeAttachment.
    s.start_pod("user", node, "data").await;
    let va = s.attached(&pv, node, &handle).await;
    s.delete_pod("user").await;
    wait(&s.vas, &va.name_any(), "detached and deleted", gone).await;
    s.assert_published(&handle, &[]).await;

    hung_driver_attach(&s, running.as_ref().unwrap(), &pv, node, &handle).await;

    // The node goes while the volume is attached there: we detach it.
    let va = attached_va(&s.vas, &pv).await;
    Api::<Node>::all(client.clone())
        .delete(node, &DeleteParams::default())
        .await
        .unwrap();
    wait(&s.vas, &va.name_any(), "detached after its node went", gone).await;
    s.assert_published(&handle, &[]).await;
    s.delete_pod("hung").await;
    s.delete_claim("data", &pv, &handle).await;

    // The driver away for a while: a clear event, then recovery on its own.
    // (The node comes back first: Immediate claims need a node running the
    // driver.)
    bare_cluster(cluster, &[node]);
    Scene::install(&client, &s.driver, &[node]).await;
    drop(running.take());
    claim(&s.ns, "later", &s.class, "16Mi", &["ReadWriteOnce"]).await;
    let note = wait_for_event(&s.ns, "later", "ProvisioningFailed").await;
    assert!(note.contains("not answering"), "{note}");
    let _running = s.driver.start();
    wait(&s.claims, "later", "Bound", is_bound).await;
    let later = s.claims.get("later").await.unwrap().spec.unwrap();
    let later_pv = later.volume_name.unwrap();
    let later_handle = crate::fixtures::volume_handle(&s.ns.client, &later_pv).await;
    s.delete_claim("later", &later_pv, &later_handle).await;
    controller.stop();
}

/// A pod starts while the driver hangs (SIGSTOP, socket still there): the
/// VolumeAttachment reports the timeout; once the driver answers again it
/// is attached. Leaves pod `hung` attached.
async fn hung_driver_attach(
    s: &Scene,
    driver: &crate::external_driver::Running,
    pv: &str,
    node: &str,
    handle: &str,
) {
    driver.pause();
    s.start_pod("hung", node, "data").await;
    let va = wait_for_va(
        &s.vas,
        pv,
        "with an attachError while the driver hangs",
        |st| st.attach_error.is_some(),
    )
    .await;
    let status = va.status.unwrap();
    assert!(!status.attached, "attached while the driver hangs");
    let message = status.attach_error.unwrap().message.unwrap_or_default();
    assert!(
        message.contains("not answering"),
        "attachError names the timeout: {message}"
    );
    driver.resume();
    s.attached(pv, node, handle).await;
}

/// The first VolumeAttachment of `pv` whose status satisfies `ok`; on
/// timeout the failure says `what` was awaited and what was seen.
pub async fn wait_for_va(
    vas: &Api<VolumeAttachment>,
    pv: &str,
    what: &str,
    ok: impl Fn(&k8s_openapi::api::storage::v1::VolumeAttachmentStatus) -> bool,
) -> VolumeAttachment {
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let list = vas.list(&Default::default()).await.unwrap();
        let mine: Vec<_> = list
            .items
            .into_iter()
            .filter(|v| v.spec.source.persistent_volume_name.as_deref() == Some(pv))
            .collect();
        if let Some(va) = mine.iter().find(|v| v.status.as_ref().is_some_and(&ok)) {
            return va.clone();
        }
        let seen: Vec<_> = mine
            .iter()
            .map(|v| (&v.spec.node_name, &v.status))
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "no VolumeAttachment of {pv} {what} after {:?}; seen: {seen:?}",
            crate::fixtures::TIMEOUT
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Against Kubernetes' CSI mock driver; against csi-driver-host-path
/// instead when STOWAGE_HOSTPATHPLUGIN names a `hostpathplugin` binary
/// (`just test-proxy PATH`), which no script here can build.
#[tokio::test]
async fn provisions_attaches_detaches_and_deletes_through_an_external_driver() {
    if std::env::var_os("STOWAGE_HOSTPATHPLUGIN").is_some() {
        let driver = ExternalDriver::host_path("hp-node");
        attach_lifecycle(driver, "proxy-driver", "hp-node").await;
    } else {
        let driver = ExternalDriver::mock("mock.csi.stowage.test");
        attach_lifecycle(driver, "proxy-mock", "mock-node").await;
    }
}

/// A ReadWriteOnce volume attached on node A is not published to node B
/// while A holds it: B's VolumeAttachment gets an attachError naming A, and
/// is attached once A's is gone.
#[tokio::test]
async fn a_single_node_volume_is_not_published_to_a_second_node() {
    let (a, b) = ("mock-a", "mock-b");
    let kubeconfig = bare_cluster("proxy-mock", &[a, b]);
    let client = client_for_path(&kubeconfig).await;
    let driver = ExternalDriver::mock("rwo.mock.csi.stowage.test");
    let _running = driver.start();
    // The mock has one node ID, its name: both CSINodes carry it, so the
    // driver itself would take a publish to B. Only stowage can refuse.
    Scene::install(&client, &driver, &[a, b]).await;
    let controller = proxy_controller(
        &kubeconfig,
        &driver.name,
        &driver.socket,
        &["--serve-local=false"],
        "proxy-rwo-controller",
    );
    let s = Scene::new(client.clone(), driver, "proxy-rwo").await;
    let (pv, handle) = s.provision("data").await;
    s.start_pod("on-a", a, "data").await;
    let on_a = s.attached(&pv, a, &handle).await;

    // kcm's attach-detach controller would not ask (Multi-Attach error on the
    // pod); a second one, or any client, can: write B's VolumeAttachment.
    let on_b = format!("{}-on-b", s.ns.name);
    apply(
        &s.vas,
        json!({ "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": { "name": on_b },
                "spec": { "attacher": s.driver.name, "nodeName": b, "source": { "persistentVolumeName": pv } } }),
    )
    .await;
    let answered = |v: Option<&VolumeAttachment>| {
        v.and_then(|v| v.status.as_ref())
            .is_some_and(|s| s.attached || s.attach_error.is_some())
    };
    let status = wait(&s.vas, &on_b, "answered", answered)
        .await
        .and_then(|v| v.status)
        .unwrap();
    assert!(!status.attached, "published to {b} while attached on {a}");
    let message = status.attach_error.unwrap().message.unwrap_or_default();
    assert!(
        message.contains(&format!("attached to node {a}")),
        "attachError names the node holding the volume: {message}"
    );

    // A lets go: B's VolumeAttachment goes through on its own.
    s.delete_pod("on-a").await;
    wait(&s.vas, &on_a.name_any(), "detached and deleted", gone).await;
    let attached = |v: Option<&VolumeAttachment>| {
        v.and_then(|v| v.status.as_ref())
            .is_some_and(|s| s.attached)
    };
    wait(&s.vas, &on_b, "attached once A let go", attached).await;
    s.vas.delete(&on_b, &DeleteParams::default()).await.unwrap();
    wait(&s.vas, &on_b, "detached and deleted", gone).await;
    s.assert_published(&handle, &[]).await;
    s.delete_claim("data", &pv, &handle).await;
    static_pv_goes_through_delete_volume(&s).await;
    controller.stop();
}

/// The driver forgets an attached volume's publication behind Kubernetes'
/// back (a ControllerUnpublishVolume straight to its socket): within
/// `--attach-reconcile-interval` stowage sees it in ListVolumes, marks the
/// VolumeAttachment detached with a `VolumeNotPublished` event, and the
/// attach job publishes the volume again, as external-attacher's reconcile
/// does. The pod never moved; the VolumeAttachment is the same object.
/// Then the other way: a VolumeAttachment detached and kept by another
/// finalizer, whose volume the driver shows published again, gets a
/// `VolumeStillPublished` event and the volume unpublished again.
#[tokio::test]
async fn a_publication_the_driver_lost_is_published_again() {
    let node = "mock-drift";
    let kubeconfig = bare_cluster("proxy-mock", &[node]);
    let client = client_for_path(&kubeconfig).await;
    let driver = ExternalDriver::mock("drift.mock.csi.stowage.test");
    let _running = driver.start();
    Scene::install(&client, &driver, &[node]).await;
    let as_controller = controller_account(&kubeconfig, &client).await;
    let (controller, metrics) = proxy_controller_with_metrics(
        &as_controller,
        &driver.name,
        &driver.socket,
        &["--serve-local=false", "--attach-reconcile-interval=2s"],
        "proxy-drift-controller",
    );
    let s = Scene::new(client.clone(), driver, "proxy-drift").await;
    let (pv, handle) = s.provision("data").await;
    s.start_pod("user", node, "data").await;
    let va = s.attached(&pv, node, &handle).await;

    s.driver.unpublish(&handle, &s.driver.node_id).await;
    let lost = std::time::Instant::now();
    let node_id = s.driver.node_id.clone();
    loop {
        if s.driver.published_to(&handle).await == Some(vec![node_id.clone()]) {
            break;
        }
        assert!(
            lost.elapsed() < std::time::Duration::from_secs(30),
            "{handle} not published to {node_id} again 30s after the driver lost it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let again = attached_va(&s.vas, &pv).await;
    assert_eq!(again.uid(), va.uid(), "the same VolumeAttachment");
    let noted = va_event(&client, &va.name_any(), "VolumeNotPublished").await;
    assert!(noted.contains(&handle) && noted.contains(node), "{noted}");
    scrape_until(
        &metrics,
        &csi_calls(&s.driver.name, "Controller/ListVolumes", "OK"),
        |n| n >= 2.0,
    )
    .await;
    scrape_until(
        &metrics,
        "stowage_reconciles_total{job=\"attach_drift\"}",
        |n| n >= 2.0,
    )
    .await;

    // Someone else's finalizer keeps the VolumeAttachment after we let it
    // go; a publication the driver then shows for it is undone again.
    let hold = "stowage.test/hold";
    let mut finalizers = again.finalizers().to_vec();
    finalizers.push(hold.into());
    s.vas
        .patch(
            &va.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": finalizers } })),
        )
        .await
        .unwrap();
    s.delete_pod("user").await;
    let let_go =
        |v: Option<&VolumeAttachment>| v.is_some_and(|v| v.finalizers() == [hold.to_string()]);
    wait(
        &s.vas,
        &va.name_any(),
        "detached, held by the other finalizer",
        let_go,
    )
    .await;
    s.assert_published(&handle, &[]).await;
    s.driver.publish(&handle, &node_id).await;
    let noted = va_event(&client, &va.name_any(), "VolumeStillPublished").await;
    assert!(noted.contains(&handle) && noted.contains(node), "{noted}");
    let unpublished = std::time::Instant::now();
    while s.driver.published_to(&handle).await != Some(vec![]) {
        assert!(
            unpublished.elapsed() < std::time::Duration::from_secs(30),
            "{handle} still published to {node_id} 30s after the event"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let cleared = |v: Option<&VolumeAttachment>| {
        v.and_then(|v| v.status.as_ref())
            .is_some_and(|s| !s.attached && s.detach_error.is_none())
    };
    wait(&s.vas, &va.name_any(), "detached, no detachError", cleared).await;
    s.vas
        .patch(
            &va.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
        )
        .await
        .unwrap();
    wait(&s.vas, &va.name_any(), "deleted", gone).await;
    s.delete_claim("data", &pv, &handle).await;
    controller.stop();
}

/// The note of the event `reason` about VolumeAttachment `va` (in
/// `default`, where events about cluster-scoped objects go), once posted.
async fn va_event(client: &Client, va: &str, reason: &str) -> String {
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), "default");
    let deadline = tokio::time::Instant::now() + crate::fixtures::TIMEOUT;
    loop {
        let list = events.list(&Default::default()).await.unwrap();
        let note = list
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(va))
            .find(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.note.unwrap_or_default());
        if let Some(note) = note {
            return note;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event on VolumeAttachment {va}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A PV external-provisioner made before stowage took over (its annotation,
/// reclaim Delete, no Volume of ours): once its claim is gone the volume is
/// deleted in the driver by its handle, then the PV goes, as upstream does.
async fn static_pv_goes_through_delete_volume(s: &Scene) {
    let name = format!("{}-inherited", s.ns.name);
    let handle = s.driver.create_volume(&name).await;
    apply(
        &s.pvs,
        json!({ "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": { "name": name, "annotations": { "pv.kubernetes.io/provisioned-by": s.driver.name } },
                "spec": { "capacity": { "storage": "16Mi" }, "accessModes": ["ReadWriteOnce"],
                          "persistentVolumeReclaimPolicy": "Delete", "storageClassName": s.class,
                          "claimRef": { "namespace": s.ns.name, "name": "long-gone", "uid": "00000000-0000-0000-0000-000000000001" },
                          "csi": { "driver": s.driver.name, "volumeHandle": handle } } }),
    )
    .await;
    wait(&s.pvs, &name, "deleted", gone).await;
    assert!(
        s.driver.volume(&handle).await.is_none(),
        "the PV went but {} still holds {handle}: leaked",
        s.driver.name
    );
}
