//! Whether the cluster holds this release's CRDs: a role refuses to start
//! against a missing or older CRD, saying what to apply, instead of
//! watching a 404 forever or having the API server drop new fields.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, ResourceExt};

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("cannot reach the Kubernetes API: {0}. Set KUBECONFIG or run inside a cluster")]
    Connect(#[source] kube::Error),
    #[error(
        "CustomResourceDefinition {name} is not installed or not established: {reason}. \
         Install it with `stowage crds | kubectl apply -f -` (or `kubectl apply -f crds/`)"
    )]
    CrdMissing { name: String, reason: String },
    #[error(
        "CustomResourceDefinition {name} is older than stowage {version}: it lacks {missing}, \
         which the API server would silently drop. Apply this release's CRDs first \
         (`kubectl apply -k manifests/` applies both; or `stowage crds | kubectl apply -f -`)"
    )]
    CrdOutdated {
        name: String,
        version: &'static str,
        missing: String,
    },
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
}

impl CrdError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CrdError::Connect(_) => "connect",
            CrdError::CrdMissing { .. } => "crd_missing",
            CrdError::CrdOutdated { .. } => "crd_outdated",
            CrdError::Kube(_) => "kube",
        }
    }
}

/// Fails with an actionable message when our CRDs are absent, rather than
/// letting the watchers retry forever against a 404.
pub async fn ensure_established(client: &Client) -> Result<(), CrdError> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in super::all() {
        let name = crd.name_any();
        let found = match api.get_opt(&name).await {
            Ok(found) => found,
            Err(e @ kube::Error::Api(_)) => return Err(CrdError::Kube(e)),
            Err(e) => return Err(CrdError::Connect(e)),
        };
        let Some(found) = found else {
            return Err(CrdError::CrdMissing {
                name,
                reason: "not found".into(),
            });
        };
        if !is_established(&found) {
            return Err(CrdError::CrdMissing {
                name,
                reason: "not established".into(),
            });
        }
        let missing = super::missing_fields(&found, &crd);
        if !missing.is_empty() {
            return Err(CrdError::CrdOutdated {
                name,
                version: env!("CARGO_PKG_VERSION"),
                missing: missing.join(", "),
            });
        }
    }
    Ok(())
}

pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}
