//! The standard `csi.storage.k8s.io/*` StorageClass parameters: which
//! Secret goes with which CSI call, resolved exactly as external-provisioner
//! resolves them, and the parameters that reach the driver (all others).
//!
//! Templates, per external-provisioner's `getSecretReference`:
//! - a namespace may use `${pv.name}` and `${pvc.namespace}`: neither is
//!   chosen by the claim's author, so a claim cannot point the driver at a
//!   Secret in a namespace of its choosing;
//! - a name may also use `${pvc.name}` and, except for the provisioner
//!   Secret (resolved from the claim's name and namespace alone),
//!   `${pvc.annotations['KEY']}`.
//!
//! The result must be a namespace name (DNS-1123 label) and a Secret name
//! (DNS-1123 subdomain). A kind with no parameters of its own falls back
//! to `csi.storage.k8s.io/secret-name` / `secret-namespace`.

use std::collections::BTreeMap;

use crate::compact_map::{CompactMap, StringMap};

mod read;

pub use read::{RBAC_MANIFEST, ReadError, for_pv, read};

pub use crate::backend::secrets::Secrets;

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
    /// ControllerModifyVolume (VolumeAttributesClass changes): Kubernetes
    /// has no PV field for it, so the reference travels in the PV's
    /// annotations, where external-provisioner 6.2 writes it and
    /// external-resizer reads it.
    ControllerModify,
    /// CreateSnapshot and DeleteSnapshot: named by a VolumeSnapshotClass,
    /// never by a StorageClass (so not in `ALL`).
    Snapshotter,
}

impl SecretFor {
    pub fn key(self) -> &'static str {
        match self {
            SecretFor::Provisioner => "provisioner",
            SecretFor::ControllerPublish => "controller-publish",
            SecretFor::NodeStage => "node-stage",
            SecretFor::NodePublish => "node-publish",
            SecretFor::ControllerExpand => "controller-expand",
            SecretFor::NodeExpand => "node-expand",
            SecretFor::ControllerModify => "controller-modify",
            SecretFor::Snapshotter => "snapshotter",
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
            SecretFor::ControllerModify | SecretFor::Snapshotter => None,
        }
    }

    /// external-provisioner resolves the provisioner Secret from a claim
    /// carrying only its name and namespace: no annotations.
    fn annotations_allowed(self) -> bool {
        self != SecretFor::Provisioner
    }

    /// The PV annotations (name, namespace) that carry this reference,
    /// for a kind that has no PV field.
    pub fn pv_annotations(self) -> Option<(&'static str, &'static str)> {
        (self == SecretFor::ControllerModify).then_some((
            "volume.kubernetes.io/controller-modify-secret-name",
            "volume.kubernetes.io/controller-modify-secret-namespace",
        ))
    }

    pub const ALL: [SecretFor; 7] = [
        SecretFor::Provisioner,
        SecretFor::ControllerPublish,
        SecretFor::NodeStage,
        SecretFor::NodePublish,
        SecretFor::ControllerExpand,
        SecretFor::NodeExpand,
        SecretFor::ControllerModify,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl SecretRef {
    /// The Secret an object's annotations name, as the sidecars record the
    /// one an object's deletion will need; none unless both keys are set.
    pub fn annotated(
        annotations: &impl StringMap,
        name_key: &str,
        namespace_key: &str,
    ) -> Option<SecretRef> {
        Some(SecretRef {
            name: annotations.get(name_key)?.clone(),
            namespace: annotations.get(namespace_key)?.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("StorageClass parameter {0} is set without its pair {1}: set both or neither")]
    Unpaired(String, String),
    #[error("StorageClass parameter {key} is empty: name a Secret, or remove it and its pair")]
    Empty { key: String },
    #[error(
        "StorageClass parameter {key}: {value:?} uses ${{{token}}}, which a secret {part} \
         cannot use; use {allowed}"
    )]
    Token {
        key: String,
        value: String,
        token: String,
        part: &'static str,
        allowed: String,
    },
    #[error(
        "StorageClass parameter {key}: {value:?} uses the claim annotation {annotation:?}, \
         which the claim does not have: annotate the claim"
    )]
    Annotation {
        key: String,
        value: String,
        annotation: String,
    },
    #[error(
        "StorageClass parameter {key}: {value:?} gives {resolved:?}, which is not a valid \
         {part} name ({rule}): fix the template or the {origin}"
    )]
    Invalid {
        key: String,
        value: String,
        resolved: String,
        part: &'static str,
        rule: &'static str,
        origin: &'static str,
    },
}

