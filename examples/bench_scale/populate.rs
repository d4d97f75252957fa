//! bench_scale's pre-population: claims, PVs and Volumes written through the
//! API before the controller starts, in the state each provisioner and the
//! binder would have left them, so the controller has everything to index
//! and nothing to do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use stowage::controller::cached_claim::Claim;
use stowage::controller::protocol::*;

use crate::common::agent_node;
use stowage::crd::{
    AccessMode, ClaimReference, NODE_LABEL, ReclaimPolicy, VOLUME_FINALIZER, Volume, VolumeMode,
    VolumeSpec,
};

/// stowage's pre-populated claims and their class (Immediate, like the new ones).
pub const OWN: &str = "scale-own";
/// Another driver's claims and their class.
pub const OTHER: &str = "scale-other";
pub const OTHER_DRIVER: &str = "other.example.com";
/// Where the new claims go, each run.
pub const NEW: &str = "scale-new";
const LOCAL_DRIVER: &str = "local.stowage.dev";
/// Creates in flight: enough to keep the API server and etcd busy on two
/// cores without queueing thousands of requests in the client.
const IN_FLIGHT: usize = 64;
const SIZE: &str = "1Gi";
const SIZE_BYTES: i64 = 1 << 30;

pub struct Populated {
    pub claims: usize,
    pub pvs: usize,
    pub volumes: usize,
    pub attachments: usize,
    /// Requests this program made (creates, patches, status patches).
    pub writes: usize,
    pub secs: f64,
}

impl Populated {
    pub fn objects(&self) -> usize {
        self.claims + self.pvs + self.volumes + self.attachments
    }
}

fn own_class() -> StorageClass {
    class(OWN, LOCAL_DRIVER)
}

fn class(name: &str, provisioner: &str) -> StorageClass {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "provisioner": provisioner,
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Delete",
        "parameters": { "layout": "dir" },
    }))
    .expect("StorageClass literal")
}

/// Namespaces and classes for the pre-populated and the new claims.
pub async fn namespaces_and_classes(client: &Client) -> anyhow::Result<()> {
    // stowage-system as the install makes it: the controller publishes
    // its CSIStorageCapacity objects there.
    for name in [OWN, OTHER, NEW, "stowage-system"] {
        let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
    }
    let classes = Api::<StorageClass>::all(client.clone());
    for sc in [
        own_class(),
        class(OTHER, OTHER_DRIVER),
        class(NEW, LOCAL_DRIVER),
    ] {
        classes.create(&PostParams::default(), &sc).await?;
    }
    Ok(())
}

