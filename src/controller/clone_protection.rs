//! external-provisioner's cloning protection: a claim being cloned keeps
//! `provisioner.storage.kubernetes.io/cloning-protection` (added by
//! provisioning before the clone's Volume is written) until it is deleted
//! and no claim still waits (Pending) to be cloned from it: one of its
//! namespace, or of another through a `dataSourceRef` naming its namespace.

use std::sync::Arc;

use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::informer::Informers;
use super::job::{Job, JobRun, Retry};
use super::provision::source::{CLONE_FINALIZER, KIND_CLAIM, requested};
use super::{Context, Error};
use crate::controller::cached_claim::Claim;
use crate::kubeapi;

pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    let claims = informers.claims.subscribe();
    let clones = informers.claims.subscribe();
    // A clone that stops waiting may free its source.
    let controller = Controller::for_shared_stream(claims, ctx.stores.claims.clone())
        .watches_shared_stream(clones, |c| {
            let (namespace, name) = cloned_from(&c)?;
            Some(ObjectRef::new(&name).within(&namespace))
        });
    let job = Job {
        name: "clone_protection",
        retry: Retry::BackoffUnlessGone,
    };
    job.run(controller, reconcile, ctx)
}

/// The claim (namespace, name) a claim is cloned from, if it is a clone.
fn cloned_from(claim: &Claim) -> Option<(String, String)> {
    let source = requested(claim)?;
    (source.kind == KIND_CLAIM && source.api_group.is_empty())
        .then_some((source.namespace, source.name))
}

/// Whether a claim still waits to be cloned from `namespace`/`name`.
pub fn clone_pending<'a>(
    claims: impl IntoIterator<Item = &'a Claim>,
    namespace: &str,
    name: &str,
) -> bool {
    claims.into_iter().any(|c| {
        cloned_from(c).is_some_and(|(ns, n)| ns == namespace && n == name)
            && c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
    })
}

async fn reconcile(claim: Arc<Claim>, ctx: Arc<Context>) -> Result<Action, Error> {
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
    let api = Api::<Claim>::namespaced(ctx.client.clone(), &namespace);
    kubeapi::remove_finalizer(&api, claim.as_ref(), CLONE_FINALIZER).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(name: &str, namespace: &str, phase: &str, source: Option<&str>) -> Claim {
        let data_source = source.map(|s| json!({ "kind": "PersistentVolumeClaim", "name": s }));
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": namespace },
            "spec": { "dataSource": data_source },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    /// A clone from `from`/`src` through `dataSourceRef` only, as the API
    /// server leaves a claim whose source is in another namespace.
    fn clone_across(namespace: &str, from: &str) -> Claim {
        let mut c = claim("c", namespace, "Pending", None);
        c.spec.as_mut().unwrap().data_source_ref = Some(
            serde_json::from_value(
                json!({ "kind": "PersistentVolumeClaim", "name": "src", "namespace": from }),
            )
            .unwrap(),
        );
        c
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

    #[test]
    fn a_pending_clone_from_another_namespace_holds_its_source() {
        let across = clone_across("other", "ns");
        assert!(clone_pending([&across], "ns", "src"));
        assert!(!clone_pending([&across], "other", "src"));
        assert_eq!(
            cloned_from(&across),
            Some(("ns".to_string(), "src".to_string()))
        );
    }
}
