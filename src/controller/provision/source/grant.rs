//! Data sources in another namespace (a claim's `dataSourceRef` with a
//! `namespace`), as external-provisioner v6 allows them with its
//! CrossNamespaceVolumeDataSource feature gate: only with the controller's
//! `--cross-namespace-data-sources`, and only when a Gateway API
//! ReferenceGrant in the source's namespace lets claims of the claim's
//! namespace refer to that source.
//!
//! `check` is pure; `allowed` gives it the grants of the source's
//! namespace, read from the API server (None when the cluster serves no
//! ReferenceGrants). A claim refused for want of a grant is looked at
//! again when one is created (`controller::reference_grants`).

use kube::api::ListParams;
use kube::{Api, CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::{KIND_CLAIM, Requested};
use crate::controller::cached_claim::Claim;
use crate::controller::{Context, Error};

pub const GROUP: &str = "gateway.networking.k8s.io";

/// `ReferenceGrant.spec` (gateway.networking.k8s.io/v1beta1): the fields
/// read. Its CRD comes with Gateway API, never from stowage.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    namespaced,
    schema = "disabled"
)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

/// Who may refer: objects of a kind in a namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GrantFrom {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
}

/// What may be referred to, in the grant's namespace: objects of a kind,
/// or one of them by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A claim's reference to a source in another namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub claim_namespace: String,
    pub claim_name: String,
    /// The source's namespace, where the grant must be.
    pub namespace: String,
    /// `dataSourceRef.apiGroup`, "" for the core group.
    pub group: String,
    pub kind: String,
    pub name: String,
}

impl Reference {
    pub fn new(claim: &Claim, requested: &Requested) -> Reference {
        Reference {
            claim_namespace: claim.namespace().unwrap_or_default(),
            claim_name: claim.name_any(),
            namespace: requested.namespace.clone(),
            group: requested.api_group.clone(),
            kind: requested.kind.clone(),
            name: requested.name.clone(),
        }
    }

    /// The ReferenceGrant that would allow this reference.
    fn needed(&self) -> String {
        format!(
            "a ReferenceGrant ({GROUP}/v1beta1) in namespace {} with from \
             {{group: \"\", kind: {KIND_CLAIM}, namespace: {}}} and to \
             {{group: \"{}\", kind: {}, name: {}}} (without a name it grants every {} there)",
            self.namespace, self.claim_namespace, self.group, self.kind, self.name, self.kind
        )
    }
}

/// Why a source in another namespace may not be used; each says what to
/// do. (Boxed: every provisioning result carries the error's size.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error(
        "dataSourceRef names {kind} {namespace}/{name} in another namespace, which the stowage \
         controller allows only with --cross-namespace-data-sources (external-provisioner's \
         CrossNamespaceVolumeDataSource feature gate), off: enable it and create {}, or use a \
         source in the claim's namespace",
        .0.needed(),
        kind = .0.kind,
        namespace = .0.namespace,
        name = .0.name
    )]
    FlagOff(Box<Reference>),
    #[error(
        "accessing {namespace}/{name} of {kind} dataSource from {claim_namespace}/{claim} isn't \
         allowed: create {}",
        .0.needed(),
        kind = .0.kind,
        namespace = .0.namespace,
        name = .0.name,
        claim_namespace = .0.claim_namespace,
        claim = .0.claim_name
    )]
    NotGranted(Box<Reference>),
    #[error(
        "accessing {namespace}/{name} of {kind} dataSource from another namespace needs a \
         ReferenceGrant, and this cluster serves none: install Gateway API's ReferenceGrant CRD \
         ({GROUP}), then create {}",
        .0.needed(),
        kind = .0.kind,
        namespace = .0.namespace,
        name = .0.name
    )]
    NoGrantCrd(Box<Reference>),
}

/// Whether the claim may use its source: always in its own namespace;
/// elsewhere only with the flag on and a grant for it. `grants` are those
/// of the source's namespace, None when ReferenceGrants are not served.
pub fn check(
    reference: &Reference,
    enabled: bool,
    grants: Option<&[ReferenceGrant]>,
) -> Result<(), AccessError> {
    if reference.namespace == reference.claim_namespace {
        return Ok(());
    }
    if !enabled {
        return Err(AccessError::FlagOff(Box::new(reference.clone())));
    }
    let Some(grants) = grants else {
        return Err(AccessError::NoGrantCrd(Box::new(reference.clone())));
    };
    if grants.iter().any(|g| is_granted(g, reference)) {
        Ok(())
    } else {
        Err(AccessError::NotGranted(Box::new(reference.clone())))
    }
}

/// external-provisioner's rule: the grant is in the source's namespace,
/// one `from` names claims of the claim's namespace, and one `to` names
/// the source's group and kind, and its name or none.
pub fn is_granted(grant: &ReferenceGrant, reference: &Reference) -> bool {
    let from = grant.spec.from.iter().any(|f| {
        f.group.is_empty() && f.kind == KIND_CLAIM && f.namespace == reference.claim_namespace
    });
    let to = grant.spec.to.iter().any(|t| {
        t.group == reference.group
            && t.kind == reference.kind
            && t.name
                .as_deref()
                .is_none_or(|n| n.is_empty() || n == reference.name)
    });
    grant.namespace().as_deref() == Some(reference.namespace.as_str()) && from && to
}

/// `check` for the claim's source, with the grants of the source's
/// namespace read only when they matter: from another namespace, the
/// flag on. The outer error is the API server's.
pub async fn allowed(
    ctx: &Context,
    claim: &Claim,
    requested: &Requested,
) -> Result<Result<(), AccessError>, Error> {
    let reference = Reference::new(claim, requested);
    let enabled = ctx.cross_namespace_sources;
    let grants = if enabled && reference.namespace != reference.claim_namespace {
        read(ctx, &reference.namespace).await?
    } else {
        None
    };
    Ok(check(&reference, enabled, grants.as_deref()))
}

/// The ReferenceGrants of `namespace`; None when the cluster does not
/// serve them (their CRD is not installed).
async fn read(ctx: &Context, namespace: &str) -> Result<Option<Vec<ReferenceGrant>>, Error> {
    let api = Api::<ReferenceGrant>::namespaced(ctx.client.clone(), namespace);
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(Some(list.items)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
