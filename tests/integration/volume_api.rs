//! The Volume CRD as the API server sees it: installed, stored, validated.

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stowage::crd::{Volume, VolumePhase};

use crate::harness::{self, install_crds, unique_name};

/// A Volume no claim refers to and no node agent is labelled for, so that
/// only the API server acts on it.
fn volume_json(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "stowage.dev/v1alpha1",
        "kind": "Volume",
        "metadata": { "name": name },
        "spec": {
            "driver": "local.stowage.dev",
            "capacityBytes": 1_048_576,
            "accessModes": ["ReadWriteOnce"],
            "node": "node-a",
            "parameters": { "fsType": "xfs" },
        }
    })
}

async fn create_raw(api: &Api<Volume>, body: serde_json::Value) -> Result<Volume, kube::Error> {
    let volume: Volume = serde_json::from_value(body).map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &volume).await
}

/// Sends the JSON as-is, so that values our Rust types would refuse to build
/// still reach the API server's validation.
async fn create_unchecked(api: &Api<Volume>, name: &str, spec: serde_json::Value) -> kube::Error {
    let body = json!({
        "apiVersion": "stowage.dev/v1alpha1", "kind": "Volume",
        "metadata": { "name": name }, "spec": spec,
    });
    let patch = PatchParams::apply("stowage-tests");
    api.patch(name, &patch, &Patch::Apply(&body))
        .await
        .expect_err("the API server accepted an invalid Volume")
}

fn rejection_message(err: kube::Error) -> String {
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message
        }
        other => panic!("expected an API rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn crds_are_installed_and_established_through_the_api() {
    let client = harness::client().await;
    let crds = install_crds(&client).await;
    let names: Vec<_> = crds.iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["volumes.stowage.dev", "storagenodes.stowage.dev"]);
    let crd = &crds[0];
    assert_eq!(crd.spec.scope, "Cluster");
    assert!(
        crd.spec
            .versions
            .iter()
            .any(|v| v.name == "v1alpha1" && v.served && v.storage)
    );
    // The API serves the new kind: listing works.
    Api::<Volume>::all(client)
        .list(&Default::default())
        .await
        .expect("listing Volumes");
}

#[tokio::test]
async fn volume_create_read_status_update_delete() {
    let client = harness::client().await;
    install_crds(&client).await;
    let api = Api::<Volume>::all(client);
    let name = unique_name("vol");

    let mut body = volume_json(&name);
    body["metadata"]["finalizers"] = json!([stowage::crd::VOLUME_FINALIZER]);
    let created = create_raw(&api, body).await.expect("creating Volume");
    assert_eq!(created.spec.capacity_bytes, 1_048_576);
    assert_eq!(created.spec.parameters["fsType"], "xfs");
    assert_eq!(created.metadata.generation, Some(1));

    // Status goes through the status subresource and leaves spec alone.
    let status = json!({ "status": {
        "phase": "Ready",
        "observedGeneration": 1,
        "capacityBytes": 1_048_576,
        "volumeHandle": name,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "Created",
            "message": "image file formatted xfs",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }],
    }});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patching status");
    let read = api.get(&name).await.expect("reading Volume");
    let st = read.status.as_ref().expect("status stored");
    assert_eq!(st.phase, VolumePhase::Ready);
    assert_eq!(st.conditions[0].message, "image file formatted xfs");
    assert_eq!(
        read.metadata.generation,
        Some(1),
        "status must not bump generation"
    );

    // Growing is allowed and bumps the generation.
    let grow = json!({ "spec": { "capacityBytes": 2_097_152 } });
    let grown = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .expect("growing Volume");
    assert_eq!(grown.spec.capacity_bytes, 2_097_152);
    assert_eq!(grown.metadata.generation, Some(2));

    // The finalizer holds the object until it is removed.
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("deleting Volume");
    let held = api.get(&name).await.expect("finalizer keeps the Volume");
    assert!(held.metadata.deletion_timestamp.is_some());
    let release = json!({ "metadata": { "finalizers": null } });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&release))
        .await
        .expect("removing finalizer");
    assert!(
        api.get_opt(&name).await.expect("reading").is_none(),
        "Volume still there"
    );
}