/// What templates may refer to.
pub struct TemplateValues<'a> {
    pub pv_name: &'a str,
    pub claim_namespace: &'a str,
    pub claim_name: &'a str,
    pub claim_annotations: &'a CompactMap<String, String>,
}

/// Which half of a reference a template gives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Name,
    Namespace,
}

fn value_of<'a>(
    token: &str,
    part: Part,
    kind: SecretFor,
    values: &'a TemplateValues,
) -> Option<Result<&'a str, String>> {
    match token {
        "pv.name" => Some(Ok(values.pv_name)),
        "pvc.namespace" => Some(Ok(values.claim_namespace)),
        "pvc.name" if part == Part::Name => Some(Ok(values.claim_name)),
        _ if part == Part::Name && kind.annotations_allowed() => {
            let key = token
                .strip_prefix("pvc.annotations['")?
                .strip_suffix("']")?;
            Some(
                values
                    .claim_annotations
                    .get(key)
                    .map(String::as_str)
                    .ok_or_else(|| key.to_string()),
            )
        }
        _ => None,
    }
}

fn allowed(part: Part, kind: SecretFor) -> String {
    match part {
        Part::Namespace => "${pv.name} or ${pvc.namespace}".into(),
        Part::Name if kind.annotations_allowed() => {
            "${pv.name}, ${pvc.namespace}, ${pvc.name} or ${pvc.annotations['KEY']}".into()
        }
        Part::Name => "${pv.name}, ${pvc.namespace} or ${pvc.name}".into(),
    }
}

/// One half of a Secret reference as the class writes it: the parameter's
/// key, its text, which half, and for which kind of call.
struct Template<'a> {
    key: &'a str,
    text: &'a str,
    part: Part,
    kind: SecretFor,
}

