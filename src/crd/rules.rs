//! CEL rules the API server enforces on our objects, whoever writes them.
//!
//! A rule on a field (`self == oldSelf` on `spec.node`) runs only when the
//! field is present in both the old and the new object: removing the field
//! in one write and adding a new value in the next passes it. So each
//! immutable field gets its rule on the parent object, where `has()` sees
//! the removal, with `fieldPath` naming the field in the error. The rules
//! are made from the schema's own property list, so a field added to the
//! Rust types later is frozen too unless it is named as mutable.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, ValidationRule,
};

/// The rule keeping one property of an object as it was.
fn frozen(property: &str, required: bool) -> ValidationRule {
    let rule = if required {
        format!("self.{property} == oldSelf.{property}")
    } else {
        format!(
            "has(self.{property}) == has(oldSelf.{property}) && \
             (!has(self.{property}) || self.{property} == oldSelf.{property})"
        )
    };
    ValidationRule {
        rule,
        message: Some(format!("{property} is immutable")),
        field_path: Some(format!(".{property}")),
        ..Default::default()
    }
}

/// Adds to `object` one rule per property, except those in `mutable`,
/// that refuses any change to it: a new value, a removal or an addition.
pub(crate) fn freeze(object: &mut JSONSchemaProps, mutable: &[&str]) {
    let required = object.required.clone().unwrap_or_default();
    let rules: Vec<ValidationRule> = object
        .properties
        .iter()
        .flatten()
        .map(|(name, _)| name)
        .filter(|name| !mutable.contains(&name.as_str()))
        .map(|name| frozen(name, required.contains(name)))
        .collect();
    object
        .x_kubernetes_validations
        .get_or_insert_with(Vec::new)
        .extend(rules);
}

/// The top-level schema of a CRD's only version.
pub(crate) fn root(crd: &mut CustomResourceDefinition) -> &mut JSONSchemaProps {
    crd.spec.versions[0]
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .expect("kube-derive writes a schema")
}

/// A property of an object schema.
pub(crate) fn property<'a>(object: &'a mut JSONSchemaProps, name: &str) -> &'a mut JSONSchemaProps {
    object
        .properties
        .as_mut()
        .and_then(|p| p.get_mut(name))
        .unwrap_or_else(|| panic!("schema has no property {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(required: &[&str], properties: &[&str]) -> JSONSchemaProps {
        JSONSchemaProps {
            type_: Some("object".into()),
            required: Some(required.iter().map(|s| s.to_string()).collect()),
            properties: Some(
                properties
                    .iter()
                    .map(|p| (p.to_string(), JSONSchemaProps::default()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn every_property_but_the_mutable_ones_is_frozen_at_the_parent() {
        let mut spec = object(&["driver"], &["driver", "node", "size"]);
        freeze(&mut spec, &["size"]);
        let rules = spec.x_kubernetes_validations.unwrap();
        let paths: Vec<_> = rules
            .iter()
            .map(|r| r.field_path.clone().unwrap())
            .collect();
        assert_eq!(paths, [".driver", ".node"]);
        assert_eq!(rules[0].rule, "self.driver == oldSelf.driver");
        // An optional field: its removal is a change.
        assert!(
            rules[1]
                .rule
                .starts_with("has(self.node) == has(oldSelf.node)"),
            "{}",
            rules[1].rule
        );
    }
}
