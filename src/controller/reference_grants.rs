//! With `--cross-namespace-data-sources`: a claim whose source in another
//! namespace is refused for want of a ReferenceGrant is looked at again as
//! soon as a grant in that namespace is created, changed or deleted,
//! rather than at its backoff (up to minutes).
//!
//! ReferenceGrants are Gateway API's, installed with it or not at all:
//! until they are served the watch waits (and says so once), so a cluster
//! without them runs as before and one that adds them later needs no
//! restart.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::mpsc::UnboundedSender;

use super::Context;
use super::job::JobRun;
use super::provision::source::{self, grant::ReferenceGrant};
use crate::controller::cached_claim::Claim;
use crate::kubeapi;

/// How often a cluster without the ReferenceGrant CRD is asked again.
const CRD_POLL: Duration = Duration::from_secs(30);

/// Sends to `requeue` the pending claims a grant's change may concern;
/// nothing at all with the flag off.
pub fn requeue_on_change(ctx: Arc<Context>, requeue: UnboundedSender<ObjectRef<Claim>>) -> JobRun {
    async move {
        if !ctx.cross_namespace_sources {
            return;
        }
        let api = Api::<ReferenceGrant>::all(ctx.client.clone());
        kubeapi::wait_until_served(
            &api,
            CRD_POLL,
            "no ReferenceGrant CRD (gateway.networking.k8s.io) in this cluster: claims with a data source in another namespace wait until Gateway API's CRD is installed",
            "ReferenceGrants served: watching them for claims with a data source in another namespace",
        )
        .await;
        let grants = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .touched_objects();
        grants
            .for_each(|grant| {
                match grant {
                    Ok(grant) => {
                        let namespace = grant.namespace().unwrap_or_default();
                        let claims = ctx.stores.claims.state();
                        for claim in waiting_on(claims.iter().map(|c| c.as_ref()), &namespace) {
                            let _ = requeue.send(claim);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching ReferenceGrants"),
                }
                futures::future::ready(())
            })
            .await;
    }
    .boxed()
}

/// The claims not bound yet whose `dataSourceRef` names a source in
/// `namespace`, other than their own.
pub fn waiting_on<'a>(
    claims: impl IntoIterator<Item = &'a Claim>,
    namespace: &str,
) -> Vec<ObjectRef<Claim>> {
    claims
        .into_iter()
        .filter(|c| c.spec.as_ref().is_none_or(|s| s.volume_name.is_none()))
        .filter(|c| {
            source::requested(c).is_some_and(|r| {
                r.namespace == namespace && Some(namespace) != c.namespace().as_deref()
            })
        })
        .map(ObjectRef::from_obj)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(name: &str, from: Option<&str>, volume: Option<&str>) -> Claim {
        let source = json!({
            "kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io",
            "name": "snap", "namespace": from,
        });
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "ns" },
            "spec": { "dataSourceRef": source, "volumeName": volume },
        }))
        .unwrap()
    }

    #[test]
    fn only_unbound_claims_with_a_source_in_that_namespace_are_asked_again() {
        let waiting = claim("waiting", Some("src"), None);
        let bound = claim("bound", Some("src"), Some("pv"));
        let elsewhere = claim("elsewhere", Some("other"), None);
        let own = claim("own", None, None);
        let claims = [&waiting, &bound, &elsewhere, &own];
        let names: Vec<_> = waiting_on(claims, "src")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["waiting"]);
        // A grant in the claims' own namespace concerns none of them.
        assert!(waiting_on(claims, "ns").is_empty());
    }
}
