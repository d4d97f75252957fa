//! The standard `csi.storage.k8s.io/*` StorageClass parameters: which
//! Secret goes with which CSI call, with external-provisioner's templates,
//! and the parameters that reach the driver (all others).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

pub const PREFIX: &str = "csi.storage.k8s.io/";
pub const FS_TYPE: &str = "csi.storage.k8s.io/fstype";

/// The CSI calls a Secret can be configured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFor {
    Provisioner,
    ControllerPublish,
    NodeStage,
    NodePublish,
    ControllerExpand,
    NodeExpand,
}

impl SecretFor {
    fn key(self) -> &'static str {
        match self {
            SecretFor::Provisioner => "provisioner",
            SecretFor::ControllerPublish => "controller-publish",
            SecretFor::NodeStage => "node-stage",
            SecretFor::NodePublish => "node-publish",
            SecretFor::ControllerExpand => "controller-expand",
            SecretFor::NodeExpand => "node-expand",
        }
    }

    /// The PV field that carries this reference, if any.
    pub fn pv_field(self) -> Option<&'static str> {
        match self {
            SecretFor::Provisioner => None,
            SecretFor::ControllerPublish => Some("controllerPublishSecretRef"),
            SecretFor::NodeStage => Some("nodeStageSecretRef"),
            SecretFor::NodePublish => Some("nodePublishSecretRef"),
            SecretFor::ControllerExpand => Some("controllerExpandSecretRef"),
            SecretFor::NodeExpand => Some("nodeExpandSecretRef"),
        }
    }

    pub const ALL: [SecretFor; 6] = [
        SecretFor::Provisioner,
        SecretFor::ControllerPublish,
        SecretFor::NodeStage,
        SecretFor::NodePublish,
        SecretFor::ControllerExpand,
        SecretFor::NodeExpand,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("StorageClass parameter {0} is set without its pair {1}: set both or neither")]
    Unpaired(String, String),
    #[error(
        "StorageClass parameter {key}: {value:?} uses an unknown template; use ${{pv.name}}, ${{pvc.namespace}} or ${{pvc.name}}"
    )]
    Template { key: String, value: String },
}

/// What templates may refer to.
pub struct TemplateValues<'a> {
    pub pv_name: &'a str,
    pub claim_namespace: &'a str,
    pub claim_name: &'a str,
}

fn expand(key: &str, value: &str, values: &TemplateValues) -> Result<String, SecretError> {
    let out = value
        .replace("${pv.name}", values.pv_name)
        .replace("${pvc.namespace}", values.claim_namespace)
        .replace("${pvc.name}", values.claim_name);
    if out.contains("${") {
        return Err(SecretError::Template {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(out)
}

/// The Secret configured for `kind`, if any.
pub fn secret_ref(
    params: &BTreeMap<String, String>,
    kind: SecretFor,
    values: &TemplateValues,
) -> Result<Option<SecretRef>, SecretError> {
    let name_key = format!("{PREFIX}{}-secret-name", kind.key());
    let ns_key = format!("{PREFIX}{}-secret-namespace", kind.key());
    match (params.get(&name_key), params.get(&ns_key)) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(SecretError::Unpaired(name_key, ns_key)),
        (None, Some(_)) => Err(SecretError::Unpaired(ns_key, name_key)),
        (Some(name), Some(ns)) => Ok(Some(SecretRef {
            name: expand(&name_key, name, values)?,
            namespace: expand(&ns_key, ns, values)?,
        })),
    }
}

/// Every configured reference, checked: errors surface at provisioning,
/// not at the first attach.
pub fn all_refs(
    params: &BTreeMap<String, String>,
    values: &TemplateValues,
) -> Result<Vec<(SecretFor, SecretRef)>, SecretError> {
    let mut out = Vec::new();
    for kind in SecretFor::ALL {
        if let Some(r) = secret_ref(params, kind, values)? {
            out.push((kind, r));
        }
    }
    Ok(out)
}

/// The parameters the driver sees: Kubernetes' own keys stripped, as
/// external-provisioner does.
pub fn driver_parameters(params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A Secret a class names that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read Secret {namespace}/{name}, which StorageClass parameters \
     csi.storage.k8s.io/{for_key}-secret-* name: {source}; create it or fix the parameters"
)]
pub struct ReadError {
    pub namespace: String,
    pub name: String,
    pub for_key: &'static str,
    #[source]
    pub source: Box<kube::Error>,
}

/// A Secret's data as strings, for a CSI call's `secrets`.
pub async fn read(
    client: &Client,
    r: &SecretRef,
    kind: SecretFor,
) -> Result<BTreeMap<String, String>, ReadError> {
    let secret = Api::<Secret>::namespaced(client.clone(), &r.namespace)
        .get(&r.name)
        .await
        .map_err(|source| ReadError {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            for_key: kind.key(),
            source: Box::new(source),
        })?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const VALUES: TemplateValues = TemplateValues {
        pv_name: "pvc-1",
        claim_namespace: "team",
        claim_name: "data",
    };

    #[test]
    fn templates_expand_and_unknown_ones_are_refused() {
        let p = params(&[
            (
                "csi.storage.k8s.io/provisioner-secret-name",
                "${pvc.name}-key",
            ),
            (
                "csi.storage.k8s.io/provisioner-secret-namespace",
                "${pvc.namespace}",
            ),
        ]);
        assert_eq!(
            secret_ref(&p, SecretFor::Provisioner, &VALUES).unwrap(),
            Some(SecretRef {
                namespace: "team".into(),
                name: "data-key".into()
            })
        );
        let bad = params(&[
            (
                "csi.storage.k8s.io/node-stage-secret-name",
                "${pvc.annotations['x']}",
            ),
            ("csi.storage.k8s.io/node-stage-secret-namespace", "ns"),
        ]);
        let err = secret_ref(&bad, SecretFor::NodeStage, &VALUES).unwrap_err();
        assert!(err.to_string().contains("${pv.name}"), "{err}");
    }

    #[test]
    fn half_a_reference_is_an_error_naming_the_missing_key() {
        let p = params(&[("csi.storage.k8s.io/controller-publish-secret-name", "s")]);
        let err = all_refs(&p, &VALUES).unwrap_err();
        assert!(
            err.to_string()
                .contains("csi.storage.k8s.io/controller-publish-secret-namespace"),
            "{err}"
        );
    }

    #[test]
    fn the_driver_sees_only_its_own_parameters() {
        let p = params(&[("type", "fast"), (FS_TYPE, "xfs")]);
        assert_eq!(driver_parameters(&p), params(&[("type", "fast")]));
    }
}
