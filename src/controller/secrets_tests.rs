//! external-provisioner's template rules, kind by kind, and the names they
//! may give.

use super::*;

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn annotations() -> CompactMap<String, String> {
    params(&[
        ("example.com/key", "team-key"),
        ("example.com/bad", "Not_A_Name"),
    ])
    .into()
}

/// What the templates of claim team/data, provisioned as pvc-1, read.
fn values(claim_annotations: &CompactMap<String, String>) -> TemplateValues<'_> {
    TemplateValues {
        pv_name: "pvc-1",
        claim_namespace: "team",
        claim_name: "data",
        claim_annotations,
    }
}

fn resolve_for(kind: SecretFor, name: &str, ns: &str) -> Result<Option<SecretRef>, SecretError> {
    let annotations = annotations();
    let values = values(&annotations);
    let key = |half: &str| format!("{PREFIX}{}-secret-{half}", kind.key());
    secret_ref(
        &params(&[(&key("name"), name), (&key("namespace"), ns)]),
        kind,
        &values,
    )
}

fn resolved(kind: SecretFor, name: &str, ns: &str) -> (String, String) {
    let r = resolve_for(kind, name, ns).unwrap().unwrap();
    (r.name, r.namespace)
}

#[test]
fn every_kind_takes_the_claim_and_pv_in_names_and_pv_and_namespace_in_namespaces() {
    for kind in SecretFor::ALL {
        assert_eq!(
            resolved(
                kind,
                "${pvc.name}-${pvc.namespace}-${pv.name}",
                "${pvc.namespace}"
            ),
            ("data-team-pvc-1".into(), "team".into()),
            "{kind:?}"
        );
        assert_eq!(
            resolved(kind, "fixed", "ns-${pv.name}"),
            ("fixed".into(), "ns-pvc-1".into())
        );
    }
}

#[test]
fn annotations_name_secrets_for_every_kind_but_the_provisioner() {
    let name = "${pvc.annotations['example.com/key']}";
    for kind in SecretFor::ALL {
        let got = resolve_for(kind, name, "team");
        if kind == SecretFor::Provisioner {
            let err = got.unwrap_err();
            assert!(
                matches!(&err, SecretError::Token { token, .. } if token == "pvc.annotations['example.com/key']"),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains("csi.storage.k8s.io/provisioner-secret-name"),
                "{err}"
            );
        } else {
            assert_eq!(got.unwrap().unwrap().name, "team-key", "{kind:?}");
        }
    }
    let err = resolve_for(
        SecretFor::NodeStage,
        "${pvc.annotations['example.com/none']}",
        "team",
    )
    .unwrap_err();
    assert!(
        matches!(&err, SecretError::Annotation { annotation, .. } if annotation == "example.com/none"),
        "{err}"
    );
}

#[test]
fn a_namespace_never_comes_from_the_claims_name_or_annotations() {
    for kind in SecretFor::ALL {
        for ns in [
            "${pvc.name}",
            "${pvc.annotations['example.com/key']}",
            "${pv.uid}",
        ] {
            let err = resolve_for(kind, "s", ns).unwrap_err();
            let SecretError::Token {
                key, part, allowed, ..
            } = &err
            else {
                panic!("{kind:?} {ns}: {err}")
            };
            assert_eq!(key, &format!("{PREFIX}{}-secret-namespace", kind.key()));
            assert_eq!(*part, "namespace");
            assert_eq!(allowed, "${pv.name} or ${pvc.namespace}");
        }
    }
}

#[test]
fn results_must_be_dns_names() {
    let kind = SecretFor::NodePublish;
    for (name, ns) in [
        ("Upper", "team"),
        ("s", "team.with.dots"),
        ("s", "-team"),
        ("under_score", "team"),
        ("${pvc.annotations['example.com/bad']}", "team"),
        ("a..b", "team"),
        ("unterminated-${pv.name", "team"),
        ("$pvc", "team"),
    ] {
        let err = resolve_for(kind, name, ns).unwrap_err();
        assert!(
            matches!(err, SecretError::Invalid { .. }),
            "{name} {ns}: {err}"
        );
    }
    let long_ns = "n".repeat(64);
    assert!(resolve_for(kind, "s", &long_ns).is_err());
    assert!(
        resolve_for(kind, &"n".repeat(64), "team").is_ok(),
        "a Secret name part may exceed 63"
    );
    assert!(resolve_for(kind, &"n".repeat(254), "team").is_err());
    assert_eq!(
        resolved(kind, "tls.key-2", "team"),
        ("tls.key-2".into(), "team".into())
    );
    let err = resolve_for(kind, "${pvc.annotations['example.com/bad']}", "team").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("csi.storage.k8s.io/node-publish-secret-name")
            && text.contains("Not_A_Name")
            && text.contains("DNS-1123 subdomain"),
        "{text}"
    );
}