/// `template` with its `${...}` tokens replaced, as Go's os.Expand does
/// for external-provisioner; any token not allowed here is an error.
fn expand(t: &Template, values: &TemplateValues) -> Result<String, SecretError> {
    let (key, template, part, kind) = (t.key, t.text, t.part, t.kind);
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            // An unterminated token stays as written; validation refuses it.
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let token = &after[..end];
        match value_of(token, part, kind, values) {
            Some(Ok(v)) => out.push_str(v),
            Some(Err(annotation)) => {
                return Err(SecretError::Annotation {
                    key: key.into(),
                    value: template.into(),
                    annotation,
                });
            }
            None => {
                return Err(SecretError::Token {
                    key: key.into(),
                    value: template.into(),
                    token: token.into(),
                    part: if part == Part::Name {
                        "name"
                    } else {
                        "namespace"
                    },
                    allowed: allowed(part, kind),
                });
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
fn label_shaped(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A DNS-1123 label: what a namespace name must be.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && label_shaped(s)
}

/// A DNS-1123 subdomain: what a Secret name must be (Kubernetes limits
/// the whole to 253 characters, not each part to 63).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(label_shaped)
}

/// Resolves one half of a reference and checks the result.
fn resolve(t: Template, values: &TemplateValues) -> Result<String, SecretError> {
    let resolved = expand(&t, values)?;
    let (key, template, part) = (t.key, t.text, t.part);
    let (valid, part_name, rule) = match part {
        Part::Namespace => (
            is_dns1123_label(&resolved),
            "namespace",
            "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending alphanumeric",
        ),
        Part::Name => (
            is_dns1123_subdomain(&resolved),
            "Secret",
            "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253",
        ),
    };
    if valid {
        return Ok(resolved);
    }
    Err(SecretError::Invalid {
        key: key.into(),
        value: template.into(),
        resolved,
        part: part_name,
        rule,
        origin: if template.contains("${") {
            "claim it names"
        } else {
            "parameter"
        },
    })
}

/// The (name, namespace) parameter keys configured for `kind`: its own
/// pair, else the default pair; None when neither is set.
fn keys_for(
    params: &impl StringMap,
    kind: SecretFor,
) -> Result<Option<(String, String)>, SecretError> {
    for prefix in [format!("{PREFIX}{}-", kind.key()), PREFIX.to_string()] {
        let name_key = format!("{prefix}secret-name");
        let ns_key = format!("{prefix}secret-namespace");
        match (params.contains_key(&name_key), params.contains_key(&ns_key)) {
            (false, false) => continue,
            (true, false) => return Err(SecretError::Unpaired(name_key, ns_key)),
            (false, true) => return Err(SecretError::Unpaired(ns_key, name_key)),
            (true, true) => return Ok(Some((name_key, ns_key))),
        }
    }
    Ok(None)
}

/// The Secret configured for `kind`, if any.
pub fn secret_ref(
    params: &impl StringMap,
    kind: SecretFor,
    values: &TemplateValues,
) -> Result<Option<SecretRef>, SecretError> {
    let Some((name_key, ns_key)) = keys_for(params, kind)? else {
        return Ok(None);
    };
    let value = |key: &str| params.get(key).expect("keys_for found it").as_str();
    for key in [&name_key, &ns_key] {
        if value(key).is_empty() {
            return Err(SecretError::Empty { key: key.clone() });
        }
    }
    Ok(Some(SecretRef {
        namespace: resolve(
            Template {
                key: &ns_key,
                text: value(&ns_key),
                part: Part::Namespace,
                kind,
            },
            values,
        )?,
        name: resolve(
            Template {
                key: &name_key,
                text: value(&name_key),
                part: Part::Name,
                kind,
            },
            values,
        )?,
    }))
}

/// Every configured reference, checked: errors surface at provisioning,
/// not at the first attach.
pub fn all_refs(
    params: &impl StringMap,
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

/// The keys that give a class's filesystem type: `csi.storage.k8s.io/fstype`
/// and the deprecated `fstype` in any case, which external-provisioner
/// still reads (and, as it is not under the prefix, also passes on to the
/// driver). More than one is an error there and here.
pub fn fs_type_keys(params: &impl StringMap) -> Vec<&str> {
    params
        .keys()
        .filter(|k| k.as_str() == FS_TYPE || k.eq_ignore_ascii_case("fstype"))
        .map(String::as_str)
        .collect()
}

/// The class's filesystem type, if it gives one.
pub fn fs_type(params: &impl StringMap) -> Option<&str> {
    let key = *fs_type_keys(params).first()?;
    params.get(key).map(String::as_str)
}

/// The first `csi.storage.k8s.io/*` key that is none of Kubernetes' own:
/// external-provisioner refuses such a class rather than guess what the
/// key meant, and so does stowage.
pub fn unknown_reserved_key(params: &impl StringMap) -> Option<&str> {
    let kinds = SecretFor::ALL
        .iter()
        .map(|k| format!("{}-", k.key()))
        .chain([String::new()]);
    let known: Vec<String> = kinds
        .flat_map(|k| [format!("{k}secret-name"), format!("{k}secret-namespace")])
        .chain(["fstype".to_string()])
        .collect();
    params
        .keys()
        .filter_map(|k| k.strip_prefix(PREFIX).map(|rest| (k, rest)))
        .find(|(_, rest)| !known.iter().any(|known| known == rest))
        .map(|(k, _)| k.as_str())
}

/// The parameters the driver sees: Kubernetes' own keys stripped, as
/// external-provisioner does.
pub fn driver_parameters(params: &impl StringMap) -> BTreeMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
#[path = "secrets_tests.rs"]
mod tests;