/// `n` claims, every other one stowage's (with its Volume), the rest
/// another driver's, each with its PV and bound; VolumeAttachments of the
/// other attacher for n/10 of the other driver's PVs.
pub async fn run(client: &Client, n: usize, nodes: usize) -> anyhow::Result<Populated> {
    let start = Instant::now();
    let done = AtomicUsize::new(0);
    let writes: usize = futures::stream::iter(0..n)
        .map(|i| {
            let done = &done;
            async move {
                let writes = one_claim(client, i, n, nodes)
                    .await
                    .with_context(|| format!("populating claim {i}"))?;
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if finished.is_multiple_of((n / 10).max(1)) {
                    let secs = start.elapsed().as_secs_f64();
                    eprintln!("populated {finished}/{n} claims in {secs:.0} s");
                }
                anyhow::Ok(writes)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_fold(0, |sum, w| async move { Ok(sum + w) })
        .await?;
    let own = n.div_ceil(2);
    Ok(Populated {
        claims: n,
        pvs: n,
        volumes: own,
        attachments: attachments(n),
        writes,
        secs: start.elapsed().as_secs_f64(),
    })
}

fn attachments(n: usize) -> usize {
    (n / 10).min(n / 2)
}

/// One claim, bound to its PV, in the order stowage and kcm's binder write
/// them: claim, (Volume, Ready), PV, PV Bound, claim's volumeName, claim
/// Bound. The claim names its PV only once the PV exists, or the binder
/// would mark it Lost. Returns the writes made.
async fn one_claim(client: &Client, i: usize, n: usize, nodes: usize) -> anyhow::Result<usize> {
    let own = i.is_multiple_of(2);
    let (ns, driver) = if own {
        (OWN, LOCAL_DRIVER)
    } else {
        (OTHER, OTHER_DRIVER)
    };
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": format!("{ns}-{i:06}"), "annotations": {
            ANN_STORAGE_PROVISIONER: driver, ANN_BETA_STORAGE_PROVISIONER: driver } },
        "spec": { "storageClassName": ns, "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": SIZE } } },
    }))?;
    let claim = claims.create(&PostParams::default(), &claim).await?;
    let mut writes = 1;
    let pv = if own {
        let volume = ready_volume(client, &claim, &agent_node(i / 2 % nodes)).await?;
        writes += 2;
        let cached = Claim::from(&claim);
        stowage::controller::provision::desired_pv(&cached, &own_class(), &volume)
    } else {
        other_pv(&claim, i)?
    };
    let pv_name = pv.name_any();
    let pvs = Api::<PersistentVolume>::all(client.clone());
    pvs.create(&PostParams::default(), &pv).await?;
    patch_status(&pvs, &pv_name, json!({ "phase": "Bound" })).await?;
    let bind = json!({
        "metadata": { "annotations": { ANN_BIND_COMPLETED: "yes", ANN_BOUND_BY_CONTROLLER: "yes" } },
        "spec": { "volumeName": pv_name },
    });
    claims
        .patch(
            &claim.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&bind),
        )
        .await?;
    let bound = json!({ "phase": "Bound", "accessModes": ["ReadWriteOnce"],
                        "capacity": { "storage": SIZE } });
    patch_status(&claims, &claim.name_any(), bound).await?;
    writes += 4;
    if !own && i / 2 < attachments(n) {
        attach(client, &pv_name, i).await?;
        writes += 2;
    }
    Ok(writes)
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value) -> anyhow::Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({ "status": status });
    Ok(api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

/// The Volume stowage writes for the claim, with the status its node agent
/// reports once the data exists.
async fn ready_volume(
    client: &Client,
    claim: &PersistentVolumeClaim,
    node: &str,
) -> anyhow::Result<Volume> {
    let name = format!("pvc-{}", claim.uid().unwrap_or_default());
    let mut volume = Volume::new(
        &name,
        VolumeSpec {
            driver: LOCAL_DRIVER.to_string(),
            parameters: [("layout".to_string(), "dir".to_string())].into(),
            capacity_bytes: SIZE_BYTES,
            access_modes: vec![AccessMode::ReadWriteOnce],
            volume_mode: VolumeMode::Filesystem,
            node: Some(node.to_string()),
            requisite_topology: Vec::new(),
            preferred_topology: Vec::new(),
            mount_options: Vec::new(),
            source: None,
            claim: Some(ClaimReference {
                namespace: claim.namespace().unwrap_or_default(),
                name: claim.name_any(),
                uid: claim.uid().unwrap_or_default(),
            }),
            persistent_volume_name: Some(name.clone()),
            reclaim_policy: ReclaimPolicy::Delete,
            volume_attributes_class_name: None,
            mutable_parameters: Default::default(),
        },
    );
    volume.metadata.finalizers = Some(vec![VOLUME_FINALIZER.to_string()]);
    volume.metadata.labels = Some([(NODE_LABEL.to_string(), node.to_string())].into());
    let volumes = Api::<Volume>::all(client.clone());
    let created = volumes.create(&PostParams::default(), &volume).await?;
    let generation = created.metadata.generation;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({
        "phase": "Ready", "observedGeneration": generation,
        "capacityBytes": SIZE_BYTES, "volumeHandle": name,
        "conditions": [{ "type": "Ready", "status": "True", "reason": "Created",
            "message": format!("{SIZE_BYTES} bytes on node {node}"),
            "lastTransitionTime": now, "observedGeneration": generation }],
    });
    patch_status(&volumes, &name, status).await
}

/// The PV external-provisioner would have made for another CSI driver.
fn other_pv(claim: &PersistentVolumeClaim, i: usize) -> anyhow::Result<PersistentVolume> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("pvc-{}", claim.uid().unwrap_or_default()),
            "annotations": { ANN_PROVISIONED_BY: OTHER_DRIVER },
            "finalizers": [PV_PROVISIONER_FINALIZER],
        },
        "spec": {
            "capacity": { "storage": SIZE },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": OTHER,
            "volumeMode": "Filesystem",
            "claimRef": { "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(), "name": claim.name_any(), "uid": claim.uid() },
            "csi": { "driver": OTHER_DRIVER, "volumeHandle": format!("other-{i}"), "fsType": "ext4" },
        },
    }))?)
}

/// A VolumeAttachment the other driver's attacher has attached.
async fn attach(client: &Client, pv: &str, i: usize) -> anyhow::Result<()> {
    let name = format!("va-other-{i:06}");
    let va: VolumeAttachment = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "attacher": OTHER_DRIVER, "nodeName": format!("other-node-{}", i % 8),
                  "source": { "persistentVolumeName": pv } },
    }))?;
    let vas = Api::<VolumeAttachment>::all(client.clone());
    vas.create(&PostParams::default(), &va).await?;
    patch_status(&vas, &name, json!({ "attached": true })).await?;
    Ok(())
}