#[tokio::test]
async fn api_server_rejects_invalid_volumes_naming_the_field() {
    let client = harness::client().await;
    install_crds(&client).await;
    let api = Api::<Volume>::all(client);
    let base = volume_json("x")["spec"].clone();

    let mut zero = base.clone();
    zero["capacityBytes"] = json!(0);
    let msg = rejection_message(create_unchecked(&api, &unique_name("zero"), zero).await);
    assert!(msg.contains("spec.capacityBytes"), "{msg}");

    let mut mode = base.clone();
    mode["accessModes"] = json!(["ReadWriteSometimes"]);
    let msg = rejection_message(create_unchecked(&api, &unique_name("mode"), mode).await);
    assert!(msg.contains("spec.accessModes[0]"), "{msg}");
    assert!(
        msg.contains("ReadWriteOnce"),
        "message should list the valid values: {msg}"
    );

    let mut driver = base.clone();
    driver["driver"] = json!("Not A Driver!");
    let msg = rejection_message(create_unchecked(&api, &unique_name("drv"), driver).await);
    assert!(msg.contains("spec.driver"), "{msg}");

    let mut missing = base;
    missing.as_object_mut().unwrap().remove("accessModes");
    let msg = rejection_message(create_unchecked(&api, &unique_name("miss"), missing).await);
    assert!(msg.contains("spec.accessModes"), "{msg}");
}

#[tokio::test]
async fn api_server_refuses_to_move_or_shrink_a_volume() {
    let client = harness::client().await;
    install_crds(&client).await;
    let api = Api::<Volume>::all(client);
    let name = unique_name("immut");
    create_raw(&api, volume_json(&name))
        .await
        .expect("creating Volume");

    let patch = |spec: serde_json::Value| {
        let api = api.clone();
        let name = name.clone();
        async move {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .expect_err("the API server accepted a forbidden change")
        }
    };
    let msg = rejection_message(patch(json!({ "node": "node-b" })).await);
    assert!(
        msg.contains("spec.node") && msg.contains("node is immutable"),
        "{msg}"
    );
    let msg = rejection_message(patch(json!({ "driver": "other.stowage.dev" })).await);
    assert!(
        msg.contains("spec.driver") && msg.contains("driver is immutable"),
        "{msg}"
    );
    let msg = rejection_message(patch(json!({ "capacityBytes": 1024 })).await);
    assert!(
        msg.contains("spec.capacityBytes") && msg.contains("cannot shrink"),
        "{msg}"
    );
    // A field rule alone does not run when the field is removed (and a
    // second write could then add another value): the rules are on spec.
    let json_patch = |ops: serde_json::Value| {
        let api = api.clone();
        let name = name.clone();
        async move {
            let ops = serde_json::from_value(ops).unwrap();
            api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(ops))
                .await
                .expect_err("the API server accepted a forbidden change")
        }
    };
    let msg =
        rejection_message(json_patch(json!([{ "op": "remove", "path": "/spec/node" }])).await);
    assert!(
        msg.contains("spec.node") && msg.contains("node is immutable"),
        "{msg}"
    );
    for (field, ops) in [
        (
            "parameters",
            json!([{ "op": "remove", "path": "/spec/parameters" }]),
        ),
        (
            "parameters",
            json!([{ "op": "add", "path": "/spec/parameters/csi.storage.k8s.io~1node-stage-secret-name", "value": "x" }]),
        ),
        (
            "claim",
            json!([{ "op": "add", "path": "/spec/claim", "value": { "namespace": "a", "name": "b", "uid": "c" } }]),
        ),
        (
            "persistentVolumeName",
            json!([{ "op": "add", "path": "/spec/persistentVolumeName", "value": "pv-other" }]),
        ),
        (
            "source",
            json!([{ "op": "add", "path": "/spec/source", "value": { "volume": "other" } }]),
        ),
        // What CreateVolume asks is fixed once the Volume is written.
        (
            "preferredTopology",
            json!([{ "op": "add", "path": "/spec/preferredTopology", "value": [{ "zone": "b" }] }]),
        ),
        (
            "mountOptions",
            json!([{ "op": "add", "path": "/spec/mountOptions", "value": ["noatime"] }]),
        ),
    ] {
        let msg = rejection_message(json_patch(ops).await);
        assert!(
            msg.contains(&format!("spec.{field}")) && msg.contains("is immutable"),
            "{msg}"
        );
    }
    let kept = api.get(&name).await.unwrap();
    assert_eq!(kept.spec.node.as_deref(), Some("node-a"));
    assert_eq!(kept.spec.claim, None);

    api.delete(&name, &DeleteParams::default())
        .await
        .expect("deleting Volume");
}
