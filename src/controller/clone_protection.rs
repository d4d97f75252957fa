//! external-provisioner's cloning protection: a claim being cloned keeps
//! `provisioner.storage.kubernetes.io/cloning-protection` (added by
//! provisioning before the clone's Volume is written) until it is deleted
//! and no claim of its namespace still waits (Pending) to be cloned from it.

use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::informer::Informers;
use super::job::{Job, JobRun, Retry};
use super::provision::source::{CLONE_FINALIZER, KIND_CLAIM};
use super::{Context, Error};
use crate::kubeapi;

pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let claims = informers.claims.subscribe();
    let clones = informers.claims.subscribe();
    // A clone that stops waiting may free its source.
    let controller = Controller::for_shared_stream(claims, ctx.stores.claims.clone())
        .watches_shared_stream(clones, |c| {
            let name = cloned_from(&c)?;
            Some(ObjectRef::new(&name).within(&c.namespace()?))
        });
    let job = Job {
        name: "clone_protection",
        retry: Retry::BackoffUnlessGone,
    };
    job.run(controller, reconcile, ctx)
}

/// The claim a claim is cloned from, if it is a clone.
fn cloned_from(claim: &PersistentVolumeClaim) -> Option<String> {
    let source = claim.spec.as_ref()?.data_source.as_ref()?;
    (source.kind == KIND_CLAIM && source.api_group.as_deref().unwrap_or_default().is_empty())
        .then(|| source.name.clone())
}

/// Whether a claim of `namespace` still waits to be cloned from `name`.
pub fn clone_pending<'a>(
    claims: impl IntoIterator<Item = &'a PersistentVolumeClaim>,
    namespace: &str,
    name: &str,
) -> bool {
    claims.into_iter().any(|c| {
        c.namespace().as_deref() == Some(namespace)
            && cloned_from(c).as_deref() == Some(name)
            && c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
    })
}

async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action, Error> {
    let held = claim.finalizers().iter().any(|f| f == CLONE_FINALIZER);
    if claim.metadata.deletion_timestamp.is_none() || !held {
        return Ok(Action::await_change());
    }
    let namespace = claim.namespace().unwrap_or_default();
    let all = ctx.stores.claims.state();
    if clone_pending(
        all.iter().map(|c| c.as_ref()),
        &namespace,
        &claim.name_any(),
    ) {
        tracing::info!(claim = %format!("{namespace}/{}", claim.name_any()), "cloning in progress: the claim stays until its clones are provisioned");
        return Ok(Action::await_change());
    }
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    kubeapi::remove_finalizer(&api, claim.as_ref(), CLONE_FINALIZER).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(
        name: &str,
        namespace: &str,
        phase: &str,
        source: Option<&str>,
    ) -> PersistentVolumeClaim {
        let data_source = source.map(|s| json!({ "kind": "PersistentVolumeClaim", "name": s }));
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": namespace },
            "spec": { "dataSource": data_source },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    #[test]
    fn only_a_pending_clone_in_the_same_namespace_holds_its_source() {
        let pending = claim("c", "ns", "Pending", Some("src"));
        let bound = claim("c", "ns", "Bound", Some("src"));
        let elsewhere = claim("c", "other", "Pending", Some("src"));
        let unrelated = claim("c", "ns", "Pending", Some("another"));
        assert!(clone_pending([&pending], "ns", "src"));
        assert!(!clone_pending(
            [&bound, &elsewhere, &unrelated],
            "ns",
            "src"
        ));
        assert_eq!(cloned_from(&claim("x", "ns", "Pending", None)), None);
    }
}
