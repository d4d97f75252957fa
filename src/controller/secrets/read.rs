//! Reading the Secret a CSI call needs, with errors that say which class
//! key or PV field named it and what RBAC is missing.

use crate::controller::cached_pv::Pv;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::{SecretFor, SecretRef, Secrets};

/// The manifest that lets the controller read Secrets. Reading them is
/// needed only by classes of `--csi-driver`s that name Secrets, so the
/// main ClusterRole does not grant it.
pub const RBAC_MANIFEST: &str = "manifests/optional/controller-secrets.yaml";

/// A Secret a class names that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "stowage-controller may not read Secret {namespace}/{name}, which the class's \
         parameters csi.storage.k8s.io/{for_key}-secret-* name: reading Secrets is granted \
         separately, apply {manifest} (ClusterRole stowage-controller-secrets). \
         API server: {message}",
        manifest = RBAC_MANIFEST
    )]
    Forbidden {
        namespace: String,
        name: String,
        for_key: &'static str,
        message: String,
    },
    #[error(
        "cannot read Secret {namespace}/{name}, which the class's parameters \
         csi.storage.k8s.io/{for_key}-secret-* name: {source}; create it or fix the parameters"
    )]
    Unreadable {
        namespace: String,
        name: String,
        for_key: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{name} (csi.storage.k8s.io/{for_key}-secret-*): {source}")]
    NotText {
        namespace: String,
        name: String,
        for_key: &'static str,
        #[source]
        source: crate::backend::secrets::NotText,
    },
}

impl ReadError {
    /// The API server's refusal, when RBAC is what stands in the way.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, ReadError::Forbidden { .. })
    }
}

/// The Secret a PV names for `kind` (`controllerPublishSecretRef`, ...),
/// read; empty when it names none.
pub async fn for_pv(client: &Client, pv: &Pv, kind: SecretFor) -> Result<Secrets, ReadError> {
    match pv_reference(pv, kind) {
        Some(reference) => read(client, &reference, kind).await,
        None => Ok(Secrets::default()),
    }
}

/// Where a PV names its Secret for `kind`: a field of its CSI source, or
/// (controller-modify) a pair of annotations.
fn pv_reference(pv: &Pv, kind: SecretFor) -> Option<SecretRef> {
    if let Some((name, namespace)) = kind.pv_annotations() {
        let annotations = pv.annotations();
        return Some(SecretRef {
            namespace: annotations.get(namespace)?.clone(),
            name: annotations.get(name)?.clone(),
        });
    }
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    let r = match kind {
        SecretFor::ControllerPublish => csi.controller_publish_secret_ref.as_ref(),
        SecretFor::ControllerExpand => csi.controller_expand_secret_ref.as_ref(),
        SecretFor::NodeStage => csi.node_stage_secret_ref.as_ref(),
        SecretFor::NodePublish => csi.node_publish_secret_ref.as_ref(),
        SecretFor::NodeExpand => csi.node_expand_secret_ref.as_ref(),
        SecretFor::Provisioner | SecretFor::ControllerModify | SecretFor::Snapshotter => None,
    }?;
    Some(SecretRef {
        namespace: r.namespace.clone().unwrap_or_default(),
        name: r.name.clone().unwrap_or_default(),
    })
}

/// A Secret's data for a CSI call's `secrets`, byte for byte.
pub async fn read(client: &Client, r: &SecretRef, kind: SecretFor) -> Result<Secrets, ReadError> {
    let (namespace, name, for_key) = (r.namespace.clone(), r.name.clone(), kind.key());
    let secret = match Api::<Secret>::namespaced(client.clone(), &r.namespace)
        .get(&r.name)
        .await
    {
        Ok(secret) => secret,
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return Err(ReadError::Forbidden {
                namespace,
                name,
                for_key,
                message: status.message,
            });
        }
        Err(source) => {
            return Err(ReadError::Unreadable {
                namespace,
                name,
                for_key,
                source: Box::new(source),
            });
        }
    };
    let data = secret.data.unwrap_or_default();
    Secrets::from_data(data.into_iter().map(|(k, v)| (k, v.0)).collect()).map_err(|source| {
        ReadError::NotText {
            namespace,
            name,
            for_key,
            source,
        }
    })
}