#[test]
fn half_a_reference_or_an_empty_one_is_an_error_naming_the_key() {
    let none = CompactMap::new();
    let values = values(&none);
    let p = params(&[("csi.storage.k8s.io/controller-publish-secret-name", "s")]);
    let err = all_refs(&p, &values).unwrap_err();
    assert!(
        err.to_string()
            .contains("csi.storage.k8s.io/controller-publish-secret-namespace"),
        "{err}"
    );
    let p = params(&[
        ("csi.storage.k8s.io/node-stage-secret-name", ""),
        ("csi.storage.k8s.io/node-stage-secret-namespace", "team"),
    ]);
    assert_eq!(
        all_refs(&p, &values).unwrap_err(),
        SecretError::Empty {
            key: "csi.storage.k8s.io/node-stage-secret-name".into()
        }
    );
}

#[test]
fn the_default_pair_serves_kinds_without_their_own() {
    let none = CompactMap::new();
    let values = values(&none);
    let p = params(&[
        ("csi.storage.k8s.io/secret-name", "shared"),
        ("csi.storage.k8s.io/secret-namespace", "${pvc.namespace}"),
        ("csi.storage.k8s.io/node-stage-secret-name", "stage"),
        ("csi.storage.k8s.io/node-stage-secret-namespace", "other"),
    ]);
    let refs = all_refs(&p, &values).unwrap();
    assert_eq!(refs.len(), SecretFor::ALL.len());
    for (kind, r) in refs {
        let expected = if kind == SecretFor::NodeStage {
            ("stage", "other")
        } else {
            ("shared", "team")
        };
        assert_eq!(
            (r.name.as_str(), r.namespace.as_str()),
            expected,
            "{kind:?}"
        );
    }
}

#[test]
fn the_driver_sees_only_its_own_parameters() {
    let p = params(&[
        ("type", "fast"),
        (FS_TYPE, "xfs"),
        ("csi.storage.k8s.io/node-stage-secret-name", "s"),
        ("csi.storage.k8s.io/node-stage-secret-namespace", "ns"),
        // Deprecated spellings are not Kubernetes' prefix: they pass.
        ("csiNodeStageSecretName", "s"),
    ]);
    assert_eq!(
        driver_parameters(&p),
        params(&[("type", "fast"), ("csiNodeStageSecretName", "s")])
    );
}

#[test]
fn the_filesystem_type_comes_from_either_spelling() {
    assert_eq!(fs_type(&params(&[(FS_TYPE, "xfs")])), Some("xfs"));
    assert_eq!(fs_type(&params(&[("fsType", "ext4")])), Some("ext4"));
    assert_eq!(fs_type(&params(&[("type", "fast")])), None);
    let both = params(&[(FS_TYPE, "xfs"), ("FSTYPE", "ext4")]);
    assert_eq!(fs_type_keys(&both).len(), 2);
}

#[test]
fn only_kubernetes_own_keys_may_use_its_prefix() {
    let mut known = vec![FS_TYPE.to_string()];
    for kind in [
        "",
        "provisioner-",
        "controller-publish-",
        "node-stage-",
        "node-publish-",
    ]
    .into_iter()
    .chain(["controller-expand-", "node-expand-", "controller-modify-"])
    {
        for half in ["name", "namespace"] {
            known.push(format!("{PREFIX}{kind}secret-{half}"));
        }
    }
    let p: BTreeMap<String, String> = known.iter().map(|k| (k.clone(), "x".into())).collect();
    assert_eq!(unknown_reserved_key(&p), None);
    for unknown in [
        "csi.storage.k8s.io/pvc/name",
        "csi.storage.k8s.io/fsType",
        "csi.storage.k8s.io/provisioner-secret",
    ] {
        let mut p = p.clone();
        p.insert(unknown.into(), "x".into());
        assert_eq!(unknown_reserved_key(&p), Some(unknown));
    }
}

#[test]
fn a_forbidden_read_names_the_manifest_to_apply() {
    let err = ReadError::Forbidden {
        namespace: "team".into(),
        name: "creds".into(),
        for_key: "provisioner",
        message: "secrets \"creds\" is forbidden".into(),
    };
    let text = err.to_string();
    assert!(
        text.contains(RBAC_MANIFEST) && text.contains("team/creds"),
        "{text}"
    );
    assert!(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(RBAC_MANIFEST)
            .is_file(),
        "{RBAC_MANIFEST} is missing"
    );
}
